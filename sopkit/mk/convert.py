"""``expand`` and ``collapse``: turn a model's weights into majority kernels and back (paper
Section 4, Algorithm 4.1), which weights are expanded, how the copies start, and the context
managers that fix the mixing.

``expand(model)`` turns selected weights of any ``nn.Module`` into majority kernels: every weight
``w`` of shape ``S`` is backed by ``e`` copies ``w~`` of shape ``(e, *S)``. In a training forward
pass the weight a layer sees is ``sum_k p_k * w~_k`` with a fresh Dirichlet(1, ..., 1) vector ``p``
per weight element; in eval mode it is the uniform mean. ``collapse(model)`` returns the ordinary
model with the mean weights: the same classes, the same ``state_dict`` keys in the same order, the
same parameter count as the original.

Only public ``nn.Module`` API is used to move parameters (``delattr``, ``register_parameter``) and
to remove hooks (the handles registration returned); see :mod:`sopkit.torch_private`.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from sopkit.checks import DEFAULT_EXPANSION, check_expansion, check_int
from sopkit.errors import UserError
from sopkit.mk.entries import ENTRY_ATTRIBUTE, install_entry_hooks
from sopkit.mk.graph import uncompiled
from sopkit.mk.kernels import (
    COPIES_NAME,
    HOLDER_NAME,
    KernelSlice,
    MajorityKernels,
    find_majority,
    is_expanded,
)
from sopkit.mk.sampling import MixingStream, derive_seed

__all__ = [
    "DEFAULT_INIT",
    "EXPANDABLE",
    "EXPANDABLE_BY_NAME",
    "INIT_MODES",
    "STREAM_TAG",
    "collapse",
    "expand",
    "refuse_fsdp",
    "fixed_mixing",
    "fixed_weights",
]

InitMode = Literal["independent", "variance-preserving", "replicate"]
INIT_MODES: tuple[str, ...] = ("independent", "variance-preserving", "replicate")
# Chosen by measurement (README, "Choosing the initialisation"): on MNIST-1D, 200 epochs, 3-5 seeds,
# variance-preserving MK beat the baseline by +2.4 points (mlp-a2) and +7.0 (mlp-a3), ahead of
# independent (-0.2, +4.2) and replicate (+0.3 on mlp-a2).
DEFAULT_INIT = "variance-preserving"

#: The tag that derives a model's mixing-stream seed from the seed given to ``expand``.
STREAM_TAG = "sopkit.mk.mixing-stream"

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

# The same table for layer types of optional libraries, by qualified class name, so that sopkit
# recognises them without importing the library: GPT-2's Conv1D is a linear layer whose weight is
# stored transposed, (in, out).
EXPANDABLE_BY_NAME: dict[str, tuple[str, ...]] = {
    "transformers.pytorch_utils.Conv1D": ("weight",),
}

# Kept in a module's __dict__ while it is expanded: the order of its parameters before expand, so
# that collapse restores it (state_dict key order).
_ORDER_ATTRIBUTE = "_sopkit_parameter_order"


def _default_selected(module: nn.Module, attribute: str) -> bool:
    for layer_type, attributes in EXPANDABLE.items():
        if isinstance(module, layer_type) and attribute in attributes:
            return True
    for cls in type(module).__mro__:
        if attribute in EXPANDABLE_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}", ()):
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


def refuse_fsdp(model: nn.Module) -> None:
    """A UserError for a model with FSDP in it: all copies of an expanded model are one flat
    parameter, which FSDP would gather whole on every rank (nothing sharded, all communicated)."""
    # Class names, not imports: FSDP1's wrapper, and FSDP2's fully_shard, which swaps a module's
    # class for one deriving from FSDPModule.
    names = {"FullyShardedDataParallel", "FSDPModule"}
    if any(cls.__name__ in names for m in model.modules() for cls in type(m).__mro__):
        raise UserError(
            "FSDP is not supported: all majority-kernel copies of a model are one flat parameter, "
            "so FSDP would gather it whole on every rank. Use DistributedDataParallel (torchrun "
            "--nproc-per-node N -m sopkit compare ...); see the README, 'One trial on many GPUs'."
        )


def _parameter_names(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_parameters(recurse=False, remove_duplicate=False)]


def expand(
    model: nn.Module,
    expansion: int = DEFAULT_EXPANSION,
    *,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    init: InitMode | str = DEFAULT_INIT,
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
        init: how the copies start: ``"variance-preserving"`` (default), ``"independent"`` or
            ``"replicate"`` (see ``_initial_copies``).
        seed: decides the draws of the copies and the model's mixing stream (whose seed is derived
            from it with ``STREAM_TAG``). None draws it once from torch's global generator, so
            ``torch.manual_seed`` still decides everything; after that, training draws never touch
            the global generator. Two models expanded with the same seed mix alike (what lets
            data-parallel ranks draw the same ``p``).
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The expanded model: the same classes, with the copies in the parameter ``sopkit_copies``.
    """
    check_expansion(expansion, "expansion")
    if uncompiled(model) is not model:
        raise UserError(
            "expand() got a model torch.compile returned: expand the model first, then compile "
            "the expanded model (torch.compile(sopkit.expand(model)))."
        )
    refuse_fsdp(model)
    if seed is not None:
        check_int("seed", seed, minimum=0)
    if init not in INIT_MODES:
        raise UserError(
            f"Unknown initialisation {init!r}. Valid initialisations: {', '.join(INIT_MODES)}."
        )
    if is_expanded(model):
        raise UserError("This model is already expanded; collapse it before expanding again.")
    include, exclude = list(include), list(exclude)
    if not inplace:
        model = copy.deepcopy(model)
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

    kernels: list[KernelSlice] = []
    pieces: list[torch.Tensor] = []
    offset = 0
    for parameter, names, bindings in selected:
        copies = _initial_copies(parameter, expansion, init, generator)
        pieces.append(copies.reshape(expansion, -1))
        kernels.append(KernelSlice(names[0], parameter.shape, offset, parameter.numel(), bindings))
        offset += parameter.numel()
        for module, attribute in bindings:
            # Parameter order inside each module is remembered so collapse() can restore it.
            module.__dict__.setdefault(_ORDER_ATTRIBUTE, _parameter_names(module))
            delattr(module, attribute)
    flat_copies = torch.cat(pieces, dim=1).contiguous()
    requires_grad = any(p.requires_grad for p, _, _ in selected)

    model.register_parameter(COPIES_NAME, nn.Parameter(flat_copies, requires_grad=requires_grad))
    stream = MixingStream(derive_seed(seed, STREAM_TAG))
    holder = MajorityKernels(model, expansion, kernels, stream)
    model.__dict__[HOLDER_NAME] = holder
    holder.install_hooks()
    install_entry_hooks(model, holder)  # Hugging Face's generate() calls the encoder directly
    with torch.no_grad():
        holder.assign(holder.mean_weights())
    return model


