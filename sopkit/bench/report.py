"""``sopkit bench``'s output: its two tables (built as :class:`sopkit.report.tables.Table` and
rendered by the comparison reports' terminal and Markdown renderers), ``bench.md``, the
``bench.png`` figure and ``bench.json``."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

from sopkit.bench.config import command_line
from sopkit.bench.results import BASELINE, BenchReport, EntryResult
from sopkit.files import write_atomic
from sopkit.report.figures import FIGURE_STYLE
from sopkit.report.markdown import markdown_table, md_escape
from sopkit.report.tables import Cell, Table
from sopkit.report.terminal import rich_table

if TYPE_CHECKING:
    from rich.console import Console

BENCH_JSON = "bench.json"
BENCH_MD = "bench.md"
BENCH_PNG = "bench.png"


def _mib(value: int | None) -> str:
    return "" if value is None else f"{value / 2**20:.1f}"


def _ratio_text(entry: EntryResult) -> str:
    if not entry.ratios:
        return ""
    low, high = entry.ratio_iqr
    return f"{entry.ratio:.2f}x [{low:.2f}-{high:.2f}]"


def tables(report: BenchReport) -> list[Table]:
    """The step-time ratio table and the loop-overhead table."""
    config = report.config
    cuda = report.entry(BASELINE).peak_bytes is not None
    title = (
        f"Step time vs baseline: {config.model} on {config.input_shape}, batch {config.batch_size},"
        f" e={config.expansion}, {report.device}{', bf16' if config.bf16 else ''}"
    )
    columns = [
        ("strategy", "left"),
        ("step ms", "right"),
        ("x baseline [IQR]", "right"),
        ("CPU ms", "right"),
    ]
    if cuda:
        columns.append(("peak MiB", "right"))
    columns += [("state MiB", "right"), ("saved MiB", "right"), ("note", "left")]
    rows = []
    for entry in report.strategies:
        row = [
            entry.name,
            f"{entry.median_ms:.2f}" if entry.measured else "",
            _ratio_text(entry),
            f"{entry.median_cpu_ms:.2f}" if entry.measured else "",
        ]
        if cuda:
            row.append(_mib(entry.peak_bytes))
        row += [_mib(entry.state_bytes), _mib(entry.saved_bytes), entry.note]
        rows.append([Cell(text) for text in row])
    steps = Table(title, columns, rows, wraps=("note",))

    loop_rows = []
    sopkit_loop = report.loop[0]
    for entry in report.loop:
        ratios = [a / b for a, b in zip(entry.step_ms, sopkit_loop.step_ms, strict=True)]
        shown = EntryResult(entry.name, True, step_ms=entry.step_ms, ratios=ratios)
        texts = [entry.name, f"{entry.median_ms:.2f}", _ratio_text(shown)]
        loop_rows.append([Cell(text) for text in texts])
    loop = Table(
        "The loop itself: sopkit's baseline step vs a hand-written loop",
        [("loop", "left"), ("step ms", "right"), ("x sopkit [IQR]", "right")],
        loop_rows,
    )
    return [steps, loop]


def print_report(console: Console, report: BenchReport) -> None:
    """The step-time ratio table, the loop-overhead table and the notes."""
    for table in tables(report):
        console.print(rich_table(table))
    for note in report.notes:
        console.print(f"- {note}", highlight=False)


def render_markdown(report: BenchReport) -> str:
    """bench.md: the figure, the tables and notes as Markdown, with the command and the machine
    behind them."""
    lines = ["# sopkit bench", "", f"![Step time against the baseline's]({BENCH_PNG})", ""]
    lines += [markdown_table(table, heading="##") for table in tables(report)]
    lines += [f"- {md_escape(note)}" for note in report.notes]
    provenance = report.provenance
    versions = provenance.get("versions") or {}
    lines += [
        "",
        "## How this was measured",
        "",
        f"- Command: `{command_line(report.config)}`",
        f"- Git revision: {provenance.get('git_revision') or 'unknown (not a git checkout)'}",
        f"- Machine: {provenance.get('cpu')} ({provenance.get('cpu_capability')}), "
        f"{provenance.get('platform')}; CUDA device: {provenance.get('cuda_device') or 'none'}",
        f"- torch threads: {report.threads}; Python {provenance.get('python')}; "
        + ", ".join(f"{name} {version}" for name, version in versions.items() if version),
        f"- Measured: {provenance.get('created')}",
        "",
    ]
    return "\n".join(lines)


def draw_ratios(report: BenchReport) -> bytes:
    """bench.png: every timed strategy's step-time ratio to the baseline, as a PNG.

    A bar per strategy at its median ratio over rounds, whiskers over the interquartile range, a
    line at 1 (the baseline) and the ratio written at the bar's end.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    timed = [entry for entry in report.strategies if entry.measured and entry.ratios]
    names = [entry.name for entry in timed][::-1]  # the table's order, top to bottom
    ratios = [entry.ratio for entry in timed][::-1]
    spans = [entry.ratio_iqr for entry in timed][::-1]
    whiskers = [[r - low for r, (low, _) in zip(ratios, spans, strict=True)],
                [high - r for r, (_, high) in zip(ratios, spans, strict=True)]]
    config = report.config
    with matplotlib.rc_context(FIGURE_STYLE):
        figure = Figure(figsize=(7.6, 1.2 + 0.45 * len(names)), dpi=100)
        FigureCanvasAgg(figure)
        ax = figure.subplots()
        # The baseline's own rows (the reference and its noise check) in grey.
        colors = ["#8c959f" if name.startswith(BASELINE) else "#4c72b0" for name in names]
        ax.barh(names, ratios, xerr=whiskers, color=colors, alpha=0.85, capsize=3)
        ax.axvline(1.0, color="#656d76", linestyle="--", linewidth=1)
        for y, ratio, (_, high) in zip(range(len(names)), ratios, spans, strict=True):
            ax.text(max(ratio, high) + 0.03, y, f"{ratio:.2f}x", va="center", fontsize=9)
        ax.set_xlim(0, max(high for _, high in spans) * 1.15 + 0.1)
        ax.set_xlabel("step time / baseline's (median over rounds; whiskers: IQR)")
        ax.grid(axis="y", visible=False)
        ax.set_title(
            f"{config.model}, batch {config.batch_size}, e = {config.expansion}, {report.device}",
            fontsize=10,
        )
        figure.tight_layout()
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=150)
    return png.getvalue()


def write_report(report: BenchReport, out_dir: str | Path) -> list[Path]:
    """Write ``bench.json`` (configuration, provenance, every ratio), ``bench.md`` (the tables,
    the command and the machine) and ``bench.png`` (the ratios as bars) into ``out_dir``; returns
    their paths."""
    path = Path(out_dir)
    record = json.dumps(report.to_record(), indent=2, default=str) + "\n"
    return [
        write_atomic(path / BENCH_JSON, record),
        write_atomic(path / BENCH_MD, render_markdown(report)),
        write_atomic(path / BENCH_PNG, draw_ratios(report)),
    ]
