"""The trial store across code versions: stable keys, typed records, an old database resuming.

``tests/data/store-v1`` holds a ``results.sqlite`` written by sopkit before the store was
refactored (schema 1), and the ``summary.json`` that code reported from it. Every test works on a
copy: the fixture is never opened in place (SQLite would write its -wal and -shm files beside it).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sopkit.errors import UserError
from sopkit.experiment import store as store_module
from sopkit.experiment.plan import ComparePlan, build_plan
from sopkit.experiment.records import TrialSpec
from sopkit.experiment.results import aggregate
from sopkit.experiment.runner import run_plan
from sopkit.experiment.store import DATABASE_NAME, SCHEMA_VERSION, TrialStore
from sopkit.training.progress import NullProgress

STORE_V1 = Path(__file__).parent / "data" / "store-v1"
V1_STRATEGIES = ["baseline", "mk", "adv-mk", "ensemble", "distill", "subset"]


def v1_plan() -> ComparePlan:
    """The plan of the command in ``tests/data/store-v1/README.md``."""
    return build_plan(
        dataset="digits",
        models=["mlp-a1"],
        strategies=V1_STRATEGIES,
        seeds=2,
        epochs=2,
        lr_grid="0.001,0.003",
        options={"mk.init": "replicate"},
    )


def plan_keys(plan: ComparePlan) -> list[str]:
    return [spec.key for job in plan.jobs() for spec in job.specs]


@pytest.fixture
def v1_dir(tmp_path: Path) -> Path:
    """A copy of the old database, in a directory of its own."""
    directory = tmp_path / "run"
    directory.mkdir()
    shutil.copyfile(STORE_V1 / DATABASE_NAME, directory / DATABASE_NAME)
    return directory


def raw_rows(database: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(database) as connection:
        return connection.execute(
            "SELECT key, status, spec, result, provenance, finished_at FROM trials "
            "ORDER BY finished_at"
        ).fetchall()


def stored_keys(database: Path) -> list[str]:
    return [row[0] for row in raw_rows(database)]


def v1_summary() -> dict[str, Any]:
    return json.loads((STORE_V1 / "summary.json").read_text())


# ---- keys ---------------------------------------------------------------------------------------


def test_the_v1_plan_has_exactly_the_keys_the_old_code_stored(v1_dir: Path) -> None:
    keys = plan_keys(v1_plan())
    assert len(keys) == 24
    assert set(keys) == set(stored_keys(v1_dir / DATABASE_NAME))
    with TrialStore(v1_dir / DATABASE_NAME) as store:
        assert keys == store.read_plan()["trial_keys"]  # same order as well
    for key, _, spec, *_ in raw_rows(v1_dir / DATABASE_NAME):
        assert TrialSpec.from_dict(json.loads(spec)).key == key


def _train_config_with(monkeypatch: pytest.MonkeyPatch, name: str, default: Any) -> None:
    """Simulate a TrainConfig field added after schema 1."""
    import sopkit.experiment.plan as plan_module
    import sopkit.training.config as config_module

    grown = dataclasses.make_dataclass(
        "TrainConfig",
        [(name, type(default), dataclasses.field(default=default))],
        bases=(config_module.TrainConfig,),
        frozen=True,
    )
    monkeypatch.setattr(config_module, "TrainConfig", grown)
    monkeypatch.setattr(plan_module, "TrainConfig", grown)  # the plan builds its configs with it


def test_a_train_field_added_with_a_default_changes_no_key(
    v1_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _train_config_with(monkeypatch, "stochastic_depth", 0.0)
    plan = v1_plan()
    assert plan.jobs()[0].specs[0].train["stochastic_depth"] == 0.0  # the field is really there
    old = stored_keys(v1_dir / DATABASE_NAME)
    assert set(plan_keys(plan)) == set(old)

    smoothed = dataclasses.replace(plan, train={**plan.train, "stochastic_depth": 0.1})
    new = plan_keys(smoothed)
    assert len(set(new)) == 24 and not set(new) & set(old)

    # Old trials and new ones at the default stay one group in the results.
    with TrialStore(v1_dir / DATABASE_NAME) as store:
        records = store.trials()
    grown = [
        dataclasses.replace(
            r,
            key=r.key + "-new",
            spec=dataclasses.replace(r.spec, train={**r.spec.train, "stochastic_depth": 0.0}),
        )
        for r in records
    ]
    assert len(aggregate(records + grown, V1_STRATEGIES)) == 1


def test_a_spec_field_added_with_a_default_changes_no_key(v1_dir: Path) -> None:
    grown = dataclasses.make_dataclass(
        "TrialSpec",
        [("world_size", int, dataclasses.field(default=1))],
        bases=(TrialSpec,),
        frozen=True,
    )
    for key, _, spec, *_ in raw_rows(v1_dir / DATABASE_NAME):
        values = json.loads(spec)
        assert grown(**values).key == key
        assert grown(**values, world_size=2).key != key


def test_a_missing_key_field_fails_loudly_instead_of_changing_the_key(v1_dir: Path) -> None:
    spec = json.loads(raw_rows(v1_dir / DATABASE_NAME)[0][2])
    del spec["train"]["warmup_steps"]
    with pytest.raises(KeyError, match="warmup_steps"):
        _ = TrialSpec.from_dict(spec).key


# ---- typed records ------------------------------------------------------------------------------


def test_records_give_back_the_flat_dicts_of_the_old_store(v1_dir: Path) -> None:
    with TrialStore(v1_dir / DATABASE_NAME) as store:
        records = store.trials()
    # What the old TrialStore.trials() returned for each row.
    old = [
        {
            "key": key,
            "status": status,
            **json.loads(spec),
            **json.loads(result),
            "provenance": json.loads(provenance),
            "finished_at": finished_at,
        }
        for key, status, spec, result, provenance, finished_at in raw_rows(v1_dir / DATABASE_NAME)
    ]
    assert [r.as_dict() for r in records] == old

    first = records[0]  # baseline, seed 0, lr 0.001: values as the old code stored them
    assert (first.spec.strategy, first.spec.seed, first.spec.lr) == ("baseline", 0, 0.001)
    assert first.status == "finished" and not first.diverged
    assert first.test_accuracy == 215 / 360 and first.val_accuracy == 83 / 144
    assert (first.train_params, first.inference_params) == (7510, 7510)
    assert [(p["epoch"], p["step"]) for p in first.curve] == [(1, 6), (2, 12)]
    assert first.step_time_stats["count"] == 7  # 12 steps, 5 of them warm-up
    assert first.provenance["git_revision"] == "85322c58c53589c01a1c477fcc993127a4af2f5e"


# ---- resuming and reporting an old database -----------------------------------------------------


class RecordingProgress(NullProgress):
    def __init__(self) -> None:
        self.messages: list[str] = []

    def message(self, text: str) -> None:
        self.messages.append(text)


def _strategy_numbers(record: dict[str, Any]) -> dict[str, Any]:
    names = (
        "chosen_lr",
        "lr_scores",
        "seeds",
        "test_accuracies",
        "test_accuracy_mean",
        "test_accuracy_std",
        "val_accuracy_mean",
        "train_params",
        "inference_params",
        "median_step_time",
        "step_time_ratio",
        "paired_difference",
        "extra",
        "trials",
    )
    numbers = {name: record[name] for name in names}
    if numbers["paired_difference"] is not None:  # summary.json adds whether it is significant
        numbers["paired_difference"].pop("significant", None)
    return numbers


def test_an_old_database_resumes_without_training_a_single_trial(
    v1_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished trial of the old database was trained again")

    from sopkit.training.loop import TrainingSession

    monkeypatch.setattr(TrainingSession, "train", no_training)  # the only way anything trains
    before = {row[0]: row[5] for row in raw_rows(v1_dir / DATABASE_NAME)}
    progress = RecordingProgress()
    groups = run_plan(v1_plan(), v1_dir, progress)
    assert {row[0]: row[5] for row in raw_rows(v1_dir / DATABASE_NAME)} == before
    assert progress.messages == [
        f"Resuming: 24 finished trials in {v1_dir / DATABASE_NAME} are kept."
    ]
    assert len(groups) == 1
    resumed = {r.strategy: _strategy_numbers(r.as_dict()) for r in groups[0].strategies}
    expected = {s["strategy"]: _strategy_numbers(s) for s in v1_summary()["strategies"]}
    assert resumed == expected


def test_sopkit_report_on_an_old_database_shows_its_accuracies(v1_dir: Path) -> None:
    from sopkit.cli import app

    result = CliRunner().invoke(app, ["report", str(v1_dir)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    summary = json.loads((v1_dir / "summary.json").read_text())
    assert summary["complete"] is True
    expected = v1_summary()["strategies"]
    significant = [
        (s["strategy"], (s["paired_difference"] or {}).get("significant")) for s in expected
    ]
    assert [
        (s["strategy"], (s["paired_difference"] or {}).get("significant"))
        for s in summary["strategies"]
    ] == significant
    reported = {s["strategy"]: _strategy_numbers(s) for s in summary["strategies"]}
    assert reported == {s["strategy"]: _strategy_numbers(s) for s in expected}
    for strategy in expected:  # the terminal table: test accuracy in %, mean ± std over seeds
        mean, std = 100 * strategy["test_accuracy_mean"], 100 * strategy["test_accuracy_std"]
        assert f"{mean:.2f} ± {std:.2f}" in result.output
    assert "80.56 ± 0.39" in result.output  # baseline, as the old code reported it
    lines = (v1_dir / "trials.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["key"] for line in lines) == sorted(plan_keys(v1_plan()))


# ---- schema versions ----------------------------------------------------------------------------


def _set_version(database: Path, version: int) -> None:
    with sqlite3.connect(database) as connection:
        connection.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),)
        )


def _version(database: Path) -> str:
    with sqlite3.connect(database) as connection:
        return connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[
            0
        ]


def test_a_new_database_is_written_at_the_current_schema(tmp_path: Path) -> None:
    TrialStore(tmp_path / DATABASE_NAME).close()
    assert _version(tmp_path / DATABASE_NAME) == str(SCHEMA_VERSION) == "2"


def test_a_newer_schema_is_refused_naming_both_versions(v1_dir: Path) -> None:
    newer = SCHEMA_VERSION + 1
    _set_version(v1_dir / DATABASE_NAME, newer)
    message = rf"schema version {newer}, but this sopkit reads schema version {SCHEMA_VERSION}"
    with pytest.raises(UserError, match=message):
        TrialStore(v1_dir / DATABASE_NAME)
    assert _version(v1_dir / DATABASE_NAME) == str(newer)  # left as it was

    from sopkit.cli import app

    result = CliRunner().invoke(app, ["report", str(v1_dir)], env={"COLUMNS": "250"})
    assert result.exit_code == 2
    assert f"schema version {newer}" in result.output
    assert f"schema version {SCHEMA_VERSION}" in result.output
    assert isinstance(result.exception, SystemExit)  # an exit with a message, not a crash


def test_a_file_that_is_not_a_results_database_is_a_user_error(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / DATABASE_NAME) as connection:
        connection.execute("CREATE TABLE other (x INTEGER)")
    with pytest.raises(UserError, match="no schema version"):
        TrialStore(tmp_path / DATABASE_NAME)
    (tmp_path / "junk.sqlite").write_text("not sqlite at all" * 100)
    with pytest.raises(UserError, match="not a sopkit results database"):
        TrialStore(tmp_path / "junk.sqlite")


def test_concurrent_openers_migrate_an_older_schema_once(
    v1_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A simulated next schema (a new column): four stores opening the v1 copy at once."""
    calls: list[int] = []
    started = threading.Event()

    def add_note_column(connection: sqlite3.Connection) -> None:
        calls.append(1)
        started.set()
        threading.Event().wait(0.3)  # the others are now queued on the write lock
        connection.execute("ALTER TABLE trials ADD COLUMN note TEXT")  # fails if run twice

    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setattr(
        store_module, "MIGRATIONS", {**store_module.MIGRATIONS, SCHEMA_VERSION: add_note_column}
    )
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []
    counts: list[int] = []

    def open_store() -> None:
        try:
            barrier.wait()
            with TrialStore(v1_dir / DATABASE_NAME) as store:
                counts.append(len(store.trials()))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and started.is_set()
    assert calls == [1]
    assert counts == [24] * 4
    assert _version(v1_dir / DATABASE_NAME) == str(SCHEMA_VERSION + 1)
    with sqlite3.connect(v1_dir / DATABASE_NAME) as connection:
        columns = [row[1] for row in connection.execute("PRAGMA table_info(trials)")]
    assert columns[-2:] == ["failure", "note"]
    # ... and the migrated database takes new trials (the insert names its columns).
    with TrialStore(v1_dir / DATABASE_NAME) as store:
        old = store.trials()[0]
        moved = dataclasses.replace(old.spec, seed=99)
        store.record(moved, {**old.as_dict(), "seed": 99}, old.provenance)
        assert moved.key in store.done_keys() and len(store.trials()) == 25


