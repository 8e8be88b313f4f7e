"""Keeping what was trained: every trial's deployable model saved beside its record
(:mod:`~sopkit.deploy.layout`, :mod:`~sopkit.deploy.artifacts`), loaded back as a plain module
(:func:`load_trained`), and exported for shipping by ``sopkit export`` (:mod:`~sopkit.deploy.export`).

Attributes load lazily: ``sopkit report`` reads where the models are without importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AveragedEnsemble": "sopkit.deploy.artifacts",
    "load_trained": "sopkit.deploy.artifacts",
    "saved_models": "sopkit.deploy.layout",
    "export_trained": "sopkit.deploy.export",
}

__all__ = ["AveragedEnsemble", "export_trained", "load_trained", "saved_models"]

if TYPE_CHECKING:
    from sopkit.deploy.artifacts import AveragedEnsemble, load_trained
    from sopkit.deploy.export import export_trained
    from sopkit.deploy.layout import saved_models


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sopkit.deploy' has no attribute {name!r}")
