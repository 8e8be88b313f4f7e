"""Tables and reports in GitHub-flavoured Markdown: ``report.md``, and any
:class:`~sopkit.report.tables.Table` (``bench.md`` renders its own through
:func:`markdown_table`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sopkit.files import write_atomic
from sopkit.report.meta import provenance_items
from sopkit.report.tables import (
    INCOMPLETE_WARNING,
    Table,
    coverage_warnings,
    diverged_table,
    group_table,
    lr_sweep_table,
    paired_table,
    paper_tables,
    setup_table,
)

if TYPE_CHECKING:
    from sopkit.experiment.results import Group
    from sopkit.report.meta import ReportMeta


def md_escape(text: str) -> str:
    """Table cells: a '|' would end the cell and '*' or '_' would start emphasis."""
    for char in "\\`*_|":
        text = text.replace(char, "\\" + char)
    return text.replace("<", "&lt;").replace(">", "&gt;")


def markdown_table(table: Table, heading: str | None = "###") -> str:
    """The table in GitHub-flavoured Markdown; ``heading`` None leaves its title out."""
    lines = [f"{heading} {md_escape(table.title)}", ""] if heading else []
    lines.append("| " + " | ".join(md_escape(name) for name, _ in table.columns) + " |")
    lines.append(
        "|" + "|".join("---:" if align == "right" else ":---" for _, align in table.columns) + "|"
    )
    for row in table.rows:
        cells = []
        for cell in row:
            text = md_escape(cell.text)
            if cell.style in ("good", "bad", "strong") and text:
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(f"{md_escape(note)}\n" for note in table.notes)
    return "\n".join(lines)


def fence(text: str) -> str:
    """A code block that survives backticks inside the text."""
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}\n{text}\n{ticks}"


def render_markdown(
    groups: Sequence[Group], meta: ReportMeta, figures: Sequence[tuple[str, str]] = ()
) -> str:
    """report.md's text; ``figures`` are (relative PNG path, alt text) pairs to embed."""
    parts = [f"# {md_escape(meta.title)}", ""]
    if not meta.complete:
        parts += ["> [!WARNING]", f"> **{md_escape(INCOMPLETE_WARNING)}**", ""]
    missing = coverage_warnings(groups)
    if missing:
        parts += ["> [!NOTE]", "> Some strategies lack trials that others in their group have:"]
        parts += [f"> - {md_escape(w)}" for w in missing]
        parts.append("")
    parts += [
        "Each strategy's learning rate is chosen on validation accuracy (a rate at which any seed "
        "diverged is never chosen); test accuracy at that rate is reported over seeds, following "
        "the paper's Section 5.1 protocol.",
        "",
        "## Test accuracy (paper Table 1 layout)",
        "",
    ]
    parts += [markdown_table(t) for t in paper_tables(groups)]
    parts += ["## Differences against baseline", "", markdown_table(paired_table(groups), None)]
    if figures:
        parts += ["## Figures", ""]
        parts += [f"![{md_escape(alt)}]({path})\n" for path, alt in figures]
    parts += ["## Cost and details per group", ""]
    for group in groups:
        parts.append(markdown_table(group_table(group)))
        parts.append(markdown_table(lr_sweep_table(group), heading="####"))
    diverged = diverged_table(groups)
    parts += ["## Diverged trials", ""]
    parts.append(markdown_table(diverged, None) if diverged.rows else "No trial diverged.\n")
    parts += ["## How this was produced", ""]
    if meta.command:
        parts += [fence(meta.command), ""]
    parts += [f"- **{label}:** {md_escape(value)}" for label, value in provenance_items(meta)]
    parts += ["", markdown_table(setup_table(groups))]
    return "\n".join(parts).rstrip() + "\n"


def write_markdown(
    path: Path,
    groups: Sequence[Group],
    meta: ReportMeta,
    figures: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write report.md; ``figures`` are (PNG path relative to the report, alt text) to embed."""
    return write_atomic(Path(path), render_markdown(groups, meta, figures))
