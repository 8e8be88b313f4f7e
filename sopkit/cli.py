"""The ``sopkit`` command line: a thin Typer layer over the library.

Nothing here imports torch at module level, so ``sopkit --help`` answers at once; commands import
what they need when they run. A ``UserError`` becomes a one-paragraph message and exit status 2.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from sopkit.bench.config import BenchConfig
from sopkit.checks import check_names, default_of, help_of, plain_help_of
from sopkit.errors import UserError
from sopkit.experiment.plan import ComparePlan, Execution
from sopkit.training.config import TrainConfig

app = typer.Typer(
    name="sopkit",
    help="Simulated overparameterization for PyTorch: train with majority kernels, ship the small "
    "model, and compare it honestly against the alternatives.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Logs and pipes are not terminals; rich would squeeze tables to 80 columns there.
console = Console(width=None if sys.stdout.isatty() else 200)
error_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

F = TypeVar("F", bound=Callable[..., Any])

USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130


def reports_user_errors(command: F) -> F:
    """Turn a UserError into a message and exit status 2 instead of a traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as error:
            from rich.markup import escape

            # A message's own brackets (pip install 'sopkit[ray]') are text, not markup.
            error_console.print(
                f"[bold red]Error:[/] {escape(str(error))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(USER_ERROR_EXIT) from None

    return wrapper  # type: ignore[return-value]


def _parse_options(pairs: list[str]) -> dict[str, str]:
    """``["mk.init=replicate"]`` -> ``{"mk.init": "replicate"}``: the strategy options of --set."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE (e.g. mk.init=replicate), got {pair!r}.")
        options[key.strip()] = value.strip()
    return options


def _names(text: str) -> tuple[str, ...]:
    """``"a, b"`` -> ``("a", "b")``: the comma-separated lists options take."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


@app.command()
@reports_user_errors
def compare(
    dataset: Annotated[str | None, typer.Option(help=help_of(ComparePlan, "dataset"))] = None,
    model: Annotated[str | None, typer.Option(help=help_of(ComparePlan, "models"))] = None,
    strategies: Annotated[
        str | None, typer.Option(help=help_of(ComparePlan, "strategies"))
    ] = None,
    seeds: Annotated[int | None, typer.Option(help=help_of(ComparePlan, "seeds"))] = None,
    first_seed: Annotated[
        int, typer.Option(help="The first seed; seeds are consecutive.")
    ] = default_of(ComparePlan, "seeds")[0],
    epochs: Annotated[int | None, typer.Option(help=help_of(TrainConfig, "epochs"))] = None,
    batch_size: Annotated[
        int | None, typer.Option(help=help_of(TrainConfig, "batch_size"))
    ] = None,
    optimizer: Annotated[str | None, typer.Option(help=help_of(TrainConfig, "optimizer"))] = None,
    lr: Annotated[float | None, typer.Option(help=help_of(TrainConfig, "lr"))] = None,
    lr_grid: Annotated[str | None, typer.Option(help=plain_help_of(ComparePlan, "lr_grid"))] = None,
    extend_grid: Annotated[
        int, typer.Option(help=plain_help_of(ComparePlan, "extend_grid"))
    ] = default_of(ComparePlan, "extend_grid"),
    confirm_seeds: Annotated[
        int, typer.Option(help=plain_help_of(ComparePlan, "confirm_seeds"))
    ] = default_of(ComparePlan, "confirm_seeds"),
    weight_decay: Annotated[
        float | None, typer.Option(help=help_of(TrainConfig, "weight_decay"))
    ] = None,
    schedule: Annotated[str | None, typer.Option(help=help_of(TrainConfig, "schedule"))] = None,
    milestones: Annotated[
        str | None, typer.Option(help=help_of(TrainConfig, "milestones"))
    ] = None,
    lr_decay: Annotated[float | None, typer.Option(help=help_of(TrainConfig, "lr_decay"))] = None,
    warmup_epochs: Annotated[
        int | None, typer.Option(help=help_of(TrainConfig, "lr_warmup_epochs"))
    ] = None,
    label_smoothing: Annotated[
        float | None, typer.Option(help=help_of(TrainConfig, "label_smoothing"))
    ] = None,
    augment: Annotated[str | None, typer.Option(help=help_of(TrainConfig, "augment"))] = None,
    expansion: Annotated[
        int | None, typer.Option(help=help_of(ComparePlan, "expansion"))
    ] = None,
    device: Annotated[
        str, typer.Option(help=plain_help_of(ComparePlan, "device"))
    ] = default_of(ComparePlan, "device"),
    bf16: Annotated[
        bool, typer.Option(help=plain_help_of(TrainConfig, "bf16"))
    ] = default_of(TrainConfig, "bf16"),
    compile_: Annotated[
        bool, typer.Option("--compile", help=plain_help_of(TrainConfig, "compile"))
    ] = default_of(TrainConfig, "compile"),
    data_dir: Annotated[
        str | None, typer.Option(help=plain_help_of(ComparePlan, "data_dir"))
    ] = None,
    download: Annotated[
        bool, typer.Option(help=plain_help_of(ComparePlan, "download"))
    ] = default_of(ComparePlan, "download"),
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Strategy option KEY=VALUE, repeatable; STRATEGY.KEY=VALUE scopes it "
            "(e.g. --set mk.init=replicate).",
        ),
    ] = None,
    preset: Annotated[str | None, typer.Option(help=plain_help_of(ComparePlan, "preset"))] = None,
    no_code_models: Annotated[
        bool,
        typer.Option(
            "--no-code-models",
            help="Refuse package.module:factory models (they run that module's code), e.g. for a "
            "preset from someone else; SOPKIT_NO_CODE_MODELS=1 does the same.",
        ),
    ] = False,
    jobs: Annotated[
        int, typer.Option(help=plain_help_of(Execution, "jobs"))
    ] = default_of(Execution, "jobs"),
    threads: Annotated[
        int, typer.Option(help=plain_help_of(Execution, "threads"))
    ] = default_of(Execution, "threads"),
    data_workers: Annotated[
        int, typer.Option(help=plain_help_of(Execution, "data_workers"))
    ] = default_of(Execution, "data_workers"),
    executor: Annotated[
        str, typer.Option(help=plain_help_of(Execution, "executor"))
    ] = default_of(Execution, "executor"),
    ray_address: Annotated[
        str | None, typer.Option(help=plain_help_of(Execution, "ray_address"))
    ] = default_of(Execution, "ray_address"),
    gpus_per_trial: Annotated[
        float, typer.Option(help=plain_help_of(Execution, "gpus_per_trial"))
    ] = default_of(Execution, "gpus_per_trial"),
    checkpoint_every: Annotated[
        str, typer.Option(help=plain_help_of(Execution, "checkpoint_every"), metavar="SECONDS")
    ] = f"{default_of(Execution, 'checkpoint_every'):g}",
    save_models: Annotated[
        bool, typer.Option(help=plain_help_of(ComparePlan, "save_models"))
    ] = default_of(ComparePlan, "save_models"),
    out: Annotated[
        str | None,
        typer.Option(
            help="Output directory; rerunning into it resumes. \\[default: runs/PRESET or "
            "runs/DATASET-MODEL]"
        ),
    ] = None,
) -> None:
    """Train strategies side by side and report them honestly (resumes into an existing --out)."""
    from sopkit.experiment.plan import (
        build_plan,
        default_out_dir,
        parse_checkpoint_every,
        plan_record,
    )
    from sopkit.experiment.runner import run_plan

    every = parse_checkpoint_every(checkpoint_every)
    plan = build_plan(
        preset=preset,
        dataset=dataset,
        # An empty value (--strategies=) is a mistake, not a request for the defaults.
        models=_names(model) if model is not None else None,
        strategies=_names(strategies) if strategies is not None else None,
        optimizers=_names(optimizer) if optimizer is not None else None,
        seeds=seeds,
        first_seed=first_seed,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        lr_grid=lr_grid,
        weight_decay=weight_decay,
        schedule=schedule,
        milestones=milestones,
        lr_decay=lr_decay,
        warmup_epochs=warmup_epochs,
        label_smoothing=label_smoothing,
        augment=augment,
        expansion=expansion,
        bf16=bf16,
        compile_models=compile_,
        options=_parse_options(set_ or []),
        device=device,
        data_dir=data_dir,
        download=download,
        save_models=save_models,
        extend_grid=extend_grid,
        confirm_seeds=confirm_seeds,
    )
    from sopkit.models.checks import refuse_code_models

    refuse_code_models(plan.models, refuse=no_code_models, preset=plan.preset)
    out_dir = Path(out) if out else default_out_dir(plan)
    # Stored with the plan: `sopkit report DIR` later shows the command that produced the trials.
    command = shlex.join(["sopkit", *sys.argv[1:]])
    from sopkit.training.distributed import torchrun_ranks

    ranks = torchrun_ranks()
    if ranks is not None:  # torchrun --nproc-per-node N -m sopkit compare: one trial, N processes
        from sopkit.experiment.ranks import compare_on_ranks

        command = f"{ranks.launcher()} {command}"
        record = plan_record(plan, command)
        compare_on_ranks(
            ranks, plan, out_dir, command, jobs=jobs, threads=threads, data_workers=data_workers,
            executor=executor, show=lambda work: _run_with_progress(work, out_dir, record),
            report=lambda: _report(out_dir, plan=record),
        )
        return
    record = plan_record(plan, command)
    _run_with_progress(
        lambda progress: run_plan(
            plan,
            out_dir,
            progress,
            jobs=jobs,
            threads=threads,
            command=command,
            data_workers=data_workers,
            executor=executor,
            ray_address=ray_address,
            gpus_per_trial=gpus_per_trial,
            checkpoint_every=every,
        ),
        out_dir,
        record,
    )
    _report(out_dir, plan=record)


