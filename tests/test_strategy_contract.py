"""The contract every registered strategy meets, sopkit's own and every plugin's alike.

One test per strategy found in the ``sopkit.strategies`` entry-point group, on a tiny in-memory task:
it trains; its loss stays finite; it ends with a deployable model that carries no majority kernels,
whose parameter count is the baseline's times what the strategy declares
(``inference_params_multiple``, 1 unless declared: ``e`` for an ensemble) and whose accuracy is the
one reported; and the same seed gives the same result, bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch

from sopkit.data import DataSplits, TensorSplit
from sopkit.majority import count_parameters, is_expanded
from sopkit.models import mlp
from sopkit.registry import create_strategy, discover
from sopkit.strategy import StrategySettings
from sopkit.train import TrainConfig, TrainingSession, TrainResult

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


def _train(name: str, seed: int) -> tuple[TrainResult, object]:
    """One comparison's worth of ``name`` in a fresh session (nothing cached from another run)."""
    strategy = create_strategy(name, StrategySettings(expansion=EXPANSION))
    session = TrainingSession(
        _tiny_task(), _model, TrainConfig(epochs=2, batch_size=32, lr=0.01),
        device=torch.device("cpu"), seed=seed,
    )
    return strategy.fit(session), (strategy, session)


@pytest.mark.parametrize("name", list(discover()))
def test_strategy_contract(name: str) -> None:
    result, (strategy, session) = _train(name, seed=7)

    # It trained, and its loss stayed finite.
    assert result.strategy == name
    assert result.diverged_at_step is None
    assert all(math.isfinite(record.train_loss) for record in result.curve)
    assert 0.0 <= result.test_accuracy <= 1.0

    # The deployable model: ordinary, the declared size, and the accuracy reported is its own.
    model = result.model
    assert model is not None
    assert not is_expanded(model)
    multiple = strategy.inference_params_multiple
    assert result.inference_params == count_parameters(model)
    assert result.inference_params == multiple * count_parameters(_model())
    assert session.evaluate(model, "test") == result.test_accuracy  # type: ignore[attr-defined]
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(4, INPUTS))).all()

    # The same seed gives the same result, bit for bit.
    again, _ = _train(name, seed=7)
    assert again.test_accuracy == result.test_accuracy
    assert again.model is not None
    first, second = model.state_dict(), again.model.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), f"{name}: {key} differs between runs"
