"""The neuron-selection objective of paper Appendix D (Eqs. D.7-D.9) and its greedy maximisation.

Given the rows ``U_i`` of a layer (one per neuron), the objective of a subset ``S`` is::

    f(S) = alpha * sum_{i in S} u(i)  -  beta * sum_{i<j in S, (i,j) in E} s(i,j)
    u(i) = ||U_i|| + c,    c = max_l sum_{j : (l,j) in E} s(l,j)

over a t-nearest-neighbour graph ``E`` of the rows. Decisions the paper leaves open, and why:

* **Maximise, not minimise.** Appendix D writes ``argmin`` in D.8 but then calls ``f`` "a monotone
  submodular objective for which a simple greedy algorithm achieves a (1 - 1/e)-approximation",
  which is a statement about *maximisation* (Nemhauser et al., 1978), and its text asks for neurons
  of high utility that are not redundant. ``c`` only makes sense for maximisation: with ``|S| = m``
  fixed it adds the constant ``alpha * m * c`` to every candidate, so it changes no ``argmax``; its
  role is to make every marginal gain ``alpha * u(i) - beta * sum_{j in S, (i,j) in E} s(i,j)``
  non-negative, i.e. ``f`` monotone, which the greedy guarantee needs. (The ``argmin`` would select
  the smallest, most redundant neurons.) So this module maximises ``f`` with the greedy algorithm.
* **Similarities are clipped at 0.** ``s(i,j) = max(cos(U_i, U_j), 0)``. With a negative ``s`` the
  penalty would reward pairs and ``f`` would stop being submodular; the paper asks for "appropriate
  choices of ... the similarity functions" to make ``f`` submodular and monotone, and non-negative
  pair weights are that choice. With them, ``f`` is monotone whenever ``alpha >= beta`` (the default
  is ``alpha = beta = 1``): a gain is at least ``alpha * ||U_i|| + (alpha - beta) * c >= 0``.
* **The graph is symmetric.** ``i ~ j`` when ``j`` is among the ``t`` most similar rows to ``i`` or
  ``i`` among those of ``j``: ``E`` is a set of unordered pairs in D.9 (``(i,j) in S``), and a
  symmetric penalty keeps ``f`` a function of the set alone. ``t`` is capped at ``n - 1``.
* **Ties** (equal gains) go to the lowest row index, in both implementations below.

Two implementations, one result:

* :func:`reference_greedy` on a ``networkx`` graph (:func:`reference_graph`) evaluates ``f`` itself
  for every candidate: slow and obviously right, for tests.
* :func:`greedy_select` is the per-step path: ``normalize + matmul + topk`` for the graph (the
  ``n t`` edges of :func:`tnn_edges`, written into a dense, symmetric ``(n, n)`` matrix of edge
  weights by :func:`tnn_adjacency`; the caller may pass the similarity matrix and the rows' norms
  when it keeps them up to date), then ``m`` picks, each one
  ``argmax`` of the current gains followed by a vectorised update of every gain by one row of that
  matrix. On the CPU the loop runs in NumPy on the same buffers (a NumPy call costs about a
  microsecond, a torch call several), elsewhere in torch without host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from sopkit import torch_private

if TYPE_CHECKING:
    import networkx as nx

__all__ = [
    "DEFAULT_NEIGHBOURS",
    "cosine_similarities",
    "greedy_select",
    "inner_products",
    "marginal_gains",
    "reference_graph",
    "reference_greedy",
    "reference_objective",
    "tnn_adjacency",
    "tnn_edges",
]

DEFAULT_NEIGHBOURS = 10  # t in Appendix D


# ---- the vectorised path ---------------------------------------------------------------------------


def cosine_similarities(rows: torch.Tensor) -> torch.Tensor:
    """The ``(n, n)`` matrix of cosine similarities of ``rows`` (``normalize + matmul``).

    One matmul of the unit rows with their transpose (:func:`inner_products`). Every entry is one
    dot product of two unit rows, computed the same way whichever rows are in the matmul (which
    :class:`sopkit_baselines.subnetwork.SubsetMLP` relies on to recompute only the rows that changed),
    and the matrix is symmetric (the tests check both for float32 on the CPU).
    """
    unit = F.normalize(rows, dim=1)
    return inner_products(unit, unit)


def inner_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T``: the dot product of every row of ``a`` with every row of ``b``.

    For float32 on the CPU this goes through oneDNN's matmul when torch has it. torch's own
    float32 matmul calls MKL, which takes its AVX2 code on AMD processors; oneDNN picks its code by
    instruction set, about twice as fast there (BENCHMARKS.md, item 7).
    The products are the same, summed in another order, so entries differ from MKL's by rounding
    (an ulp or so). Within oneDNN a block of rows is rounded exactly as in the whole matrix, except
    that one row alone takes its matrix-vector code, which rounds differently: a single row is
    therefore computed as two. Everywhere else (other dtypes and devices, autograd, a torch
    without oneDNN or with ``torch.backends.mkldnn.enabled = False``) this is ``a @ b.T``.

    oneDNN's matmul is a private torch op: it is reached through :mod:`sopkit.torch_private`
    (entry ``mkldnn_linear``), whose probe checks once per process that it exists and computes
    ``a @ b.T``; where it does not, or with ``SOPKIT_TORCH_PRIVATE_OFF=mkldnn_linear``, this is
    ``a @ b.T`` too.
    """
    if not (a.device.type == b.device.type == "cpu" and a.dtype == b.dtype == torch.float32
            and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
            and torch.backends.mkldnn.enabled and torch_private.usable("mkldnn_linear")):
        return a @ b.T
    count = a.shape[0]
    if count == 1:
        a = a.expand(2, -1)
    product = torch_private.mkldnn_linear(a.contiguous(), b.contiguous())
    return product[:count]


