"""The splits a training run consumes: the :class:`Split` protocol and its two implementations.

Every split has the same small interface: ``len()``, ``batches(batch_size, shuffle=...,
generator=...)`` and ``to(device)``. Two kinds exist:

* :class:`TensorSplit` keeps the whole split as two tensors on one device and slices batches out of
  them, shuffling with ``torch.randperm`` on that device (the way KellerJordan/cifar10-airbench
  does). For small data sets this is far faster than a ``DataLoader``: no worker processes, no
  per-example Python, no host-to-device copy per batch.
* :class:`LoaderSplit` wraps a file-backed ``torch.utils.data.Dataset`` and batches it with a
  ``DataLoader`` (worker processes, pinned memory), for data that should not sit in memory whole.

:class:`DataSplits` bundles train, validation and test with the per-example input shape and the
number of classes. The training types import this module, so it imports nothing from the training
loop (not even under ``TYPE_CHECKING``): no import cycle is possible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader, Dataset

from sopkit.data.augment import AUGMENTS, BatchAugment
from sopkit.data.pipeline import SampleTransform, SeededOrder, cpu_generator, seed_worker
from sopkit.errors import UserError

__all__ = ["Batch", "DataSplits", "LoaderSplit", "Split", "TensorSplit"]


Batch = tuple[torch.Tensor, torch.Tensor]


@runtime_checkable
class Split(Protocol):
    """One of train / val / test: something a training loop can measure and iterate in batches."""

    def __len__(self) -> int: ...

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """One epoch of ``(inputs, labels)`` batches; the last batch may be smaller."""
        ...

    def to(self, device: torch.device | str) -> Split:
        """A split with the same examples whose batches live on ``device``."""
        ...


def _check_batch_size(batch_size: int) -> None:
    # batch_size usually comes straight from the command line, so a bad one is the user's mistake.
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size!r}.")


def _permutation(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A random permutation of ``range(n)`` on ``device``, drawn from ``generator`` when given."""
    if generator is None:
        return torch.randperm(n, device=device)
    if generator.device.type == device.type:
        return torch.randperm(n, generator=generator, device=device)
    # randperm refuses a generator that lives on another device type (a CPU generator for CUDA
    # data); drawing on the generator's device keeps the order reproducible from that generator,
    # at the cost of one small index copy per epoch.
    return torch.randperm(n, generator=generator, device=generator.device).to(device)


