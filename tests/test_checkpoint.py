"""Checkpoints: a training interrupted at any step resumes from its last checkpoint and ends bitwise
equal to one that never stopped; damaged and foreign checkpoints are reported, never loaded; a
comparison killed with SIGKILL resumes its trial; checkpoints are gone once trials commit."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from processes import stored_trials
from torch import nn

from sopkit.experiment.plan import build_plan
from sopkit.experiment.runner import run_plan
from sopkit.experiment.store import DATABASE_NAME, TrialStore
from sopkit.registry import create_strategy
from sopkit.training.checkpoint import Checkpoints, CheckpointWarning
from sopkit.training.config import TrainConfig
from sopkit.training.loop import TrainingSession
from sopkit.training.progress import NullProgress
from sopkit.training.settings import StrategySettings
from sopkit.training.types import TrainResult

CONFIG = TrainConfig(
    epochs=4, batch_size=32, optimizer="sgd", lr=0.05, schedule="step", milestones=(2, 3)
)


class Interrupted(Exception):
    """Stands for a kill: raised from the progress output at a chosen training step."""


class StopAt(NullProgress):
    """Progress output that raises ``Interrupted`` at training step ``at`` (counted from 1 over
    every training of the session), and records messages."""

    def __init__(self, at: int | None = None) -> None:
        self.at = at
        self.steps = 0
        self.messages: list[str] = []

    def advance(self, label: str) -> None:
        self.steps += 1
        if self.at is not None and self.steps == self.at:
            raise Interrupted(label)

    def message(self, text: str) -> None:
        self.messages.append(text)


def build() -> nn.Module:
    # Dropout draws from torch's global generator: a resumed run must restore it too.
    return nn.Sequential(
        nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 16), nn.ReLU(),
        nn.Linear(16, 4),
    )


def session(data, directory: Path | None, progress=None, every: float = 0.0) -> TrainingSession:
    checkpoints = None if directory is None else Checkpoints(directory, every, scope="blobs")
    return TrainingSession(
        data, build, CONFIG, device=torch.device("cpu"), seed=3, progress=progress,
        checkpoints=checkpoints,
    )


def fit(name: str, data, directory: Path | None, progress=None, **options: str) -> TrainResult:
    settings = StrategySettings(expansion=3, options=dict(options))
    return create_strategy(name, settings).fit(session(data, directory, progress))


def assert_same_result(a: TrainResult, b: TrainResult) -> None:
    assert (a.test_accuracy, a.val_accuracy) == (b.test_accuracy, b.val_accuracy)
    curve = [(r.epoch, r.step, r.train_loss, r.val_accuracy, r.test_accuracy) for r in a.curve]
    assert curve == [(r.epoch, r.step, r.train_loss, r.val_accuracy, r.test_accuracy)
                     for r in b.curve]
    assert a.extra == b.extra and a.diverged_at_step == b.diverged_at_step
    assert len(a.step_times) == len(b.step_times)
    assert a.model is not None and b.model is not None
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(),
                                 strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("name", ["baseline", "mk", "adv-mk"])
def test_an_interrupted_training_resumes_bitwise_equal(name, tiny_data, tmp_path):
    plain = fit(name, tiny_data, None)
    # 8 steps an epoch: interrupted in the middle of epoch 3, after epoch 2's checkpoint.
    with pytest.raises(Interrupted):
        fit(name, tiny_data, tmp_path, StopAt(at=21))
    (written,) = tmp_path.glob("*.pt")
    assert torch.load(written, weights_only=True)["epochs"] == 2
    progress = StopAt()
    resumed = fit(name, tiny_data, tmp_path, progress)
    assert progress.steps == 4 * 8 - 2 * 8  # only the epochs after the checkpoint ran again
    assert any("resumed from its checkpoint after epoch 2 of 4" in m for m in progress.messages)
    assert_same_result(plain, resumed)
    assert resumed.extra == plain.extra and (name != "mk" or "mk_sampler" in plain.extra)


def test_the_checkpoint_interval_is_wall_time_and_the_last_epoch_is_always_kept(tiny_data, tmp_path):
    with pytest.raises(Interrupted):  # a day between checkpoints: none before the end
        create_strategy("baseline", StrategySettings()).fit(
            session(tiny_data, tmp_path, StopAt(at=31), every=86400.0)
        )
    assert not list(tmp_path.glob("*.pt"))
    create_strategy("baseline", StrategySettings()).fit(session(tiny_data, tmp_path, every=86400.0))
    (written,) = tmp_path.glob("*.pt")
    assert torch.load(written, weights_only=True)["epochs"] == 4


def test_a_resumed_ensemble_does_not_retrain_finished_members(tiny_data, tmp_path):
    pytest.importorskip("sopkit_baselines")
    plain = fit("ensemble", tiny_data, None)
    # Members train one after another (32 steps each): stopped in the middle of the second.
    with pytest.raises(Interrupted):
        fit("ensemble", tiny_data, tmp_path, StopAt(at=32 + 12))
    progress = StopAt()
    resumed = fit("ensemble", tiny_data, tmp_path, progress)
    assert progress.steps == (32 - 8) + 32  # member 0 not at all, member 1 from its epoch 1
    assert_same_result(plain, resumed)


def test_a_damaged_checkpoint_is_reported_and_the_training_starts_over(tiny_data, tmp_path):
    plain = fit("mk", tiny_data, None)
    with pytest.raises(Interrupted):
        fit("mk", tiny_data, tmp_path, StopAt(at=21))
    (written,) = tmp_path.glob("*.pt")
    written.write_bytes(written.read_bytes()[: written.stat().st_size // 2])  # truncated
    progress = StopAt()
    resumed = fit("mk", tiny_data, tmp_path, progress)
    assert any("is damaged" in m and "starts over" in m for m in progress.messages)
    assert progress.steps == 32
    assert_same_result(plain, resumed)

    written.write_bytes(b"not a checkpoint at all")  # garbage, in library use: a warning
    with pytest.warns(CheckpointWarning, match="is damaged"):
        assert_same_result(plain, fit("mk", tiny_data, tmp_path))


def test_a_checkpoint_of_another_training_is_never_loaded(tiny_data, tmp_path):
    with pytest.raises(Interrupted):
        fit("mk", tiny_data, tmp_path, StopAt(at=21))
    (written,) = tmp_path.glob("*.pt")
    # Another configuration has another file: nothing is resumed, the old file is left alone.
    progress = StopAt()
    fit("mk", tiny_data, tmp_path, progress, init="replicate")
    assert progress.steps == 32 and not progress.messages
    # A file of another training renamed into this one's place is refused by its key.
    payload = torch.load(written, weights_only=True)
    payload["key"] = "someone else's"
    torch.save(payload, written)
    progress = StopAt()
    fit("mk", tiny_data, tmp_path, progress)
    assert progress.steps == 32
    assert any("belongs to another training" in m for m in progress.messages)
    payload["key"], payload["format"] = torch.load(written, weights_only=True)["key"], 99
    torch.save(payload, written)
    progress = StopAt()
    fit("mk", tiny_data, tmp_path, progress)
    assert progress.steps == 32 and any("has format 99" in m for m in progress.messages)


def test_strategy_state_a_checkpoint_cannot_keep_turns_checkpoints_off(tiny_data, tmp_path):
    from sopkit.strategies import Baseline

    class Keeps(Baseline):
        def after_step(self, model, run) -> None:
            run.state.opaque = object()

    progress = StopAt()
    result = Keeps().fit(session(tiny_data, tmp_path, progress))
    assert len(result.curve) == 4 and not list(tmp_path.glob("*.pt"))
    assert any("run.state.opaque is a object" in m for m in progress.messages)


def test_a_checkpoint_that_cannot_be_written_costs_the_checkpoint_not_the_training(
    tiny_data, tmp_path
):
    blocked = tmp_path / "a file, not a folder"
    blocked.write_text("")
    progress = StopAt()
    result = fit("baseline", tiny_data, blocked, progress)
    assert len(result.curve) == 4
    assert sum("is not checkpointed: writing" in m for m in progress.messages) == 1


def test_no_directory_writes_nothing(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit("mk", tiny_data, None)
    assert not list(tmp_path.rglob("*"))


# ---- through the runner and the command line ----------------------------------------------------

TINY = {"dataset": "digits", "models": ["mlp-a1"], "seeds": 1}


class Watch(NullProgress):
    """Lists the checkpoints there are when each training ends (before its trial commits)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.seen: list[list[str]] = []

    def run_finished(self, label: str, result: TrainResult) -> None:
        self.seen.append(sorted(path.name for path in self.directory.rglob("*.pt")))


