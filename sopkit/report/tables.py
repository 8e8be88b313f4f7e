"""The tables of every sopkit report, built once as renderer-neutral :class:`Table` objects.

A :class:`Table` is rendered for the terminal (:mod:`sopkit.report.terminal`), Markdown
(:mod:`sopkit.report.markdown`) and HTML (:mod:`sopkit.report.html`), so the three can never
disagree. ``sopkit bench`` builds its tables from the same :class:`Table` and :class:`Cell`. The
builders here are the comparison's: the per-group table, the learning-rate sweep, paper Table 1's
layout, the paired differences, the diverged and the failed trials and what was run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sopkit.experiment.results import REFERENCE_STRATEGY, paired_difference
from sopkit.report.colours import strategy_colour
from sopkit.report.edges import chosen_lr_text, edge_hint, edge_notes, expected_rates, seed_notes
from sopkit.report.format import (
    OPTIMIZER_ORDER,
    architecture,
    describe_lr_grid,
    format_accuracy,
    format_duration,
    format_lr,
    format_params,
    format_pp,
    format_ratio,
    format_step_time,
    optimizer_name,
    seed_list,
)
from sopkit.task_metrics import metric_label

if TYPE_CHECKING:
    from sopkit.experiment.results import Group, PairedDifference, StrategyResult

INCOMPLETE_WARNING = (
    "Incomplete comparison: not every planned trial has finished. The numbers come from the trials "
    "that did; missing rates or seeds can still change the chosen learning rates and every mean."
)


@dataclass
class Cell:
    """One table cell: its text, a style name, an optional hover hint and a colour swatch.

    Styles: "good"/"bad" (a significant difference), "diverged", "muted", "strong", "warn".
    """

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
    # Columns whose values may wrap on a terminal; every other keeps each value on one line
    # ("+3.35 [+2.16, +4.53]" split over two lines is hard to read) and its header wraps instead.
    wraps: tuple[str, ...] = ()


# ---- cells --------------------------------------------------------------------------------------


def teacher_wall_time(result: StrategyResult) -> float | None:
    """The teacher's training time summed over seeds, like ``wall_time`` (``extra`` holds means)."""
    mean = result.extra.get("teacher_wall_time")
    if mean is None or not math.isfinite(mean):
        return None
    return mean * len(result.seeds)


def group_seeds(group: Group) -> list[int]:
    """Every seed any strategy of the group searched with (or reports), diverged and failed trials
    included; confirmation seeds apart when the group was confirmed."""
    seeds = {s for r in group.strategies for s in (r.search_seeds or r.seeds)}
    seeds |= {d["seed"] for r in group.strategies for d in (*r.diverged, *r.failed)}
    return sorted(seeds)


def diverged_text(diverged: Mapping[str, Any]) -> str:
    """One diverged trial in words: where, with which rate and seed."""
    step = diverged.get("step")
    return (
        f"diverged at step {step} (lr={format_lr(diverged.get('lr'))}, seed={diverged.get('seed')})"
    )


def failed_text(failed: Mapping[str, Any]) -> str:
    """One failed trial in words: with which rate and seed, and its error's first line."""
    return (
        f"failed (lr={format_lr(failed.get('lr'))}, seed={failed.get('seed')}): "
        f"{failed.get('error') or 'no error recorded'}"
    )


FAILED_NOTE = (
    "A failed trial raised an error: it has no numbers, and the numbers shown come from the trials "
    "that finished. Run the same command again to retry it; its traceback is in trials.jsonl."
)


def _strategy_cell(name: str) -> Cell:
    return Cell(name, "strong", swatch=strategy_colour(name))


