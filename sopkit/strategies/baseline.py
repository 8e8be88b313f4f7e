"""Plain training of the model as it is: the reference every other strategy is measured against."""

from __future__ import annotations

from dataclasses import replace

from sopkit.training.config import TrainConfig
from sopkit.training.settings import StrategySettings
from sopkit.training.strategy import Strategy


class Baseline(Strategy):
    """The model trained as it is (paper: BASELINE)."""

    description = "The model trained as it is."


class BaselineLong(Baseline):
    """The baseline trained for longer, as MK needs more steps to converge (paper: BASELINE-LONG).

    The paper's ImageNet recipe trains 330 instead of 90 epochs; the factor is ``long_factor``
    (``--set baseline-long.long_factor=3.67`` for exactly that), 3 by default.
    """

    description = "The baseline trained long_factor (default 3) times as many epochs."

    def __init__(self, settings: StrategySettings | None = None) -> None:
        super().__init__(settings)
        self.long_factor = self.settings.get("long_factor", 3.0)

    def schedule(self, config: TrainConfig) -> TrainConfig:
        return replace(config, epochs=max(1, round(config.epochs * self.long_factor)))
