"""``sopkit bench``: what one training step of each strategy costs against the baseline's.

Everything runs in one process, on one model, one batch size and one device, with synthetic data
(random inputs of the requested shape and random labels: step time does not depend on the values).
Each strategy is set up by the loop's own machinery (``TrainingState.start``: ``prepare``,
``make_optimizer``, ``make_schedule``) and stepped by the loop's own step (``TrainingState.step``:
the hooks in the loop's order, backward, optimizer, schedule, timing and divergence bookkeeping),
so a ratio here is the ratio a real training pays per step.

How it is measured, and why:

* **Warm-up** steps first (allocator, lazy initialisation, caches), excluded.
* **Interleaved rounds**: every round times ``steps`` consecutive steps of every strategy in turn,
  in an order rotated from round to round. Other processes loading the machine then slow all
  strategies of a round alike, instead of whichever strategy happened to run during the load.
* **Paired ratios**: a strategy's ratio in a round is its median step time over the baseline's in
  the same round; the reported ratio is the median over rounds, with the interquartile range.
* **CUDA**: each round's steps are bracketed by ``torch.cuda.synchronize()``, so queued kernels are
  counted in the round that launched them.
* **Memory**, measured strategy by strategy before timing: on CUDA the peak of
  ``torch.cuda.max_memory_allocated`` over the warm-up steps above what was allocated before the
  strategy was built. On every device: the bytes of parameters + gradients + optimizer state
  ("state"), and the bytes of tensors autograd keeps between forward and backward, parameters not
  counted ("saved"), recorded by a ``saved_tensors_hooks`` during one step. On the CPU torch has
  no allocator statistics, so there is no peak column there (tracemalloc does not see torch).

It also times sopkit's loop against a minimal hand-written loop
(``zero_grad; loss = cross_entropy(model(x), y); backward; step``) on the same model and batches,
once with sopkit's optimizer (the same kernels: what is left is the loop itself) and once with
``torch.optim`` defaults (what a user writing the loop by hand would get).

Strategies that train several models (an ensemble, a distilled student) have no single step of
their own: their cost is the steps of the strategies they train, which are rows of the table. They
are detected by running their ``fit`` against a probe session that stops at the first training.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from sopkit.data import DataSplits, TensorSplit
from sopkit.errors import UserError
from sopkit.majority import BACKWARD_MODES, SAMPLERS, count_parameters, find_majority
from sopkit.strategy import Strategy
from sopkit.train import (
    RunContext,
    TrainConfig,
    TrainingSession,
    TrainingState,
    make_optimizer,
    seed_everything,
    select_device,
)

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "BenchConfig",
    "BenchReport",
    "EntryResult",
    "parse_input_shape",
    "print_report",
    "run_bench",
    "write_report",
]

BASELINE = "baseline"
PLAIN = "plain loop"
PLAIN_DEFAULTS = "plain loop, torch.optim defaults"


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"3072"`` -> ``(3072,)``; ``"3,32,32"`` (or ``3x32x32``) -> ``(3, 32, 32)``.

    Every part must be a positive integer: an empty one (``"3,,32"``, ``"3,x"``) is a typo, not a
    dimension to drop.
    """
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise UserError(
            f"--input-shape must be positive integers separated by commas (e.g. 3072 or 3,32,32), "
            f"got {text!r}."
        )
    return shape


