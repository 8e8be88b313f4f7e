"""Comparison reports: a terminal table, ``report.md``, a self-contained ``report.html`` and
``summary.json`` / ``summary.csv``, all drawn from the groups :func:`sopkit.results.aggregate` makes.

The reports follow the paper's protocol (Section 5.1): every strategy's learning rate is chosen on
validation accuracy, test accuracy at that rate is reported as mean ± std over seeds, and Table 1's
layout puts models × strategies in rows and one accuracy column per optimizer. Next to that they show
what the paper leaves out and a reader needs to judge a method: the paired difference against
``baseline`` with its 95% interval, the cost (step time, parameters, wall time), every diverged trial,
and how the numbers were produced.

Every table is built once as a neutral :class:`Table` and rendered three ways (rich, Markdown, HTML),
so the terminal, ``report.md`` and ``report.html`` can never disagree. ``write_all`` is the one entry
point ``sopkit compare`` and ``sopkit report`` share. matplotlib is imported inside the plotting
functions only, and never through pyplot, so importing this module is cheap and changes no global
backend state.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sopkit.results import PAPER_LR_BASE, PAPER_LR_EXPONENTS, REFERENCE_STRATEGY

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from rich.console import Console

    from sopkit.results import Group, StrategyResult

OPTIMIZER_ORDER = ("adam", "sgd")  # Table 1's column order
OPTIMIZER_NAMES = {"adam": "Adam", "sgd": "SGD"}

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"
FIGURES_DIR = "figures"


# ---------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------


def format_params(count: int) -> str:
    """1234567 -> '1.23M'; exact counts stay in summary.json."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= limit:
            return f"{count / limit:.3g}{suffix}"
    return str(count)


def _finite(value: float | None) -> bool:
    return value is not None and isinstance(value, int | float) and math.isfinite(value)


def format_accuracy(mean: float, std: float, seeds: int) -> str:
    """Mean ± std in percent with two decimals, as the paper's Table 1 prints them."""
    if not _finite(mean):
        return "n/a"
    if seeds < 2:
        return f"{mean * 100:.2f} (1 seed)"
    return f"{mean * 100:.2f} ± {std * 100:.2f}"


def format_lr(lr: float | None) -> str:
    """Three significant digits: 0.001 * 1.5^-4 -> '0.000198'."""
    return "none" if lr is None else f"{lr:.3g}"


def format_ratio(ratio: float | None, decimals: int = 2) -> str:
    return f"{ratio:.{decimals}f}×" if ratio is not None and math.isfinite(ratio) else "n/a"


def format_duration(seconds: float | None) -> str:
    """Wall times from seconds to hours, in the unit a reader would use."""
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest:02d} s"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min"


def format_step_time(seconds: float | None) -> str:
    """Three significant digits, trailing zeros kept (4.00 ms next to 7.48 ms)."""
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    value, unit = (seconds * 1e3, "ms") if seconds < 1 else (seconds, "s")
    return f"{value:.0f} {unit}" if value >= 100 else f"{value:#.3g} {unit}"


def _pp(value: float) -> str:
    """A difference of accuracies (fractions) in percentage points, always signed."""
    return f"{value * 100:+.2f}"


def optimizer_name(optimizer: str) -> str:
    return OPTIMIZER_NAMES.get(optimizer, optimizer)


def describe_lr_grid(optimizer: str, rates: Sequence[float]) -> str:
    """A grid in the paper's terms when it is one (``0.001·1.5^i, i ∈ [-2..2]``), else the rates."""
    rates = sorted(rates)
    if not rates:
        return "none"
    centre = PAPER_LR_BASE.get(optimizer)
    if centre is not None:
        exponents = [math.log(lr / centre) / math.log(1.5) for lr in rates]
        if all(abs(e - round(e)) < 1e-6 for e in exponents):
            ints = [round(e) for e in exponents]
            if len(ints) == 1:
                return f"1 rate: {format_lr(rates[0])} = {centre:g}·1.5^{ints[0]}"
            if ints == list(range(ints[0], ints[-1] + 1)):
                span = f"i ∈ [{ints[0]}..{ints[-1]}]"
            else:
                span = "i ∈ {" + ", ".join(map(str, ints)) + "}"
            low, high = PAPER_LR_EXPONENTS[0], PAPER_LR_EXPONENTS[-1]
            paper = (
                "the paper's full grid"
                if (ints[0], ints[-1], len(ints)) == (low, high, high - low + 1)
                else f"the paper uses i ∈ [{low}..{high}]"
            )
            return f"{len(rates)} rates {centre:g}·1.5^i, {span} ({paper})"
    return f"{len(rates)} rate{'s' if len(rates) > 1 else ''}: " + ", ".join(map(format_lr, rates))


def _seed_list(seeds: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0–2, 5'."""
    values = sorted(set(seeds))
    parts: list[str] = []
    start = previous = None
    for seed in [*values, None]:
        if seed is not None and previous is not None and seed == previous + 1:
            previous = seed
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}–{previous}")
        start = previous = seed
    return ", ".join(parts) if parts else "none"


def _architecture(model: str) -> str:
    """'mlp-a2' -> '[200, 100]' (Table 1's "Architecture" column), from the model registry."""
    try:
        # The registry imports torch; a report must still be written if that fails for any reason.
        from sopkit.models import MODELS
    except Exception:
        return ""
    spec = MODELS.get(model)
    if spec is None:
        return ""
    match = re.search(r"hidden widths (\[[^\]]*\])", spec.description)
    if match:
        return match.group(1)
    return re.split(r";| for ", spec.description)[0].strip()


def _teacher_wall_time(result: StrategyResult) -> float | None:
    """The teacher's training time summed over seeds, like ``wall_time`` (``extra`` holds means)."""
    mean = result.extra.get("teacher_wall_time")
    if mean is None or not math.isfinite(mean):
        return None
    return mean * len(result.seeds)


def _group_seeds(group: Group) -> list[int]:
    seeds = {s for r in group.strategies for s in r.seeds}
    seeds |= {d["seed"] for r in group.strategies for d in r.diverged}
    return sorted(seeds)


# ---------------------------------------------------------------------------------------------------
# Colours: one fixed colour per strategy, in every plot and next to every table row
# ---------------------------------------------------------------------------------------------------

# Okabe–Ito based, readable by colour-blind readers; the reference is neutral dark grey, the paper's
# method the most saturated colour, and related strategies share a hue family.
STRATEGY_COLOURS: dict[str, str] = {
    "baseline": "#4d4d4d",
    "baseline-long": "#8a8a8a",
    "mk": "#d55e00",
    "adv-mk": "#e69f00",
    "adv-mk-only": "#b8860b",
    "ensemble": "#0072b2",
    "distill": "#56b4e9",
    "subset": "#009e73",
}
_FALLBACK_COLOURS = ("#cc79a7", "#8c564b", "#7b3294", "#e7298a", "#808000", "#2f4b7c")
STRATEGY_MARKERS: dict[str, str] = {
    "baseline": "o",
    "baseline-long": "s",
    "mk": "D",
    "adv-mk": "^",
    "adv-mk-only": "v",
    "ensemble": "P",
    "distill": "X",
    "subset": "h",
}


