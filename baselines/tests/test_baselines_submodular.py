"""The subset-selection objective (paper Appendix D): the per-step vectorised greedy picks exactly
the rows of the reference greedy on a networkx graph, the graph is the symmetric t-NN graph, and the
greedy maximises a monotone objective (non-negative gains; high-norm, dissimilar rows first)."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
from sopkit_baselines.submodular import (
    _greedy_torch,
    cosine_similarities,
    greedy_select,
    inner_products,
    marginal_gains,
    reference_graph,
    reference_greedy,
    reference_objective,
    tnn_adjacency,
)


def _rows(n: int, d: int, seed: int) -> torch.Tensor:
    # float64 and Gaussian rows with random norms: equal gains or similarities (ties) have
    # probability zero, so both implementations have one answer.
    generator = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, generator=generator, dtype=torch.float64) + 0.5
    return scale * torch.randn(n, d, generator=generator, dtype=torch.float64)


CASES = [  # (n rows, d dims, m chosen, t neighbours, alpha, beta, seed)
    (30, 8, 10, 10, 1.0, 1.0, 0),
    (24, 5, 8, 3, 1.0, 1.0, 1),
    (18, 20, 6, 10, 1.0, 3.0, 2),  # beta > alpha: the penalty matters more
    (12, 4, 11, 10, 0.5, 1.0, 3),  # t >= n - 1: the complete graph
    (40, 3, 13, 5, 2.0, 1.0, 4),  # low dimension: many strongly similar rows
]


@pytest.mark.parametrize(("n", "d", "m", "t", "alpha", "beta", "seed"), CASES)
def test_vectorised_greedy_picks_exactly_the_reference_rows(
    n: int, d: int, m: int, t: int, alpha: float, beta: float, seed: int
) -> None:
    rows = _rows(n, d, seed)
    expected = reference_greedy(reference_graph(rows.numpy(), t), m, alpha=alpha, beta=beta)
    picked = greedy_select(rows, m, neighbours=t, alpha=alpha, beta=beta)
    assert picked.tolist() == expected


@pytest.mark.parametrize(("n", "d", "m", "t", "alpha", "beta", "seed"), CASES)
def test_the_torch_loop_picks_the_same_rows_as_the_numpy_loop(
    n: int, d: int, m: int, t: int, alpha: float, beta: float, seed: int
) -> None:
    rows = _rows(n, d, seed)
    adjacency = tnn_adjacency(rows, t)
    gains = alpha * (rows.norm(dim=1) + adjacency.sum(dim=1).max())
    on_cpu = greedy_select(rows, m, neighbours=t, alpha=alpha, beta=beta)
    assert torch.equal(_greedy_torch(gains, beta * adjacency, m), on_cpu)


def test_float32_rows_pick_the_same_as_float64() -> None:
    rows = _rows(60, 16, 5)
    assert torch.equal(greedy_select(rows.float(), 20), greedy_select(rows, 20))


def test_the_graph_is_the_symmetric_tnn_graph_with_clipped_cosines() -> None:
    rows = _rows(25, 6, 6)
    adjacency = tnn_adjacency(rows, 4)
    assert torch.equal(adjacency, adjacency.T)
    graph = reference_graph(rows.numpy(), 4)
    expected = nx.to_numpy_array(graph, nodelist=range(25), weight="weight")
    np.testing.assert_allclose(adjacency.numpy(), expected, atol=1e-12)
    # i ~ j when either is among the other's 4 nearest: every row has at least 4 neighbours and
    # some have more (the union of the two directions).
    degrees = [graph.degree(i) for i in graph]
    assert min(degrees) >= 4 and max(degrees) > 4
    assert (adjacency >= 0).all() and torch.all(adjacency.diagonal() == 0)


def test_the_objective_is_d9_computed_by_hand() -> None:
    # Three rows: two similar (cos = 0.8), one orthogonal to both; t = 1.
    rows = np.array([[3.0, 0.0, 0.0], [2.4, 1.8, 0.0], [0.0, 0.0, 2.0]])
    graph = reference_graph(rows, 1)
    # Edges: 0~1 (0.8, mutual nearest); 2's nearest has cosine 0 (a tie, broken towards row 0),
    # and the edge 2~0 has weight max(0, 0) = 0. c = max weighted degree = 0.8.
    assert sorted(graph.edges) == [(0, 1), (0, 2)]
    c = 0.8
    assert reference_objective(graph, [0, 1]) == pytest.approx((3 + c) + (3 + c) - 0.8)
    assert reference_objective(graph, [0, 2], alpha=2, beta=5) == pytest.approx(2 * (5 + 2 * c))


@pytest.mark.parametrize("seed", range(4))
def test_greedy_gains_are_non_negative_so_the_objective_is_monotone(seed: int) -> None:
    rows = _rows(50, 4, seed)  # low dimension: many similar neighbours, large penalties
    picked = greedy_select(rows, 50).tolist()  # all of them: the last picks pay the most
    gains = marginal_gains(rows, picked)
    assert min(gains) >= 0
    # ... because u(i) includes c: without it, the penalties would exceed the norms here.
    norms = rows.norm(dim=1)
    penalties = [norms[i].item() - g + _c(rows) for i, g in zip(picked, gains, strict=True)]
    assert any(p > norms[i] for i, p in zip(picked, penalties, strict=True))
    # And greedy picks are (weakly) decreasing in gain, as for any submodular maximisation.
    assert all(a >= b - 1e-9 for a, b in zip(gains, gains[1:], strict=False))


def _c(rows: torch.Tensor) -> float:
    return float(tnn_adjacency(rows).sum(dim=1).max())


def test_the_greedy_prefers_large_and_dissimilar_rows() -> None:
    big = torch.tensor([10.0, 0.0, 0.0, 0.0])
    rows = torch.stack([
        big,                                       # 0: the largest
        big + torch.tensor([0.0, 0.3, 0.0, 0.0]),  # 1: as large, but nearly a copy of 0
        torch.tensor([0.0, 9.5, 0.0, 0.0]),        # 2: a little smaller, orthogonal to 0
        torch.tensor([0.0, 0.0, 1.0, 0.0]),        # 3: small
        torch.tensor([0.0, 0.0, 0.0, 0.5]),        # 4: smaller
    ])
    assert greedy_select(rows, 2).tolist() == [1, 2]  # not the near-duplicate pair (0, 1)
    # With no redundancy penalty it takes the two largest, duplicates or not.
    assert sorted(greedy_select(rows, 2, beta=0.0).tolist()) == [0, 1]
    # Minimising f instead would take the small rows: the decision this test pins.
    assert not {3, 4} & set(greedy_select(rows, 3).tolist())


def test_choosing_more_rows_than_exist_is_an_error() -> None:
    with pytest.raises(ValueError, match="cannot choose"):
        greedy_select(torch.randn(4, 3), 5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_path_picks_the_same_rows_as_the_cpu_path() -> None:
    for n, d, m, t, alpha, beta, seed in CASES:
        rows = _rows(n, d, seed)
        on_cpu = greedy_select(rows, m, neighbours=t, alpha=alpha, beta=beta)
        on_cuda = greedy_select(rows.cuda(), m, neighbours=t, alpha=alpha, beta=beta)
        assert on_cuda.device.type == "cuda"
        assert torch.equal(on_cuda.cpu(), on_cpu)


def _old_tnn_adjacency(rows: torch.Tensor, neighbours: int) -> torch.Tensor:
    """The dense construction this module used before (symmetrise the whole matrix, topk, max), on
    the same similarities (the matmul is not what this compares)."""
    n = rows.shape[0]
    similarity = cosine_similarities(rows)
    similarity = 0.5 * (similarity + similarity.T)
    similarity.fill_diagonal_(-torch.inf)
    values, index = similarity.topk(min(neighbours, n - 1), dim=1)
    directed = rows.new_zeros(n, n).scatter_(1, index, values.clamp_min(0))
    return torch.maximum(directed, directed.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "d", "t"), [(30, 8, 10), (300, 40, 10), (700, 20, 10), (64, 5, 3)])
def test_the_edge_wise_graph_is_bit_for_bit_the_old_dense_one(
    n: int, d: int, t: int, dtype: torch.dtype
) -> None:
    # Covers both top-k paths (rows padded to 64 t entries, and rows long enough not to be).
    rows = _rows(n, d, n + d).to(dtype)
    assert torch.equal(tnn_adjacency(rows, t), _old_tnn_adjacency(rows, t))


@pytest.mark.parametrize("d", [64, 3072])
@pytest.mark.parametrize("changed", [1, 2, 3, 300])
def test_similarities_of_some_rows_are_bit_for_bit_those_of_the_whole_matrix(
    d: int, changed: int
) -> None:
    # What lets SubsetMLP update its kept first-layer similarities instead of recomputing them
    # (float32 on the CPU; it checks this itself, and recomputes where it fails): recomputing the
    # rows (and, by symmetry, the columns) that changed gives exactly a full recomputation. True of
    # oneDNN's AVX2 and AVX-512 code; one row alone would take its matrix-vector code, which
    # rounds otherwise, so inner_products computes it as two.
    rows = _rows(900, d, 7).float()
    full = cosine_similarities(rows)
    assert torch.equal(full, full.T)
    generator = torch.Generator().manual_seed(changed)
    which = torch.randperm(900, generator=generator)[:changed].sort().values
    unit = torch.nn.functional.normalize(rows, dim=1)
    fresh = torch.nn.functional.normalize(rows[which], dim=1)
    assert torch.equal(fresh, unit[which])
    assert torch.equal(inner_products(fresh, unit), full[which])


def test_float64_similarities_of_some_rows_match_the_whole_matrix_to_rounding() -> None:
    # float64 goes to torch's matmul (MKL's dgemm), which rounds a block of rows differently
    # depending on how many there are: the kept matrix matches a fresh one to rounding only.
    rows = _rows(900, 64, 7)
    full = cosine_similarities(rows)
    which = torch.randperm(900, generator=torch.Generator().manual_seed(0))[:300]
    fresh = torch.nn.functional.normalize(rows[which], dim=1)
    unit = torch.nn.functional.normalize(rows, dim=1)
    torch.testing.assert_close(inner_products(fresh, unit), full[which], rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 5, 3), (2, 3, 4), (7, 300, 3072), (400, 1200, 64)])
def test_inner_products_are_the_matmul_up_to_rounding(
    dtype: torch.dtype, shape: tuple[int, int, int]
) -> None:
    count, others, d = shape
    generator = torch.Generator().manual_seed(count)
    # Unit rows, as the similarities have: products of at most 1, so float32's default tolerance
    # (atol 1e-5) is some 30 rounding errors of a 3072-term sum.
    a = torch.nn.functional.normalize(torch.randn(count, d, generator=generator, dtype=dtype), dim=1)
    b = torch.nn.functional.normalize(torch.randn(others, d, generator=generator, dtype=dtype), dim=1)
    product = inner_products(a, b)
    assert product.shape == (count, others) and product.dtype == dtype
    torch.testing.assert_close(product, a @ b.T)
    # Through autograd (which oneDNN's matmul has no formula for) it is torch's matmul itself.
    a.requires_grad_()
    product = inner_products(a, b)
    product.sum().backward()
    assert a.grad is not None
    torch.testing.assert_close(a.grad, b.sum(0).expand_as(a))


def test_inner_products_of_float32_on_the_cpu_take_onednn_unless_it_is_disabled() -> None:
    # The speed-up (2x on an AVX-512 AMD CPU, BENCHMARKS.md) comes only from oneDNN's path: pin
    # that it is taken where torch has oneDNN, and that turning oneDNN off turns it off here too.
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    a = torch.randn(3, 5)
    calls: list[int] = []
    original = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def __call__(self, *args: object) -> torch.Tensor:
            calls.append(1)
            return original(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.ops.mkldnn, "_linear_pointwise", Spy())
        inner_products(a, a)
        assert calls == [1]
        patch.setattr(torch.backends.mkldnn, "enabled", False)
        torch.testing.assert_close(inner_products(a, a), a @ a.T)
        assert calls == [1]


def test_a_precomputed_similarity_matrix_picks_the_same_rows() -> None:
    rows = _rows(200, 12, 8).float()
    assert torch.equal(greedy_select(rows, 60, similarity=cosine_similarities(rows)),
                       greedy_select(rows, 60))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_given_norms_pick_the_same_rows(dtype: torch.dtype, beta: float) -> None:
    # What SubsetMLP passes for the first layer: the similarities and norms it keeps.
    rows = _rows(200, 12, 9).to(dtype)
    assert torch.equal(greedy_select(rows, 60, beta=beta, norms=rows.norm(dim=1),
                                     similarity=cosine_similarities(rows)),
                       greedy_select(rows, 60, beta=beta))


def test_greedy_picks_exactly_the_reference_rows_on_many_random_matrices() -> None:
    for seed in range(40):
        generator = torch.Generator().manual_seed(1000 + seed)
        n = int(torch.randint(5, 40, (1,), generator=generator))
        d = int(torch.randint(2, 12, (1,), generator=generator))
        t = int(torch.randint(1, 12, (1,), generator=generator))
        m = int(torch.randint(1, n + 1, (1,), generator=generator))
        rows = _rows(n, d, 1000 + seed)
        expected = reference_greedy(reference_graph(rows.numpy(), t), m)
        assert greedy_select(rows, m, neighbours=t).tolist() == expected, seed


def test_inner_products_without_onednn_are_the_matmul() -> None:
    """The fallback of sopkit.torch_private's ``mkldnn_linear`` probe: forced off, oneDNN's private
    op is not called and the products equal the fast path's up to rounding (summation order)."""
    from sopkit import torch_private

    if not torch_private.usable("mkldnn_linear"):
        pytest.skip("this torch has no working oneDNN matmul: the fallback is all there is")
    generator = torch.Generator().manual_seed(3)
    a = torch.nn.functional.normalize(torch.randn(300, 3072, generator=generator), dim=1)
    fast = inner_products(a, a)
    calls: list[int] = []
    original = torch_private.mkldnn_linear
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch_private, "mkldnn_linear", lambda *args: calls.append(1) or original(*args))
        patch.setenv(torch_private.ENV_OFF, "mkldnn_linear")
        slow = inner_products(a, a)
    assert calls == []
    torch.testing.assert_close(slow, fast)
    torch.testing.assert_close(slow, a @ a.T, rtol=0, atol=0)