def _accuracy_cell(result: StrategyResult | None) -> Cell:
    if result is None:
        return Cell("—", "muted", "not run")
    if result.chosen_lr is None:
        if result.failed and not result.diverged:
            return Cell("failed", "diverged", "every trial failed: " + result.failed[0]["error"])
        if result.failed:
            return Cell("no result", "diverged", "every learning rate diverged or failed")
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
        return Cell(f"{format_pp(paired.mean)} (1 pair, no CI)", "muted")
    text = f"{format_pp(paired.mean)} [{format_pp(paired.low)}, {format_pp(paired.high)}]"
    hint = f"mean of {paired.pairs} per-seed differences, 95% t-interval"
    if paired.significant:
        return Cell(text + " *", "good" if paired.mean > 0 else "bad", hint + "; excludes 0")
    return Cell(text, hint=hint)


def _trials_cell(result: StrategyResult) -> Cell:
    if not result.diverged and not result.failed:
        return Cell(str(result.trials))
    counts = [f"{len(result.diverged)} diverged"] if result.diverged else []
    counts += [f"{len(result.failed)} failed"] if result.failed else []
    return Cell(
        f"{result.trials} ({', '.join(counts)})",
        "diverged",
        "; ".join(
            [diverged_text(d) for d in result.diverged] + [failed_text(f) for f in result.failed]
        ),
    )


def _wall_cell(result: StrategyResult) -> Cell:
    teacher = teacher_wall_time(result)
    if teacher is None:
        return Cell(format_duration(result.wall_time))
    # Distillation's cost is the student's training plus the teacher's: shown apart, never hidden.
    return Cell(
        f"{format_duration(result.wall_time)} + {format_duration(teacher)} teacher",
        hint="student training + the teacher's (ensemble members') training, over all seeds",
    )


def config_text(group: Group) -> str:
    """The training configuration a group shares, in a few words."""
    train = group.train
    parts = [f"e = {group.expansion}"]
    if "epochs" in train:
        parts.append(f"{train['epochs']} epochs")
    if "batch_size" in train:
        parts.append(f"batch {train['batch_size']}")
    if train.get("schedule"):
        parts.append(f"{train['schedule']} schedule")
    if train.get("milestones"):  # the recipe, where it is not the default
        drops = ",".join(map(str, train["milestones"]))
        parts.append(f"x{train.get('lr_decay', 0.1):g} at epochs {drops}")
    if train.get("lr_warmup_epochs"):
        warmup = train["lr_warmup_epochs"]
        parts.append(f"warm-up {warmup} epoch{'s' if warmup != 1 else ''}")
    if train.get("label_smoothing"):
        parts.append(f"label smoothing {train['label_smoothing']:g}")
    if train.get("weight_decay"):
        parts.append(f"weight decay {train['weight_decay']}")
    if train.get("bf16"):
        parts.append("bf16")
    return ", ".join(parts)


# ---- tables -------------------------------------------------------------------------------------


