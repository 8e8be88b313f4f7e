"""Majority kernels: paper Section 4, Algorithm 4.1, Eq. 4.2.

``expand(model)`` turns selected weights of any ``nn.Module`` into majority kernels: every weight ``w``
of shape ``S`` is backed by ``e`` copies ``w~`` of shape ``(e, *S)``. In a training forward pass the
weight a layer sees is ``sum_k p_k * w~_k`` with a fresh Dirichlet(1, ..., 1) vector ``p`` per weight
element; in eval mode it is the uniform mean. ``collapse(model)`` returns the ordinary model with the
mean weights: the same classes, the same ``state_dict`` keys, the same parameter count as the original.

Layout, and why. All expanded weights of a model live in ONE flat parameter ``copies`` of shape
``(e, N)`` held by a ``MajorityKernels`` submodule. One forward pre-hook on the root model draws one
``p`` of shape ``(e, N)`` with one random-number call, mixes once, and hands each layer a view of the
result as a plain tensor attribute. Compared with ``torch.nn.utils.parametrize`` (about 100 us per
tensor per forward, and a weight read twice would see two different ``p``) this is one RNG call,
one reduction and one ``split`` per step, tied weights see a single ``p`` by construction, and the
optimizer sees a single tensor.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from sopkit.errors import UserError

__all__ = [
    "EXPANDABLE",
    "INIT_MODES",
    "MajorityKernels",
    "collapse",
    "count_parameters",
    "expand",
    "find_majority",
    "is_expanded",
    "sample_dirichlet",
]

InitMode = Literal["independent", "variance-preserving", "replicate"]
INIT_MODES: tuple[str, ...] = ("independent", "variance-preserving", "replicate")

# Where an expanded root model keeps its copies (a parameter) and their bookkeeping (a plain object).
COPIES_NAME = "sopkit_copies"
HOLDER_NAME = "_sopkit_majority"

# Which parameters of which layer types are expanded by default (a type-to-handler table, so that a
# user can teach ``expand`` about a custom layer with ``EXPANDABLE[MyLayer] = ("kernel",)``).
# Biases and normalisation parameters stay single, as in the paper (``b`` in Algorithm 4.1).
EXPANDABLE: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Linear: ("weight",),
    nn.Bilinear: ("weight",),
    nn.Conv1d: ("weight",),
    nn.Conv2d: ("weight",),
    nn.Conv3d: ("weight",),
    nn.ConvTranspose1d: ("weight",),
    nn.ConvTranspose2d: ("weight",),
    nn.ConvTranspose3d: ("weight",),
    nn.Embedding: ("weight",),
    nn.EmbeddingBag: ("weight",),
    # The output projection of attention is an nn.Linear subclass and is covered above.
    nn.MultiheadAttention: ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"),
}


def sample_dirichlet(
    expansion: int,
    numel: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``numel`` independent Dirichlet(1, ..., 1) vectors as an ``(expansion, numel)`` tensor.

    This is exactly the distribution of Eq. 4.2 (e Exponential(1) draws normalised to sum 1), sampled
    by uniform spacings: the gaps between ``e - 1`` sorted Uniform(0, 1) points are Dirichlet(1..1).
    It needs ``e - 1`` uniforms per element instead of ``e`` exponentials, and uniforms are several
    times cheaper than ``exponential_`` on the CPU (see BENCHMARKS.md); for e = 2 and 3 the sort is a
    min/max.
    """
    if expansion < 2:
        raise ValueError(f"expansion must be at least 2, got {expansion}")
    u = torch.rand(expansion - 1, numel, device=device, dtype=dtype, generator=generator)
    if expansion == 2:
        return torch.stack((u[0], 1 - u[0]))
    if expansion == 3:
        low, high = torch.minimum(u[0], u[1]), torch.maximum(u[0], u[1])
        return torch.stack((low, high - low, 1 - high))
    edges = u.sort(dim=0).values
    zero = edges.new_zeros(1, numel)
    one = edges.new_ones(1, numel)
    return torch.diff(torch.cat((zero, edges, one)), dim=0)


