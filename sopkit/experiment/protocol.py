"""The protocol stages after a comparison's grid: edge extension and confirmation seeds.

A rate chosen at the end of the grid may not be the best one: a better one can lie past it. With
``ComparePlan.extend_grid`` > 0, every strategy whose choice sits at an edge of the rates it tried
is trained (all search seeds) at the next rate past that edge, one step at a time, until its choice
is interior or ``extend_grid`` rates were added on that side. The next rate continues the grid:
``base * 1.5^i`` for the next exponent ``i`` of a paper grid, the ratio of the two outermost rates
for a list of rates.

Choosing a rate and reporting test accuracy on the same seeds is biased upwards. With
``ComparePlan.confirm_seeds`` > 0, every strategy is then trained on fresh seeds at its chosen
rate, and the reports' numbers come from those (``aggregate(..., confirm_seeds=...)``).

Both stages are more jobs computed from the stored results, never stored state of their own: the
same command on the same store computes the same jobs, so a rerun resumes the stages too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sopkit.experiment.plan import PAPER_LR_BASE, ComparePlan, Job
from sopkit.experiment.results import Group, StrategyResult

#: Why a strategy's extension stopped (the reports show it).
STOP_INTERIOR = "the choice is interior"
STOP_LIMIT = "the limit of --extend-grid was reached"
STOP_NO_RATE = "the next rate is not a usable number"


@dataclass
class Extension:
    """What the edge extension did for one strategy in one group, for the reports."""

    group: str  # the group's title
    strategy: str
    side: str  # "low" / "high"
    added: list[float] = field(default_factory=list)
    stopped: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def text(self) -> str:
        rates = ", ".join(f"{rate:.4g}" for rate in self.added) or "none"
        direction = "down" if self.side == "low" else "up"
        return (
            f"{self.strategy} on {self.group}: grid extended {direction} by {rates}; "
            f"stopped: {self.stopped}."
        )


def extension_texts(records: Any) -> list[str]:
    """The stored extensions (``Extension.as_dict``) in words; an entry that is not one (a plan
    written by hand or by another version) is left out rather than failing the report."""
    texts = []
    for record in records if isinstance(records, list) else []:
        try:
            texts.append(Extension(**record).text())
        except (TypeError, ValueError, KeyError):
            continue
    return texts


def next_rate(plan: ComparePlan, optimizer: str, rates: Sequence[float], side: str) -> float | None:
    """The rate one step past ``side`` of ``rates`` (sorted, two or more), continuing the plan's
    grid; None when it is not a positive finite number."""
    low, high = rates[0], rates[-1]
    grid = plan.lr_grid or ()
    try:
        if grid and all(isinstance(v, int) for v in grid):
            base = PAPER_LR_BASE[optimizer]
            # The exponent of the edge rate; recomputed as base * 1.5**i exactly as jobs() does,
            # so the rate (and the trial key) is the same on every rerun.
            edge = low if side == "low" else high
            exponent = round(math.log(edge / base, 1.5)) + (-1 if side == "low" else 1)
            rate = base * 1.5**exponent
        elif side == "low":
            rate = low / (rates[1] / low)
        else:
            rate = high * (high / rates[-2])
    except (OverflowError, ZeroDivisionError, ValueError):
        return None
    return rate if math.isfinite(rate) and rate > 0 and rate not in rates else None


def _base_rates(plan: ComparePlan, optimizer: str) -> list[float]:
    """The grid's own rates (as trials store them)."""
    return sorted(
        plan.train_config(optimizer, lr).learning_rate for lr in plan.learning_rates(optimizer)
    )


def _steps(result: StrategyResult, base: Sequence[float], side: str) -> int:
    """How many rates past the grid's ``side`` the strategy was trained at already."""
    if side == "low":
        return sum(rate < base[0] for rate in result.rates_tried)
    return sum(rate > base[-1] for rate in result.rates_tried)


def _model_of(plan: ComparePlan, group: Group) -> str | None:
    return group.model if group.model in plan.models else None