def strategy_colour(name: str) -> str:
    """The strategy's colour; an unknown (plugin) strategy gets a stable one from its name."""
    if name in STRATEGY_COLOURS:
        return STRATEGY_COLOURS[name]
    # crc32, not hash(): Python salts str hashes per process, and colours must not change per run.
    return _FALLBACK_COLOURS[zlib.crc32(name.encode()) % len(_FALLBACK_COLOURS)]


def strategy_marker(name: str) -> str:
    return STRATEGY_MARKERS.get(name, "o")


# ---------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class ReportMeta:
    """What a report says about how it was produced (its "How this was produced" section)."""

    title: str
    preset: str | None = None
    command: str = ""  # the command line that produced the results, as the user typed it
    created: str = field(default_factory=_now)  # when the report was written (ISO 8601)
    # versions, git_revision, python, platform, cpu, cpu_capability, torch_threads, cuda_device
    # (sopkit.provenance)
    provenance: dict[str, Any] = field(default_factory=dict)
    complete: bool = True  # False: some planned trials have not finished; numbers may still change
    grid_note: str = ""  # e.g. "reduced grid: 5 rates 0.001*1.5^i for i in [-2..2], 3 seeds, ..."

    @classmethod
    def from_trials(
        cls, trials: Sequence[Mapping[str, Any]], *, title: str, **fields: Any
    ) -> ReportMeta:
        """Meta whose provenance is the latest trial's, listing every git revision trials came from
        (a report mixing revisions should say so)."""
        latest = max(trials, key=lambda t: t.get("finished_at") or 0.0) if trials else {}
        provenance = dict(latest.get("provenance") or {})
        revisions = sorted(
            {str(t.get("provenance", {}).get("git_revision")) for t in trials} - {"None"}
        )
        if len(revisions) > 1:
            provenance["git_revisions"] = revisions
        return cls(title=title, provenance=provenance, **fields)


# ---------------------------------------------------------------------------------------------------
# Tables, built once and rendered for the terminal, Markdown and HTML
# ---------------------------------------------------------------------------------------------------

# Cell styles: "good"/"bad" (a significant difference), "diverged", "muted", "strong", "warn".
_RICH_STYLES = {
    "good": "bold green",
    "bad": "bold red",
    "diverged": "red",
    "muted": "dim",
    "strong": "bold",
    "warn": "yellow",
}


@dataclass
class Cell:
    """One table cell: its text, a style name, an optional hover hint and a colour swatch."""

    text: str
    style: str = ""
    hint: str = ""
    swatch: str | None = None  # a strategy's colour, shown as a dot before the text (HTML, rich)


@dataclass
class Table:
    """A renderer-neutral table: a title, columns (name, 'left' | 'right'), rows and notes."""

    title: str
    columns: list[tuple[str, str]]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)


def _strategy_cell(name: str) -> Cell:
    return Cell(name, "strong", swatch=strategy_colour(name))


def _accuracy_cell(result: StrategyResult | None) -> Cell:
    if result is None:
        return Cell("—", "muted", "not run")
    if result.chosen_lr is None:
        return Cell("diverged", "diverged", "every learning rate diverged")
    text = format_accuracy(result.test_accuracy_mean, result.test_accuracy_std, len(result.seeds))
    hint = "test accuracy over seeds " + ", ".join(
        f"{s}: {a * 100:.2f}" for s, a in zip(result.seeds, result.test_accuracies, strict=False)
    )
    return Cell(text, hint=hint)


def _delta_cell(group: Group, result: StrategyResult) -> Cell:
    """The paired difference against baseline with its 95% interval; '*' when it excludes 0."""
    if result.strategy == REFERENCE_STRATEGY:
        return Cell("reference", "muted")
    if not any(r.strategy == REFERENCE_STRATEGY for r in group.strategies):
        return Cell("n/a", "muted", "no baseline in this group")
    paired = result.paired
    if paired is None:
        return Cell("n/a", "muted", "no seed shared with baseline at the chosen rates")
    if paired.low is None or paired.high is None:
        return Cell(f"{_pp(paired.mean)} (1 pair, no CI)", "muted")
    text = f"{_pp(paired.mean)} [{_pp(paired.low)}, {_pp(paired.high)}]"
    hint = f"mean of {paired.pairs} per-seed differences, 95% t-interval"
    if paired.significant:
        return Cell(text + " *", "good" if paired.mean > 0 else "bad", hint + "; excludes 0")
    return Cell(text, hint=hint)


def _trials_cell(result: StrategyResult) -> Cell:
    if not result.diverged:
        return Cell(str(result.trials))
    return Cell(
        f"{result.trials} ({len(result.diverged)} diverged)",
        "diverged",
        "; ".join(_diverged_text(d) for d in result.diverged),
    )


def _wall_cell(result: StrategyResult) -> Cell:
    teacher = _teacher_wall_time(result)
    if teacher is None:
        return Cell(format_duration(result.wall_time))
    # Distillation's cost is the student's training plus the teacher's: shown apart, never hidden.
    return Cell(
        f"{format_duration(result.wall_time)} + {format_duration(teacher)} teacher",
        hint="student training + the teacher's (ensemble members') training, over all seeds",
    )


def _diverged_text(diverged: Mapping[str, Any]) -> str:
    step = diverged.get("step")
    return (
        f"diverged at step {step} (lr={format_lr(diverged.get('lr'))}, seed={diverged.get('seed')})"
    )


def _config_text(group: Group) -> str:
    """The training configuration a group shares, in a few words."""
    train = group.train
    parts = [f"e = {group.expansion}"]
    if "epochs" in train:
        parts.append(f"{train['epochs']} epochs")
    if "batch_size" in train:
        parts.append(f"batch {train['batch_size']}")
    if train.get("schedule"):
        parts.append(f"{train['schedule']} schedule")
    if train.get("weight_decay"):
        parts.append(f"weight decay {train['weight_decay']}")
    if train.get("bf16"):
        parts.append("bf16")
    return ", ".join(parts)


def group_table(group: Group) -> Table:
    """Every strategy of one group with its accuracy, cost and the difference against baseline."""
    columns = [
        ("strategy", "left"),
        ("test acc. (%)", "right"),
        ("chosen lr", "right"),
        ("Δ vs baseline (pp) [95% CI]", "right"),
        ("step / baseline", "right"),
        ("median step", "right"),
        ("train params", "right"),
        ("inference params", "right"),
        ("wall time, all seeds", "right"),
        ("trials", "right"),
    ]
    rows = [
        [
            _strategy_cell(r.strategy),
            _accuracy_cell(r),
            Cell(format_lr(r.chosen_lr), "diverged" if r.chosen_lr is None else ""),
            _delta_cell(group, r),
            Cell(format_ratio(r.step_time_ratio)),
            Cell(format_step_time(r.median_step_time)),
            Cell(format_params(r.train_params), hint=f"{r.train_params:,}"),
            Cell(format_params(r.inference_params), hint=f"{r.inference_params:,}"),
            _wall_cell(r),
            _trials_cell(r),
        ]
        for r in group.strategies
    ]
    notes = []
    if not any(r.strategy == REFERENCE_STRATEGY for r in group.strategies):
        notes.append("No baseline in this group: no paired differences or step-time ratios.")
    return Table(f"{group.title} ({_config_text(group)})", columns, rows, notes)


