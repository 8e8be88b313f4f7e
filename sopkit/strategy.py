"""PERMANENT compatibility alias: the ``Strategy`` API under its first-round path.

Third-party plugins import ``from sopkit.strategy import Strategy, StrategySettings``; this module
re-exports the public names of :mod:`sopkit.training.strategy` (where the hooks and their call order
are documented) and is kept for them.
"""

from __future__ import annotations

from sopkit.training.settings import StrategySettings
from sopkit.training.strategy import Requirement, Session, Strategy

__all__ = ["Requirement", "Session", "Strategy", "StrategySettings"]
