"""The shipped presets: each parses and plans into the paper's protocol (strategies, every
strategy's epochs and milestones after its ``schedule()``, rate, weight decay), the preset format's
checks, ``--epochs`` scaling a preset, and the presets run end to end on tiny data in the real
formats."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_augment import _write_imagenet
from test_data_vision import _write_cifar10, skip_cifar_md5  # noqa: F401 (a fixture, used by name)
from typer.testing import CliRunner

from sopkit.cli import app
from sopkit.errors import UserError
from sopkit.experiment.plan import ComparePlan, build_plan
from sopkit.experiment.presets import load_preset, rescale_preset, shipped_presets
from sopkit.experiment.store import DATABASE_NAME, TrialStore
from sopkit.registry import create_strategy
from sopkit.training.config import TrainConfig
from sopkit.training.settings import StrategySettings

TABLE2 = ["baseline", "baseline-long", "mk", "adv-mk", "ensemble", "distill"]
LONG = ("baseline-long", "mk", "adv-mk", "distill")


def schedules(plan: ComparePlan) -> dict[str, tuple[int, tuple[int, ...]]]:
    """(epochs, milestones) every strategy of ``plan`` trains with, after its ``schedule()``; the
    ensemble's are its members'."""
    settings = StrategySettings(expansion=plan.expansion, options=dict(plan.options))
    base = plan.train_config(plan.optimizers[0], plan.lr)
    out = {}
    for name in plan.strategies:
        if name == "ensemble":
            from sopkit_baselines.ensemble import member_requirements

            kind = plan.options.get("ensemble.member", "baseline")
            members = member_requirements(settings, kind, seed=0).values()
            configs = {m.strategy.schedule(base) for m in members}
            assert len(members) == plan.expansion and len(configs) == 1
            config = configs.pop()
        else:
            config = create_strategy(name, settings).schedule(base)
        out[name] = (config.epochs, config.milestones)
    return out


def recipe(plan: ComparePlan) -> TrainConfig:
    (optimizer,) = plan.optimizers
    return plan.train_config(optimizer, plan.lr)


@pytest.mark.parametrize("name", sorted(shipped_presets()))
def test_every_shipped_preset_parses_and_plans(name):
    plan = build_plan(preset=name)
    assert plan.preset == name
    keys = [spec.key for job in plan.jobs() for spec in job.specs]
    assert keys and len(set(keys)) == len(keys)
    for optimizer in plan.optimizers:  # every strategy's own schedule is valid
        for strategy in plan.strategies:
            create_strategy(strategy, StrategySettings(plan.expansion, dict(plan.options))
                            ).schedule(plan.train_config(optimizer, None))


def test_paper_table2_is_the_papers_imagenet_protocol():
    plan = build_plan(preset="paper-table2")
    assert (plan.dataset, plan.models, plan.optimizers) == ("imagenet", ("resnet50",), ("sgd",))
    assert plan.strategies == tuple(TABLE2) and plan.expansion == 3
    config = recipe(plan)
    assert (config.learning_rate, config.batch_size, config.momentum) == (0.1, 256, 0.9)
    assert (config.weight_decay, config.lr_decay, config.augment) == (1e-4, 0.1, "standard")
    assert (config.lr_warmup_epochs, config.label_smoothing) == (0, 0.0)
    assert plan.lr_grid is None
    assert schedules(plan) == {
        "baseline": (90, (30, 60)),
        **{name: (330, (90, 180, 240)) for name in LONG},
        "ensemble": (330, (90, 180, 240)),  # three baseline-long models
    }


def test_cifar10_resnet18_is_the_same_comparison_scaled():
    plan = build_plan(preset="cifar10-resnet18")
    assert (plan.dataset, plan.models, plan.optimizers) == ("cifar10", ("resnet18",), ("sgd",))
    assert plan.strategies == tuple(TABLE2) and plan.expansion == 3
    config = recipe(plan)
    assert (config.learning_rate, config.batch_size, config.momentum) == (0.1, 256, 0.9)
    assert (config.weight_decay, config.augment) == (5e-4, "standard")
    assert schedules(plan) == {
        "baseline": (15, (5, 10)),
        **{name: (55, (15, 30, 40)) for name in LONG},
        "ensemble": (55, (15, 30, 40)),
    }
    assert "hour" in load_preset("cifar10-resnet18")["description"]


def test_epochs_scale_a_presets_counts_of_epochs_and_explicit_values_are_kept():
    short = build_plan(preset="paper-table2", epochs=9)
    assert schedules(short) == {
        "baseline": (9, (3, 6)),
        **{name: (33, (9, 18, 24)) for name in LONG},
        "ensemble": (33, (9, 18, 24)),
    }
    explicit = build_plan(preset="paper-table2", epochs=9, milestones="4",
                          options={"mk.epochs": "40"})
    assert schedules(explicit)["baseline"] == (9, (4,))
    assert schedules(explicit)["mk"] == (40, (9, 18, 24))  # the preset's drops, scaled; not 40
    too_short = build_plan(preset="paper-table2", epochs=9, options={"mk.epochs": "12"})
    with pytest.raises(UserError, match="Option mk.milestones 9,18,24: every milestone must be "
                                        r"less than mk's epochs \(12\)"):
        schedules(too_short)
    assert build_plan(preset="paper-table2", epochs=90).options == build_plan(
        preset="paper-table2").options


def test_rescaling_leaves_out_drops_that_no_longer_fit():
    preset = {"epochs": 90, "milestones": [30, 60], "warmup_epochs": 5,
              "options": {"mk.epochs": 330, "mk.milestones": [90, 180, 240], "mk.init": "replicate",
                          "milestones": "45"}}
    one = rescale_preset(preset, 1)
    assert one["epochs"] == 1 and one["milestones"] == [] and one["schedule"] == "constant"
    assert one["warmup_epochs"] == 0
    # 330/90 of an epoch is 4 epochs; 90/180/240 of 330 land on 1, 2 and 3 of them.
    assert one["options"] == {"mk.epochs": 4, "mk.milestones": [1, 2, 3], "mk.init": "replicate",
                              "milestones": []}
    assert rescale_preset(preset, 90) is preset
    assert rescale_preset({"milestones": [30]}, 9) == {"milestones": [30]}  # no epochs: no scale


def test_a_presets_single_rate_gives_way_to_an_explicit_grid():
    assert build_plan(preset="paper-table2").lr == 0.1
    grid = build_plan(preset="paper-table2", lr_grid="0.1,0.2")
    assert grid.lr is None and grid.learning_rates("sgd") == [0.1, 0.2]
    assert build_plan(preset="paper-table2", lr=0.05).lr == 0.05


@pytest.mark.parametrize(
    "text,message",
    [
        ('models = ["mlp-a1", 3]\n', "models must be a list of strings"),
        ("milestones = [30, 60.5]\n", "milestones must be a list of integers"),
        ('milestones = "30,60"\n', "milestones must be a list of integers"),
        ("epochs = true\n", "epochs must be an integer"),
        ('lr = "0.1"\n', "lr must be a finite number"),
        ("label_smoothing = [0.1]\n", "label_smoothing must be a finite number"),
        ("warmup_epochs = 1.5\n", "warmup_epochs must be an integer"),
        # A wrong option value is named by its key.
        ('[options]\n"mk.milestones" = [90.5]\n', "options.mk.milestones must be a string"),
        ('[options]\n"mk.init" = {a = 1}\n', "options.mk.init must be a string"),
        ('lr = 0.1\nlr_grid = "paper"\n', "gives both lr and lr_grid"),
        ("milestone = [30]\n", "unknown keys milestone"),
    ],
)
def test_preset_values_of_the_wrong_type_are_user_errors(text, message, tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_preset(str(path))


def test_a_presets_recipe_values_are_checked_like_the_flags(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('dataset = "digits"\nepochs = 10\nmilestones = [5, 12]\n')
    with pytest.raises(UserError, match="--milestones 5,12: every milestone must be less than"):
        build_plan(preset=str(path))


# ---- end to end on tiny data in the real formats -----------------------------------------------------


def run_preset(tmp_path: Path, *args: str) -> dict[str, object]:
    """The preset's trials, trained as the CLI trains them. What is pinned here is the protocol,
    so the ResNets' model files and checkpoints (tested elsewhere) are not written."""
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "compare", "--seeds", "1", "--device", "cpu", "--threads", "1", "--out", str(out),
        "--no-save-models", "--checkpoint-every", "off", *args,
    ])
    assert result.exit_code == 0, result.output
    return {t.spec.strategy: t for t in TrialStore(out / DATABASE_NAME).trials()}


