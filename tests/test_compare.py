"""Comparisons: the plan, presets, resuming, divergence, parallel jobs and a real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_data_vision import _write_cifar10, skip_cifar_md5  # noqa: F401 (a fixture, used by name)

from sopkit.errors import UserError
from sopkit.experiment.plan import PAPER_LR_EXPONENTS, build_plan, parse_lr_grid
from sopkit.experiment.presets import load_preset, shipped_presets
from sopkit.experiment.runner import run_plan
from sopkit.experiment.store import DATABASE_NAME, TrialStore
from sopkit.training.progress import NullProgress

TINY = {"dataset": "digits", "models": ["mlp-a1"], "epochs": 1, "batch_size": 256, "seeds": 2}


def tiny_plan(**overrides):
    return build_plan(**{**TINY, **overrides})


def test_paper_learning_rate_grid():
    plan = tiny_plan(lr_grid="paper", optimizers=["adam", "sgd"])
    adam, sgd = plan.learning_rates("adam"), plan.learning_rates("sgd")
    # Section 5.1: 0.001 * 1.5^i (Adam) and 0.025 * 1.5^i (SGD) for i in [-4, 5].
    assert len(adam) == len(sgd) == 10
    assert adam[0] == pytest.approx(0.000197530864) and adam[4] == 0.001
    assert adam[-1] == pytest.approx(0.00759375)
    assert sgd[0] == pytest.approx(0.00493827160) and sgd[4] == 0.025
    assert sgd[-1] == pytest.approx(0.18984375)
    assert parse_lr_grid("paper") == PAPER_LR_EXPONENTS
    assert parse_lr_grid("paper:-2..2") == (-2, -1, 0, 1, 2)
    assert parse_lr_grid("0.1,0.01") == (0.1, 0.01)
    assert "reduced" in tiny_plan(lr_grid="paper:-1..1").grid_note()
    jobs = plan.jobs()
    assert len(jobs) == 2 * 2 * 10  # optimizers x seeds x rates
    assert all(len(job.specs) == 2 for job in jobs)


@pytest.mark.parametrize("text", ["paper:3..1", "fast", "0.1,-2", ""])
def test_bad_learning_rate_grids(text):
    if text == "":
        assert parse_lr_grid(text) is None
        return
    with pytest.raises(UserError):
        parse_lr_grid(text)


@pytest.mark.parametrize("name", sorted(shipped_presets()))
def test_every_shipped_preset_parses_into_a_plan(name):
    settings = load_preset(name)
    plan = build_plan(preset=name)
    assert plan.preset == settings["name"] == name
    assert list(plan.models) == settings["models"]
    jobs = plan.jobs()
    keys = [spec.key for job in jobs for spec in job.specs]
    assert keys and len(set(keys)) == len(keys)  # every trial of a preset is a distinct trial
    if name == "paper-table1":  # Table 1: A1-A3 x Adam/SGD x 3 seeds x 10 rates, 5 strategies
        assert len(jobs) == 180 and len(keys) == 900


def test_preset_values_are_overridden_by_explicit_options(tmp_path):
    preset = tmp_path / "mine.toml"
    preset.write_text('dataset = "digits"\nmodels = ["mlp-a1"]\nseeds = 4\nepochs = 7\n')
    plan = build_plan(preset=str(preset), seeds=2)
    assert plan.dataset == "digits" and plan.seeds == (0, 1) and plan.train["epochs"] == 7
    bad = tmp_path / "bad.toml"
    bad.write_text("modles = ['mlp-a1']\n")
    with pytest.raises(UserError, match="unknown keys modles"):
        build_plan(preset=str(bad))
    with pytest.raises(UserError, match="Unknown preset"):
        build_plan(preset="paper-table9")


def test_trials_are_stored_and_a_rerun_resumes(tmp_path):
    plan = tiny_plan()
    groups = run_plan(plan, tmp_path, NullProgress())
    store = TrialStore(tmp_path / DATABASE_NAME)
    first = {t.key: t.finished_at for t in store.trials()}
    assert len(first) == 4
    trial = store.trials()[0]
    assert trial.provenance["versions"]["torch"] == torch.__version__.split("+")[0]
    assert trial.spec.train["epochs"] == 1
    # digits: 1,797 images less 360 for test and 144 for validation leave 1,293 to train on, six
    # steps of batch 256 (the last one partial).
    assert [(p["epoch"], p["step"]) for p in trial.curve] == [(1, 6)]
    # Every step but the five warm-up ones is timed, and the stored median is the stats' median.
    assert trial.step_time_stats["count"] == 1
    assert trial.median_step_time == trial.step_time_stats["median"]
    assert [s.strategy for s in groups[0].strategies] == ["baseline", "mk"]

    run_plan(plan, tmp_path, NullProgress())  # everything finished: nothing runs again
    assert {t.key: t.finished_at for t in store.trials()} == first

    victim = next(iter(first))
    with sqlite3.connect(tmp_path / DATABASE_NAME) as connection:
        connection.execute("DELETE FROM trials WHERE key = ?", (victim,))
    run_plan(plan, tmp_path, NullProgress())
    again = {t.key: t.finished_at for t in store.trials()}
    assert set(again) == set(first)
    assert [k for k in first if again[k] != first[k]] == [victim]


def test_diverged_trials_are_recorded_and_never_chosen(tmp_path):
    plan = tiny_plan(optimizers=["sgd"], lr_grid="0.05,1e6", strategies=["baseline"], epochs=2)
    groups = run_plan(plan, tmp_path, NullProgress())
    trials = TrialStore(tmp_path / DATABASE_NAME).trials()
    diverged = [t for t in trials if t.status == "diverged"]
    assert sorted((t.spec.lr, t.spec.seed) for t in diverged) == [(1e6, 0), (1e6, 1)]
    baseline = groups[0].strategies[0]
    assert baseline.chosen_lr == 0.05
    assert baseline.lr_scores[1e6] is None
    assert len(baseline.diverged) == 2


def test_parallel_jobs_give_the_same_results_as_one(tmp_path):
    plan = tiny_plan(epochs=2)
    run_plan(plan, tmp_path / "one", NullProgress(), jobs=1)
    run_plan(plan, tmp_path / "two", NullProgress(), jobs=2)

    def results(directory: Path) -> dict[str, tuple[float, float, list[float]]]:
        return {
            t.key: (t.test_accuracy, t.val_accuracy, [e["train_loss"] for e in t.curve])
            for t in TrialStore(directory / DATABASE_NAME).trials()
        }

    one, two = results(tmp_path / "one"), results(tmp_path / "two")
    assert len(one) == 4 and one == two


def _compare_command(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "sopkit.cli", "compare", "--dataset", "digits", "--model", "mlp-a1",
        "--batch-size", "256", "--out", str(out), *extra,
    ]


def _wait_for_trials(database: Path, count: int, process: subprocess.Popen, limit: float) -> int:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if database.exists():
            try:
                with sqlite3.connect(database, timeout=1) as connection:
                    found = connection.execute("SELECT COUNT(*) FROM trials").fetchone()[0]
                if found >= count:
                    return found
            except sqlite3.OperationalError:
                pass
        assert process.poll() is None, "the comparison ended before it could be killed"
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} trials after {limit} s")


@pytest.mark.slow
def test_sigkill_loses_no_finished_trial_and_the_rerun_completes(tmp_path):
    out = tmp_path / "run"
    command = _compare_command(out, "--seeds", "4", "--epochs", "15")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_trials(out / DATABASE_NAME, 1, process, limit=180)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    with sqlite3.connect(out / DATABASE_NAME) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    survivors = {t.key: t.finished_at for t in TrialStore(out / DATABASE_NAME).trials()}
    assert 1 <= len(survivors) < 8

    report = subprocess.run(
        [sys.executable, "-m", "sopkit.cli", "report", str(out)], capture_output=True, text=True
    )
    assert report.returncode == 0, report.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False

    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "Resuming" in rerun.stdout
    final = {t.key: t.finished_at for t in TrialStore(out / DATABASE_NAME).trials()}
    assert len(final) == 8
    assert all(final[k] == v for k, v in survivors.items())  # finished trials were not re-run
    assert json.loads((out / "summary.json").read_text())["complete"] is True


@pytest.mark.slow
def test_two_comparisons_writing_one_database_at_once(tmp_path):
    out = tmp_path / "shared"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            _compare_command(out, "--seeds", "3", "--first-seed", str(first), "--epochs", "3"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for first in (0, 100)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    with sqlite3.connect(out / DATABASE_NAME) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    seeds = sorted({t.spec.seed for t in TrialStore(out / DATABASE_NAME).trials()})
    assert seeds == [0, 1, 2, 100, 101, 102]


@pytest.mark.usefixtures("skip_cifar_md5")
def test_the_table1_preset_runs_on_cifar10_from_a_data_dir(tmp_path):
    """`--preset paper-table1 --dataset cifar10 --data-dir DIR` runs the whole layout on CIFAR-10
    (here a tiny CIFAR-10 written in the real on-disk format)."""
    _write_cifar10(tmp_path / "data")
    plan = build_plan(
        preset="paper-table1", dataset="cifar10", data_dir=str(tmp_path / "data"),
        epochs=1, seeds=1, lr_grid="paper:0..0",
    )
    groups = run_plan(plan, tmp_path / "out", NullProgress())
    assert {(g.model, g.optimizer) for g in groups} == {
        (m, o) for m in ("mlp-a1", "mlp-a2", "mlp-a3") for o in ("adam", "sgd")
    }
    for group in groups:
        assert group.dataset == "cifar10"
        assert [s.strategy for s in group.strategies] == [
            "baseline", "ensemble", "distill", "subset", "mk"
        ]
        baseline = group.strategies[0]
        # The first layer takes CIFAR-10's 3 x 32 x 32 inputs: A1 = 3072-100-10 has
        # 3072 * 100 + 100 + 100 * 10 + 10 parameters.
        if group.model == "mlp-a1":
            assert baseline.inference_params == 308_310
