"""The types plugins implement against: what a hook reads about a run (``RunContext``) and what a
training produces (``TrainResult``, ``EpochRecord``), plus ``TrainConfig`` (from ``config``).

This module imports neither the loop nor the ``Strategy`` class, not even for type checking, so that
both can import it and nothing cycles; every annotation names an object importable here at run time,
so ``typing.get_type_hints`` resolves them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from sopkit.data.splits import DataSplits
from sopkit.training.config import TrainConfig

__all__ = ["EpochRecord", "RunContext", "TrainConfig", "TrainResult"]


@dataclass
class EpochRecord:
    """One point of a learning curve."""

    epoch: int
    step: int
    train_loss: float
    val_accuracy: float
    test_accuracy: float
    seconds: float  # wall time since the run started


@dataclass
class TrainResult:
    """What one training produced; ``to_record()`` is what gets stored."""

    strategy: str
    seed: int
    config: TrainConfig
    test_accuracy: float
    val_accuracy: float
    train_params: int
    inference_params: int
    step_times: list[float]
    wall_time: float
    curve: list[EpochRecord] = field(default_factory=list)
    diverged_at_step: int | None = None
    #: What the strategy reports about its run (``Strategy.report``), e.g. the MK sampler used.
    extra: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False, compare=False)  # the deployable

    @property
    def median_step_time(self) -> float:
        return statistics.median(self.step_times) if self.step_times else math.nan

    def step_time_stats(self) -> dict[str, float | int]:
        """Median, mean, 10th/90th percentile and count of the timed steps (warm-up excluded)."""
        times = sorted(self.step_times)
        if not times:
            return {"count": 0}

        def percentile(q: float) -> float:
            return times[min(len(times) - 1, int(q * len(times)))]

        return {"count": len(times), "median": self.median_step_time,
                "mean": statistics.fmean(times), "p10": percentile(0.1), "p90": percentile(0.9)}

    def to_record(self) -> dict[str, Any]:
        """What is stored of a training: everything but the model, with step times summarised
        (a grid has hundreds of trials of thousands of steps each)."""
        record = asdict(replace(self, model=None, step_times=[]))
        record.pop("model")
        record.pop("step_times")
        record["median_step_time"] = self.median_step_time
        record["step_time_stats"] = self.step_time_stats()
        return record


@dataclass
class RunContext:
    """What hooks may read about the run in progress; the loop creates one per run.

    ``state`` is the strategy's own per-run state (e.g. adv-mk's running sum of ``u``): a strategy
    keeps what a run needs there, never on ``self``, so one instance can train any number of runs.
    ``required`` holds the results of the trainings the strategy declared in ``requires`` (e.g.
    distill's teacher members), by the names it gave them.
    """

    seed: int
    config: TrainConfig
    device: torch.device
    data: DataSplits
    generator: torch.Generator  # for a strategy's own randomness, seeded from the run's seed
    steps_per_epoch: int
    epoch: int = 0
    step: int = 0
    optimizer: torch.optim.Optimizer | None = None
    required: Mapping[str, TrainResult] = field(default_factory=dict)
    state: SimpleNamespace = field(default_factory=SimpleNamespace)
    #: Builds the plain model as the comparison does (the loop seeds torch first): a strategy that
    #: must start from another seed's initial weights (a model soup's members) builds them with it.
    build_model: Callable[[], nn.Module] | None = None

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs
