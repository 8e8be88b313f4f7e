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
A model with batch normalisation updates its running statistics in both forward passes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from sopkit.errors import UserError
from sopkit.majority import MajorityKernels, find_majority, fixed_mixing
from sopkit.strategies.majority import MajorityKernelsStrategy

if TYPE_CHECKING:
    from torch import nn

    from sopkit.strategy import StrategySettings
    from sopkit.train import RunContext, TrainingSession, TrainResult

__all__ = [
    "GRAD_SCALES",
    "AdversarialMajorityKernels",
    "AdversarialOnlyMajorityKernels",
    "adversarial_mixing",
    "mixing_gradient",
    "normalized_kl_to_uniform",
    "project_to_simplex",
]

GRAD_SCALES: tuple[str, ...] = ("l2", "none")
DEFAULT_EPS = 1.0


def project_to_simplex(v: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The Euclidean projection of every slice of ``v`` along ``dim`` onto the probability simplex.

    The projection is ``max(v - theta, 0)`` for the ``theta`` that makes it sum to 1. Michelot's
    (1986) active-set iteration finds it: start with every entry active, set ``theta`` so the
    active entries, shifted, sum to 1, drop the entries at or below ``theta``, repeat. ``theta`` only
    grows, the largest entry never drops, so after at most ``e - 1`` rounds the set is final (further
    rounds change nothing). For the small ``e`` of majority kernels this is a few element-wise passes,
    about twice as fast on the CPU as the sort-based algorithm (Duchi et al., 2008) for ``e = 3``.
    """
    # The projection is unchanged by a shift along (1, ..., 1); shifting the largest entry to 0 keeps
    # every intermediate O(1) where it matters, so a huge step still lands exactly on a vertex.
    v = v - v.amax(dim=dim, keepdim=True)
    size = v.shape[dim]
    theta = (v.sum(dim=dim, keepdim=True) - 1) / size
    for _ in range(size - 1):  # a fixed count: no data-dependent branch, no device sync
        active = v > theta
        theta = ((v * active).sum(dim=dim, keepdim=True) - 1) / active.sum(dim=dim, keepdim=True)
    return (v - theta).clamp_min(0)


def normalized_kl_to_uniform(p: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``KL(p || uniform) / log e`` of every slice along ``dim``: 0 at uniform, 1 at a vertex.

    ``KL(p || 1/e) = log e - H(p)``, so this is ``1 - H(p) / log e``, clamped to [0, 1] against
    rounding.
    """
    size = p.shape[dim]
    # p * log(p) with 0 * log(0) = 0; clamping inside the log does that and, unlike torch.xlogy,
    # runs on the vectorised log kernel (xlogy took a quarter of the mixing's time on the CPU).
    entropy = -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(dim=dim)
    return (1 - entropy / math.log(size)).clamp(0.0, 1.0)


def mixing_gradient(
    model: nn.Module, holder: MajorityKernels, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dL/dp`` at the uniform mixing, shaped like the copies ``(e, N)``, and that loss.

    One forward at uniform ``p`` and one ``autograd.grad`` with respect to the copies; no graph over
    ``p`` and nothing accumulated in any ``.grad``.
    """
    with fixed_mixing(model, "uniform"):
        loss = F.cross_entropy(model(inputs), targets)
    (grad_copies,) = torch.autograd.grad(loss, holder.copies)
    # At uniform p every copy's gradient is dL/dw / e; their sum is dL/dw of the virtual weight.
    grad_virtual = grad_copies.sum(dim=0)
    return holder.copies.detach() * grad_virtual, loss.detach()


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
    expansion = grad_p.shape[0]
    # Only the part of the gradient that changes p within the simplex matters (the projection drops
    # the rest), so that part is what "l2" normalises.
    direction = grad_p - grad_p.mean(dim=0, keepdim=True)
    if grad_scale == "l2":
        norm = direction.square().sum().sqrt()
        # A zero gradient stays zero (0 / tiny); no branch on the value, so no device sync.
        direction = direction / norm.clamp_min(torch.finfo(direction.dtype).tiny)
    p = project_to_simplex(1.0 / expansion + eps * direction, dim=0)
    u = normalized_kl_to_uniform(p, dim=0)
    if random_p is not None:
        p = u * p + (1 - u) * random_p
    return p, u


class AdversarialMajorityKernels(MajorityKernelsStrategy):
    """Majority kernels with an adversarial mixing diluted by a random one (paper Algorithm B.2).

    Options: ``eps`` (default 1), ``grad_scale`` (``l2`` or ``none``), ``init`` (as for ``mk``).
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
        # Sum of the per-step mean u of the run in progress, kept on the device (no per-step sync).
        self._u_sum: torch.Tensor | None = None
        self._steps = 0

    def fit(self, session: TrainingSession) -> TrainResult:
        result = session.train(self)
        if self._u_sum is not None and self._steps:
            result.extra.setdefault("mean_u", self._u_sum.item() / self._steps)
            self._u_sum = None
        return result

    def prepare(self, model: nn.Module, run: RunContext) -> nn.Module:
        self._u_sum, self._steps = None, 0
        return super().prepare(model, run)

    def loss(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, run: RunContext
    ) -> torch.Tensor:
        holder = find_majority(model)
        if holder is None:  # prepare() expands; a model that is not expanded is a wiring bug
            raise RuntimeError(f"{self.name}: the model is not expanded; was prepare() skipped?")
        p, u = self.mixing(model, holder, inputs, targets)
        self._record(u)
        with fixed_mixing(model, p):
            return F.cross_entropy(model(inputs), targets)

    def mixing(
        self, model: nn.Module, holder: MajorityKernels, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixing ``p`` (shape ``(e, N)``) this step trains with, and the per-element ``u``."""
        grad_p, _ = mixing_gradient(model, holder, inputs, targets)
        # The random draw comes from the same generator and call as plain MK's, so with eps = 0
        # this strategy takes exactly MK's steps.
        random_p = holder.sample() if self.random_mixing else None
        return adversarial_mixing(
            grad_p, self.eps, grad_scale=self.grad_scale, random_p=random_p
        )

    def _record(self, u: torch.Tensor) -> None:
        mean = u.detach().mean()
        self._u_sum = mean if self._u_sum is None else self._u_sum + mean
        self._steps += 1


class AdversarialOnlyMajorityKernels(AdversarialMajorityKernels):
    """Majority kernels trained with the adversarial mixing alone (paper Algorithm B.1).

    The paper reports that it overfits later in training; it is here to reproduce that comparison.
    """

    description = "Adversarial-only MK (Alg. B.1): p ascends the loss; no random mixing."
    random_mixing = False