def extension_step(
    plan: ComparePlan, groups: Sequence[Group], log: dict[tuple[str, str], Extension]
) -> list[Job]:
    """The jobs of one extension step: for every strategy at an edge, its search seeds at the next
    rate past it. Updates ``log`` (what was extended and why it stopped)."""
    jobs: list[Job] = []
    for group in groups:
        model = _model_of(plan, group)
        if model is None or group.optimizer not in plan.optimizers:
            continue
        base = _base_rates(plan, group.optimizer)
        if len(base) < 2:
            continue
        for result in group.strategies:
            key = (group.title, result.strategy)
            entry = log.get(key)
            side = result.edge
            added = [r for r in result.rates_tried if r < base[0] or r > base[-1]]
            if side is None and entry is None and not added:
                continue
            if entry is None:  # on a rerun, the stored extension shows up interior at once
                past = side or ("high" if any(r > base[-1] for r in added) else "low")
                entry = log[key] = Extension(group.title, result.strategy, past)
            entry.added = added
            if side is None:
                entry.stopped = entry.stopped or STOP_INTERIOR
                continue
            if _steps(result, base, side) >= plan.extend_grid:
                entry.stopped = STOP_LIMIT
                continue
            rate = next_rate(plan, group.optimizer, result.rates_tried, side)
            if rate is None:
                entry.stopped = STOP_NO_RATE
                continue
            entry.stopped = ""
            jobs += [
                plan.job(model, group.optimizer, seed, rate, [result.strategy])
                for seed in plan.seeds
            ]
    return jobs


def confirmation_jobs(plan: ComparePlan, groups: Sequence[Group]) -> list[Job]:
    """Every strategy's confirmation seeds at its chosen rate; strategies sharing a rate share a
    job (an ensemble and a distilled student share their members)."""
    cells: dict[tuple[str, str, int, float], list[str]] = {}
    for group in groups:
        model = _model_of(plan, group)
        if model is None or group.optimizer not in plan.optimizers:
            continue
        for result in group.strategies:
            if result.chosen_lr is None or result.strategy not in plan.strategies:
                continue
            for seed in plan.confirmation_seeds:
                cell = (model, group.optimizer, seed, result.chosen_lr)
                cells.setdefault(cell, []).append(result.strategy)
    return [plan.job(m, o, seed, lr, names) for (m, o, seed, lr), names in cells.items()]


@dataclass
class ProtocolRun:
    """What the stages added: every trial key they planned and the extensions made."""

    keys: list[str] = field(default_factory=list)
    extensions: list[Extension] = field(default_factory=list)


def run_stages(
    plan: ComparePlan,
    groups_of: Callable[[set[str]], list[Group]],
    run_jobs: Callable[[list[Job], str], None],
    base_keys: set[str],
) -> ProtocolRun:
    """Run the plan's extension and confirmation stages after its grid.

    ``groups_of(keys)`` aggregates the stored trials with those keys (confirmation seeds apart);
    ``run_jobs(jobs, stage)`` trains the unfinished trials of ``jobs`` (``stage`` says why, in
    words, for the progress output).
    """
    keys = set(base_keys)
    planned: list[str] = []
    log: dict[tuple[str, str], Extension] = {}

    def add(jobs: list[Job], stage: str) -> None:
        new = [s.key for job in jobs for s in job.specs if s.key not in keys]
        keys.update(new)
        planned.extend(new)
        run_jobs(jobs, stage)

    if plan.extend_grid and plan.lr_grid is not None:
        # Each step adds at most one rate per strategy and side; the limit bounds the loop.
        for _ in range(2 * plan.extend_grid + 1):
            jobs = extension_step(plan, groups_of(keys), log)
            if not jobs:
                break
            rates = sorted({job.lr for job in jobs if job.lr is not None})
            add(jobs, "Extending the grid past its edge: " + ", ".join(f"{r:.4g}" for r in rates))
    if plan.confirm_seeds:
        seeds = plan.confirmation_seeds
        add(
            confirmation_jobs(plan, groups_of(keys)), f"Confirming on seeds {seeds[0]}..{seeds[-1]}"
        )
    extensions = [e for e in log.values() if e.added or e.stopped != STOP_INTERIOR]
    return ProtocolRun(planned, extensions)