def group_table(group: Group) -> Table:
    """Every strategy of one group with its accuracy, cost and the difference against baseline."""
    columns = [
        ("strategy", "left"),
        (f"test {metric_label(group.dataset)} (%)", "right"),  # the data set's metric
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
            Cell(
                chosen_lr_text(r),
                "diverged" if r.chosen_lr is None else "warn" if r.edge else "",
                edge_hint(r),
            ),
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
    notes += seed_notes(group) + edge_notes([group])
    return Table(
        f"{group.title} ({config_text(group)})",
        columns,
        rows,
        notes,
        wraps=("wall time, all seeds", "median step"),
    )


def lr_sweep_table(group: Group) -> Table:
    """Mean validation accuracy per learning rate: how each rate was chosen (the chosen one bold)."""
    columns = [("strategy", "left")] + [(f"lr {format_lr(lr)}", "right") for lr in group.lr_grid]
    rows = []
    for result in group.strategies:
        row = [_strategy_cell(result.strategy)]
        for lr in group.lr_grid:
            failed = sum(f.get("lr") == lr for f in result.failed)
            if lr not in result.lr_scores:
                if failed:
                    row.append(Cell("failed", "diverged", f"{failed} trials failed, none finished"))
                else:
                    row.append(Cell("—", "muted", "not run at this rate"))
                continue
            score = result.lr_scores[lr]
            if failed and score is not None:
                hint = f"mean of the seeds that finished: {failed} failed"
                row.append(Cell(f"{score * 100:.2f} ({failed} failed)", "warn", hint))
                continue
            if score is None:
                row.append(Cell("diverged", "diverged", "a seed diverged: never chosen"))
            elif lr == result.chosen_lr:
                hint = edge_hint(result) or "chosen"
                row.append(Cell(f"{score * 100:.2f}", "strong", hint))
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
            metric = metric_label(members[0].dataset)  # e.g. Matthews corr. for glue:cola
            columns += [(f"{name} test {metric} (%)", "right"), (f"{name} lr", "right")]
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
            shown_architecture = architecture(model) or "—"
            for strategy in strategies:
                found = {
                    o: next((r for r in g.strategies if r.strategy == strategy), None)
                    for o, g in by_optimizer.items()
                }
                present = {o: r for o, r in found.items() if r is not None}
                row = [Cell(model), Cell(shown_architecture), _strategy_cell(strategy)]
                for optimizer in optimizers:
                    result = present.get(optimizer)
                    row.append(_accuracy_cell(result))
                    row.append(
                        Cell(chosen_lr_text(result), hint=edge_hint(result))
                        if result is not None
                        else Cell("—", "muted")
                    )
                # One decimal: the optimizers' ratios differ only by timing noise in the second.
                ratios = {o: format_ratio(r.step_time_ratio, 1) for o, r in present.items()}
                train = {o: format_params(r.train_params) for o, r in present.items()}
                inference = {o: format_params(r.inference_params) for o, r in present.items()}
                row += [Cell(_joined(ratios)), Cell(_joined(train)), Cell(_joined(inference))]
                rows.append(row)
        first = members[0]
        title = f"{first.dataset}: {config_text(first)}"
        notes = [
            "Test accuracy (%) at the learning rate chosen on validation accuracy, mean ± std over "
            "seeds (paper Section 5.1, Table 1)."
        ]
        notes += edge_notes(members)
        notes += next((n for g in members if (n := seed_notes(g))), [])
        tables.append(Table(title, columns, rows, notes))
    return tables


_PAIRED_COLUMNS = [
    ("Δ test accuracy (pp)", "right"),
    ("95% CI (pp)", "right"),
    ("pairs", "right"),
    ("CI excludes 0", "left"),
]


def _paired_cells(paired: PairedDifference | None, missing: str) -> list[Cell]:
    """The mean, interval, pair count and verdict cells of one paired difference; ``missing``
    says why there is none."""
    if paired is None:
        return [Cell("n/a", "muted"), Cell("n/a", "muted"), Cell("0"), Cell(missing, "muted")]
    has_ci = paired.low is not None and paired.high is not None
    ci = (
        f"[{format_pp(paired.low)}, {format_pp(paired.high)}]"  # type: ignore[arg-type]
        if has_ci
        else "n/a (1 pair)"
    )
    if paired.significant:
        verdict = Cell(
            "yes, better *" if paired.mean > 0 else "yes, worse *",
            "good" if paired.mean > 0 else "bad",
        )
    else:
        verdict = Cell("no" if has_ci else "n/a", "muted")
    style = verdict.style if paired.significant else ""
    return [Cell(format_pp(paired.mean), style), Cell(ci, style), Cell(str(paired.pairs)), verdict]


def paired_table(groups: Sequence[Group]) -> Table:
    """Every strategy's paired difference against baseline (same seeds), across all groups."""
    columns = [("group", "left"), ("strategy", "left"), *_PAIRED_COLUMNS]
    rows = [
        [
            Cell(group.title),
            _strategy_cell(result.strategy),
            *_paired_cells(result.paired, "no baseline pair"),
        ]
        for group in groups
        for result in group.strategies
        if result.strategy != REFERENCE_STRATEGY
    ]
    notes = [
        "Strategy minus baseline test accuracy on the seeds both ran, each at its own chosen rate; "
        "mean and 95% t-interval over seeds. * marks an interval that excludes 0 (each comparison "
        "on its own: no correction for making several)."
    ]
    return Table("Paired differences against baseline", columns, rows, notes)


#: The strategy the controls are there to explain (``mk_against_table``).
MAJORITY_KERNELS = "mk"


def mk_against_table(groups: Sequence[Group]) -> Table:
    """Majority kernels minus every other strategy of its group, paired on the seeds both ran:
    what the controls (a wider model, weight noise, SAM, weight averaging) are for is whether MK
    beats them, which the differences against the baseline cannot say. No rows when no group has
    MK and another strategy."""
    columns = [("group", "left"), ("mk minus", "left"), *_PAIRED_COLUMNS]
    rows = []
    for group in groups:
        mk = next((r for r in group.strategies if r.strategy == MAJORITY_KERNELS), None)
        if mk is None:
            continue
        mine = dict(zip(mk.seeds, mk.test_accuracies, strict=True))
        for other in group.strategies:
            if other is mk:
                continue
            theirs = dict(zip(other.seeds, other.test_accuracies, strict=True))
            rows.append(
                [
                    Cell(group.title),
                    _strategy_cell(other.strategy),
                    *_paired_cells(paired_difference(mine, theirs), "no shared seed"),
                ]
            )
    notes = [
        "MK minus the named strategy's test accuracy on the seeds both ran, each at its own chosen "
        "rate: positive means MK was better. Mean and 95% t-interval over seeds; * marks an "
        "interval that excludes 0 (no correction for making several comparisons)."
    ]
    return Table("Majority kernels against each strategy", columns, rows, notes)


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


def failed_table(groups: Sequence[Group]) -> Table:
    """Every failed trial: where, with which rate and seed, and its error's first line."""
    columns = [
        ("group", "left"),
        ("strategy", "left"),
        ("lr", "right"),
        ("seed", "right"),
        ("error", "left"),
    ]
    rows = [
        [
            Cell(group.title),
            _strategy_cell(result.strategy),
            Cell(format_lr(f.get("lr"))),
            Cell(str(f.get("seed"))),
            Cell(str(f.get("error") or "no error recorded"), "diverged"),
        ]
        for group in groups
        for result in group.strategies
        for f in result.failed
    ]
    return Table("Failed trials", columns, rows, [FAILED_NOTE] if rows else [], wraps=("error",))


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
            Cell(seed_list(group_seeds(g))),
            Cell(str(g.train.get("epochs", "?"))),
            Cell(str(g.train.get("batch_size", "?"))),
            Cell(str(g.train.get("schedule", "?"))),
            Cell(str(sum(r.trials for r in g.strategies))),
        ]
        for g in groups
    ]
    return Table("What was run", columns, rows)


