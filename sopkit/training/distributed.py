"""One trial on many processes: DistributedDataParallel (DDP) under ``torchrun``.

``torchrun --nproc-per-node N -m sopkit compare ...`` starts N processes (ranks). Every rank runs
the whole comparison; every trial is trained by all N together, one DDP model per rank. The loop
trains this way whenever a default process group of more than one process is initialised
(:func:`current`); :func:`start` joins the one torchrun describes in the environment.

What each rank does, and why an N-process step equals a one-process step on the whole batch:

* **Batches.** Every rank seeds the same shuffle generator, so every rank draws the same
  permutation and forms the same global batch; rank ``r`` trains on ``batch[r::N]``. In-memory data
  is augmented as a whole batch before the share is taken, so the images are one process's.
  File-backed data (a ``LoaderSplit``) is never loaded whole: each rank's ``DataLoader`` samples
  only its share of the same order (``LoaderSplit.shard``), in batches of ``B / N``, which are the
  same examples; a recipe the loop applies to those (imagefolder's crop) draws from a generator of
  the rank's own, so ranks do not repeat each other's crops (not one process's bits, then).
* **Batch size.** ``B`` must be a multiple of N (:func:`check_batch_size`): full batches then give
  equal shares, and DDP's average of the ranks' gradients is the gradient of the batch's mean loss.
  The epoch's last batch may be smaller and split unequally; each rank's loss is weighted by
  ``N * share / batch`` (:class:`BatchShare`) so the average is still the whole batch's mean. A rank
  left without an example (fewer left than ranks) steps on one example at weight 0: DDP needs every
  rank in every step.
* **Majority kernels.** The mixing stream is seeded from the run's seed (``MixingStream``), so every
  rank draws the same ``p`` at every step. Adversarial MK combines its gradient with respect to the
  virtual weights across ranks with the same weights (:func:`combine_gradient`) before it ascends.
* **Evaluation.** Each rank evaluates ``batch[r::N]`` of every evaluation batch (a file-backed
  set: its loader share) with the unwrapped model, and the counts of correct and of all examples
  are summed over ranks: the accuracy is one process's, exactly. A data set scored by another
  metric (GLUE's) is evaluated whole on every rank, with the same model. Buffers (BatchNorm's running statistics) are broadcast from rank 0 before
  (:func:`finish_epoch`), as DDP broadcasts them before every training forward. Batch statistics in
  training are each rank's own (DDP's default; no SyncBatchNorm).
* **Divergence.** The first step at which any rank's loss was not finite is agreed on at the end
  of each epoch, so every rank stops after the same epoch.
* **Writing.** Rank 0 alone writes the store, model files and reports (``sopkit.experiment.ranks``).

Hooks of a strategy receive the DDP wrapper (``model.module`` is the model); ``find_majority`` and
``collapse`` see through it. Strategies that swap parameters during a step (``subset``) cannot be
followed by DDP and say so with ``data_parallel = False``. FSDP is refused
(``sopkit.mk.convert.refuse_fsdp``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sopkit.data.splits import LoaderSplit, Split
from sopkit.errors import UserError
from sopkit.mk.convert import refuse_fsdp

__all__ = [
    "WHOLE_BATCH",
    "BatchShare",
    "Ranks",
    "RankParallel",
    "augment_tag",
    "barrier",
    "broadcast_object",
    "check_batch_size",
    "combine_gradient",
    "current",
    "evaluation_batches",
    "finish_epoch",
    "start",
    "stop",
    "summed_counts",
    "torchrun_ranks",
    "training_batches",
    "unwrap",
    "wrap",
]

#: The variables torchrun sets in every process it starts (all three, or it is not torchrun).
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

_NO_BAD_STEP = torch.iinfo(torch.long).max

Augment = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Ranks:
    """This process's place among the data-parallel processes of one trial."""

    rank: int
    world: int
    local_rank: int = 0
    local_world: int = 1

    @property
    def writer(self) -> bool:
        """Whether this process writes the store, model files and reports (rank 0 alone)."""
        return self.rank == 0

    def launcher(self) -> str:
        """The torchrun command line that starts this many processes (for the stored command)."""
        nodes = max(1, self.world // max(1, self.local_world))
        nodes_option = f" --nnodes {nodes}" if nodes > 1 else ""
        return f"torchrun{nodes_option} --nproc-per-node {self.local_world} -m"


def torchrun_ranks(environ: Mapping[str, str] | None = None) -> Ranks | None:
    """The ranks torchrun gave this process (from ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), or None
    outside torchrun or when it started a single process (nothing to share then)."""
    environ = os.environ if environ is None else environ
    values = {name: environ.get(name) for name in TORCHRUN_VARIABLES}
    if all(value is None for value in values.values()):
        return None
    missing = [name for name, value in values.items() if value is None]
    if missing:
        raise UserError(
            f"{', '.join(missing)} not set, but {', '.join(n for n in values if n not in missing)} "
            "is: start data-parallel runs with torchrun (torchrun --nproc-per-node N -m sopkit "
            "compare ...), which sets all of RANK, WORLD_SIZE and LOCAL_RANK."
        )
    try:
        rank, world, local_rank = (int(str(values[name])) for name in TORCHRUN_VARIABLES)
        local_world = int(environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        raise UserError(f"torchrun's environment is not integers: {values}.") from None
    if not (world >= 1 and 0 <= rank < world and 0 <= local_rank < max(local_world, 1)):
        raise UserError(f"torchrun's environment is inconsistent: {values}.")
    if world == 1:
        return None
    return Ranks(rank, world, local_rank, local_world)


def start(ranks: Ranks, device_name: str) -> torch.device:
    """Join torchrun's process group and return this rank's training device: ``cuda:LOCAL_RANK``
    with NCCL when the device is CUDA, the CPU with gloo otherwise."""
    from sopkit.training.device import select_device

    if device_name.strip().startswith("cuda:"):
        raise UserError(
            f"--device {device_name} names one GPU; under torchrun every rank takes "
            "cuda:LOCAL_RANK. Pass --device cuda (or auto), and choose GPUs with "
            "CUDA_VISIBLE_DEVICES."
        )
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if ranks.local_rank >= count:
            raise UserError(
                f"torchrun started {ranks.local_world} processes on this node, but only {count} "
                f"CUDA device(s) are visible; use --nproc-per-node {count} or fewer."
            )
        # Before anything touches CUDA (select_device tries the device): a rank that first
        # allocated on the default device would hold a context on cuda:0 for good.
        torch.cuda.set_device(ranks.local_rank)
    device = select_device(device_name)
    if device.type == "cuda":
        device, backend = torch.device("cuda", ranks.local_rank), "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UserError(f"Data-parallel training runs on CUDA or the CPU, not {device.type}.")
    if not dist.is_initialized():
        # NCCL is told its device up front: its barrier need not guess which GPU a rank uses.
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return device


def stop() -> None:
    """Leave the process group (at the end of a torchrun comparison)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current() -> Ranks | None:
    """The data-parallel ranks of this process, or None when it trains alone (no default process
    group, or one of a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world == 1:
        return None
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return Ranks(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", 0)), local_world)


def _communication_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo is given CPU tensors (its CUDA support is partial).
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(value: Any) -> Any:
    """``value`` as rank 0 has it, on every rank (identity when training alone)."""
    if current() is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- the model -----------------------------------------------------------------------------------


class RankParallel(DistributedDataParallel):
    """DDP that also carries the fraction of the step's whole batch this rank holds (``share``), for
    strategies that reduce something of their own across ranks (:func:`combine_gradient`)."""

    share: float = 1.0


def wrap(model: nn.Module, device: torch.device, strategy: object = None) -> nn.Module:
    """``model`` (prepared by ``strategy``, on ``device``) in DDP when this process is one of
    several; the model itself otherwise. A strategy whose class says ``data_parallel = False``
    (it swaps parameters during a step, which DDP cannot follow) is refused then."""
    if current() is None:
        return model
    if not getattr(strategy, "data_parallel", True):
        name = getattr(strategy, "name", type(strategy).__name__)
        raise UserError(
            f"Strategy {name!r} cannot train data-parallel (it swaps parameters during a step, "
            "which DistributedDataParallel cannot follow); run it without torchrun."
        )
    refuse_fsdp(model)
    if device.type != "cuda":
        return RankParallel(model)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return RankParallel(model, device_ids=[index], output_device=index)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (the model itself when it is not wrapped)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def check_batch_size(batch_size: int) -> None:
    """A UserError when ``batch_size`` does not split evenly over the ranks."""
    ranks = current()
    if ranks is not None and batch_size % ranks.world:
        raise UserError(
            f"Batch size {batch_size} does not split evenly over {ranks.world} processes: use a "
            f"multiple of {ranks.world} (each process trains on batch size / processes)."
        )


# ---- batches -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchShare:
    """This rank's part of one step's whole batch: ``fraction`` = its examples / the batch's."""

    fraction: float = 1.0
    world: int = 1

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate: the rank's mean loss times ``world * fraction``, so that DDP's
        mean of the ranks' gradients is the gradient of the whole batch's mean loss."""
        scale = self.world * self.fraction
        return loss if scale == 1.0 else loss * scale

    def part(self, loss: torch.Tensor) -> torch.Tensor:
        """The rank's contribution to the whole batch's mean loss (summed over ranks by
        :func:`finish_epoch`)."""
        return loss if self.fraction == 1.0 else loss * self.fraction

    def enter(self, model: nn.Module) -> None:
        """Tell a :class:`RankParallel` model the step's share."""
        if isinstance(model, RankParallel):
            model.share = self.fraction


WHOLE_BATCH = BatchShare()


def augment_tag(split: Split) -> str:
    """What sets this rank's augmentation generator apart: nothing for in-memory data (the whole
    batch is augmented alike on every rank), the rank for a loader's share of it."""
    ranks = current()
    return f" rank {ranks.rank}" if ranks is not None and isinstance(split, LoaderSplit) else ""


def training_batches(
    split: Split, batch_size: int, generator: torch.Generator, augment: Augment | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, BatchShare]]:
    """One epoch of this rank's training batches, augmented, with their :class:`BatchShare`."""
    ranks = current()
    if ranks is None:
        for inputs, targets in split.batches(batch_size, shuffle=True, generator=generator):
            yield (inputs if augment is None else augment(inputs)), targets, WHOLE_BATCH
    elif isinstance(split, LoaderSplit):
        yield from _loader_shares(split, ranks, batch_size, generator, augment)
    else:
        yield from _tensor_shares(split, ranks, batch_size, generator, augment)


def _tensor_shares(
    split: Split,
    ranks: Ranks,
    batch_size: int,
    generator: torch.Generator,
    augment: Augment | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, BatchShare]]:
    world = ranks.world
    for inputs, targets in split.batches(batch_size, shuffle=True, generator=generator):
        if augment is not None:
            inputs = augment(inputs)
        whole = targets.shape[0]
        mine, labels = inputs[ranks.rank :: world], targets[ranks.rank :: world]
        if labels.shape[0] == 0:  # fewer examples left than ranks: step at weight 0
            yield inputs[:1], targets[:1], BatchShare(0.0, world)
        else:
            yield mine, labels, BatchShare(labels.shape[0] / whole, world)


def _loader_shares(
    split: LoaderSplit,
    ranks: Ranks,
    batch_size: int,
    generator: torch.Generator,
    augment: Augment | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, BatchShare]]:
    n, world = len(split), ranks.world
    steps = math.ceil(n / batch_size)
    last: tuple[torch.Tensor, torch.Tensor] | None = None
    local = split.shard(ranks.rank, world)
    for step, (inputs, targets) in enumerate(
        local.batches(batch_size // world, shuffle=True, generator=generator)
    ):
        whole = min(batch_size, n - step * batch_size)
        if augment is not None:
            inputs = augment(inputs)
        last = inputs, targets
        yield inputs, targets, BatchShare(targets.shape[0] / whole, world)
        steps -= 1
    if steps and last is not None:  # the last batch had no example for this rank
        yield last[0][:1], last[1][:1], BatchShare(0.0, world)


def evaluation_batches(split: Split, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's part of an evaluation pass over ``split`` (all of it when training alone); the
    parts of all ranks are the whole split, once (:func:`summed_counts` adds them up)."""
    ranks = current()
    if ranks is None:
        yield from split.batches(batch_size, shuffle=False)
    elif isinstance(split, LoaderSplit):
        local = split.shard(ranks.rank, ranks.world)
        yield from local.batches(math.ceil(batch_size / ranks.world), shuffle=False)
    else:
        for inputs, targets in split.batches(batch_size, shuffle=False):
            if targets.shape[0] > ranks.rank:  # no forward on an empty share (some layers refuse)
                yield inputs[ranks.rank :: ranks.world], targets[ranks.rank :: ranks.world]


# ---- reductions ----------------------------------------------------------------------------------


def summed_counts(correct: torch.Tensor, total: int) -> tuple[int, int]:
    """``(correct, total)`` summed over ranks (as they are when training alone)."""
    if current() is None:
        return int(correct.item()), total
    counts = torch.tensor([int(correct.item()), total], dtype=torch.long)
    counts = counts.to(_communication_device())
    dist.all_reduce(counts)
    return int(counts[0].item()), int(counts[1].item())


def finish_epoch(
    model: nn.Module, loss_sum: torch.Tensor, first_bad_step: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """At the end of an epoch: the epoch's loss sum over the whole batches, the first step at which
    any rank's loss was not finite (so every rank stops at the same epoch), and rank 0's buffers on
    every rank (so every rank evaluates and ships the same model). Unchanged when training alone."""
    if current() is None:
        return loss_sum, first_bad_step
    where = _communication_device()
    loss = loss_sum.detach().to(where, torch.float64).reshape(1)
    dist.all_reduce(loss)
    bad = first_bad_step.to(where).reshape(1)
    bad = torch.where(bad < 0, torch.full_like(bad, _NO_BAD_STEP), bad)
    dist.all_reduce(bad, op=dist.ReduceOp.MIN)
    bad = torch.where(bad == _NO_BAD_STEP, torch.full_like(bad, -1), bad)
    for buffer in unwrap(model).buffers():
        _broadcast(buffer)
    return (
        loss.to(loss_sum.device, loss_sum.dtype).reshape(loss_sum.shape),
        bad.to(first_bad_step.device).reshape(first_bad_step.shape),
    )


def _broadcast(tensor: torch.Tensor) -> None:
    where = _communication_device()
    if tensor.device == where:
        dist.broadcast(tensor, src=0)
        return
    moved = tensor.detach().to(where)
    dist.broadcast(moved, src=0)
    with torch.no_grad():
        tensor.copy_(moved)


def combine_gradient(model: nn.Module, gradient: torch.Tensor) -> torch.Tensor:
    """A gradient of this rank's mean loss made the whole batch's: the ranks' gradients weighted by
    their shares and summed. ``gradient`` itself when ``model`` is not data-parallel."""
    if not isinstance(model, RankParallel):
        return gradient
    combined = (gradient * model.share).to(_communication_device())
    dist.all_reduce(combined)
    return combined.to(gradient.device)


def barrier() -> None:
    """Wait for every rank (nothing to wait for when training alone)."""
    if current() is not None:
        dist.barrier()
