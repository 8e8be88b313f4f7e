"""SHARPNESS-AWARE MINIMISATION (Foret et al. 2021): a control for the paper's reading of majority
kernels as stochastic sharpness-aware minimisation (Section 4.4).

Each step takes the gradient twice. In ``loss``: the gradient ``g`` of the batch's loss at the
weights ``w``, then the weights moved to ``w + rho * g / ||g||`` (the norm over every trainable
parameter together) and the loss there returned, so the loop's ``backward`` gives the gradient at
the perturbed point. In ``after_backward``: the weights set back to ``w`` exactly (a saved copy, not
a subtraction), so the optimizer steps from ``w`` with the perturbed point's gradient. The loss the
loop records is the perturbed point's.

Option ``rho`` (default 0.05): the radius of the perturbation; 0 trains as the baseline does (with
two passes). Both forward passes run in training mode, so a model with batch norm updates its
running statistics twice per step, as the reference implementation does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sopkit.errors import UserError
from sopkit.training.settings import StrategySettings
from sopkit.training.strategy import Strategy
from sopkit.training.types import RunContext

__all__ = ["SharpnessAware"]

#: Keeps ``rho / ||g||`` finite when the gradient is zero (then nothing moves).
_NORM_FLOOR = 1e-12


class SharpnessAware(Strategy):
    """SAM: the optimizer steps with the gradient taken at ``w + rho * g / ||g||``."""

    description = "Sharpness-aware minimisation (Foret et al. 2021): gradient at w + rho*g/|g|."
    # The first gradient is taken with autograd.grad, outside DDP's reducer: one process only.
    data_parallel = False

    def __init__(self, settings: StrategySettings | None = None) -> None:
        super().__init__(settings)
        self.rho = self.settings.get("rho", 0.05, float)
        if not math.isfinite(self.rho) or self.rho < 0:
            raise UserError(f"Option {self.name}.rho={self.rho!r} must be a finite number >= 0.")

    def loss(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, run: RunContext
    ) -> torch.Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        first = super().loss(model, inputs, targets, run)
        grads = torch.autograd.grad(first, params, allow_unused=True)
        # The norm in at least float32 (a bf16 sum of many squares loses the perturbation's size).
        squares = [
            g.detach().to(torch.promote_types(g.dtype, torch.float32)).pow(2).sum()
            for g in grads if g is not None
        ]
        norm = torch.zeros(()) if not squares else sum(squares[1:], squares[0]).sqrt()
        # A non-finite gradient moves nothing: the loop sees the loss and stops the run anyway.
        scale = torch.where(
            torch.isfinite(norm), self.rho / (norm + _NORM_FLOOR), torch.zeros_like(norm)
        )
        with torch.no_grad():
            run.state.sam_saved = [p.detach().clone() for p in params]
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.add_(g * scale.to(device=g.device, dtype=g.dtype))
        return super().loss(model, inputs, targets, run)

    def after_backward(self, model: nn.Module, run: RunContext) -> None:
        saved = getattr(run.state, "sam_saved", None)
        if saved is None:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            for p, original in zip(params, saved, strict=True):
                p.copy_(original)
        del run.state.sam_saved  # nothing per step is left for a checkpoint to keep
