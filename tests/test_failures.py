"""One failure never stops a grid: a trial that raises is recorded as failed, with its error and
traceback, every report shows it, and a rerun retries it; a worker that dies does not stop
``--jobs 2``.

The failing strategy is a real plugin (a package and its dist-info on ``sys.path``, as in
test_plugins.py) whose ``loss`` hook raises, or kills its process, for one seed while a flag file
exists: removing the file is how a test "fixes the bug" before the rerun.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sopkit.errors import UserError
from sopkit.experiment import store as store_module
from sopkit.experiment.plan import build_plan
from sopkit.experiment.records import TRIAL_KEY_TRAIN_FIELDS, TrialSpec
from sopkit.experiment.runner import run_plan
from sopkit.experiment.store import DATABASE_NAME, TrialStore
from sopkit.registry import DISABLE_AUTOLOAD_ENV
from sopkit.training.progress import NullProgress

FLAKY_PLUGIN = '''
"""A strategy with a bug: its loss hook fails for some seeds while a flag file exists."""
import os

import torch.nn.functional as F

from sopkit.strategy import Strategy


class Flaky(Strategy):
    description = "Failure test strategy: raises (seed 2) or kills its process (seed 1)."

    def __init__(self, settings=None):
        super().__init__(settings)
        self.flag = self.settings.get("flag", "")
        self.kill = self.settings.get("kill", "no") == "yes"

    def loss(self, model, inputs, targets, run):
        if self.flag and os.path.exists(self.flag):
            if run.seed == 1 and self.kill:
                os._exit(3)  # a worker dying: the OOM killer, a crash in native code
            if run.seed == 2:
                raise RuntimeError("flaky: CUDA out of memory (simulated)\\nsecond line of it")
        return F.cross_entropy(model(inputs), targets)
'''

# The error's first line ends so (the plugins' guard may prefix it with the plugin and the hook).
ERROR_END = "RuntimeError: flaky: CUDA out of memory (simulated) …"


@pytest.fixture
def flaky(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The plugin installed (also for spawned workers: they get this sys.path); returns the flag."""
    root = tmp_path / "site"
    (root / "sopkit_flaky").mkdir(parents=True)
    (root / "sopkit_flaky" / "__init__.py").write_text(textwrap.dedent(FLAKY_PLUGIN))
    info = root / "sopkit_flaky-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sopkit-flaky\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sopkit.strategies]\nflaky = sopkit_flaky:Flaky\n")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    flag = tmp_path / "bug-present"
    flag.write_text("")
    return flag


def flaky_plan(flag: Path, **options: str):  # type: ignore[no-untyped-def]
    return build_plan(
        dataset="digits", models=["mlp-a1"], strategies=["baseline", "flaky"], seeds=3, epochs=1,
        batch_size=256, options={"flaky.flag": str(flag), **options},
    )


