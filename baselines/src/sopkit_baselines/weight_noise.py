"""WEIGHT NOISE matched to majority kernels' mixing: a control that separates "more parameters"
from "noise" in the paper's explanation of majority kernels.

MK trains the weight ``sum_k p_k w_k`` of ``e`` copies ``w_k`` with ``p ~ Dirichlet(1, ..., 1)``
drawn every step. With ``Var p_k = (e - 1) / (e^2 (e + 1))`` and ``Cov(p_j, p_k) = -1 / (e^2 (e + 1))``
the mixed weight has, per element, mean ``mean_k w_k`` and variance

    Var = (e * sum_k w_k^2 - (sum_k w_k)^2) / (e^2 (e + 1)) = sum_k (w_k - mean)^2 / (e (e + 1)).

The plain model has no copies, so the spread is that of MK's copies at initialisation: MK draws
each copy from the parameter's own initialisation (a permutation of its elements), so a copy's
per-element variance is the variance ``s^2`` of the plain parameter's elements at init, and
``E sum_k (w_k - mean)^2 = (e - 1) * s^2``; ``variance-preserving`` (MK's default) spreads the
copies ``sqrt(e)`` times wider, which multiplies it by ``e``. The noise variance of each parameter
tensor is therefore fixed at the start of the run to

    variance-preserving: s^2 * (e - 1) / (e + 1)        independent: s^2 * (e - 1) / (e (e + 1))

(option ``init``, as MK's; MK starts a pretrained model's copies as replicas, which do not
spread, so on a pretrained model the option must be given). A parameter whose elements are equal at init (a norm layer's scale of
ones) gets no noise, as MK's copies of it do not spread. Every step, ``before_step`` adds fresh
zero-mean Gaussian noise of that variance to every trainable parameter, the loss and its gradient
are taken at the noisy point, and ``after_backward`` puts the saved weights back before the
optimizer steps, as MK's gradient is the noisy point's applied to the mean. The noise is drawn from
the run's generator, so a seed gives the same noise (and checkpoints resume it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sopkit.errors import UserError
from sopkit.strategies.majority import pretrained
from sopkit.training.settings import StrategySettings
from sopkit.training.strategy import Strategy
from sopkit.training.types import RunContext

__all__ = ["INITS", "WeightNoise", "mixing_variance_factor"]

#: The MK initialisations whose spread the noise can match (``replicate`` copies do not spread).
INITS = ("variance-preserving", "independent")


def mixing_variance_factor(expansion: int, init: str) -> float:
    """Var(mixed weight) / s^2 for ``expansion`` copies started by MK's ``init`` (see the module)."""
    e = expansion
    independent = (e - 1) / (e * (e + 1))
    return independent * e if init == "variance-preserving" else independent


class WeightNoise(Strategy):
    """The plain model with Gaussian weight noise per step, MK's mixing variance at init."""

    description = (
        "Plain model with per-step Gaussian weight noise of MK's Dirichlet-mixing variance "
        "(option init)."
    )

    def __init__(self, settings: StrategySettings | None = None) -> None:
        super().__init__(settings)
        # None: MK's default, variance-preserving (refused for a pretrained model, see prepare).
        self.init: str | None = self.settings.get("init", None, str, choices=INITS)

    def noise_std(self, model: nn.Module) -> list[float]:
        """The noise's standard deviation for each trainable parameter of ``model`` (at init)."""
        factor = mixing_variance_factor(self.expansion, self.init or INITS[0])
        stds = []
        for p in model.parameters():
            if not p.requires_grad:
                continue
            spread = p.detach().double().var().item() if p.numel() > 1 else 0.0
            stds.append((factor * spread) ** 0.5)
        return stds

    def prepare(self, model: nn.Module, run: RunContext) -> nn.Module:
        if self.init is None and pretrained(model):
            raise UserError(
                f"Strategy {self.name} on a pretrained model: MK starts its copies as replicas of "
                "the checkpoint, which do not spread, so there is no mixing noise to match. Set "
                f"--set {self.name}.init=variance-preserving (and --set mk.init=variance-preserving "
                "to compare with the same spread)."
            )
        run.state.noise_std = self.noise_std(model)
        return model

    @torch.no_grad()
    def before_step(self, model: nn.Module, run: RunContext) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        run.state.noise_saved = [p.detach().clone() for p in params]
        for p, std in zip(params, run.state.noise_std, strict=True):
            if std > 0:
                noise = torch.randn(p.shape, generator=run.generator, device=p.device)
                p.add_(noise.to(p.dtype), alpha=std)

    @torch.no_grad()
    def after_backward(self, model: nn.Module, run: RunContext) -> None:
        saved = getattr(run.state, "noise_saved", None)
        if saved is None:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        for p, original in zip(params, saved, strict=True):
            p.copy_(original)
        del run.state.noise_saved  # nothing per step is left for a checkpoint to keep

    def report(self, model: nn.Module, run: RunContext) -> dict[str, Any]:
        """The largest noise standard deviation applied (``extra["weight_noise_max_std"]``)."""
        return {"weight_noise_max_std": max(run.state.noise_std, default=0.0)}
