"""Fixtures for the baselines' tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from baselines_helpers import CountingSession, tiny_data, tiny_model

from sopkit.training.config import TrainConfig


@pytest.fixture
def make_session() -> Callable[..., CountingSession]:
    """A factory of sessions over the tiny task that count the trainings they run."""

    def make(seed: int = 0, epochs: int = 2, **config: object) -> CountingSession:
        return CountingSession(
            tiny_data(), tiny_model, TrainConfig(epochs=epochs, batch_size=32, **config),  # type: ignore[arg-type]
            device=torch.device("cpu"), seed=seed,
        )

    return make
