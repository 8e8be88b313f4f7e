"""The mixing ``w = sum_k p_k * copies_k`` as autograd Functions, and what backward keeps of ``p``.

The gradient of the copies is ``grad copies_k = p_k * grad w``. A custom Function (rather than
autograd through ``p * copies``) mixes with fused multiply-adds, writes into pooled buffers, and
lets backward either keep ``p`` or keep only the step's seed and draw ``p`` again
(``BACKWARD_MODES``).
"""

from __future__ import annotations

from typing import Any

import torch

from sopkit.mk.sampling import MixingDraw, mix

__all__ = ["BACKWARD_MODES", "FixedMixing", "SampledMixing"]

#: What the backward pass of a training mixing uses (``MajorityKernels.backward``): ``"save"`` keeps
#: ``p`` (e numbers per weight element) from the forward pass; ``"regenerate"`` keeps only the seed
#: and draws ``p`` again (no tensor shaped like the copies is kept for backward). ``"auto"`` saves
#: with the ``"sfc64"`` and ``"torch"`` samplers on the CPU, where drawing is the bottleneck, and
#: regenerates elsewhere: on CUDA memory is short, and the ``"compiled"`` kernel recomputes ``p``
#: for less than it costs to write and read it.
BACKWARD_MODES: tuple[str, ...] = ("auto", "save", "regenerate")


class SampledMixing(torch.autograd.Function):
    """``w = sum_k p_k * copies_k`` for the ``p`` of a ``MixingDraw``, with ``grad copies_k =
    p_k * grad w`` in backward, where ``p`` is either saved or regenerated from the draw's seed."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, copies: torch.Tensor, draw: MixingDraw, save_p: bool
    ) -> torch.Tensor:
        ctx.draw = draw
        ctx.save_p = save_p
        w, p = draw.mix(copies, keep_p=save_p)
        if save_p:
            ctx.save_for_backward(p)
        return w

    @staticmethod
    def backward(ctx: Any, grad_w: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        draw: MixingDraw = ctx.draw
        if ctx.save_p:
            (p,) = ctx.saved_tensors
            if not torch.is_grad_enabled():
                grad = draw.scratch(grad_w, draw.numel)
                return torch.mul(p, grad_w, out=grad), None, None
        elif torch.is_grad_enabled():
            # Double backward (create_graph=True): the fused passes are invisible to autograd, so
            # materialise the same p and take a product autograd can differentiate.
            p = draw.p()
        else:
            return draw.grad(grad_w.contiguous()), None, None
        return p * grad_w, None, None


class FixedMixing(torch.autograd.Function):
    """``w = sum_k p_k * copies_k`` for a given ``p`` (``fixed_mixing``), differentiable in both:
    ``grad copies_k = p_k * grad w`` and ``grad p_k = copies_k * grad w``."""

    @staticmethod
    def forward(ctx: Any, copies: torch.Tensor, p: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(p, copies if p.requires_grad else None)
        return mix(p.to(copies.dtype), copies)

    @staticmethod
    def backward(ctx: Any, grad_w: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        p, copies = ctx.saved_tensors
        grad_copies = p * grad_w if ctx.needs_input_grad[0] else None
        grad_p = copies * grad_w if ctx.needs_input_grad[1] else None
        return grad_copies, grad_p
