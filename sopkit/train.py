"""The one training loop every strategy shares.

The loop owns seeding, device placement, the optimizer, ``backward``, ``step``, the learning-rate
schedule, timing, divergence detection and evaluation; strategies answer hooks (``sopkit.strategy``).
``TrainingSession`` holds what the trainings of one comparison share, and remembers finished
trainings so that a strategy built from others (an ensemble, a distilled student) reuses them.
"""

from __future__ import annotations

import contextlib
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from sopkit.errors import UserError
from sopkit.majority import count_parameters
from sopkit.results import PAPER_LR_BASE

if TYPE_CHECKING:
    from sopkit.data import DataSplits, Split
    from sopkit.progress import Progress
    from sopkit.strategy import Strategy

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "step", "cosine")
DEFAULT_LR = PAPER_LR_BASE  # the bases of the paper's learning-rate grids (Section 5.1)


@dataclass(frozen=True)
class TrainConfig:
    """How one model is trained. Validated on construction: a bad value is the user's mistake."""

    epochs: int = 10
    batch_size: int = 256
    optimizer: Literal["adam", "sgd"] | str = "adam"
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    schedule: Literal["constant", "step", "cosine"] | str = "constant"
    bf16: bool = False  # autocast on CUDA
    warmup_steps: int = 5  # steps excluded from step timing (allocator, caches, lazy init)
    eval_batch_size: int = 1024

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise UserError(f"--epochs must be a positive number, got {self.epochs}.")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be a positive number, got {self.batch_size}.")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(
                f"Unknown optimizer {self.optimizer!r}. Valid optimizers: {', '.join(OPTIMIZERS)}."
            )
        if self.schedule not in SCHEDULES:
            raise UserError(
                f"Unknown schedule {self.schedule!r}. Valid schedules: {', '.join(SCHEDULES)}."
            )
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr must be a positive number, got {self.lr}.")
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay must be at least 0, got {self.weight_decay}.")
        if self.warmup_steps < 0:
            raise UserError(f"warm-up steps must be at least 0, got {self.warmup_steps}.")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; any other name must be available here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(
            f"Unknown device {name!r}. Valid devices: auto, cpu, cuda, cuda:N, mps."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asks for CUDA, but no CUDA device is available here.")
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise UserError(f"--device {name} asks for MPS, but MPS is not available here.")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device) so a run is repeatable."""
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)


@dataclass
class EpochRecord:
    """One point of a learning curve."""

    epoch: int
    step: int
    train_loss: float
    val_accuracy: float
    test_accuracy: float
    seconds: float  # wall time since the run started


@dataclass
class TrainResult:
    """What one training produced; ``to_record()`` is what gets stored."""

    strategy: str
    seed: int
    config: TrainConfig
    test_accuracy: float
    val_accuracy: float
    train_params: int
    inference_params: int
    step_times: list[float]
    wall_time: float
    curve: list[EpochRecord] = field(default_factory=list)
    diverged_at_step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False, compare=False)  # the deployable

    @property
    def median_step_time(self) -> float:
        return statistics.median(self.step_times) if self.step_times else math.nan

    def step_time_stats(self) -> dict[str, float | int]:
        """Median, mean, 10th/90th percentile and count of the timed steps (warm-up excluded)."""
        times = sorted(self.step_times)
        if not times:
            return {"count": 0}

        def percentile(q: float) -> float:
            return times[min(len(times) - 1, int(q * len(times)))]

        return {"count": len(times), "median": self.median_step_time,
                "mean": statistics.fmean(times), "p10": percentile(0.1), "p90": percentile(0.9)}

    def to_record(self) -> dict[str, Any]:
        """What is stored of a training: everything but the model, with step times summarised
        (a grid has hundreds of trials of thousands of steps each)."""
        record = asdict(replace(self, model=None, step_times=[]))
        record.pop("model")
        record.pop("step_times")
        record["median_step_time"] = self.median_step_time
        record["step_time_stats"] = self.step_time_stats()
        return record


@dataclass
class RunContext:
    """What hooks may read about the run in progress."""

    seed: int
    config: TrainConfig
    device: torch.device
    data: DataSplits
    generator: torch.Generator  # for a strategy's own randomness, seeded from the run's seed
    steps_per_epoch: int
    epoch: int = 0
    step: int = 0
    optimizer: torch.optim.Optimizer | None = None

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam or SGD with momentum over the trainable parameters.

    torch's fused kernels are used where the parameters' device has them (CPU and CUDA), the
    multi-tensor (foreach) kernels elsewhere. Fused makes one pass over each tensor instead of one
    per arithmetic operation: on the 2-core CPU (one thread) an Adam step over mlp-a3 took 0.59 ms
    fused against 1.84 ms foreach, and over majority kernels' three times as many parameters
    2.06 ms against 6.76 ms (BENCHMARKS.md). The two differ only in rounding.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    lr, wd = config.learning_rate, config.weight_decay

    def build(fused: bool) -> torch.optim.Optimizer:
        # Exactly one of the two kernels is asked for (torch rejects fused and foreach together).
        use_fused, use_foreach = (True, None) if fused else (None, True)
        if config.optimizer == "adam":
            return torch.optim.Adam(
                parameters, lr=lr, weight_decay=wd, fused=use_fused, foreach=use_foreach
            )
        return torch.optim.SGD(
            parameters,
            lr=lr,
            momentum=config.momentum,
            weight_decay=wd,
            fused=use_fused,
            foreach=use_foreach,
        )

    try:
        return build(fused=True)
    except RuntimeError:  # a device (or torch version) without fused kernels
        return build(fused=False)


def make_schedule(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step multiplier: constant; step (x0.1 at 1/3 and 2/3 of training, as the paper's
    ResNet recipe drops at epochs 30 and 60 of 90); or cosine to zero."""
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if config.schedule == "step":
        milestones = (total_steps / 3, 2 * total_steps / 3)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.1 ** sum(step >= m for m in milestones)
        )
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )


