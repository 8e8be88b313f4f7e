"""From stored trials to the figures a report shows (paper Section 5.1 protocol).

Trials are grouped by everything that is not strategy, seed or learning rate (data set, model,
optimizer and the rest of the training configuration). In each group, every strategy's learning rate
is chosen by the mean VALIDATION accuracy over seeds; a rate at which any seed diverged is never
chosen. A failed trial (it raised) counts as one not run yet: it is listed with its error, and the
numbers come from the trials that finished. The test accuracy at the chosen rate is reported as
mean ± std over seeds, and against ``baseline`` on the same seeds as the mean paired difference
with a 95% t-interval.

Two protocol stages refine this (``sopkit.experiment.protocol``): a chosen rate at either end of the
rates a strategy tried is flagged (``StrategyResult.edge``), and with confirmation seeds the rate is
chosen on the search seeds only while every reported number comes from the confirmation seeds at
the chosen rate (choosing and reporting on the same seeds is biased upwards).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sopkit.experiment.records import TrialRecord

REFERENCE_STRATEGY = "baseline"  # what every paired difference and step-time ratio is against
CONFIDENCE = 0.95


@dataclass
class PairedDifference:
    """``strategy - baseline`` test accuracy over the seeds both have, with a t confidence interval."""

    mean: float
    low: float | None  # None with a single pair: no interval can be given
    high: float | None
    pairs: int

    @property
    def significant(self) -> bool:
        """Whether the interval excludes zero."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


@dataclass
class StrategyResult:
    """One strategy in one group, at its chosen learning rate."""

    strategy: str
    chosen_lr: float | None  # None when every rate diverged
    lr_scores: dict[float, float | None]  # mean validation accuracy per rate (None: diverged)
    seeds: list[int]
    test_accuracies: list[float]
    test_accuracy_mean: float
    test_accuracy_std: float
    val_accuracy_mean: float
    train_params: int
    inference_params: int
    median_step_time: float
    step_time_ratio: float | None
    wall_time: float  # summed over the seeds at the chosen rate
    curves: list[list[dict[str, Any]]]  # per seed at the chosen rate: the epoch records
    diverged: list[dict[str, Any]]  # every diverged trial: seed, lr, step
    # Every failed trial: seed, lr, error_type, error (its first line); a rerun retries them.
    failed: list[dict[str, Any]] = field(default_factory=list)
    paired: PairedDifference | None = None
    extra: dict[str, float] = field(default_factory=dict)
    trials: int = 0
    # Every rate the strategy was trained at on the search seeds (diverged and failed included).
    rates_tried: list[float] = field(default_factory=list)
    # "low" / "high": the chosen rate is the smallest / largest of two or more rates tried, so a
    # better one may lie beyond the grid; None: interior (or a single rate, or nothing chosen).
    edge: str | None = None
    search_seeds: list[int] = field(default_factory=list)  # the seeds the rate was chosen on
    confirmed: bool = False  # True: ``seeds`` and every number are the confirmation seeds'

    def as_dict(self) -> dict[str, Any]:
        record = {k: v for k, v in self.__dict__.items() if k not in ("paired", "curves")}
        record["lr_scores"] = {repr(lr): score for lr, score in self.lr_scores.items()}
        record["paired_difference"] = None if self.paired is None else self.paired.__dict__
        return record


@dataclass
class Group:
    """Every strategy trained on one data set, model, optimizer and configuration."""

    dataset: str
    model: str
    optimizer: str
    train: dict[str, Any]  # the configuration shared by the group, without the learning rate
    expansion: int
    strategies: list[StrategyResult]
    lr_grid: list[float]

    @property
    def title(self) -> str:
        return f"{self.dataset} / {self.model} / {self.optimizer}"


def t_quantile(probability: float, degrees_of_freedom: int) -> float:
    """Student's t quantile (scipy's when available; mnist1d already depends on scipy)."""
    from scipy import stats

    return float(stats.t.ppf(probability, degrees_of_freedom))


def paired_difference(
    values: Mapping[int, float], reference: Mapping[int, float]
) -> PairedDifference | None:
    """Mean of ``values[s] - reference[s]`` over shared seeds, with a 95% t-interval."""
    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return None
    differences = [values[s] - reference[s] for s in seeds]
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return PairedDifference(mean, None, None, 1)
    half_width = t_quantile(0.5 + CONFIDENCE / 2, len(differences) - 1) * (
        statistics.stdev(differences) / math.sqrt(len(differences))
    )
    return PairedDifference(mean, mean - half_width, mean + half_width, len(differences))


