"""Majority kernels (paper Algorithm 4.1): train the expanded model, ship the collapsed one."""

from __future__ import annotations

from typing import Any

from torch import nn

from sopkit.errors import UserError
from sopkit.mk import (
    DEFAULT_INIT,
    INIT_MODES,
    SAMPLERS,
    collapse,
    derive_seed,
    expand,
    find_majority,
)
from sopkit.training.settings import StrategySettings
from sopkit.training.strategy import Strategy
from sopkit.training.types import RunContext

#: The tag that derives the seed ``expand`` gets (copies and mixing stream) from the run's seed.
MK_SEED_TAG = "sopkit.strategies.mk"


def pretrained(model: nn.Module) -> bool:
    """Whether ``model`` comes pretrained (it says so with ``sopkit_pretrained = True``, as
    ``sopkit.models.hf`` models do); MK then starts every copy at the pretrained weight."""
    return bool(getattr(model, "sopkit_pretrained", False))


class MajorityKernelsStrategy(Strategy):
    """Every weight is a Dirichlet-weighted average of ``e`` copies while training, their mean after.

    Options: ``init`` (variance-preserving (default), independent, replicate; replicate by default
    for a pretrained model, one that sets ``sopkit_pretrained = True``, so the expanded model starts
    as the checkpoint: the paper's upcycling) and ``sampler`` (how
    ``p`` is drawn, see ``sopkit.mk.SAMPLERS``; ``auto`` by default). Samplers draw the same
    distribution from different bits, so a result records the one it used (``extra["mk_sampler"]``).
    """

    description = "Majority kernels: e stochastically weighted copies per weight, collapsed to one."

    def __init__(self, settings: StrategySettings | None = None) -> None:
        super().__init__(settings)
        # None: chosen per model in prepare (replicate for a pretrained one).
        self.init: str | None = self.settings.get("init", None, str, choices=INIT_MODES)
        self.sampler = self.settings.get("sampler", "auto", choices=SAMPLERS)

    def prepare(self, model: nn.Module, run: RunContext) -> nn.Module:
        # The copies and the mixing stream come from the run's seed (hashed with a tag, so not the
        # number the loop seeds torch with): what else consumes torch's generator cannot change
        # them, and every data-parallel rank of a trial draws the same p.
        seed = derive_seed(run.seed, MK_SEED_TAG)
        init = self.init or ("replicate" if pretrained(model) else DEFAULT_INIT)
        expanded = expand(model, self.expansion, init=init, seed=seed, inplace=True)
        holder = find_majority(expanded)
        assert holder is not None
        holder.sampler = self.sampler
        try:
            holder.resolved_sampler()  # a sampler this device cannot run is the user's to fix
        except ValueError as error:
            raise UserError(f"Option {self.name}.sampler={self.sampler}: {error}.") from None
        return expanded

    def deployable(self, model: nn.Module, run: RunContext) -> nn.Module:
        return collapse(model)

    def report(self, model: nn.Module, run: RunContext) -> dict[str, Any]:
        """The sampler the run's training mixings were drawn with (``extra["mk_sampler"]``)."""
        holder = find_majority(model)
        if holder is None or holder.last_sampler is None:
            return {}
        return {"mk_sampler": holder.last_sampler}