@dataclass(frozen=True)
class BenchConfig:
    """What ``sopkit bench`` measures. Validated on construction: a bad value is the user's mistake."""

    model: str = "mlp-a3"
    input_shape: tuple[int, ...] = (3072,)
    num_classes: int = 10
    batch_size: int = 256
    expansion: int = 3
    strategies: tuple[str, ...] = ()  # empty: every registered strategy
    device: str = "auto"
    threads: int | None = None  # None: torch's default
    bf16: bool = False
    repeats: int = 10  # interleaved rounds
    steps: int = 10  # timed steps per strategy per round
    warmup: int = 5  # untimed steps per strategy before the rounds
    optimizer: str = "adam"
    seed: int = 0
    options: Mapping[str, str] = field(default_factory=dict)  # strategy options (--set)
    # For every strategy whose model has majority kernels: how p is drawn and what backward keeps
    # (``MajorityKernels.sampler`` / ``.backward``), to compare the paths on one device.
    mk_sampler: str = "auto"
    mk_backward: str = "auto"

    def __post_init__(self) -> None:
        for name in ("batch_size", "repeats", "steps", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} must be a positive integer, got {value!r}.")
        if self.warmup < 0:
            raise UserError(f"--warmup must be at least 0, got {self.warmup}.")
        if self.expansion < 2:
            raise UserError(f"--expansion must be at least 2, got {self.expansion}.")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be a positive integer, got {self.threads}.")
        if not self.input_shape or any(d < 1 for d in self.input_shape):
            raise UserError(f"--input-shape must be positive, got {self.input_shape}.")
        if self.mk_sampler not in SAMPLERS:
            raise UserError(
                f"Unknown --mk-sampler {self.mk_sampler!r}. Valid samplers: {', '.join(SAMPLERS)}."
            )
        if self.mk_backward not in BACKWARD_MODES:
            raise UserError(
                f"Unknown --mk-backward {self.mk_backward!r}. "
                f"Valid modes: {', '.join(BACKWARD_MODES)}."
            )


@dataclass
class EntryResult:
    """One row of the report: a strategy (or a plain loop) and what its step costs."""

    name: str
    measured: bool
    note: str = ""
    step_ms: list[float] = field(default_factory=list)  # per round: median step time (ms)
    cpu_ms: list[float] = field(default_factory=list)  # per round: process CPU time per step (ms)
    ratios: list[float] = field(default_factory=list)  # per round: step time / baseline's
    train_params: int | None = None
    state_bytes: int | None = None  # parameters + gradients + optimizer state
    saved_bytes: int | None = None  # kept by autograd for backward, parameters not counted
    peak_bytes: int | None = None  # CUDA only: peak allocated during warm-up above the start

    @property
    def median_ms(self) -> float:
        return statistics.median(self.step_ms) if self.step_ms else math.nan

    @property
    def median_cpu_ms(self) -> float:
        return statistics.median(self.cpu_ms) if self.cpu_ms else math.nan

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios) if self.ratios else math.nan

    @property
    def ratio_iqr(self) -> tuple[float, float]:
        if len(self.ratios) < 2:
            return (self.ratio, self.ratio)
        q = statistics.quantiles(self.ratios, n=4, method="inclusive")
        return (q[0], q[2])

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["median_step_ms"] = self.median_ms
        record["median_cpu_ms"] = self.median_cpu_ms
        record["ratio"] = self.ratio
        record["ratio_iqr"] = list(self.ratio_iqr)
        return record


@dataclass
class BenchReport:
    """Everything ``sopkit bench`` measured, and how."""

    config: BenchConfig
    device: str
    threads: int
    strategies: list[EntryResult]
    loop: list[EntryResult]  # sopkit's baseline step and the hand-written loops
    provenance: dict[str, Any]
    rounds: int = 0  # timing rounds that finished (fewer than config.repeats when interrupted)
    notes: list[str] = field(default_factory=list)

    def entry(self, name: str) -> EntryResult:
        for entry in self.strategies + self.loop:
            if entry.name == name:
                return entry
        raise KeyError(name)

    @property
    def loop_ratio(self) -> float:
        """sopkit's baseline step over the hand-written loop's (same optimizer)."""
        return 1.0 / self.entry(PLAIN).ratio

    def to_record(self) -> dict[str, Any]:
        config = asdict(self.config)
        config["options"] = dict(self.config.options)
        return {
            "config": config,
            "device": self.device,
            "threads": self.threads,
            "data": "synthetic: standard-normal inputs, uniform random labels",
            "method": (
                f"{self.config.warmup} warm-up steps, then {self.config.repeats} interleaved rounds "
                f"of {self.config.steps} steps per strategy; ratio = median over rounds of "
                "(median step time / baseline's in the same round)"
            ),
            "strategies": {e.name: e.to_record() for e in self.strategies},
            "loop": {e.name: e.to_record() for e in self.loop},
            "loop_ratio": self.loop_ratio,
            "rounds_timed": self.rounds,
            "provenance": self.provenance,
            "notes": self.notes,
        }


