"""Checkpoints of trainings in progress: a killed training resumes from its last epoch boundary.

A training checkpoints at the end of an epoch once ``every`` seconds of wall time have passed since
its last checkpoint (``every = 0``: every epoch), and always at its end, so that a finished training
that others are built from (an ensemble's members, a distilled student's teacher) is not repeated
after a kill. A checkpoint holds everything the rest of the training depends on: the model (a
majority-kernels model's copies included), the optimizer, the schedule, every random stream (torch's
global CPU and CUDA generators, NumPy's and Python's, the run's, the shuffle's and the
augmentation's generators, the majority-kernels mixing stream), the strategy's ``run.state``, the
learning curve, the step timings, the step and epoch counters, the elapsed wall time and the
divergence tracking. On the CPU a resumed training ends bitwise equal to one that never stopped.

Files are written to a temporary file and renamed over the old checkpoint, so a kill during a write
leaves the previous checkpoint whole. A file is named by a hash of everything that identifies the
training (the strategy's ``identity()``, the seed, the ``TrainConfig``, the device type and the
session's ``scope``), and holds that key in full with a format version and the sopkit and torch
versions: a checkpoint of another training, code or configuration is never loaded. A damaged file
is reported and the training starts over; it never stops a comparison.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from sopkit.mk import find_majority
from sopkit.training.config import TrainConfig
from sopkit.training.hooks_guard import call_hook
from sopkit.training.progress import NullProgress, Progress
from sopkit.training.strategy import Strategy
from sopkit.training.timing import StepTimer
from sopkit.training.types import EpochRecord, RunContext

__all__ = [
    "FORMAT_VERSION",
    "CheckpointWarning",
    "Checkpoints",
    "NoCheckpoint",
    "Resumed",
    "TrainingCheckpoint",
    "open_checkpoint",
]

#: The layout of a checkpoint's contents; a file of another version is not loaded.
FORMAT_VERSION = 1
SUFFIX = ".pt"


class CheckpointWarning(UserWarning):
    """A checkpoint could not be read or written; the training goes on without it."""


@dataclass(frozen=True)
class Checkpoints:
    """Where the trainings of one ``TrainingSession`` checkpoint, and how often.

    ``every``: the least wall time in seconds between two checkpoints of a training (0: every
    epoch). ``scope``: what identifies the session's trainings besides their own key (the data set
    and model), so that sessions sharing a directory never load each other's checkpoints.
    """

    directory: Path
    every: float
    scope: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.every, int | float) and 0 <= self.every < float("inf")):
            raise ValueError(f"checkpoint interval must be a finite number >= 0, got {self.every}")

    def discard(self) -> None:
        """Remove every checkpoint in the directory (their trainings are committed)."""
        shutil.rmtree(self.directory, ignore_errors=True)


class Trainable(Protocol):
    """What a checkpoint reads and restores of a training in progress (``TrainingState``)."""

    model: nn.Module
    run: RunContext
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    timer: StepTimer
    first_bad_step: torch.Tensor


#: The generators of a run besides torch's global ones, by name (run, shuffle, augment).
Generators = Mapping[str, torch.Generator]


@dataclass
class Resumed:
    """Where a training starts: after ``epochs`` finished epochs, ``elapsed`` seconds in, with the
    learning curve so far (a fresh training: 0, 0.0, [])."""

    epochs: int = 0
    elapsed: float = 0.0
    curve: list[EpochRecord] = field(default_factory=list)


class NoCheckpoint:
    """A training that is not checkpointed (no directory: bench, library use)."""

    def restore(self, training: Trainable, generators: Generators) -> Resumed:
        return Resumed()

    def epoch_finished(
        self, training: Trainable, generators: Generators, curve: list[EpochRecord], elapsed: float
    ) -> None:
        pass


def open_checkpoint(
    checkpoints: Checkpoints | None,
    strategy: Strategy,
    seed: int,
    config: TrainConfig,
    device: torch.device,
    *,
    label: str = "",
    progress: Progress | None = None,
) -> TrainingCheckpoint | NoCheckpoint:
    """The checkpoint of one training (``strategy`` with ``seed`` and ``config`` on ``device``), or
    a ``NoCheckpoint`` when ``checkpoints`` is None."""
    if checkpoints is None:
        return NoCheckpoint()
    key = repr((checkpoints.scope, call_hook(strategy, "identity"), seed, config, device.type))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{strategy.name}-seed{seed}")[:80]
    path = checkpoints.directory / f"{name}-{digest}{SUFFIX}"
    return TrainingCheckpoint(path, key, checkpoints.every, label=label, progress=progress)


class TrainingCheckpoint:
    """The checkpoint file of one training: ``restore`` it before the first epoch, and call
    ``epoch_finished`` at every epoch's end (it writes when one is due)."""

    def __init__(
        self,
        path: Path,
        key: str,
        every: float,
        *,
        label: str = "",
        progress: Progress | None = None,
    ) -> None:
        self.path = path
        self.key = key
        self.every = every
        self.label = label or path.stem
        self.progress: Progress = progress or NullProgress()
        self._last_write = time.perf_counter()
        self._off = False  # set when this training's state cannot be checkpointed

    # ---- reading --------------------------------------------------------------------------------
    def restore(self, training: Trainable, generators: Generators) -> Resumed:
        """Put ``training`` (freshly started) where its checkpoint left it, if there is one it can
        use; otherwise leave it as it is (a damaged or foreign file is reported and removed)."""
        self._last_write = time.perf_counter()
        if not self.path.exists():
            return Resumed()
        try:
            payload = torch.load(self.path, map_location=None, weights_only=True)
        except Exception as error:  # any damage: truncated, garbage, unreadable
            self._discard(f"is damaged ({type(error).__name__}: {error})")
            return Resumed()
        problem = self._foreign(payload)
        if problem is not None:
            self._discard(problem)
            return Resumed()
        try:
            fresh = copy.deepcopy(_capture(training, generators))
        except _Unsupported as error:
            self._off = True
            _warn(self.progress, f"{self.label} is not checkpointed: {error}")
            return Resumed()
        state = dict(vars(training.run.state))
        try:
            _apply(payload, training, generators)
            resumed = Resumed(
                epochs=int(payload["epochs"]),
                elapsed=float(payload["elapsed"]),
                curve=[EpochRecord(**record) for record in payload["curve"]],
            )
            if not 0 < resumed.epochs == len(resumed.curve) <= training.run.config.epochs:
                raise ValueError(f"{resumed.epochs} epochs with {len(resumed.curve)} records")
        except Exception as error:  # a file that loads but does not fit: back to the fresh start
            _apply(fresh, training, generators)
            vars(training.run.state).clear()
            vars(training.run.state).update(state)
            self._discard(f"does not fit this training ({type(error).__name__}: {error})")
            return Resumed()
        self.progress.message(
            f"{self.label}: resumed from its checkpoint after epoch {resumed.epochs} "
            f"of {training.run.config.epochs}."
        )
        return resumed

    def _foreign(self, payload: Any) -> str | None:
        """Why ``payload`` is not this training's checkpoint (None when it is)."""
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
            found = payload.get("format") if isinstance(payload, dict) else None
            return f"has format {found!r}, not {FORMAT_VERSION}"
        if payload.get("key") != self.key:
            return "belongs to another training"
        if payload.get("versions") != _versions():
            return f"was written by {payload.get('versions')}, not {_versions()}"
        return None

    def _discard(self, problem: str) -> None:
        _warn(self.progress, f"Checkpoint {self.path} {problem}; {self.label} starts over.")
        with contextlib.suppress(OSError):
            self.path.unlink()

    # ---- writing --------------------------------------------------------------------------------
    def epoch_finished(
        self, training: Trainable, generators: Generators, curve: list[EpochRecord], elapsed: float
    ) -> None:
        """Write a checkpoint if one is due: ``every`` seconds after the last one, or at the end
        of the training."""
        last = training.run.epoch + 1 >= training.run.config.epochs
        now = time.perf_counter()
        if self._off or not (last or now - self._last_write >= self.every):
            return
        try:
            payload = _capture(training, generators)
        except _Unsupported as error:
            self._off = True
            _warn(self.progress, f"{self.label} is not checkpointed: {error}")
            return
        payload.update(
            format=FORMAT_VERSION,
            key=self.key,
            versions=_versions(),
            epochs=training.run.epoch + 1,
            elapsed=elapsed,
            curve=[asdict(record) for record in curve],
        )
        try:
            _write_atomic(self.path, payload)
        except OSError as error:  # a full disk or a read-only folder costs checkpoints only
            self._off = True
            _warn(self.progress, f"{self.label} is not checkpointed: writing {self.path} failed "
                  f"({error}); the training goes on.")
        self._last_write = time.perf_counter()


