"""The one way sopkit writes a file: atomically, through a temporary file of its own.

Every report, summary, figure, ``trials.jsonl`` and bench output goes through :func:`write_atomic`.
A reader (or a second process writing the same file) sees the old content or the new, never half a
file; a failure part-way leaves the old file as it was and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

_ATTEMPTS = 100  # unique names collide only by chance: a few tries are plenty


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new, empty temporary file beside ``path``, opened for writing, with a name no other writer
    (thread or process) can hold.

    Like ``tempfile.mkstemp`` (random name, ``O_EXCL``), but created with mode 0o666 so the umask
    applies: mkstemp's 0o600 would make every report unreadable to anyone but its writer.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(_ATTEMPTS):
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:
            continue
    raise FileExistsError(f"No free temporary name beside {path} after {_ATTEMPTS} attempts.")


def _sync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomic(path: Path | str, data: bytes | str) -> Path:
    """Write ``data`` (text is written as UTF-8, newlines untranslated) to ``path`` atomically.

    The bytes go to a uniquely named temporary file in the same directory (a rename is atomic only
    within one file system), are flushed to disk, and the file is renamed over ``path``. On any
    error, ``path`` keeps its old content and the temporary file is removed. Creates missing parent
    directories. Returns ``path``.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = _create_temporary(path)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    _sync_directory(path.parent)
    return path
