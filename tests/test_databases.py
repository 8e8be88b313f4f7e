"""Damaged and foreign databases: ``sopkit report`` and a resuming ``sopkit compare`` on a results
file that is corrupt, truncated, not SQLite, another program's SQLite database, from a newer
schema, or read-only (the file, or its directory) exit 2 with a message; nothing that is not
sopkit's is ever written; reading a report needs no write access.

Every damaged file is made here from a real database a tiny comparison wrote. Permissions are real:
as root (who ignores them) the command runs in a user namespace without privileges (``unshare
-U``), where the file modes apply again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sopkit.cli import USER_ERROR_EXIT, app
from sopkit.experiment.plan import build_plan
from sopkit.experiment.runner import run_plan
from sopkit.experiment.store import DATABASE_NAME, SCHEMA_VERSION
from sopkit.training.progress import NullProgress

STORE_V1 = Path(__file__).parent / "data" / "store-v1"
TINY = ["--dataset", "digits", "--model", "mlp-a1", "--strategies", "baseline", "--seeds", "1",
        "--epochs", "1", "--batch-size", "256"]
REPORT_FILES = ("report.md", "report.html", "summary.json", "summary.csv", "trials.jsonl")


@pytest.fixture(scope="module")
def real_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """results.sqlite of the comparison TINY describes (one trial), closed (no -wal beside it)."""
    out = tmp_path_factory.mktemp("real")
    plan = build_plan(dataset="digits", models=["mlp-a1"], strategies=["baseline"], seeds=1,
                      epochs=1, batch_size=256)
    run_plan(plan, out, NullProgress())
    assert not (out / f"{DATABASE_NAME}-wal").exists()
    return out / DATABASE_NAME


def fingerprint(directory: Path) -> dict[str, str]:
    """Every file in ``directory`` (names and contents): what 'left as it was' compares."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir()) if path.is_file()
    }


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})
    # A message and an exit status, never a traceback.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output


def assert_refused(directory: Path, *words: str) -> None:
    """Both commands exit 2 naming the problem, and leave every file as it was."""
    before = fingerprint(directory)
    for command in (["report", str(directory)], ["compare", *TINY, "--out", str(directory)]):
        code, output = invoke(*command)
        assert code == USER_ERROR_EXIT, output
        flat = " ".join(output.split())
        assert str(directory / DATABASE_NAME) in flat.replace(" ", "") or DATABASE_NAME in flat
        for word in words:
            assert word in flat, (command[0], output)
        assert fingerprint(directory) == before, command[0]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "run"
    directory.mkdir()
    return directory


def test_a_corrupt_database_is_refused_untouched(real_database: Path, run_dir: Path) -> None:
    data = bytearray(real_database.read_bytes())
    assert len(data) >= 3 * 4096
    data[4096:8192] = b"\xde\xad\xbe\xef" * 1024  # the second page: a table's b-tree
    (run_dir / DATABASE_NAME).write_bytes(bytes(data))
    assert_refused(run_dir, "damaged or truncated")