def _run_with_progress(work: Callable[[Any], Any], out_dir: Path, plan: dict[str, Any]) -> None:
    """Run ``work(progress)`` with live progress; an interrupt keeps what finished and says where."""
    from sopkit.interrupts import interrupt_once
    from sopkit.training.progress import RichProgress, progress_for

    progress = progress_for(console)
    with interrupt_once():  # `uv run` delivers one Ctrl-C twice: the second copy is ignored
        try:
            if isinstance(progress, RichProgress):
                with progress:
                    work(progress)
            else:
                work(progress)
        except KeyboardInterrupt:
            error_console.print(
                f"Interrupted. Every finished trial is kept in {out_dir}; run the same command "
                f"again to resume, or `sopkit report {out_dir}` for what finished."
            )
            try:
                _report(out_dir, plan=plan, complete=False)
            except UserError as error:  # e.g. no trial had finished: nothing to report
                error_console.print(f"No report: {error}", highlight=False)
            raise typer.Exit(INTERRUPTED_EXIT) from None


def _report(
    out_dir: Path,
    *,
    plan: dict[str, Any] | None = None,
    complete: bool | None = None,
    report_dir: Path | None = None,
) -> None:
    """Write every report; a Ctrl-C while they are written leaves them all as they were (exit
    130), never some new and some old."""
    from sopkit.interrupts import interrupt_once
    from sopkit.report import regenerate

    try:
        with interrupt_once():
            paths = regenerate(
                out_dir, console=console, plan=plan, complete=complete, report_dir=report_dir
            )
    except KeyboardInterrupt:
        error_console.print(
            f"Interrupted while writing the reports: every report file in {report_dir or out_dir} "
            f"was left as it was. `sopkit report {out_dir}` writes them."
        )
        raise typer.Exit(INTERRUPTED_EXIT) from None
    console.print("Reports: " + ", ".join(str(p) for p in paths), highlight=False)


