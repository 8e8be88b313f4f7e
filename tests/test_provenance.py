"""`git_revision`: the commit a result came from, `-dirty` only when code (not a report) changed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from sopkit.experiment.provenance import git_revision

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args],
        cwd=repo, check=True, capture_output=True, text=True,
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "sopkit").mkdir()
    (tmp_path / "reports" / "paper-table1").mkdir(parents=True)
    (tmp_path / "sopkit" / "loop.py").write_text("lr = 0.1\n")
    (tmp_path / "reports" / "paper-table1" / "report.md").write_text("old\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "first")
    return tmp_path


def test_a_clean_tree_gives_the_commit(repo: Path) -> None:
    assert git_revision(repo / "sopkit") == _git(repo, "rev-parse", "HEAD")


def test_a_report_rewritten_by_the_run_itself_is_not_dirty(repo: Path) -> None:
    """`nox -s report` rewrites reports/ while its trials record where they came from."""
    (repo / "reports" / "paper-table1" / "report.md").write_text("new\n")
    assert git_revision(repo / "sopkit") == _git(repo, "rev-parse", "HEAD")


def test_changed_code_is_dirty_wherever_the_check_starts(repo: Path) -> None:
    (repo / "sopkit" / "loop.py").write_text("lr = 0.2\n")
    head = _git(repo, "rev-parse", "HEAD")
    assert git_revision(repo / "sopkit") == head + "-dirty"
    assert git_revision(repo / "reports") == head + "-dirty"


def test_outside_git_there_is_no_revision(tmp_path: Path) -> None:
    assert git_revision(tmp_path) is None