def tnn_edges(
    similarity: torch.Tensor, neighbours: int = DEFAULT_NEIGHBOURS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The directed t-NN edges of a similarity matrix: ``(source, target, weight)``, ``n * t`` each.

    ``target`` runs over the ``t`` most similar rows to ``source``; ``weight`` is
    ``max(s, 0)`` with ``s = (S[i, j] + S[j, i]) / 2``, one number for both directions. The diagonal
    of ``similarity`` is set to ``-inf`` in place (a row is not its own neighbour). Only the edges
    are symmetrised: the matmul already is (``S == S.T``), so averaging the whole matrix first, as
    this module once did, took a transpose of ``n^2`` entries to change nothing.
    """
    n = similarity.shape[0]
    t = min(neighbours, n - 1)
    similarity.fill_diagonal_(-torch.inf)
    values, target = _topk(similarity, t)
    source = torch.arange(n, device=similarity.device).repeat_interleave(t)
    target = target.reshape(-1)
    mirrored = similarity[target, source]
    weight = (0.5 * (values.reshape(-1) + mirrored)).clamp_min(0)
    return source, target, weight


def _topk(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``matrix.topk(k, dim=1)``, for the rows of a similarity matrix (no NaN, ``k < n``).

    On the CPU, torch takes a row's top ``k`` with a heap when the row has at least ``64 k``
    entries and with ``nth_element`` otherwise, which for ``k = 10`` is two to three times slower
    per row (BENCHMARKS.md). Shorter rows are padded with ``-inf`` to ``64 k``
    entries, which never are among the top ``k`` (every row has ``k`` finite entries), to take the
    heap path.
    """
    n, columns = matrix.shape
    if matrix.device.type == "cpu" and columns < 64 * k:
        padded = matrix.new_full((n, 64 * k), -torch.inf)
        padded[:, :columns] = matrix
        matrix = padded
    values, index = matrix.topk(k, dim=1)
    return values, index


def tnn_adjacency(
    rows: torch.Tensor,
    neighbours: int = DEFAULT_NEIGHBOURS,
    *,
    similarity: torch.Tensor | None = None,
) -> torch.Tensor:
    """The symmetric t-NN graph of ``rows`` (shape ``(n, d)``) as a dense ``(n, n)`` weight matrix.

    Entry ``(i, j)`` is ``max(cos(U_i, U_j), 0)`` when ``i ~ j`` and 0 otherwise (an edge of weight
    0 and no edge contribute the same to ``f``). The diagonal is 0. ``similarity``: the matrix of
    :func:`cosine_similarities` of ``rows`` when the caller has it (its diagonal is set to -inf).
    """
    n = rows.shape[0]
    if min(neighbours, n - 1) < 1:
        return rows.new_zeros(n, n)
    if similarity is None:
        similarity = cosine_similarities(rows)
    source, target, weight = tnn_edges(similarity, neighbours)
    adjacency = similarity.new_zeros(n, n)
    # i ~ j if either chose the other; both directions carry the same weight, so writing it twice
    # where both chose each other is the maximum of the two directed matrices.
    adjacency[source, target] = weight
    adjacency[target, source] = weight
    return adjacency


def greedy_select(
    rows: torch.Tensor,
    m: int,
    *,
    neighbours: int = DEFAULT_NEIGHBOURS,
    alpha: float = 1.0,
    beta: float = 1.0,
    similarity: torch.Tensor | None = None,
    norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``m`` rows the greedy algorithm picks for ``f``, as int64 indices in the order picked.

    ``similarity``: :func:`cosine_similarities` of ``rows`` when the caller keeps it up to date
    itself (its diagonal is set to -inf, nothing else changes); ``norms``: ``rows.norm(dim=1)``,
    likewise.
    """
    rows = rows.detach()
    n = rows.shape[0]
    if not 0 < m <= n:
        raise ValueError(f"cannot choose {m} of {n} rows")
    adjacency = tnn_adjacency(rows, neighbours, similarity=similarity)
    c = adjacency.sum(dim=1).max()
    gains = alpha * ((rows.norm(dim=1) if norms is None else norms) + c)
    penalties = adjacency if beta == 1 else beta * adjacency  # (1 * x == x: skip a pass over n^2)
    if rows.device.type == "cpu":
        return torch.from_numpy(_greedy_numpy(gains.numpy(), penalties.numpy(), m))
    return _greedy_torch(gains, penalties, m)


def _greedy_numpy(gains: np.ndarray, penalties: np.ndarray, m: int) -> np.ndarray:
    gains = gains.copy()
    chosen = np.empty(m, dtype=np.int64)
    for step in range(m):
        best = int(gains.argmax())  # the first maximum: ties go to the lowest index
        chosen[step] = best
        gains -= penalties[best]  # adding `best` costs each neighbour s(best, j) of gain
        gains[best] = -np.inf
    return chosen


def _greedy_torch(gains: torch.Tensor, penalties: torch.Tensor, m: int) -> torch.Tensor:
    gains = gains.clone()
    chosen = torch.empty(m, dtype=torch.long, device=gains.device)
    for step in range(m):
        # Indices stay tensors: no .item(), so a CUDA loop never waits for the device.
        best = gains.argmax()
        chosen[step] = best
        gains -= penalties[best]
        gains[best] = -torch.inf
    return chosen


def marginal_gains(
    rows: torch.Tensor,
    chosen: Sequence[int],
    *,
    neighbours: int = DEFAULT_NEIGHBOURS,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> list[float]:
    """``f(S_k) - f(S_{k-1})`` for each prefix of ``chosen`` (for tests and diagnostics)."""
    adjacency = tnn_adjacency(rows, neighbours)
    c = adjacency.sum(dim=1).max()
    utility = alpha * (rows.norm(dim=1) + c)
    gains = []
    for k, i in enumerate(chosen):
        gains.append(float(utility[i] - beta * adjacency[i, list(chosen[:k])].sum()))
    return gains


# ---- the reference path -------------------------------------------------------------------------


def reference_graph(rows: np.ndarray, neighbours: int = DEFAULT_NEIGHBOURS) -> nx.Graph:
    """The symmetric t-NN graph as a networkx graph: nodes carry ``norm``, edges ``weight``."""
    import networkx as nx  # only the reference needs it, and importing it takes most of a second

    rows = np.asarray(rows, dtype=np.float64)
    n = len(rows)
    norms = np.linalg.norm(rows, axis=1)
    graph = nx.Graph()
    for i in range(n):
        graph.add_node(i, norm=float(norms[i]))
    for i in range(n):
        similarity = {j: float(rows[i] @ rows[j] / (norms[i] * norms[j])) for j in range(n) if j != i}
        nearest = sorted(similarity, key=lambda j: (-similarity[j], j))[: min(neighbours, n - 1)]
        for j in nearest:
            graph.add_edge(i, j, weight=max(similarity[j], 0.0))
    return graph


def reference_objective(
    graph: nx.Graph, subset: Sequence[int], *, alpha: float = 1.0, beta: float = 1.0
) -> float:
    """``f(S)`` of Eq. D.9, straight from its definition."""
    c = max(sum(w for _, _, w in graph.edges(node, data="weight")) for node in graph)
    utility = sum(graph.nodes[i]["norm"] + c for i in subset)
    penalty = sum(w for _, _, w in graph.subgraph(subset).edges(data="weight"))
    return alpha * utility - beta * penalty


def reference_greedy(
    graph: nx.Graph, m: int, *, alpha: float = 1.0, beta: float = 1.0
) -> list[int]:
    """The greedy maximisation of ``f``: ``m`` times, add the row whose addition raises ``f`` most."""
    chosen: list[int] = []
    for _ in range(m):
        current = reference_objective(graph, chosen, alpha=alpha, beta=beta)
        candidates = [i for i in sorted(graph) if i not in chosen]
        gains = {
            i: reference_objective(graph, [*chosen, i], alpha=alpha, beta=beta) - current
            for i in candidates
        }
        chosen.append(max(candidates, key=lambda i: (gains[i], -i)))
    return chosen