@app.command()
@reports_user_errors
def report(
    directory: Annotated[Path, typer.Argument(help="The --out directory of a comparison.")],
    out: Annotated[
        Path | None,
        typer.Option(
            help="Where to write the report files \\[default: DIRECTORY]. The database is only "
            "read: a read-only DIRECTORY reports elsewhere."
        ),
    ] = None,
) -> None:
    """Regenerate every report of a comparison from its results database alone."""
    _report(directory, report_dir=out)


@app.command("export")
@reports_user_errors
def export(
    directory: Annotated[Path, typer.Argument(help="The --out directory of a comparison.")],
    out: Annotated[
        Path | None, typer.Option(help="Where to write the files \\[default: DIRECTORY/export].")
    ] = None,
    strategy: Annotated[
        str | None, typer.Option(help="The strategy to ship \\[default: mk if run, else the first].")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="The seed to ship \\[default: the best on validation].")
    ] = None,
    model: Annotated[str | None, typer.Option(help="The model, if the comparison had several.")] = None,
    optimizer: Annotated[
        str | None, typer.Option(help="The optimizer, if the comparison had several.")
    ] = None,
) -> None:
    """Write the model to ship from a comparison (its chosen learning rate) as safetensors, ONNX
    and a torch.export program."""
    from sopkit.deploy.export import export_trained

    done = export_trained(
        directory, out=out, strategy=strategy, seed=seed, model=model, optimizer=optimizer
    )
    console.print(done.summary(), highlight=False, soft_wrap=True)


