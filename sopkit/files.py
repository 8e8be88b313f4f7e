"""The one way sopkit writes a file: atomically, through a temporary file of its own.

Every report, summary, figure, ``trials.jsonl`` and bench output goes through :func:`write_atomic`.
A reader (or a second process writing the same file) sees the old content or the new, never half a
file; a failure part-way leaves the old file as it was and no temporary file behind.

Several files that belong together (a comparison's reports) are written inside
:func:`staged_writes`: every one goes to its temporary first, and only when all are written are they
renamed into place, with Ctrl-C held back until the last one is: an interrupt leaves them all old or
all new, never some of each.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

from sopkit.interrupts import deferred_sigint

_ATTEMPTS = 100  # unique names collide only by chance: a few tries are plenty
# The (temporary, destination) pairs of the innermost staged_writes block; None outside one.
_STAGED: ContextVar[list[tuple[Path, Path]] | None] = ContextVar("sopkit_staged", default=None)


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
    temporary: Path | None = None
    descriptor: int | None = None
    try:
        # A Ctrl-C between creating the temporary and knowing its name would leave it behind:
        # held back until both are known (then raised inside this try, which removes it).
        with deferred_sigint():
            descriptor, temporary = _create_temporary(path)
        with os.fdopen(descriptor, "wb") as stream:
            descriptor = None  # the stream owns it now, and closes it
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        staged = _STAGED.get()
        if staged is not None:  # renamed when the staged_writes block ends
            staged.append((temporary, path))
            return path
        os.replace(temporary, path)
    except BaseException:
        if descriptor is not None:
            with contextlib.suppress(OSError):
                os.close(descriptor)
        if temporary is not None:
            with contextlib.suppress(OSError):
                temporary.unlink()
        raise
    _sync_directory(path.parent)
    return path


@contextlib.contextmanager
def staged_writes() -> Iterator[None]:
    """Within the block, :func:`write_atomic` writes temporaries only; when the block ends without
    an error they are all renamed into place at once, Ctrl-C held back until the last rename. On
    an error (Ctrl-C included) no file changes and the temporaries are removed."""
    staged: list[tuple[Path, Path]] = []
    token = _STAGED.set(staged)
    try:
        yield
    except BaseException:
        _remove(temporary for temporary, _ in staged)
        raise
    finally:
        _STAGED.reset(token)
    with deferred_sigint():
        for index, (temporary, path) in enumerate(staged):
            try:
                os.replace(temporary, path)
            except BaseException:
                _remove(temporary for temporary, _ in staged[index:])
                raise
    for directory in dict.fromkeys(path.parent for _, path in staged):
        _sync_directory(directory)


def _remove(paths: Iterator[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()
