"""A tiny learnable classification task and a training session over it, for the baselines' tests.

A module with a unique name (not ``conftest``) so that test files can import it by name."""

from __future__ import annotations

import torch

from sopkit.data import DataSplits, TensorSplit
from sopkit.models import mlp
from sopkit.training.loop import TrainingSession
from sopkit.training.settings import StrategySettings
from sopkit.training.types import TrainResult

INPUTS, CLASSES = 12, 4


def tiny_data(n_train: int = 128, n_held_out: int = 64) -> DataSplits:
    """Labels are the argmax of a fixed linear map of Gaussian inputs: learnable in a few steps."""
    generator = torch.Generator().manual_seed(123)
    x = torch.randn(n_train + n_held_out, INPUTS, generator=generator)
    y = (x @ torch.randn(INPUTS, CLASSES, generator=generator)).argmax(dim=1)
    held_out = TensorSplit(x[n_train:], y[n_train:])
    return DataSplits("tiny", (INPUTS,), CLASSES, TensorSplit(x[:n_train], y[:n_train]),
                      held_out, held_out)


def tiny_model() -> torch.nn.Sequential:
    return mlp((INPUTS,), CLASSES, hidden=(16, 8))


def settings(name: str, *, expansion: int = 3, **options: str) -> StrategySettings:
    """Settings as ``sopkit compare`` builds them: all options, scoped to ``name``."""
    return StrategySettings(expansion, options, name)


class CountingSession(TrainingSession):
    """A session that remembers every training it actually ran (not those it reused)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.runs: list[tuple[str, int]] = []

    def _run(self, strategy, seed, config, label, **kwargs) -> TrainResult:  # type: ignore[no-untyped-def]
        self.runs.append((strategy.name, seed))
        return super()._run(strategy, seed, config, label, **kwargs)