def test_checkpoints_are_removed_once_the_job_commits(tmp_path):
    plan = build_plan(**TINY, epochs=1, batch_size=256, strategies=["baseline", "mk"])
    watch = Watch(tmp_path / "checkpoints")
    run_plan(plan, tmp_path, watch, checkpoint_every=0.0)
    assert len(TrialStore(tmp_path / DATABASE_NAME).trials()) == 2
    assert [len(names) for names in watch.seen] == [1, 2]  # the job's trainings, kept to its end
    assert watch.seen[1][0].startswith("baseline-seed0-") and watch.seen[1][1].startswith("mk-")
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nan", "at least 0, got nan"),
        ("-1", "at least 0, got -1"),
        ("inf", "give 'off'"),
        ("soon", "a number of seconds or 'off'"),
        ("1e999", "give 'off'"),
    ],
)
def test_a_bad_checkpoint_interval_is_a_message_before_anything_runs(value, message, tmp_path):
    from typer.testing import CliRunner

    from sopkit.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compare", "--checkpoint-every", value, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output and not out.exists()


def test_checkpoint_intervals_read_from_the_command_line():
    from sopkit.experiment.plan import Execution, parse_checkpoint_every

    assert parse_checkpoint_every("off") is None and parse_checkpoint_every("OFF") is None
    assert parse_checkpoint_every("0") == 0.0 and parse_checkpoint_every("90.5") == 90.5
    assert Execution().checkpoint_every == 60.0