# ------------------------------------------------------------------------------------------------
# Setting up what is timed
# ------------------------------------------------------------------------------------------------


class _FirstTraining(Exception):
    """Raised by the probe session at a strategy's first training."""

    def __init__(self, strategy: Strategy) -> None:
        super().__init__(strategy.name)
        self.strategy = strategy


class _ProbeSession(TrainingSession):
    """A session whose ``train`` trains nothing: it stops ``fit`` at the first training."""

    def train(self, strategy: Strategy, **kwargs: Any) -> Any:  # type: ignore[override]
        raise _FirstTraining(strategy)


def _single_step_note(strategy: Strategy, probe: _ProbeSession) -> str | None:
    """None when ``strategy``'s training is one run of its own step (so it can be timed), else why
    not. A strategy that overrides ``fit`` only to wrap its own training (adv-mk records extras) is
    timed; one whose ``fit`` trains other strategies (ensemble, distill) is not."""
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
class _Entry:
    """Something to time: one training step on a batch, and what it trains."""

    name: str
    step: Callable[[torch.Tensor, torch.Tensor], None]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    result: EntryResult


Batch = tuple[torch.Tensor, torch.Tensor]


def _synthetic_data(config: BenchConfig, device: torch.device) -> tuple[DataSplits, list[Batch]]:
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


def _strategy_entry(
    name: str,
    strategy: Strategy,
    config: BenchConfig,
    train_config: TrainConfig,
    device: torch.device,
    data: DataSplits,
    build: Callable[[], nn.Module],
) -> _Entry:
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
    return _Entry(name, state.step, state.model, state.optimizer, result)


def _plain_entry(
    name: str,
    config: BenchConfig,
    train_config: TrainConfig,
    device: torch.device,
    build: Callable[[], nn.Module],
    same_optimizer: bool,
) -> _Entry:
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
    return _Entry(name, step, model, optimizer, result)


def _synchronize(device: torch.device) -> None:
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


def _saved_bytes(entry: _Entry, batch: Batch) -> int:
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


def _warm_up_and_measure_memory(
    entry: _Entry, device: torch.device, batches: list[Batch], warmup: int
) -> None:
    """The warm-up steps of one entry, alone, with its memory measured around them."""
    cuda = device.type == "cuda"
    if cuda:
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        # Everything built so far (this entry's model and state, earlier entries) is the floor; the
        # peak above it is what this entry's steps add (activations, gradients, temporaries).
        start = torch.cuda.memory_allocated(device) - _state_bytes(entry.model, entry.optimizer)
    for i in range(warmup):
        entry.step(*batches[i % len(batches)])
    entry.result.saved_bytes = _saved_bytes(entry, batches[0])
    entry.result.state_bytes = _state_bytes(entry.model, entry.optimizer)
    if cuda:
        _synchronize(device)
        entry.result.peak_bytes = torch.cuda.max_memory_allocated(device) - start