class MessageLog(NullProgress):
    """Progress that keeps the messages a comparison prints."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def message(self, text: str) -> None:
        self.messages.append(text)


def statuses(out: Path) -> dict[tuple[str, int], str]:
    with TrialStore(out / DATABASE_NAME) as store:
        return {(t.spec.strategy, t.spec.seed): t.status for t in store.trials()}


@pytest.mark.slow
def test_a_failing_trial_is_recorded_reported_and_retried(flaky: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    plan = flaky_plan(flaky)
    groups = run_plan(plan, out, NullProgress())  # does not raise: the grid went on

    assert statuses(out) == {
        ("baseline", 0): "finished", ("baseline", 1): "finished", ("baseline", 2): "finished",
        ("flaky", 0): "finished", ("flaky", 1): "finished", ("flaky", 2): "failed",
    }
    with TrialStore(out / DATABASE_NAME) as store:
        failed = next(t for t in store.trials() if t.failed)
        assert failed.key not in store.done_keys()  # a rerun retries it
        finished_at = {t.key: t.finished_at for t in store.trials()}
    assert failed.failure is not None
    assert "second line of it" in failed.failure["message"]
    assert "in loss" in failed.failure["traceback"]  # the plugin's own frame
    assert 'raise RuntimeError("flaky' in failed.failure["traceback"]
    assert failed.test_accuracy is None and failed.error.endswith(ERROR_END)
    error_line = failed.error

    flaky_result = groups[0].strategies[1]
    assert flaky_result.strategy == "flaky"
    assert flaky_result.seeds == [0, 1] and flaky_result.trials == 3
    assert [(f["seed"], f["error"]) for f in flaky_result.failed] == [(2, error_line)]

    from sopkit.cli import app

    result = CliRunner().invoke(app, ["report", str(out)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "flaky: failed (lr=0.001, seed=2): " in result.output
    assert "CUDA out of memory (simulated)" in result.output
    assert "3 (1 failed)" in result.output  # the trials column, as for diverged ones
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False  # a failed trial has not finished
    by_strategy = {s["strategy"]: s for s in summary["strategies"]}
    assert [f["seed"] for f in by_strategy["flaky"]["failed"]] == [2]
    assert by_strategy["baseline"]["failed"] == []
    rows = {r["strategy"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert (rows["flaky"]["failed_trials"], rows["baseline"]["failed_trials"]) == ("1", "0")
    report_md = (out / "report.md").read_text()
    failed_section = report_md.split("## Failed trials")[1].split("## ")[0]
    assert "flaky: CUDA out of memory (simulated) …" in failed_section
    assert "second line" not in report_md  # the first line only; the rest is in trials.jsonl
    assert "Failed trials" in (out / "report.html").read_text()
    lines = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    [stored] = [line for line in lines if line["status"] == "failed"]
    assert "second line of it" in stored["failure"]["traceback"]

    flaky.unlink()  # the bug is fixed: the rerun trains the failed trial alone and replaces it
    progress = MessageLog()
    groups = run_plan(plan, out, progress)
    assert progress.messages == [
        f"Resuming: 5 finished trials in {out / DATABASE_NAME} are kept.", "Retrying 1 failed trial."
    ]
    assert set(statuses(out).values()) == {"finished"}
    with TrialStore(out / DATABASE_NAME) as store:
        again = {t.key: t.finished_at for t in store.trials()}
    assert [k for k in again if again[k] != finished_at[k]] == [failed.key]
    assert groups[0].strategies[1].failed == [] and groups[0].strategies[1].seeds == [0, 1, 2]
    result = CliRunner().invoke(app, ["report", str(out)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["complete"] is True
    assert "No trial failed." in (out / "report.md").read_text()


def _spec(seed: int) -> TrialSpec:
    return TrialSpec(
        dataset="digits", model="mlp-a1", optimizer="adam", strategy="baseline", seed=seed,
        lr=0.001, train=dict.fromkeys(TRIAL_KEY_TRAIN_FIELDS, 1), expansion=3, options={},
    )


def test_a_failure_never_replaces_a_result_and_a_result_replaces_a_failure(tmp_path: Path) -> None:
    failure = {"error_type": "RuntimeError", "message": "boom", "traceback": "Traceback ..."}
    with TrialStore(tmp_path / DATABASE_NAME) as store:
        store.record(_spec(0), {"test_accuracy": 0.5, "val_accuracy": 0.4}, {})
        store.record_failure(_spec(0), failure, {})  # e.g. a second comparison on the same rows
        store.record_failure(_spec(1), failure, {})
        store.record_failure(_spec(1), {**failure, "message": "boom again"}, {})
        trials = {t.spec.seed: t for t in store.trials()}
        assert trials[0].status == "finished" and trials[0].test_accuracy == 0.5
        assert trials[1].status == "failed" and trials[1].error == "RuntimeError: boom again"
        assert store.done_keys() == {_spec(0).key}
        store.record(_spec(1), {"test_accuracy": 0.6}, {})
        trials = {t.spec.seed: t for t in store.trials()}
        assert trials[1].status == "finished" and trials[1].failure is None
        assert store.done_keys() == {_spec(0).key, _spec(1).key}


def test_an_older_sopkit_refuses_a_database_that_can_hold_failed_trials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Schema 1 had no failed status: a sopkit that reads schema 1 only would read a failed row
    as a finished trial without numbers. Schema 2 makes it refuse the file instead."""
    with TrialStore(tmp_path / DATABASE_NAME) as store:
        store.record_failure(_spec(0), {"error_type": "E", "message": "m", "traceback": "t"}, {})
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 1)
    monkeypatch.setattr(store_module, "MIGRATIONS", {})
    with pytest.raises(UserError, match="schema version 2, but this sopkit reads schema version 1"):
        TrialStore(tmp_path / DATABASE_NAME)
    with sqlite3.connect(tmp_path / DATABASE_NAME) as connection:
        assert connection.execute("SELECT status FROM trials").fetchall() == [("failed",)]


@pytest.mark.slow
def test_a_raising_job_and_a_dying_worker_do_not_stop_two_jobs(flaky: Path, tmp_path: Path) -> None:
    """--jobs 2: seed 2's flaky trial raises in its worker (recorded by the worker), seed 1's kills
    its worker (the pool breaks; after a retry in a fresh pool and one alone, that job is recorded
    as failed by the main process). Every other trial finishes."""
    out = tmp_path / "run"
    groups = run_plan(flaky_plan(flaky, **{"flaky.kill": "yes"}), out, NullProgress(), jobs=2)
    assert statuses(out) == {
        ("baseline", 0): "finished", ("baseline", 1): "finished", ("baseline", 2): "finished",
        ("flaky", 0): "finished", ("flaky", 1): "failed", ("flaky", 2): "failed",
    }
    with TrialStore(out / DATABASE_NAME) as store:
        errors = {t.spec.seed: t.error for t in store.trials() if t.failed}
    assert errors[2].endswith(ERROR_END)
    assert errors[1].startswith("WorkerDied: the worker process running this job died")
    assert [f["seed"] for f in groups[0].strategies[1].failed] == [1, 2]


def test_an_exception_whose_str_raises_is_still_recorded(tmp_path: Path) -> None:
    """A hostile plugin's exception can make even printing it fail: the trial is still recorded."""
    from sopkit.experiment.outcome import TrialFailure

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    try:
        raise Unprintable
    except Unprintable as error:
        failure = TrialFailure.from_exception(error)
    assert failure.message == "<Unprintable whose str() failed>"
    assert "Unprintable" in failure.traceback
    with TrialStore(tmp_path / DATABASE_NAME) as store:
        store.record_failure(_spec(3), failure.__dict__, {})
        [trial] = store.trials()
    assert trial.error == "Unprintable: <Unprintable whose str() failed>"
