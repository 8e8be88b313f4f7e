"""sopkit: Simulated Overparameterization (majority kernels) for PyTorch.

Three lines for your own model::

    model = sopkit.expand(model, expansion=3)   # train this as usual
    ...
    small = sopkit.collapse(model)              # ship this: same classes, same parameter count

Attributes load lazily, so ``import sopkit`` (and ``sopkit --help``) does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "expand": "sopkit.mk",
    "collapse": "sopkit.mk",
    "fixed_mixing": "sopkit.mk",
    "count_parameters": "sopkit.mk",
    "Strategy": "sopkit.training.strategy",
    "StrategySettings": "sopkit.training.settings",
    "TrainConfig": "sopkit.training.config",
    "TrainingSession": "sopkit.training.loop",
    "RunContext": "sopkit.training.types",
    "TrainResult": "sopkit.training.types",
    "EpochRecord": "sopkit.training.types",
    "UserError": "sopkit.errors",
    "load_trained": "sopkit.deploy.artifacts",
}

__all__ = [
    "EpochRecord",
    "RunContext",
    "Strategy",
    "StrategySettings",
    "TrainConfig",
    "TrainResult",
    "TrainingSession",
    "UserError",
    "collapse",
    "count_parameters",
    "expand",
    "fixed_mixing",
    "load_trained",
]

if TYPE_CHECKING:
    from sopkit.deploy.artifacts import load_trained
    from sopkit.errors import UserError
    from sopkit.mk import collapse, count_parameters, expand, fixed_mixing
    from sopkit.training.config import TrainConfig
    from sopkit.training.loop import TrainingSession
    from sopkit.training.settings import StrategySettings
    from sopkit.training.strategy import Strategy
    from sopkit.training.types import EpochRecord, RunContext, TrainResult


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sopkit' has no attribute {name!r}")
