"""Interrupts with real signals: Ctrl-C (delivered twice, as through ``uv run``) exits 130 with every
finished trial kept and every report written; a Ctrl-C while the reports are written leaves them
all as they were, never half new; the workers of ``--jobs 2`` end when their main process is killed
with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import proc_stat, stored_trials

from sopkit.experiment.store import DATABASE_NAME
from sopkit.files import staged_writes, write_atomic
from sopkit.interrupts import deferred_sigint, interrupt_once

REPORT_FILES = ("report.md", "report.html", "summary.json", "summary.csv", "trials.jsonl")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


@pytest.fixture(autouse=True)
def ctrl_c_interrupts():
    """These tests send SIGINT to themselves and expect Python's own handler. A test run started in
    the background by a non-interactive shell inherits SIGINT ignored, and Python then leaves it
    ignored, so each test installs the handler a terminal's Ctrl-C would meet, and restores."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _sigint_self() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # Python runs the handler at the next bytecode boundary


def test_a_sigint_is_held_back_and_delivered_after_the_block() -> None:
    reached = []
    with pytest.raises(KeyboardInterrupt), deferred_sigint():
        _sigint_self()
        reached.append("after the signal")  # the block was not cut short
    assert reached == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_sigint_right_after_the_first_is_the_same_ctrl_c() -> None:
    with interrupt_once(grace_s=1.0):
        with pytest.raises(KeyboardInterrupt):
            _sigint_self()
        _sigint_self()  # 0.05 s later: the copy `uv run` forwards, ignored
        time.sleep(1.1)
        with pytest.raises(KeyboardInterrupt):  # a new Ctrl-C, a second later, interrupts again
            _sigint_self()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_interrupt_while_staging_leaves_every_file_as_it_was(tmp_path: Path) -> None:
    names = ["a.md", "b.json", "figures/c.png"]
    for name in names:
        write_atomic(tmp_path / name, "old")
    with pytest.raises(KeyboardInterrupt), staged_writes():
        write_atomic(tmp_path / names[0], "new")
        write_atomic(tmp_path / names[1], "new")
        _sigint_self()
        write_atomic(tmp_path / names[2], "new")
    assert [(tmp_path / name).read_text() for name in names] == ["old"] * 3
    assert sorted(p.name for p in tmp_path.rglob("*.tmp")) == []

    with staged_writes():
        for name in names:
            write_atomic(tmp_path / name, "new")
        assert [(tmp_path / name).read_text() for name in names] == ["old"] * 3  # not yet
    assert [(tmp_path / name).read_text() for name in names] == ["new"] * 3


# ---- real processes ---------------------------------------------------------------------------------


def _compare(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "sopkit.cli", "compare", "--dataset", "digits", "--model", "mlp-a1",
        "--strategies", "baseline", "--batch-size", "256", "--out", str(out), *extra,
    ]


def _wait(condition, process: subprocess.Popen, limit: float, poll: float = 0.1) -> None:  # type: ignore[type-arg,no-untyped-def]
    deadline = time.monotonic() + limit
    while not condition():
        assert process.poll() is None, "the process ended before it could be interrupted"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)


@pytest.mark.slow
def test_ctrl_c_twice_exits_130_with_every_trial_kept_and_reported(tmp_path: Path) -> None:
    out = tmp_path / "run"
    process = subprocess.Popen(
        _compare(out, "--seeds", "40", "--epochs", "20"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )
    try:
        _wait(lambda: stored_trials(out / DATABASE_NAME) >= 2, process, limit=300)
        process.send_signal(signal.SIGINT)  # the terminal's copy...
        time.sleep(0.05)
        process.send_signal(signal.SIGINT)  # ... and the one `uv run` forwards
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "Interrupted. Every finished trial is kept" in stderr
    stored = stored_trials(out / DATABASE_NAME)
    assert 2 <= stored < 40
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False
    assert sum(s["trials"] for s in summary["strategies"]) == stored
    assert len((out / "trials.jsonl").read_text().splitlines()) == stored
    assert all((out / name).is_file() for name in REPORT_FILES)
    assert "Reports:" in stdout
    assert list(out.rglob("*.tmp")) == []


@pytest.mark.slow
def test_ctrl_c_while_the_reports_are_written_leaves_them_all_as_they_were(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = subprocess.run(_compare(out, "--seeds", "2", "--epochs", "1"), capture_output=True,
                          text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr
    for name in REPORT_FILES:
        (out / name).write_text("old\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "sopkit.cli", "report", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )
    try:
        # The first temporary file means the reports are being written: Ctrl-C now.
        _wait(lambda: any(out.rglob(".*.tmp")), process, limit=300, poll=0.002)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "Interrupted while writing the reports" in stderr and "Traceback" not in stderr
    assert [(out / name).read_text() for name in REPORT_FILES] == ["old\n"] * len(REPORT_FILES)
    assert list(out.rglob("*.tmp")) == []


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (from /proc: no psutil needed)."""
    children = []
    for entry in Path("/proc").iterdir():
        fields = proc_stat(entry.name) if entry.name.isdigit() else None
        if fields is not None and int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(entry.name))
    return children


def _alive(pid: int) -> bool:
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has stopped; init reaps it


def _cpu_seconds(pid: int) -> float:
    fields = proc_stat(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _workers(pid: int) -> list[int]:
    found = []
    for child in _children(pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in command:  # not multiprocessing's resource tracker
            found.append(child)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_workers_stop_when_the_main_process_is_killed(tmp_path: Path) -> None:
    """The OOM killer's SIGKILL to the main process alone: its --jobs workers, mid-training on
    trials that would take minutes, are gone within seconds."""
    process = subprocess.Popen(
        _compare(tmp_path / "run", "--seeds", "4", "--epochs", "5000", "--jobs", "2"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
    )
    workers: list[int] = []
    try:
        def training() -> bool:
            workers[:] = _workers(process.pid)
            # Past their imports: each has worked for a few seconds of CPU.
            return len(workers) == 2 and all(_cpu_seconds(w) > 4 for w in workers)

        _wait(training, process, limit=400, poll=0.5)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "workers outlived their main process"
    finally:
        if process.poll() is None:
            process.kill()
        for worker in workers:
            if _alive(worker):
                os.kill(worker, signal.SIGKILL)
