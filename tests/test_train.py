"""The shared training loop: determinism, schedules, divergence, timing, devices."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sopkit.errors import UserError
from sopkit.majority import count_parameters, is_expanded
from sopkit.models import build_model
from sopkit.strategies import Baseline, BaselineLong, MajorityKernelsStrategy
from sopkit.strategy import Strategy, StrategySettings
from sopkit.train import (
    StepTimer,
    TrainConfig,
    TrainingSession,
    make_optimizer,
    make_schedule,
    select_device,
)


def session_for(data, config: TrainConfig | None = None, seed: int = 0, device: str = "cpu"):
    def build() -> nn.Module:
        return build_model("mlp-a1", input_shape=data.input_shape, num_classes=data.num_classes)

    return TrainingSession(
        data.to(device),
        build,
        config or TrainConfig(epochs=3, batch_size=32),
        device=torch.device(device),
        seed=seed,
    )


def test_baseline_learns_the_tiny_task(tiny_data):
    result = session_for(tiny_data).train(Baseline())
    assert result.test_accuracy > 0.8
    assert len(result.curve) == 3
    assert result.curve[-1].train_loss < result.curve[0].train_loss
    assert result.train_params == result.inference_params == count_parameters(result.model)


def test_same_seed_gives_identical_results_and_another_seed_does_not(tiny_data):
    a = session_for(tiny_data, seed=7).train(MajorityKernelsStrategy())
    b = session_for(tiny_data, seed=7).train(MajorityKernelsStrategy())
    c = session_for(tiny_data, seed=8).train(MajorityKernelsStrategy())
    assert [r.train_loss for r in a.curve] == [r.train_loss for r in b.curve]
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert [r.train_loss for r in a.curve] != [r.train_loss for r in c.curve]


def test_majority_kernels_train_expanded_and_ship_the_collapsed_model(tiny_data):
    baseline = session_for(tiny_data).train(Baseline())
    mk = session_for(tiny_data).train(MajorityKernelsStrategy(StrategySettings(expansion=3)))
    assert not is_expanded(mk.model)
    assert mk.inference_params == baseline.inference_params
    weights = sum(m.weight.numel() for m in mk.model.modules() if isinstance(m, nn.Linear))
    assert mk.train_params == baseline.train_params + 2 * weights
    assert mk.test_accuracy > 0.7


def test_session_reuses_a_finished_training(tiny_data):
    session = session_for(tiny_data)
    first = session.train(Baseline())
    assert session.train(Baseline()) is first
    assert session.train(Baseline(), seed=1) is not first


def test_baseline_long_trains_long_factor_times_the_epochs(tiny_data):
    settings = StrategySettings(options={"baseline-long.long_factor": "2"}).for_strategy(
        "baseline-long"
    )
    result = session_for(tiny_data).train(BaselineLong(settings))
    assert result.config.epochs == 6 and len(result.curve) == 6


class NaNAfter(Strategy):
    """Returns a non-finite loss from a given step on, as a too-high learning rate would."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.bad_step = step

    def loss(self, model, inputs, targets, run):
        loss = super().loss(model, inputs, targets, run)
        return loss * math.inf if run.step >= self.bad_step else loss


def test_divergence_is_recorded_with_its_step_and_stops_the_run(tiny_data):
    result = session_for(tiny_data, TrainConfig(epochs=5, batch_size=32)).train(NaNAfter(11))
    assert result.diverged_at_step == 11
    assert len(result.curve) == 2  # 8 steps per epoch: stopped at the end of the second epoch


def test_schedules():
    parameter = nn.Parameter(torch.zeros(1))

    def lrs(schedule: str) -> list[float]:
        optimizer = torch.optim.SGD([parameter], lr=1.0)
        scheduler = make_schedule(optimizer, TrainConfig(schedule=schedule), total_steps=9)
        values = []
        for _ in range(9):
            values.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return values

    assert lrs("constant") == [1.0] * 9
    assert lrs("step") == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01])
    cosine = lrs("cosine")
    assert cosine[0] == 1.0 and all(a > b for a, b in zip(cosine, cosine[1:], strict=False))


def test_optimizers_follow_the_config():
    model = nn.Linear(2, 2)
    adam = make_optimizer(model, TrainConfig(optimizer="adam"))
    sgd = make_optimizer(model, TrainConfig(optimizer="sgd", lr=0.1, momentum=0.8))
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == 1e-3
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["lr"] == 0.1 and sgd.param_groups[0]["momentum"] == 0.8


def test_step_timer_excludes_warmup_steps():
    timer = StepTimer(torch.device("cpu"), warmup_steps=3)
    for _ in range(10):
        timer.start()
        timer.stop()
    assert len(timer.seconds()) == 7


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"epochs": 0}, "--epochs"),
        ({"batch_size": -1}, "--batch-size"),
        ({"optimizer": "adamw"}, "Valid optimizers: adam, sgd"),
        ({"schedule": "linear"}, "Valid schedules"),
        ({"lr": -1.0}, "--lr"),
    ],
)
def test_bad_config_values_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**kwargs)


def test_device_selection():
    assert select_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else None
    if expected:
        assert select_device("auto").type == "cuda"
    with pytest.raises(UserError, match="Unknown device"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            select_device("cuda")


def test_bf16_outside_cuda_is_a_user_error(tiny_data):
    with pytest.raises(UserError, match="CUDA"):
        session_for(tiny_data, TrainConfig(epochs=1, bf16=True)).train(Baseline())


@pytest.mark.gpu
def test_cuda_training_with_bf16_autocast(tiny_data):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    config = TrainConfig(epochs=2, batch_size=32, bf16=True)
    result = session_for(tiny_data, config, device="cuda").train(MajorityKernelsStrategy())
    assert math.isfinite(result.curve[-1].train_loss)
    assert len(result.step_times) > 0 and all(t > 0 for t in result.step_times)
    assert next(result.model.parameters()).device.type == "cuda"
