"""Majority kernels (paper Algorithm 4.1): train the expanded model, ship the collapsed one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sopkit.majority import DEFAULT_INIT, INIT_MODES, collapse, expand
from sopkit.strategy import Strategy, StrategySettings

if TYPE_CHECKING:
    from torch import nn

    from sopkit.train import RunContext


class MajorityKernelsStrategy(Strategy):
    """Every weight is a Dirichlet-weighted average of ``e`` copies while training, their mean after.

    Options: ``init`` (variance-preserving (default), independent, replicate).
    """

    description = "Majority kernels: e stochastically weighted copies per weight, collapsed to one."

    def __init__(self, settings: StrategySettings | None = None) -> None:
        super().__init__(settings)
        self.init = self.settings.get("init", DEFAULT_INIT, choices=INIT_MODES)

    def prepare(self, model: nn.Module, run: RunContext) -> nn.Module:
        return expand(model, self.expansion, init=self.init, inplace=True)

    def deployable(self, model: nn.Module, run: RunContext) -> nn.Module:
        return collapse(model)