@dataclass
class _Kernel:
    """One expanded weight: where its slice of the flat buffer is, and every place it is bound."""

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

    - train mode: ``sum_k p_k * copies_k`` with a fresh Dirichlet ``p`` (Eq. 4.2);
    - eval mode: the uniform mean;
    - ``fixed_mixing`` set (a tensor shaped like ``copies``): that ``p``, for tests and adversarial MK.
    """

    def __init__(self, root: nn.Module, expansion: int, kernels: list[_Kernel]) -> None:
        self.root = root
        self.expansion = expansion
        self.kernels = kernels
        self.fixed_mixing: torch.Tensor | None = None
        # Eval-mode weights are recomputed only when the copies changed (an optimizer step bumps the
        # tensor's version counter), so a validation pass over many batches mixes once.
        self._eval_cache_key: tuple[int, int, torch.device, torch.dtype] | None = None

    @property
    def copies(self) -> nn.Parameter:
        """The ``(expansion, N)`` parameter holding every copy of every expanded weight."""
        return self.root._parameters[COPIES_NAME]  # type: ignore[return-value]

    @property
    def num_virtual(self) -> int:
        """Number of elements of all expanded weights, counted once (N)."""
        return self.copies.shape[1]

    def mean_weights(self) -> torch.Tensor:
        """The collapsed (inference) weights as one flat tensor of length N."""
        return self.copies.mean(dim=0)

    def mix(self, p: torch.Tensor) -> torch.Tensor:
        """``sum_k p_k * copies_k``: the flat virtual weights for mixing probabilities ``p``."""
        return (p * self.copies).sum(dim=0)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh Dirichlet(1..1) mixing ``p`` shaped like ``copies``."""
        copies = self.copies
        return sample_dirichlet(
            self.expansion,
            self.num_virtual,
            device=copies.device,
            dtype=copies.dtype,
            generator=generator,
        )

    def refresh(self) -> None:
        """Recompute the weights the layers see; called before every forward of the root model."""
        if self.fixed_mixing is not None:
            self.assign(self.mix(self.fixed_mixing))
        elif self.root.training:
            self.assign(self.mix(self.sample()))
        elif torch.is_grad_enabled():
            self._eval_cache_key = None
            self.assign(self.mean_weights())
        else:
            copies = self.copies
            key = (copies.data_ptr(), copies._version, copies.device, copies.dtype)
            if key != self._eval_cache_key:
                self.assign(self.mean_weights())
                self._eval_cache_key = key

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
        for kernel in self.kernels:
            for module, attribute in kernel.bindings:
                weight = getattr(module, attribute)
                if weight.requires_grad:
                    setattr(module, attribute, weight.detach())

    def __repr__(self) -> str:
        return (
            f"MajorityKernels(expansion={self.expansion}, kernels={len(self.kernels)}, "
            f"virtual_params={self.num_virtual})"
        )


def _refresh_before_forward(model: nn.Module, args: object) -> None:
    model.__dict__[HOLDER_NAME].refresh()


def _release_after_forward(model: nn.Module, args: object, output: object) -> None:
    model.__dict__[HOLDER_NAME].release()


def find_majority(model: nn.Module) -> MajorityKernels | None:
    """The ``MajorityKernels`` of an expanded model, or None for an ordinary one."""
    holder = model.__dict__.get(HOLDER_NAME)
    return holder if isinstance(holder, MajorityKernels) else None


