"""Tables and reports in GitHub-flavoured Markdown: ``report.md``, and any
:class:`~sopkit.report.tables.Table` (``bench.md`` renders its own through
:func:`markdown_table`)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sopkit.deploy.layout import MODELS_DIR, saved_keys
from sopkit.files import write_atomic
from sopkit.report.meta import provenance_items
from sopkit.report.tables import (
    INCOMPLETE_WARNING,
    Table,
    coverage_warnings,
    diverged_table,
    failed_table,
    group_table,
    lr_sweep_table,
    mk_against_table,
    paired_table,
    paper_tables,
    setup_table,
    strategies_table,
)

if TYPE_CHECKING:
    from sopkit.experiment.results import Group
    from sopkit.report.meta import ReportMeta


# Characters that start Markdown syntax anywhere in a line: emphasis, code, a table cell's end,
# strikethrough, math. Each is written backslash-escaped.
_INLINE_SYNTAX = frozenset("\\`*_|~$")
# A link or an image needs "](" or "][" (a reference definition "[x]: url" starts a line: md_line):
# that ']' escaped, "[x](http://evil)" and "![i](http://evil/a.png)" stay text, and a plain "[100]"
# stays readable in the file.
_LINK_CLOSE = re.compile(r"\](?=[(\[:])")
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
# Bare URLs and e-mail addresses GitHub would turn into links ("http://", "www.", "a@b"): their
# ':', '.' or '@' escaped, they stay text.
_AUTOLINK = re.compile(r"(?i)(?<=[a-z0-9])://|\bwww\.|@")
_AUTOLINK_ESCAPED = {
    "/": lambda found: "\\" + found,  # "\\://"
    ".": lambda found: found[:-1] + "\\.",  # "www\\."
    "@": lambda found: "\\@",
}
# What makes a line a heading, quote, list item, rule or setext underline where a line starts.
_LINE_START = re.compile(r"^(\d*)([#>+\-=.)\[])")


def md_escape(text: object) -> str:
    """Any text (user-provided names, notes, options, error messages) as Markdown that shows it
    literally: it cannot become a link, an image, emphasis, HTML, or end a table cell or a line."""
    flat = " ".join(str(text).splitlines())  # a newline would end the table row or the item
    out = "".join(
        "\\" + char if char in _INLINE_SYNTAX else _HTML.get(char, char) for char in flat
    )
    out = _LINK_CLOSE.sub(r"\\]", out)
    return _AUTOLINK.sub(lambda match: _AUTOLINK_ESCAPED[match.group(0)[-1]](match.group(0)), out)


def md_line(text: object) -> str:
    """``md_escape`` for text that starts a line of its own (a note under a table)."""
    escaped = md_escape(text).lstrip()
    match = _LINE_START.match(escaped)
    if match is None or (match.group(1) and match.group(2) not in ".)"):
        return escaped
    return f"{match.group(1)}\\{escaped[match.end(1):]}"  # "\\# x", "1\\. x"


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
    lines.extend(f"{md_line(note)}\n" for note in table.notes)
    return "\n".join(lines)


def fence(text: str) -> str:
    """A code block that survives backticks inside the text."""
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}\n{text}\n{ticks}"


def render_markdown(
    groups: Sequence[Group],
    meta: ReportMeta,
    figures: Sequence[tuple[str, str]] = (),
    *,
    models: tuple[str, int] | None = None,
) -> str:
    """report.md's text; ``figures`` are (relative PNG path, alt text) pairs to embed; ``models``
    (the output directory, the number of models saved there) adds where the trained models are."""
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
    parts += ["## Strategies", "", markdown_table(strategies_table(groups), None)]
    parts += ["## Differences against baseline", "", markdown_table(paired_table(groups), None)]
    against_mk = mk_against_table(groups)
    if against_mk.rows:
        parts += ["## Majority kernels against each strategy", "", markdown_table(against_mk, None)]
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
    failed = failed_table(groups)
    parts += ["## Failed trials", ""]
    parts.append(markdown_table(failed, None) if failed.rows else "No trial failed.\n")
    if models is not None:
        parts += models_section(groups, *models)
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
    models = (str(Path(path).parent), len(saved_keys(Path(path).parent)))
    return write_atomic(Path(path), render_markdown(groups, meta, figures, models=models))


def models_section(groups: Sequence[Group], directory: str, saved: int) -> list[str]:
    """Where the trials' models are and how to export the one to ship (``sopkit.deploy``)."""
    if not saved:
        return [f"## Trained models ({MODELS_DIR}/)", "", "No trained model was saved: the "
                "comparison ran with `--no-save-models` (or with a sopkit that did not save them).",
                ""]
    several = len({(group.model, group.optimizer) for group in groups}) > 1
    return [
        f"## Trained models ({MODELS_DIR}/)",
        "",
        f"{saved} trial{'s' if saved != 1 else ''} kept a deployable model beside this report: "
        f"`{MODELS_DIR}/KEY.safetensors` (the weights) and `{MODELS_DIR}/KEY.json` (what rebuilds "
        "the architecture), `KEY` being the trial's `key` in `trials.jsonl`; "
        "`sopkit.load_trained(DIRECTORY, KEY)` loads one. The model to ship, a strategy's at its "
        "chosen learning rate and best validation seed, as safetensors, ONNX and a `torch.export` "
        "program (`--strategy` and `--seed` choose another"
        + ("; `--model` and `--optimizer` choose the group" if several else "")
        + "):",
        "",
        fence(shlex.join(["sopkit", "export", directory])),
        "",
    ]
