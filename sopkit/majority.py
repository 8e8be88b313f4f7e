"""Majority kernels: paper Section 4, Algorithm 4.1, Eq. 4.2.

``expand(model)`` turns selected weights of any ``nn.Module`` into majority kernels: every weight ``w``
of shape ``S`` is backed by ``e`` copies ``w~`` of shape ``(e, *S)``. In a training forward pass the
weight a layer sees is ``sum_k p_k * w~_k`` with a fresh Dirichlet(1, ..., 1) vector ``p`` per weight
element; in eval mode it is the uniform mean. ``collapse(model)`` returns the ordinary model with the
mean weights: the same classes, the same ``state_dict`` keys, the same parameter count as the original.

Layout, and why. All expanded weights of a model live in ONE flat parameter ``copies`` of shape
``(e, N)`` held by a ``MajorityKernels`` submodule. One forward pre-hook on the root model draws one
``p`` of shape ``(e, N)``, mixes once, and hands each layer a view of the result as a plain tensor
attribute. Compared with ``torch.nn.utils.parametrize`` (about 100 us per tensor per forward, and a
weight read twice would see two different ``p``) this is one draw, one mixing and one ``split`` per
step, tied weights see a single ``p`` by construction, and the optimizer sees a single tensor.

Speed, and why (numbers in BENCHMARKS.md). The mixing is a custom autograd Function
(``_SampledMixing``): forward computes ``w = sum_k p_k w~_k`` with fused multiply-adds, backward
``grad w~_k = p_k * grad w``, keeping either ``p`` or only the step's seed (``BACKWARD_MODES``).
``p`` is drawn by a sampler chosen per device (``SAMPLERS``): on the CPU numpy's SFC64 bit generator,
several times faster than torch's CPU ``rand``; on CUDA a fused Triton kernel that never writes ``p``
to memory and regenerates it in backward. All samplers draw exactly Dirichlet(1, ..., 1).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import itertools
import math
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from sopkit.errors import UserError

__all__ = [
    "BACKWARD_MODES",
    "EXPANDABLE",
    "INIT_MODES",
    "SAMPLERS",
    "MajorityKernels",
    "MixingDraw",
    "collapse",
    "count_parameters",
    "draw_seed",
    "expand",
    "find_majority",
    "is_expanded",
    "sample_dirichlet",
]

InitMode = Literal["independent", "variance-preserving", "replicate"]
INIT_MODES: tuple[str, ...] = ("independent", "variance-preserving", "replicate")
# Chosen by measurement (README, "Choosing the initialisation"): on MNIST-1D, 200 epochs, 3-5 seeds,
# variance-preserving MK beat the baseline by +2.4 points (mlp-a2) and +7.0 (mlp-a3), ahead of
# independent (-0.2, +4.2) and replicate (+0.3 on mlp-a2).
DEFAULT_INIT = "variance-preserving"

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


#: How the training mixing ``p`` of a step is drawn (``MajorityKernels.sampler``):
#:
#: - ``"sfc64"``: numpy's SFC64 bit generator, in fixed blocks of elements (CPU and float32 only;
#:   the default there). torch's CPU ``rand`` (one Mersenne Twister behind a lock, ~2.4 ns per
#:   float here) was most of an MK step; SFC64 gives 64 bits in ~1.8 ns, i.e. both uniforms of
#:   an e = 3 element, and the spacings are formed block by block while the words are in cache.
#: - ``"torch"``: ``torch.rand`` (any device and dtype).
#: - ``"triton"``: one fused CUDA kernel draws ``p`` with Philox and mixes, and one regenerates ``p``
#:   and forms the copies' gradient in backward (CUDA, e = 2 or 3, needs triton; default there).
#: - ``"auto"``: the first of these that applies.
#:
#: Every sampler draws uniforms on the grid ``k / 2**24`` (the grid of ``torch.rand`` in float32)
#: and forms ``p`` from their spacings, so all of them sample exactly Dirichlet(1, ..., 1).
SAMPLERS: tuple[str, ...] = ("auto", "sfc64", "torch", "triton")

#: What the backward pass of a training mixing uses (``MajorityKernels.backward``): ``"save"`` keeps
#: ``p`` (e numbers per weight element) from the forward pass; ``"regenerate"`` keeps only the seed
#: and draws ``p`` again (no tensor shaped like the copies is kept for backward). ``"auto"`` saves
#: on the CPU, where drawing is the bottleneck, and regenerates elsewhere, where memory is.
BACKWARD_MODES: tuple[str, ...] = ("auto", "save", "regenerate")

_GRID_BITS = 24
_GRID = float(1 << _GRID_BITS)  # uniforms are k / 2**24, k uniform in [0, 2**24), as torch.rand's
# Weight elements per SFC64 stream, which is also the unit of work of the CPU sampler: small enough
# that a block's words, uniforms and p stay in a core's L2 cache, large enough that numpy's per-call
# overhead is small. Fixed, so that a draw depends on its seed only, never on threads.
_SFC64_BLOCK = 1 << 16
# Weight elements per chunk when p is not kept whole (the regenerating path, either sampler): bounds
# its temporaries. A multiple of _SFC64_BLOCK; for the torch sampler, one seeded rand call.
_CHUNK = 1 << 20
_SEED_BOUND = 2**63 - 1


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A 63-bit seed from ``generator`` (torch's default CPU generator when None), so that
    ``torch.manual_seed`` decides every mixing drawn from it."""
    return int(torch.randint(0, _SEED_BOUND, (1,), generator=generator).item())


