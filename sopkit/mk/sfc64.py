"""The ``"sfc64"`` sampler of majority kernels: Dirichlet(1, ..., 1) mixings from numpy's SFC64 bit
generator, formed block by block on a few threads.

Why. torch's CPU ``rand`` (one Mersenne Twister behind a lock) was most of an MK step; SFC64 gives
64 bits, both uniforms of an e = 3 element, in less time than ``rand`` gives one float, and the
spacings are formed block by block while the words are in cache (numbers in BENCHMARKS.md). Needs
no compiler.

Every uniform is ``k / 2**24`` with ``k`` uniform on ``[0, 2**24)`` (the grid of ``torch.rand`` in
float32), and ``p`` is the spacings of the sorted uniforms, so it is exactly Dirichlet(1, ..., 1)
and sums to exactly 1.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["BLOCK", "GRID", "GRID_BITS", "sfc64_dirichlet", "sfc64_fill", "spacings"]

GRID_BITS = 24
GRID = float(1 << GRID_BITS)  # uniforms are k / 2**24, k uniform in [0, 2**24), as torch.rand's
# Weight elements per SFC64 stream, which is also the unit of work: small enough that a block's
# words, uniforms and p stay in a core's L2 cache, large enough that numpy's per-call overhead is
# small. Fixed, so that a draw depends on its seed only, never on threads.
BLOCK = 1 << 16

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _reset_pool_after_fork() -> None:
    # Threads do not survive fork(); a child (e.g. a DataLoader worker) must start its own pool.
    global _pool, _pool_size
    _pool, _pool_size = None, 0


os.register_at_fork(after_in_child=_reset_pool_after_fork)


def run_parallel(work: Callable[[int], None], items: int) -> None:
    """Call ``work(i)`` for every ``i < items`` on the calling thread and up to
    ``torch.get_num_threads() - 1`` pool threads (numpy releases the GIL in each call).

    Items are handed out one at a time rather than split in advance. Right after a parallel torch
    operation, torch's OpenMP workers keep spinning on the other cores for several milliseconds
    (libgomp's default wait policy), so in a training loop a pool thread gets only part of a core.
    Taking items as threads become free is never much worse than one thread and uses a core that
    is really free.
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
    counter = itertools.count()  # next() on it is atomic

    def drain() -> None:
        for i in iter(counter.__next__, None):
            if i >= items:
                return
            work(i)

    futures = [pool.submit(drain) for _ in range(helpers)]
    drain()
    for future in futures:
        future.result()


def spacings(u: torch.Tensor, total: float, out: torch.Tensor) -> torch.Tensor:
    """Dirichlet(1, ..., 1) from ``e - 1`` uniform points on ``[0, total]`` per column (shape
    ``(e - 1, n)``): the gaps between the sorted points, written to ``out`` (shape ``(e, n)``).

    For e = 2 and 3 the sort is a copy or a min/max. (The ``"torch"`` sampler's path; the SFC64
    sampler forms the same spacings in numpy, block by block.)
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


def sfc64_fill(seed: int, expansion: int, start: int, out: np.ndarray) -> np.ndarray:
    """Write the ``"sfc64"`` mixing of ``seed`` for elements ``[start, start + n)`` into ``out``
    (float32, shape ``(expansion, n)``; ``start`` a multiple of ``BLOCK``).

    Block ``j`` holds elements ``[j * BLOCK, (j + 1) * BLOCK)``; its ``e - 1`` uniforms per element
    come from an SFC64 stream seeded with ``SeedSequence((seed, j))``, so ``p`` depends on the seed
    alone, never on the thread count or on which range is asked for. Blocks are shared out over
    ``torch.get_num_threads()`` threads; each block's words, uniforms and spacings are formed while
    they are in L2 rather than as whole-array passes.
    """
    e, n = expansion, out.shape[1]
    grid, scale = np.float32(GRID), np.float32(1.0 / GRID)
    starts = list(range(0, n, BLOCK))

    scratch = threading.local()  # one buffer for a block's uniforms per thread

    def run_block(index: int) -> None:
        u_scratch = getattr(scratch, "u", None)
        if u_scratch is None:
            u_scratch = scratch.u = np.empty((e - 1) * BLOCK + 1, dtype=np.float32)
        first = starts[index]
        last = min(first + BLOCK, n)
        size = last - first
        stream = np.random.SFC64(np.random.SeedSequence((seed, (start + first) // BLOCK)))
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

    run_parallel(run_block, len(starts))
    return out


def sfc64_dirichlet(expansion: int, numel: int, seed: int) -> torch.Tensor:
    """The ``(expansion, numel)`` Dirichlet(1..1) draw of ``seed`` with the SFC64 sampler (CPU)."""
    out = np.empty((expansion, numel), dtype=np.float32)
    return torch.from_numpy(sfc64_fill(seed, expansion, 0, out))