def test_a_truncated_database_is_refused_untouched(real_database: Path, run_dir: Path) -> None:
    data = real_database.read_bytes()
    (run_dir / DATABASE_NAME).write_bytes(data[: len(data) // 2 + 100])
    assert_refused(run_dir, "damaged or truncated")


def test_a_file_that_is_not_sqlite_is_refused_untouched(run_dir: Path) -> None:
    (run_dir / DATABASE_NAME).write_bytes(b"PK\x03\x04 a zip, say" * 300)
    assert_refused(run_dir, "not a sopkit results database")


@pytest.mark.parametrize("wal", [False, True], ids=["rollback-journal", "wal"])
def test_another_programs_database_is_never_modified(run_dir: Path, wal: bool) -> None:
    """Another program's SQLite file (it even has a table called meta) is refused before anything
    writes to it: not WAL mode, not a table, not a journal file beside it."""
    path = run_dir / DATABASE_NAME
    connection = sqlite3.connect(path)
    if wal:
        connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE meta (name TEXT, size INTEGER)")
    connection.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, path TEXT)")
    connection.execute("INSERT INTO photos (path) VALUES ('holiday.jpg')")
    connection.commit()
    connection.close()
    assert_refused(run_dir, "another program's file", "photos")
    assert sorted(p.name for p in run_dir.iterdir()) == [DATABASE_NAME]


def test_a_database_from_a_newer_sopkit_is_refused_untouched(
    real_database: Path, run_dir: Path
) -> None:
    shutil.copyfile(real_database, run_dir / DATABASE_NAME)
    with sqlite3.connect(run_dir / DATABASE_NAME) as connection:
        connection.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    connection.close()
    assert_refused(
        run_dir, "schema version 99", f"reads schema version {SCHEMA_VERSION}", "upgrade sopkit"
    )


def test_an_empty_database_file_has_nothing_to_report(run_dir: Path) -> None:
    (run_dir / DATABASE_NAME).write_bytes(b"")
    code, output = invoke("report", str(run_dir))
    assert code == USER_ERROR_EXIT and "is empty" in output
    assert (run_dir / DATABASE_NAME).read_bytes() == b""


@pytest.mark.slow
def test_reporting_an_old_database_reads_it_without_migrating_it(run_dir: Path) -> None:
    shutil.copyfile(STORE_V1 / DATABASE_NAME, run_dir / DATABASE_NAME)
    before = (run_dir / DATABASE_NAME).read_bytes()
    code, output = invoke("report", str(run_dir))
    assert code == 0, output
    assert (run_dir / DATABASE_NAME).read_bytes() == before  # still schema 1, not a byte changed
    assert all((run_dir / name).is_file() for name in REPORT_FILES)


# ---- read-only files and directories ---------------------------------------------------------------


def unprivileged(*args: str) -> tuple[int, str]:
    """The CLI in a process for which file modes apply (root's are ignored: a user namespace)."""
    command = [sys.executable, "-m", "sopkit.cli", *args]
    if os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("running as root without unshare: file modes cannot be tested")
        command = ["unshare", "-U", *command]
    env = {**os.environ, "COLUMNS": "250"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, " ".join((done.stdout + done.stderr).split())


@pytest.fixture
def read_only(run_dir: Path) -> Iterator[Path]:
    """``run_dir`` with a real database, both made read-only (write bits restored afterwards)."""
    yield run_dir
    for path in (run_dir, *run_dir.iterdir()):
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


@pytest.mark.slow
def test_a_read_only_database_reports_but_does_not_resume(
    real_database: Path, read_only: Path, tmp_path: Path
) -> None:
    path = read_only / DATABASE_NAME
    shutil.copyfile(real_database, path)
    path.chmod(0o444)
    code, output = unprivileged("report", str(read_only))
    assert code == 0, output
    assert all((read_only / name).is_file() for name in REPORT_FILES)
    before = fingerprint(read_only)
    code, output = unprivileged("compare", *TINY, "--out", str(read_only))
    assert code == USER_ERROR_EXIT, output
    assert "is read-only" in output and "another --out directory" in output
    assert fingerprint(read_only) == before

    read_only.chmod(0o555)  # and now its directory too
    code, output = unprivileged("report", str(read_only))
    assert code == USER_ERROR_EXIT, output
    assert "is read-only" in output and "--out OTHER_DIR" in output
    elsewhere = tmp_path / "elsewhere"
    code, output = unprivileged("report", str(read_only), "--out", str(elsewhere))
    assert code == 0, output
    assert all((elsewhere / name).is_file() for name in REPORT_FILES)
    code, output = unprivileged("compare", *TINY, "--out", str(read_only))
    assert code == USER_ERROR_EXIT, output
    assert "read-only" in output
    assert fingerprint(read_only) == before
