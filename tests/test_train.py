"""The shared training loop: determinism, the order it calls the hooks in, per-run state, required
trainings, schedules, divergence, timing, devices, and the package's import structure."""

from __future__ import annotations

import math
import typing

import pytest
import torch
from torch import nn

from sopkit.errors import UserError
from sopkit.mk import count_parameters, is_expanded
from sopkit.models import build_model
from sopkit.strategies import Baseline, BaselineLong, MajorityKernelsStrategy
from sopkit.training.config import TrainConfig
from sopkit.training.device import select_device
from sopkit.training.loop import TrainingSession
from sopkit.training.optim import make_optimizer, make_schedule
from sopkit.training.settings import StrategySettings
from sopkit.training.strategy import Requirement, Strategy
from sopkit.training.timing import StepTimer
from sopkit.training.types import RunContext


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
    assert [r.step for r in result.curve] == [8, 16, 24]  # 240 examples, batch 32: 8 steps
    assert result.curve[-1].train_loss < result.curve[0].train_loss
    assert result.train_params == result.inference_params == count_parameters(result.model)
    assert len(result.step_times) == 24 - TrainConfig().warmup_steps


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


# ---- the hooks: order, per-run state, reports, required trainings --------------------------------


class Recorder(Strategy):
    """Records every hook call and what the parameters' gradients were at it."""

    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.calls = calls

    def _grads(self, model: nn.Module) -> str:
        return "grad" if all(p.grad is not None for p in model.parameters()) else "none"

    def prepare(self, model, run):
        self.calls.append("prepare")
        return model

    def before_step(self, model, run):
        self.calls.append(f"before_step:{self._grads(model)}")

    def loss(self, model, inputs, targets, run):
        self.calls.append(f"loss:{self._grads(model)}")
        run.state.steps = getattr(run.state, "steps", 0) + 1  # a state shared by runs would add up
        return super().loss(model, inputs, targets, run)

    def after_backward(self, model, run):
        self.calls.append(f"after_backward:{self._grads(model)}")

    def after_step(self, model, run):
        self.calls.append("after_step")

    def evaluation_model(self, model, run):
        self.calls.append("evaluation_model")
        return model

    def deployable(self, model, run):
        self.calls.append("deployable")
        return model

    def report(self, model, run):
        self.calls.append("report")
        return {"steps": run.state.steps, "had_state": sorted(vars(run.state))}


def test_the_loop_calls_the_hooks_in_the_documented_order(tiny_data):
    calls: list[str] = []
    config = TrainConfig(epochs=2, batch_size=120)  # 240 examples: two steps an epoch
    result = session_for(tiny_data, config).train(Recorder(calls))
    # The previous step's gradients live until the loop's zero_grad, after loss and before
    # backward; the first step has none.
    first = ["before_step:none", "loss:none", "after_backward:grad", "after_step"]
    later = ["before_step:grad", "loss:grad", "after_backward:grad", "after_step"]
    epoch_two = [*later, *later, "evaluation_model"]
    assert calls == ["prepare", *first, *later, "evaluation_model", *epoch_two,
                     "deployable", "report"]
    # What report returns is the result's extra; the state was this run's alone.
    assert result.extra == {"steps": 4, "had_state": ["steps"]}


def test_every_run_gets_fresh_state_and_one_instance_trains_many_runs(tiny_data):
    calls: list[str] = []
    strategy = Recorder(calls)
    attributes = dict(vars(strategy))  # what __init__ set (settings, name, its own schedule, calls)
    session = session_for(tiny_data, TrainConfig(epochs=1, batch_size=120))
    first, second = session.train(strategy, seed=1), session.train(strategy, seed=2)
    assert first.extra == second.extra == {"steps": 2, "had_state": ["steps"]}
    assert vars(strategy) == attributes and "calls" in attributes


class Student(Strategy):
    """Requires two baseline trainings and reports what it was given (the results themselves, for
    identity checks, through ``given``: a report holds only plain values)."""

    given: typing.ClassVar[list[dict]] = []

    def requires(self, seed):
        return {"teacher": Requirement(Baseline(), seed + 100),
                "other": Requirement(Baseline(), seed, label="other")}

    def prepare(self, model, run):
        run.state.modes = [r.model.training for r in run.required.values()]
        Student.given.append(dict(run.required))
        return model

    def report(self, model, run):
        return {"required": list(run.required), "modes": run.state.modes}


def test_required_trainings_run_first_are_reused_and_are_inputs_in_eval_mode(tiny_data):
    session = session_for(tiny_data, TrainConfig(epochs=1, batch_size=60), seed=3)
    baseline = session.train(Baseline())
    Student.given.clear()
    result = session.train(Student())
    assert result.extra["required"] == ["teacher", "other"]
    (required,) = Student.given
    assert list(required) == ["teacher", "other"]
    assert required["other"] is baseline  # the same training, reused
    assert required["teacher"] is session.train(Baseline(), seed=103)  # trained first, and kept
    assert (required["teacher"].seed, required["teacher"].strategy) == (103, "baseline")
    assert result.extra["modes"] == [False, False]  # eval mode during the run ...
    assert baseline.model.training  # ... and back in the mode it had afterwards
    assert session.train(Student()) is result


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


# ---- optimizer, schedule, timing, config, device ---------------------------------------------------


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
    # Cosine to zero over 9 steps: a third of the way cos(pi/3) = 1/2 gives 3/4, two thirds 1/4,
    # and the curve is point-symmetric about the middle (step 4.5, value 1/2).
    cosine = lrs("cosine")
    assert cosine[0] == 1.0
    assert cosine[3] == pytest.approx(0.75) and cosine[6] == pytest.approx(0.25)
    assert [cosine[k] + cosine[9 - k] for k in range(1, 9)] == pytest.approx([1.0] * 8)


def test_optimizers_follow_the_config():
    model = nn.Linear(2, 2)
    adam = make_optimizer(model, TrainConfig(optimizer="adam"))
    sgd = make_optimizer(model, TrainConfig(optimizer="sgd", lr=0.1, momentum=0.8))
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == 1e-3
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["lr"] == 0.1 and sgd.param_groups[0]["momentum"] == 0.8
    assert TrainConfig(optimizer="sgd").learning_rate == 0.025  # the paper's SGD grid centre


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


# ---- the package: types apart, no cycle, resolvable hints, permanent aliases ---------------------


def test_the_types_module_imports_neither_the_loop_nor_the_strategy_module():
    import ast
    from pathlib import Path

    import sopkit.training.types as types_module

    tree = ast.parse(Path(types_module.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for a in node.names}
    assert not imported & {"sopkit.training.loop", "sopkit.training.strategy", "sopkit.train",
                           "sopkit.strategy", "sopkit.training"}


@pytest.mark.parametrize(
    "hook", [name for name in vars(Strategy) if callable(getattr(Strategy, name))
             and not name.startswith("_")],
)
def test_every_hook_and_type_resolves_its_annotations(hook):
    hints = typing.get_type_hints(getattr(Strategy, hook))
    assert "return" in hints
    assert typing.get_type_hints(RunContext)["required"] is not None
    assert typing.get_type_hints(Requirement)["strategy"] is Strategy


def test_the_first_round_import_paths_stay_and_are_the_same_objects():
    import sopkit
    import sopkit.strategy
    import sopkit.train
    import sopkit.training.loop
    import sopkit.training.types

    assert sopkit.strategy.Strategy is sopkit.Strategy is Strategy
    assert sopkit.strategy.StrategySettings is sopkit.StrategySettings is StrategySettings
    assert sopkit.train.RunContext is sopkit.RunContext is RunContext
    assert sopkit.train.TrainResult is sopkit.TrainResult is sopkit.training.types.TrainResult
    assert sopkit.train.TrainingSession is sopkit.training.loop.TrainingSession
    assert sopkit.EpochRecord is sopkit.training.types.EpochRecord