def is_expanded(model: nn.Module) -> bool:
    """Whether ``model`` (or any submodule) still carries majority kernels."""
    return any(find_majority(m) is not None for m in model.modules())


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter elements (tied parameters are counted once)."""
    return sum(p.numel() for p in model.parameters())


def _default_selected(module: nn.Module, attribute: str) -> bool:
    for layer_type, attributes in EXPANDABLE.items():
        if isinstance(module, layer_type) and attribute in attributes:
            return True
    return False


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _selected_parameters(
    model: nn.Module, include: Sequence[str], exclude: Sequence[str]
) -> list[tuple[nn.Parameter, list[str], list[tuple[nn.Module, str]]]]:
    """Parameters to expand, each with all its qualified names and binding sites (tied weights)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    by_identity: dict[int, tuple[nn.Parameter, list[str], list[tuple[nn.Module, str]]]] = {}
    for qualified, parameter in model.named_parameters(remove_duplicate=False):
        owner_name, _, attribute = qualified.rpartition(".")
        owner = modules[owner_name]
        entry = by_identity.setdefault(id(parameter), (parameter, [], []))
        entry[1].append(qualified)
        if not any(m is owner and a == attribute for m, a in entry[2]):
            entry[2].append((owner, attribute))
    selected = []
    for parameter, names, bindings in by_identity.values():
        chosen = any(_default_selected(m, a) for m, a in bindings) or any(
            _matches(n, include) for n in names
        )
        if chosen and not any(_matches(n, exclude) for n in names):
            selected.append((parameter, names, bindings))
    return selected


def _initial_copies(
    weight: torch.Tensor, expansion: int, init: str, generator: torch.Generator
) -> torch.Tensor:
    """The ``(expansion, *shape)`` copies of one weight under an initialisation mode.

    - ``replicate``: every copy equals the weight; the mean is exactly the original (upcycling a
      pretrained checkpoint, as the paper does for T5).
    - ``independent``: copy 0 is the weight, the others are independent draws from its
      initialisation. They are drawn as random permutations of the weight's own elements, which for
      the element-wise i.i.d. initialisations PyTorch layers use is a draw from the same distribution,
      and works for any parameter, custom layers included. The mean then has 1/e the usual variance.
    - ``variance-preserving``: the independent copies spread by sqrt(e) around the weight's mean,
      so that their average has the usual initialisation variance.
    """
    flat = weight.detach().reshape(-1)
    if init == "replicate":
        return flat.expand(expansion, -1).clone().view(expansion, *weight.shape)
    draws = [flat]
    for _ in range(expansion - 1):
        order = torch.randperm(flat.numel(), generator=generator).to(flat.device)
        draws.append(flat[order])
    copies = torch.stack(draws)
    if init == "variance-preserving":
        center = flat.mean()
        copies = center + math.sqrt(expansion) * (copies - center)
    return copies.view(expansion, *weight.shape)


