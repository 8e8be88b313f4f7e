"""Adversarial majority kernels: paper Appendix B, Algorithms B.1 (``adv-mk-only``) and B.2 (``adv-mk``).

Majority kernels train ``min_w~ E_p L(<w~>_p)`` with a random Dirichlet ``p``. The adversarial variant
pushes ``p`` towards ``max_p L``: every step

1. takes the gradient of the loss with respect to ``p`` at the uniform mixing ``p = 1/e``;
2. ascends it, ``p <- normalize(p + eps * grad_p)``;
3. measures how far that is from uniform, ``u = KL(p || uniform) / log e`` (per weight element, in
   [0, 1]: 0 at the uniform mixing, 1 at a vertex of the simplex);
4. (B.2 only) mixes in a fresh random mixing, ``p <- u * p + (1 - u) * random_p``, so that where the
   adversary is weak the step is ordinary MK and the copies cannot collapse onto each other;
5. takes the ordinary training step with that ``p``.

The gradient in step 1 needs no graph over ``p``. The virtual weight is ``w = sum_k p_k w~_k``, so
``dL/dp_k = w~_k * dL/dw`` element-wise. One ``torch.autograd.grad`` of the loss at uniform mixing
with respect to the copies gives ``dL/dw~_k = (1/e) dL/dw`` for every ``k``; their sum is ``dL/dw``.
``autograd.grad`` (not ``backward``) leaves nothing in any ``.grad``, so the loop's own backward of
step 5 accumulates into clean gradients.

Two choices the paper leaves open, and what this module does:

* **Normalize** is the Euclidean projection onto the probability simplex (Duchi et al., 2008), per
  weight element. ``min_w~ max_p L`` is a saddle problem over the simplex, and projected gradient
  ascent is the textbook step for its inner maximisation. Near the uniform mixing the projection just
  removes the component of the step along ``(1, ..., 1)`` (which cannot change ``p``'s sum) and keeps
  the ascent direction; for a large step it lands on the face or vertex the gradient points to, which
  is the adversary's best answer. Clamp-and-renormalise, the alternative, is not well defined when
  every entry is clamped (0/0) and rescales the entries that survive, bending the direction.
  The projection here subtracts each column's maximum first (the projection ignores shifts along
  ``(1, ..., 1)``), so it stays on the simplex for any finite ``eps``, however large.
  (:func:`project_to_simplex` says how it is computed.)

* **The scale of eps.** The raw ``grad_p`` is tiny and its size depends on the model: on mnist1d at
  initialisation the median ``|grad_p|`` (centred over ``k``) measured 5e-5 for mlp-a1, 6e-6 for
  mlp-a2 and 6e-7 for mlp-a3, a factor of 100 across the paper's own topologies, and it shrinks as
  training converges. With the literal ``p + eps * grad_p`` (``grad_scale=none``), ``eps = 1000``
  matched MK on mlp-a2 but cost 6 points of accuracy on mlp-a1 (10 epochs). By default
  (``grad_scale=l2``) the ascent direction is divided by its L2 norm over all ``e * N`` entries, as
  sharpness-aware minimisation (SAM) normalises its adversarial weight perturbation. Then ``eps`` is
  the length of the step in ``p`` space, and the perturbation it causes in weight space,
  ``sum_k dp_k w~_k``, has a norm of about ``eps * sqrt(e) * (the std of the copies)``. That norm does
  not depend on the model's size or the gradient's scale: at initialisation ``eps = 1`` moved the
  virtual weights by 0.14, 0.11 and 0.11 (L2 norm) on mlp-a1, mlp-a2 and mlp-a3. A per-element
  normalisation (dividing by the RMS instead) was tried first and rejected, because its weight-space
  radius grows as ``sqrt(N)``: at a given ``eps`` it left mlp-a1 training and collapsed mlp-a3 under
  Algorithm B.1 to chance accuracy.

  The default, ``eps = 1``, gives that weight-space radius of about 0.1, within the range SAM uses
  (rho from 0.05 to 0.2), and is a factor 10 below where the adversary breaks training: measured
  over 10 epochs on mnist1d, ``eps = 10`` dropped Algorithm B.1 to chance on mlp-a2 and to 16% on
  mlp-a1, while ``eps = 3`` still trained on all three topologies. At ``eps = 1`` the step is small
  per element, so B.2's weight ``u`` is small (mean 1e-5 to 3e-4 at initialisation) and ``adv-mk``
  is MK tilted towards the adversary where its gradient is concentrated. Raise ``eps`` for a
  stronger adversary. The mean ``u`` of a run is reported as ``extra["mean_u"]``.

Cost: two forward and two backward passes per step (the paper's "calculating the gradient twice").
A model with batch normalisation updates its running statistics in both forward passes. Everything
between the two passes is element-wise over the ``e x N`` copies; with the ``"compiled"`` sampler
(:mod:`sopkit.mk.compiled`) it runs as three compiled kernels: a reduction for the L2 norm, the
ascent and projection, then the KL weight, random draw, dilution and mixing, writing ``w`` and
``p``. Unfused, this element-wise work took most of the step (BENCHMARKS.md). Other samplers take
the reference path: the functions below applied to whole ``(e, N)`` tensors, which the tests compare
the fused kernels with.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from sopkit.data.metrics import task_loss
from sopkit.errors import UserError
from sopkit.mk import (
    MajorityKernels,
    MixingDraw,
    compiled,
    find_majority,
    fixed_weights,
    pooled_buffer,
)
from sopkit.strategies.majority import MajorityKernelsStrategy
from sopkit.training.distributed import combine_gradient, unwrap
from sopkit.training.settings import StrategySettings
from sopkit.training.types import RunContext

__all__ = [
    "GRAD_SCALES",
    "AdversarialMajorityKernels",
    "AdversarialOnlyMajorityKernels",
    "adversarial_mixing",
    "adversarial_weights",
    "mixing_gradient",
    "normalized_kl_to_uniform",
    "project_to_simplex",
    "virtual_gradient",
]

GRAD_SCALES: tuple[str, ...] = ("l2", "none")
DEFAULT_EPS = 1.0

# The math of steps 2-4 is written once, on the e rows of a mixing (lists of same-shaped tensors):
# the reference functions apply it to the rows of whole (e, N) tensors, and the fused kernels are
# the same code compiled, so the two cannot drift apart.
Rows = list[torch.Tensor]


def _total(rows: Iterable[torch.Tensor]) -> torch.Tensor:
    """The element-wise sum of rows (``sum()`` would start from the integer 0)."""
    return functools.reduce(torch.add, rows)


def _project_rows(v: Rows) -> Rows:
    """Euclidean projection onto the simplex of every column of the rows ``v`` (see
    :func:`project_to_simplex`)."""
    # The projection is unchanged by a shift along (1, ..., 1); shifting the largest entry to 0 keeps
    # every intermediate O(1) where it matters, so a huge step still lands exactly on a vertex.
    top = functools.reduce(torch.maximum, v)
    v = [row - top for row in v]
    size = len(v)
    theta = (_total(v) - 1) / size
    for _ in range(size - 1):  # a fixed count: no data-dependent branch, no device sync
        active = [row > theta for row in v]
        count = _total(a.to(v[0].dtype) for a in active)
        theta = (_total(row * a for row, a in zip(v, active, strict=True)) - 1) / count
    return [(row - theta).clamp_min(0) for row in v]


def _kl_rows(p: Rows) -> torch.Tensor:
    """``KL(p || uniform) / log e`` of every column of the rows ``p`` (see
    :func:`normalized_kl_to_uniform`)."""
    # p * log(p) with 0 * log(0) = 0; clamping inside the log does that and, unlike torch.xlogy,
    # runs on the vectorised log kernel (xlogy took a quarter of the mixing's time on the CPU).
    tiny = torch.finfo(p[0].dtype).tiny
    entropy = -_total(row * row.clamp_min(tiny).log() for row in p)
    return (1 - entropy / math.log(len(p))).clamp(0.0, 1.0)


def _ascend_rows(direction: Rows, step: torch.Tensor | float) -> Rows:
    """Step 2 on rows: ``p = project(1/e + step * direction)``."""
    expansion = len(direction)
    return _project_rows([1.0 / expansion + step * row for row in direction])


def _weigh_rows(p: Rows, random_p: Rows | None) -> tuple[Rows, torch.Tensor]:
    """Steps 3-4 on rows: ``u`` of the adversarial ``p``, and B.2's dilution with ``random_p``."""
    u = _kl_rows(p)
    if random_p is not None:
        p = [u * adv + (1 - u) * rnd for adv, rnd in zip(p, random_p, strict=True)]
    return p, u


