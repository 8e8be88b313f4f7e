"""The one training loop every strategy shares.

The loop owns seeding, device placement, the optimizer, ``zero_grad``, ``backward``, ``step``, the
learning-rate schedule, timing, divergence detection and evaluation; strategies answer hooks
(:mod:`sopkit.training.strategy`, which documents the call order). ``TrainingState.step`` is the body
of the loop, one step; ``TrainingSession`` holds what the trainings of one comparison share, runs
them, and remembers finished trainings so that a strategy built from others (an ensemble, a
distilled student) reuses them.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from sopkit.data.augment import BatchAugment
from sopkit.data.metrics import collect_outputs, metric_details, score
from sopkit.data.splits import DataSplits, Split
from sopkit.errors import UserError
from sopkit.mk import count_parameters
from sopkit.training import distributed
from sopkit.training.checkpoint import Checkpoints, open_checkpoint
from sopkit.training.compiling import compile_prepared, fresh_compilation
from sopkit.training.device import autocast, seed_everything
from sopkit.training.hooks_guard import call_hook, step_failed, strategy_label
from sopkit.training.optim import make_optimizer, make_schedule
from sopkit.training.progress import NullProgress, Progress
from sopkit.training.strategy import Strategy
from sopkit.training.timing import StepTimer
from sopkit.training.types import EpochRecord, RunContext, TrainConfig, TrainResult

__all__ = ["TrainingSession", "TrainingState", "evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    *,
    batch_size: int = 1024,
    bf16: bool = False,
    metric: str = "accuracy",
) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``split``, or the data set's ``metric``
    (:mod:`sopkit.data.metrics`, e.g. Matthews correlation for CoLA)."""
    if metric != "accuracy":
        outputs, targets = collect_outputs(
            model, split, batch_size=batch_size, autocast=lambda device: autocast(device, bf16)
        )
        return score(metric, outputs, targets)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long)
    total = 0
    device: torch.device | None = None
    # Several data-parallel processes: each evaluates its part, and the counts are summed.
    for inputs, targets in distributed.evaluation_batches(split, batch_size):
        if device is None:
            device = inputs.device
            correct = correct.to(device)
        with autocast(inputs.device, bf16):
            logits = model(inputs)
        correct += (logits.argmax(dim=1) == targets).sum()
        total += targets.numel()
    model.train(was_training)
    hits, total = distributed.summed_counts(correct, total)
    return hits / max(total, 1)


def _steps_per_epoch(split: Split, batch_size: int) -> int:
    return math.ceil(len(split) / batch_size)


