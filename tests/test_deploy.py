"""Keeping what was trained: every trial's deployable model saved beside its record, reloaded into a
freshly built plain architecture with ``strict=True`` at exactly the stored accuracy."""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import sopkit
from sopkit.checks import default_of
from sopkit.data import load_dataset
from sopkit.deploy.artifacts import AveragedEnsemble, load_trained, trial_artifact
from sopkit.deploy.layout import meta_path, read_meta, saved_keys, weights_path, write_model
from sopkit.errors import UserError
from sopkit.experiment.outcome import ModelArtifact, TrialOutcome
from sopkit.experiment.plan import ComparePlan, build_plan
from sopkit.experiment.records import TrialRecord
from sopkit.experiment.results import aggregate
from sopkit.experiment.runner import PlanRunner, run_plan
from sopkit.experiment.store import DATABASE_NAME, TrialStore
from sopkit.models import build_model
from sopkit.report.markdown import write_markdown
from sopkit.report.meta import ReportMeta
from sopkit.training.loop import evaluate
from sopkit.training.progress import NullProgress

# Two seeds, so that the best validation seed is a choice; the ensemble's members are baselines.
TINY = {"dataset": "digits", "models": ["mlp-a1"], "epochs": 1, "batch_size": 256, "seeds": 2,
        "strategies": ["baseline", "mk", "ensemble"]}


@dataclass(frozen=True)
class Compared:
    """One tiny comparison run twice: with models saved (the default) and without."""

    saved: Path
    unsaved: Path

    def trials(self, directory: Path | None = None) -> list[TrialRecord]:
        with TrialStore(Path(directory or self.saved) / DATABASE_NAME) as store:
            return store.trials()


_RUN: list[Compared] = []  # the session's comparison: test_export uses this fixture too


@pytest.fixture(scope="session")
def compared(tmp_path_factory: pytest.TempPathFactory) -> Compared:
    """The tiny comparison, trained once per session (pytest would run a fixture imported into
    another test module once per module; this module's cache is shared)."""
    if not _RUN:
        root = tmp_path_factory.mktemp("compared")
        run_plan(build_plan(**TINY), root / "saved", NullProgress())
        run_plan(build_plan(**TINY, save_models=False), root / "unsaved", NullProgress())
        _RUN.append(Compared(root / "saved", root / "unsaved"))
    return _RUN[0]


@pytest.fixture
def copy_of(compared: Compared, tmp_path: Path) -> Path:
    """A copy of the saved comparison that a test may damage."""
    return Path(shutil.copytree(compared.saved, tmp_path / "copy"))


def _accuracy(model: nn.Module, record: TrialRecord, split: str) -> float:
    data = load_dataset(record.spec.dataset)
    return evaluate(model, getattr(data, split), batch_size=record.spec.train["eval_batch_size"])


def test_every_trial_keeps_its_model_and_it_reloads_at_the_stored_accuracy(compared):
    trials = compared.trials()
    assert len(trials) == 6 and saved_keys(compared.saved) == {t.key for t in trials}
    for record in trials:
        model = load_trained(compared.saved, record.key)
        assert not model.training
        # Exactly the stored numbers, on the CPU, not merely close to them.
        assert _accuracy(model, record, "test") == record.test_accuracy, record.spec.strategy
        assert _accuracy(model, record, "val") == record.val_accuracy, record.spec.strategy


def test_a_plain_model_loads_strictly_into_a_freshly_built_architecture(compared):
    """Without sopkit's loader: the weights file and build_model are all a user needs."""
    for record in compared.trials():
        if record.spec.strategy == "ensemble":
            continue
        meta = read_meta(compared.saved, record.key)
        assert (meta["kind"], meta["model"], meta["input_shape"], meta["num_classes"]) == (
            "model", "mlp-a1", [64], 10)
        assert (meta["strategy"], meta["seed"], meta["lr"]) == (
            record.spec.strategy, record.spec.seed, record.spec.lr)
        assert meta["sopkit_version"] == sopkit.__version__
        fresh = build_model("mlp-a1", input_shape=(64,), num_classes=10)
        fresh.load_state_dict(load_file(weights_path(compared.saved, record.key)), strict=True)
        # mk ships the collapsed model: the baseline's size, not e copies of each weight.
        assert meta["parameters"] == record.inference_params == 7510
        assert _accuracy(fresh, record, "test") == record.test_accuracy