def lr_sweep_table(group: Group) -> Table:
    """Mean validation accuracy per learning rate: how each rate was chosen (the chosen one bold)."""
    columns = [("strategy", "left")] + [(f"lr {format_lr(lr)}", "right") for lr in group.lr_grid]
    rows = []
    for result in group.strategies:
        row = [_strategy_cell(result.strategy)]
        for lr in group.lr_grid:
            if lr not in result.lr_scores:
                row.append(Cell("—", "muted", "not run at this rate"))
                continue
            score = result.lr_scores[lr]
            if score is None:
                row.append(Cell("diverged", "diverged", "a seed diverged: never chosen"))
            elif lr == result.chosen_lr:
                row.append(Cell(f"{score * 100:.2f}", "strong", "chosen"))
            else:
                row.append(Cell(f"{score * 100:.2f}"))
        rows.append(row)
    return Table(
        f"Validation accuracy (%) per learning rate: {group.title}",
        columns,
        rows,
        [
            "Mean over seeds; the chosen rate in bold. A rate where any seed diverged is never chosen."
        ],
    )


def _paper_partitions(groups: Sequence[Group]) -> list[list[Group]]:
    """Groups that belong in one Table 1: same data set and configuration except the optimizer."""

    def key(group: Group) -> str:
        train = {k: v for k, v in group.train.items() if k != "optimizer"}
        return json.dumps([group.dataset, group.expansion, train], sort_keys=True, default=str)

    partitions: list[tuple[str, list[Group]]] = []
    for group in groups:
        for partition_key, members in partitions:
            # Two groups with the same model and optimizer differ in strategy options: each gets
            # its own table rather than one silently overwriting the other's cells.
            taken = any((g.model, g.optimizer) == (group.model, group.optimizer) for g in members)
            if partition_key == key(group) and not taken:
                members.append(group)
                break
        else:
            partitions.append((key(group), [group]))
    return [members for _, members in partitions]


def _joined(values: Mapping[str, str]) -> str:
    """One value when every optimizer agrees, else 'Adam 1.9× · SGD 2.0×'."""
    distinct = set(values.values())
    if len(distinct) <= 1:
        return next(iter(distinct), "—")
    return " · ".join(f"{optimizer_name(o)} {v}" for o, v in values.items())


def paper_tables(groups: Sequence[Group]) -> list[Table]:
    """Paper Table 1's layout: rows model × strategy; per optimizer, test accuracy and chosen lr."""
    tables = []
    for members in _paper_partitions(groups):
        optimizers = [o for o in OPTIMIZER_ORDER if any(g.optimizer == o for g in members)]
        optimizers += sorted({g.optimizer for g in members} - set(optimizers))
        models = list(dict.fromkeys(g.model for g in members))
        columns = [("model", "left"), ("architecture", "left"), ("strategy", "left")]
        for optimizer in optimizers:
            name = optimizer_name(optimizer)
            columns += [(f"{name} test acc. (%)", "right"), (f"{name} lr", "right")]
        columns += [
            ("step / baseline", "right"),
            ("train params", "right"),
            ("inference params", "right"),
        ]
        rows = []
        for model in models:
            by_optimizer = {g.optimizer: g for g in members if g.model == model}
            strategies = list(
                dict.fromkeys(r.strategy for g in by_optimizer.values() for r in g.strategies)
            )
            architecture = _architecture(model) or "—"
            for strategy in strategies:
                found = {
                    o: next((r for r in g.strategies if r.strategy == strategy), None)
                    for o, g in by_optimizer.items()
                }
                present = {o: r for o, r in found.items() if r is not None}
                row = [Cell(model), Cell(architecture), _strategy_cell(strategy)]
                for optimizer in optimizers:
                    result = present.get(optimizer)
                    row.append(_accuracy_cell(result))
                    row.append(
                        Cell(format_lr(result.chosen_lr))
                        if result is not None
                        else Cell("—", "muted")
                    )
                # One decimal: the optimizers' ratios differ only by timing noise in the second.
                row.append(
                    Cell(
                        _joined({o: format_ratio(r.step_time_ratio, 1) for o, r in present.items()})
                    )
                )
                row.append(
                    Cell(_joined({o: format_params(r.train_params) for o, r in present.items()}))
                )
                row.append(
                    Cell(
                        _joined({o: format_params(r.inference_params) for o, r in present.items()})
                    )
                )
                rows.append(row)
        first = members[0]
        title = f"{first.dataset}: {_config_text(first)}"
        notes = [
            "Test accuracy (%) at the learning rate chosen on validation accuracy, mean ± std over "
            "seeds (paper Section 5.1, Table 1)."
        ]
        tables.append(Table(title, columns, rows, notes))
    return tables


def paired_table(groups: Sequence[Group]) -> Table:
    """Every strategy's paired difference against baseline (same seeds), across all groups."""
    columns = [
        ("group", "left"),
        ("strategy", "left"),
        ("Δ test accuracy (pp)", "right"),
        ("95% CI (pp)", "right"),
        ("pairs", "right"),
        ("CI excludes 0", "left"),
    ]
    rows = []
    for group in groups:
        for result in group.strategies:
            if result.strategy == REFERENCE_STRATEGY:
                continue
            paired = result.paired
            if paired is None:
                rows.append(
                    [
                        Cell(group.title),
                        _strategy_cell(result.strategy),
                        Cell("n/a", "muted"),
                        Cell("n/a", "muted"),
                        Cell("0"),
                        Cell("no baseline pair", "muted"),
                    ]
                )
                continue
            has_ci = paired.low is not None and paired.high is not None
            ci = f"[{_pp(paired.low)}, {_pp(paired.high)}]" if has_ci else "n/a (1 pair)"  # type: ignore[arg-type]
            if paired.significant:
                verdict = Cell(
                    "yes, better *" if paired.mean > 0 else "yes, worse *",
                    "good" if paired.mean > 0 else "bad",
                )
            else:
                verdict = Cell("no" if has_ci else "n/a", "muted")
            style = verdict.style if paired.significant else ""
            rows.append(
                [
                    Cell(group.title),
                    _strategy_cell(result.strategy),
                    Cell(_pp(paired.mean), style),
                    Cell(ci, style),
                    Cell(str(paired.pairs)),
                    verdict,
                ]
            )
    notes = [
        "Strategy minus baseline test accuracy on the seeds both ran, each at its own chosen rate; "
        "mean and 95% t-interval over seeds. * marks an interval that excludes 0 (each comparison "
        "on its own: no correction for making several)."
    ]
    return Table("Paired differences against baseline", columns, rows, notes)


