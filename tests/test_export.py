"""`sopkit export DIR`: the model to ship from a comparison, as safetensors, a torch.export program
and ONNX that runs in onnxruntime with PyTorch's outputs."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import test_deploy
import torch
from test_deploy import Compared
from typer.testing import CliRunner

from sopkit.cli import app
from sopkit.deploy.artifacts import load_trained
from sopkit.deploy.export import choose_trial, export_trained
from sopkit.deploy.layout import weights_path
from sopkit.errors import UserError

runner = CliRunner()
compared = test_deploy.compared  # the fixture: one tiny comparison serves both test files


def run(*args: str):
    return runner.invoke(app, [str(arg) for arg in args])


def _at_chosen_rate(compared: Compared, strategy: str):
    return [t for t in compared.trials() if t.spec.strategy == strategy]  # one rate in TINY


def test_the_default_choice_is_mk_at_its_best_validation_seed(compared):
    trials = compared.trials()
    choice = choose_trial(trials, {"strategies": ["baseline", "mk", "ensemble"]})
    mk = _at_chosen_rate(compared, "mk")
    best = max(t.val_accuracy for t in mk)
    assert choice.record.spec.strategy == "mk"
    assert choice.record.val_accuracy == best
    assert choice.record.spec.seed == min(t.spec.seed for t in mk if t.val_accuracy == best)
    assert choice.seeds == (0, 1) and not choice.seed_was_given
    named = choose_trial(trials, {}, strategy="ensemble", seed=1)
    assert (named.record.spec.strategy, named.record.spec.seed) == ("ensemble", 1)
    # Without mk, the first strategy of the plan.
    others = [t for t in trials if t.spec.strategy != "mk"]
    assert choose_trial(others, {"strategies": ["ensemble", "baseline"]}).record.spec.strategy == (
        "ensemble"
    )


@pytest.mark.slow
@pytest.mark.parametrize("strategy,seed", [(None, None), ("ensemble", "1")])
def test_export_writes_the_chosen_model_and_its_onnx_runs_as_pytorch_does(
    compared, tmp_path, strategy, seed
):
    options = [*(["--strategy", strategy] if strategy else []), *(["--seed", seed] if seed else [])]
    result = run("export", compared.saved, "--out", tmp_path, *options)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.json", "model.onnx", "model.pt2", "model.safetensors"]
    meta = json.loads((tmp_path / "model.json").read_text())
    key = meta["key"]
    assert meta["strategy"] == (strategy or "mk") and key in result.output
    if seed is not None:
        assert meta["seed"] == int(seed) and meta["exported"]["seed_chosen_by"] == "user"
    assert (tmp_path / "model.safetensors").read_bytes() == weights_path(
        compared.saved, key).read_bytes()

    import onnxruntime

    model = load_trained(compared.saved, key)
    inputs = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))  # not the traced batch
    with torch.no_grad():
        expected = model(inputs)
    session = onnxruntime.InferenceSession(
        str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    got = session.run(None, {"input": inputs.numpy()})[0]
    assert got.dtype == np.float32 and got.shape == (5, 10)
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-5)
    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    torch.testing.assert_close(program(inputs), expected, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_without_the_export_extra_safetensors_and_the_program_are_still_written(
    compared, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` now fails
    (tmp_path / "model.onnx").write_bytes(b"an earlier export's, of another model")
    with pytest.raises(UserError, match=r"pip install 'sopkit\[export\]'") as caught:
        export_trained(compared.saved, out=tmp_path)
    assert "onnxscript is missing" in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.json", "model.pt2", "model.safetensors"]


@pytest.fixture
def copy_of(compared: Compared, tmp_path: Path) -> Path:
    return Path(shutil.copytree(compared.saved, tmp_path / "copy"))


def _damage_every_model(directory: Path) -> None:
    for path in (directory / "models").glob("*.safetensors"):
        path.write_bytes(path.read_bytes()[:40])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--strategy", "adv-mk"], "--strategy 'adv-mk': digits / mlp-a1 / adam has baseline, mk"),
        (["--seed", "7"], "--seed 7: mk has seeds 0, 1 at its chosen learning rate"),
        (["--seed", str(2**64)], f"--seed {2**64}: mk has seeds 0, 1"),
        (["--model", "mlp-a3"], "--model 'mlp-a3': the comparison has mlp-a1"),
        (["--optimizer", "sgd"], "--optimizer 'sgd': the comparison has adam"),
    ],
)
def test_export_mistakes_exit_2_with_a_message(compared, tmp_path, args, message):
    result = run("export", compared.saved, "--out", tmp_path / "x", *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "x").exists()


def test_export_of_a_comparison_without_models_says_how_to_keep_them(compared, tmp_path):
    result = run("export", compared.unsaved, "--out", tmp_path / "x")
    assert result.exit_code == 2
    assert "--no-save-models" in result.output and "--save-models" in result.output


def test_export_of_a_damaged_model_file_is_a_message(copy_of, tmp_path):
    _damage_every_model(copy_of)
    result = run("export", copy_of, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "is damaged" in result.output, result.output


def test_export_into_a_file_or_from_a_directory_without_results_is_a_message(compared, tmp_path):
    target = tmp_path / "a file"
    target.write_text("mine")
    result = run("export", compared.saved, "--out", target)
    assert result.exit_code == 2 and "is a file" in result.output
    assert target.read_text() == "mine"
    result = run("export", tmp_path / "nothing here")
    assert result.exit_code == 2 and "No results database" in result.output


def test_a_strategy_without_a_chosen_rate_has_nothing_to_ship(compared):
    """Every mk trial diverged: the protocol chose no rate, and the export says so."""
    trials = [
        replace(t, status="diverged", diverged_at_step=3) if t.spec.strategy == "mk" else t
        for t in compared.trials()
    ]
    with pytest.raises(UserError, match="No learning rate of mk was chosen"):
        choose_trial(trials, {})
    assert choose_trial(trials, {}, strategy="baseline").record.spec.strategy == "baseline"