def test_an_ensemble_saves_its_members_and_loads_as_one_module(compared):
    record = next(t for t in compared.trials() if t.spec.strategy == "ensemble")
    meta = read_meta(compared.saved, record.key)
    assert (meta["kind"], meta["members"]) == ("ensemble", 3)
    model = load_trained(compared.saved, record.key)
    assert isinstance(model, AveragedEnsemble) and len(model.members) == 3
    weights = load_file(weights_path(compared.saved, record.key))
    assert {name.split(".")[1] for name in weights} == {"0", "1", "2"}
    # Member 0 is the same seed's baseline training: its weights are those of the baseline trial.
    baseline = next(
        t for t in compared.trials()
        if t.spec.strategy == "baseline" and t.spec.seed == record.spec.seed
    )
    alone = load_file(weights_path(compared.saved, baseline.key))
    assert all(torch.equal(weights[f"members.0.{name}"], alone[name]) for name in alone)
    assert record.inference_params == 3 * 7510


def test_saving_models_changes_no_result_and_can_be_turned_off(compared):
    saved = {t.key: t for t in compared.trials()}
    unsaved = {t.key: t for t in compared.trials(compared.unsaved)}
    assert set(saved) == set(unsaved)
    for key, record in saved.items():
        assert record.test_accuracy == unsaved[key].test_accuracy
        untimed = [{k: v for k, v in p.items() if k != "seconds"} for p in record.curve]
        assert untimed == [
            {k: v for k, v in p.items() if k != "seconds"} for p in unsaved[key].curve
        ]
    assert not (compared.unsaved / "models").exists()
    assert default_of(ComparePlan, "save_models") is True


def test_the_compare_flag_defaults_to_the_plan_field():
    import typer.main

    from sopkit.cli import app

    params = typer.main.get_command(app).commands["compare"].params
    flag = next(p for p in params if "--save-models" in p.opts)
    assert flag.secondary_opts == ["--no-save-models"]
    assert flag.default is default_of(ComparePlan, "save_models")


def test_report_md_says_where_the_models_are(compared, tmp_path):
    for directory in (compared.saved, compared.unsaved):
        trials = compared.trials(directory)
        meta = ReportMeta.from_trials(trials, title="deploy")
        # report.md beside the directory's models, as `sopkit report` writes it (figures aside).
        path = write_markdown(directory / "report.md", aggregate(trials), meta)
        text = path.read_text()
        if directory == compared.saved:
            assert "## Trained models (models/)" in text
            assert "6 trials kept a deployable model" in text
            assert f"sopkit export {directory}" in text
        else:
            assert "No trained model was saved" in text and "sopkit export" not in text


def _one_key(directory: Path) -> str:
    return sorted(saved_keys(directory))[0]


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda w, m: w.write_bytes(w.read_bytes()[:-100]), "is damaged: its checksum"),
        (lambda w, m: w.write_bytes(w.read_bytes()[:-1] + b"\x00"), "is damaged: its checksum"),
        (lambda w, m: w.unlink(), "weights file of trial .* is missing"),
        (lambda w, m: m.write_text("{not json"), "sidecar .* is damaged"),
        (lambda w, m: m.write_text("[]"), "sidecar .* is damaged: it has no format"),
        (lambda w, m: m.unlink(), "No saved model for trial"),
        (lambda w, m: m.write_text(json.dumps({**json.loads(m.read_text()), "format": 99})),
         "format 99, but this sopkit reads format 1"),
        (lambda w, m: m.write_text(json.dumps({**json.loads(m.read_text()), "num_classes": 7})),
         "do not fit mlp-a1"),
        (lambda w, m: m.write_text(
            json.dumps({**json.loads(m.read_text()), "input_shape": ["x"], "num_classes": 1e400})
        ), "damaged: input_shape, num_classes missing or wrong"),
    ],
)
def test_a_damaged_model_is_a_message(copy_of, damage, message):
    key = _one_key(copy_of)
    damage(weights_path(copy_of, key), meta_path(copy_of, key))
    with pytest.raises(UserError, match=message):
        load_trained(copy_of, key)


