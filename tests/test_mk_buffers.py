"""The buffer pool reuses a buffer only once nothing uses its memory any more.

Each scenario below keeps a pooled tensor alive in a different way (a weight view the user keeps, a
``p`` saved for backward and used by a second backward, two forwards' graphs alive at once, a
``.grad`` kept across steps) and compares its results, bit for bit, with the same computation done
without pooling. The same scenarios are run against a pool that hands out buffers still in use,
and must catch it: that keeps them from passing vacuously.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from sopkit.mk import buffers, compiled, expand, find_majority

HAS_COMPILED = compiled.available(3)


class _ReusesAtOnce:
    """A broken pool: one buffer per shape, handed out whether or not it is in use."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, ...], np.ndarray] = {}

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        if shape not in self._buffers:
            self._buffers[shape] = np.empty(shape, dtype=np.float32)
        return torch.from_numpy(self._buffers[shape])


def _model(sampler: str) -> nn.Module:
    if sampler == "compiled" and not HAS_COMPILED:
        pytest.skip("the 'compiled' sampler needs torch.compile with a C++ compiler")
    torch.manual_seed(0)
    model = expand(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)), 3, seed=1)
    find_majority(model).sampler = sampler  # type: ignore[union-attr]
    model.train()
    return model


def _loss(model: nn.Module, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return model(torch.randn(5, 8, generator=generator)).square().mean()


def _kept_weight_view(model: nn.Module) -> list[torch.Tensor]:
    _loss(model, 0)
    kept = model[0].weight  # the user keeps the layer's weight of that step
    snapshot = kept.clone()
    for step in range(1, 6):
        _loss(model, step).backward()
    return [kept, snapshot]


def _retained_graph_second_backward(model: nn.Module) -> list[torch.Tensor]:
    copies = find_majority(model).copies  # type: ignore[union-attr]
    loss = _loss(model, 0)
    loss.backward(retain_graph=True)
    first = copies.grad.clone()
    for step in range(1, 5):  # other steps in between draw and free buffers of every shape
        copies.grad = None
        _loss(model, step).backward()
    copies.grad = None
    loss.backward()  # with the p this graph saved
    return [first, copies.grad]


def _two_forwards_one_backward(model: nn.Module) -> list[torch.Tensor]:
    copies = find_majority(model).copies  # type: ignore[union-attr]
    (_loss(model, 0) + _loss(model, 1)).backward()  # gradient accumulation in one graph
    return [copies.grad]


def _grad_kept_across_steps(model: nn.Module) -> list[torch.Tensor]:
    copies = find_majority(model).copies  # type: ignore[union-attr]
    _loss(model, 0).backward()
    kept = copies.grad  # a pooled buffer when backward wrote the gradient into one
    snapshot = kept.clone()
    for step in range(1, 5):
        copies.grad = None  # zero_grad(set_to_none=True)
        _loss(model, step).backward()
    return [kept, snapshot, copies.grad]


SCENARIOS: dict[str, Callable[[nn.Module], list[torch.Tensor]]] = {
    "a weight view kept by the user": _kept_weight_view,
    "p saved for a second backward (retain_graph)": _retained_graph_second_backward,
    "two forwards, one backward": _two_forwards_one_backward,
    "a .grad kept across steps": _grad_kept_across_steps,
}
SAMPLERS = ["sfc64", "compiled"]


def _run(scenario: str, sampler: str, pool: object, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    with monkeypatch.context() as patch:
        patch.setattr(buffers, "_pool", pool)
        results = SCENARIOS[scenario](_model(sampler))
        return [r.clone() for r in results]  # read while the pool is still the one under test


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pooled_results_equal_unpooled_ones_bit_for_bit(scenario, sampler, monkeypatch):
    pooled = _run(scenario, sampler, buffers.BufferPool(), monkeypatch)
    unpooled = _run(scenario, sampler, buffers.BufferPool(limit=0), monkeypatch)
    for a, b in zip(pooled, unpooled, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_scenarios_catch_a_pool_that_hands_out_buffers_in_use(scenario, sampler, monkeypatch):
    if sampler == "compiled" and scenario == "p saved for a second backward (retain_graph)":
        pytest.skip("the compiled sampler saves no p: backward regenerates it")
    broken = _run(scenario, sampler, _ReusesAtOnce(), monkeypatch)
    unpooled = _run(scenario, sampler, buffers.BufferPool(limit=0), monkeypatch)
    assert not all(torch.equal(a, b) for a, b in zip(broken, unpooled, strict=True))


def test_a_buffer_is_reused_once_every_view_of_it_is_gone():
    pool = buffers.BufferPool(limit=2)
    first = pool.take((3, 7))
    address = first.data_ptr()
    row = first[1]  # a view keeps the memory in use
    del first
    gc.collect()
    assert pool.free((3, 7)) == 0
    second = pool.take((3, 7))
    assert second.data_ptr() != address
    del row
    assert pool.free((3, 7)) == 1
    assert pool.take((3, 7)).data_ptr() == address
    assert second.data_ptr() != address


def test_beyond_the_limit_buffers_are_fresh_and_never_pooled():
    pool = buffers.BufferPool(limit=1)
    held = [pool.take((5,)) for _ in range(3)]
    assert pool.owned((5,)) == 1 and len({t.data_ptr() for t in held}) == 3
    del held
    assert pool.free((5,)) == 1
    assert buffers.BufferPool(limit=0).owned((5,)) == 0


def test_a_buffer_freed_on_another_thread_returns_to_the_pool():
    """The autograd engine frees saved tensors on its own threads: the callback takes no lock."""
    import threading

    pool = buffers.BufferPool(limit=1)
    tensor = pool.take((4,))
    holder = [tensor]
    del tensor
    with pool._lock:  # even while take() would hold the lock
        thread = threading.Thread(target=holder.clear)
        thread.start()
        thread.join(timeout=10)
        assert not thread.is_alive()
    assert pool.free((4,)) == 1
