"""What ``sopkit bench`` measures (:class:`BenchConfig`), how its flags parse, and the command line
that asks for a configuration again. Imports no torch."""

from __future__ import annotations

import contextlib
import math
import shlex
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sopkit.checks import (
    DEFAULT_EXPANSION,
    MAX_WORKERS,
    check_choice,
    check_expansion,
    check_int,
    default_of,
)
from sopkit.errors import UserError
from sopkit.training.config import DEFAULT_DEVICE, OPTIMIZERS, TrainConfig

#: Caps on what one bench asks for, so a size that passes its check can be allocated and timed:
#: the synthetic data (4 batches of inputs, float32), the classes of the output layer, and the
#: counts of steps. Beyond them torch fails deep inside (or the run never ends).
MAX_DATA_VALUES = 2**32
MAX_CLASSES = 2**24
MAX_STEPS = 1_000_000


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


def _help(text: str, **more: str) -> dict[str, str]:
    return {"help": text, **more}


@dataclass(frozen=True)
class BenchConfig:
    """What ``sopkit bench`` measures. Validated on construction: a bad value is the user's mistake.

    The one home of ``sopkit bench``'s defaults and checks: the CLI reads both (and the help of each
    flag) from these fields.
    """

    model: str = field(default="mlp-a3", metadata=_help(
        "Model name (see `sopkit models`) or package.module:factory."))
    input_shape: tuple[int, ...] = field(default=(3072,), metadata=_help(
        "Per-example input shape, e.g. 3072 (flat CIFAR) or 3,32,32."))
    num_classes: int = field(default=10, metadata=_help("Number of classes."))
    batch_size: int = default_of(TrainConfig, "batch_size")
    expansion: int = field(default=DEFAULT_EXPANSION, metadata=_help(
        "Expansion factor e (copies per weight)."))
    strategies: tuple[str, ...] = field(default=(), metadata=_help(
        "Comma-separated strategies.", shown_default="every registered strategy"))
    device: str = DEFAULT_DEVICE
    threads: int | None = field(default=None, metadata=_help(
        "torch.set_num_threads.", shown_default="torch's default"))
    bf16: bool = default_of(TrainConfig, "bf16")
    repeats: int = field(default=10, metadata=_help("Interleaved timing rounds."))
    steps: int = field(default=10, metadata=_help("Timed steps per strategy per round."))
    warmup: int = field(default=5, metadata=_help("Untimed warm-up steps per strategy."))
    optimizer: str = default_of(TrainConfig, "optimizer")
    seed: int = 0
    options: Mapping[str, str] = field(default_factory=dict)  # strategy options (--set)
    # For every strategy whose model has majority kernels: how p is drawn and what backward keeps
    # (``MajorityKernels.sampler`` / ``.backward``), to compare the paths on one device.
    mk_sampler: str = field(default="auto", metadata=_help(
        "How majority kernels draw p: auto, compiled, sfc64, torch, triton."))
    mk_backward: str = field(default="auto", metadata=_help(
        "What MK's backward keeps: auto, save (p), regenerate (a seed)."))
    compile: bool = field(default=default_of(TrainConfig, "compile"), metadata=_help(
        "Also time every strategy compiled by the loop (torch.compile), as 'NAME (compiled)' "
        "rows with ratios against the eager baseline; compiling happens in the warm-up."))

    def __post_init__(self) -> None:
        # Imported here: the configuration (and the CLI reading it) must not import torch.
        from sopkit.mk import BACKWARD_MODES, SAMPLERS

        check_int("--batch-size", self.batch_size)
        check_int("--num-classes", self.num_classes, maximum=MAX_CLASSES)
        for name in ("repeats", "steps"):
            check_int("--" + name, getattr(self, name), maximum=MAX_STEPS)
        check_int("--warmup", self.warmup, minimum=0, maximum=MAX_STEPS)
        check_expansion(self.expansion)
        if self.threads is not None:
            check_int("--threads", self.threads, maximum=MAX_WORKERS)
        check_int("--seed", self.seed, minimum=0)
        if not self.input_shape or any(d < 1 for d in self.input_shape):
            raise UserError(f"--input-shape must be positive, got {self.input_shape}.")
        values = 4 * self.batch_size * math.prod(self.input_shape)  # synthetic_data's inputs
        if values > MAX_DATA_VALUES:
            raise UserError(
                f"--batch-size {self.batch_size} with --input-shape "
                f"{','.join(map(str, self.input_shape))} makes synthetic data of "
                f"{_approximately(values)} values (4 batches); at most {MAX_DATA_VALUES:.3g} "
                f"({MAX_DATA_VALUES * 4 / 2**30:g} GiB of float32) are allocated."
            )
        check_choice("optimizer", self.optimizer, OPTIMIZERS, "optimizers")
        check_choice("--mk-sampler", self.mk_sampler, SAMPLERS, "samplers")
        check_choice("--mk-backward", self.mk_backward, BACKWARD_MODES, "modes")


def _approximately(count: int) -> str:
    """``count`` in three digits (``4.29e+09``), also beyond what a float holds (``10^400``)."""
    digits = len(str(count))
    return f"{count:.3g}" if digits < 300 else f"about 10^{digits - 1}"


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
    if config.compile:
        words.append("--compile")
    for key, value in config.options.items():
        words += ["--set", shlex.quote(f"{key}={value}")]
    return " ".join(words)


@contextlib.contextmanager
def out_of_memory_is_user_error(what: str) -> Iterator[None]:
    """Allocating ``what`` (the model, the synthetic data) without enough memory is the user's to
    fix (a smaller size), so it is a UserError saying which, not a traceback from torch's
    allocator. Other errors pass through."""
    try:
        yield
    except (RuntimeError, MemoryError) as error:
        text = str(error).lower()
        if type(error).__name__ != "OutOfMemoryError" and not (
            isinstance(error, MemoryError) or "alloc" in text or "memory" in text
        ):
            raise
        raise UserError(
            f"Not enough memory for {what}: {type(error).__name__}: {str(error)[:300]}"
        ) from None


def check_out_dir(out: str | Path, files: Iterable[str]) -> Path:
    """``out`` as a directory that ``files`` can be written into, made if missing, checked before
    anything is measured (so no measurement is lost at the end): not an existing file, not under
    a file, writable, and none of ``files`` in it a directory."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out} is an existing file, not a directory: bench writes "
                        f"{', '.join(files)} into a directory.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # the only sure test of writing there
            pass
    except OSError as error:
        raise UserError(f"--out {out} cannot be written: {error.strerror or error}.") from None
    for name in files:
        if (path / name).exists() and not (path / name).is_file():
            raise UserError(f"--out {out}: {path / name} exists and is not a file; move it away.")
    return path
