"""Training recipes of the one loop: learning-rate drops at epochs, warm-up, label smoothing, weight
decay; strategies on schedules of their own; what a trial records and keys of them; and the CLI's
answer to bad values."""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from sopkit.cli import app
from sopkit.errors import UserError
from sopkit.experiment.plan import build_plan
from sopkit.experiment.records import TRIAL_KEY_TRAIN_FIELDS as V1_TRAIN_FIELDS
from sopkit.experiment.records import TrialSpec
from sopkit.experiment.results import _group_key
from sopkit.experiment.store import DATABASE_NAME, TrialStore
from sopkit.registry import create_strategy, discover
from sopkit.strategies import Baseline, BaselineLong, MajorityKernelsStrategy
from sopkit.training.config import TrainConfig, parse_milestones, reschedule
from sopkit.training.loop import TrainingSession
from sopkit.training.optim import make_schedule
from sopkit.training.settings import StrategySettings
from sopkit.training.strategy import Strategy
from sopkit.training.types import RunContext

LN2 = math.log(2)


def rates(config: TrainConfig, steps_per_epoch: int) -> list[float]:
    """The learning rate of every step of a training with ``config`` (base rate 1)."""
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    total = steps_per_epoch * config.epochs
    schedule = make_schedule(optimizer, config, total)
    values = []
    for _ in range(total):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return values


# ---- the learning rate at every step -------------------------------------------------------------


def test_milestones_drop_the_rate_exactly_at_the_first_step_of_their_epochs():
    config = TrainConfig(epochs=6, milestones=(2, 4), lr_decay=0.5)
    assert config.schedule == "step"  # milestones make the schedule a step schedule
    assert rates(config, steps_per_epoch=3) == [1.0] * 6 + [0.5] * 6 + [0.25] * 6


def test_the_step_schedule_without_milestones_drops_by_lr_decay_at_thirds():
    assert rates(TrainConfig(epochs=3, schedule="step", lr_decay=0.5), 3) == [
        1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25
    ]


def test_warm_up_ramps_linearly_then_the_schedule_runs():
    constant = rates(TrainConfig(epochs=3, lr_warmup_epochs=2), steps_per_epoch=4)
    assert constant == [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, 1.0, 1.0, 1.0, 1.0]
    # Warm-up and drops multiply: the drop at epoch 1 lands inside a 2-epoch warm-up.
    stepped = rates(TrainConfig(epochs=3, lr_warmup_epochs=2, milestones=(1,)), steps_per_epoch=2)
    assert stepped == pytest.approx([0.25, 0.5, 0.075, 0.1, 0.1, 0.1], rel=1e-12)


