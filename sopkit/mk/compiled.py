"""The ``"compiled"`` sampler of majority kernels: random bits, Dirichlet spacings and the mixing in
one compiled CPU kernel.

Why. On the CPU the overhead of an MK step was mostly drawing ``p`` (BENCHMARKS.md): numpy's SFC64
is a sequential generator, so its bits come from one core per block, ``p`` is written to memory,
read again by the mixing and kept for backward. Here the bits of
weight element ``i`` are a function of ``(seed, i)`` alone (a counter-based generator), so every
thread can compute any element, and ``torch.compile`` (inductor) turns bits -> uniforms -> spacings
-> ``w = sum_k p_k copies_k`` into one vectorised loop over torch's OpenMP threads. Forward reads the
copies and writes ``w``; backward computes the same ``p`` again and writes ``p_k * grad w``. ``p`` is
never stored and nothing shaped like the copies is kept for backward: the CPU twin of the Triton
kernel in :mod:`sopkit.mk.triton`.

The bits are SplitMix64 (Steele, Lea and Flood, OOPSLA 2014; the generator behind Java's
``SplittableRandom``, which passes TestU01's BigCrush): output ``c`` of the stream seeded with the
step's seed is ``mix64(seed + (c + 1) * gamma)``, computable for any ``c`` directly. Element ``i``
of a mixing with ``e - 1`` uniforms per element uses outputs ``i * W ... i * W + W - 1`` with
``W = ceil((e - 1) / 2)``, and each 64-bit output gives two uniforms: its top 24 bits and the 24
below them, each ``k / 2**24`` with ``k`` uniform on ``[0, 2**24)``. ``p`` is the spacings of the
sorted uniforms, so, as with every other sampler, it is exactly Dirichlet(1, ..., 1) on the grid of
``torch.rand`` in float32 and sums to exactly 1.

torch has no unsigned 64-bit arithmetic, so the generator runs on int64: the wrap-around of
two's-complement addition and multiplication gives the same 64 bits as unsigned arithmetic, and a
logical right shift is an arithmetic one masked to its low ``64 - s`` bits. A test checks the bits
against a big-integer reference.

The functions below are ordinary torch code: uncompiled they are the reference the tests compare the
compiled kernels with (bit for bit), and far too slow to train with. Compilation needs a C++
compiler and takes seconds once per process and expansion (inductor caches the generated code on
disk between processes); :func:`available` tries it once and says whether it worked, so that a
machine without a compiler, or a torch whose inductor generates wrong code, falls back to the
``"sfc64"`` sampler. This is the ``"inductor"`` entry of :mod:`sopkit.torch_private`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from sopkit import torch_private

__all__ = [
    "available",
    "cxx_compiler_found",
    "dirichlet_rows",
    "kernel",
    "mix_backward",
    "mix_backward_into",
    "mix_forward",
    "mix_forward_into",
    "mixing_p",
    "mixing_p_into",
    "splitmix64",
    "stream_key",
]


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= (1 << 63) else value


_GAMMA = _signed(0x9E3779B97F4A7C15)  # SplitMix64's increment (the golden ratio, odd)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_GRID_BITS = 24
_UNIFORM_MASK = (1 << _GRID_BITS) - 1


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of the 64 bits held in an int64 tensor."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def stream_key(seed: int) -> torch.Tensor:
    """The int64 pair ``(seed, gamma)`` the kernels take to identify a SplitMix64 stream.

    Why gamma travels as data: as a constant, inductor folds ``arange * gamma`` into its index
    arithmetic, and the vectorised code it generated for that (torch 2.15, AVX-512) got lanes 8-15
    of every 16 wrong (the product overflows int64 by design). Loaded from a tensor, the multiply
    is ordinary wrapping vector arithmetic. The tests compare compiled and uncompiled bits.
    """
    return torch.tensor([_signed(seed % (1 << 64)), _GAMMA], dtype=torch.int64)


def splitmix64(key: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """Output number ``counter`` of the SplitMix64 stream ``key`` (``stream_key(seed)``), as the
    int64 with the same 64 bits."""
    z = key[0] + (counter + 1) * key[1]
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def _sorted(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Element-wise sort of a few same-shaped tensors (odd-even transposition: min/max only, so
    inductor fuses it with everything around it)."""
    values = list(values)
    for round_ in range(len(values)):
        for i in range(round_ % 2, len(values) - 1, 2):
            values[i], values[i + 1] = (
                torch.minimum(values[i], values[i + 1]),
                torch.maximum(values[i], values[i + 1]),
            )
    return values


def dirichlet_rows(key: torch.Tensor, numel: int, expansion: int) -> list[torch.Tensor]:
    """The mixing of stream ``key`` as ``expansion`` float32 rows of length ``numel`` (one per copy)."""
    words = expansion // 2  # = ceil((expansion - 1) / 2) 64-bit outputs per element
    index = torch.arange(numel, dtype=torch.int64, device=key.device)
    uniforms = []
    for word in range(words):
        bits = splitmix64(key, index * words + word)
        uniforms.append(_shift_right(bits, 64 - _GRID_BITS))
        uniforms.append(_shift_right(bits, 64 - 2 * _GRID_BITS) & _UNIFORM_MASK)
    # (A literal, not a global: inductor lifts a global float into a graph input.)
    edges = [u.to(torch.float32) * (1.0 / (1 << 24)) for u in uniforms[: expansion - 1]]
    edges = _sorted(edges)
    # Gaps between 0, the sorted points and 1: exact, since every point is a multiple of 2**-24.
    return [edges[0]] + [b - a for a, b in zip(edges, edges[1:], strict=False)] + [1.0 - edges[-1]]