def _child_seed(seed: int, index: int) -> int:
    """The seed of stream ``index`` of a draw, hashed (not ``seed + index``) so that the streams of
    different steps never overlap in practice."""
    return int(np.random.SeedSequence((seed, index)).generate_state(1, np.uint64)[0] >> 1)


_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _reset_pool_after_fork() -> None:
    # Threads do not survive fork(); a child (e.g. a DataLoader worker) must start its own pool.
    global _pool, _pool_size
    _pool, _pool_size = None, 0


os.register_at_fork(after_in_child=_reset_pool_after_fork)


def _run_parallel(work: Callable[[int], None], items: int) -> None:
    """Call ``work(i)`` for every ``i < items`` on the calling thread and up to
    ``torch.get_num_threads() - 1`` pool threads (numpy releases the GIL in each call).

    Items are handed out one at a time rather than split in advance. Right after a parallel torch
    operation, torch's OpenMP workers keep spinning on the other cores for several milliseconds
    (libgomp's default wait policy), so in a training loop a pool thread gets only part of a core:
    on the 2-core machine a fixed half-and-half split of an mlp-a3 draw took ~4.5 ms against
    ~3.7 ms on one thread. Taking items as threads become free is never much worse than one thread
    and uses a core that is really free (with ``OMP_WAIT_POLICY=PASSIVE``: ~2.4 ms).
    """
    global _pool, _pool_size
    helpers = min(torch.get_num_threads(), items) - 1
    if helpers < 1:
        for i in range(items):
            work(i)
        return
    with _pool_lock:
        if _pool is None or _pool_size < helpers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool_size = helpers
            _pool = ThreadPoolExecutor(_pool_size, thread_name_prefix="sopkit-mixing")
        pool = _pool
    counter = itertools.count()  # next() on it is atomic under the GIL

    def drain() -> None:
        for i in iter(counter.__next__, None):
            if i >= items:
                return
            work(i)

    futures = [pool.submit(drain) for _ in range(helpers)]
    drain()
    for future in futures:
        future.result()


