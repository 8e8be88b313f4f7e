"""The input pipeline behind a :class:`~sopkit.data.splits.LoaderSplit`: per-sample transforms in
``DataLoader`` workers, seeded from the run.

A random transform (an augmentation such as ImageNet's random-resized crop) must give the same
images for the same run seed. Seeding each worker is not enough for that: which worker loads which
sample depends on the worker count. So the sampler (:class:`SeededOrder`) draws one seed per sample
from the run's generator, right after the epoch's order, and hands ``(index, seed)`` keys to the
data set; :class:`SampleTransform` runs the transform under torch's RNG seeded with that seed. A
sample's augmentation then depends on the run's generator alone, never on the worker count, and the
batch order is the same whether the transform is random or not. :func:`seed_worker` also seeds
Python's and NumPy's RNGs in each worker, from the base seed the ``DataLoader`` draws from the same
generator, for transforms that use those.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["Normalize", "SampleTransform", "SeededOrder", "cpu_generator", "seed_worker"]

# Per-sample seeds: below 2**62 so they fit torch.manual_seed and an int64 with room to spare.
_SEED_BOUND = 2**62

Key = int | tuple[int, int]


class SampleTransform(Dataset[tuple[Any, int]]):
    """``(transform(input), label)`` for every ``(input, label)`` of ``base``.

    With ``random`` the transform is an augmentation: the split indexes this data set with
    ``(index, seed)`` keys and the transform draws from torch's RNG seeded with ``seed`` (in a
    forked RNG state, so the caller's stream is untouched when there are no worker processes).
    A plain integer key applies the transform unseeded, for deterministic transforms.
    """

    def __init__(self, base: Dataset[Any], transform: Callable[[Any], Any], *, random: bool = False):
        self.base = base
        self.transform = transform
        self.random = random

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: Key) -> tuple[Any, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        inputs, label = self.base[index]
        if seed is None:
            return self.transform(inputs), label
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also reseed (and, unforked, leave
            # reseeded) the CUDA generators of a run loading without worker processes.
            torch.default_generator.manual_seed(seed)
            return self.transform(inputs), label


class SeededOrder(Sampler[Key]):
    """One epoch's keys for ``n`` samples: a permutation drawn from ``generator`` (or the stored
    order), as ``(index, seed)`` pairs with a seed per sample drawn next when ``seeded``.

    The permutation is drawn exactly as ``torch.utils.data.RandomSampler`` draws it from a
    generator, so a split without random transforms keeps the order it always had.

    ``rank`` of ``world`` (data-parallel processes) yields the keys at positions ``rank``,
    ``rank + world``, ... of the whole epoch's keys, drawn in full on every rank from the same
    generator: the ranks' shares of one process's epoch (like ``DistributedSampler``, but the
    strided share of each batch rather than a contiguous block).
    """

    def __init__(
        self,
        n: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None,
        seeded: bool,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world), got rank {rank} of {world}")
        self.n = n
        self.shuffle = shuffle
        self.generator = generator
        self.seeded = seeded
        self.rank = rank
        self.world = world

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))

    def __iter__(self) -> Iterator[Key]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=self.generator).tolist()
        else:
            order = list(range(self.n))
        share = slice(self.rank, None, self.world)
        if not self.seeded:
            yield from order[share]
            return
        seeds = torch.randint(0, _SEED_BOUND, (self.n,), generator=self.generator).tolist()
        yield from list(zip(order, seeds, strict=True))[share]


def cpu_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """``generator`` when it is a CPU one, else a CPU generator seeded from it.

    A ``DataLoader`` samples on the CPU and refuses a CUDA generator; the training loop makes its
    shuffle generator on the training device, so the file-backed splits derive a CPU one from it.
    """
    if generator is None or generator.device.type == "cpu":
        return generator
    seed = torch.randint(0, _SEED_BOUND, (1,), generator=generator, device=generator.device)
    return torch.Generator().manual_seed(int(seed.item()))


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed Python's and NumPy's RNGs in a ``DataLoader`` worker from torch's,
    which the ``DataLoader`` seeds with its base seed (drawn from the run's generator) + the id."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency, but workers should not care
        return
    np.random.seed(seed)


@dataclass(frozen=True)
class Normalize:
    """uint8 images to floats normalised per channel, on the training device.

    File-backed image sets send uint8 batches through the workers and the host-to-device copy
    (four times fewer bytes than float32) and normalise after the copy.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = _stats(self.mean, self.std, images.device)
        return images.float().div_(255.0).sub_(mean).div_(std)


@functools.lru_cache(maxsize=16)
def _stats(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device, not copied to it every batch.
    shape = (1, -1, 1, 1)
    return (
        torch.tensor(mean, device=device).view(shape),
        torch.tensor(std, device=device).view(shape),
    )
