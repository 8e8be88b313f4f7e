"""``TrainConfig``: how one model is trained, with every default and check of it in one place.

No torch here: ``sopkit compare`` builds and validates its plan (and ``sopkit --help`` lists the
defaults) without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from sopkit.checks import MAX_EPOCHS, check_choice, check_float, check_int
from sopkit.errors import UserError

__all__ = [
    "DEFAULT_DEVICE",
    "DEFAULT_LR",
    "DEVICE_HELP",
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainConfig",
    "check_milestones",
    "parse_milestones",
    "reschedule",
]

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
        "Learning-rate schedule: " + ", ".join(SCHEDULES)
        + " (step: drops by --lr-decay at 1/3 and 2/3 of training, or at --milestones)."))
    # The recipe of the paper's ImageNet runs and their kin. At their defaults they change nothing,
    # and a trial's key includes them only away from their defaults (``experiment.records``).
    milestones: tuple[int, ...] = field(default=(), metadata=_help(
        "Epochs at which the learning rate drops by --lr-decay, increasing and comma-separated "
        "(e.g. 30,60,80), or none. They make the schedule 'step'; cosine takes none.",
        shown_default="none"))
    lr_decay: float = field(default=0.1, metadata=_help(
        "The factor of each learning-rate drop of the step schedule, in (0, 1]."))
    # Not ``warmup_epochs``: ``warmup_steps`` below is about step timing, not the learning rate.
    lr_warmup_epochs: int = field(default=0, metadata=_help(
        "Epochs of linear learning-rate warm-up (step k of n trains at lr*k/n), then the "
        "schedule."))
    label_smoothing: float = field(default=0.0, metadata=_help(
        "Label smoothing of every strategy's cross-entropy, in [0, 1)."))
    # "none" stays the default here, so trials stored before augmentation existed keep their keys;
    # `sopkit compare` resolves its default per data set (``DatasetSpec.default_augment``).
    augment: Literal["none", "standard"] | str = field(default="none", metadata=_help(
        "Training augmentation: none, or standard (the data set's recipe: crop+flip for cifar10, "
        "random-resized crop+flip for imagenet; nothing for mnist1d and digits).",
        shown_default="standard for image sets, none for mnist1d and digits"))
    bf16: bool = field(default=False, metadata=_help("bf16 autocast (CUDA only)."))
    # Compiled and eager steps may differ in the last bits, so a compiled trial is another trial
    # (a key includes this field only when it is set).
    compile: bool = field(default=False, metadata=_help(
        "torch.compile every strategy's model after the strategy prepares it (majority kernels "
        "draw and mix outside the graph); the first steps compile, tens of seconds on a CPU."))
    warmup_steps: int = 5  # steps excluded from step timing (allocator, caches, lazy init)
    eval_batch_size: int = 1024

    def __post_init__(self) -> None:
        check_int("--epochs", self.epochs, maximum=MAX_EPOCHS)
        check_int("--batch-size", self.batch_size)
        check_int("--eval-batch-size", self.eval_batch_size)
        check_int("warm-up steps", self.warmup_steps, minimum=0)
        check_choice("optimizer", self.optimizer, OPTIMIZERS, "optimizers")
        check_choice("schedule", self.schedule, SCHEDULES, "schedules")
        check_choice("--augment", self.augment, ("none", "standard"), "augmentations")
        if self.lr is not None:
            check_float("--lr", self.lr, positive=True)
        check_float("--weight-decay", self.weight_decay)
        check_float("momentum", self.momentum, at_most=1.0)
        self._check_recipe()

    def _check_recipe(self) -> None:
        """Milestones, decay, warm-up and smoothing; normalised (a preset's list becomes a tuple,
        an integer rate a float) so that equal recipes compare, and key, equal."""
        if isinstance(self.milestones, list):
            object.__setattr__(self, "milestones", tuple(self.milestones))
        milestones = check_milestones("--milestones", self.milestones, self.epochs)
        if milestones:
            if self.schedule == "cosine":
                raise UserError(
                    "--milestones cannot be combined with --schedule cosine: milestones are the "
                    "drops of a step schedule."
                )
            # Drops at given epochs are the step schedule with its own drops (see make_schedule).
            object.__setattr__(self, "schedule", "step")
        object.__setattr__(
            self, "lr_decay", check_float("--lr-decay", self.lr_decay, positive=True, at_most=1.0)
        )
        warmup = check_int("--warmup-epochs", self.lr_warmup_epochs, minimum=0)
        if warmup and warmup >= self.epochs:
            raise UserError(
                f"--warmup-epochs must be less than --epochs ({self.epochs}), got {warmup}: the "
                "learning rate would never reach its value."
            )
        object.__setattr__(
            self,
            "label_smoothing",
            check_float("--label-smoothing", self.label_smoothing, below=1.0),
        )

    @property
    def learning_rate(self) -> float:
        """The learning rate in use: ``lr``, or the optimizer's default."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]