def _restore_parameter_order(module: nn.Module, order: list[str]) -> None:
    """Re-register the parameters of ``module`` so that they are listed in ``order``."""
    current = _parameter_names(module)
    if current == order:
        return
    parameters = {name: getattr(module, name) for name in current}
    for name in current:
        delattr(module, name)
    for name in order:
        module.register_parameter(name, parameters[name])


def collapse(model: nn.Module) -> nn.Module:
    """The ordinary model behind an expanded one: each weight is the mean of its copies.

    Works on a deep copy; ``model`` itself is untouched and keeps training. The result has the
    original classes, ``state_dict`` keys and parameter count, and loads with ``strict=True`` into a
    freshly built original architecture. A model wrapped in ``DistributedDataParallel`` (or
    ``DataParallel``) collapses to its ``.module``'s ordinary model; FSDP is refused.
    """
    model = uncompiled(model)  # torch.compile(expanded) returns a wrapper of the expanded model
    refuse_fsdp(model)
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module  # copying the wrapper would copy its process group and buckets
    holder = find_majority(model)
    if holder is None:
        raise UserError(
            "collapse() needs a model returned by sopkit.expand(); this one is not expanded."
        )
    with torch.no_grad():
        holder.release()
        collapsed = copy.deepcopy(model)
    new_holder = find_majority(collapsed)
    assert new_holder is not None
    means = new_holder.mean_weights().detach()
    requires_grad = new_holder.copies.requires_grad
    for kernel in new_holder.kernels:
        value = means[kernel.offset : kernel.offset + kernel.numel].view(kernel.shape).clone()
        parameter = nn.Parameter(value, requires_grad=requires_grad)
        for module, attribute in kernel.bindings:
            if attribute in module.__dict__:
                delattr(module, attribute)  # the plain tensor the hooks assigned
            module.register_parameter(attribute, parameter)
    # A deep copy's handles point at the copy's hook dictionaries, so this removes the copy's
    # hooks only, and only sopkit's.
    new_holder.remove_hooks()
    delattr(collapsed, COPIES_NAME)
    del collapsed.__dict__[HOLDER_NAME]
    for module in collapsed.modules():
        module.__dict__.pop(ENTRY_ATTRIBUTE, None)  # its hooks went with remove_hooks()
        order = module.__dict__.pop(_ORDER_ATTRIBUTE, None)
        if order is not None:
            _restore_parameter_order(module, order)
    return collapsed


@contextmanager
def fixed_mixing(model: nn.Module, p: torch.Tensor | Literal["uniform"]) -> Iterator[None]:
    """Use the mixing ``p`` (shape ``(e, N)``, or ``"uniform"``) for every forward inside the block.

    For tests (Lemma 4.3 uses uniform ``p``) and for strategies that choose ``p`` themselves
    (adversarial MK). Forwards inside the block draw nothing from the model's stream.
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


@contextmanager
def fixed_weights(model: nn.Module, weights: torch.Tensor) -> Iterator[None]:
    """Use the flat virtual weights ``weights`` (length N, in the order of the copies' columns) for
    every forward inside the block; gradients flow to ``weights``.

    For strategies that form the virtual weights themselves: adversarial MK takes the gradient with
    respect to the uniform mixing's weights this way (one ``(N,)`` gradient instead of the copies'
    ``(e, N)``) and trains through its own fused mixing.
    """
    holder = find_majority(model)
    if holder is None:
        raise UserError("fixed_weights() needs an expanded model.")
    if weights.shape != (holder.num_virtual,):
        raise ValueError(f"weights must have shape ({holder.num_virtual},), got {tuple(weights.shape)}")
    previous, holder.fixed_weights = holder.fixed_weights, weights
    try:
        yield
    finally:
        holder.fixed_weights = previous