def mix_forward(copies: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``w = sum_k p_k * copies_k`` for the mixing of stream ``key``; ``copies`` is ``(e, N)``."""
    p = dirichlet_rows(key, copies.shape[1], copies.shape[0])
    w = p[0] * copies[0]
    for k in range(1, len(p)):
        w = w + p[k] * copies[k]
    return w


def mix_backward(grad_w: torch.Tensor, key: torch.Tensor, expansion: int) -> torch.Tensor:
    """The copies' gradient ``p_k * grad_w``, ``(expansion, N)``, for the mixing of ``key``."""
    p = dirichlet_rows(key, grad_w.shape[0], expansion)
    return torch.stack([p_k * grad_w for p_k in p])


def mixing_p(key: torch.Tensor, numel: int, expansion: int) -> torch.Tensor:
    """The mixing of ``key`` itself, ``(expansion, numel)`` (for tests and adversarial MK)."""
    return torch.stack(dirichlet_rows(key, numel, expansion))


# What the kernels compile: the functions above, written into buffers the caller provides. A fresh
# multi-megabyte output page-faults in on its first write, every step (sopkit.mk.buffers); and an
# (e, N) result built by torch.stack compiles to one loop per row, each recomputing p, where e
# separate row outputs compile to a single loop.


def mix_forward_into(w: torch.Tensor, copies: torch.Tensor, key: torch.Tensor) -> None:
    """``w[:] = mix_forward(copies, key)``."""
    w.copy_(mix_forward(copies, key))


def mix_backward_into(grad_w: torch.Tensor, key: torch.Tensor, *grad_rows: torch.Tensor) -> None:
    """``grad_rows[k][:] = p_k * grad_w`` for the mixing of ``key`` (one row per copy)."""
    p = dirichlet_rows(key, grad_w.shape[0], len(grad_rows))
    for row, p_k in zip(grad_rows, p, strict=True):
        row.copy_(p_k * grad_w)


def mixing_p_into(key: torch.Tensor, *rows: torch.Tensor) -> None:
    """``rows[k][:] = p_k`` for the mixing of ``key``."""
    for row, p_k in zip(rows, dirichlet_rows(key, rows[0].shape[0], len(rows)), strict=True):
        row.copy_(p_k)


@functools.cache
def kernel(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` compiled once per process, with symbolic sizes so that every model shares it.

    Arguments that decide the shape of the computation (the expansion, a flag) are passed as
    ordinary arguments: dynamo specialises on their values, one graph each. (Fixing them with
    ``functools.partial`` instead would make every kernel one function to dynamo, ``partial``'s,
    and exhaust its recompilation limit.)
    """
    return torch.compile(function, dynamic=True, fullgraph=True)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence one logger's warnings for the duration of the block."""
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


@functools.cache
def _compiler_found() -> bool:
    candidates = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return any(name and shutil.which(name) for name in candidates)


def cxx_compiler_found() -> bool:
    """Whether a C++ compiler is on the PATH (or in ``CXX``): what inductor needs on the CPU."""
    return _compiler_found()


def available(expansion: int) -> bool:
    """Whether the compiled kernels work here for this expansion (tried once per process).

    Needs torch.compile support for this Python and a C++ compiler. The forward kernel is compiled
    and checked against the uncompiled function on a small input; if anything fails (torch.compile
    raises on a Python it does not support), a warning says why and the caller uses another
    sampler. Forced off with ``SOPKIT_TORCH_PRIVATE_OFF=inductor`` (see :mod:`sopkit.torch_private`).
    """
    if not torch_private.enabled("inductor") or not _compiler_found():
        return False
    return _compiles(expansion)


@functools.cache
def _compiles(expansion: int) -> bool:
    try:
        # Compiling imports torch.utils.cpp_extension, which warns "No CUDA runtime is found" on a
        # CPU machine with a CUDA toolkit directory: true, and irrelevant to a CPU kernel.
        with _quiet("torch.utils.cpp_extension"):
            import torch.utils.cpp_extension  # noqa: F401
        copies = torch.linspace(-1.0, 1.0, expansion * 257).reshape(expansion, 257)
        key = stream_key(12345)
        compiled = torch.empty(copies.shape[1])
        kernel(mix_forward_into)(compiled, copies, key)
        if not torch.equal(compiled, mix_forward(copies, key)):
            raise RuntimeError("the compiled mixing differs from the reference")
    except Exception as error:  # any failure means: use another sampler, and say why
        warnings.warn(
            f"sopkit: the 'compiled' majority-kernel sampler is unavailable ({error!r}); "
            "using 'sfc64' instead.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True
