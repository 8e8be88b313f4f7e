"""Every use of a private torch API in sopkit and its plugin, each behind one probe with a fallback.

A torch upgrade may rename, remove or change a private API without notice. Each use listed in
``PRIVATE_USES`` therefore goes through this module: a probe checks once per process that the API
exists and behaves as sopkit needs on this torch, and where it does not, the caller takes a public
fallback that gives the same results (within rounding where the entry says so). An upgrade can then
cost speed, never correctness. Where a public API does the job, the private use was removed
instead; the table keeps those entries (``status="removed"``) so that nobody adds them back.

Each fallback is exercised by a test that forces its probe off (``tests/test_torch_private.py`` and
the tests named in the table). Users can force probes off too, for example to rule out a private
API when chasing a bug: ``SOPKIT_TORCH_PRIVATE_OFF=mkldnn_linear,tensor_version`` (or ``all``).

Adding a use: add an entry here, a probe in ``_PROBES``, call it through :func:`usable`, and test
the fallback by forcing the probe off.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "ENV_OFF",
    "PRIVATE_USES",
    "PrivateUse",
    "compiled_module_inner",
    "dynamo_graph_break",
    "enabled",
    "mkldnn_linear",
    "tensor_version",
    "usable",
]

#: Environment variable naming probes to force off (comma-separated names, or ``all``).
ENV_OFF = "SOPKIT_TORCH_PRIVATE_OFF"


@dataclass(frozen=True)
class PrivateUse:
    """One use of a private torch API: what, where, and what runs without it."""

    name: str  # the probe's name (what ``usable`` and SOPKIT_TORCH_PRIVATE_OFF take)
    api: str
    used_by: str
    status: Literal["probed", "removed"]
    fallback: str
    tested_by: str


PRIVATE_USES: tuple[PrivateUse, ...] = (
    PrivateUse(
        name="mkldnn_linear",
        api="torch.ops.mkldnn._linear_pointwise",
        used_by="sopkit_baselines.submodular.inner_products (the subset baseline's similarities)",
        status="probed",
        fallback="a @ b.T (torch's matmul): the same products summed in another order, so "
        "entries differ by rounding (an ulp or so)",
        tested_by="baselines/tests/test_baselines_submodular.py::"
        "test_inner_products_without_onednn_are_the_matmul",
    ),
    PrivateUse(
        name="inductor",
        api="torch.compile's inductor CPU code generation (the generated kernels must compute "
        "exactly what the uncompiled functions compute; torch._dynamo is no longer called)",
        used_by="sopkit.mk.compiled (the 'compiled' sampler) and the fused adversarial MK path",
        status="probed",
        fallback="the 'sfc64' sampler under sampler='auto' and the reference (unfused) adversarial "
        "path: the same Dirichlet(1..1) distribution from other random bits, so a seed gives "
        "other draws; a result records the sampler it used (extra['mk_sampler'])",
        tested_by="tests/test_torch_private.py::test_without_inductor_auto_takes_sfc64_*",
    ),
    PrivateUse(
        name="dynamo",
        api="torch._dynamo.graph_break (a graph break with a message) and "
        "torch._dynamo.eval_frame.OptimizedModule._orig_mod (what torch.compile(module) wraps); "
        "only looked up once torch.compile has imported torch._dynamo",
        used_by="sopkit.mk.graph (an expanded model under torch.compile)",
        status="probed",
        fallback="no graph break of sopkit's own before the eager mixing: dynamo breaks the graph "
        "at torch.compiler.disable instead, so training is the same and only fullgraph=True's "
        "error lacks sopkit's message; and find_majority / collapse do not see through what "
        "torch.compile returned (collapse the module that was compiled, or compile in place)",
        tested_by="tests/test_compile.py::test_without_dynamo_internals_*",
    ),
    PrivateUse(
        name="tensor_version",
        api="torch.Tensor._version (the in-place version counter)",
        used_by="sopkit_baselines.subnetwork (the subset baseline's similarity cache keys)",
        status="probed",
        fallback="no caching: every key is new, so similarities are recomputed "
        "(bit-identical results, slower)",
        tested_by="tests/test_torch_private.py::test_without_version_counters_*",
    ),
    PrivateUse(
        name="module_parameters",
        api="nn.Module._parameters (rewritten by expand/collapse)",
        used_by="sopkit.mk.convert",
        status="removed",
        fallback="delattr / register_parameter / getattr, and parameter order restored by "
        "re-registering in the original order",
        tested_by="tests/test_majority.py (state_dict keys and order after collapse)",
    ),
    PrivateUse(
        name="module_hooks",
        api="nn.Module._forward_pre_hooks / _forward_hooks (scanned by collapse)",
        used_by="sopkit.mk.convert.collapse",
        status="removed",
        fallback="the RemovableHandles that register_forward_(pre_)hook returned, kept by the "
        "MajorityKernels container (a deep copy's handles point at the copy's hooks)",
        tested_by="tests/test_majority.py::test_collapse_removes_only_its_own_hooks",
    ),
)


def _forced_off() -> set[str]:
    return {name.strip() for name in os.environ.get(ENV_OFF, "").split(",") if name.strip()}


def enabled(name: str) -> bool:
    """Whether the probe ``name`` is not forced off (``SOPKIT_TORCH_PRIVATE_OFF``)."""
    off = _forced_off()
    return not ({name, "all"} & off)


@functools.cache
def _mkldnn_linear_works() -> bool:
    """oneDNN's matmul exists and computes ``a @ b.T`` on a small product."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        a = torch.arange(6.0).reshape(2, 3)
        b = torch.arange(12.0).reshape(4, 3) - 5
        product = torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.equal(product, a @ b.T))