def _milestones_problem(values: Any) -> str | None:
    """Why ``values`` are not milestones (increasing positive integers), or None."""
    if not isinstance(values, tuple | list):
        return "milestones must be a list of epochs"
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
        return "milestones must be positive integers (epochs), e.g. 30,60,80"
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        return "milestones must be increasing, e.g. 30,60,80"
    return None


def _milestones_text(values: Any) -> str:
    if isinstance(values, tuple | list):
        return ",".join(map(str, values)) or "none"
    return repr(values)


def check_milestones(
    name: str, milestones: Any, epochs: int | None = None, epochs_name: str = "--epochs"
) -> tuple[int, ...]:
    """``milestones`` as a tuple of increasing positive epochs, each less than ``epochs`` (a drop
    at or after the last epoch would never take effect); ``name`` is what the user gave them as."""
    problem = _milestones_problem(milestones)
    if problem is not None:
        raise UserError(f"{name} {_milestones_text(milestones)} is not valid: {problem}.")
    values = tuple(milestones)
    if epochs is not None and values and values[-1] >= epochs:
        raise UserError(
            f"{name} {_milestones_text(values)}: every milestone must be less than {epochs_name} "
            f"({epochs}); a drop at or after the last epoch never takes effect."
        )
    return values


def parse_milestones(text: str) -> tuple[int, ...]:
    """``"30,60,80"`` -> ``(30, 60, 80)``; ``""`` or ``"none"`` -> ``()``. A ValueError says why
    not (the caller names the flag or option)."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return ()
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError("milestones must be positive integers (epochs), e.g. 30,60,80") from None
    problem = _milestones_problem(values)
    if problem is not None:
        raise ValueError(problem)
    return values


def reschedule(
    config: TrainConfig, epochs: int | None = None, milestones: tuple[int, ...] | None = None
) -> TrainConfig:
    """``config`` trained for ``epochs`` with drops at ``milestones``: a strategy on its own
    schedule (``Strategy.schedule``). None keeps the config's value.

    New epochs without new milestones stretch the config's milestones with the training
    (``round(m * epochs / config.epochs)``), so the drops stay at the same fractions of it: the
    paper's 30/60 of 90 become 110/220 of 330. Stretched drops that land on another, at 0, or at or
    past the end are left out; a config whose drops are all gone (or replaced by none) trains at a
    constant rate. The warm-up stays as many epochs.
    """
    new_epochs = config.epochs if epochs is None else epochs
    if milestones is None:
        milestones = config.milestones
        if new_epochs != config.epochs and milestones:
            stretched = {round(m * new_epochs / config.epochs) for m in milestones}
            milestones = tuple(sorted(m for m in stretched if 1 <= m < new_epochs))
    if config.milestones and not milestones:  # every drop gone: no step left
        return replace(config, epochs=new_epochs, milestones=(), schedule="constant")
    return replace(config, epochs=new_epochs, milestones=tuple(milestones))