def diverged_table(groups: Sequence[Group]) -> Table:
    """Every diverged trial: where, with which rate and seed, and at which step."""
    columns = [
        ("group", "left"),
        ("strategy", "left"),
        ("lr", "right"),
        ("seed", "right"),
        ("what happened", "left"),
    ]
    rows = [
        [
            Cell(group.title),
            _strategy_cell(result.strategy),
            Cell(format_lr(d.get("lr"))),
            Cell(str(d.get("seed"))),
            Cell(f"diverged at step {d.get('step')}", "diverged"),
        ]
        for group in groups
        for result in group.strategies
        for d in sorted(result.diverged, key=lambda d: (d.get("lr") or 0.0, d.get("seed") or 0))
    ]
    return Table("Diverged trials", columns, rows)


def setup_table(groups: Sequence[Group]) -> Table:
    """What was actually run per group, read from the trials (to check against the grid note)."""
    columns = [
        ("group", "left"),
        ("learning rates", "left"),
        ("seeds", "left"),
        ("epochs", "right"),
        ("batch", "right"),
        ("schedule", "left"),
        ("trials", "right"),
    ]
    rows = [
        [
            Cell(g.title),
            Cell(describe_lr_grid(g.optimizer, g.lr_grid)),
            Cell(_seed_list(_group_seeds(g))),
            Cell(str(g.train.get("epochs", "?"))),
            Cell(str(g.train.get("batch_size", "?"))),
            Cell(str(g.train.get("schedule", "?"))),
            Cell(str(sum(r.trials for r in g.strategies))),
        ]
        for g in groups
    ]
    return Table("What was run", columns, rows)


def coverage_warnings(groups: Sequence[Group]) -> list[str]:
    """Strategies missing trials (seeds × rates) that others in their group have: a result that
    can still change, or a protocol not followed."""
    warnings = []
    for group in groups:
        expected = len(group.lr_grid) * len(_group_seeds(group))
        for result in group.strategies:
            if result.trials < expected:
                warnings.append(
                    f"{result.strategy} on {group.title}: {result.trials} of {expected} trials "
                    f"({len(group.lr_grid)} rates × {len(_group_seeds(group))} seeds)."
                )
    return warnings


INCOMPLETE_WARNING = (
    "Incomplete comparison: not every planned trial has finished. The numbers come from the trials "
    "that did; missing rates or seeds can still change the chosen learning rates and every mean."
)


# ---------------------------------------------------------------------------------------------------
# Rendering: rich (terminal)
# ---------------------------------------------------------------------------------------------------


# Terminals are narrower than pages: columns listed here are left out there (report.md has them).
# The median step time stays: it is what the step-time ratio is made of (issue 2's table).
_TERMINAL_DROPS: tuple[str, ...] = ()
# ... and these may wrap; every other value keeps to one line ("+3.35 [+2.16, +4.53]" split over
# two lines is hard to read), and long headers wrap instead.
_TERMINAL_WRAPS = ("wall time, all seeds", "median step")


def _rich_table(table: Table) -> Any:
    """The table for a rich console (no vertical rules, to leave the values the width)."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table as RichTable

    rich_table = RichTable(
        title=table.title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD
    )
    keep = [i for i, (name, _) in enumerate(table.columns) if name not in _TERMINAL_DROPS]
    for index in keep:
        name, align = table.columns[index]
        width = max(
            (len(row[index].text) + (2 if row[index].swatch else 0) for row in table.rows),
            default=0,
        )
        rich_table.add_column(
            name,
            justify="right" if align == "right" else "left",
            min_width=None if name in _TERMINAL_WRAPS else width,
        )
    for row in table.rows:
        texts = []
        for cell in (row[i] for i in keep):
            text = escape(cell.text)
            if cell.style:
                text = f"[{_RICH_STYLES[cell.style]}]{text}[/]"
            if cell.swatch:
                text = f"[{cell.swatch}]●[/] {text}"
            texts.append(text)
        rich_table.add_row(*texts)
    return rich_table


def _diverged_lines(result: StrategyResult, limit: int = 4) -> list[str]:
    """Each diverged trial on a line, or past ``limit`` one line per rate (a full grid can have
    dozens; report.md lists them all)."""
    if len(result.diverged) <= limit:
        return [_diverged_text(d) for d in result.diverged]
    by_lr: dict[float, list[Mapping[str, Any]]] = {}
    for d in result.diverged:
        by_lr.setdefault(d.get("lr") or 0.0, []).append(d)
    lines = []
    for lr, trials in sorted(by_lr.items()):
        steps = sorted(d.get("step") or 0 for d in trials)
        where = f"step {steps[0]}" if len(set(steps)) == 1 else f"steps {steps[0]}–{steps[-1]}"
        seeds = _seed_list(d.get("seed") or 0 for d in trials)
        lines.append(f"diverged at lr={format_lr(lr)}: seeds {seeds}, at {where}")
    return lines


def print_report(console: Console, groups: Sequence[Group], meta: ReportMeta) -> None:
    """The comparison in the terminal: one table per group, every diverged trial, and warnings."""
    from rich.markup import escape

    if not meta.complete:
        console.print(f"[bold yellow]⚠ {escape(INCOMPLETE_WARNING)}[/]")
    for group in groups:
        table = group_table(group)
        console.print(_rich_table(table))
        for note in table.notes:
            console.print(f"[dim]{escape(note)}[/]")
        for result in group.strategies:
            for line in _diverged_lines(result):
                console.print(f"  [red]{escape(result.strategy)}: {escape(line)}[/]")
    if any(r.paired is not None and r.paired.significant for g in groups for r in g.strategies):
        console.print("[dim]* the 95% interval of the paired difference excludes 0.[/]")
    for warning in coverage_warnings(groups):
        console.print(f"[yellow]Missing trials: {escape(warning)}[/]")
    if meta.grid_note:
        console.print(f"[dim]{escape(meta.grid_note)}[/]")


# ---------------------------------------------------------------------------------------------------
# Rendering: Markdown (GitHub)
# ---------------------------------------------------------------------------------------------------


def _md_escape(text: str) -> str:
    """Table cells: a '|' would end the cell and '*' or '_' would start emphasis."""
    for char in "\\`*_|":
        text = text.replace(char, "\\" + char)
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _md_table(table: Table, heading: str | None = "###") -> str:
    """The table in GitHub-flavoured Markdown; ``heading`` None leaves its title out."""
    lines = [f"{heading} {_md_escape(table.title)}", ""] if heading else []
    lines.append("| " + " | ".join(_md_escape(name) for name, _ in table.columns) + " |")
    lines.append(
        "|" + "|".join("---:" if align == "right" else ":---" for _, align in table.columns) + "|"
    )
    for row in table.rows:
        cells = []
        for cell in row:
            text = _md_escape(cell.text)
            if cell.style in ("good", "bad", "strong") and text:
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(f"{_md_escape(note)}\n" for note in table.notes)
    return "\n".join(lines)


def _fence(text: str) -> str:
    """A code block that survives backticks inside the text."""
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}\n{text}\n{ticks}"


def _provenance_items(meta: ReportMeta) -> list[tuple[str, str]]:
    """(label, value) pairs for the "How this was produced" section, in reading order."""
    provenance = meta.provenance
    items = [
        ("Complete", "yes" if meta.complete else "NO: some planned trials had not finished"),
        ("Preset", meta.preset or "none (options given on the command line)"),
        ("Learning-rate grid, seeds, epochs", meta.grid_note or "see the table below"),
        ("Report written", meta.created),
    ]
    revisions = provenance.get("git_revisions")
    revision = provenance.get("git_revision") or "unknown (not a git checkout)"
    if revisions:
        revision = (
            f"{revision} (the trials come from {len(revisions)} revisions: {', '.join(revisions)})"
        )
    items.append(("git revision", str(revision)))
    for key, label in (
        ("python", "Python"),
        ("platform", "Platform"),
        ("cpu", "CPU"),
        ("cpu_capability", "torch CPU capability"),
        ("torch_threads", "torch threads"),
        ("cuda_device", "CUDA device"),
    ):
        if key in provenance:
            items.append((label, str(provenance[key] if provenance[key] is not None else "none")))
    versions = provenance.get("versions") or {}
    if versions:
        items.append(
            (
                "Versions",
                ", ".join(
                    f"{name} {version or 'not installed'}" for name, version in versions.items()
                ),
            )
        )
    return items


def render_markdown(
    groups: Sequence[Group], meta: ReportMeta, figures: Sequence[tuple[str, str]] = ()
) -> str:
    """report.md's text; ``figures`` are (relative PNG path, alt text) pairs to embed."""
    parts = [f"# {_md_escape(meta.title)}", ""]
    if not meta.complete:
        parts += ["> [!WARNING]", f"> **{_md_escape(INCOMPLETE_WARNING)}**", ""]
    missing = coverage_warnings(groups)
    if missing:
        parts += ["> [!NOTE]", "> Some strategies lack trials that others in their group have:"]
        parts += [f"> - {_md_escape(w)}" for w in missing]
        parts.append("")
    parts += [
        "Each strategy's learning rate is chosen on validation accuracy (a rate at which any seed "
        "diverged is never chosen); test accuracy at that rate is reported over seeds, following "
        "the paper's Section 5.1 protocol.",
        "",
        "## Test accuracy (paper Table 1 layout)",
        "",
    ]
    parts += [_md_table(t) for t in paper_tables(groups)]
    parts += ["## Differences against baseline", "", _md_table(paired_table(groups), None)]
    if figures:
        parts += ["## Figures", ""]
        parts += [f"![{_md_escape(alt)}]({path})\n" for path, alt in figures]
    parts += ["## Cost and details per group", ""]
    for group in groups:
        parts.append(_md_table(group_table(group)))
        parts.append(_md_table(lr_sweep_table(group), heading="####"))
    diverged = diverged_table(groups)
    parts += ["## Diverged trials", ""]
    parts.append(_md_table(diverged, None) if diverged.rows else "No trial diverged.\n")
    parts += ["## How this was produced", ""]
    if meta.command:
        parts += [_fence(meta.command), ""]
    parts += [f"- **{label}:** {_md_escape(value)}" for label, value in _provenance_items(meta)]
    parts += ["", _md_table(setup_table(groups))]
    return "\n".join(parts).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------