class TensorSplit:
    """An in-memory split: inputs ``x`` of shape ``(N, *input_shape)`` and int64 labels ``y`` (N,).

    Batches are slices (or, when shuffled, index gathers) of the tensors on their own device; no
    ``DataLoader`` and no copies to another device are involved, which is what makes small data
    sets on a GPU fast.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if y.dim() != 1:
            raise ValueError(f"labels must be one-dimensional, got shape {tuple(y.shape)}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
        if x.device != y.device:
            raise ValueError(f"inputs on {x.device} but labels on {y.device}")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        return f"TensorSplit(n={len(self)}, x={tuple(self.x.shape)}, device={self.x.device})"

    @property
    def device(self) -> torch.device:
        """The device the examples (and hence every batch) live on."""
        return self.x.device

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """One epoch in batches of ``batch_size``; the last, partial batch is kept.

        With ``shuffle`` the order is a fresh permutation drawn from ``generator`` (so the same
        generator state gives the same order); without it the stored order is kept.
        """
        # Validate now rather than inside the generator, so a bad batch size fails at the call.
        _check_batch_size(batch_size)
        order = _permutation(len(self), generator, self.x.device) if shuffle else None
        return self._iterate(batch_size, order)

    def _iterate(self, batch_size: int, order: torch.Tensor | None) -> Iterator[Batch]:
        for start in range(0, len(self), batch_size):
            if order is None:
                # Plain slices are views: no copy at all for an unshuffled pass (evaluation).
                yield self.x[start : start + batch_size], self.y[start : start + batch_size]
            else:
                index = order[start : start + batch_size]
                yield self.x[index], self.y[index]

    def to(self, device: torch.device | str) -> TensorSplit:
        """This split with its tensors on ``device`` (no copy when they are there already)."""
        device = torch.device(device)
        return TensorSplit(self.x.to(device), self.y.to(device))


class LoaderSplit:
    """A file-backed split: a ``Dataset`` of ``(input, label)`` batched by a ``DataLoader``.

    Each batch is moved to :attr:`device` with ``non_blocking=True``; memory is pinned when the
    device is CUDA so that copy really overlaps with compute. With ``num_workers > 0`` the workers
    are persistent, and the ``DataLoader`` is kept between epochs (for the same batch size, shuffle
    flag and generator) so they are not re-spawned every epoch. :meth:`close` lets them go.

    A :class:`~sopkit.data.pipeline.SampleTransform` with a random transform gets a seed per
    sample from the generator (see :mod:`sopkit.data.pipeline`), so its augmentation is the same for
    the same generator with any number of workers. ``on_device`` (e.g. a
    :class:`~sopkit.data.pipeline.Normalize`) finishes each input batch after the copy.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        *,
        num_workers: int = 2,
        device: torch.device | str = "cpu",
        on_device: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise UserError(f"num_workers must be a non-negative integer, got {num_workers!r}.")
        self.dataset = dataset
        self.num_workers = num_workers
        self.device = torch.device(device)
        self.on_device = on_device
        self._length = len(dataset)  # type: ignore[arg-type]
        self._loader: DataLoader[Any] | None = None
        self._loader_key: tuple[int, bool, int | None] | None = None
        # A data-parallel rank's share (see ``shard``): this rank of that many; (0, 1) is all.
        self._share = (0, 1)
        self._shards: dict[tuple[int, int], LoaderSplit] = {}

    def __len__(self) -> int:
        return len(range(self._share[0], self._length, self._share[1]))

    def shard(self, rank: int, world: int) -> LoaderSplit:
        """The share of data-parallel process ``rank`` of ``world``: its ``batches`` load only the
        examples at positions ``rank``, ``rank + world``, ... of each epoch's order, which every
        rank draws alike from the same generator (``SeededOrder``). In batches of ``b``, these are
        the strided shares ``batch[rank::world]`` of one process's batches of ``world * b``. Kept,
        so its workers persist between epochs."""
        if self._share != (0, 1):
            raise ValueError("shard() of a shard")
        if (rank, world) not in self._shards:
            share = LoaderSplit(
                self.dataset,
                num_workers=self.num_workers,
                device=self.device,
                on_device=self.on_device,
            )
            share._share = (rank, world)
            self._shards[(rank, world)] = share
        return self._shards[(rank, world)]

    def __repr__(self) -> str:
        return f"LoaderSplit(n={len(self)}, num_workers={self.num_workers}, device={self.device})"

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """One epoch in batches of ``batch_size`` (last partial batch kept), on :attr:`device`.

        With ``shuffle`` the sampler draws its order (and the per-sample seeds of a random
        transform) from ``generator``, which also seeds the workers, so the same generator state
        gives the same epoch. A generator on another device is replaced by a CPU one seeded from it
        (once per loader: the ``DataLoader`` samples on the CPU).
        """
        _check_batch_size(batch_size)
        return self._iterate(self._get_loader(batch_size, shuffle, generator))

    def _get_loader(
        self, batch_size: int, shuffle: bool, generator: torch.Generator | None
    ) -> DataLoader[Any]:
        # The loader holds a reference to the generator, so its id cannot be recycled while cached.
        key = (batch_size, shuffle, None if generator is None else id(generator))
        if self._loader is None or self._loader_key != key:
            self.close()
            on_cpu = cpu_generator(generator)
            seeded = isinstance(self.dataset, SampleTransform) and self.dataset.random
            self._loader = DataLoader(
                self.dataset,
                batch_size=batch_size,
                sampler=SeededOrder(
                    self._length,
                    shuffle=shuffle,
                    generator=on_cpu,
                    seeded=seeded,
                    rank=self._share[0],
                    world=self._share[1],
                ),
                num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=self.num_workers > 0,
                generator=on_cpu,
                worker_init_fn=seed_worker,
                drop_last=False,
            )
            self._loader_key = key
        return self._loader

    def _iterate(self, loader: DataLoader[Any]) -> Iterator[Batch]:
        for x, y in loader:
            x = x.to(self.device, non_blocking=True)
            if self.on_device is not None:
                x = self.on_device(x)
            yield x, y.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Drop the cached ``DataLoader`` (and those of its shards) so their persistent worker
        processes can exit."""
        self._loader = None
        self._loader_key = None
        for share in self._shards.values():
            share.close()

    def to(self, device: torch.device | str) -> LoaderSplit:
        """A split over the same dataset whose batches are moved to ``device``."""
        return LoaderSplit(
            self.dataset, num_workers=self.num_workers, device=device, on_device=self.on_device
        )


@dataclass
class DataSplits:
    """A loaded data set: its three splits and what a model needs to know about its examples."""

    name: str
    input_shape: tuple[int, ...]  # per example, e.g. (40,) for mnist1d, (3, 32, 32) for cifar10
    num_classes: int
    train: Split
    val: Split  # carved from the training set, never the test set
    test: Split
    # The set's standard training augmentation (``--augment standard``), in one of two forms: a
    # recipe the training loop applies to each training batch on the device (in-memory sets), or
    # the training examples with the augmentation in their input pipeline (ImageNet's workers).
    augment: BatchAugment | None = None
    augmented_train: Split | None = None
    # What the set is scored and trained with (sopkit.data.metrics): val chooses rates on ``metric``
    # and test reports it; ``loss`` is the strategies' default loss ("mse" for a regression).
    metric: str = "accuracy"
    loss: str = "cross-entropy"

    def training_split(self, augment: str) -> tuple[Split, BatchAugment | None]:
        """The split a training run draws its batches from under ``--augment augment``, and the
        recipe the loop applies to each of those batches (None: none). ``standard`` on a set
        without a recipe (mnist1d, digits) trains on the plain examples."""
        if augment not in AUGMENTS:
            raise UserError(f"Unknown augmentation {augment!r}. Valid: {', '.join(AUGMENTS)}.")
        if augment == "none":
            return self.train, None
        train = self.train if self.augmented_train is None else self.augmented_train
        return train, self.augment

    def to(self, device: torch.device | str) -> DataSplits:
        """The same data set with every split's batches on ``device``."""
        device = torch.device(device)
        augmented = self.augmented_train
        return replace(
            self,
            train=self.train.to(device),
            val=self.val.to(device),
            test=self.test.to(device),
            augmented_train=None if augmented is None else augmented.to(device),
        )