def _time_rounds(
    entries: list[_Entry],
    device: torch.device,
    batches: list[Batch],
    repeats: int,
    steps: int,
    on_round: Callable[[int, int], None] | None = None,
) -> int:
    """Interleaved rounds; each entry's round value is its median step time in that round (CPU) or
    its mean over the synchronised round (CUDA, where per-step host times mean nothing).

    The process CPU time per step is recorded too: on a CPU shared with other processes it is
    the steadier number (time spent waiting for a core is not in it), though threads that
    spin-wait for work count in it. ``on_round(done, repeats)`` is called as timing starts
    (``done = 0``) and after every round.

    Returns how many rounds were timed: an interrupt (Ctrl-C) after the first round keeps the
    rounds that finished, for every entry alike, and drops the one in progress; before it, the
    interrupt propagates (nothing was measured).
    """
    cuda = device.type == "cuda"
    done = 0
    if on_round is not None:
        on_round(done, repeats)
    try:
        for round_index in range(repeats):
            shift = round_index % len(entries)
            for entry in entries[shift:] + entries[:shift]:  # every entry gets every position
                times: list[float] = []
                _synchronize(device)
                round_start, cpu_start = time.perf_counter(), time.process_time()
                for i in range(steps):
                    started = time.perf_counter()
                    entry.step(*batches[i % len(batches)])
                    times.append(time.perf_counter() - started)
                if cuda:
                    _synchronize(device)
                    value = (time.perf_counter() - round_start) / steps
                else:
                    value = statistics.median(times)
                entry.result.step_ms.append(value * 1e3)
                entry.result.cpu_ms.append((time.process_time() - cpu_start) / steps * 1e3)
            done += 1
            if on_round is not None:
                on_round(done, repeats)
    except KeyboardInterrupt:
        if done == 0:
            raise
        for entry in entries:  # the unfinished round was timed for some entries only
            del entry.result.step_ms[done:]
            del entry.result.cpu_ms[done:]
    return done


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    from sopkit.provenance import cpu_model

    threads = torch.get_num_threads()
    count = f"{threads} thread{'s' if threads != 1 else ''}"
    return f"{device} ({cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, {count})"


# ------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------