@dataclass
class TrainingState:
    """One training in progress: the prepared model, its optimizer and schedule, and the per-step
    bookkeeping (timing, loss sum, divergence), with ``step()`` the body of the loop.

    ``TrainingSession`` and ``sopkit bench`` both build it with ``start`` and drive it with ``step``,
    so the benchmark measures exactly the step the loop takes, hooks and bookkeeping included.
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
        """Prepare ``model`` (already on ``run.device``) for ``strategy`` and build its optimizer;
        the prepared model is wrapped in DDP when several processes train it (``distributed``)."""
        config, device = run.config, run.device
        model = call_hook(strategy, "prepare", model, run)  # a plugin's failure names it
        optimizer = make_optimizer(model, config)
        model = distributed.wrap(model, device, strategy)
        model = compile_prepared(model, config, device)  # --compile: in place, after DDP
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

    def step(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        share: distributed.BatchShare = distributed.WHOLE_BATCH,
    ) -> None:
        """One training step on one batch: the strategy's hooks, backward, optimizer and schedule,
        in the order the ``Strategy`` docstring documents. ``share``: this process's part of the
        whole batch when several train it (``distributed``)."""
        strategy, model, run, optimizer = self.strategy, self.model, self.run, self.optimizer
        # One try around the whole step (free while nothing raises): a plugin's failing hook, or
        # the wrong loss, is named afterwards from the traceback (hooks_guard.step_failed).
        try:
            self.timer.start()
            share.enter(model)
            strategy.before_step(model, run)
            with autocast(run.device, run.config.bf16):
                loss = strategy.loss(model, inputs, targets, run)
            optimizer.zero_grad(set_to_none=True)
            share.scaled(loss).backward()
            strategy.after_backward(model, run)
            optimizer.step()
            strategy.after_step(model, run)
            self.schedule.step()
            self.timer.stop()
            loss = loss.detach().float()
            self.loss_sum += share.part(loss)
            bad = ~torch.isfinite(loss) & (self.first_bad_step < 0)
            self.first_bad_step = torch.where(bad, run.step, self.first_bad_step)
            run.step += 1
        except Exception as error:
            step_failed(strategy, error)  # raises a PluginError naming the plugin and the hook
            raise


@contextlib.contextmanager
def _in_eval_mode(results: Mapping[str, TrainResult]) -> Iterator[None]:
    """The models of ``results`` in eval mode, and back in the modes they had afterwards: a run's
    required trainings are its inputs (a teacher), and their models are also other results."""
    modes = {
        module: module.training
        for result in results.values()
        if result.model is not None
        for module in result.model.modules()
    }
    for module in modes:
        module.training = False
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


class TrainingSession:
    """What the trainings of one comparison share: data on the device, the model recipe, the base
    configuration, progress output, and the results of finished trainings.

    ``train`` is the only way a strategy gets trained. A training already done in this session for the
    same strategy identity, seed and configuration is returned instead of repeated, so an ensemble and
    a distilled student built from the same members train those members once. With ``checkpoints``,
    every training checkpoints itself there and resumes from its checkpoint after a kill
    (:mod:`sopkit.training.checkpoint`).
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
        checkpoints: Checkpoints | None = None,
    ) -> None:
        self.data = data
        self.build_model = build_model
        self.config = config
        self.device = device
        self.seed = seed
        self.progress: Progress = progress or NullProgress()
        self.label = label  # describes the session's cell in progress output, e.g. "mlp-a2 adam"
        self._finished: dict[tuple[object, ...], TrainResult] = {}
        self.checkpoints = checkpoints  # None: trainings are not checkpointed

    def train(
        self,
        strategy: Strategy,
        *,
        seed: int | None = None,
        config: TrainConfig | None = None,
        label: str | None = None,
    ) -> TrainResult:
        """Train ``strategy`` once with the shared loop (or return the same training done earlier),
        after the trainings its ``requires`` names (trained with the same base ``config``)."""
        seed = self.seed if seed is None else seed
        base = config or self.config
        config = call_hook(strategy, "schedule", base)
        key = (call_hook(strategy, "identity"), seed, config)
        if key not in self._finished:
            required = {
                name: self.train(needed.strategy, seed=needed.seed, config=base, label=needed.label)
                for name, needed in call_hook(strategy, "requires", seed).items()
            }
            self._finished[key] = self._run(
                strategy,
                seed,
                config,
                label or " ".join(filter(None, [strategy.name, self.label, f"seed {seed}"])),
                required=required,
            )
        return self._finished[key]

    def evaluate(self, model: nn.Module, split: Literal["train", "val", "test"] = "test") -> float:
        """Accuracy of any model (e.g. an ensemble) on one split of the session's data."""
        return evaluate(
            model,
            getattr(self.data, split),
            batch_size=self.config.eval_batch_size,
            bf16=self.config.bf16,
            metric=self.data.metric,
        )

    def metric_details(self, model: nn.Module) -> dict[str, float]:
        """The numbers a metric is the mean of (MRPC: F1 and accuracy), on val and test, as
        ``{"test_f1": ..., ...}``; nothing for a data set scored by accuracy."""
        return metric_details(
            model,
            self.data,
            batch_size=self.config.eval_batch_size,
            autocast=lambda device: autocast(device, self.config.bf16),
        )

    def _run(
        self,
        strategy: Strategy,
        seed: int,
        config: TrainConfig,
        label: str,
        *,
        required: Mapping[str, TrainResult] | None = None,
    ) -> TrainResult:
        required = dict(required or {})
        with _in_eval_mode(required):
            return self._loop(strategy, seed, config, label, required)

    def _loop(
        self,
        strategy: Strategy,
        seed: int,
        config: TrainConfig,
        label: str,
        required: Mapping[str, TrainResult],
    ) -> TrainResult:
        device, data = self.device, self.data
        if config.bf16 and device.type != "cuda":
            raise UserError("--bf16 autocast is only supported on CUDA devices.")
        seed_everything(seed)
        fresh_compilation(config)  # --compile: what a trial compiles never depends on earlier ones
        model = self.build_model().to(device)
        # The training examples, and the recipe the loop applies to each of their batches (only
        # training batches are augmented: evaluation reads data.val and data.test as they are).
        train_split, recipe = data.training_split(config.augment)
        distributed.check_batch_size(config.batch_size)
        augment_generator = _augment_generator(seed, device, distributed.augment_tag(train_split))
        augment = _augmenter(recipe, augment_generator)
        steps_per_epoch = _steps_per_epoch(train_split, config.batch_size)
        generator = torch.Generator(device=device).manual_seed(seed)
        shuffle_generator = _shuffle_generator(train_split, seed)
        run = RunContext(
            seed, config, device, data, generator, steps_per_epoch, required=required,
            build_model=self.build_model,
        )
        training = TrainingState.start(strategy, model, run)
        model = training.model
        train_params = count_parameters(model)
        # A killed training resumes from its checkpoint, with every random stream where it was.
        generators = {"run": generator, "shuffle": shuffle_generator, "augment": augment_generator}
        checkpoint = open_checkpoint(
            self.checkpoints, strategy, seed, config, device, label=label, progress=self.progress
        )
        resumed = checkpoint.restore(training, generators)
        curve: list[EpochRecord] = resumed.curve
        diverged_at: int | None = None
        started = time.perf_counter() - resumed.elapsed
        self.progress.run_started(label, run.total_steps - run.step)  # the steps left to take

        for epoch in range(resumed.epochs, config.epochs):
            run.epoch = epoch
            model.train()
            training.loss_sum = torch.zeros((), device=device)
            for inputs, targets, share in distributed.training_batches(
                train_split, config.batch_size, shuffle_generator, augment
            ):
                training.step(inputs, targets, share)
                self.progress.advance(label)
            training.loss_sum, training.first_bad_step = distributed.finish_epoch(
                model, training.loss_sum, training.first_bad_step
            )
            bad_step = int(training.first_bad_step.item())
            evaluated = distributed.unwrap(call_hook(strategy, "evaluation_model", model, run))
            record = EpochRecord(
                epoch=epoch + 1,
                step=run.step,
                train_loss=training.loss_sum.item() / steps_per_epoch,
                val_accuracy=evaluate(
                    evaluated, data.val, batch_size=config.eval_batch_size, bf16=config.bf16,
                    metric=data.metric,
                ),
                test_accuracy=evaluate(
                    evaluated, data.test, batch_size=config.eval_batch_size, bf16=config.bf16,
                    metric=data.metric,
                ),
                seconds=time.perf_counter() - started,
            )
            curve.append(record)
            self.progress.epoch_finished(label, record, config.epochs)
            if bad_step >= 0:
                diverged_at = bad_step
                self.progress.message(f"{label}: loss is not finite at step {bad_step}; stopped.")
                break
            checkpoint.epoch_finished(training, generators, curve, time.perf_counter() - started)

        deployable = distributed.unwrap(call_hook(strategy, "deployable", model, run))
        test_accuracy = self.evaluate(deployable, "test")
        val_accuracy = self.evaluate(deployable, "val")
        result = TrainResult(
            strategy=strategy.name,
            seed=seed,
            config=config,
            test_accuracy=test_accuracy,
            val_accuracy=val_accuracy,
            train_params=train_params,
            inference_params=count_parameters(deployable),
            step_times=training.timer.seconds(),
            wall_time=time.perf_counter() - started,
            curve=curve,
            diverged_at_step=diverged_at,
            extra={**_reported(strategy, model, run), **self.metric_details(deployable)},
            model=deployable,
        )
        self.progress.run_finished(label, result)
        return result


