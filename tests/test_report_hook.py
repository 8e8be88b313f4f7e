"""``Strategy.report``: what a run says about itself reaches ``TrainResult.extra`` checked, and a
plugin's mistake there is a message naming the strategy and the hook, never a traceback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sopkit.errors import UserError
from sopkit.training.config import TrainConfig
from sopkit.training.loop import TrainingSession
from sopkit.training.settings import StrategySettings
from sopkit.training.strategy import Strategy


def _session(data) -> TrainingSession:
    def build() -> torch.nn.Module:
        return torch.nn.Linear(12, 4)

    return TrainingSession(data, build, TrainConfig(epochs=1, batch_size=64), device=torch.device("cpu"))


class Reporting(Strategy):
    """Reports whatever the test puts in ``answer``."""

    answer: object = None

    def report(self, model, run):  # type: ignore[override]
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def _strategy(answer: object) -> Reporting:
    strategy = Reporting(StrategySettings(strategy_name="reporting"))
    strategy.answer = answer
    return strategy


def test_scalars_from_torch_and_numpy_are_stored_as_numbers(tiny_data):
    answer = {"u": torch.tensor(0.25), "n": np.int64(7), "nested": {"xs": [1, 2.5, "a", None]}}
    result = _session(tiny_data).train(_strategy(answer))
    assert result.extra == {"u": 0.25, "n": 7, "nested": {"xs": [1, 2.5, "a", None]}}
    assert type(result.extra["u"]) is float and type(result.extra["n"]) is int


@pytest.mark.parametrize(
    "answer,message",
    [
        (RuntimeError("boom"), "failed in its report() hook: RuntimeError: boom"),
        (None, "report() must return a dict with string keys, got NoneType"),
        ([("a", 1)], "report() must return a dict with string keys, got list"),
        ({1: 2}, "report() must return a dict with string keys, got dict"),
        ({"w": torch.zeros(3)}, "report()['w'] is a Tensor"),
        ({"f": object()}, "report()['f'] is a object"),
    ],
)
def test_a_report_hook_mistake_names_the_strategy_and_the_hook(tiny_data, answer, message):
    with pytest.raises(UserError) as raised:
        _session(tiny_data).train(_strategy(answer))
    text = str(raised.value)
    assert text.startswith("Strategy 'reporting' (test_report_hook.Reporting)")
    assert message in text