@app.command("strategies")
@reports_user_errors
def list_strategies() -> None:
    """List every registered strategy, where it comes from, and whether it loads."""
    from rich.markup import escape
    from rich.table import Table

    from sopkit.registry import discover

    table = Table(title="Strategies (entry-point group sopkit.strategies)")
    for column in ("name", "distribution", "target", "loads", "description"):
        table.add_column(column, overflow="fold")  # a load error is read in full, not cut at "…"
    for entry in discover().values():
        error = entry.load_error()
        description = "" if error else entry.describe()  # a broken one is shown, not raised
        # A plugin's text is shown as it is: "[/x]" in it is not rich markup (nor an error).
        status = "[green]yes[/]" if error is None else f"[red]no[/]: {escape(error)}"
        table.add_row(
            escape(entry.name), escape(f"{entry.distribution} {entry.version}"),
            escape(entry.target), status, escape(description),
        )
    console.print(table)


@app.command("datasets")
@reports_user_errors
def list_datasets() -> None:
    """List the data sets a comparison can use."""
    from rich.table import Table

    from sopkit.data import DATASETS

    table = Table(title="Data sets")
    for column in ("name", "needs --data-dir", "description"):
        table.add_column(column)
    for spec in DATASETS.values():
        table.add_row(spec.name, "yes" if spec.needs_data_dir else "no", spec.description)
    console.print(table)


@app.command("models")
@reports_user_errors
def list_models() -> None:
    """List the models a comparison can use (or pass package.module:factory)."""
    from rich.table import Table

    from sopkit.models import MODELS

    table = Table(title="Models (or hf:NAME_OR_PATH, a pretrained Hugging Face model, or package.module:factory)")
    table.add_column("name")
    table.add_column("description")
    for spec in MODELS.values():
        table.add_row(spec.name, spec.description)
    console.print(table)


