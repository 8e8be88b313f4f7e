"""The ``"triton"`` sampler of majority kernels: Philox uniforms, their spacings and the mixing in
one fused CUDA kernel.

On CUDA an MK step is memory-bound: the torch-op path writes and reads ``u`` and ``p`` (about ``2e``
extra passes over ``N``) and, unless it keeps ``p``, draws it again in backward. Here forward reads
the ``e`` copies and writes ``w``; backward reads ``grad w`` and writes the ``e`` gradients; ``p``
never exists in memory. Backward regenerates the very same ``p`` because it runs the same kernel,
whose ``p`` depends only on the seed and the element's offset (Philox is counter-based), as in
Triton's low-memory dropout tutorial.

Built on first use (importing triton is slow); set ``TRITON_INTERPRET=1`` before building to run the
kernels on CPU tensors (the tests do).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util

import torch

__all__ = ["TritonMixing", "triton_applies", "triton_mixing"]


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_applies(device: torch.device, expansion: int, dtype: torch.dtype | None = None) -> bool:
    """Whether the ``"triton"`` sampler can run copies of this device, expansion and dtype."""
    return (
        device.type == "cuda"
        and expansion in (2, 3)
        and dtype in (None, torch.float32, torch.float16, torch.bfloat16)
        and _triton_installed()
    )


class TritonMixing:
    """The fused kernel and its three uses: forward mixing, backward gradient, and ``p`` itself.

    One kernel with a compile-time ``MODE`` rather than one per direction, so that the drawing code
    cannot drift apart between forward and backward. ``p()`` materialises the same ``p`` for tests.
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

    def _launch(self, source: torch.Tensor, out: torch.Tensor, seed: int, mode: int) -> None:
        """Run the kernel over the ``(expansion, numel)`` mixing of ``seed``: ``out`` is ``(numel,)``
        in FORWARD mode and ``(expansion, numel)`` otherwise."""
        expansion, numel = (source.shape[0], source.shape[1]) if mode == self.FORWARD else out.shape
        # Launch on the tensors' GPU; CPU tensors only reach here under TRITON_INTERPRET=1.
        on_gpu = out.device.type == "cuda"
        with torch.cuda.device(out.device) if on_gpu else contextlib.nullcontext():
            self._kernel[(self._cdiv(numel, self.BLOCK),)](
                source, out, numel, seed, E=expansion, MODE=mode, BLOCK=self.BLOCK
            )

    def forward(self, copies: torch.Tensor, seed: int) -> torch.Tensor:
        """``w = sum_k p_k * copies_k`` for the mixing of ``seed``; ``copies`` is ``(e, N)``."""
        w = copies.new_empty(copies.shape[1])
        self._launch(copies.contiguous(), w, seed, self.FORWARD)  # the flat parameter already is
        return w

    def backward(
        self, grad_w: torch.Tensor, seed: int, expansion: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """The copies' gradient ``p_k * grad_w`` with the ``p`` of ``seed`` regenerated."""
        grad = torch.empty(expansion, grad_w.shape[0], device=grad_w.device, dtype=dtype)
        self._launch(grad_w.contiguous(), grad, seed, self.BACKWARD)
        return grad

    def p(
        self, seed: int, expansion: int, numel: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """The mixing of ``seed`` itself, ``(expansion, numel)``."""
        p = torch.empty(expansion, numel, device=device, dtype=dtype)
        self._launch(p, p, seed, self.P)
        return p


@functools.cache
def triton_mixing() -> TritonMixing:
    """The process's kernels, built on first use."""
    return TritonMixing()
