"""The contract every registered strategy meets, sopkit's own and every plugin's alike.

One test per strategy found in the ``sopkit.strategies`` entry-point group, on a tiny in-memory task:
it trains and learns; its loss stays finite; it ends with a deployable model that carries no majority
kernels, whose parameter count is the baseline's times what the strategy declares
(``inference_params_multiple``, 1 unless declared: ``e`` for an ensemble; or, for a size no whole
multiple gives, exactly ``expected_inference_params(plain_model)``: ``wide``) and whose accuracy is the
one reported; the same seed gives the same result, bit for bit; and the strategy instance carries no
state from one run to the next: ``fit`` leaves ``vars(strategy)`` as it was, and one instance trained
with another seed in between gives what a fresh instance gives.
"""

from __future__ import annotations

import math

import pytest
import torch

from sopkit.data.splits import DataSplits, TensorSplit
from sopkit.mk import count_parameters, is_expanded
from sopkit.models import mlp
from sopkit.registry import create_strategy, discover
from sopkit.training.config import TrainConfig
from sopkit.training.loop import TrainingSession
from sopkit.training.settings import StrategySettings
from sopkit.training.strategy import Strategy
from sopkit.training.types import TrainResult

INPUTS, CLASSES, HIDDEN = 10, 3, (24,)
EXPANSION = 3


def _tiny_task() -> DataSplits:
    """200 training examples whose label is the argmax of a fixed linear map: learnable, instant."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, INPUTS, generator=generator)
    y = (x @ torch.randn(INPUTS, CLASSES, generator=generator)).argmax(dim=1)
    held_out = TensorSplit(x[200:], y[200:])
    return DataSplits("tiny", (INPUTS,), CLASSES, TensorSplit(x[:200], y[:200]), held_out, held_out)


def _model() -> torch.nn.Module:
    return mlp((INPUTS,), CLASSES, hidden=HIDDEN)  # the mlp-a1 shape, narrower


def _session(seed: int) -> TrainingSession:
    """A fresh session: nothing cached from another run."""
    return TrainingSession(
        _tiny_task(), _model, TrainConfig(epochs=2, batch_size=32, lr=0.01),
        device=torch.device("cpu"), seed=seed,
    )


def _strategy(name: str) -> Strategy:
    return create_strategy(name, StrategySettings(expansion=EXPANSION))


def _assert_same_training(a: TrainResult, b: TrainResult, name: str) -> None:
    """Bit for bit: accuracies, learning curve, extras (wall times aside) and the weights."""
    assert (a.test_accuracy, a.val_accuracy) == (b.test_accuracy, b.val_accuracy)
    assert [r.train_loss for r in a.curve] == [r.train_loss for r in b.curve]
    assert {k: v for k, v in a.extra.items() if "wall_time" not in k} == {
        k: v for k, v in b.extra.items() if "wall_time" not in k
    }
    assert a.model is not None and b.model is not None
    first, second = a.model.state_dict(), b.model.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), f"{name}: {key} differs between runs"


@pytest.mark.parametrize("name", list(discover()))
def test_strategy_contract(name: str) -> None:
    strategy = _strategy(name)
    session = _session(seed=7)
    result = strategy.fit(session)

    # It trained, its loss stayed finite, and it learned (chance is 1/3; every strategy gets 0.67
    # or more).
    assert result.strategy == name
    assert result.diverged_at_step is None
    assert all(math.isfinite(record.train_loss) for record in result.curve)
    assert result.test_accuracy > 0.5

    # The deployable model: ordinary, the declared size, and the accuracy reported is its own.
    model = result.model
    assert model is not None
    assert not is_expanded(model)
    multiple = strategy.inference_params_multiple
    assert result.inference_params == count_parameters(model)
    # A size no whole multiple gives (wide's e-times-wider layers) is declared exactly instead.
    exact = getattr(strategy, "expected_inference_params", None)
    declared = exact(_model()) if exact else multiple * count_parameters(_model())
    assert result.inference_params == declared
    assert session.evaluate(model, "test") == result.test_accuracy
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(4, INPUTS))).all()

    # The same seed gives the same result, bit for bit, with a fresh instance.
    _assert_same_training(result, _strategy(name).fit(_session(seed=7)), name)


@pytest.mark.parametrize("name", list(discover()))
def test_a_strategy_instance_carries_no_state_from_one_run_to_the_next(name: str) -> None:
    strategy = _strategy(name)
    attributes = dict(vars(strategy))
    snapshot = repr(attributes)  # catches a value changed in place, too

    first = strategy.fit(_session(seed=7))
    assert vars(strategy) == attributes and repr(vars(strategy)) == snapshot
    other = strategy.fit(_session(seed=8))
    again = strategy.fit(_session(seed=7))
    assert vars(strategy) == attributes and repr(vars(strategy)) == snapshot

    # Trained again after another run, the instance gives what a fresh one gives (its first run).
    _assert_same_training(first, again, name)
    assert first.model is not None and other.model is not None
    assert any(
        not torch.equal(a, b)
        for a, b in zip(first.model.state_dict().values(), other.model.state_dict().values(),
                        strict=True)
    ), f"{name}: seeds 7 and 8 trained alike; the test would not see state carried over"
