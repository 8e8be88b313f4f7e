"""EXPONENTIAL MOVING AVERAGE of the weights, shipped as the model: a control for the paper's
reading of majority kernels as an implicit regulariser whose shipped model is an average.

The plain model trains as the baseline does; after every optimizer step the average moves toward
it, ``ema = decay * ema + (1 - decay) * w`` for every floating-point parameter, and its buffers
(batch norm's running statistics) are the model's own, copied. As TensorFlow's
``ExponentialMovingAverage(num_updates=...)`` does, update ``t`` (from 0) uses
``min(decay, (1 + t) / (10 + t))``, so the early average is not dominated by the random initial
weights (a run of a few hundred steps would otherwise ship mostly its initialisation). The average
starts as the initial weights, is what every epoch's validation and test evaluation runs, and is the deployable model.
It lives in ``run.state`` as a module, so a checkpoint keeps it.

Option ``decay`` (default 0.999), strictly between 0 and 1.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from sopkit.errors import UserError
from sopkit.training.distributed import unwrap
from sopkit.training.settings import StrategySettings
from sopkit.training.strategy import Strategy
from sopkit.training.types import RunContext

__all__ = ["WeightAverage", "update_average", "warmed_decay"]


@torch.no_grad()
def update_average(average: nn.Module, model: nn.Module, decay: float) -> None:
    """One EMA update of ``average`` toward ``model`` (same architecture); buffers copied."""
    for mean, weight in zip(average.parameters(), model.parameters(), strict=True):
        if mean.is_floating_point():
            mean.lerp_(weight.detach(), 1.0 - decay)
        else:
            mean.copy_(weight)
    for kept, buffer in zip(average.buffers(), model.buffers(), strict=True):
        kept.copy_(buffer)


def warmed_decay(decay: float, updates: int) -> float:
    """The decay of update number ``updates`` (from 0): ``decay``, lower for the first ones."""
    return min(decay, (1 + updates) / (10 + updates))


class WeightAverage(Strategy):
    """EMA: the plain model trained, the moving average of its weights shipped."""

    description = "Exponential moving average of the weights (option decay), shipped as the model."

    def __init__(self, settings: StrategySettings | None = None) -> None:
        super().__init__(settings)
        self.decay = self.settings.get("decay", 0.999, float)
        if not math.isfinite(self.decay) or not 0 < self.decay < 1:
            raise UserError(
                f"Option {self.name}.decay={self.decay!r} must be strictly between 0 and 1."
            )

    def prepare(self, model: nn.Module, run: RunContext) -> nn.Module:
        average = copy.deepcopy(model)
        average.requires_grad_(False)
        run.state.ema = average
        run.state.ema_updates = 0
        return model

    def after_step(self, model: nn.Module, run: RunContext) -> None:
        updates: int = run.state.ema_updates
        update_average(run.state.ema, unwrap(model), warmed_decay(self.decay, updates))
        run.state.ema_updates = updates + 1

    def evaluation_model(self, model: nn.Module, run: RunContext) -> nn.Module:
        return run.state.ema  # type: ignore[no-any-return]

    def deployable(self, model: nn.Module, run: RunContext) -> nn.Module:
        average: nn.Module = run.state.ema
        return average.requires_grad_(True)  # shipped as an ordinary model