def _mixing_rows(
    direction: Rows, step: torch.Tensor | float, random_p: Rows | None
) -> tuple[Rows, torch.Tensor]:
    """Steps 2-4 on rows: ``p = project(1/e + step * direction)``, ``u``, and B.2's dilution."""
    return _weigh_rows(_ascend_rows(direction, step), random_p)


def project_to_simplex(v: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The Euclidean projection of every slice of ``v`` along ``dim`` onto the probability simplex.

    The projection is ``max(v - theta, 0)`` for the ``theta`` that makes it sum to 1. Michelot's
    (1986) active-set iteration finds it: start with every entry active, set ``theta`` so the
    active entries, shifted, sum to 1, drop the entries at or below ``theta``, repeat. ``theta`` only
    grows, the largest entry never drops, so after at most ``e - 1`` rounds the set is final (further
    rounds change nothing). For the small ``e`` of majority kernels this is a few element-wise passes,
    about twice as fast on the CPU as the sort-based algorithm (Duchi et al., 2008) for ``e = 3``.
    """
    return torch.stack(_project_rows(list(v.unbind(dim))), dim=dim)


def normalized_kl_to_uniform(p: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``KL(p || uniform) / log e`` of every slice along ``dim``: 0 at uniform, 1 at a vertex.

    ``KL(p || 1/e) = log e - H(p)``, so this is ``1 - H(p) / log e``, clamped to [0, 1] against
    rounding.
    """
    return _kl_rows(list(p.unbind(dim)))


def virtual_gradient(
    model: nn.Module,
    holder: MajorityKernels,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float = 0.0,
    loss_kind: str = "cross-entropy",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dL/dw`` of the virtual weights at the uniform mixing (flat, length N), and that loss.

    One forward with the mean weights and one ``autograd.grad`` with respect to them: no graph over
    ``p``, no ``(e, N)`` gradient, and nothing accumulated in any ``.grad``. Then
    ``dL/dp_k = copies_k * dL/dw`` element-wise. ``L`` is the training loss, label-smoothed as
    the run's is (``loss_kind``: the data set's, e.g. ``"mse"`` for STS-B), so the mixing ascends
    the loss the step descends. Under data-parallel training
    (``model`` a DDP wrapper) the forward runs on the wrapped model (DDP expects one backward per
    forward of its own) and ``dL/dw`` is combined over the ranks into the whole batch's.
    """
    weights = holder.mean_weights(pooled=True).detach().requires_grad_()
    with fixed_weights(model, weights):
        outputs = unwrap(model)(inputs)
        loss = task_loss(outputs, targets, loss_kind, label_smoothing=label_smoothing)
    (grad_w,) = torch.autograd.grad(loss, weights)
    return combine_gradient(model, grad_w), loss.detach()


def mixing_gradient(
    model: nn.Module,
    holder: MajorityKernels,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float = 0.0,
    loss_kind: str = "cross-entropy",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dL/dp`` at the uniform mixing, shaped like the copies ``(e, N)``, and that loss."""
    grad_w, loss = virtual_gradient(model, holder, inputs, targets, label_smoothing, loss_kind)
    return holder.copies.detach() * grad_w, loss


def adversarial_mixing(
    grad_p: torch.Tensor,
    eps: float,
    *,
    grad_scale: str = "l2",
    random_p: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-4 of Algorithm B.2 (B.1 without ``random_p``): the mixing to train with, and ``u``.

    Args:
        grad_p: ``dL/dp`` at the uniform mixing, shape ``(e, N)``.
        eps: the ascent step (its length in ``p`` space with ``grad_scale="l2"``; see the module
            docstring).
        grad_scale: ``"l2"`` divides the ascent direction by its L2 norm, ``"none"`` uses
            ``grad_p`` as it is (the paper's literal ``p + eps * grad_p``).
        random_p: a fresh Dirichlet mixing shaped like ``grad_p`` for B.2; None for B.1.

    Returns:
        ``(p, u)``: the mixing, shape ``(e, N)``, on the simplex in every column, and the per-element
        ``u = KL(p_adv || uniform) / log e`` of shape ``(N,)``.
    """
    if grad_scale not in GRAD_SCALES:
        raise ValueError(f"grad_scale must be one of {GRAD_SCALES}, got {grad_scale!r}")
    # Only the part of the gradient that changes p within the simplex matters (the projection drops
    # the rest), so that part is what "l2" normalises.
    direction = grad_p - grad_p.mean(dim=0, keepdim=True)
    step: torch.Tensor | float = eps
    if grad_scale == "l2":
        # A zero gradient stays zero (0 / tiny); no branch on the value, so no device sync.
        step = eps / direction.square().sum().sqrt().clamp_min(torch.finfo(direction.dtype).tiny)
    rows = None if random_p is None else list(random_p.unbind(0))
    p, u = _mixing_rows(list(direction.unbind(0)), step, rows)
    return torch.stack(p), u


# ---- the fused path (the "compiled" sampler) ----------------------------------------------------


def _centred_rows(copies: torch.Tensor, grad_w: torch.Tensor) -> Rows:
    """The ascent direction before scaling, ``dL/dp_k - mean_j dL/dp_j = grad_w * (copies_k -
    mean copies)``, one row per copy."""
    rows = list(copies.unbind(0))
    center = _total(rows) / len(rows)
    return [grad_w * (row - center) for row in rows]


def _squared_norm(copies: torch.Tensor, grad_w: torch.Tensor) -> torch.Tensor:
    return _total(row.square().sum() for row in _centred_rows(copies, grad_w))


# The fused mixing is two compiled kernels, not one: compiled as one loop, ascent, projection, KL
# weight, draw and mixing ran slower than the same work split after the projection, although the
# split writes and reads p once more (BENCHMARKS.md, the adv-mk kernels).


def _ascend_into(
    p_rows: tuple[torch.Tensor, ...], copies: torch.Tensor, grad_w: torch.Tensor, step: torch.Tensor
) -> None:
    """Step 2: write the adversarial ``p = project(1/e + step * direction)`` into ``p_rows``."""
    p = _ascend_rows(_centred_rows(copies, grad_w), step)
    for row, p_k in zip(p_rows, p, strict=True):
        row.copy_(p_k)


def _weigh_and_mix_into(
    w: torch.Tensor,
    p_rows: tuple[torch.Tensor, ...],
    copies: torch.Tensor,
    key: torch.Tensor,
    diluted: bool,
) -> torch.Tensor:
    """Steps 3-4 on the adversarial ``p`` in ``p_rows`` (B.2, when ``diluted``, with the random
    mixing of stream ``key``, in place), the mixing ``w = sum_k p_k copies_k`` into ``w``, and the
    sum of ``u``."""
    random_p = compiled.dirichlet_rows(key, copies.shape[1], copies.shape[0]) if diluted else None
    p, u = _weigh_rows(list(p_rows), random_p)
    mixed = p[0] * copies[0]
    for k in range(1, len(p)):
        mixed = mixed + p[k] * copies[k]
    w.copy_(mixed)
    if diluted:
        for row, p_k in zip(p_rows, p, strict=True):
            row.copy_(p_k)
    return u.sum()


class _FusedAdversarialMixing(torch.autograd.Function):
    """``w = sum_k p_k copies_k`` for the adversarial ``p`` of (``grad_w``, ``step``, ``key``), by the
    compiled kernels, which also write ``p`` for backward.

    Keeping ``p`` rather than recomputing it in backward, unlike plain MK: the adversarial ``p``
    costs three logarithms per weight element (the KL weight ``u``), more than writing and reading
    it. Outputs go to pooled buffers (``pooled_buffer``): fresh ones page-fault in every step.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        copies: torch.Tensor,
        grad_w: torch.Tensor,
        step: torch.Tensor,
        key: torch.Tensor,
        diluted: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        expansion, numel = copies.shape
        w, p = pooled_buffer((numel,)), pooled_buffer((expansion, numel))
        copies = copies.detach()
        compiled.kernel(_ascend_into)(tuple(p), copies, grad_w, step)
        u_sum = compiled.kernel(_weigh_and_mix_into)(w, tuple(p), copies, key, diluted)
        ctx.save_for_backward(p)
        ctx.mark_non_differentiable(u_sum)
        return w, u_sum

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor, _grad_u: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, None, None]:
        (p,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward (create_graph=True): a differentiable product
            return p * grad_out, None, None, None, None
        grad = pooled_buffer(tuple(p.shape))
        for k in range(p.shape[0]):
            torch.mul(p[k], grad_out, out=grad[k])
        return grad, None, None, None, None


def adversarial_weights(
    holder: MajorityKernels,
    grad_w: torch.Tensor,
    eps: float,
    *,
    grad_scale: str = "l2",
    draw: MixingDraw | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat virtual weights to train with (differentiable with respect to the copies), and the
    mean ``u`` over elements.

    ``grad_w`` is :func:`virtual_gradient`'s; ``draw`` the random mixing of B.2 (None for B.1).
    With the ``"compiled"`` sampler this runs fused; otherwise it takes the reference path
    (:func:`adversarial_mixing` on whole tensors, then ``holder.mix``).
    """
    if grad_scale not in GRAD_SCALES:
        raise ValueError(f"grad_scale must be one of {GRAD_SCALES}, got {grad_scale!r}")
    copies = holder.copies
    fused = (draw.sampler if draw is not None else holder.resolved_sampler()) == "compiled"
    if not fused:
        grad_p = copies.detach() * grad_w
        random_p = draw.p() if draw is not None else None
        p, u = adversarial_mixing(grad_p, eps, grad_scale=grad_scale, random_p=random_p)
        return holder.mix(p), u.mean()
    detached = copies.detach()
    step = torch.tensor(eps, dtype=detached.dtype)
    if grad_scale == "l2":
        norm = compiled.kernel(_squared_norm)(detached, grad_w).sqrt()
        step = step / norm.clamp_min(torch.finfo(detached.dtype).tiny)
    key = compiled.stream_key(draw.seed if draw is not None else 0)
    w, u_sum = _FusedAdversarialMixing.apply(copies, grad_w, step, key, draw is not None)
    return w, u_sum / holder.num_virtual


class AdversarialMajorityKernels(MajorityKernelsStrategy):
    """Majority kernels with an adversarial mixing diluted by a random one (paper Algorithm B.2).

    Options: ``eps`` (default 1), ``grad_scale`` (``l2`` or ``none``), ``init`` and ``sampler`` (as
    for ``mk``).
    """

    description = (
        "Adversarial MK (Alg. B.2): mixing p ascends the loss, mixed with a random p by KL weight."
    )
    #: Whether the adversarial mixing is diluted with a fresh random one (B.2) or used alone (B.1).
    random_mixing: ClassVar[bool] = True

    def __init__(self, settings: StrategySettings | None = None) -> None:
        super().__init__(settings)
        self.eps = self.settings.get("eps", DEFAULT_EPS)
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise UserError(f"Option {self.name}.eps must be a finite number >= 0, got {self.eps}.")
        self.grad_scale = self.settings.get("grad_scale", "l2", choices=GRAD_SCALES)

    def loss(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, run: RunContext
    ) -> torch.Tensor:
        holder = find_majority(model)
        if holder is None:  # prepare() expands; a model that is not expanded is a wiring bug
            raise RuntimeError(f"{self.name}: the model is not expanded; was prepare() skipped?")
        smoothing = run.config.label_smoothing
        grad_w, _ = virtual_gradient(model, holder, inputs, targets, smoothing, run.data.loss)
        # The random draw is the next of the model's mixing stream, the one plain MK's training
        # forward would take, so with eps = 0 this strategy takes exactly MK's steps.
        draw = holder.draw() if self.random_mixing else None
        weights, mean_u = adversarial_weights(
            holder, grad_w, self.eps, grad_scale=self.grad_scale, draw=draw
        )
        # The run's sum of the per-step mean u, kept on the device (no per-step sync).
        state, mean = run.state, mean_u.detach()
        state.u_sum = mean if getattr(state, "u_sum", None) is None else state.u_sum + mean
        state.u_steps = getattr(state, "u_steps", 0) + 1
        with fixed_weights(model, weights):
            return task_loss(model(inputs), targets, run.data.loss, label_smoothing=smoothing)

    def mixing(
        self,
        model: nn.Module,
        holder: MajorityKernels,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        label_smoothing: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixing ``p`` (shape ``(e, N)``) a step on this batch trains with, and the per-element
        ``u``, materialised by the reference path (``loss`` never materialises ``p`` when fused);
        ``label_smoothing`` is the run's."""
        grad_p, _ = mixing_gradient(model, holder, inputs, targets, label_smoothing)
        random_p = holder.sample() if self.random_mixing else None
        return adversarial_mixing(grad_p, self.eps, grad_scale=self.grad_scale, random_p=random_p)

    def report(self, model: nn.Module, run: RunContext) -> dict[str, Any]:
        """The run's mean ``u`` (``extra["mean_u"]``) and the sampler its mixings depended on (B.1
        draws no random mixing, but its path still depends on the sampler)."""
        holder = find_majority(model)
        if holder is None or not getattr(run.state, "u_steps", 0):
            return {}
        return {
            "mean_u": run.state.u_sum.item() / run.state.u_steps,
            "mk_sampler": holder.resolved_sampler(),
        }


class AdversarialOnlyMajorityKernels(AdversarialMajorityKernels):
    """Majority kernels trained with the adversarial mixing alone (paper Algorithm B.1).

    The paper reports that it overfits later in training; it is here to reproduce that comparison.
    """

    description = "Adversarial-only MK (Alg. B.1): p ascends the loss; no random mixing."
    random_mixing = False