@pytest.mark.slow
def test_cifar10_resnet18_runs_end_to_end_on_a_tiny_cifar10(tmp_path, skip_cifar_md5):  # noqa: F811
    _write_cifar10(tmp_path / "data")
    trials = run_preset(tmp_path, "--preset", "cifar10-resnet18", "--epochs", "1", "--threads", "2",
                        "--data-dir", str(tmp_path / "data"))
    assert sorted(trials) == sorted(TABLE2)
    # --epochs 1: the baseline trains 1 epoch with no drop left; the long schedule 55/15 of an
    # epoch, 4, dropping at 1, 2 and 3 (15/30/40 of 55).
    baseline = trials["baseline"]
    assert (baseline.config["epochs"], baseline.config["milestones"]) == (1, [])
    for name in ("baseline-long", "mk", "adv-mk", "ensemble", "distill"):
        trial = trials[name]
        assert (trial.config["epochs"], trial.config["milestones"]) == (4, [1, 2, 3]), name
        assert len(trial.curve) == (0 if name == "ensemble" else 4), name  # no curve of its own
        assert trial.config["augment"] == "standard" and trial.config["lr"] == 0.1
    assert trials["ensemble"].inference_params == 3 * baseline.inference_params
    assert trials["mk"].inference_params == baseline.inference_params


@pytest.mark.slow
def test_paper_table2_runs_end_to_end_on_a_tiny_imagenet_tree(tmp_path):
    """The preset as shipped (ResNet-50 on 224-pixel crops) on six training JPEGs: about two
    minutes on one CPU thread, most of it ResNet-50's."""
    root = _write_imagenet(tmp_path / "imagenet", train=2, val={"n01443537": 1, "n01484850": 1})
    trials = run_preset(tmp_path, "--preset", "paper-table2", "--epochs", "1", "--threads", "2",
                        "--data-dir", str(root), "--data-workers", "0")
    assert sorted(trials) == sorted(TABLE2)
    baseline = trials["baseline"]
    assert (baseline.spec.dataset, baseline.spec.model) == ("imagenet", "resnet50")
    # --epochs 1 of 90: no drop left for the baseline; 330/90 of an epoch, 4, for the long
    # schedule, dropping at 1, 2 and 3 (90/180/240 of 330).
    assert (baseline.config["epochs"], baseline.config["milestones"]) == (1, [])
    assert (baseline.config["weight_decay"], baseline.config["lr"]) == (1e-4, 0.1)
    for name in LONG:
        trial = trials[name]
        assert (trial.config["epochs"], trial.config["milestones"]) == (4, [1, 2, 3]), name
        assert len(trial.curve) == 4, name
    assert trials["ensemble"].extra["members"] == 3
    assert trials["ensemble"].inference_params == 3 * baseline.inference_params
