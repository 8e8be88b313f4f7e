"""What the tests that start real processes read about them: a process's fields in /proc (no psutil
needed) and how many trials a comparison's database holds while it runs.

A module of its own, not conftest: several test files import it by name.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def proc_stat(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state, parent pid, process group,
    ...), or None when the process is gone. The name may hold spaces and parentheses: split after
    its last ``)``."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def stored_trials(database: Path) -> int:
    """The trials committed to ``database`` so far (0 while it does not exist or is locked)."""
    try:
        with sqlite3.connect(database, timeout=1) as connection:
            return int(connection.execute("SELECT COUNT(*) FROM trials").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