@app.command("bench")
@reports_user_errors
def bench(
    model: Annotated[
        str, typer.Option(help=plain_help_of(BenchConfig, "model"))
    ] = default_of(BenchConfig, "model"),
    input_shape: Annotated[
        str, typer.Option(help=plain_help_of(BenchConfig, "input_shape"))
    ] = ",".join(map(str, default_of(BenchConfig, "input_shape"))),
    num_classes: Annotated[
        int, typer.Option(help=plain_help_of(BenchConfig, "num_classes"))
    ] = default_of(BenchConfig, "num_classes"),
    batch_size: Annotated[
        int, typer.Option(help=plain_help_of(TrainConfig, "batch_size"))
    ] = default_of(BenchConfig, "batch_size"),
    expansion: Annotated[
        int, typer.Option(help=plain_help_of(BenchConfig, "expansion"))
    ] = default_of(BenchConfig, "expansion"),
    strategies: Annotated[
        str | None, typer.Option(help=help_of(BenchConfig, "strategies"))
    ] = None,
    device: Annotated[
        str, typer.Option(help=plain_help_of(ComparePlan, "device"))
    ] = default_of(BenchConfig, "device"),
    threads: Annotated[int | None, typer.Option(help=help_of(BenchConfig, "threads"))] = None,
    bf16: Annotated[
        bool, typer.Option(help=plain_help_of(TrainConfig, "bf16"))
    ] = default_of(BenchConfig, "bf16"),
    compile_: Annotated[
        bool, typer.Option("--compile", help=plain_help_of(BenchConfig, "compile"))
    ] = default_of(BenchConfig, "compile"),
    repeats: Annotated[
        int, typer.Option(help=plain_help_of(BenchConfig, "repeats"))
    ] = default_of(BenchConfig, "repeats"),
    steps: Annotated[
        int, typer.Option(help=plain_help_of(BenchConfig, "steps"))
    ] = default_of(BenchConfig, "steps"),
    warmup: Annotated[
        int, typer.Option(help=plain_help_of(BenchConfig, "warmup"))
    ] = default_of(BenchConfig, "warmup"),
    optimizer: Annotated[
        str, typer.Option(help="adam or sgd (with momentum 0.9).")
    ] = default_of(BenchConfig, "optimizer"),
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Strategy option KEY=VALUE, repeatable (as for compare)."),
    ] = None,
    mk_sampler: Annotated[
        str, typer.Option(help=plain_help_of(BenchConfig, "mk_sampler"))
    ] = default_of(BenchConfig, "mk_sampler"),
    mk_backward: Annotated[
        str, typer.Option(help=plain_help_of(BenchConfig, "mk_backward"))
    ] = default_of(BenchConfig, "mk_backward"),
    out: Annotated[
        str | None,
        typer.Option(help="Directory for bench.json, bench.md and bench.png \\[default: none]."),
    ] = None,
) -> None:
    """Time each strategy's training step against the baseline's (synthetic data, one process)."""
    from sopkit.bench import (
        BenchConfig,
        parse_input_shape,
        print_report,
        run_bench,
        write_report,
    )
    from sopkit.training.distributed import torchrun_ranks

    if torchrun_ranks() is not None:  # N copies would time each other and write one --out
        raise UserError("sopkit bench measures one process; run it without torchrun.")

    config = BenchConfig(
        model=model,
        input_shape=parse_input_shape(input_shape),
        num_classes=num_classes,
        batch_size=batch_size,
        expansion=expansion,
        # Not given: every registered strategy. Given empty (--strategies=): a mistake.
        strategies=check_names("--strategies", _names(strategies)) if strategies is not None else (),
        device=device,
        threads=threads,
        bf16=bf16,
        compile=compile_,
        repeats=repeats,
        steps=steps,
        warmup=warmup,
        optimizer=optimizer,
        options=_parse_options(set_ or []),
        mk_sampler=mk_sampler,
        mk_backward=mk_backward,
    )
    if out is not None:  # before measuring: a bad --out must not cost the measurement
        from sopkit.bench.config import check_out_dir
        from sopkit.bench.report import BENCH_JSON, BENCH_MD, BENCH_PNG

        check_out_dir(out, (BENCH_JSON, BENCH_MD, BENCH_PNG))
    try:
        report = _bench_with_progress(config, run_bench)
    except KeyboardInterrupt:
        error_console.print("Interrupted before the first timing round finished: nothing measured.")
        raise typer.Exit(INTERRUPTED_EXIT) from None
    print_report(console, report)
    if out is not None:
        console.print(f"Results: {', '.join(map(str, write_report(report, out)))}")
    if report.rounds < config.repeats:  # interrupted: what was measured is out, but say so
        raise typer.Exit(INTERRUPTED_EXIT)


def _bench_with_progress(config: Any, run_bench: Callable[..., Any]) -> Any:
    """``run_bench(config)`` with what it sets up logged, and its timing rounds shown as a bar on a
    terminal (a line per round elsewhere)."""

    def log(message: str) -> None:
        error_console.print(message, style="dim")

    if not error_console.is_terminal:

        def line(done: int, total: int) -> None:
            if done:
                log(f"timed round {done}/{total}")

        return run_bench(config, log=log, on_round=line)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=error_console, transient=True) as progress:
        # Shown from the start of timing: setting up and warming up are logged above it.
        task = progress.add_task("timing rounds", total=config.repeats, start=False, visible=False)

        def on_round(done: int, total: int) -> None:
            progress.start_task(task)
            progress.update(task, completed=done, visible=True)

        return run_bench(config, log=log, on_round=on_round)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