class StepTimer:
    """Wall-clock time of every training step after a warm-up.

    On CUDA, events recorded at step boundaries measure the GPU timeline (gaps where the GPU waits
    for the CPU included) without synchronising every step; they are resolved once at the end.
    """

    def __init__(self, device: torch.device, warmup_steps: int) -> None:
        self.cuda = device.type == "cuda"
        self.warmup_steps = warmup_steps
        self.count = 0
        self._times: list[float] = []
        self._events: list[tuple[Any, Any]] = []
        self._start: Any = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        self.count += 1
        if self.count <= self.warmup_steps:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start, end))
        else:
            self._times.append(time.perf_counter() - self._start)

    def seconds(self) -> list[float]:
        if self.cuda and self._events:
            torch.cuda.synchronize()
            self._times.extend(s.elapsed_time(e) / 1000 for s, e in self._events)
            self._events.clear()
        return list(self._times)


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module, split: Split, *, batch_size: int = 1024, bf16: bool = False
) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``split``."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long)
    total = 0
    device: torch.device | None = None
    for inputs, targets in split.batches(batch_size, shuffle=False):
        if device is None:
            device = inputs.device
            correct = correct.to(device)
        with _autocast(inputs.device, bf16):
            logits = model(inputs)
        correct += (logits.argmax(dim=1) == targets).sum()
        total += targets.numel()
    model.train(was_training)
    return correct.item() / max(total, 1)


def _steps_per_epoch(split: Split, batch_size: int) -> int:
    return math.ceil(len(split) / batch_size)


@dataclass
class TrainingState:
    """One training in progress: the prepared model, its optimizer and schedule, and the per-step
    bookkeeping (timing, loss sum, divergence), with ``step()`` the body of the loop.

    ``TrainingSession._run`` and ``sopkit bench`` both build it with ``start`` and drive it with
    ``step``, so the benchmark measures exactly the step the loop takes, hooks and bookkeeping
    included.
    """

    strategy: Strategy
    model: nn.Module
    run: RunContext
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    timer: StepTimer
    loss_sum: torch.Tensor  # of the epoch in progress; the loop resets it every epoch
    # Divergence is tracked on the device (no per-step synchronisation) and read once per epoch.
    first_bad_step: torch.Tensor

    @classmethod
    def start(cls, strategy: Strategy, model: nn.Module, run: RunContext) -> TrainingState:
        """Prepare ``model`` (already on ``run.device``) for ``strategy`` and build its optimizer."""
        config, device = run.config, run.device
        model = strategy.prepare(model, run)
        optimizer = make_optimizer(model, config)
        run.optimizer = optimizer
        schedule = make_schedule(optimizer, config, run.total_steps)
        return cls(
            strategy=strategy,
            model=model,
            run=run,
            optimizer=optimizer,
            schedule=schedule,
            timer=StepTimer(device, config.warmup_steps),
            loss_sum=torch.zeros((), device=device),
            first_bad_step=torch.full((), -1, dtype=torch.long, device=device),
        )

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """One training step on one batch: the strategy's hooks, backward, optimizer and schedule."""
        strategy, model, run, optimizer = self.strategy, self.model, self.run, self.optimizer
        self.timer.start()
        strategy.before_step(model, run)
        with _autocast(run.device, run.config.bf16):
            loss = strategy.loss(model, inputs, targets, run)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        strategy.after_backward(model, run)
        optimizer.step()
        strategy.after_step(model, run)
        self.schedule.step()
        self.timer.stop()
        loss = loss.detach().float()
        self.loss_sum += loss
        bad = ~torch.isfinite(loss) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, run.step, self.first_bad_step)
        run.step += 1