def _augment_generator(seed: int, device: torch.device, tag: str = "") -> torch.Generator:
    """The augmentation's generator on the training device, seeded from the run's seed apart from
    the shuffle generator, so turning augmentation on keeps the batch order (``tag``: a
    data-parallel rank's, see ``distributed.augment_tag``)."""
    digest = hashlib.sha256(f"sopkit augment {seed}{tag}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def _augmenter(
    recipe: BatchAugment | None, generator: torch.Generator
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``recipe`` drawing from ``generator`` (see ``_augment_generator``)."""
    if recipe is None:
        return None
    return lambda inputs: recipe(inputs, generator)


def _shuffle_generator(split: Split, seed: int) -> torch.Generator:
    """A generator on the device the split's batches are shuffled on (randperm needs them to match)."""
    device = getattr(split, "device", torch.device("cpu"))
    return torch.Generator(device=device).manual_seed(seed)


_REPORTABLE = (str, int, float, bool, type(None))


def _reportable(value: Any, where: str) -> Any:
    """``value`` as something a trial record can store (JSON), or a UserError naming ``where``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, np.generic):  # a numpy scalar
        return value.item()
    if isinstance(value, _REPORTABLE):
        return value
    if isinstance(value, list | tuple):
        return [_reportable(item, where) for item in value]
    if isinstance(value, Mapping) and all(isinstance(key, str) for key in value):
        return {key: _reportable(item, f"{where}.{key}") for key, item in value.items()}
    raise UserError(
        f"{where} is a {type(value).__name__}; a report holds numbers, strings, booleans, None, "
        "and lists or string-keyed dicts of them."
    )


def _reported(strategy: Strategy, model: nn.Module, run: RunContext) -> dict[str, Any]:
    """What ``strategy.report`` says about the run, checked: a plugin's mistake there is named
    (strategy, class and hook) instead of ending in a traceback after the training."""
    who = strategy_label(strategy)  # its name, class and distribution
    try:
        reported = strategy.report(model, run)
    except UserError:
        raise
    except Exception as error:
        raise UserError(
            f"{who} failed in its report() hook: {type(error).__name__}: {error}"
        ) from error
    if not isinstance(reported, Mapping) or not all(isinstance(k, str) for k in reported):
        raise UserError(
            f"{who}: report() must return a dict with string keys, got {type(reported).__name__}."
        )
    return {key: _reportable(value, f"{who}: report()[{key!r}]") for key, value in reported.items()}

