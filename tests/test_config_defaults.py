"""Every default and check of `compare` and `bench` lives once, in the configuration dataclasses.

The CLI reads its defaults and help from ``ComparePlan``, ``TrainConfig``, ``Execution`` and
``BenchConfig``; the numeric checks go through ``sopkit.checks``. These tests hold the CLI to the
dataclasses, so that a default changed in one place changes everywhere.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import typer.main
from torch import nn
from typer.testing import CliRunner

from sopkit.bench.config import BenchConfig
from sopkit.checks import DEFAULT_EXPANSION, check_expansion, check_float, check_int, default_of
from sopkit.cli import app
from sopkit.errors import UserError
from sopkit.experiment.plan import ComparePlan, Execution, build_plan
from sopkit.mk import expand, sample_dirichlet
from sopkit.training.config import TrainConfig
from sopkit.training.settings import StrategySettings

COMMAND = typer.main.get_command(app)


def _cli_default(command: str, option: str) -> object:
    for param in COMMAND.commands[command].params:
        if option in getattr(param, "opts", ()):
            return param.default
    raise KeyError(option)


@pytest.mark.parametrize(
    "option,field,first_release",
    [
        ("--model", "model", "mlp-a3"),
        ("--num-classes", "num_classes", 10),
        ("--batch-size", "batch_size", 256),
        ("--expansion", "expansion", 3),
        ("--device", "device", "auto"),
        ("--repeats", "repeats", 10),
        ("--steps", "steps", 10),
        ("--warmup", "warmup", 5),
        ("--optimizer", "optimizer", "adam"),
        ("--mk-sampler", "mk_sampler", "auto"),
        ("--mk-backward", "mk_backward", "auto"),
        ("--bf16", "bf16", False),
    ],
)
def test_bench_flags_default_to_the_bench_config(option, field, first_release):
    """The CLI's default is the config's, and both are still the first release's value."""
    assert _cli_default("bench", option) == default_of(BenchConfig, field) == first_release


def test_bench_input_shape_flag_defaults_to_the_config_shape():
    assert _cli_default("bench", "--input-shape") == ",".join(
        map(str, default_of(BenchConfig, "input_shape"))
    )


def test_compare_flags_without_a_value_take_the_plan_and_train_defaults():
    plan = build_plan()
    # The first release's defaults, now read from the dataclasses.
    assert plan.dataset == default_of(ComparePlan, "dataset") == "mnist1d"
    assert plan.models == default_of(ComparePlan, "models") == ("mlp-a2",)
    assert plan.strategies == default_of(ComparePlan, "strategies") == ("baseline", "mk")
    assert plan.seeds == default_of(ComparePlan, "seeds") == (0, 1, 2)
    assert plan.expansion == DEFAULT_EXPANSION == default_of(BenchConfig, "expansion") == 3
    assert plan.optimizers == (default_of(TrainConfig, "optimizer"),) == ("adam",)
    assert plan.train["epochs"] == 200  # mnist1d's own default
    expected = {"batch_size": 256, "weight_decay": 0.0, "schedule": "constant", "bf16": False}
    for name, value in expected.items():
        assert plan.train[name] == default_of(TrainConfig, name) == value, name
    assert _cli_default("compare", "--jobs") == default_of(Execution, "jobs")
    assert _cli_default("compare", "--threads") == default_of(Execution, "threads")
    assert _cli_default("compare", "--device") == default_of(ComparePlan, "device")


def test_a_default_changed_in_the_dataclass_reaches_the_plan(monkeypatch):
    """One home: build_plan has no copy of the defaults of its own."""
    seeds = next(f for f in dataclasses.fields(ComparePlan) if f.name == "seeds")
    batch = next(f for f in dataclasses.fields(TrainConfig) if f.name == "batch_size")
    monkeypatch.setattr(seeds, "default", (0, 1, 2, 3, 4))
    monkeypatch.setattr(batch, "default", 64)
    plan = build_plan()
    assert plan.seeds == (0, 1, 2, 3, 4)
    assert plan.train["batch_size"] == 64


def test_compare_help_shows_the_defaults_from_the_dataclasses():
    result = CliRunner().invoke(app, ["compare", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    for text in ("[default: mnist1d]", "[default: mlp-a2]", "[default: baseline,mk]",
                 "[default: 3]", "[default: 256]", "[default: adam]",
                 "[default: 0.001 for adam, 0.025 for sgd]"):
        assert text in result.output, text


@pytest.mark.parametrize(
    "build",
    [
        lambda: ComparePlan(expansion=1),
        lambda: BenchConfig(expansion=1),
        lambda: StrategySettings(expansion=1),
        lambda: check_expansion(1),
        lambda: check_expansion(True),
        lambda: expand(nn.Linear(2, 2), expansion=1),
        lambda: sample_dirichlet(1, 4),
    ],
)
def test_the_expansion_is_checked_by_one_rule_everywhere(build):
    with pytest.raises(UserError, match=r"^(--)?expansion must be at least 2 \(an integer"):
        build()


@pytest.mark.parametrize(
    "value", [0, -1, 2**63, 2**64, True, 1.5, "3", None, math.nan]
)
def test_integer_flags_reject_what_is_not_a_positive_63_bit_integer(value):
    with pytest.raises(UserError, match="--epochs must be a positive integer"):
        check_int("--epochs", value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1e-9, True, "0.1"])
def test_float_flags_reject_non_finite_and_negative_values(value):
    with pytest.raises(UserError, match="--weight-decay must be a number of at least 0"):
        check_float("--weight-decay", value)


@pytest.mark.parametrize(
    "config,message",
    [
        (dict(epochs=2**64), "--epochs must be a positive integer at most"),
        (dict(lr=math.inf), "--lr must be a positive number"),
        (dict(lr=0.0), "--lr must be a positive number"),
        (dict(weight_decay=math.nan), "--weight-decay must be"),
        (dict(batch_size=True), "--batch-size must be a positive integer"),
        (dict(momentum=1.5), "momentum must be a number of at least 0 and at most 1"),
    ],
)
def test_train_config_refuses_edge_values(config, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**config)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--seeds", str(2**64)], "--seeds must be a positive integer at most"),
        (["--first-seed", str(2**63 - 1), "--seeds", "2"], "--first-seed must be"),
        (["--first-seed", "-1"], "--first-seed must be at least 0"),
        (["--seeds", str(10**6)], "--seeds must be a positive integer at most 100000"),
        (["--jobs", "0"], "--jobs must be a positive integer"),
        (["--threads", "-2"], "--threads must be a positive integer"),
        (["--lr", "nan"], "--lr must be a positive number"),
        (["--weight-decay", "inf"], "--weight-decay must be"),
        (["--lr-grid", "inf"], "--lr-grid 'inf': learning rates must be positive finite"),
        (["--lr-grid", "paper:-1000000..1000000"], "exponents must be within -100..100"),
        (["--strategies="], "--strategies is empty"),
        (["--model="], "--model is empty"),
        (["--optimizer="], "--optimizer is empty"),
        (["--preset="], "Unknown preset ''"),
    ],
)
def test_compare_edge_values_exit_2_with_a_message(args, message, tmp_path):
    result = CliRunner().invoke(
        app, ["compare", "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path), *args]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert isinstance(result.exception, SystemExit)  # an exit with a message, not a crash
