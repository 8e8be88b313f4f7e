"""The ``sopkit`` command line: a thin Typer layer over the library.

Nothing here imports torch at module level, so ``sopkit --help`` answers at once; commands import
what they need when they run. A ``UserError`` becomes a one-paragraph message and exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import datetime
from functools import wraps
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
console = Console()
error_console = Console(stderr=True)

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
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE (e.g. mk.init=replicate), got {pair!r}.")
        options[key.strip()] = value.strip()
    return options


def _split_names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


@app.command()
@reports_user_errors
def compare(
    dataset: Annotated[str, typer.Option(help="Data set name (see `sopkit datasets`).")] = "mnist1d",
    model: Annotated[
        str, typer.Option(help="Model name (see `sopkit models`) or package.module:factory.")
    ] = "mlp-a2",
    strategies: Annotated[
        str, typer.Option(help="Comma-separated strategies (see `sopkit strategies`).")
    ] = "baseline,mk",
    seeds: Annotated[int, typer.Option(help="Number of seeds per strategy.")] = 3,
    first_seed: Annotated[int, typer.Option(help="The first seed; seeds are consecutive.")] = 0,
    epochs: Annotated[int, typer.Option(help="Training epochs (of the baseline).")] = 20,
    batch_size: Annotated[int, typer.Option(help="Training batch size.")] = 256,
    optimizer: Annotated[str, typer.Option(help="adam or sgd (with momentum 0.9).")] = "adam",
    lr: Annotated[
        float | None, typer.Option(help="Learning rate [default: 1e-3 for adam, 0.025 for sgd].")
    ] = None,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = 0.0,
    schedule: Annotated[str, typer.Option(help="constant, step or cosine.")] = "constant",
    expansion: Annotated[int, typer.Option(help="Expansion factor e (copies per weight).")] = 3,
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
    out: Annotated[
        str | None, typer.Option(help="Output directory [default: runs/DATASET-MODEL-TIME].")
    ] = None,
) -> None:
    """Train strategies side by side and print an honest comparison table."""
    from sopkit.compare import CompareConfig, run_comparison
    from sopkit.progress import RichProgress, progress_for
    from sopkit.report import print_summary_table
    from sopkit.train import TrainConfig

    names = _split_names(strategies)
    train_config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        schedule=schedule,
        bf16=bf16,
    )
    out_dir = out or f"runs/{dataset}-{model.replace(':', '_')}-{datetime.now():%Y%m%d-%H%M%S}"
    config = CompareConfig(
        dataset=dataset,
        model=model,
        strategies=names,
        seeds=seeds,
        first_seed=first_seed,
        expansion=expansion,
        device=device,
        data_dir=data_dir,
        download=download,
        options=_parse_options(set_ or []),
        out_dir=out_dir,
    )
    progress = progress_for(console, total_runs=len(names) * seeds)
    try:
        if isinstance(progress, RichProgress):
            with progress:
                summaries, path = run_comparison(config, train_config, progress)
        else:
            summaries, path = run_comparison(config, train_config, progress)
    except KeyboardInterrupt:
        error_console.print(
            f"Interrupted. Every finished run is in {out_dir}/runs.jsonl and summarised in "
            f"{out_dir}/summary.json."
        )
        raise typer.Exit(INTERRUPTED_EXIT) from None
    print_summary_table(console, summaries, title=f"{dataset} / {model}")
    console.print(f"Results: {path}")


@app.command("strategies")
@reports_user_errors
def list_strategies() -> None:
    """List every registered strategy, where it comes from, and whether it loads."""
    from rich.table import Table

    from sopkit.registry import discover

    table = Table(title="Strategies (entry-point group sopkit.strategies)")
    for column in ("name", "distribution", "target", "loads", "description"):
        table.add_column(column)
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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
