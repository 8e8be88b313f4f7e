"""Plain training of the model as it is: the reference every other strategy is measured against."""

from __future__ import annotations

from sopkit.checks import MAX_EPOCHS, check_float
from sopkit.errors import UserError
from sopkit.training.config import TrainConfig
from sopkit.training.settings import StrategySettings
from sopkit.training.strategy import Strategy

#: How many times the baseline's epochs ``baseline-long`` trains by default.
DEFAULT_LONG_FACTOR = 3.0


class Baseline(Strategy):
    """The model trained as it is (paper: BASELINE)."""

    description = "The model trained as it is."


class BaselineLong(Baseline):
    """The baseline trained for longer, as MK needs more steps to converge (paper: BASELINE-LONG).

    It trains ``long_factor`` (3 by default) times the comparison's epochs, with the comparison's
    milestones stretched along (30/60 of 90 become 90/180 of 270), or exactly as its options say:
    the paper's ImageNet recipe, 330 epochs with drops at 90, 180 and 240, is
    ``--set baseline-long.epochs=330 --set baseline-long.milestones=90,180,240`` (``epochs`` and
    ``long_factor`` exclude each other). The strategies compared with it on that schedule take the
    same two options (every strategy does, see :class:`~sopkit.training.strategy.Strategy`).
    """

    description = (
        "The baseline trained long_factor (default 3) times as many epochs, or its own epochs and "
        "milestones."
    )

    def __init__(self, settings: StrategySettings | None = None) -> None:
        super().__init__(settings)
        factor = self.settings.get("long_factor", None, float)
        if factor is not None and self.own_epochs is not None:
            raise UserError(
                f"Options {self.name}.epochs and {self.name}.long_factor both set the length of "
                "its training: give one."
            )
        self.long_factor = check_float(
            f"Option {self.name}.long_factor",
            DEFAULT_LONG_FACTOR if factor is None else factor,
            positive=True,
        )

    def schedule(self, config: TrainConfig) -> TrainConfig:
        if self.own_epochs is None and config.epochs * self.long_factor > MAX_EPOCHS:
            raise UserError(
                f"Option {self.name}.long_factor={self.long_factor:g} times --epochs "
                f"{config.epochs} is more than {MAX_EPOCHS} epochs, the most one training takes."
            )
        epochs = self.own_epochs or max(1, round(config.epochs * self.long_factor))
        return self._own_schedule(config, epochs)