# Rendering: HTML (one offline file)
# ---------------------------------------------------------------------------------------------------

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


def _html_table(table: Table, heading: str | None = "h3") -> str:
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
    if provenance.get("git_revision"):
        subtitle.append(f"git {str(provenance['git_revision'])[:12]}")
    body = [f"<h1>{esc(meta.title)}</h1>", f'<p class="subtitle">{esc(" · ".join(subtitle))}</p>']
    body.append(
        '<nav><a href="#accuracy">Accuracy</a><a href="#differences">Differences</a>'
        '<a href="#figures">Figures</a><a href="#details">Details</a>'
        '<a href="#diverged">Diverged</a><a href="#provenance">How this was produced</a></nav>'
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
    body += [_html_table(t) for t in paper_tables(groups)]
    body.append('<h2 id="differences">Differences against baseline</h2>')
    body.append(_html_table(paired_table(groups), None))
    body.append('<h2 id="figures">Figures</h2>')
    if not figures:
        body.append(
            '<p class="s-warn">The figures could not be drawn (see the terminal output).</p>'
        )
    for index, spec in enumerate(figures):
        body.append(
            f"<figure>{_inline_svg(spec.svg, f'f{index}')}"
            f"<figcaption>{esc(spec.caption)}</figcaption></figure>"
        )
    body.append('<h2 id="details">Cost and details per group</h2>')
    for group in groups:
        body.append(_html_table(group_table(group)))
        body.append(_html_table(lr_sweep_table(group), heading="h4"))
    body.append('<h2 id="diverged">Diverged trials</h2>')
    diverged = diverged_table(groups)
    body.append(_html_table(diverged, None) if diverged.rows else "<p>No trial diverged.</p>")
    body.append('<h2 id="provenance">How this was produced</h2>')
    if meta.command:
        body.append(f"<pre>{esc(meta.command)}</pre>")
    body.append(
        '<dl class="meta">'
        + "".join(
            f"<dt>{esc(label)}</dt><dd>{esc(value)}</dd>"
            for label, value in _provenance_items(meta)
        )
        + "</dl>"
    )
    body.append(_html_table(setup_table(groups)))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(meta.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )


def _inline_svg(svg: str, prefix: str) -> str:
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


# ---------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------

#: The look of every sopkit figure (compare reports and `sopkit bench`).
FIGURE_STYLE: dict[Any, Any] = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.6,
    "figure.titlesize": 13,
    "figure.titleweight": "bold",
    "svg.fonttype": "path",  # glyphs as paths: the page needs no font to look the same everywhere
    "svg.hashsalt": "sopkit",  # deterministic ids: the same results give the same file
}


@dataclass
class FigureSpec:
    """One figure, drawn once and saved as SVG (for the HTML) and PNG (for report.md)."""

    slug: str  # file name stem
    title: str
    caption: str
    svg: str
    png: bytes


