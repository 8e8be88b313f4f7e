"""Majority kernels (paper Algorithm 4.1): train the expanded model, ship the collapsed one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sopkit.errors import UserError
from sopkit.majority import DEFAULT_INIT, INIT_MODES, SAMPLERS, collapse, expand, find_majority
from sopkit.strategy import Strategy, StrategySettings

if TYPE_CHECKING:
    from torch import nn

    from sopkit.train import RunContext, TrainingSession, TrainResult


class MajorityKernelsStrategy(Strategy):
    """Every weight is a Dirichlet-weighted average of ``e`` copies while training, their mean after.

    Options: ``init`` (variance-preserving (default), independent, replicate) and ``sampler`` (how
    ``p`` is drawn, see ``sopkit.majority.SAMPLERS``; ``auto`` by default). Samplers draw the same
    distribution from different bits, so a result records the one it used (``extra["mk_sampler"]``).
    """

    description = "Majority kernels: e stochastically weighted copies per weight, collapsed to one."

    def __init__(self, settings: StrategySettings | None = None) -> None:
        super().__init__(settings)
        self.init = self.settings.get("init", DEFAULT_INIT, choices=INIT_MODES)
        self.sampler = self.settings.get("sampler", "auto", choices=SAMPLERS)
        self._sampler_used: str | None = None

    def fit(self, session: TrainingSession) -> TrainResult:
        self._sampler_used = None
        result = self._fit(session)
        if self._sampler_used is not None:
            result.extra.setdefault("mk_sampler", self._sampler_used)
        return result

    def _fit(self, session: TrainingSession) -> TrainResult:
        """The training proper (subclasses add to it); ``fit`` adds what every MK result records."""
        return session.train(self)

    def prepare(self, model: nn.Module, run: RunContext) -> nn.Module:
        expanded = expand(model, self.expansion, init=self.init, inplace=True)
        holder = find_majority(expanded)
        assert holder is not None
        holder.sampler = self.sampler
        try:
            holder.resolved_sampler()  # a sampler this device cannot run is the user's to fix
        except ValueError as error:
            raise UserError(f"Option {self.name}.sampler={self.sampler}: {error}.") from None
        return expanded

    def deployable(self, model: nn.Module, run: RunContext) -> nn.Module:
        holder = find_majority(model)
        if holder is not None:
            self._sampler_used = holder.last_sampler
        return collapse(model)