def run_bench(
    config: BenchConfig,
    log: Callable[[str], None] | None = None,
    on_round: Callable[[int, int], None] | None = None,
) -> BenchReport:
    """Set up every strategy, warm up, time interleaved rounds, and return the report.

    ``log`` receives what is being set up; ``on_round(done, total)`` is called as timing starts
    and after each timing round. Ctrl-C during the rounds ends them early: the report covers the rounds that finished
    (and says so); before the first round finishes, it propagates.
    """
    from sopkit.models import build_model
    from sopkit.provenance import provenance
    from sopkit.registry import check_options, create_strategy, discover
    from sopkit.strategy import StrategySettings

    say = log or (lambda message: None)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = select_device(config.device)
    if config.bf16 and device.type != "cuda":
        raise UserError("--bf16 autocast is only supported on CUDA devices.")
    train_config = TrainConfig(
        epochs=1,
        batch_size=config.batch_size,
        optimizer=config.optimizer,
        bf16=config.bf16,
        warmup_steps=0,
    )

    def build() -> nn.Module:
        return build_model(
            config.model, input_shape=config.input_shape, num_classes=config.num_classes
        )

    build()  # an unknown model, or an input shape it cannot take, fails here before anything runs

    # The requested strategies (an unknown name is the user's mistake), else every registered one
    # that loads (a broken plugin becomes a row with its error). The baseline is always measured.
    settings = StrategySettings(expansion=config.expansion, options=dict(config.options))
    requested = list(dict.fromkeys(config.strategies))
    names = list(dict.fromkeys([BASELINE, *(requested or discover())]))
    strategies: dict[str, Strategy] = {}
    results: dict[str, EntryResult] = {}
    for name in names:
        try:
            strategies[name] = create_strategy(name, settings)
        except UserError as error:
            if name in requested or name == BASELINE:
                raise
            results[name] = EntryResult(name, measured=False, note=f"not timed: {error}")
    check_options(settings, [name for name in requested if name in strategies])

    data, batches = _synthetic_data(config, device)
    probe = _ProbeSession(data, build, train_config, device=device, seed=config.seed)
    entries: list[_Entry] = []
    for name, strategy in strategies.items():
        note = _single_step_note(strategy, probe)
        if note is not None:
            results[name] = EntryResult(name, measured=False, note=note)
            continue
        say(f"setting up and warming up {name}")
        entry = _strategy_entry(name, strategy, config, train_config, device, data, build)
        _warm_up_and_measure_memory(entry, device, batches, config.warmup)
        entries.append(entry)
        results[name] = entry.result
    plain = [
        _plain_entry(PLAIN, config, train_config, device, build, same_optimizer=True),
        _plain_entry(PLAIN_DEFAULTS, config, train_config, device, build, same_optimizer=False),
    ]
    for entry in plain:
        _warm_up_and_measure_memory(entry, device, batches, config.warmup)

    timed = entries + plain
    say(f"timing {len(timed)} loops: {config.repeats} interleaved rounds of {config.steps} steps")
    load_before = _load_average()
    rounds = _time_rounds(timed, device, batches, config.repeats, config.steps, on_round)
    load_after = _load_average()
    baseline = results[BASELINE]
    for entry in timed:
        result = entry.result
        result.ratios = [a / b for a, b in zip(result.step_ms, baseline.step_ms, strict=True)]
    if "baseline-long" in results and results["baseline-long"].measured:
        results["baseline-long"].note = "the baseline's step (it trains longer): a noise check"

    loop_baseline = EntryResult(
        "sopkit loop (baseline step)",
        measured=True,
        step_ms=list(baseline.step_ms),
        ratios=list(baseline.ratios),
        train_params=baseline.train_params,
        state_bytes=baseline.state_bytes,
        saved_bytes=baseline.saved_bytes,
        peak_bytes=baseline.peak_bytes,
    )
    report = BenchReport(
        config=config,
        device=_describe(device),
        threads=torch.get_num_threads(),
        strategies=[results[name] for name in names],
        loop=[loop_baseline] + [e.result for e in plain],
        provenance=provenance(),
        rounds=rounds,
    )
    report.notes = _notes(report, device)
    if rounds < config.repeats:
        report.notes.insert(
            0,
            f"Interrupted: {rounds} of the {config.repeats} rounds were timed; every ratio is over "
            "those rounds.",
        )
    if load_before is not None and load_after is not None:
        report.notes.append(
            f"Load average (1 min) before/after timing: {load_before:.2f} / {load_after:.2f} on "
            f"{os.cpu_count()} CPUs; a load above the thread count means other processes competed."
        )
    return report


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def _notes(report: BenchReport, device: torch.device) -> list[str]:
    notes = [
        "Synthetic data: standard-normal inputs and uniform random labels.",
        "step ms: median wall time per step; CPU ms: process CPU time per step (all threads; "
        "steadier than wall time on a shared machine, but spin-waiting threads count in it).",
    ]
    if device.type != "cuda":
        notes.append(
            "No peak-memory column: torch keeps no allocator statistics on the CPU. 'state' is "
            "parameters + gradients + optimizer state; 'saved' is what autograd keeps for backward "
            "(parameters not counted)."
        )
    else:
        # The CUDA memory target: baseline peak + (e - 1) x (params + grads + optimizer state).
        base = report.entry(BASELINE)
        if base.peak_bytes is not None and base.state_bytes is not None:
            allowance = base.peak_bytes + (report.config.expansion - 1) * base.state_bytes
            notes.append(
                f"Memory allowance for e = {report.config.expansion}: baseline peak + (e - 1) x "
                f"baseline state = {allowance / 2**20:.1f} MiB (+5% tolerance)."
            )
    loop = 1.0 / report.entry(PLAIN).ratio if report.entry(PLAIN).ratios else math.nan
    notes.append(f"sopkit's loop / the hand-written loop with the same optimizer: {loop:.3f}x.")
    return notes


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------


def _mib(value: int | None) -> str:
    return "" if value is None else f"{value / 2**20:.1f}"


def _ratio_text(entry: EntryResult) -> str:
    if not entry.ratios:
        return ""
    low, high = entry.ratio_iqr
    return f"{entry.ratio:.2f}x [{low:.2f}-{high:.2f}]"