def test_a_failed_migration_leaves_the_database_as_it_was(
    v1_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_a_migration(connection: sqlite3.Connection) -> None:
        connection.execute("ALTER TABLE trials ADD COLUMN note TEXT")
        raise RuntimeError("the migration broke half-way")

    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setattr(
        store_module, "MIGRATIONS", {**store_module.MIGRATIONS, SCHEMA_VERSION: half_a_migration}
    )
    with pytest.raises(RuntimeError, match="half-way"):
        TrialStore(v1_dir / DATABASE_NAME)
    assert _version(v1_dir / DATABASE_NAME) == "1"  # schema 1 -> 2 rolled back with the rest
    with sqlite3.connect(v1_dir / DATABASE_NAME) as connection:
        columns = [row[1] for row in connection.execute("PRAGMA table_info(trials)")]
    assert "note" not in columns and "failure" not in columns
    assert len(raw_rows(v1_dir / DATABASE_NAME)) == 24


def test_report_reads_rows_missing_fields_the_old_code_tolerated(v1_dir: Path) -> None:
    """A row without ``options`` or without a train field (hand-edited, or another tool's) still
    reports, as it did with the first release's store."""
    from sopkit.cli import app

    with sqlite3.connect(v1_dir / DATABASE_NAME) as connection:
        (key, spec_text), *_ = connection.execute("SELECT key, spec FROM trials").fetchall()
        spec = json.loads(spec_text)
        del spec["options"]
        del spec["train"]["warmup_steps"]
        connection.execute("UPDATE trials SET spec = ? WHERE key = ?", (json.dumps(spec), key))
    result = CliRunner().invoke(app, ["report", str(v1_dir)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert (v1_dir / "report.md").is_file()


def test_a_schema_version_that_is_not_a_number_is_a_user_error(v1_dir: Path) -> None:
    from sopkit.cli import app

    with sqlite3.connect(v1_dir / DATABASE_NAME) as connection:
        connection.execute("UPDATE meta SET value = 'two' WHERE key = 'schema_version'")
    result = CliRunner().invoke(app, ["report", str(v1_dir)])
    assert result.exit_code == 2, result.output
    assert "its schema version 'two' is not a number" in result.output


def test_a_row_with_corrupt_json_is_named_not_a_traceback(v1_dir: Path) -> None:
    from sopkit.cli import app

    with sqlite3.connect(v1_dir / DATABASE_NAME) as connection:
        (key,) = connection.execute("SELECT key FROM trials LIMIT 1").fetchone()
        connection.execute("UPDATE trials SET result = '{\"trunc' WHERE key = ?", (key,))
    result = CliRunner().invoke(app, ["report", str(v1_dir)])
    assert result.exit_code == 2, result.output
    assert f"the stored trial {key} is damaged" in result.output