@pytest.mark.slow
def test_a_comparison_killed_mid_trial_resumes_it_from_its_checkpoint(tmp_path):
    def command(out: Path) -> list[str]:
        return [
            sys.executable, "-m", "sopkit.cli", "compare", "--dataset", "digits", "--model",
            "mlp-a1", "--strategies", "mk", "--seeds", "1", "--epochs", "20", "--batch-size",
            "64", "--checkpoint-every", "0", "--out", str(out),
        ]

    killed, plain = tmp_path / "killed", tmp_path / "plain"
    errors = tmp_path / "stderr.txt"
    with errors.open("w") as stderr:
        process = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while not list((killed / "checkpoints").rglob("*.pt")):
            assert process.poll() is None, errors.read_text()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert stored_trials(killed / DATABASE_NAME) == 0  # killed inside its only trial
    # The same plan rerun into the same folder (in this process, one thread, as the CLI's), and
    # run once without interruption.
    plan = build_plan(**TINY, epochs=20, strategies=["mk"], batch_size=64)
    progress = StopAt()
    run_plan(plan, killed, progress, checkpoint_every=0.0)
    assert any("resumed from its checkpoint after epoch" in m for m in progress.messages)
    assert not (killed / "checkpoints").exists()
    run_plan(plan, plain, NullProgress(), checkpoint_every=None)
    assert not (plain / "checkpoints").exists()

    (a,), (b,) = TrialStore(killed / DATABASE_NAME).trials(), TrialStore(plain / DATABASE_NAME).trials()
    assert (a.test_accuracy, a.val_accuracy) == (b.test_accuracy, b.val_accuracy)
    assert 0 < progress.steps < a.curve[-1]["step"]  # only the steps after the checkpoint ran
    points = [(r["train_loss"], r["val_accuracy"], r["test_accuracy"]) for r in a.curve]
    assert points == [(r["train_loss"], r["val_accuracy"], r["test_accuracy"]) for r in b.curve]
    from safetensors.torch import load_file

    (mine,), (theirs,) = (sorted((out / "models").glob("*.safetensors")) for out in (killed, plain))
    weights, expected = load_file(mine), load_file(theirs)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], expected[name]) for name in weights)