class TrainingSession:
    """What the trainings of one comparison share: data on the device, the model recipe, the base
    configuration, progress output, and the results of finished trainings.

    ``train`` is the only way a strategy gets trained. A training already done in this session for the
    same strategy identity, seed and configuration is returned instead of repeated, so an ensemble and
    a distilled student built from the same members train those members once.
    """

    def __init__(
        self,
        data: DataSplits,
        build_model: Callable[[], nn.Module],
        config: TrainConfig,
        *,
        device: torch.device,
        seed: int = 0,
        progress: Progress | None = None,
        label: str = "",
    ) -> None:
        from sopkit.progress import NullProgress

        self.data = data
        self.build_model = build_model
        self.config = config
        self.device = device
        self.seed = seed
        self.progress: Progress = progress or NullProgress()
        self.label = label  # describes the session's cell in progress output, e.g. "mlp-a2 adam"
        self._finished: dict[tuple[object, ...], TrainResult] = {}

    def train(
        self,
        strategy: Strategy,
        *,
        seed: int | None = None,
        config: TrainConfig | None = None,
        label: str | None = None,
    ) -> TrainResult:
        """Train ``strategy`` once with the shared loop (or return the same training done earlier)."""
        seed = self.seed if seed is None else seed
        config = strategy.schedule(config or self.config)
        key = (strategy.identity(), seed, config)
        if key not in self._finished:
            self._finished[key] = self._run(
                strategy,
                seed,
                config,
                label or " ".join(filter(None, [strategy.name, self.label, f"seed {seed}"])),
            )
        return self._finished[key]

    def evaluate(self, model: nn.Module, split: Literal["train", "val", "test"] = "test") -> float:
        """Accuracy of any model (e.g. an ensemble) on one split of the session's data."""
        return evaluate(
            model,
            getattr(self.data, split),
            batch_size=self.config.eval_batch_size,
            bf16=self.config.bf16,
        )

    def _run(self, strategy: Strategy, seed: int, config: TrainConfig, label: str) -> TrainResult:
        device, data = self.device, self.data
        if config.bf16 and device.type != "cuda":
            raise UserError("--bf16 autocast is only supported on CUDA devices.")
        seed_everything(seed)
        model = self.build_model().to(device)
        steps_per_epoch = _steps_per_epoch(data.train, config.batch_size)
        generator = torch.Generator(device=device).manual_seed(seed)
        shuffle_generator = _shuffle_generator(data.train, seed)
        run = RunContext(seed, config, device, data, generator, steps_per_epoch)
        training = TrainingState.start(strategy, model, run)
        model = training.model
        train_params = count_parameters(model)
        curve: list[EpochRecord] = []
        diverged_at: int | None = None
        started = time.perf_counter()
        self.progress.run_started(label, run.total_steps)

        for epoch in range(config.epochs):
            run.epoch = epoch
            model.train()
            training.loss_sum = torch.zeros((), device=device)
            for inputs, targets in data.train.batches(
                config.batch_size, shuffle=True, generator=shuffle_generator
            ):
                training.step(inputs, targets)
                self.progress.advance(label)
            bad_step = int(training.first_bad_step.item())
            evaluated = strategy.evaluation_model(model, run)
            record = EpochRecord(
                epoch=epoch + 1,
                step=run.step,
                train_loss=training.loss_sum.item() / steps_per_epoch,
                val_accuracy=evaluate(
                    evaluated, data.val, batch_size=config.eval_batch_size, bf16=config.bf16
                ),
                test_accuracy=evaluate(
                    evaluated, data.test, batch_size=config.eval_batch_size, bf16=config.bf16
                ),
                seconds=time.perf_counter() - started,
            )
            curve.append(record)
            self.progress.epoch_finished(label, record, config.epochs)
            if bad_step >= 0:
                diverged_at = bad_step
                self.progress.message(f"{label}: loss is not finite at step {bad_step}; stopped.")
                break

        deployable = strategy.deployable(model, run)
        result = TrainResult(
            strategy=strategy.name,
            seed=seed,
            config=config,
            test_accuracy=self.evaluate(deployable, "test"),
            val_accuracy=self.evaluate(deployable, "val"),
            train_params=train_params,
            inference_params=count_parameters(deployable),
            step_times=training.timer.seconds(),
            wall_time=time.perf_counter() - started,
            curve=curve,
            diverged_at_step=diverged_at,
            model=deployable,
        )
        self.progress.run_finished(label, result)
        return result


def _shuffle_generator(split: Split, seed: int) -> torch.Generator:
    """A generator on the device the split's batches are shuffled on (randperm needs them to match)."""
    device = getattr(split, "device", torch.device("cpu"))
    return torch.Generator(device=device).manual_seed(seed)
