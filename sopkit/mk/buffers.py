"""Reusable float32 CPU buffers for the per-step outputs of majority kernels, with an explicit
lifecycle.

Why a pool. A fresh multi-megabyte allocation is returned to the OS when freed and page-faults
back in at its first write, every step (BENCHMARKS.md has the measurements). The mixed weights,
``p`` saved for backward and the copies' gradient are such outputs, so they come from here.

When a buffer is free again. The pool owns the base numpy array of each buffer and hands torch
``torch.from_numpy(view)``, where ``view = base[...]`` is a new numpy view object made for this
hand-out. torch's storage holds ``view`` for exactly as long as that memory is in use by anything:
the tensor, any view or slice of it, a copy saved for backward, a ``.grad``, a layer's weight. The
pool holds only a weak reference to ``view``; its callback runs when the storage lets go of
``view``, and puts the base back on the free list. Nothing here reads a reference count (which
Python 3.14 no longer keeps exact for borrowed locals), and no lock is taken in the callback: it
may run on an autograd thread while ``take`` holds the pool's lock.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import deque

import numpy as np
import torch

__all__ = ["BufferPool", "pooled_buffer"]

Shape = tuple[int, ...]


class BufferPool:
    """Up to ``limit`` reusable float32 numpy buffers per shape, handed to torch as tensors.

    A buffer is reused only after every tensor that shares its memory is gone (see the module
    docstring). Beyond ``limit`` buffers of a shape in use at once, ``take`` returns a fresh,
    unpooled tensor; ``limit = 0`` turns pooling off.
    """

    def __init__(self, limit: int = 4) -> None:
        self.limit = limit
        # Free bases per shape. deque.append and pop are atomic, so the weakref callback
        # (possibly on another thread) appends without a lock.
        self._free: dict[Shape, deque[np.ndarray]] = {}
        self._owned: dict[Shape, int] = {}
        # The weak references of the buffers handed out, by hand-out number: a weakref's callback
        # runs only while the weakref itself is alive.
        self._handed_out: dict[int, weakref.ref[np.ndarray]] = {}
        self._keys = itertools.count()
        self._lock = threading.Lock()

    def take(self, shape: Shape) -> torch.Tensor:
        """An uninitialised float32 CPU tensor of ``shape``, reusing a free pooled buffer."""
        with self._lock:
            free = self._free.get(shape)
            if free is None:
                free = self._free[shape] = deque()
            try:
                base = free.pop()  # the most recently freed: likeliest still in cache
            except IndexError:
                if self._owned.get(shape, 0) >= self.limit:
                    return torch.from_numpy(np.empty(shape, dtype=np.float32))
                self._owned[shape] = self._owned.get(shape, 0) + 1
                base = np.empty(shape, dtype=np.float32)
            view = base[...]
            key = next(self._keys)
            handed_out = self._handed_out

            def release(_: object, base: np.ndarray = base, key: int = key) -> None:
                handed_out.pop(key, None)
                free.append(base)

            handed_out[key] = weakref.ref(view, release)
        return torch.from_numpy(view)

    def owned(self, shape: Shape) -> int:
        """How many pooled buffers of ``shape`` exist (free or in use)."""
        return self._owned.get(shape, 0)

    def free(self, shape: Shape) -> int:
        """How many pooled buffers of ``shape`` are free now."""
        return len(self._free.get(shape, ()))


_pool = BufferPool()


def pooled_buffer(shape: Shape) -> torch.Tensor:
    """An uninitialised float32 CPU tensor from the process's buffer pool: for per-step outputs of
    several megabytes that would otherwise page-fault in at every step."""
    return _pool.take(shape)
