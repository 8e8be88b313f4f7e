"""The ``MajorityKernels`` container: the copies of an expanded model, its random stream, and the
hooks that hand every layer its mixed weight at each forward.

Layout, and why. All expanded weights of a model live in ONE flat parameter of shape ``(e, N)``
(``sopkit_copies`` on the root model). One forward pre-hook on the root draws one ``p`` of shape
``(e, N)``, mixes once, and hands each layer a view of the result as a plain tensor attribute.
Compared with ``torch.nn.utils.parametrize`` (a cost per tensor per forward, and a weight read twice
would see two different ``p``) this is one draw, one mixing and one ``split`` per step, tied weights
see a single ``p`` by construction, and the optimizer sees a single tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sopkit.mk.autograd import BACKWARD_MODES, FixedMixing, SampledMixing
from sopkit.mk.buffers import pooled_buffer
from sopkit.mk.graph import call_outside_graph, compiling, uncompiled
from sopkit.mk.sampling import (
    SAMPLERS,
    MixingDraw,
    MixingStream,
    resolve_sampler,
    sample_dirichlet,
)

__all__ = [
    "COPIES_NAME",
    "HOLDER_NAME",
    "KernelSlice",
    "MajorityKernels",
    "count_parameters",
    "find_majority",
    "is_expanded",
]

# Where an expanded root model keeps its copies (a parameter) and their bookkeeping (a plain object).
COPIES_NAME = "sopkit_copies"
HOLDER_NAME = "_sopkit_majority"


@dataclass
class KernelSlice:
    """One expanded weight: where its slice of the flat copies is, and every place it is bound."""

    name: str  # the first qualified parameter name, e.g. "features.0.weight"
    shape: torch.Size
    offset: int
    numel: int
    bindings: list[tuple[nn.Module, str]]  # (module, attribute) pairs; more than one when tied


class MajorityKernels:
    """The ``e`` copies of every expanded weight of one model, and the mixing that feeds the layers.

    The copies are one parameter of the root model, ``sopkit_copies``, of shape ``(expansion, N)``;
    kernel ``i`` is the slice ``[:, offset_i : offset_i + numel_i]``. This object is kept in the
    root's ``__dict__`` and is not a submodule, because containers such as ``nn.Sequential`` call
    every child. As a parameter of the root, the copies follow ``.to()``, ``state_dict()`` and
    ``model.parameters()`` like any other.

    Which weights the layers see is decided at every forward of the root model:

    - train mode: ``sum_k p_k * copies_k`` with a fresh Dirichlet ``p`` (Eq. 4.2), the next draw of
      ``stream``;
    - eval mode: the uniform mean;
    - ``fixed_mixing`` set (a tensor shaped like ``copies``): that ``p``, for tests and adversarial MK;
    - ``fixed_weights`` set (a flat tensor of length N): those virtual weights, before anything else
      (adversarial MK computes its weights itself).

    ``stream`` (a :class:`~sopkit.mk.sampling.MixingStream`) is the model's explicit random stream:
    ``stream.state_dict()`` is ``{"seed", "step"}``, and ``stream.load_state_dict(state)`` makes
    the next draws those that followed ``state``. How the training ``p`` is drawn and what backward
    keeps of it are ``sampler`` (see ``SAMPLERS``) and ``backward`` (see ``BACKWARD_MODES``), both
    ``"auto"`` by default; they change speed and memory, never the distribution.
    """

    def __init__(
        self,
        root: nn.Module,
        expansion: int,
        kernels: list[KernelSlice],
        stream: MixingStream,
    ) -> None:
        self.root = root
        self.expansion = expansion
        self.kernels = kernels
        self.stream = stream
        self.fixed_mixing: torch.Tensor | None = None
        # Flat virtual weights (length N) to use as they are, ahead of any mixing (fixed_weights).
        self.fixed_weights: torch.Tensor | None = None
        self._sampler = "auto"
        self._backward = "auto"
        #: The sampler of the latest training mixing (None before the first): what a result records.
        self.last_sampler: str | None = None
        #: The root's refresh and release hooks (removed by collapse).
        self.hook_handles: list[RemovableHandle] = []

    @property
    def copies(self) -> nn.Parameter:
        """The ``(expansion, N)`` parameter holding every copy of every expanded weight."""
        copies: nn.Parameter = getattr(self.root, COPIES_NAME)
        return copies

    @property
    def num_virtual(self) -> int:
        """Number of elements of all expanded weights, counted once (N)."""
        return self.copies.shape[1]

    def mean_weights(self, *, pooled: bool = False) -> torch.Tensor:
        """The collapsed (inference) weights as one flat tensor of length N.

        ``pooled``: write them into a pooled buffer (``pooled_buffer``; CPU float32 only) instead
        of a new tensor, for a mean taken every step and dropped within it (adversarial MK's);
        that mean is detached from the copies.
        """
        copies: torch.Tensor = self.copies
        # Copy by copy: torch's mean over the leading dimension of an (e, N) tensor ran several
        # times below memory speed on the CPU, and adversarial MK takes this mean every step. For
        # e = 3 the bits are the same as mean(dim=0)'s.
        if pooled and copies.device.type == "cpu" and copies.dtype == torch.float32:
            copies = copies.detach()
            total = torch.add(copies[0], copies[1], out=pooled_buffer((self.num_virtual,)))
        else:
            total = copies[0] + copies[1]
        for k in range(2, self.expansion):
            total.add_(copies[k])
        return total.div_(self.expansion)

    @property
    def sampler(self) -> str:
        """How training mixings are drawn: one of ``SAMPLERS`` (default ``"auto"``)."""
        return self._sampler

    @sampler.setter
    def sampler(self, value: str) -> None:
        if value not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {value!r}")
        self._sampler = value

    @property
    def backward(self) -> str:
        """What backward keeps of a training mixing: one of ``BACKWARD_MODES`` (default ``"auto"``)."""
        return self._backward

    @backward.setter
    def backward(self, value: str) -> None:
        if value not in BACKWARD_MODES:
            raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {value!r}")
        self._backward = value

    def resolved_sampler(self) -> str:
        """The sampler a training forward uses now, for the copies' current device and dtype."""
        copies = self.copies
        return resolve_sampler(
            self._sampler, copies.device, copies.dtype, self.expansion, self.num_virtual
        )

    def saves_p(self, sampler: str | None = None) -> bool:
        """Whether a training forward with ``sampler`` (default: the resolved one) keeps ``p`` for
        backward; else backward regenerates it."""
        if self._backward == "auto":
            sampler = sampler or self.resolved_sampler()
            return self.copies.device.type == "cpu" and sampler != "compiled"
        return self._backward == "save"

    def draw(self) -> MixingDraw:
        """The next training mixing of the model's stream (advances ``stream.step``)."""
        copies = self.copies
        sampler = self.resolved_sampler()
        return MixingDraw(
            seed=self.stream.next_seed(),
            expansion=self.expansion,
            numel=self.num_virtual,
            device=copies.device,
            dtype=copies.dtype,
            sampler=sampler,
        )

    def mix(self, p: torch.Tensor) -> torch.Tensor:
        """``sum_k p_k * copies_k``: the flat virtual weights for mixing probabilities ``p``
        (differentiable with respect to the copies and to ``p``)."""
        return FixedMixing.apply(self.copies, p)

    def mix_sampled(self, draw: MixingDraw) -> torch.Tensor:
        """The flat virtual weights for the training mixing ``draw`` (what train mode uses)."""
        self.last_sampler = draw.sampler
        return SampledMixing.apply(self.copies, draw, self.saves_p(draw.sampler))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A Dirichlet(1..1) mixing ``p`` shaped like ``copies``.

        Without ``generator``: the next draw of the stream, exactly as a training forward would
        draw it (advancing the stream). With one: a draw from that generator, the stream untouched.
        """
        if generator is None:
            return self.draw().p()
        copies = self.copies
        return sample_dirichlet(
            self.expansion,
            self.num_virtual,
            device=copies.device,
            dtype=copies.dtype,
            generator=generator,
        )

    def refresh(self) -> None:
        """Recompute the weights the layers see; called before every forward of the root model.

        Under ``torch.compile`` it runs outside the graph (:mod:`sopkit.mk.graph`)."""
        if compiling():
            call_outside_graph(MajorityKernels.refresh, self)
            return
        if self.fixed_weights is not None:
            self.assign(self.fixed_weights)
        elif self.fixed_mixing is not None:
            self.assign(self.mix(self.fixed_mixing))
        elif self.root.training:
            self.assign(self.mix_sampled(self.draw()))
        elif torch.is_grad_enabled():
            self.assign(self.mean_weights())
        else:
            # Recomputed at every eval forward, never cached: one pass over the copies is small
            # against the forward pass itself, and a cache would need to know when the copies
            # change, which torch's fused optimizers do not tell (they leave the version counter).
            self.assign(self.mean_weights(pooled=True))

    def assign(self, flat: torch.Tensor) -> None:
        """Hand every bound layer its view of the flat weights ``flat`` (length N)."""
        # split's backward is one concatenation, so gradients of all layers land in one buffer.
        pieces = torch.split(flat, [k.numel for k in self.kernels])
        for kernel, piece in zip(self.kernels, pieces, strict=True):
            weight = piece.view(kernel.shape)
            for module, attribute in kernel.bindings:
                setattr(module, attribute, weight)

    def release(self) -> None:
        """Replace the layers' weights by detached views after a forward pass.

        The autograd graph keeps what backward needs; the modules then hold no reference to the graph,
        so a forward without a backward does not keep activations alive and the model can be deep-copied.
        """
        if compiling():  # module attributes set eagerly, as refresh sets them
            call_outside_graph(MajorityKernels.release, self)
            return
        for kernel in self.kernels:
            for module, attribute in kernel.bindings:
                weight = getattr(module, attribute)
                if weight.requires_grad:
                    setattr(module, attribute, weight.detach())

    def install_hooks(self) -> None:
        """Register the refresh and release hooks on the root model."""
        self.hook_handles = [
            self.root.register_forward_pre_hook(refresh_before_forward),
            self.root.register_forward_hook(release_after_forward),
        ]

    def remove_hooks(self) -> None:
        """Remove the hooks ``install_hooks`` registered (and nothing else)."""
        for handle in self.hook_handles:
            handle.remove()
        self.hook_handles = []

    def __repr__(self) -> str:
        return (
            f"MajorityKernels(expansion={self.expansion}, kernels={len(self.kernels)}, "
            f"virtual_params={self.num_virtual}, stream={self.stream})"
        )




def refresh_before_forward(model: nn.Module, args: object) -> None:
    """The root's forward pre-hook: recompute the layers' weights."""
    model.__dict__[HOLDER_NAME].refresh()


def release_after_forward(model: nn.Module, args: object, output: object) -> None:
    """The root's forward hook: detach the layers' weights from the graph."""
    model.__dict__[HOLDER_NAME].release()


def find_majority(model: nn.Module) -> MajorityKernels | None:
    """The ``MajorityKernels`` of an expanded model, or None for an ordinary one. A model wrapped in
    ``DistributedDataParallel`` (or ``DataParallel``) is seen through: its ``.module``'s, and so is
    the module ``torch.compile`` returned."""
    model = uncompiled(model)
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    holder = model.__dict__.get(HOLDER_NAME)
    return holder if isinstance(holder, MajorityKernels) else None


def is_expanded(model: nn.Module) -> bool:
    """Whether ``model`` (or any submodule) still carries majority kernels."""
    return any(find_majority(m) is not None for m in model.modules())


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter elements (tied parameters are counted once)."""
    return sum(p.numel() for p in model.parameters())