def _new_figure(panels: int) -> tuple[Figure, list[Axes]]:
    """A figure with one panel per group (two per row, three from five groups) on Agg."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(panels, 3 if panels > 4 else 2)
    rows = math.ceil(panels / columns)
    # A lone panel gets more room: the figure title must fit above it.
    width, height = (7.6, 4.6) if panels == 1 else (5.4, 3.9)
    figure = Figure(figsize=(width * columns, height * rows + 0.9), dpi=100)
    FigureCanvasAgg(figure)  # a canvas of our own: no pyplot, no global backend switch
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for extra in axes[panels:]:
        extra.set_visible(False)
    return figure, axes[:panels]


def _panel_title(group: Group, groups: Sequence[Group]) -> str:
    """The shortest title that still tells the groups apart."""
    parts = []
    for attribute, label in (("dataset", None), ("model", None), ("optimizer", "optimizer")):
        values = {getattr(g, attribute) for g in groups}
        if len(values) > 1 or len(groups) == 1:
            value = getattr(group, attribute)
            parts.append(optimizer_name(value) if label else value)
    return " / ".join(parts) or group.title


def _curve_summary(
    curves: Sequence[Sequence[Mapping[str, Any]]], key: str
) -> tuple[list[float], ...]:
    """Per epoch over seeds: epochs, mean, min and max of ``key`` (in %), skipping missing values."""
    by_epoch: dict[float, list[float]] = {}
    for curve in curves:
        for record in curve:
            value, epoch = record.get(key), record.get("epoch")
            if value is not None and epoch is not None and math.isfinite(value):
                by_epoch.setdefault(float(epoch), []).append(float(value) * 100)
    epochs = sorted(by_epoch)
    return (
        epochs,
        [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs],
        [min(by_epoch[e]) for e in epochs],
        [max(by_epoch[e]) for e in epochs],
    )


def _learning_curves(groups: Sequence[Group]) -> Figure:
    from matplotlib.ticker import MaxNLocator

    figure, axes = _new_figure(len(groups))
    for ax, group in zip(axes, groups, strict=True):
        plotted: list[float] = []
        for result in group.strategies:
            colour = strategy_colour(result.strategy)
            epochs, mean, low, high = _curve_summary(result.curves, "val_accuracy")
            label = f"{result.strategy} (lr {format_lr(result.chosen_lr)})"
            if epochs:
                ax.fill_between(epochs, low, high, color=colour, alpha=0.16, linewidth=0)
                ax.plot(epochs, mean, color=colour, linewidth=1.8, label=label)
                # The y range should show where the curves end up, not the first epochs' climb.
                start = len(mean) // 4
                plotted += mean[start:] + low[start:] + high[start:]
            elif _finite(result.val_accuracy_mean):
                # No per-epoch curve (an ensemble of trained members): its final validation
                # accuracy as a dashed reference line.
                value = result.val_accuracy_mean * 100
                ax.axhline(
                    value,
                    color=colour,
                    linestyle=(0, (5, 3)),
                    linewidth=1.4,
                    label=f"{label}, final",
                )
                plotted.append(value)
        if plotted:
            bottom, top = min(plotted), max(plotted)
            span = max(top - bottom, 1.0)
            # Extra room below: the legend sits in the lower right, under the curves' plateau.
            ax.set_ylim(max(0.0, bottom - 0.45 * span), min(100.0, top + 0.08 * span))
        else:
            ax.text(
                0.5,
                0.5,
                "no learning curves recorded",
                transform=ax.transAxes,
                ha="center",
                va="center",
                color="#656d76",
            )
        ax.set_title(_panel_title(group, groups))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
        ax.set_ylabel("validation accuracy (%)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(
                loc="best",  # the lower right (kept free below the plateau) unless a curve is there
                ncol=2,
                fontsize=8,
                frameon=True,
                framealpha=0.92,
                edgecolor="#d0d7de",
                columnspacing=1.0,
                handlelength=1.6,
            )
    figure.suptitle("Learning curves at each strategy's chosen learning rate")
    figure.text(
        0.5,
        0.005,
        "line: mean over seeds · band: min–max over seeds",
        ha="center",
        va="bottom",
        fontsize=9,
        color="#656d76",
    )
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    return figure


_LABEL_STYLE: dict[str, Any] = {"fontsize": 9.0, "fontweight": "bold"}


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """The overlapping area of two (x0, y0, x1, y1) boxes."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return width * height if width > 0 and height > 0 else 0.0


# A labelled point: x, y, its error bar's half-length (y units), the label, its colour.
_Point = tuple[float, float, float, str, str]


def _place_labels(ax: Axes, points: Sequence[_Point]) -> None:
    """Label points directly, each where it covers no other label, marker or error bar.

    Labels are placed one after another (in strategy order, so the baseline's comes first); each
    takes the cheapest of a few candidate spots beside its point (right, left, then shifted up or
    down with a thin leader line), where overlaps and leaving the axes cost the most and distance
    from the point a little.
    """
    if not points:
        return
    figure = ax.figure
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    frame = ax.get_window_extent(renderer)
    anchors = [tuple(ax.transData.transform((x, y))) for x, y, _, _, _ in points]
    sizes = []
    for _, _, _, text, _ in points:
        probe = ax.text(0, 0, text, **_LABEL_STYLE)  # measured with the label's own font
        extent = probe.get_window_extent(renderer)
        sizes.append((extent.width + 4.0, extent.height + 2.0))  # + the backing box's padding
        probe.remove()
    marker = 6.0  # half a marker's size, px
    obstacles = [(px - marker, py - marker, px + marker, py + marker) for px, py in anchors]
    bars = []
    for x, y, error, _, _ in points:
        low = ax.transData.transform((x, y - error))
        high = ax.transData.transform((x, y + error))
        bars.append((low[0] - 1.5, low[1], low[0] + 1.5, high[1]))
    gap = 6.0
    placed: list[tuple[float, float, float, float]] = []
    to_points = 72.0 / figure.dpi
    for index, ((x, y, _, text, colour), (px, py), (width, height)) in enumerate(
        zip(points, anchors, sizes, strict=True)
    ):
        best: tuple[float, float, float, str] | None = None
        for shift in (0, 1, -1, 2, -2, 3, -3, 4, -4):
            for side in ("right", "left"):
                dy = shift * height * 0.9
                x0 = px + gap if side == "right" else px - gap - width
                candidate = (x0, py + dy - height / 2, x0 + width, py + dy + height / 2)
                inside = _overlap(candidate, (frame.x0, frame.y0, frame.x1, frame.y1))
                cost = 20.0 * (width * height - inside)
                cost += 10.0 * sum(_overlap(candidate, other) for other in placed)
                cost += 10.0 * sum(
                    _overlap(candidate, box) for j, box in enumerate(obstacles) if j != index
                )
                cost += 2.0 * sum(
                    _overlap(candidate, bar) for j, bar in enumerate(bars) if j != index
                )
                cost += 0.5 * abs(dy) + (3.0 if side == "left" else 0.0)
                if best is None or cost < best[0]:
                    best = (cost, x0, dy, side)
        assert best is not None
        _, x0, dy, side = best
        placed.append((x0, py + dy - height / 2, x0 + width, py + dy + height / 2))
        # Offsets to the text's anchor: its left edge on the right side, its right edge on the left.
        offset_x = (x0 + 2.0 - px) if side == "right" else (x0 + width - 2.0 - px)
        arrow = None
        if dy:
            arrow = {
                "arrowstyle": "-",
                "color": colour,
                "linewidth": 0.7,
                "shrinkA": 1,
                "shrinkB": 4,
                "alpha": 0.8,
            }
        ax.annotate(
            text,
            (x, y),
            xytext=(offset_x * to_points, dy * to_points),
            textcoords="offset points",
            ha="left" if side == "right" else "right",
            va="center",
            color=colour,
            arrowprops=arrow,
            # A light backing so grid and reference lines never run through the text.
            bbox={
                "boxstyle": "round,pad=0.15",
                "facecolor": "white",
                "edgecolor": "none",
                "alpha": 0.8,
            },
            zorder=5,
            **_LABEL_STYLE,
        )


