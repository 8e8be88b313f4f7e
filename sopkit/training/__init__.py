"""Training: the one loop every strategy shares, the ``Strategy`` API, the types plugins implement
against, and progress output.

Where things are:

* ``loop``: ``TrainingSession`` (runs trainings, reuses finished ones) and ``TrainingState`` (one
  training in progress; its ``step`` is the body of the loop), ``evaluate``.
* ``strategy``: ``Strategy``, the hooks a training method answers, in the order the loop calls them;
  ``settings``: ``StrategySettings``, its ``--set`` options.
* ``types``: ``RunContext``, ``TrainResult``, ``EpochRecord``; ``config``: ``TrainConfig``.
* ``optim`` (optimizer, schedule), ``timing`` (``StepTimer``), ``device`` (device, seeding, autocast),
  ``progress`` (live display or plain lines).

Attributes load lazily, so importing ``sopkit.training.config`` or ``.progress`` does not import
torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "TrainConfig": "sopkit.training.config",
    "StrategySettings": "sopkit.training.settings",
    "EpochRecord": "sopkit.training.types",
    "RunContext": "sopkit.training.types",
    "TrainResult": "sopkit.training.types",
    "Requirement": "sopkit.training.strategy",
    "Strategy": "sopkit.training.strategy",
    "TrainingSession": "sopkit.training.loop",
    "TrainingState": "sopkit.training.loop",
    "evaluate": "sopkit.training.loop",
}

__all__ = [
    "EpochRecord",
    "Requirement",
    "RunContext",
    "Strategy",
    "StrategySettings",
    "TrainConfig",
    "TrainResult",
    "TrainingSession",
    "TrainingState",
    "evaluate",
]

if TYPE_CHECKING:
    from sopkit.training.config import TrainConfig
    from sopkit.training.loop import TrainingSession, TrainingState, evaluate
    from sopkit.training.settings import StrategySettings
    from sopkit.training.strategy import Requirement, Strategy
    from sopkit.training.types import EpochRecord, RunContext, TrainResult


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sopkit.training' has no attribute {name!r}")