def strategies_table(groups: Sequence[Group]) -> Table:
    """What each strategy in the report is, in its own words (its registered ``description``), and
    which distribution registers it here: a reader of a report with controls beside the paper's
    strategies needs both. Looked up where the report is written; a strategy not registered there
    says so rather than failing the report."""
    from sopkit.registry import discover

    registered = discover()
    names = list(dict.fromkeys(r.strategy for g in groups for r in g.strategies))
    rows = []
    for name in names:
        entry = registered.get(name)
        if entry is None:
            what, source = "(not registered where this report was written)", ""
        else:
            what = entry.describe()
            source = f"{entry.distribution} {entry.version}".strip()
        rows.append([_strategy_cell(name), Cell(what), Cell(source, "muted")])
    columns = [("strategy", "left"), ("what it is", "left"), ("registered by", "left")]
    return Table("Strategies", columns, rows, wraps=("what it is",))


def coverage_warnings(groups: Sequence[Group]) -> list[str]:
    """Strategies missing trials (seeds × rates) that others in their group have: a result that
    can still change, or a protocol not followed."""
    warnings = []
    for group in groups:
        for result in group.strategies:
            rates = len(expected_rates(group, result))
            expected = rates * len(group_seeds(group))
            if result.trials < expected:
                warnings.append(
                    f"{result.strategy} on {group.title}: {result.trials} of {expected} trials "
                    f"({rates} rates × {len(group_seeds(group))} seeds)."
                )
    return warnings
