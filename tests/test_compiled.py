"""The ``"compiled"`` sampler's random bits and distribution (sopkit.mk.compiled).

Its bits must be SplitMix64's (checked against a big-integer implementation of the published
algorithm), the compiled kernels must compute exactly what the same functions compute uncompiled
(inductor once generated wrong lanes for int64 index arithmetic, see ``stream_key``), and ``p`` must
be Dirichlet(1, ..., 1) with independent elements and independent steps.
"""

from __future__ import annotations

import math

import pytest
import torch

from sopkit.mk import compiled

pytestmark = pytest.mark.skipif(
    not compiled.available(3), reason="the 'compiled' sampler needs torch.compile with a C++ compiler"
)

MASK64 = (1 << 64) - 1


def reference_splitmix64(seed: int, counter: int) -> int:
    """Output ``counter`` of SplitMix64 seeded with ``seed`` (Steele, Lea and Flood 2014)."""
    z = (seed + (counter + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


@pytest.mark.parametrize("seed", [0, 1, 2**40 + 17, 2**63 - 1, 2**64 - 5])
def test_the_bits_are_splitmix64(seed):
    counters = [0, 1, 2, 15, 16, 17, 1000, 2**20 + 3, 2**33 + 1]
    key = compiled.stream_key(seed)
    bits = compiled.splitmix64(key, torch.tensor(counters))
    for counter, value in zip(counters, bits.tolist(), strict=True):
        assert value & MASK64 == reference_splitmix64(seed, counter)


def test_splitmix64_known_answer():
    # The first three outputs of SplitMix64 seeded with 1234567, the test vector widely quoted
    # with the reference C code.
    expected = [6457827717110365317, 3203168211198807973, 9817491932198370423]
    key = compiled.stream_key(1234567)
    bits = compiled.splitmix64(key, torch.arange(3))
    assert [value & MASK64 for value in bits.tolist()] == expected


def _draw(key: torch.Tensor, numel: int, expansion: int) -> torch.Tensor:
    """The mixing of ``key`` as the compiled sampler draws it."""
    p = torch.empty(expansion, numel)
    compiled.kernel(compiled.mixing_p_into)(key, *p)
    return p


@pytest.mark.parametrize("numel", [1, 15, 16, 17, 1000, 4099])
def test_compiled_kernels_compute_exactly_the_uncompiled_functions(numel):
    generator = torch.Generator().manual_seed(numel)
    copies = torch.randn(3, numel, generator=generator)
    grad_w = torch.randn(numel, generator=generator)
    key = compiled.stream_key(2**62 + numel)
    w = torch.empty(numel)
    compiled.kernel(compiled.mix_forward_into)(w, copies, key)
    assert torch.equal(w, compiled.mix_forward(copies, key))
    grad = torch.empty(3, numel)
    compiled.kernel(compiled.mix_backward_into)(grad_w, key, *grad)
    assert torch.equal(grad, compiled.mix_backward(grad_w, key, 3))
    assert torch.equal(_draw(key, numel, 3), compiled.mixing_p(key, numel, 3))


@pytest.mark.parametrize("expansion", [2, 3, 5])
def test_p_is_dirichlet_ones(expansion):
    e, n = expansion, 300_000
    p = _draw(compiled.stream_key(99), n, e)
    assert p.shape == (e, n) and (p >= 0).all()
    assert torch.equal(p.sum(0), torch.ones(n))  # spacings on the 2**-24 grid sum exactly to 1
    grid = p * 2**24
    assert torch.equal(grid, grid.round())
    mean, var = 1 / e, (e - 1) / (e * e * (e + 1))
    for k in range(e):
        assert abs(p[k].mean().item() - mean) < 5 * math.sqrt(var / n)
        assert abs(p[k].var().item() - var) < 0.02 * var
    for x in (0.1, 0.3, 0.6):  # each marginal is Beta(1, e - 1)
        assert abs((p[0] <= x).float().mean().item() - (1 - (1 - x) ** (e - 1))) < 0.005
    cov = ((p[0] - mean) * (p[1] - mean)).mean().item()
    assert abs(cov + 1 / (e * e * (e + 1))) < 0.05 / (e * e * (e + 1)) + 1e-4


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return (a * b).mean().item() / (a.std().item() * b.std().item())


def test_neighbouring_elements_and_consecutive_seeds_are_uncorrelated():
    n = 400_000
    p = _draw(compiled.stream_key(5), n, 3)
    following_seed = _draw(compiled.stream_key(6), n, 3)
    bound = 5 / math.sqrt(n)  # five standard errors of a correlation of independent samples
    assert abs(_correlation(p[0, 1:], p[0, :-1])) < bound
    assert abs(_correlation(p[0, 16:], p[0, :-16])) < bound
    assert abs(_correlation(p[0], following_seed[0])) < bound
    assert abs(_correlation(p[2], following_seed[2])) < bound
    # Uniform pairs of one element: the two 24-bit halves of one 64-bit output are independent.
    assert not torch.equal(p, following_seed)


def test_each_step_needs_only_its_seed():
    """Backward regenerates p from the seed: a later draw with other seeds must not change it."""
    first = _draw(compiled.stream_key(123), 5000, 3)
    _draw(compiled.stream_key(124), 5000, 3)
    assert torch.equal(first, _draw(compiled.stream_key(123), 5000, 3))
