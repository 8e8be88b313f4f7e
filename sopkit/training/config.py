"""``TrainConfig``: how one model is trained, with every default and check of it in one place.

No torch here: ``sopkit compare`` builds and validates its plan (and ``sopkit --help`` lists the
defaults) without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sopkit.checks import check_choice, check_float, check_int

__all__ = ["DEFAULT_DEVICE", "DEFAULT_LR", "DEVICE_HELP", "OPTIMIZERS", "SCHEDULES", "TrainConfig"]

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "step", "cosine")
#: The default learning rate per optimizer: the bases of the paper's learning-rate grids (Section
#: 5.1), which ``sopkit.experiment.plan`` builds its grids around.
DEFAULT_LR: dict[str, float] = {"adam": 0.001, "sgd": 0.025}
#: The device every command trains on unless told otherwise (``select_device`` resolves it).
DEFAULT_DEVICE = "auto"
DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps."


def _help(text: str, **more: str) -> dict[str, str]:
    return {"help": text, **more}


@dataclass(frozen=True)
class TrainConfig:
    """How one model is trained. Validated on construction: a bad value is the user's mistake.

    The ``help`` of each field is what ``sopkit compare --help`` shows for its flag.
    """

    epochs: int = field(default=10, metadata=_help(
        "Training epochs of the baseline.", shown_default="per data set, 200 for mnist1d"))
    batch_size: int = field(default=256, metadata=_help("Training batch size."))
    optimizer: Literal["adam", "sgd"] | str = field(default="adam", metadata=_help(
        "adam and/or sgd (momentum 0.9), comma-separated."))
    lr: float | None = field(default=None, metadata=_help(
        "Learning rate without a grid.",
        shown_default=", ".join(f"{v:g} for {k}" for k, v in DEFAULT_LR.items())))
    momentum: float = 0.9  # SGD only
    weight_decay: float = field(default=0.0, metadata=_help("Weight decay."))
    schedule: Literal["constant", "step", "cosine"] | str = field(default="constant", metadata=_help(
        "Learning-rate schedule: " + ", ".join(SCHEDULES) + "."))
    bf16: bool = field(default=False, metadata=_help("bf16 autocast (CUDA only)."))
    warmup_steps: int = 5  # steps excluded from step timing (allocator, caches, lazy init)
    eval_batch_size: int = 1024

    def __post_init__(self) -> None:
        check_int("--epochs", self.epochs)
        check_int("--batch-size", self.batch_size)
        check_int("--eval-batch-size", self.eval_batch_size)
        check_int("warm-up steps", self.warmup_steps, minimum=0)
        check_choice("optimizer", self.optimizer, OPTIMIZERS, "optimizers")
        check_choice("schedule", self.schedule, SCHEDULES, "schedules")
        if self.lr is not None:
            check_float("--lr", self.lr, positive=True)
        check_float("--weight-decay", self.weight_decay)
        check_float("momentum", self.momentum, at_most=1.0)

    @property
    def learning_rate(self) -> float:
        """The learning rate in use: ``lr``, or the optimizer's default."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]
