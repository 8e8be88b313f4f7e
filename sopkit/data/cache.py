"""The on-disk cache for data generated from code (mnist1d): one ``.npz`` file per recipe.

An :class:`ArrayCache` is an explicit object over one directory; nothing about it lives in a module
global. A file's name is a digest of the recipe that produced it, so a changed recipe never reuses a
stale file, and files are written atomically, so a reader sees either no file or a complete one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sopkit.files import write_atomic

__all__ = ["ArrayCache", "default_cache_dir"]

Arrays = dict[str, np.ndarray]


def default_cache_dir() -> Path:
    """Where generated data is cached: $SOPKIT_CACHE_DIR, else $XDG_CACHE_HOME/sopkit, else
    ~/.cache/sopkit."""
    explicit = os.environ.get("SOPKIT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sopkit"


@dataclass(frozen=True)
class ArrayCache:
    """A directory of ``.npz`` files, each holding the arrays one recipe produces."""

    directory: Path

    def path(self, name: str, recipe: Mapping[str, Any]) -> Path:
        """The file for ``recipe``: ``<directory>/<name>-<16 hex digits of its sha256>.npz``."""
        text = json.dumps(dict(recipe), sort_keys=True, default=str)
        digest = hashlib.sha256(text.encode()).hexdigest()
        return self.directory / f"{name}-{digest[:16]}.npz"

    def get_or_make(
        self,
        name: str,
        recipe: Mapping[str, Any],
        keys: Sequence[str],
        make: Callable[[], Arrays],
    ) -> Arrays:
        """The arrays ``keys`` for ``recipe``, read from the cache or made by ``make()`` and stored.

        An unreadable file is ignored (and then overwritten) and an unwritable directory only
        costs a regeneration next time: both warn, neither fails the load.
        """
        path = self.path(name, recipe)
        cached = _read_npz(path, keys)
        if cached is not None:
            return cached
        arrays = make()
        try:
            _write_npz_atomic(path, arrays)
        except OSError as exc:
            # A read-only or full cache directory costs a regeneration next time, nothing more.
            warnings.warn(f"Could not write the {name} cache {path}: {exc}", stacklevel=4)
        return arrays


def _read_npz(path: Path, keys: Sequence[str]) -> Arrays | None:
    """The arrays in a cache file, or None when it is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        # Atomic writes make this unlikely, but a damaged cache should be rebuilt, not fatal.
        warnings.warn(f"Ignoring unreadable cache file {path}: {exc}", stacklevel=4)
        return None


def _write_npz_atomic(path: Path, arrays: Arrays) -> None:
    """Write ``arrays`` to ``path`` through sopkit's one atomic writer: readers see either no file
    or a complete one."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    write_atomic(path, buffer.getvalue())
