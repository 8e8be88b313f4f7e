"""sopkit's built-in strategies. They are registered through the ``sopkit.strategies`` entry points
in pyproject.toml, like any plugin's; importing this package registers nothing."""

from sopkit.strategies.baseline import Baseline, BaselineLong
from sopkit.strategies.majority import MajorityKernelsStrategy

__all__ = ["Baseline", "BaselineLong", "MajorityKernelsStrategy"]
