"""``report.html``: one offline file, the Markdown report's tables plus the figures as inline
SVG."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sopkit.files import write_atomic
from sopkit.report.figures import FigureSpec, draw_figures
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

_CSS = """
:root { --fg: #1f2328; --muted: #656d76; --line: #d0d7de; --bg-alt: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; line-height: 1.5;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 24px 64px; }
h1 { font-size: 1.8em; margin: 0 0 4px; }
h2 { font-size: 1.35em; margin: 36px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 1.05em; margin: 22px 0 8px; }
.subtitle { color: var(--muted); margin: 0 0 16px; }
nav { font-size: 0.92em; color: var(--muted); margin-bottom: 8px; }
nav a { color: #0969da; text-decoration: none; margin-right: 14px; }
.banner { border-radius: 6px; padding: 12px 16px; margin: 16px 0; }
.banner.warning { background: #fff8c5; border: 1px solid #d4a72c; }
.banner.note { background: #ddf4ff; border: 1px solid #54aeff; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.88em; margin: 4px 0 6px; }
th, td { padding: 4px 9px; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { background: var(--bg-alt); font-weight: 600; border-bottom: 2px solid var(--line);
     white-space: normal; vertical-align: bottom; }
tbody tr:nth-child(even) td { background: #fbfbfc; }
td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; }
td.l, th.l { text-align: left; }
.s-good { color: #1a7f37; font-weight: 600; }
.s-bad { color: #cf222e; font-weight: 600; }
.s-diverged { color: #cf222e; }
.s-muted { color: var(--muted); }
.s-strong { font-weight: 600; }
.s-warn { color: #9a6700; }
.dot { display: inline-block; width: 10px; height: 10px; border-radius: 50%; margin-right: 6px;
       vertical-align: baseline; }
.notes { color: var(--muted); font-size: 0.88em; margin: 2px 0 14px; }
figure { margin: 20px 0 28px; }
figure svg { width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 0.9em; margin-top: 6px; max-width: 900px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 4px 18px; font-size: 0.92em; }
dl.meta dt { color: var(--muted); }
dl.meta dd { margin: 0; word-break: break-word; }
pre { background: var(--bg-alt); padding: 10px 12px; border-radius: 6px; overflow-x: auto;
      font-size: 0.88em; }
"""


def html_table(table: Table, heading: str | None = "h3") -> str:
    """The table as HTML; ``heading`` None leaves its title out."""
    esc = html.escape
    out = [f"<{heading}>{esc(table.title)}</{heading}>"] if heading else []
    out.append('<div class="table-wrap"><table>')
    out.append(
        "<thead><tr>"
        + "".join(f'<th class="{align[0]}">{esc(name)}</th>' for name, align in table.columns)
        + "</tr></thead><tbody>"
    )
    for row in table.rows:
        cells = []
        for cell, (_, align) in zip(row, table.columns, strict=True):
            classes = align[0] + (f" s-{cell.style}" if cell.style else "")
            title = f' title="{esc(cell.hint)}"' if cell.hint else ""
            dot = (
                f'<span class="dot" style="background:{esc(cell.swatch)}"></span>'
                if cell.swatch
                else ""
            )
            cells.append(f'<td class="{classes}"{title}>{dot}{esc(cell.text)}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    out.extend(f'<p class="notes">{esc(note)}</p>' for note in table.notes)
    return "\n".join(out)


def render_html(groups: Sequence[Group], meta: ReportMeta, figures: Sequence[FigureSpec]) -> str:
    """report.html's text: the Markdown report's tables plus the figures as inline SVG."""
    esc = html.escape
    provenance = meta.provenance
    subtitle = [f"written {meta.created}"]
    if meta.preset:
        subtitle.append(f"preset {meta.preset}")
    revisions = meta.provenance_spread.get("git_revision")
    if revisions:
        subtitle.append(f"git: {len(revisions)} revisions")
    elif provenance.get("git_revision"):
        subtitle.append(f"git {str(provenance['git_revision'])[:12]}")
    body = [f"<h1>{esc(meta.title)}</h1>", f'<p class="subtitle">{esc(" · ".join(subtitle))}</p>']
    body.append(
        '<nav><a href="#accuracy">Accuracy</a><a href="#strategies">Strategies</a><a href="#differences">Differences</a>'
        '<a href="#figures">Figures</a><a href="#details">Details</a>'
        '<a href="#diverged">Diverged</a><a href="#failed">Failed</a>'
        '<a href="#provenance">How this was produced</a></nav>'
    )
    if not meta.complete:
        body.append(
            f'<div class="banner warning"><strong>⚠ {esc(INCOMPLETE_WARNING)}</strong></div>'
        )
    missing = coverage_warnings(groups)
    if missing:
        body.append(
            '<div class="banner note">Some strategies lack trials that others in their group have:'
            "<ul>" + "".join(f"<li>{esc(w)}</li>" for w in missing) + "</ul></div>"
        )
    body.append('<h2 id="accuracy">Test accuracy (paper Table 1 layout)</h2>')
    body += [html_table(t) for t in paper_tables(groups)]
    body.append('<h2 id="strategies">Strategies</h2>')
    body.append(html_table(strategies_table(groups), None))
    body.append('<h2 id="differences">Differences against baseline</h2>')
    body.append(html_table(paired_table(groups), None))
    against_mk = mk_against_table(groups)
    if against_mk.rows:
        body.append('<h2 id="against-mk">Majority kernels against each strategy</h2>')
        body.append(html_table(against_mk, None))
    body.append('<h2 id="figures">Figures</h2>')
    if not figures:
        body.append(
            '<p class="s-warn">The figures could not be drawn (see the terminal output).</p>'
        )
    for index, spec in enumerate(figures):
        body.append(
            f"<figure>{inline_svg(spec.svg, f'f{index}')}"
            f"<figcaption>{esc(spec.caption)}</figcaption></figure>"
        )
    body.append('<h2 id="details">Cost and details per group</h2>')
    for group in groups:
        body.append(html_table(group_table(group)))
        body.append(html_table(lr_sweep_table(group), heading="h4"))
    body.append('<h2 id="diverged">Diverged trials</h2>')
    diverged = diverged_table(groups)
    body.append(html_table(diverged, None) if diverged.rows else "<p>No trial diverged.</p>")
    body.append('<h2 id="failed">Failed trials</h2>')
    failed = failed_table(groups)
    body.append(html_table(failed, None) if failed.rows else "<p>No trial failed.</p>")
    body.append('<h2 id="provenance">How this was produced</h2>')
    if meta.command:
        body.append(f"<pre>{esc(meta.command)}</pre>")
    body.append(
        '<dl class="meta">'
        + "".join(
            f"<dt>{esc(label)}</dt><dd>{esc(value)}</dd>"
            for label, value in provenance_items(meta)
        )
        + "</dl>"
    )
    body.append(html_table(setup_table(groups)))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(meta.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )


def inline_svg(svg: str, prefix: str) -> str:
    """matplotlib's SVG made fit to inline in HTML: no XML prolog, DTD, metadata or namespace URLs
    (the HTML parser knows SVG), and ids prefixed so that several figures cannot clash."""
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
    svg = svg.replace("xlink:href=", "href=")
    ids = set(re.findall(r'\bid="([^"]+)"', svg))

    def prefixed(match: re.Match[str]) -> str:
        before, name, after = match.groups()
        return f"{before}{prefix}-{name}{after}" if name in ids else match.group(0)

    svg = re.sub(r'(\bid=")([^"]+)(")', prefixed, svg)
    svg = re.sub(r'(href="#)([^"]+)(")', prefixed, svg)
    svg = re.sub(r"(url\(#)([^)]+)(\))", prefixed, svg)

    # Fixed point sizes would overflow narrow windows: CSS scales the figure to the page instead,
    # up to a quarter above its natural size (a lone panel stretched to 1200 px looks bloated).
    def fluid(match: re.Match[str]) -> str:
        natural_px = float(match.group(2)) * 4 / 3  # matplotlib sizes SVGs in points
        return f'<svg{match.group(1)} style="max-width: {natural_px * 1.25:.0f}px"'

    return re.sub(r'<svg([^>]*?)\swidth="([\d.]+)pt"\s+height="[^"]*"', fluid, svg, count=1)


def write_html(
    path: Path,
    groups: Sequence[Group],
    meta: ReportMeta,
    figures: Sequence[FigureSpec] | None = None,
) -> Path:
    """Write report.html: one offline file, figures inline (drawn here unless given)."""
    if figures is None:
        figures = draw_figures(groups)
    return write_atomic(Path(path), render_html(groups, meta, figures))
