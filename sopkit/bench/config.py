"""What ``sopkit bench`` measures (:class:`BenchConfig`), how its flags parse, and the command line
that asks for a configuration again. Imports no torch."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from sopkit.checks import DEFAULT_EXPANSION, check_choice, check_expansion, check_int, default_of
from sopkit.errors import UserError
from sopkit.training.config import DEFAULT_DEVICE, OPTIMIZERS, TrainConfig


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

    def __post_init__(self) -> None:
        # Imported here: the configuration (and the CLI reading it) must not import torch.
        from sopkit.mk import BACKWARD_MODES, SAMPLERS

        for name in ("batch_size", "repeats", "steps", "num_classes"):
            check_int("--" + name.replace("_", "-"), getattr(self, name))
        check_int("--warmup", self.warmup, minimum=0)
        check_expansion(self.expansion)
        if self.threads is not None:
            check_int("--threads", self.threads)
        check_int("--seed", self.seed, minimum=0)
        if not self.input_shape or any(d < 1 for d in self.input_shape):
            raise UserError(f"--input-shape must be positive, got {self.input_shape}.")
        check_choice("optimizer", self.optimizer, OPTIMIZERS, "optimizers")
        check_choice("--mk-sampler", self.mk_sampler, SAMPLERS, "samplers")
        check_choice("--mk-backward", self.mk_backward, BACKWARD_MODES, "modes")


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