def _versions() -> dict[str, str]:
    """The versions a checkpoint is only loaded under (another one may train differently)."""
    try:
        sopkit = importlib.metadata.version("sopkit")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        sopkit = "unknown"
    return {"sopkit": sopkit, "torch": str(torch.__version__)}


def _warn(progress: Progress, text: str) -> None:
    """``text`` where the user sees it: the progress output, or a warning in library use."""
    if type(progress) is NullProgress:  # a subclass that shows messages is not silent
        warnings.warn(text, CheckpointWarning, stacklevel=3)
    else:
        progress.message(text)


def _write_atomic(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` into a temporary file beside ``path``, synced, renamed over ``path``.

    Streams to the file (``sopkit.files.write_atomic`` takes bytes: a large model's optimizer state
    would be held in memory twice), with the same guarantees: the old file or the new, never half.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    with contextlib.suppress(OSError):
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


# ---- what a checkpoint holds --------------------------------------------------------------------


class _Unsupported(Exception):
    """``run.state`` holds a value a checkpoint cannot keep."""


_PLAIN = (torch.Tensor, int, float, bool, str, type(None))


def _plain(value: Any) -> bool:
    """Whether ``value`` survives ``torch.save`` and a ``weights_only`` load unchanged."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, list | tuple):
        return all(_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str | int) and _plain(v) for k, v in value.items())
    return False


def _input_tensors(run: RunContext) -> set[int]:
    """The ids of every tensor of the run's required trainings' models (its inputs)."""
    return {
        id(tensor)
        for result in run.required.values()
        if result.model is not None
        for tensor in [*result.model.parameters(), *result.model.buffers()]
    }


def _strategy_state(run: RunContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """``run.state`` as (plain values, state dicts of its modules).

    A module built only from the run's inputs (distill's teacher, made of the ensemble's members)
    is left out: ``prepare`` builds it again from the same inputs. Any other module (one the
    strategy trains) is kept as its ``state_dict``.
    """
    values: dict[str, Any] = {}
    modules: dict[str, Any] = {}
    inputs: set[int] | None = None
    for name, value in vars(run.state).items():
        if isinstance(value, nn.Module):
            inputs = _input_tensors(run) if inputs is None else inputs
            tensors = [*value.parameters(), *value.buffers()]
            if not all(id(tensor) in inputs for tensor in tensors):
                modules[name] = value.state_dict()
        elif _plain(value):
            values[name] = value
        else:
            raise _Unsupported(
                f"its run.state.{name} is a {type(value).__name__} (a checkpoint keeps tensors, "
                "numbers, strings, modules, and lists or dicts of them)."
            )
    return values, modules


def _numpy_state() -> dict[str, Any]:
    kind, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {
        "kind": kind,
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "position": int(position),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }


def _set_numpy_state(state: Mapping[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (state["kind"], keys, state["position"], state["has_gauss"], state["gauss"])
    )


def _capture(training: Trainable, generators: Generators) -> dict[str, Any]:
    """Everything of ``training`` the rest of it depends on, as ``torch.save`` can store it (live
    tensors, not copies: save or deep-copy it before training goes on)."""
    run = training.run
    values, modules = _strategy_state(run)
    holder = find_majority(training.model)
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "model": training.model.state_dict(),
        "optimizer": training.optimizer.state_dict(),
        "schedule": training.schedule.state_dict(),
        "timer": training.timer.state_dict(),
        "first_bad_step": training.first_bad_step,
        "run": {"step": run.step, "epoch": run.epoch},
        "strategy_state": values,
        "strategy_modules": modules,
        "majority": None
        if holder is None
        else {"stream": holder.stream.state_dict(), "last_sampler": holder.last_sampler},
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if cuda else None,
            "numpy": _numpy_state(),
            "python": random.getstate(),
            "generators": {name: generator.get_state() for name, generator in generators.items()},
        },
    }


def _apply(payload: Mapping[str, Any], training: Trainable, generators: Generators) -> None:
    """Restore what ``_capture`` took (raises if it does not fit)."""
    run = training.run
    training.model.load_state_dict(payload["model"], strict=True)
    training.optimizer.load_state_dict(payload["optimizer"])
    training.schedule.load_state_dict(payload["schedule"])
    training.timer.load_state_dict(payload["timer"])
    training.first_bad_step.copy_(payload["first_bad_step"])
    run.step, run.epoch = int(payload["run"]["step"]), int(payload["run"]["epoch"])
    for name, value in payload["strategy_state"].items():
        setattr(run.state, name, value)
    for name, state in payload["strategy_modules"].items():
        getattr(run.state, name).load_state_dict(state)
    holder = find_majority(training.model)
    majority = payload["majority"]
    if (holder is None) != (majority is None):
        raise ValueError("the checkpoint and the model disagree on majority kernels")
    if holder is not None:
        holder.stream.load_state_dict(majority["stream"])
        holder.last_sampler = majority["last_sampler"]
    rng = payload["rng"]
    if set(rng["generators"]) != set(generators):
        raise ValueError(f"generators {sorted(rng['generators'])}, expected {sorted(generators)}")
    for name, generator in generators.items():
        generator.set_state(rng["generators"][name].cpu())
    torch.set_rng_state(rng["torch"].cpu())
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state_all([state.cpu() for state in rng["cuda"]])
    _set_numpy_state(rng["numpy"])
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))

