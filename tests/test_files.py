"""``sopkit.files.write_atomic``: concurrent writers never leave a mixed or torn file, a failure
keeps the old content, and no temporary file is left behind."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import sopkit.files
from sopkit.files import write_atomic

SIZE = 1 << 20  # large enough that one write takes many system calls' worth of time


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_text_is_written_as_utf8_without_newline_translation(tmp_path: Path) -> None:
    path = write_atomic(tmp_path / "sub" / "report.md", "± a\r\nb\n")
    assert path == tmp_path / "sub" / "report.md"
    assert path.read_bytes() == "± a\r\nb\n".encode()
    assert leftovers(path.parent) == []


def test_the_umask_sets_the_mode_not_a_private_temporary_file(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = write_atomic(tmp_path / "summary.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_threads_writing_one_file_leave_one_whole_version_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "trials.jsonl"
    payloads = [bytes([ord("a") + i]) * SIZE for i in range(4)]
    write_atomic(path, payloads[0])
    torn: list[bytes] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            content = path.read_bytes()
            if content not in payloads:
                torn.append(content[:16] + b"..." + content[-16:])

    def write(payload: bytes) -> None:
        for _ in range(15):
            write_atomic(path, payload)

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    reader.join()
    assert torn == []
    assert path.read_bytes() in payloads
    assert leftovers(tmp_path) == []


WRITER = """
import sys
from pathlib import Path
from sopkit.files import write_atomic
path, letter = Path(sys.argv[1]), sys.argv[2].encode()
for _ in range(30):
    write_atomic(path, letter * {size})
"""


def test_processes_writing_one_file_leave_one_whole_version_and_no_temporary(
    tmp_path: Path,
) -> None:
    path = tmp_path / "report.html"
    code = WRITER.format(size=SIZE)
    writers = [
        subprocess.Popen([sys.executable, "-c", code, str(path), letter]) for letter in "xyz"
    ]
    while any(w.poll() is None for w in writers):
        if path.exists():
            content = path.read_bytes()
            assert len(content) == SIZE and len(set(content)) == 1, "a torn or mixed file"
    assert [w.returncode for w in writers] == [0, 0, 0]
    assert path.read_bytes() in {letter.encode() * SIZE for letter in "xyz"}
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failure_mid_write_keeps_the_old_file_and_removes_the_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = write_atomic(tmp_path / "summary.csv", "old\n")

    def fail(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sopkit.files.os, failing, fail)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, "new\n" * 1000)
    monkeypatch.undo()
    assert path.read_text() == "old\n"
    assert leftovers(tmp_path) == []


def test_an_interrupt_mid_write_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_atomic(tmp_path / "bench.png", b"old")

    def interrupted(descriptor: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sopkit.files.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert leftovers(tmp_path) == []