@dataclass
class _Table:
    """One table of the report, for the terminal (rich) and for bench.md alike."""

    title: str
    columns: list[tuple[str, bool]]  # (header, right-aligned)
    rows: list[list[str]]


def _tables(report: BenchReport) -> list[_Table]:
    """The step-time ratio table and the loop-overhead table."""
    config = report.config
    cuda = report.entry(BASELINE).peak_bytes is not None
    title = (
        f"Step time vs baseline: {config.model} on {config.input_shape}, batch {config.batch_size},"
        f" e={config.expansion}, {report.device}{', bf16' if config.bf16 else ''}"
    )
    columns = [("strategy", False), ("step ms", True), ("x baseline [IQR]", True), ("CPU ms", True)]
    if cuda:
        columns.append(("peak MiB", True))
    columns += [("state MiB", True), ("saved MiB", True), ("note", False)]
    rows = []
    for entry in report.strategies:
        row = [
            entry.name,
            f"{entry.median_ms:.2f}" if entry.measured else "",
            _ratio_text(entry),
            f"{entry.median_cpu_ms:.2f}" if entry.measured else "",
        ]
        if cuda:
            row.append(_mib(entry.peak_bytes))
        row += [_mib(entry.state_bytes), _mib(entry.saved_bytes), entry.note]
        rows.append(row)
    steps = _Table(title, columns, rows)

    loop_rows = []
    sopkit_loop = report.loop[0]
    for entry in report.loop:
        ratios = [a / b for a, b in zip(entry.step_ms, sopkit_loop.step_ms, strict=True)]
        shown = EntryResult(entry.name, True, step_ms=entry.step_ms, ratios=ratios)
        loop_rows.append([entry.name, f"{entry.median_ms:.2f}", _ratio_text(shown)])
    loop = _Table(
        "The loop itself: sopkit's baseline step vs a hand-written loop",
        [("loop", False), ("step ms", True), ("x sopkit [IQR]", True)],
        loop_rows,
    )
    return [steps, loop]


def print_report(console: Console, report: BenchReport) -> None:
    """The step-time ratio table, the loop-overhead table and the notes."""
    from rich.table import Table

    for table in _tables(report):
        shown = Table(title=table.title)
        for header, right in table.columns:
            shown.add_column(header, justify="right" if right else "left")
        for row in table.rows:
            shown.add_row(*row)
        console.print(shown)
    for note in report.notes:
        console.print(f"- {note}", highlight=False)


def _flag_values(config: BenchConfig) -> list[tuple[str, str | None]]:
    """``sopkit bench``'s valued flags with ``config``'s values as typed (None: not given)."""
    return [
        ("--model", config.model),
        ("--input-shape", ",".join(map(str, config.input_shape))),
        ("--num-classes", str(config.num_classes)),
        ("--batch-size", str(config.batch_size)),
        ("--expansion", str(config.expansion)),
        ("--strategies", ",".join(config.strategies) or None),
        ("--device", config.device),
        ("--threads", None if config.threads is None else str(config.threads)),
        ("--repeats", str(config.repeats)),
        ("--steps", str(config.steps)),
        ("--warmup", str(config.warmup)),
        ("--optimizer", config.optimizer),
        ("--mk-sampler", config.mk_sampler),
        ("--mk-backward", config.mk_backward),
    ]


def command_line(config: BenchConfig) -> str:
    """The ``sopkit bench`` command that measures ``config`` again (flags at their default left
    out)."""
    words = ["sopkit", "bench"]
    defaults = dict(_flag_values(BenchConfig()))
    for flag, value in _flag_values(config):
        if value is not None and value != defaults[flag]:
            words += [flag, shlex.quote(value)]
    if config.bf16:
        words.append("--bf16")
    for key, value in config.options.items():
        words += ["--set", shlex.quote(f"{key}={value}")]
    return " ".join(words)


