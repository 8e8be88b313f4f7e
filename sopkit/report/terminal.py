"""Tables and reports in the terminal (rich): a comparison's per-group tables, and any
:class:`~sopkit.report.tables.Table` (``sopkit bench`` prints its own through
:func:`rich_table`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sopkit.report.format import format_lr, seed_list
from sopkit.report.tables import (
    INCOMPLETE_WARNING,
    Table,
    coverage_warnings,
    diverged_text,
    failed_text,
    group_table,
)

if TYPE_CHECKING:
    from rich.console import Console

    from sopkit.experiment.results import Group, StrategyResult
    from sopkit.report.meta import ReportMeta

RICH_STYLES = {
    "good": "bold green",
    "bad": "bold red",
    "diverged": "red",
    "muted": "dim",
    "strong": "bold",
    "warn": "yellow",
}


def rich_table(table: Table) -> Any:
    """The table for a rich console (no vertical rules, to leave the values the width)."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table as RichTable

    shown = RichTable(
        title=table.title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD
    )
    for index, (name, align) in enumerate(table.columns):
        width = max(
            (len(row[index].text) + (2 if row[index].swatch else 0) for row in table.rows),
            default=0,
        )
        shown.add_column(
            name,
            justify="right" if align == "right" else "left",
            min_width=None if name in table.wraps else width,
        )
    for row in table.rows:
        texts = []
        for cell in row:
            text = escape(cell.text)
            if cell.style:
                text = f"[{RICH_STYLES[cell.style]}]{text}[/]"
            if cell.swatch:
                text = f"[{cell.swatch}]●[/] {text}"
            texts.append(text)
        shown.add_row(*texts)
    return shown


def _diverged_lines(result: StrategyResult, limit: int = 4) -> list[str]:
    """Each diverged trial on a line, or past ``limit`` one line per rate (a full grid can have
    dozens; report.md lists them all)."""
    if len(result.diverged) <= limit:
        return [diverged_text(d) for d in result.diverged]
    by_lr: dict[float, list[Mapping[str, Any]]] = {}
    for d in result.diverged:
        by_lr.setdefault(d.get("lr") or 0.0, []).append(d)
    lines = []
    for lr, trials in sorted(by_lr.items()):
        steps = sorted(d.get("step") or 0 for d in trials)
        where = f"step {steps[0]}" if len(set(steps)) == 1 else f"steps {steps[0]}–{steps[-1]}"
        seeds = seed_list(d.get("seed") or 0 for d in trials)
        lines.append(f"diverged at lr={format_lr(lr)}: seeds {seeds}, at {where}")
    return lines


def _failed_lines(result: StrategyResult, limit: int = 4) -> list[str]:
    """Each failed trial on a line with its error, or past ``limit`` one line per error (a broken
    plugin fails every trial of its strategy the same way; report.md lists them all)."""
    if len(result.failed) <= limit:
        return [failed_text(f) for f in result.failed]
    by_error: dict[str, list[Mapping[str, Any]]] = {}
    for f in result.failed:
        by_error.setdefault(str(f.get("error") or "no error recorded"), []).append(f)
    return [
        f"{len(trials)} trials failed (seeds {seed_list(f.get('seed') or 0 for f in trials)}): "
        f"{error}"
        for error, trials in by_error.items()
    ]


def print_report(console: Console, groups: Sequence[Group], meta: ReportMeta) -> None:
    """The comparison in the terminal: one table per group, every diverged and failed trial, and
    warnings."""
    from rich.markup import escape

    if not meta.complete:
        console.print(f"[bold yellow]⚠ {escape(INCOMPLETE_WARNING)}[/]")
    for group in groups:
        table = group_table(group)
        console.print(rich_table(table))
        for note in table.notes:
            console.print(f"[dim]{escape(note)}[/]")
        for result in group.strategies:
            for line in _diverged_lines(result) + _failed_lines(result):
                console.print(f"  [red]{escape(result.strategy)}: {escape(line)}[/]")
    if any(r.paired is not None and r.paired.significant for g in groups for r in g.strategies):
        console.print("[dim]* the 95% interval of the paired difference excludes 0.[/]")
    for warning in coverage_warnings(groups):
        console.print(f"[yellow]Missing trials: {escape(warning)}[/]")
    if any(r.failed for g in groups for r in g.strategies):
        console.print(
            "[dim]Failed trials have no numbers; run the same command again to retry them "
            "(tracebacks: trials.jsonl).[/]"
        )
    if meta.grid_note:
        console.print(f"[dim]{escape(meta.grid_note)}[/]")
    for text in meta.extensions:
        console.print(f"[dim]Grid extended: {escape(text)}[/]")
