"""PERMANENT compatibility alias: the training loop and its types under their first-round path.

Third-party plugins import ``from sopkit.train import RunContext, TrainResult`` (and the loop's other
public names); this module re-exports them from :mod:`sopkit.training` and is kept for them. New
code imports from ``sopkit.training.*`` (or the top-level ``sopkit``).
"""

from __future__ import annotations

from sopkit.training.config import DEFAULT_LR, OPTIMIZERS, SCHEDULES, TrainConfig
from sopkit.training.device import seed_everything, select_device
from sopkit.training.loop import TrainingSession, TrainingState, evaluate
from sopkit.training.optim import make_optimizer, make_schedule
from sopkit.training.timing import StepTimer
from sopkit.training.types import EpochRecord, RunContext, TrainResult

__all__ = [
    "DEFAULT_LR",
    "OPTIMIZERS",
    "SCHEDULES",
    "EpochRecord",
    "RunContext",
    "StepTimer",
    "TrainConfig",
    "TrainResult",
    "TrainingSession",
    "TrainingState",
    "evaluate",
    "make_optimizer",
    "make_schedule",
    "seed_everything",
    "select_device",
]