def test_a_sidecar_naming_code_is_refused_when_code_models_are(copy_of, monkeypatch):
    """A model directory received from someone else: its sidecar could name any module. Under
    SOPKIT_NO_CODE_MODELS=1 nothing named there is imported."""
    key = _one_key(copy_of)
    sidecar = meta_path(copy_of, key)
    module = "sopkit_test_never_imported_module"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "model": f"{module}:build"}))
    monkeypatch.setenv("SOPKIT_NO_CODE_MODELS", "1")
    with pytest.raises(UserError, match="is code: 'package.module:factory' imports that module"):
        load_trained(copy_of, key)
    assert module not in sys.modules


@pytest.mark.parametrize("key", ["../../etc/passwd", "0" * 23, "G" * 24, ""])
def test_a_trial_key_is_never_a_path(copy_of, key):
    with pytest.raises(UserError, match="is not a trial key"):
        load_trained(copy_of, key)


class Doubled(nn.Sequential):
    """The MLP's layers and state dict, but another function: not the architecture it names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_a_deployable_that_is_not_the_named_architecture_is_kept_but_not_rebuilt(
    compared, tmp_path
):
    """Same keys and shapes are not enough: the rebuilt model must compute what was trained."""
    record = compared.trials()[0]
    plain = build_model("mlp-a1", input_shape=(64,), num_classes=10)
    doubled = Doubled(*plain)
    assert set(doubled.state_dict()) == set(plain.state_dict())
    data = load_dataset("digits")
    result = sopkit.TrainResult(
        strategy="odd", seed=0, config=sopkit.TrainConfig(), test_accuracy=0.5, val_accuracy=0.5,
        train_params=1, inference_params=1, step_times=[], wall_time=0.0, model=doubled,
    )
    artifact = trial_artifact(result, record.spec, data)
    assert artifact is not None and artifact.meta["kind"] == "opaque"
    assert artifact.meta["module"] == f"{__name__}.Doubled"
    write_model(tmp_path, artifact)
    with pytest.raises(UserError, match="cannot rebuild from the model name"):
        load_trained(tmp_path, record.key)
    # The weights are kept all the same, for the user who has the class.
    again = Doubled(*build_model("mlp-a1", input_shape=(64,), num_classes=10))
    again.load_state_dict(load_file(weights_path(tmp_path, record.key)), strict=True)
    probe = torch.randn(3, 64)
    assert torch.equal(again(probe), doubled(probe))


def test_loading_leaves_the_callers_random_stream_alone(compared):
    key = _one_key(compared.saved)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_trained(compared.saved, key)
    assert torch.equal(torch.rand(3), expected)


def test_a_model_write_is_atomic_and_leaves_no_temporary_file(compared, tmp_path):
    key = _one_key(compared.saved)
    meta = read_meta(compared.saved, key)
    artifact = ModelArtifact(weights_path(compared.saved, key).read_bytes(), meta)
    write_model(tmp_path, artifact)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        f"{key}.json", f"{key}.safetensors"]
    assert load_trained(tmp_path, key) is not None


def test_a_trials_model_is_on_disk_before_its_record(compared, tmp_path):
    """The runner writes the model first: a kill between the two leaves a model without a record
    (the resumed comparison trains the trial again), never a record without its whole model."""
    record = compared.trials()[0]
    artifact = ModelArtifact(
        weights_path(compared.saved, record.key).read_bytes(), read_meta(compared.saved, record.key)
    )
    database = tmp_path / DATABASE_NAME
    runner = PlanRunner(build_plan(**TINY), database)
    store = TrialStore(database)
    store.close()  # storing the record now fails, as a kill at that moment would stop it
    outcome = TrialOutcome(record.spec, record=record.result_dict(), artifact=artifact)
    with pytest.raises((sqlite3.Error, UserError)):  # the store names a closed database
        runner.commit(outcome, store)
    assert saved_keys(tmp_path) == {record.key}
    with TrialStore(database) as reopened:
        assert reopened.done_keys() == set()
    assert load_trained(tmp_path, record.key) is not None
