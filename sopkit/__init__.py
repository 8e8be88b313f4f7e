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
    "expand": "sopkit.majority",
    "collapse": "sopkit.majority",
    "fixed_mixing": "sopkit.majority",
    "count_parameters": "sopkit.majority",
    "Strategy": "sopkit.strategy",
    "StrategySettings": "sopkit.strategy",
    "TrainConfig": "sopkit.train",
    "TrainingSession": "sopkit.train",
    "UserError": "sopkit.errors",
}

__all__ = [
    "Strategy",
    "StrategySettings",
    "TrainConfig",
    "TrainingSession",
    "UserError",
    "collapse",
    "count_parameters",
    "expand",
    "fixed_mixing",
]

if TYPE_CHECKING:
    from sopkit.errors import UserError
    from sopkit.majority import collapse, count_parameters, expand, fixed_mixing
    from sopkit.strategy import Strategy, StrategySettings
    from sopkit.train import TrainConfig, TrainingSession


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sopkit' has no attribute {name!r}")
