"""How an expanded model meets ``torch.compile``: the mixing runs outside the compiled graph.

``torch.compile(sopkit.expand(model))`` traces the root's forward pre-hook with the rest of the
forward. What that hook does cannot be traced: drawing ``p`` advances the model's random stream
(Python state), seeds it with numpy's ``SeedSequence``, and fills pooled numpy buffers on a thread
pool. So :meth:`~sopkit.mk.kernels.MajorityKernels.refresh` and ``release`` leave the graph while
dynamo traces them: a graph break, then the same code run eagerly (``torch.compiler.disable``).
The layers' weights it hands out are then inputs of the compiled graph, and their gradient flows
back into the eager mixing's autograd Function, which gives the copies exactly the gradient eager
mode gives (``tests/test_compile.py`` compares them).

Why not trace the draw: the draw of step ``t`` is a function of ``(seed, t)`` where ``t`` is a
Python integer that changes every step; traced, it would be a constant of the graph and force a
recompilation at every step. A custom op holding the stream as a tensor could make the whole
forward one graph (``fullgraph=True``); that is not done, so ``fullgraph=True`` fails, with
``FULLGRAPH_MESSAGE`` in dynamo's error.

Why the wrappers are made on first use, not at import: ``torch.compiler.disable`` imports
``torch._dynamo``, which costs seconds, and an eager user never needs it. The first trace makes
them (one extra graph break on that trace); every later trace finds them.

Two private torch APIs are used, behind the ``"dynamo"`` probe of :mod:`sopkit.torch_private`:
``torch._dynamo.graph_break`` (for ``FULLGRAPH_MESSAGE``) and ``OptimizedModule._orig_mod``
(:func:`uncompiled`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sopkit import torch_private

__all__ = ["FULLGRAPH_MESSAGE", "call_outside_graph", "compiling", "uncompiled"]

#: What ``torch.compile(expanded, fullgraph=True)`` reports (inside dynamo's ``Unsupported`` error).
FULLGRAPH_MESSAGE = (
    "sopkit: an expanded (majority-kernel) model draws its mixing p and mixes its copies outside "
    "the compiled graph, so torch.compile(..., fullgraph=True) cannot compile it; use "
    "fullgraph=False (the default): the draw is one graph break before the forward"
)

# SOPKIT_TORCH_PRIVATE_OFF=dynamo (read once, at import) turns sopkit's own graph break off.
_GRAPH_BREAK_ALLOWED = torch_private.enabled("dynamo")

_REASON = "sopkit draws the majority-kernel mixing eagerly (Python random stream, numpy buffers)"

# function -> the same function under torch.compiler.disable, made at its first use.
_outside: dict[Callable[..., Any], Callable[..., Any]] = {}


def compiling() -> bool:
    """Whether dynamo is tracing the caller now (``torch.compiler.is_compiling``; always False in
    eager code, including code a compiled function runs under ``torch.compiler.disable``)."""
    return torch.compiler.is_compiling()


def _outside_graph(function: Callable[..., Any]) -> Callable[..., Any]:
    wrapped = _outside.get(function)
    if wrapped is None:
        wrapped = _outside[function] = torch.compiler.disable(function, reason=_REASON)
    return wrapped


def call_outside_graph(function: Callable[..., Any], *args: Any) -> Any:
    """Call ``function(*args)`` eagerly from code dynamo is tracing: a graph break that carries
    ``FULLGRAPH_MESSAGE`` (what ``fullgraph=True`` reports), then the call under
    ``torch.compiler.disable``, so nothing ``function`` calls is traced either."""
    if _GRAPH_BREAK_ALLOWED:  # a module constant: read while dynamo traces, no probe to trace
        torch_private.dynamo_graph_break(FULLGRAPH_MESSAGE)
    return _outside_graph(function)(*args)


def uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module ``torch.compile(module)`` wrapped, for ``model`` that it returned; else ``model``.

    (``torch.compile`` of a module returns an ``OptimizedModule`` holding it as ``_orig_mod``:
    what ``find_majority`` and ``collapse`` look at. ``module.compile()`` compiles in place and
    needs nothing.)"""
    inner = torch_private.compiled_module_inner(model)
    return model if inner is None else inner