@functools.cache
def _tensor_version_works() -> bool:
    """``_version`` exists, is an int, and moves with the in-place writes sopkit relies on: a plain
    in-place op, a write through a view, and ``copy_`` (what ``load_state_dict`` does).

    (torch's fused optimizer kernels write parameters without moving it; callers that must see
    optimizer steps count them separately, see ``sopkit.mk.kernels.optimizer_steps``.)
    """
    try:
        tensor = torch.zeros(4)
        seen = [tensor._version]
        tensor.add_(1.0)
        seen.append(tensor._version)
        tensor[1:].mul_(2.0)
        seen.append(tensor._version)
        tensor.copy_(torch.ones(4))
        seen.append(tensor._version)
    except (AttributeError, RuntimeError, TypeError):
        return False
    return all(isinstance(v, int) for v in seen) and all(a < b for a, b in itertools.pairwise(seen))


def _inductor_works() -> bool:
    from sopkit.mk import compiled  # lazy: compiling imports a lot; the probe is its check

    return compiled.available(3)


@functools.cache
def _dynamo_works() -> bool:
    """``graph_break`` and ``OptimizedModule`` with ``_orig_mod`` exist (imports torch._dynamo:
    callers ask only once torch.compile has imported it)."""
    try:
        import torch._dynamo
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:
        return False
    if not callable(getattr(torch._dynamo, "graph_break", None)):
        return False
    inner = torch.nn.Identity()
    wrapped = torch.compile(inner)  # lazy: compiles nothing until called
    return isinstance(wrapped, OptimizedModule) and getattr(wrapped, "_orig_mod", None) is inner


_PROBES: dict[str, Callable[[], bool]] = {
    "mkldnn_linear": _mkldnn_linear_works,
    "tensor_version": _tensor_version_works,
    "inductor": _inductor_works,
    "dynamo": _dynamo_works,
}


def usable(name: str) -> bool:
    """Whether the private API ``name`` may be used here: not forced off, and its probe passes."""
    if name not in _PROBES:
        raise KeyError(f"no probe named {name!r}; probes: {', '.join(sorted(_PROBES))}")
    return enabled(name) and _PROBES[name]()


def dynamo_graph_break(message: str) -> None:
    """``torch._dynamo.graph_break(msg=message)`` where it exists, else nothing. Called only while
    dynamo traces (so torch._dynamo is imported), and traced itself: no probe call in it."""
    from torch import _dynamo

    graph_break = getattr(_dynamo, "graph_break", None)
    if graph_break is not None:
        graph_break(msg=message)


def compiled_module_inner(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module ``torch.compile(module)`` wrapped, when ``model`` is what it returned (an
    ``OptimizedModule``); None otherwise, and where the ``"dynamo"`` probe is off."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is None or not usable("dynamo"):  # not imported: nothing was compiled
        return None
    wrapper = getattr(eval_frame, "OptimizedModule", None)
    if wrapper is None or not isinstance(model, wrapper):
        return None
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) else None


def mkldnn_linear(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` by oneDNN's matmul. Only call after ``usable("mkldnn_linear")``."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


# Fallback keys: never equal to one another, nor to a real version (those are >= 0).
_fresh_versions = itertools.count(-1, -1)


def tensor_version(tensor: torch.Tensor) -> int:
    """The in-place version counter of ``tensor``, for cache keys: equal keys mean unchanged.

    Without a working counter, a number never returned before, so a cache keyed on it always
    misses (correct, slower).
    """
    if usable("tensor_version"):
        return int(tensor._version)
    return next(_fresh_versions)
