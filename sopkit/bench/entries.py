"""What ``sopkit bench`` times, set up: each strategy exactly as the training loop sets it up, the
hand-written loops it is compared with, synthetic batches, and the memory each step needs.

Strategies that train several models (an ensemble, a distilled student) have no single step of
their own: their cost is the steps of the strategies they train, which are rows of the table. They
are detected by running their ``fit`` against a probe session that stops at the first training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sopkit.bench.config import BenchConfig
from sopkit.bench.results import EntryResult
from sopkit.data.splits import DataSplits, TensorSplit
from sopkit.errors import UserError
from sopkit.mk import count_parameters, find_majority
from sopkit.training.config import TrainConfig
from sopkit.training.device import seed_everything
from sopkit.training.loop import TrainingSession, TrainingState
from sopkit.training.optim import make_optimizer
from sopkit.training.strategy import Strategy
from sopkit.training.types import RunContext


class _FirstTraining(Exception):
    """Raised by the probe session at a strategy's first training."""

    def __init__(self, strategy: Strategy) -> None:
        super().__init__(strategy.name)
        self.strategy = strategy


class ProbeSession(TrainingSession):
    """A session whose ``train`` trains nothing: it stops ``fit`` at the first training."""

    def train(self, strategy: Strategy, **kwargs: Any) -> Any:  # type: ignore[override]
        raise _FirstTraining(strategy)


def single_step_note(strategy: Strategy, probe: ProbeSession) -> str | None:
    """None when ``strategy``'s training is one run of its own step (so it can be timed), else why
    not. A strategy whose run requires other trainings (distill: ``requires``), or whose ``fit``
    trains other strategies (ensemble), is not timed; one that overrides ``fit`` only to wrap its
    own training is."""
    required = list(strategy.requires(probe.seed).values())
    if required:
        return (
            f"not timed: trains several models ({required[0].strategy.name} first); its cost is "
            "their steps"
        )
    if type(strategy).fit is Strategy.fit:
        return None
    try:
        strategy.fit(probe)
    except _FirstTraining as first:
        if first.strategy is strategy:
            return None
        return (
            f"not timed: trains several models ({first.strategy.name} first); its cost is "
            "their steps"
        )
    return "not timed: its fit() trains no model through the loop"


@dataclass
class Entry:
    """Something to time: one training step on a batch, and what it trains."""

    name: str
    step: Callable[[torch.Tensor, torch.Tensor], None]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    result: EntryResult


Batch = tuple[torch.Tensor, torch.Tensor]


def synthetic_data(config: BenchConfig, device: torch.device) -> tuple[DataSplits, list[Batch]]:
    """Random inputs and labels: a few distinct batches, cycled (values do not change step time)."""
    generator = torch.Generator().manual_seed(config.seed)
    n = config.batch_size * 4
    x = torch.randn(n, *config.input_shape, generator=generator).to(device)
    y = torch.randint(0, config.num_classes, (n,), generator=generator).to(device)
    split = TensorSplit(x, y)
    data = DataSplits("synthetic", config.input_shape, config.num_classes, split, split, split)
    batches = [
        (x[i : i + config.batch_size], y[i : i + config.batch_size])
        for i in range(0, n, config.batch_size)
    ]
    return data, batches


def strategy_entry(
    name: str,
    strategy: Strategy,
    config: BenchConfig,
    train_config: TrainConfig,
    device: torch.device,
    data: DataSplits,
    build: Callable[[], nn.Module],
) -> Entry:
    """``strategy`` set up exactly as ``TrainingSession._run`` sets it up, stepped by its step."""
    seed_everything(config.seed)
    model = build().to(device)
    planned = config.warmup + 1 + config.repeats * config.steps  # the memory pass included
    generator = torch.Generator(device=device).manual_seed(config.seed)
    run = RunContext(config.seed, train_config, device, data, generator, steps_per_epoch=planned)
    state = TrainingState.start(strategy, model, run)
    state.model.train()
    note = ""
    for module in state.model.modules():
        holder = find_majority(module)
        if holder is not None:
            # --mk-sampler auto leaves the strategy's own choice (its `sampler` option) in place.
            if config.mk_sampler != "auto":
                holder.sampler = config.mk_sampler
            holder.backward = config.mk_backward
            try:
                sampler = holder.resolved_sampler()
            except ValueError as error:  # e.g. --mk-sampler triton on the CPU
                raise UserError(f"--mk-sampler {holder.sampler}: {error}.") from None
            note = f"p: {sampler} sampler"
    result = EntryResult(
        name, measured=True, note=note, train_params=count_parameters(state.model)
    )
    return Entry(name, state.step, state.model, state.optimizer, result)


def plain_entry(
    name: str,
    config: BenchConfig,
    train_config: TrainConfig,
    device: torch.device,
    build: Callable[[], nn.Module],
    same_optimizer: bool,
) -> Entry:
    """A minimal hand-written loop's step, for comparison with sopkit's loop."""
    seed_everything(config.seed)
    model = build().to(device)
    model.train()
    optimizer: torch.optim.Optimizer
    if same_optimizer:
        optimizer = make_optimizer(model, train_config)
    elif train_config.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=train_config.learning_rate)
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=train_config.learning_rate, momentum=train_config.momentum
        )
    bf16, device_type = config.bf16, device.type

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad()
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    result = EntryResult(name, measured=True, train_params=count_parameters(model))
    return Entry(name, step, model, optimizer, result)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters, gradients and optimizer state (each storage counted once)."""
    seen: dict[int, int] = {}

    def add(tensor: object) -> None:
        if isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    for parameter in model.parameters():
        add(parameter)
        add(parameter.grad)
    for state in optimizer.state.values():
        for value in state.values():
            add(value)
    return sum(seen.values())


def _saved_bytes(entry: Entry, batch: Batch) -> int:
    """Bytes autograd keeps from forward to backward during one step, parameters not counted."""
    parameters = {p.untyped_storage().data_ptr() for p in entry.model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        entry.step(*batch)
    return sum(seen.values())


def warm_up_and_measure_memory(
    entry: Entry, device: torch.device, batches: list[Batch], warmup: int
) -> None:
    """The warm-up steps of one entry, alone, with its memory measured around them."""
    cuda = device.type == "cuda"
    if cuda:
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        # Everything built so far (this entry's model and state, earlier entries) is the floor; the
        # peak above it is what this entry's steps add (activations, gradients, temporaries).
        start = torch.cuda.memory_allocated(device) - _state_bytes(entry.model, entry.optimizer)
    for i in range(warmup):
        entry.step(*batches[i % len(batches)])
    entry.result.saved_bytes = _saved_bytes(entry, batches[0])
    entry.result.state_bytes = _state_bytes(entry.model, entry.optimizer)
    if cuda:
        synchronize(device)
        entry.result.peak_bytes = torch.cuda.max_memory_allocated(device) - start