def _frozen(value: Any) -> Any:
    """A hashable stand-in for a JSON value (dicts by sorted items), equal where values are equal."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def _group_key(record: TrialRecord) -> Any:
    """Everything that identifies the trial but its strategy, seed and learning rate.

    The same identity as the trial key's, so a TrainConfig field added later at its default does not
    split a resumed comparison's old and new trials into two groups.
    """
    identity = record.spec.identity(strict=False)
    for name in ("strategy", "seed", "lr"):
        del identity[name]
    identity["train"].pop("lr", None)
    return _frozen(identity)


def _median(values: Iterable[float | None]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def edge_of(chosen: float | None, rates: Collection[float]) -> str | None:
    """"low" / "high" when ``chosen`` is the smallest / largest of two or more ``rates``."""
    if chosen is None or len(set(rates)) < 2:
        return None
    if chosen == min(rates):
        return "low"
    if chosen == max(rates):
        return "high"
    return None


def _summarise_strategy(
    name: str, every_trial: Sequence[TrialRecord], confirm_seeds: Collection[int] = ()
) -> StrategyResult:
    confirming = [t for t in every_trial if t.spec.seed in confirm_seeds]
    every_trial = [t for t in every_trial if t.spec.seed not in confirm_seeds] or every_trial
    failed = [t for t in every_trial if t.failed]
    trials = [t for t in every_trial if not t.failed]  # failed trials have no numbers
    by_lr: dict[float, list[TrialRecord]] = {}
    for trial in trials:
        by_lr.setdefault(trial.spec.lr, []).append(trial)
    scores: dict[float, float | None] = {}
    for lr, runs in sorted(by_lr.items()):
        if any(r.diverged for r in runs):
            scores[lr] = None
        else:
            scores[lr] = statistics.fmean(_number(r.val_accuracy) for r in runs)
    eligible = {lr: s for lr, s in scores.items() if s is not None}
    # Highest validation accuracy; ties go to the smaller rate (the more conservative choice).
    chosen = max(eligible, key=lambda lr: (eligible[lr], -lr)) if eligible else None
    at_chosen = sorted(by_lr[chosen] if chosen is not None else [], key=lambda r: r.spec.seed)
    search_seeds = sorted({t.spec.seed for t in every_trial})
    rates_tried = sorted({t.spec.lr for t in every_trial})
    if confirm_seeds:  # the numbers come from the confirmation seeds at the chosen rate only
        at_chosen = sorted(
            (t for t in confirming if not t.failed and t.spec.lr == chosen),
            key=lambda r: r.spec.seed,
        )
    accuracies = [_number(r.test_accuracy) for r in at_chosen]
    extra_keys = sorted(
        {k for r in at_chosen for k, v in r.extra.items() if isinstance(v, int | float)}
    )
    example = at_chosen[0] if at_chosen else (trials or every_trial)[0]
    return StrategyResult(
        strategy=name,
        chosen_lr=chosen,
        lr_scores=scores,
        seeds=[r.spec.seed for r in at_chosen],
        test_accuracies=accuracies,
        test_accuracy_mean=statistics.fmean(accuracies) if accuracies else math.nan,
        test_accuracy_std=statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        val_accuracy_mean=(
            statistics.fmean(_number(r.val_accuracy) for r in at_chosen) if at_chosen else math.nan
        ),
        train_params=example.train_params,
        inference_params=example.inference_params,
        # Step time does not depend on the rate: every trial of the strategy contributes its median.
        median_step_time=_median(r.median_step_time for r in trials),
        step_time_ratio=None,
        wall_time=sum(r.wall_time for r in at_chosen),
        curves=[[dict(point) for point in r.curve] for r in at_chosen],
        diverged=[
            {"seed": r.spec.seed, "lr": r.spec.lr, "step": r.diverged_at_step}
            for r in trials
            if r.diverged
        ],
        failed=[
            {
                "seed": r.spec.seed,
                "lr": r.spec.lr,
                "error_type": (r.failure or {}).get("error_type"),
                "error": r.error,
            }
            for r in sorted(failed, key=lambda r: (r.spec.lr, r.spec.seed))
        ],
        extra={
            k: statistics.fmean(r.extra[k] for r in at_chosen if k in r.extra) for k in extra_keys
        },
        trials=len(every_trial),
        rates_tried=rates_tried,
        edge=edge_of(chosen, rates_tried),
        search_seeds=search_seeds,
        confirmed=bool(confirm_seeds),
    )


def _number(value: float | None) -> float:
    """A stored accuracy: None (stored for NaN) reads as NaN again."""
    return math.nan if value is None else value


def aggregate(
    trials: Iterable[TrialRecord],
    strategy_order: Sequence[str] = (),
    confirm_seeds: Collection[int] = (),
) -> list[Group]:
    """Group stored trials (``TrialStore.trials()``) and summarise every strategy in every group.

    ``confirm_seeds``: the confirmation stage's seeds, never used to choose a rate; when given,
    every reported number comes from them at the chosen rate.
    """
    confirm_seeds = frozenset(confirm_seeds)
    groups: dict[Any, list[TrialRecord]] = {}
    for record in trials:
        groups.setdefault(_group_key(record), []).append(record)
    result = []
    for group_trials in groups.values():
        first = group_trials[0].spec
        by_strategy: dict[str, list[TrialRecord]] = {}
        for trial in group_trials:
            by_strategy.setdefault(trial.spec.strategy, []).append(trial)
        order = [s for s in strategy_order if s in by_strategy] + sorted(
            s for s in by_strategy if s not in strategy_order
        )
        summaries = [
            _summarise_strategy(name, by_strategy[name], confirm_seeds) for name in order
        ]
        reference = next((s for s in summaries if s.strategy == REFERENCE_STRATEGY), None)
        for summary in summaries:
            if reference is not None:
                if reference.median_step_time > 0:
                    summary.step_time_ratio = summary.median_step_time / reference.median_step_time
                if summary is not reference:
                    summary.paired = paired_difference(
                        dict(zip(summary.seeds, summary.test_accuracies, strict=True)),
                        dict(zip(reference.seeds, reference.test_accuracies, strict=True)),
                    )
        result.append(
            Group(
                dataset=first.dataset,
                model=first.model,
                optimizer=first.optimizer,
                train={k: v for k, v in first.train.items() if k != "lr"},
                expansion=first.expansion,
                strategies=summaries,
                lr_grid=sorted({r for s in summaries for r in s.rates_tried}),
            )
        )
    return result