def _spacings(u: torch.Tensor, total: float, out: torch.Tensor) -> torch.Tensor:
    """Dirichlet(1, ..., 1) from ``e - 1`` uniform points on ``[0, total]`` per column (shape
    ``(e - 1, n)``): the gaps between the sorted points, written to ``out`` (shape ``(e, n)``).

    For e = 2 and 3 the sort is a copy or a min/max. (The torch sampler's path; the SFC64 sampler
    forms the same spacings in numpy, block by block.)
    """
    end = torch.tensor(total, dtype=out.dtype)  # a CPU scalar: works with tensors on any device
    e = u.shape[0] + 1
    if e == 2:
        out[0].copy_(u[0])
        torch.sub(end, u[0], out=out[1])
    elif e == 3:
        torch.minimum(u[0], u[1], out=out[0])
        torch.maximum(u[0], u[1], out=out[2])
        torch.sub(out[2], out[0], out=out[1])
        torch.sub(end, out[2], out=out[2])
    else:
        edges = u.sort(dim=0).values
        out[0].copy_(edges[0])
        torch.sub(edges[1:], edges[:-1], out=out[1:-1])
        torch.sub(end, edges[-1], out=out[-1])
    return out


class _BufferPool:
    """Large float32 numpy buffers, reused across steps once torch no longer holds them.

    A fresh multi-megabyte allocation is returned to the OS when freed and page-faults back in at
    its first write, every step. A buffer handed to torch with ``torch.from_numpy`` is referenced by
    the tensor's storage for as long as any tensor or view of it lives (saved for backward, a
    layer's weight, a ``.grad``); when the pool holds the only reference, no tensor can see it any
    more and it is safe to write again. At most ``limit`` buffers per shape are kept.
    """

    def __init__(self, limit: int = 4) -> None:
        self.limit = limit
        self._buffers: dict[tuple[int, ...], list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        with self._lock:
            buffers = self._buffers.setdefault(shape, [])
            for buffer in buffers:
                # References: the list, the loop variable and getrefcount's argument.
                if sys.getrefcount(buffer) == 3:
                    return buffer
            buffer = np.empty(shape, dtype=np.float32)
            if len(buffers) < self.limit:
                buffers.append(buffer)
            return buffer


_buffers = _BufferPool()


def _sfc64_fill(seed: int, expansion: int, start: int, out: np.ndarray) -> np.ndarray:
    """Write the ``"sfc64"`` mixing of ``seed`` for elements ``[start, start + n)`` into ``out``
    (float32, shape ``(expansion, n)``; ``start`` a multiple of the block size).

    Block ``j`` holds elements ``[j * B, (j + 1) * B)``; its ``e - 1`` uniforms per element come
    from an SFC64 stream seeded with ``SeedSequence((seed, j))``, so ``p`` depends on the seed
    alone, never on the thread count or on which range is asked for. Blocks are shared out over
    ``torch.get_num_threads()`` threads (numpy releases the GIL in each call); each block's words,
    uniforms and spacings are formed while they are in L2 rather than as whole-array passes.
    """
    e, n = expansion, out.shape[1]
    grid, scale = np.float32(_GRID), np.float32(1.0 / _GRID)
    starts = list(range(0, n, _SFC64_BLOCK))

    scratch = threading.local()  # one buffer for a block's uniforms per thread

    def run_block(index: int) -> None:
        u_scratch = getattr(scratch, "u", None)
        if u_scratch is None:
            u_scratch = scratch.u = np.empty((e - 1) * _SFC64_BLOCK + 1, dtype=np.float32)
        first = starts[index]
        last = min(first + _SFC64_BLOCK, n)
        size = last - first
        stream = np.random.SFC64(np.random.SeedSequence((seed, (start + first) // _SFC64_BLOCK)))
        bits = stream.random_raw(((e - 1) * size + 1) // 2).view(np.uint32)[: (e - 1) * size]
        # The top 24 bits of each 32-bit word are one uniform integer in [0, 2**24); the
        # shift writes them as float32 directly (exact below 2**24).
        u = u_scratch[: (e - 1) * size].reshape(e - 1, size)
        np.right_shift(bits.reshape(e - 1, size), 8, out=u, casting="unsafe")
        p = out[:, first:last]
        if e == 2:
            p[0] = u[0]
            np.subtract(grid, u[0], out=p[1])
        elif e == 3:
            np.minimum(u[0], u[1], out=p[0])
            np.maximum(u[0], u[1], out=p[2])
            np.subtract(p[2], p[0], out=p[1])
            np.subtract(grid, p[2], out=p[2])
        else:
            u.sort(axis=0)
            p[0] = u[0]
            np.subtract(u[1:], u[:-1], out=p[1:-1])
            np.subtract(grid, u[-1], out=p[-1])
        np.multiply(p, scale, out=p)  # exact: integers below 2**24 times a power of two

    _run_parallel(run_block, len(starts))
    return out


def _sfc64_dirichlet(expansion: int, numel: int, seed: int) -> torch.Tensor:
    """The ``(expansion, numel)`` Dirichlet(1..1) draw of ``seed`` with the SFC64 sampler (CPU)."""
    out = np.empty((expansion, numel), dtype=np.float32)
    return torch.from_numpy(_sfc64_fill(seed, expansion, 0, out))


def _sfc64_applies(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32


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
    It needs ``e - 1`` uniforms per element instead of ``e`` exponentials (``exponential_`` is the
    slowest of torch's CPU samplers); for e = 2 and 3 the sort is a min/max. On the CPU in float32
    the uniforms come from the ``"sfc64"`` sampler (see ``SAMPLERS``), seeded from ``generator``;
    elsewhere from ``torch.rand`` with ``generator``.
    """
    if expansion < 2:
        raise ValueError(f"expansion must be at least 2, got {expansion}")
    device = torch.device(device) if device is not None else torch.get_default_device()
    if _sfc64_applies(device, dtype) and (generator is None or generator.device.type == "cpu"):
        return _sfc64_dirichlet(expansion, numel, draw_seed(generator))
    u = torch.rand(expansion - 1, numel, device=device, dtype=dtype, generator=generator)
    return _spacings(u, 1.0, torch.empty(expansion, numel, device=device, dtype=dtype))


def _mix(p: torch.Tensor, copies: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_k p_k * copies_k`` as one multiply and ``e - 1`` fused multiply-adds: one pass over
    each copy and no ``(e, N)`` temporary (``(p * copies).sum(0)`` measured ~3x slower)."""
    w = torch.mul(p[0], copies[0], out=out)
    for k in range(1, p.shape[0]):
        w.addcmul_(p[k], copies[k])
    return w


_chunk_generators: dict[torch.device, torch.Generator] = {}


def _chunk_generator(device: torch.device) -> torch.Generator:
    """One reusable generator per device for the seeded ``torch`` sampler (re-seeded per chunk)."""
    generator = _chunk_generators.get(device)
    if generator is None:
        generator = _chunk_generators[device] = torch.Generator(device=device)
    return generator


@dataclass(frozen=True)
class MixingDraw:
    """The Dirichlet mixing ``p`` of one training step, identified by a seed.

    ``p()`` returns the same ``(expansion, numel)`` tensor every time it is called: that is what lets
    the backward pass regenerate ``p`` instead of keeping it (``BACKWARD_MODES``).
    """

    seed: int
    expansion: int
    numel: int
    device: torch.device
    dtype: torch.dtype
    sampler: str  # "sfc64", "torch" or "triton" (resolved, never "auto")

    def p(self) -> torch.Tensor:
        """The mixing, shape ``(expansion, numel)``; identical on every call."""
        if self.sampler == "triton":
            return _triton_mixing().p(self)
        if self.sampler == "sfc64":
            # From the buffer pool: this p is usually kept for backward, every step.
            buffer = _buffers.take((self.expansion, self.numel))
            return torch.from_numpy(_sfc64_fill(self.seed, self.expansion, 0, buffer))
        out = torch.empty(self.expansion, self.numel, device=self.device, dtype=self.dtype)
        for start, stop in self._chunks():
            self._chunk_p(start, out[:, start:stop])
        return out

    def _chunks(self) -> list[tuple[int, int]]:
        return [(s, min(s + _CHUNK, self.numel)) for s in range(0, self.numel, _CHUNK)]

    def _chunk_p(self, start: int, out: torch.Tensor) -> torch.Tensor:
        """``p`` for elements ``[start, start + out.shape[1])`` (``start`` a chunk boundary)."""
        if self.sampler == "sfc64":
            _sfc64_fill(self.seed, self.expansion, start, out.numpy())
            return out
        # Each chunk has its own seed, so one chunk can be redrawn without drawing the ones before.
        generator = _chunk_generator(self.device)
        generator.manual_seed(_child_seed(self.seed, start // _CHUNK))
        u = torch.rand(
            self.expansion - 1,
            out.shape[1],
            device=self.device,
            dtype=self.dtype,
            generator=generator,
        )
        return _spacings(u, 1.0, out)

    def _scratch(self, like: torch.Tensor, size: int) -> torch.Tensor:
        if self.sampler == "sfc64":
            return torch.from_numpy(_buffers.take((self.expansion, size)))
        return like.new_empty(self.expansion, size)

    def _new_w(self, like: torch.Tensor) -> torch.Tensor:
        if self.sampler == "sfc64":
            return torch.from_numpy(_buffers.take((self.numel,)))
        return like.new_empty(self.numel)

    def mix(
        self, copies: torch.Tensor, keep_p: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``w = sum_k p_k * copies_k``, and ``p`` itself when ``keep_p`` (else ``p`` never exists
        in full: the temporaries are one chunk). Both ways compute ``w`` with the same operations,
        so keeping or regenerating ``p`` gives bit-identical training."""
        if self.sampler == "triton":
            return _triton_mixing().forward(copies, self), self.p() if keep_p else None
        copies = copies.detach()
        w = self._new_w(copies)
        if keep_p:
            p = self.p()
            return _mix(p, copies, out=w), p
        for start, stop in self._chunks():
            p = self._chunk_p(start, self._scratch(copies, stop - start))
            _mix(p, copies[:, start:stop], out=w[start:stop])
        return w, None

    def grad(self, grad_w: torch.Tensor) -> torch.Tensor:
        """The copies' gradient ``p_k * grad_w`` with ``p`` regenerated from the seed."""
        if self.sampler == "triton":
            return _triton_mixing().backward(grad_w, self)
        grad = self._scratch(grad_w, self.numel)
        for start, stop in self._chunks():
            p = self._chunk_p(start, self._scratch(grad_w, stop - start))
            torch.mul(p, grad_w[start:stop], out=grad[:, start:stop])
        return grad


class _SampledMixing(torch.autograd.Function):
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
        if ctx.save_p:
            (p,) = ctx.saved_tensors
            if not torch.is_grad_enabled():
                grad = ctx.draw._scratch(grad_w, ctx.draw.numel)
                return torch.mul(p, grad_w, out=grad), None, None
        elif torch.is_grad_enabled():
            # Double backward (create_graph=True): the fused passes are invisible to autograd, so
            # materialise the same p and take a product autograd can differentiate.
            p = ctx.draw.p()
        else:
            return ctx.draw.grad(grad_w.contiguous()), None, None
        return p * grad_w, None, None


class _FixedMixing(torch.autograd.Function):
    """``w = sum_k p_k * copies_k`` for a given ``p`` (``fixed_mixing``), differentiable in both:
    ``grad copies_k = p_k * grad w`` and ``grad p_k = copies_k * grad w``."""

    @staticmethod
    def forward(ctx: Any, copies: torch.Tensor, p: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(p, copies if p.requires_grad else None)
        return _mix(p.to(copies.dtype), copies)

    @staticmethod
    def backward(ctx: Any, grad_w: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        p, copies = ctx.saved_tensors
        grad_copies = p * grad_w if ctx.needs_input_grad[0] else None
        grad_p = copies * grad_w if ctx.needs_input_grad[1] else None
        return grad_copies, grad_p


# ---- the fused CUDA path ("triton" sampler) -----------------------------------------------------


@functools.cache
def _triton_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _triton_applies(device: torch.device, expansion: int, dtype: torch.dtype | None = None) -> bool:
    return (
        device.type == "cuda"
        and expansion in (2, 3)
        and dtype in (None, torch.float32, torch.float16, torch.bfloat16)
        and _triton_installed()
    )


class _TritonMixing:
    """The ``"triton"`` sampler: Philox uniforms, their spacings and the mixing in one kernel.

    On CUDA an MK step is memory-bound: the torch-op path writes and reads ``u`` and ``p`` (about
    ``2e`` extra passes over ``N``) and, unless it keeps ``p``, draws it again in backward. Here
    forward reads the ``e`` copies and writes ``w``; backward reads ``grad w`` and writes the ``e``
    gradients; ``p`` never exists in memory. Backward regenerates the very same ``p`` because it
    runs the same kernel, whose ``p`` depends only on the seed and the element's offset (Philox is
    counter-based), as in Triton's low-memory dropout tutorial. One kernel with a compile-time
    ``MODE`` rather than one per direction, so that the drawing code cannot drift apart between
    forward and backward. ``p()`` materialises the same ``p`` for tests.

    Built on first use (importing triton is slow); set ``TRITON_INTERPRET=1`` before building to run
    the kernels on CPU tensors (the tests do).
    """

    BLOCK = 1024
    FORWARD, BACKWARD, P = 0, 1, 2

    def __init__(self) -> None:
        import triton
        import triton.language as tl

        self._cdiv = triton.cdiv

        @triton.jit(do_not_specialize=["seed"])
        def mixing_kernel(  # type: ignore[no-untyped-def]
            in_ptr, out_ptr, n, seed, E: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr
        ):
            # MODE 0: in = copies (E, n), out = w (n) = sum_k p_k * copies_k.
            # MODE 1: in = grad w (n), out = grad copies (E, n) = p_k * grad w.
            # MODE 2: out = p (E, n).
            offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offsets < n
            # Two of Philox's four 32-bit outputs per element; the top 24 bits of each are one
            # uniform on the grid k / 2**24 (exact in float32), as with every other sampler.
            r0, r1, _r2, _r3 = tl.randint4x(seed, offsets)
            u0 = (r0 >> 8).to(tl.float32) * (1.0 / 16777216.0)
            u1 = (r1 >> 8).to(tl.float32) * (1.0 / 16777216.0)
            if E == 2:
                p0 = u0
                p1 = 1.0 - u0
                p2 = 0.0
            else:
                lo = tl.minimum(u0, u1)
                hi = tl.maximum(u0, u1)
                p0 = lo
                p1 = hi - lo
                p2 = 1.0 - hi
            if MODE == 0:
                c0 = tl.load(in_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
                c1 = tl.load(in_ptr + n + offsets, mask=mask, other=0.0).to(tl.float32)
                w = p0 * c0 + p1 * c1
                if E == 3:
                    c2 = tl.load(in_ptr + n + n + offsets, mask=mask, other=0.0).to(tl.float32)
                    w += p2 * c2
                tl.store(out_ptr + offsets, w.to(out_ptr.dtype.element_ty), mask=mask)
            else:
                if MODE == 1:
                    g = tl.load(in_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
                else:
                    g = 1.0
                out_type = out_ptr.dtype.element_ty
                tl.store(out_ptr + offsets, (p0 * g).to(out_type), mask=mask)
                tl.store(out_ptr + n + offsets, (p1 * g).to(out_type), mask=mask)
                if E == 3:
                    tl.store(out_ptr + n + n + offsets, (p2 * g).to(out_type), mask=mask)

        self._kernel = mixing_kernel

    def _launch(self, source: torch.Tensor, out: torch.Tensor, draw: MixingDraw, mode: int) -> None:
        # Launch on the tensors' GPU; CPU tensors only reach here under TRITON_INTERPRET=1.
        on_gpu = out.device.type == "cuda"
        with torch.cuda.device(out.device) if on_gpu else contextlib.nullcontext():
            self._kernel[(self._cdiv(draw.numel, self.BLOCK),)](
                source, out, draw.numel, draw.seed, E=draw.expansion, MODE=mode, BLOCK=self.BLOCK
            )

    def forward(self, copies: torch.Tensor, draw: MixingDraw) -> torch.Tensor:
        w = copies.new_empty(draw.numel)
        self._launch(copies.contiguous(), w, draw, self.FORWARD)  # the flat parameter already is
        return w

    def backward(self, grad_w: torch.Tensor, draw: MixingDraw) -> torch.Tensor:
        grad = torch.empty(draw.expansion, draw.numel, device=grad_w.device, dtype=draw.dtype)
        self._launch(grad_w.contiguous(), grad, draw, self.BACKWARD)
        return grad

    def p(self, draw: MixingDraw) -> torch.Tensor:
        p = torch.empty(draw.expansion, draw.numel, device=draw.device, dtype=draw.dtype)
        self._launch(p, p, draw, self.P)
        return p


@functools.cache
def _triton_mixing() -> _TritonMixing:
    return _TritonMixing()


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

    How the training ``p`` is drawn and what backward keeps of it are ``sampler`` (see
    ``SAMPLERS``) and ``backward`` (see ``BACKWARD_MODES``), both ``"auto"`` by default; they change
    speed and memory, never the distribution.
    """

    def __init__(self, root: nn.Module, expansion: int, kernels: list[_Kernel]) -> None:
        self.root = root
        self.expansion = expansion
        self.kernels = kernels
        self.fixed_mixing: torch.Tensor | None = None
        self._sampler = "auto"
        self._backward = "auto"
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
        choice = self._sampler
        if choice == "auto":
            if _sfc64_applies(copies.device, copies.dtype):
                return "sfc64"
            if _triton_applies(copies.device, self.expansion, copies.dtype):
                return "triton"
            return "torch"
        if choice == "sfc64" and not _sfc64_applies(copies.device, copies.dtype):
            raise ValueError("the 'sfc64' sampler needs float32 copies on the CPU")
        if choice == "triton" and not _triton_applies(copies.device, self.expansion, copies.dtype):
            raise ValueError(
                "the 'triton' sampler needs CUDA copies (float32/16, bfloat16), e = 2 or 3, and triton"
            )
        return choice

    def saves_p(self) -> bool:
        """Whether a training forward keeps ``p`` for backward (else backward regenerates it)."""
        if self._backward == "auto":
            return self.copies.device.type == "cpu"
        return self._backward == "save"

    def draw(self, generator: torch.Generator | None = None) -> MixingDraw:
        """A fresh training mixing, seeded from ``generator`` (torch's default CPU generator)."""
        copies = self.copies
        return MixingDraw(
            seed=draw_seed(generator),
            expansion=self.expansion,
            numel=self.num_virtual,
            device=copies.device,
            dtype=copies.dtype,
            sampler=self.resolved_sampler(),
        )

    def mix(self, p: torch.Tensor) -> torch.Tensor:
        """``sum_k p_k * copies_k``: the flat virtual weights for mixing probabilities ``p``
        (differentiable with respect to the copies and to ``p``)."""
        return _FixedMixing.apply(self.copies, p)

    def mix_sampled(self, draw: MixingDraw) -> torch.Tensor:
        """The flat virtual weights for the training mixing ``draw`` (what train mode uses)."""
        return _SampledMixing.apply(self.copies, draw, self.saves_p())

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh Dirichlet(1..1) mixing ``p`` shaped like ``copies``.

        Drawn exactly as a training forward draws it, so the same generator state gives the same
        ``p`` here and in ``refresh`` (adversarial MK relies on that).
        """
        copies = self.copies
        if generator is not None and generator.device.type != "cpu":
            return sample_dirichlet(
                self.expansion,
                self.num_virtual,
                device=copies.device,
                dtype=copies.dtype,
                generator=generator,
            )
        return self.draw(generator).p()

    def refresh(self) -> None:
        """Recompute the weights the layers see; called before every forward of the root model."""
        if self.fixed_mixing is not None:
            self.assign(self.mix(self.fixed_mixing))
        elif self.root.training:
            self.assign(self.mix_sampled(self.draw()))
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
        raise UserError(
            "collapse() needs a model returned by sopkit.expand(); this one is not expanded."
        )
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
    del collapsed._parameters[COPIES_NAME]
    del collapsed.__dict__[HOLDER_NAME]
    for module in collapsed.modules():
        order = module.__dict__.pop("_sopkit_parameter_order", None)
        if order is not None:
            module._parameters = {name: module._parameters[name] for name in order}
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