def test_cosine_starts_after_the_warm_up():
    values = rates(TrainConfig(epochs=4, lr_warmup_epochs=2, schedule="cosine"), steps_per_epoch=4)
    assert values[:8] == [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
    # From 1 at step 8 to 0 at step 16: cos(pi/4) at step 10, half at step 12.
    assert values[8] == 1.0
    assert values[10] == pytest.approx(0.5 * (1 + math.sqrt(0.5)))
    assert values[12] == pytest.approx(0.5)


class RateRecorder(Strategy):
    """Records the learning rate every step of the real loop trains with."""

    def before_step(self, model, run):
        run.state.rates = [*getattr(run.state, "rates", []), run.optimizer.param_groups[0]["lr"]]

    def report(self, model, run):
        return {"rates": run.state.rates}


def test_the_loop_drops_the_rate_at_epoch_boundaries(tiny_data):
    # 240 examples in batches of 32: 8 steps per epoch, the last one of 16 examples.
    config = TrainConfig(epochs=3, batch_size=32, optimizer="sgd", lr=0.5, milestones=(1, 2),
                         lr_decay=0.1, lr_warmup_epochs=1)
    session = TrainingSession(
        tiny_data, lambda: nn.Linear(12, 4), config, device=torch.device("cpu")
    )
    recorded = session.train(RateRecorder()).extra["rates"]
    expected = [0.5 * k / 8 for k in range(1, 9)] + [0.05] * 8 + [0.005] * 8
    assert recorded == pytest.approx(expected, rel=1e-12)


# ---- label smoothing ------------------------------------------------------------------------------


class FixedLogits(nn.Module):
    """Logits whose softmax is (1/2, 1/4, 1/4) for every input."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.log(torch.tensor([[0.5, 0.25, 0.25]])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


def _run(tiny_data, config: TrainConfig) -> RunContext:
    return RunContext(0, config, torch.device("cpu"), tiny_data, torch.Generator(), 1)


def test_label_smoothing_changes_the_loss_by_the_known_amount(tiny_data):
    # Target 0: cross-entropy -log(1/2) = ln 2. Smoothing 0.3 trains on 0.7 * ln 2 plus 0.3 times
    # the mean of -log p over the classes, (ln 2 + ln 4 + ln 4) / 3 = 5/3 ln 2: 1.2 ln 2 in all.
    x, y = torch.zeros(2, 12), torch.zeros(2, dtype=torch.long)
    plain = Baseline().loss(FixedLogits(), x, y, _run(tiny_data, TrainConfig()))
    smoothed = Baseline().loss(
        FixedLogits(), x, y, _run(tiny_data, TrainConfig(label_smoothing=0.3))
    )
    assert plain.item() == pytest.approx(LN2)
    assert smoothed.item() == pytest.approx(1.2 * LN2)


def test_distillation_smooths_its_hard_term_only():
    from sopkit_baselines.distill import kd_loss

    student = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    target = torch.zeros(1, dtype=torch.long)
    hard = kd_loss(student, student, target, temperature=1.0, alpha=0.0, label_smoothing=0.3)
    soft = kd_loss(student, student, target, temperature=1.0, alpha=1.0, label_smoothing=0.3)
    assert hard.item() == pytest.approx(1.2 * LN2)
    assert soft.item() == pytest.approx(0.0, abs=1e-7)  # KL of a distribution to itself


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(discover()))
def test_label_smoothing_reaches_every_strategys_cross_entropy(name, tiny_data, monkeypatch):
    """Every cross-entropy a strategy's training computes is smoothed as configured: the losses
    each strategy computes itself (adv-mk's two, distill's hard term) included."""
    seen: list[float] = []
    original = torch.nn.functional.cross_entropy

    def spy(*args, **kwargs):
        seen.append(kwargs.get("label_smoothing", 0.0))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", spy)
    data = tiny_data

    def build() -> nn.Module:
        from sopkit.models import build_model

        return build_model("mlp-a1", input_shape=data.input_shape, num_classes=data.num_classes)

    config = TrainConfig(epochs=1, batch_size=120, label_smoothing=0.25)
    session = TrainingSession(data, build, config, device=torch.device("cpu"))
    create_strategy(name, StrategySettings()).fit(session)
    assert seen and set(seen) == {0.25}


# ---- strategies on their own schedule --------------------------------------------------------------


def settings(**options: str) -> StrategySettings:
    return StrategySettings(options=options)


PAPER = TrainConfig(epochs=90, milestones=(30, 60), optimizer="sgd", lr=0.1)


def test_a_strategy_trains_on_its_own_epochs_and_milestones():
    mk = create_strategy("mk", settings(**{"mk.epochs": "330", "mk.milestones": "90,180,240"}))
    own = mk.schedule(PAPER)
    assert (own.epochs, own.milestones, own.schedule) == (330, (90, 180, 240), "step")
    assert replace(own, epochs=90, milestones=(30, 60)) == PAPER  # nothing else changed
    # The option is scoped: baseline keeps the comparison's schedule.
    assert create_strategy("baseline", mk.settings).schedule(PAPER) == PAPER


def test_own_epochs_stretch_the_comparisons_milestones():
    mk = create_strategy("mk", settings(**{"mk.epochs": "330"}))
    assert mk.schedule(PAPER).milestones == (110, 220)
    long = create_strategy("baseline-long", settings())  # long_factor 3
    assert (long.schedule(PAPER).epochs, long.schedule(PAPER).milestones) == (270, (90, 180))
    # The baseline-long of the first release: three times the epochs, nothing else.
    assert long.schedule(TrainConfig(epochs=7)) == TrainConfig(epochs=21)


def test_baseline_long_takes_its_own_schedule_and_its_students_and_members_follow():
    options = {"baseline-long.epochs": "330", "baseline-long.milestones": "90,180,240",
               "distill.member": "baseline-long", "ensemble.member": "baseline-long"}
    long = create_strategy("baseline-long", settings(**options)).schedule(PAPER)
    assert (long.epochs, long.milestones) == (330, (90, 180, 240))
    assert create_strategy("distill", settings(**options)).schedule(PAPER) == long
    from sopkit_baselines.ensemble import member_requirements

    members = member_requirements(settings(**options), "baseline-long", seed=0).values()
    assert [m.strategy.schedule(PAPER) for m in members] == [long] * 3
    # The student may still take a schedule of its own.
    own = create_strategy("distill", settings(**options, **{"distill.epochs": "100"}))
    assert own.schedule(PAPER).epochs == 100


def test_drops_that_no_longer_fit_are_left_out():
    # 30/60 of 90 on 2 epochs: 0.67 and 1.33 both round to 1.
    assert reschedule(PAPER, epochs=2).milestones == (1,)
    gone = reschedule(PAPER, epochs=1)
    assert (gone.milestones, gone.schedule) == ((), "constant")
    assert reschedule(PAPER, milestones=()).schedule == "constant"


@pytest.mark.parametrize(
    "options,config,message",
    [
        ({"mk.milestones": "60,30"}, PAPER, "Option mk.milestones='60,30' is not valid: "
                                            "milestones must be increasing"),
        ({"mk.milestones": "0"}, PAPER, "milestones must be positive integers"),
        ({"mk.epochs": "0"}, PAPER, "Option mk.epochs must be a positive integer"),
        ({"mk.epochs": "100", "mk.milestones": "100"}, PAPER,
         "less than mk's epochs (100)"),
        ({"mk.milestones": "95"}, PAPER, "Option mk.milestones 95: every milestone must be "
                                         "less than --epochs (90)"),
        ({"mk.milestones": "5"}, TrainConfig(epochs=9, schedule="cosine"),
         "Option mk.milestones cannot be combined with --schedule cosine"),
        ({"baseline-long.long_factor": "0"}, PAPER, "long_factor must be a positive number"),
        ({"baseline-long.long_factor": "2", "baseline-long.epochs": "3"}, PAPER, "give one"),
    ],
)
def test_bad_own_schedules_are_user_errors_naming_the_option(options, config, message):
    name = next(iter(options)).split(".")[0]
    with pytest.raises(UserError) as error:
        create_strategy(name, settings(**options)).schedule(config)
    assert message in str(error.value)


def test_a_strategy_trained_on_its_own_schedule_runs_that_many_epochs(tiny_data):
    config = TrainConfig(epochs=2, batch_size=60, milestones=(1,))
    mk = MajorityKernelsStrategy(
        StrategySettings(options={"mk.epochs": "4", "mk.milestones": "1,3"}).for_strategy("mk")
    )
    session = TrainingSession(
        tiny_data, lambda: nn.Linear(12, 4), config, device=torch.device("cpu")
    )
    result = session.train(mk)
    assert (result.config.epochs, result.config.milestones) == (4, (1, 3))
    assert [point.step for point in result.curve] == [4, 8, 12, 16]
    assert session.train(BaselineLong()).config.milestones == (3,)  # 1 of 2 stretched to 6 epochs


# ---- what a trial records and how it is keyed --------------------------------------------------------


RECIPE = ["--milestones", "2", "--lr-decay", "0.5", "--warmup-epochs", "1",
          "--label-smoothing", "0.1", "--weight-decay", "0.0001"]


def compare(tmp_path: Path, *args: str):
    return CliRunner().invoke(app, [
        "compare", "--dataset", "digits", "--model", "mlp-a1", "--seeds", "1", "--epochs", "3",
        "--optimizer", "sgd", "--device", "cpu", "--out", str(tmp_path / "out"), *args,
    ])


def test_a_trial_stores_its_recipe_and_its_own_schedule(tmp_path):
    result = compare(tmp_path, "--strategies", "baseline,baseline-long", *RECIPE)
    assert result.exit_code == 0, result.output
    trials = {t.spec.strategy: t for t in TrialStore(tmp_path / "out" / DATABASE_NAME).trials()}
    recipe = {"milestones": [2], "lr_decay": 0.5, "lr_warmup_epochs": 1, "label_smoothing": 0.1,
              "weight_decay": 0.0001, "schedule": "step", "epochs": 3}
    baseline, long = trials["baseline"], trials["baseline-long"]
    assert {k: baseline.config[k] for k in recipe} == recipe
    assert {k: baseline.spec.train[k] for k in recipe} == recipe
    # baseline-long trains 9 epochs with the drop stretched from 2 of 3 to 6 of 9.
    assert {k: long.config[k] for k in recipe} == {**recipe, "epochs": 9, "milestones": [6]}
    # The recipe is part of the trial's identity: the same trial without it is another trial.
    plain = replace(baseline.spec, train={**baseline.spec.train, "milestones": []})
    assert plain.key != baseline.key
    flat = json.loads((tmp_path / "out" / "trials.jsonl").read_text().splitlines()[0])
    assert flat["config"]["label_smoothing"] == 0.1
    # The reports name the recipe with the group's configuration.
    assert "step schedule, x0.5 at epochs 2, warm-up 1 epoch, label smoothing 0.1, weight decay " \
        "0.0001" in (tmp_path / "out" / "report.md").read_text()


def test_recipe_fields_at_their_defaults_stay_out_of_the_trial_key():
    plan = build_plan(dataset="digits", models=["mlp-a1"], seeds=1, epochs=2)
    spec = plan.jobs()[0].specs[0]
    identity = spec.identity()["train"]
    assert not {"milestones", "lr_decay", "lr_warmup_epochs", "label_smoothing"} & set(identity)
    # As stored and read back (the tuple default comes back from JSON as a list), the trial keeps
    # its key and its group, so a resumed old store does not split its groups in two.
    stored = TrialSpec.from_dict(json.loads(json.dumps(spec.as_dict())))
    assert stored.train["milestones"] == []
    assert stored.key == spec.key and stored.identity() == spec.identity()
    away = build_plan(dataset="digits", models=["mlp-a1"], seeds=1, epochs=2, milestones="1")
    assert away.jobs()[0].specs[0].identity()["train"]["milestones"] == (1,)


def test_the_stored_v1_keys_are_unchanged():
    """tests/data/store-v1 was written before any recipe field existed: its keys still match."""
    from test_store import STORE_V1, plan_keys, v1_plan

    database = STORE_V1 / DATABASE_NAME
    # immutable: read without creating -wal/-shm files beside the committed fixture
    with sqlite3.connect(f"file:{database}?immutable=1", uri=True) as connection:
        stored = {row[0] for row in connection.execute("SELECT key FROM trials")}
    assert set(plan_keys(v1_plan())) == stored
    # And a trial of a later store, read back with its recipe at the defaults, groups with them.
    fresh = v1_plan().jobs()[0].specs[0]
    reread = TrialSpec.from_dict(json.loads(json.dumps(fresh.as_dict())))
    assert reread.identity() == fresh.identity()

    old = replace(fresh, train={k: v for k, v in fresh.train.items() if k in V1_TRAIN_FIELDS})
    assert _group_key(SimpleNamespace(spec=reread)) == _group_key(SimpleNamespace(spec=old))


def test_parse_milestones():
    assert parse_milestones("30,60,80") == (30, 60, 80)
    assert parse_milestones(" none ") == parse_milestones("") == ()
    for bad in ("60,30", "30,30", "0", "-5", "a", "1.5"):
        with pytest.raises(ValueError):
            parse_milestones(bad)


# ---- bad values through the CLI -------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["--milestones", "60,30"], "--milestones '60,30' is not valid: milestones must be "
                                    "increasing"),
        (["--milestones", "0"], "--milestones '0' is not valid: milestones must be positive"),
        (["--milestones", "thirty"], "--milestones 'thirty' is not valid"),
        (["--milestones", "3"], "--milestones 3: every milestone must be less than --epochs (3)"),
        (["--milestones", "1", "--schedule", "cosine"], "--milestones cannot be combined with "
                                                        "--schedule cosine"),
        (["--label-smoothing", "1"], "--label-smoothing must be a number of at least 0 and less "
                                     "than 1, got 1.0"),
        (["--label-smoothing", "-0.1"], "--label-smoothing must be"),
        (["--lr-decay", "nan"], "--lr-decay must be a positive number and at most 1, got nan"),
        (["--lr-decay", "0"], "--lr-decay must be a positive number"),
        (["--warmup-epochs", "3"], "--warmup-epochs must be less than --epochs (3), got 3"),
        (["--warmup-epochs", "-1"], "--warmup-epochs must be at least 0"),
        (["--set", "mk.milestones=5"], "Option mk.milestones 5: every milestone must be less "
                                       "than --epochs (3)"),
        (["--set", "mk.milestones=2,1"], "Option mk.milestones='2,1' is not valid"),
        (["--set", "ensemble.epochs=5", "--strategies", "baseline,ensemble"],
         "the ensemble strategy has no option 'epochs'"),
    ],
)
def test_bad_recipe_values_exit_2_naming_the_flag(args, message, tmp_path):
    result = compare(tmp_path, *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert isinstance(result.exception, SystemExit)  # an exit with a message, not a crash
    assert not (tmp_path / "out" / DATABASE_NAME).exists()  # refused before anything ran


def test_the_recipe_is_in_the_train_config_dict():
    """What the store keeps of a training is ``asdict(TrainConfig)``: the recipe is in it."""
    config = asdict(TrainConfig(epochs=5, milestones=[2, 4], label_smoothing=0, lr_decay=1))
    assert config["milestones"] == (2, 4) and config["schedule"] == "step"
    assert isinstance(config["label_smoothing"], float) and isinstance(config["lr_decay"], float)