def expand(
    model: nn.Module,
    expansion: int = 3,
    *,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    init: InitMode | str = "independent",
    seed: int | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Turn the weights of ``model`` into majority kernels with ``expansion`` copies each.

    Args:
        model: any ``nn.Module``. Linear, Bilinear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, Embedding,
            EmbeddingBag and the projections of ``nn.MultiheadAttention`` are expanded by default
            (see ``EXPANDABLE``); biases and normalisation parameters stay single, as in the paper.
        expansion: ``e``, the number of copies (at least 2).
        include: glob patterns over qualified parameter names (``"*.pos_embedding"``) to expand as well.
        exclude: glob patterns of parameters to leave single, applied last (``"head.*"``).
        init: how the copies start: ``"independent"``, ``"variance-preserving"`` or ``"replicate"``
            (see ``_initial_copies``).
        seed: seeds the draws of the copies; None draws from torch's global generator, so
            ``torch.manual_seed`` controls it.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The expanded model: the same classes, with the copies in the parameter ``sopkit_copies``.
    """
    if expansion < 2:
        raise UserError(f"The expansion factor must be at least 2, got {expansion}.")
    if init not in INIT_MODES:
        raise UserError(
            f"Unknown initialisation {init!r}. Valid initialisations: {', '.join(INIT_MODES)}."
        )
    if is_expanded(model):
        raise UserError("This model is already expanded; collapse it before expanding again.")
    include, exclude = list(include), list(exclude)
    if not inplace:
        model = _copy_model(model)
    selected = _selected_parameters(model, include, exclude)
    if not selected:
        raise UserError(
            "expand() found no weight to turn into majority kernels: the model has no layer of a type "
            "in sopkit.majority.EXPANDABLE and no parameter matches the include patterns "
            f"{include or '(none)'}."
        )
    devices = {p.device for p, _, _ in selected}
    dtypes = {p.dtype for p, _, _ in selected}
    if len(devices) > 1 or len(dtypes) > 1:
        raise UserError(
            "expand() needs all expanded weights on one device with one dtype; found "
            f"devices {sorted(map(str, devices))} and dtypes {sorted(map(str, dtypes))}. "
            "Move the model with .to(...) first."
        )
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    generator = torch.Generator().manual_seed(seed)

    kernels: list[_Kernel] = []
    pieces: list[torch.Tensor] = []
    offset = 0
    for parameter, names, bindings in selected:
        copies = _initial_copies(parameter, expansion, init, generator)
        pieces.append(copies.reshape(expansion, -1))
        kernels.append(_Kernel(names[0], parameter.shape, offset, parameter.numel(), bindings))
        offset += parameter.numel()
        for module, attribute in bindings:
            # Parameter order inside each module is remembered so collapse() can restore it.
            module.__dict__.setdefault("_sopkit_parameter_order", list(module._parameters))
            del module._parameters[attribute]
    flat_copies = torch.cat(pieces, dim=1).contiguous()
    requires_grad = any(p.requires_grad for p, _, _ in selected)

    model.register_parameter(COPIES_NAME, nn.Parameter(flat_copies, requires_grad=requires_grad))
    holder = MajorityKernels(model, expansion, kernels)
    model.__dict__[HOLDER_NAME] = holder
    model.register_forward_pre_hook(_refresh_before_forward)
    model.register_forward_hook(_release_after_forward)
    with torch.no_grad():
        holder.assign(holder.mean_weights())
    return model


def _copy_model(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def collapse(model: nn.Module) -> nn.Module:
    """The ordinary model behind an expanded one: each weight is the mean of its copies.

    Works on a deep copy; ``model`` itself is untouched and keeps training. The result has the
    original classes, ``state_dict`` keys and parameter count, and loads with ``strict=True`` into a
    freshly built original architecture.
    """
    holder = find_majority(model)
    if holder is None:
        raise UserError("collapse() needs a model returned by sopkit.expand(); this one is not expanded.")
    with torch.no_grad():
        holder.release()
        collapsed = _copy_model(model)
    new_holder = find_majority(collapsed)
    assert new_holder is not None
    means = new_holder.mean_weights().detach()
    requires_grad = new_holder.copies.requires_grad
    for kernel in new_holder.kernels:
        value = means[kernel.offset : kernel.offset + kernel.numel].view(kernel.shape).clone()
        parameter = nn.Parameter(value, requires_grad=requires_grad)
        for module, attribute in kernel.bindings:
            module.__dict__.pop(attribute, None)
            module._parameters[attribute] = parameter
    for module in collapsed.modules():
        order = module.__dict__.pop("_sopkit_parameter_order", None)
        if order is not None:
            module._parameters = {name: module._parameters[name] for name in order}
    del collapsed._parameters[COPIES_NAME]
    del collapsed.__dict__[HOLDER_NAME]
    _remove_hooks(collapsed)
    return collapsed


def _remove_hooks(model: nn.Module) -> None:
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key, hook in list(hooks.items()):
            if hook in (_refresh_before_forward, _release_after_forward):
                del hooks[key]


@contextmanager
def fixed_mixing(model: nn.Module, p: torch.Tensor | Literal["uniform"]) -> Iterator[None]:
    """Use the mixing ``p`` (shape ``(e, N)``, or ``"uniform"``) for every forward inside the block.

    For tests (Lemma 4.3 uses uniform ``p``) and for strategies that choose ``p`` themselves
    (adversarial MK).
    """
    holder = find_majority(model)
    if holder is None:
        raise UserError("fixed_mixing() needs an expanded model.")
    if isinstance(p, str):
        if p != "uniform":
            raise ValueError(f"p must be a tensor or 'uniform', got {p!r}")
        p = torch.full_like(holder.copies, 1.0 / holder.expansion).detach()
    previous, holder.fixed_mixing = holder.fixed_mixing, p
    try:
        yield
    finally:
        holder.fixed_mixing = previous
