"""Entry points into an expanded model that bypass its root: where the mixing must also be refreshed.

An expanded model's layers get their weights from a forward pre-hook on the root module
(:mod:`sopkit.mk.kernels`). Hugging Face models are also called through their submodules: an
encoder-decoder's ``generate()`` runs ``get_encoder()(...)`` directly, and a pretrained model
wrapped in an adapter (``sopkit.models.hf``) may be called, or asked to ``generate()``, without the
adapter. Those calls would see whatever the layers held last, the last *training* draw included.

``install_entry_hooks`` puts a pre-hook on every such entry that refreshes the weights exactly as
the root does (the mean of the copies in eval mode, a fresh draw in train mode), but only when the
call does not come from inside a forward of the root or of another entry: a :class:`EntryGuard`
shared by the root and the entries counts the forwards in progress, so a normal forward through the
root still draws one ``p``. The guard lives in the modules' ``__dict__`` (a deep copy of the model
gets its own, bound to the copy's container); the hooks' handles join the container's, so
``collapse`` removes them with its own.

Entries are found without importing transformers: a submodule whose class derives from a class
named ``PreTrainedModel`` defined in a ``transformers`` module, and what such a model's
``get_encoder()`` returns.
"""

from __future__ import annotations

from torch import nn

from sopkit.mk.kernels import MajorityKernels

__all__ = ["ENTRY_ATTRIBUTE", "EntryGuard", "entry_modules", "install_entry_hooks"]

#: Where the root and every entry keep their shared :class:`EntryGuard`.
ENTRY_ATTRIBUTE = "_sopkit_entry_guard"


class EntryGuard:
    """The container of an expanded model and how many forwards of its root or entries are running."""

    def __init__(self, holder: MajorityKernels) -> None:
        self.holder = holder
        self.depth = 0


def _is_hf_model(module: nn.Module) -> bool:
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers")
        for cls in type(module).__mro__
    )


def entry_modules(root: nn.Module) -> list[nn.Module]:
    """The submodules of ``root`` (never ``root`` itself) that a library may call directly."""
    found: dict[int, nn.Module] = {}
    for module in root.modules():
        if not _is_hf_model(module):
            continue
        if module is not root:
            found.setdefault(id(module), module)
        get_encoder = getattr(module, "get_encoder", None)
        if callable(get_encoder):
            try:
                encoder = get_encoder()
            except (AttributeError, NotImplementedError):
                encoder = None  # a model without an encoder
            if isinstance(encoder, nn.Module) and encoder is not root:
                found.setdefault(id(encoder), encoder)
    return list(found.values())


def _enter(module: nn.Module, args: object) -> None:
    module.__dict__[ENTRY_ATTRIBUTE].depth += 1


def _leave(module: nn.Module, args: object, output: object) -> None:
    module.__dict__[ENTRY_ATTRIBUTE].depth -= 1


def _refresh_if_outermost(module: nn.Module, args: object) -> None:
    guard: EntryGuard = module.__dict__[ENTRY_ATTRIBUTE]
    if guard.depth == 0:  # called from outside: hand the layers the weights the root would
        guard.holder.refresh()
    guard.depth += 1


def _release_if_outermost(module: nn.Module, args: object, output: object) -> None:
    guard: EntryGuard = module.__dict__[ENTRY_ATTRIBUTE]
    guard.depth -= 1
    if guard.depth == 0:
        guard.holder.release()


def install_entry_hooks(root: nn.Module, holder: MajorityKernels) -> int:
    """Guard the entries of the expanded ``root`` (after its own hooks are installed); returns how
    many entries were found. Nothing is installed on a model without entries."""
    entries = entry_modules(root)
    if not entries:
        return 0
    guard = EntryGuard(holder)
    root.__dict__[ENTRY_ATTRIBUTE] = guard
    handles = [
        root.register_forward_pre_hook(_enter),
        # always_call: a forward that raises still leaves, or later direct calls would be skipped.
        root.register_forward_hook(_leave, always_call=True),
    ]
    for entry in entries:
        entry.__dict__[ENTRY_ATTRIBUTE] = guard
        handles.append(entry.register_forward_pre_hook(_refresh_if_outermost))
        handles.append(entry.register_forward_hook(_release_if_outermost, always_call=True))
    holder.hook_handles.extend(handles)
    return len(entries)
