"""Human-readable comparison reports."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from sopkit.compare import StrategySummary


def format_params(count: int) -> str:
    """1234567 -> '1.23M'; exact counts stay in summary.json."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= limit:
            return f"{count / limit:.3g}{suffix}"
    return str(count)


def print_summary_table(
    console: Console, summaries: Sequence[StrategySummary], *, title: str = ""
) -> None:
    """The comparison as a rich table: one row per strategy."""
    from rich.table import Table

    table = Table(title=f"Comparison: {title}" if title else "Comparison")
    table.add_column("strategy", style="bold")
    table.add_column("test accuracy", justify="right")
    table.add_column("seeds", justify="right")
    table.add_column("train params", justify="right")
    table.add_column("inference params", justify="right")
    table.add_column("median step", justify="right")
    table.add_column("step / baseline", justify="right")
    table.add_column("wall time", justify="right")
    for s in summaries:
        accuracy = f"{s.test_accuracy_mean:.2%} ± {s.test_accuracy_std:.2%}"
        if s.diverged_seeds:
            accuracy += f" [red](diverged: seeds {', '.join(map(str, s.diverged_seeds))})[/]"
        step = "n/a" if math.isnan(s.median_step_time) else f"{s.median_step_time * 1e3:.2f} ms"
        ratio = "n/a" if s.step_time_ratio is None else f"{s.step_time_ratio:.2f}x"
        table.add_row(
            s.strategy,
            accuracy,
            str(len(s.seeds)),
            format_params(s.train_params),
            format_params(s.inference_params),
            step,
            ratio,
            f"{s.wall_time:.1f} s",
        )
    console.print(table)
    if not any(s.strategy == "baseline" for s in summaries):
        console.print("[dim]No baseline in this comparison: step-time ratios are not available.[/]")