def render_markdown(report: BenchReport) -> str:
    """bench.md: the figure, the tables and notes as Markdown, with the command and the machine
    behind them."""
    lines = ["# sopkit bench", "", "![Step time against the baseline's](bench.png)", ""]
    for table in _tables(report):
        lines += [f"**{table.title}**", ""]
        lines.append("| " + " | ".join(header for header, _ in table.columns) + " |")
        lines.append(
            "| " + " | ".join("---:" if right else "---" for _, right in table.columns) + " |"
        )
        for row in table.rows:
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
        lines.append("")
    lines += [f"- {note}" for note in report.notes]
    provenance = report.provenance
    versions = provenance.get("versions") or {}
    lines += [
        "",
        "## How this was measured",
        "",
        f"- Command: `{command_line(report.config)}`",
        f"- Git revision: {provenance.get('git_revision') or 'unknown (not a git checkout)'}",
        f"- Machine: {provenance.get('cpu')} ({provenance.get('cpu_capability')}), "
        f"{provenance.get('platform')}; CUDA device: {provenance.get('cuda_device') or 'none'}",
        f"- torch threads: {report.threads}; Python {provenance.get('python')}; "
        + ", ".join(f"{name} {version}" for name, version in versions.items() if version),
        f"- Measured: {provenance.get('created')}",
        "",
    ]
    return "\n".join(lines)


def draw_ratios(report: BenchReport) -> bytes:
    """bench.png: every timed strategy's step-time ratio to the baseline, as a PNG.

    A bar per strategy at its median ratio over rounds, whiskers over the interquartile range, a
    line at 1 (the baseline) and the ratio written at the bar's end.
    """
    import io

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from sopkit.report import FIGURE_STYLE

    timed = [entry for entry in report.strategies if entry.measured and entry.ratios]
    names = [entry.name for entry in timed][::-1]  # the table's order, top to bottom
    ratios = [entry.ratio for entry in timed][::-1]
    spans = [entry.ratio_iqr for entry in timed][::-1]
    whiskers = [[r - low for r, (low, _) in zip(ratios, spans, strict=True)],
                [high - r for r, (_, high) in zip(ratios, spans, strict=True)]]
    config = report.config
    with matplotlib.rc_context(FIGURE_STYLE):
        figure = Figure(figsize=(7.6, 1.2 + 0.45 * len(names)), dpi=100)
        FigureCanvasAgg(figure)
        ax = figure.subplots()
        # The baseline's own rows (the reference and its noise check) in grey.
        colors = ["#8c959f" if name.startswith(BASELINE) else "#4c72b0" for name in names]
        ax.barh(names, ratios, xerr=whiskers, color=colors, alpha=0.85, capsize=3)
        ax.axvline(1.0, color="#656d76", linestyle="--", linewidth=1)
        for y, ratio, (_, high) in zip(range(len(names)), ratios, spans, strict=True):
            ax.text(max(ratio, high) + 0.03, y, f"{ratio:.2f}x", va="center", fontsize=9)
        ax.set_xlim(0, max(high for _, high in spans) * 1.15 + 0.1)
        ax.set_xlabel("step time / baseline's (median over rounds; whiskers: IQR)")
        ax.grid(axis="y", visible=False)
        ax.set_title(
            f"{config.model}, batch {config.batch_size}, e = {config.expansion}, {report.device}",
            fontsize=10,
        )
        figure.tight_layout()
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=150)
    return png.getvalue()


def write_report(report: BenchReport, out_dir: str | Path) -> list[Path]:
    """Write ``bench.json`` (configuration, provenance, every ratio), ``bench.md`` (the tables,
    the command and the machine) and ``bench.png`` (the ratios as bars) into ``out_dir``; returns
    their paths."""
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    record, markdown, figure = path / "bench.json", path / "bench.md", path / "bench.png"
    record.write_text(json.dumps(report.to_record(), indent=2, default=str) + "\n")
    markdown.write_text(render_markdown(report))
    figure.write_bytes(draw_ratios(report))
    return [record, markdown, figure]