def _scatter_panel(
    ax: Axes,
    group: Group,
    xs: Mapping[str, float],
    *,
    log_ticks: Sequence[float] | None = None,
    ratio: bool = True,
) -> list[_Point]:
    """Accuracy (mean ± std over seeds) against ``xs[strategy]``, one point per strategy; returns
    the points to label once the figure's layout is final.

    ``log_ticks`` makes the x axis logarithmic with ticks (and their labels) at those values: the
    true counts, where ``xs`` may hold positions spread apart for legibility. Otherwise ``ratio``
    says x is a ratio to the baseline (ticks as '2×', always one at 1×) rather than a plain value.
    """
    points = []
    y_low, y_high = math.inf, -math.inf
    for result in group.strategies:
        x = xs.get(result.strategy)
        if x is None or not _finite(x) or not _finite(result.test_accuracy_mean):
            continue
        colour = strategy_colour(result.strategy)
        y, error = result.test_accuracy_mean * 100, result.test_accuracy_std * 100
        ax.errorbar(
            [x],
            [y],
            yerr=[error],
            fmt=strategy_marker(result.strategy),
            color=colour,
            markersize=8,
            capsize=3,
            elinewidth=1.2,
            markeredgecolor="white",
            markeredgewidth=0.6,
            zorder=3,
        )
        points.append((x, y, error, result.strategy, colour))
        y_low, y_high = min(y_low, y - error), max(y_high, y + error)
    reference = next((r for r in group.strategies if r.strategy == REFERENCE_STRATEGY), None)
    if reference is not None and _finite(reference.test_accuracy_mean):
        ax.axhline(
            reference.test_accuracy_mean * 100,
            color=strategy_colour(REFERENCE_STRATEGY),
            linestyle=":",
            linewidth=1,
            alpha=0.7,
            zorder=1,
        )
    if not points:
        ax.text(
            0.5,
            0.5,
            "nothing to plot",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="#656d76",
        )
        return points
    y_span = max(y_high - y_low, 0.5)
    ax.set_ylim(y_low - 0.15 * y_span, y_high + 0.15 * y_span)
    x_values = [p[0] for p in points]
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

    if log_ticks is not None:
        ax.set_xscale("log")
        low, high = min(x_values), max(x_values)
        # Room right of the points for the labels, as a factor on the log axis.
        ax.set_xlim(low / 1.6, high * max(2.2, (high / low) ** 0.35))
        ax.xaxis.set_major_locator(FixedLocator(sorted(set(log_ticks))))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: format_params(round(value))))
        ax.xaxis.set_minor_locator(NullLocator())
    elif not ratio:
        low, high = min(x_values), max(x_values)
        span = max(high - low, 0.1 * abs(high), 1e-9)
        ax.set_xlim(low - 0.12 * span, high + 0.3 * span)
    else:
        low, high = min([*x_values, 1.0]), max([*x_values, 1.0])
        span = max(high - low, 0.2)
        ax.set_xlim(low - 0.12 * span, high + 0.3 * span)
        ticks = list(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(low, high))
        step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
        # The baseline sits at 1×: always a tick there (dropping any too close to read apart).
        ticks = sorted([1.0, *(t for t in ticks if abs(t - 1.0) > 0.4 * step and t > 0)])
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}×"))
    return points


def _dodged(xs: Mapping[str, float], factor: float = 1.07) -> dict[str, float]:
    """Spread points that share an x (same parameter count) slightly apart on a log axis."""
    by_value: dict[float, list[str]] = {}
    for name, value in xs.items():
        by_value.setdefault(value, []).append(name)
    result = {}
    for value, names in by_value.items():
        for index, name in enumerate(names):
            result[name] = value * factor ** (index - (len(names) - 1) / 2)
    return result


