"""The ``sopkit`` command line: a thin Typer layer over the library.

Nothing here imports torch at module level, so ``sopkit --help`` answers at once; commands import
what they need when they run. A ``UserError`` becomes a one-paragraph message and exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from sopkit.errors import UserError

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
            error_console.print(f"[bold red]Error:[/] {error}", highlight=False, soft_wrap=True)
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
    dataset: Annotated[
        str | None, typer.Option(help="Data set (see `sopkit datasets`). [default: mnist1d]")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Model(s), comma-separated (see `sopkit models`), or package.module:factory. "
            "[default: mlp-a2]"
        ),
    ] = None,
    strategies: Annotated[
        str | None,
        typer.Option(help="Comma-separated strategies (see `sopkit strategies`). [default: baseline,mk]"),
    ] = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds per trial. [default: 3]")] = None,
    first_seed: Annotated[int, typer.Option(help="The first seed; seeds are consecutive.")] = 0,
    epochs: Annotated[
        int | None,
        typer.Option(help="Training epochs of the baseline. [default: per data set, 200 for mnist1d]"),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Training batch size. [default: 256]")] = None,
    optimizer: Annotated[
        str | None,
        typer.Option(help="adam and/or sgd (momentum 0.9), comma-separated. [default: adam]"),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="Learning rate without a grid. [default: 1e-3 for adam, 0.025 for sgd]"),
    ] = None,
    lr_grid: Annotated[
        str | None,
        typer.Option(
            help="Tune the rate per strategy on validation: 'paper' (base*1.5^i, i in -4..5), "
            "'paper:-2..2', or rates '0.01,0.003'."
        ),
    ] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay. [default: 0]")] = None,
    schedule: Annotated[
        str | None, typer.Option(help="constant, step or cosine. [default: constant]")
    ] = None,
    expansion: Annotated[
        int | None, typer.Option(help="Expansion factor e (copies per weight). [default: 3]")
    ] = None,
    device: Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda...")] = "auto",
    bf16: Annotated[bool, typer.Option(help="bf16 autocast (CUDA only).")] = False,
    data_dir: Annotated[
        str | None, typer.Option(help="Directory holding torchvision data sets (cifar10, mnist...).")
    ] = None,
    download: Annotated[
        bool, typer.Option(help="Download torchvision data sets into --data-dir if missing.")
    ] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Strategy option KEY=VALUE, repeatable; STRATEGY.KEY=VALUE scopes it "
            "(e.g. --set mk.init=replicate).",
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(help="A shipped preset (e.g. paper-table1) or a TOML file; options override it."),
    ] = None,
    jobs: Annotated[int, typer.Option(help="Worker processes running trials in parallel.")] = 1,
    threads: Annotated[
        int,
        typer.Option(
            help="torch CPU threads per trial; the same with any --jobs, so results do not depend "
            "on it. Raise it for big models on the CPU."
        ),
    ] = 1,
    out: Annotated[
        str | None,
        typer.Option(
            help="Output directory; rerunning into it resumes. [default: runs/PRESET or "
            "runs/DATASET-MODEL]"
        ),
    ] = None,
) -> None:
    """Train strategies side by side and report them honestly (resumes into an existing --out)."""
    from sopkit.compare import build_plan, default_out_dir, plan_record, run_plan

    plan = build_plan(
        preset=preset,
        dataset=dataset,
        models=_names(model) if model else None,
        strategies=_names(strategies) if strategies else None,
        optimizers=_names(optimizer) if optimizer else None,
        seeds=seeds,
        first_seed=first_seed,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        lr_grid=lr_grid,
        weight_decay=weight_decay,
        schedule=schedule,
        expansion=expansion,
        bf16=bf16,
        options=_parse_options(set_ or []),
        device=device,
        data_dir=data_dir,
        download=download,
    )
    out_dir = Path(out) if out else default_out_dir(plan)
    record = plan_record(plan)
    _run_with_progress(
        lambda progress: run_plan(plan, out_dir, progress, jobs=jobs, threads=threads),
        out_dir,
        record,
    )
    _report(out_dir, plan=record)


def _run_with_progress(work: Callable[[Any], Any], out_dir: Path, plan: dict[str, Any]) -> None:
    """Run ``work(progress)`` with live progress; an interrupt keeps what finished and says where."""
    from sopkit.progress import RichProgress, progress_for

    progress = progress_for(console)
    try:
        if isinstance(progress, RichProgress):
            with progress:
                work(progress)
        else:
            work(progress)
    except KeyboardInterrupt:
        error_console.print(
            f"Interrupted. Every finished trial is kept in {out_dir}; run the same command again "
            f"to resume, or `sopkit report {out_dir}` for what finished."
        )
        try:
            _report(out_dir, plan=plan, complete=False)
        finally:
            raise typer.Exit(INTERRUPTED_EXIT) from None


def _report(
    out_dir: Path, *, plan: dict[str, Any] | None = None, complete: bool | None = None
) -> None:
    from sopkit.reporting import regenerate

    paths = regenerate(out_dir, console=console, plan=plan, complete=complete,
                       command=" ".join(["sopkit", *sys.argv[1:]]))
    console.print("Reports: " + ", ".join(str(p) for p in paths), highlight=False)


@app.command()
@reports_user_errors
def report(
    directory: Annotated[Path, typer.Argument(help="The --out directory of a comparison.")],
) -> None:
    """Regenerate every report of a comparison from its results database alone."""
    _report(directory)


@app.command("strategies")
@reports_user_errors
def list_strategies() -> None:
    """List every registered strategy, where it comes from, and whether it loads."""
    from rich.table import Table

    from sopkit.registry import discover

    table = Table(title="Strategies (entry-point group sopkit.strategies)")
    for column in ("name", "distribution", "target", "loads", "description"):
        table.add_column(column, overflow="fold")  # a load error is read in full, not cut at "…"
    for entry in discover().values():
        error = entry.load_error()
        description = "" if error else entry.load().description
        status = "[green]yes[/]" if error is None else f"[red]no[/]: {error}"
        table.add_row(
            entry.name, f"{entry.distribution} {entry.version}", entry.target, status, description
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

    table = Table(title="Models (or package.module:factory)")
    table.add_column("name")
    table.add_column("description")
    for spec in MODELS.values():
        table.add_row(spec.name, spec.description)
    console.print(table)


@app.command("bench")
@reports_user_errors
def bench(
    model: Annotated[
        str, typer.Option(help="Model name (see `sopkit models`) or package.module:factory.")
    ] = "mlp-a3",
    input_shape: Annotated[
        str, typer.Option(help="Per-example input shape, e.g. 3072 (flat CIFAR) or 3,32,32.")
    ] = "3072",
    num_classes: Annotated[int, typer.Option(help="Number of classes.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Training batch size.")] = 256,
    expansion: Annotated[int, typer.Option(help="Expansion factor e (copies per weight).")] = 3,
    strategies: Annotated[
        str | None,
        typer.Option(help="Comma-separated strategies [default: every registered strategy]."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda...")] = "auto",
    threads: Annotated[
        int | None, typer.Option(help="torch.set_num_threads [default: torch's default].")
    ] = None,
    bf16: Annotated[bool, typer.Option(help="bf16 autocast (CUDA only).")] = False,
    repeats: Annotated[int, typer.Option(help="Interleaved timing rounds.")] = 10,
    steps: Annotated[int, typer.Option(help="Timed steps per strategy per round.")] = 10,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up steps per strategy.")] = 5,
    optimizer: Annotated[str, typer.Option(help="adam or sgd (with momentum 0.9).")] = "adam",
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Strategy option KEY=VALUE, repeatable (as for compare)."),
    ] = None,
    mk_sampler: Annotated[
        str, typer.Option(help="How majority kernels draw p: auto, compiled, sfc64, torch, triton.")
    ] = "auto",
    mk_backward: Annotated[
        str, typer.Option(help="What MK's backward keeps: auto, save (p), regenerate (a seed).")
    ] = "auto",
    out: Annotated[
        str | None,
        typer.Option(help="Directory for bench.json, bench.md and bench.png [default: none]."),
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

    config = BenchConfig(
        model=model,
        input_shape=parse_input_shape(input_shape),
        num_classes=num_classes,
        batch_size=batch_size,
        expansion=expansion,
        strategies=_names(strategies or ""),
        device=device,
        threads=threads,
        bf16=bf16,
        repeats=repeats,
        steps=steps,
        warmup=warmup,
        optimizer=optimizer,
        options=_parse_options(set_ or []),
        mk_sampler=mk_sampler,
        mk_backward=mk_backward,
    )
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
