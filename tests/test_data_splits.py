"""Tests for sopkit.data.splits: TensorSplit, LoaderSplit and DataSplits, on toy tensors."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from sopkit.data import DataSplits, LoaderSplit, Split, TensorSplit
from sopkit.errors import UserError


def _epoch(split: Split, batch_size: int, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*split.batches(batch_size, **kwargs), strict=True)  # type: ignore[arg-type]
    return torch.cat(xs), torch.cat(ys)


def _toy_split(n: int = 10) -> TensorSplit:
    return TensorSplit(torch.arange(n * 2, dtype=torch.float32).view(n, 2), torch.arange(n))


def test_tensor_split_batches_cover_each_example_once() -> None:
    split = _toy_split(10)
    assert isinstance(split, Split)
    sizes = [len(y) for _, y in split.batches(4, shuffle=True, generator=torch.Generator())]
    assert sizes == [4, 4, 2]  # last partial batch kept
    x, y = _epoch(split, 3, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert sorted(y.tolist()) == list(range(10))
    assert torch.equal(x[:, 0], 2 * y.float())  # inputs stayed paired with their labels


def test_tensor_split_shuffle_is_reproducible_by_generator() -> None:
    split = _toy_split(50)
    _, a = _epoch(split, 8, shuffle=True, generator=torch.Generator().manual_seed(1))
    _, b = _epoch(split, 8, shuffle=True, generator=torch.Generator().manual_seed(1))
    _, c = _epoch(split, 8, shuffle=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Golden order: a training run's seed fixes its epochs' order, on every run.
    assert a[:8].tolist() == [45, 25, 14, 31, 33, 4, 5, 16]
    # One generator over two epochs gives two different orders.
    gen = torch.Generator().manual_seed(1)
    _, first = _epoch(split, 8, shuffle=True, generator=gen)
    _, second = _epoch(split, 8, shuffle=True, generator=gen)
    assert torch.equal(first, a) and not torch.equal(first, second)


def test_tensor_split_without_shuffle_keeps_order() -> None:
    split = _toy_split(10)
    x, y = _epoch(split, 4, shuffle=False)
    assert torch.equal(y, torch.arange(10)) and torch.equal(x, split.x)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_batch_size_is_a_user_error_at_call_time(bad: object) -> None:
    with pytest.raises(UserError, match="batch size"):
        _toy_split().batches(bad, shuffle=False)  # type: ignore[arg-type]


def test_tensor_split_rejects_mismatched_tensors() -> None:
    with pytest.raises(ValueError, match="3 inputs but 4 labels"):
        TensorSplit(torch.zeros(3, 2), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="one-dimensional"):
        TensorSplit(torch.zeros(3, 2), torch.zeros(3, 1, dtype=torch.int64))


def test_data_splits_to_moves_every_split() -> None:
    splits = DataSplits("toy", (2,), 10, _toy_split(), _toy_split(4), _toy_split(6))
    moved = splits.to("cpu")
    assert moved.name == "toy" and moved.input_shape == (2,)
    assert [len(s) for s in (moved.train, moved.val, moved.test)] == [10, 4, 6]
    assert all(isinstance(s, TensorSplit) for s in (moved.train, moved.val, moved.test))


def test_loader_split_batches_and_keeps_its_loader_between_epochs() -> None:
    dataset = TensorDataset(torch.arange(14, dtype=torch.float32).view(7, 2), torch.arange(7))
    split = LoaderSplit(dataset, num_workers=0)
    assert len(split) == 7
    sizes = [len(y) for _, y in split.batches(3, shuffle=False)]
    assert sizes == [3, 3, 1]
    loader = split._loader
    x, y = _epoch(split, 3, shuffle=False)
    assert split._loader is loader  # same batch size and shuffle flag: the loader is reused
    assert torch.equal(y, torch.arange(7)) and torch.equal(x[:, 0], 2 * y.float())
    _epoch(split, 2, shuffle=False)
    assert split._loader is not loader  # another batch size: a new loader
    split.close()
    assert split._loader is None
    with pytest.raises(UserError, match="num_workers"):
        LoaderSplit(dataset, num_workers=-1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensor_split_on_cuda_shuffles_on_device() -> None:
    split = _toy_split(20).to("cuda")
    # A CPU generator still works (drawn on CPU, moved) and a CUDA one draws on the device.
    for gen in (torch.Generator().manual_seed(0), torch.Generator("cuda").manual_seed(0)):
        x, y = _epoch(split, 6, shuffle=True, generator=gen)
        assert x.is_cuda and y.is_cuda
        assert sorted(y.tolist()) == list(range(20))
    # The CPU generator gives the same order as on the CPU: a seed means one order everywhere.
    _, on_cpu = _epoch(_toy_split(20), 6, shuffle=True, generator=torch.Generator().manual_seed(0))
    _, on_cuda = _epoch(split, 6, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(on_cuda.cpu(), on_cpu)