def _accuracy_vs_step_time(groups: Sequence[Group]) -> Figure:
    figure, axes = _new_figure(len(groups))
    labels = []
    for ax, group in zip(axes, groups, strict=True):
        ratios = {
            r.strategy: float(r.step_time_ratio)
            for r in group.strategies
            if r.step_time_ratio is not None and _finite(r.step_time_ratio)
        }
        if ratios:
            labels.append(_scatter_panel(ax, group, ratios))
            ax.axvline(1.0, color="#8c959f", linestyle=":", linewidth=1, zorder=1)
            ax.set_xlabel("training step time / baseline's (median, ×)")
        else:
            # No baseline to divide by: absolute step times still compare the strategies.
            times = {r.strategy: r.median_step_time * 1e3 for r in group.strategies}
            labels.append(_scatter_panel(ax, group, times, ratio=False))
            ax.set_xlabel("median training step time (ms)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(_panel_title(group, groups))
    figure.suptitle("Test accuracy against training cost")
    _finish_scatter(figure, axes, labels, "mean ± std over seeds · dotted: baseline")
    return figure


def _accuracy_vs_params(groups: Sequence[Group]) -> Figure:
    figure, axes = _new_figure(len(groups))
    labels = []
    for ax, group in zip(axes, groups, strict=True):
        params = {
            r.strategy: float(r.inference_params)
            for r in group.strategies
            if r.inference_params and r.inference_params > 0
        }
        labels.append(_scatter_panel(ax, group, _dodged(params), log_ticks=list(params.values())))
        ax.set_xlabel("inference parameters (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(_panel_title(group, groups))
    figure.suptitle("Test accuracy against the size of the deployed model")
    _finish_scatter(
        figure,
        axes,
        labels,
        "mean ± std over seeds · dotted: baseline · points with "
        "equal counts are spread slightly sideways",
    )
    return figure


def _finish_scatter(
    figure: Figure,
    axes: Sequence[Axes],
    labels: Sequence[Sequence[_Point]],
    footnote: str,
) -> None:
    figure.text(0.5, 0.005, footnote, ha="center", va="bottom", fontsize=9, color="#656d76")
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    # Labels are placed in pixels, so only once the layout has fixed every axes' size.
    for ax, points in zip(axes, labels, strict=True):
        _place_labels(ax, points)


def draw_figures(groups: Sequence[Group]) -> list[FigureSpec]:
    """The report's three figures, each rendered as SVG and PNG."""
    import matplotlib

    specs = []
    with matplotlib.rc_context(FIGURE_STYLE):
        for slug, title, caption, build in (
            (
                "learning-curves",
                "Learning curves",
                "Validation accuracy per epoch at each strategy's chosen learning rate: the line is "
                "the mean over seeds, the band spans the lowest to the highest seed. Strategies that "
                "record no per-epoch curve (e.g. an ensemble of trained members) are drawn as a "
                "dashed line at their final validation accuracy.",
                _learning_curves,
            ),
            (
                "accuracy-vs-step-time",
                "Accuracy against step time",
                "Test accuracy (mean ± std over seeds) against the median training-step time "
                "relative to the baseline's in the same group. Up and left is better; the dotted "
                "lines mark the baseline. A distilled student's step includes the teacher's "
                "forward pass but not the teacher's own training (see the wall times).",
                _accuracy_vs_step_time,
            ),
            (
                "accuracy-vs-inference-params",
                "Accuracy against inference parameters",
                "Test accuracy (mean ± std over seeds) against the parameters of the model that is "
                "deployed (log scale). Majority kernels and distillation ship the baseline's size; "
                "an ensemble ships every member.",
                _accuracy_vs_params,
            ),
        ):
            figure = build(groups)
            svg = io.StringIO()
            figure.savefig(svg, format="svg", metadata={"Date": None})
            png = io.BytesIO()
            figure.savefig(png, format="png", dpi=150)
            specs.append(FigureSpec(slug, title, caption, svg.getvalue(), png.getvalue()))
    return specs


def render_plots_png(out_dir: Path, groups: Sequence[Group]) -> list[Path]:
    """Write the report's figures as PNG files into ``out_dir``; returns their paths."""
    return _write_pngs(Path(out_dir), draw_figures(groups))


def _write_pngs(out_dir: Path, specs: Sequence[FigureSpec]) -> list[Path]:
    paths = []
    for spec in specs:
        path = out_dir / f"{spec.slug}.png"
        _atomic_write(path, spec.png)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------


def _atomic_write(path: Path, content: str | bytes) -> None:
    """Write to a temporary file beside ``path``, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(content, bytes):
            temporary.write_bytes(content)
        else:
            temporary.write_text(content, encoding="utf-8", newline="")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _jsonable(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null; tuples become lists; keys become strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


def strategy_record(group: Group, result: StrategyResult) -> dict[str, Any]:
    """One (group, strategy) of summary.json: the group's identity and everything measured."""
    record: dict[str, Any] = {
        "strategy": result.strategy,
        "dataset": group.dataset,
        "model": group.model,
        "optimizer": group.optimizer,
        "expansion": group.expansion,
        "train": dict(group.train),
        "lr_grid": list(group.lr_grid),
    }
    record.update(result.as_dict())
    paired = result.paired
    record["paired_difference"] = (
        None
        if paired is None
        else {
            "mean": paired.mean,
            "low": paired.low,
            "high": paired.high,
            "pairs": paired.pairs,
            "significant": paired.significant,
        }
    )
    teacher = _teacher_wall_time(result)
    if teacher is not None:
        record["teacher_wall_time"] = teacher  # over all seeds, like wall_time
    return _jsonable(record)  # type: ignore[no-any-return]


def summary_payload(groups: Sequence[Group], meta: ReportMeta) -> dict[str, Any]:
    """summary.json's content."""
    return _jsonable(
        {
            "meta": asdict(meta),
            "reference": REFERENCE_STRATEGY,
            "strategies": [strategy_record(g, r) for g in groups for r in g.strategies],
            "missing_trials": coverage_warnings(groups),
            "complete": meta.complete,
        }
    )  # type: ignore[no-any-return]


CSV_COLUMNS = (
    "dataset",
    "model",
    "optimizer",
    "expansion",
    "epochs",
    "batch_size",
    "schedule",
    "strategy",
    "chosen_lr",
    "test_accuracy_mean",
    "test_accuracy_std",
    "val_accuracy_mean",
    "n_seeds",
    "seeds",
    "delta_mean",
    "delta_low",
    "delta_high",
    "pairs",
    "significant",
    "step_time_ratio",
    "median_step_time",
    "train_params",
    "inference_params",
    "wall_time",
    "teacher_wall_time",
    "diverged_trials",
    "trials",
)


def _csv_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return value


def summary_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """summary.csv's rows: one per (group, strategy), scalars only (lists joined with ';')."""
    rows = []
    for group in groups:
        for r in group.strategies:
            paired = r.paired
            row = {
                "dataset": group.dataset,
                "model": group.model,
                "optimizer": group.optimizer,
                "expansion": group.expansion,
                "epochs": group.train.get("epochs"),
                "batch_size": group.train.get("batch_size"),
                "schedule": group.train.get("schedule"),
                "strategy": r.strategy,
                "chosen_lr": r.chosen_lr,
                "test_accuracy_mean": r.test_accuracy_mean,
                "test_accuracy_std": r.test_accuracy_std,
                "val_accuracy_mean": r.val_accuracy_mean,
                "n_seeds": len(r.seeds),
                "seeds": ";".join(map(str, r.seeds)),
                "delta_mean": paired.mean if paired else None,
                "delta_low": paired.low if paired else None,
                "delta_high": paired.high if paired else None,
                "pairs": paired.pairs if paired else None,
                "significant": paired.significant if paired else None,
                "step_time_ratio": r.step_time_ratio,
                "median_step_time": r.median_step_time,
                "train_params": r.train_params,
                "inference_params": r.inference_params,
                "wall_time": r.wall_time,
                "teacher_wall_time": _teacher_wall_time(r),
                "diverged_trials": len(r.diverged),
                "trials": r.trials,
            }
            rows.append({k: _csv_value(v) for k, v in row.items()})
    return rows


def write_summary(out_dir: Path, groups: Sequence[Group], meta: ReportMeta) -> list[Path]:
    """Write summary.json and summary.csv (atomically) into ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    json_path, csv_path = out_dir / SUMMARY_JSON, out_dir / SUMMARY_CSV
    text = json.dumps(summary_payload(groups, meta), indent=2, allow_nan=False, ensure_ascii=False)
    _atomic_write(json_path, text + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(summary_rows(groups))
    _atomic_write(csv_path, buffer.getvalue())
    return [json_path, csv_path]


def write_markdown(
    path: Path,
    groups: Sequence[Group],
    meta: ReportMeta,
    figures: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write report.md; ``figures`` are (PNG path relative to the report, alt text) to embed."""
    path = Path(path)
    _atomic_write(path, render_markdown(groups, meta, figures))
    return path


def write_html(
    path: Path,
    groups: Sequence[Group],
    meta: ReportMeta,
    figures: Sequence[FigureSpec] | None = None,
) -> Path:
    """Write report.html: one offline file, figures inline (drawn here unless given)."""
    path = Path(path)
    if figures is None:
        figures = draw_figures(groups)
    _atomic_write(path, render_html(groups, meta, figures))
    return path


def write_all(out_dir: Path, groups: Sequence[Group], meta: ReportMeta) -> list[Path]:
    """Every report of a comparison: summary.json, summary.csv, report.md, report.html, and the
    figures as PNG under figures/ (which report.md embeds). Returns the paths written.

    The summaries are written first: whatever happens to the figures, the numbers are on disk.
    """
    out_dir = Path(out_dir)
    paths = write_summary(out_dir, groups, meta)
    try:
        figures = draw_figures(groups) if groups else []
        figure_error = None
    except Exception as error:  # a plotting failure must not cost the tables
        figures, figure_error = [], error
    pngs = _write_pngs(out_dir / FIGURES_DIR, figures)
    embedded = [
        (f"{FIGURES_DIR}/{p.name}", spec.title) for p, spec in zip(pngs, figures, strict=True)
    ]
    paths.insert(0, write_markdown(out_dir / REPORT_MD, groups, meta, embedded))
    paths.insert(1, write_html(out_dir / REPORT_HTML, groups, meta, figures))
    if figure_error is not None:
        # Said loudly but not raised: the tables and summaries are already written.
        import warnings

        warnings.warn(
            f"sopkit: the report's figures could not be drawn: {figure_error!r}", stacklevel=2
        )
    return paths + pngs
