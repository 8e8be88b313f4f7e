"""Trials kept in an embedded SQLite database, so that a comparison never loses a finished result.

One row per trial, written in ONE transaction when the trial ends. A process killed at any moment
(SIGKILL included) leaves every finished trial and a consistent file: SQLite's journal makes each
commit atomic. Running the same comparison again skips finished trials (``finished`` or
``diverged``) and runs the rest, failed ones included (``failed``: the trial raised; its error and
traceback are kept until a later run of it succeeds). Several processes may write one database at
once: WAL mode lets readers proceed while one writer commits, and the busy timeout makes writers wait
their turn.

The database records its schema version. Opening one written by a newer sopkit is refused (the
user's to fix: upgrade); one written by an older sopkit is migrated on open, in the transaction
that takes the write lock, so concurrent openers migrate it once. A reader (``read_only``, what
``sopkit report`` uses) never writes: it needs no write access and reads older schemas as they are.

A file is looked at through a read-only connection before anything is written to it: a damaged file,
or another program's SQLite database (tables, but no sopkit ``meta``), is refused untouched.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from sopkit.errors import UserError
from sopkit.experiment.records import DIVERGED, FAILED, FINISHED, TrialRecord, TrialSpec

DATABASE_NAME = "results.sqlite"
SCHEMA_VERSION = 2


def _add_failure_column(connection: sqlite3.Connection) -> None:
    """Schema 1 -> 2: failed trials (status ``failed``, their error in ``failure``). An older sopkit
    refuses a schema-2 database rather than read a failed row as a finished one."""
    connection.execute("ALTER TABLE trials ADD COLUMN failure TEXT")


# MIGRATIONS[n] turns a schema-n database into schema n + 1, inside the open transaction (it must
# not COMMIT). Bump SCHEMA_VERSION with each.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _add_failure_column}

# The current schema, for a new database (an existing one reaches it through MIGRATIONS).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    key TEXT PRIMARY KEY,          -- hash of the trial's identity (see TrialSpec.key)
    status TEXT NOT NULL,          -- finished | diverged | failed
    dataset TEXT NOT NULL,
    model TEXT NOT NULL,
    optimizer TEXT NOT NULL,
    strategy TEXT NOT NULL,
    seed INTEGER NOT NULL,
    lr REAL NOT NULL,
    spec TEXT NOT NULL,            -- JSON: everything that defines the trial
    result TEXT NOT NULL,          -- JSON: accuracies, curve, step times, parameter counts
    provenance TEXT NOT NULL,      -- JSON: versions, git revision, machine
    finished_at REAL NOT NULL,
    failure TEXT                   -- JSON (failed trials): error_type, message, traceback
);
"""
_COLUMNS = (
    "key, status, dataset, model, optimizer, strategy, seed, lr, spec, result, provenance, "
    "finished_at, failure"
)


def _json(value: Any) -> str:
    return json.dumps(value, default=str, allow_nan=False, sort_keys=True)


def _finite(value: Any) -> Any:
    """JSON has no NaN: non-finite floats (a diverged loss, a missing timing) are stored as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _read_only_connection(path: Path) -> sqlite3.Connection:
    """A connection that cannot write ``path``, whatever the permissions (``mode=ro``).

    A WAL database whose directory cannot be written is still read: SQLite would need to create its
    ``-shm`` file there, so it is opened ``immutable`` instead, which is exact when no ``-wal`` file
    holds commits beside it (a closed database has none).
    """
    uri = path.resolve().as_uri()
    connection = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=60.0, isolation_level=None)
    try:
        connection.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return connection
    except sqlite3.OperationalError:
        connection.close()
        wal = path.with_name(path.name + "-wal")
        if (wal.exists() and wal.stat().st_size > 0) or os.access(path.parent, os.W_OK):
            raise
    return sqlite3.connect(
        f"{uri}?mode=ro&immutable=1", uri=True, timeout=60.0, isolation_level=None
    )


class TrialStore:
    """The trials of one output directory (``read_only``: for reading them, never writing)."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self._connection = self._open()
        try:
            with self._sqlite_errors():
                self._prepare()
        except BaseException:
            self._connection.close()
            raise

    @classmethod
    def open_existing(cls, directory: Path) -> TrialStore:
        """The store of a finished or interrupted comparison, for reading (``sopkit report``)."""
        path = directory / DATABASE_NAME
        if not path.is_file():
            raise UserError(
                f"No results database in {directory}: expected {path}. Point `sopkit report` at the "
                "--out directory of a comparison."
            )
        return cls(path, read_only=True)

    def __enter__(self) -> TrialStore:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ---- opening --------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        """Look at an existing file read-only first (a foreign or damaged one is refused before
        anything writes to it: not even WAL mode), then open it for writing unless ``read_only``."""
        path = self.path
        try:
            exists = path.exists()
            if exists or self.read_only:
                # Reading a WAL database creates its -wal and -shm files: a refused file keeps none.
                sidecars = [path.with_name(path.name + end) for end in ("-wal", "-shm")]
                new_sidecars = [sidecar for sidecar in sidecars if not sidecar.exists()]
                looking = None
                try:
                    with self._sqlite_errors():
                        looking = _read_only_connection(path)
                        version = self._stored_version(looking)
                        if version is not None:
                            self._check_not_newer(version)
                            self._check_integrity(looking)
                except BaseException:
                    if looking is not None:
                        looking.close()
                    # Only empty ones: a -wal with content is another process's, in use since.
                    wal = sidecars[0]
                    if wal in new_sidecars and (not wal.exists() or wal.stat().st_size == 0):
                        for sidecar in new_sidecars:
                            with contextlib.suppress(OSError):
                                sidecar.unlink()
                    raise
                if self.read_only:
                    return looking
                looking.close()
            self._check_writable(exists)
            path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(path, timeout=60.0, isolation_level=None)
        except (OSError, sqlite3.Error) as error:
            raise UserError(f"Cannot open the results database {path}: {error}.") from None
        try:
            with self._sqlite_errors():
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            connection.close()
            raise
        return connection

    def _check_writable(self, exists: bool) -> None:
        """A comparison writes the file and, beside it, SQLite's journal: both must be writable.
        Said before training, not after the first trial."""
        path = self.path
        directory = path.parent
        while not directory.exists() and directory != directory.parent:
            directory = directory.parent
        if not directory.is_dir():  # --out names a file (or a path through one)
            raise UserError(
                f"{directory} is a file, not a directory: --out names the directory a comparison "
                f"writes {path.name} and its reports into. Use another --out."
            )
        if exists and not os.access(path, os.W_OK):
            raise UserError(
                f"The results database {path} is read-only: a comparison adds its trials to it. "
                "Make it writable, or use another --out directory (`sopkit report` reads it as it is)."
            )
        if not os.access(directory, os.W_OK | os.X_OK):
            raise UserError(
                f"The directory {directory} is read-only: a comparison writes {path.name} (and "
                "SQLite's journal beside it) there. Use another --out directory."
            )

    @contextmanager
    def _sqlite_errors(self) -> Iterator[None]:
        """SQLite's errors about the file (damaged, truncated, not a database, read-only) as a
        message that names it, not a traceback."""
        try:
            yield
        except sqlite3.DatabaseError as error:
            text = str(error)
            if "readonly" in text or "read-only" in text:
                raise UserError(
                    f"Cannot write the results database {self.path}: {text}. Make it and its "
                    "directory writable, or use another --out directory."
                ) from None
            if "unable to open" in text:
                raise UserError(f"Cannot open the results database {self.path}: {text}.") from None
            if "locked" in text or "busy" in text:
                raise UserError(
                    f"The results database {self.path} stayed locked by another process: {text}."
                ) from None
            raise UserError(
                f"{self.path} is not a sopkit results database, or a damaged or truncated one "
                f"({text}). It was left as it was: move it away (or use another --out directory) "
                "and run the comparison again."
            ) from None

    # ---- schema ---------------------------------------------------------------------------------

    def _stored_version(self, connection: sqlite3.Connection | None = None) -> int | None:
        """The schema version in the file; None for a new (empty) database. Another program's
        database (tables, but no sopkit schema version) is refused."""
        connection = connection or self._connection
        tables = {
            row[0]
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        row = None
        if "meta" in tables:
            try:
                row = connection.execute(
                    "SELECT value FROM meta WHERE key = 'schema_version'"
                ).fetchone()
            except sqlite3.OperationalError:  # another program's table called meta
                row = None
        if row is not None:
            try:
                return int(row[0])
            except (TypeError, ValueError):
                raise UserError(
                    f"{self.path} is damaged: its schema version {row[0]!r} is not a number."
                ) from None
        everything = connection.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
        if everything:
            shown = ", ".join(sorted(tables)[:5]) or "no tables"
            raise UserError(
                f"{self.path} is not a sopkit results database: it has no schema version (it holds "
                f"{shown}), so it is another program's file. It was left as it was; use another "
                "--out directory."
            )
        return None

    def _check_not_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise UserError(
                f"{self.path} has results schema version {version}, but this sopkit reads schema "
                f"version {SCHEMA_VERSION} (and older ones). It was written by a newer sopkit: "
                "upgrade sopkit to resume it or report it."
            )

    def _check_integrity(self, connection: sqlite3.Connection) -> None:
        """A truncated or damaged file fails here, before any training, not at the first commit."""
        result = connection.execute("PRAGMA quick_check(1)").fetchone()
        if result is None or result[0] != "ok":
            raise sqlite3.DatabaseError(f"integrity check: {result[0] if result else 'no answer'}")

    def _prepare(self) -> None:
        """Create a new database, or check an existing one's version and migrate it if older."""
        version = self._stored_version()
        if version is not None:
            self._check_not_newer(version)
        elif self.read_only:
            raise UserError(f"{self.path} is empty: no comparison has stored a trial in it yet.")
        self._file_schema = version if version is not None else SCHEMA_VERSION
        if version == SCHEMA_VERSION or self.read_only:
            return  # the common case: no write lock taken (a reader reads older schemas as is)
        with self._transaction():
            # Again under the write lock: another process may have created or migrated it since.
            version = self._stored_version()
            if version is None:
                # One statement at a time: executescript would COMMIT on its own.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._connection.execute(statement)
            else:
                self._check_not_newer(version)
                while version < SCHEMA_VERSION:
                    MIGRATIONS[version](self._connection)
                    version += 1
            self._connection.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        self._file_schema = SCHEMA_VERSION

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        # BEGIN IMMEDIATE takes the write lock up front, so two writers queue instead of deadlocking.
        self._connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._connection.execute("ROLLBACK")
            raise
        self._connection.execute("COMMIT")

    def _write(self, statement: str, parameters: tuple[Any, ...]) -> None:
        """One statement in one transaction, retried while another writer holds the lock."""
        if self.read_only:
            raise RuntimeError(f"{self.path} was opened read-only")  # a bug, not the user's
        with self._sqlite_errors():
            for attempt in range(5):
                try:
                    with self._transaction():
                        self._connection.execute(statement, parameters)
                    return
                except sqlite3.OperationalError as error:  # "database is locked" past the timeout
                    if "locked" not in str(error) or attempt == 4:
                        raise
                    time.sleep(1.0 + attempt)

    # ---- plan and trials ------------------------------------------------------------------------

    def write_plan(self, plan: Mapping[str, Any]) -> None:
        """Remember the latest comparison plan run into this database (reports describe it)."""
        self._write("INSERT OR REPLACE INTO meta VALUES ('plan', ?)", (_json(_finite(dict(plan))),))

    def read_plan(self) -> dict[str, Any] | None:
        with self._sqlite_errors():
            row = self._connection.execute("SELECT value FROM meta WHERE key = 'plan'").fetchone()
        if row is None:
            return None
        try:
            plan = json.loads(row[0])
        except ValueError:
            plan = None
        if not isinstance(plan, dict):
            raise UserError(
                f"{self.path}: the stored plan is damaged. Run the comparison again to store it."
            )
        return plan

    def done_keys(self) -> set[str]:
        """Keys of trials that need not run again (finished, or diverged: rerunning would diverge).
        Failed trials are not done: a rerun retries them."""
        with self._sqlite_errors():
            rows = self._connection.execute(
                "SELECT key FROM trials WHERE status != ?", (FAILED,)
            ).fetchall()
        return {row[0] for row in rows}

    def failed_keys(self) -> set[str]:
        """Keys of the trials stored as failed (a rerun retries them)."""
        with self._sqlite_errors():
            rows = self._connection.execute(
                "SELECT key FROM trials WHERE status = ?", (FAILED,)
            ).fetchall()
        return {row[0] for row in rows}

    def _row(
        self, spec: TrialSpec, status: str, result: Mapping[str, Any], provenance: Mapping[str, Any]
    ) -> tuple[Any, ...]:
        return (
            spec.key,
            status,
            spec.dataset,
            spec.model,
            spec.optimizer,
            spec.strategy,
            spec.seed,
            spec.lr,
            _json(spec.as_dict()),
            _json(_finite(dict(result))),
            _json(_finite(dict(provenance))),
            time.time(),
        )

    def record(
        self, spec: TrialSpec, result: Mapping[str, Any], provenance: Mapping[str, Any]
    ) -> None:
        """Store one finished trial in one transaction (replacing an older record of it, a failed
        one included).

        ``result`` is ``TrainResult.to_record()``: the fields a ``TrialRecord`` reads back.
        """
        status = DIVERGED if result.get("diverged_at_step") is not None else FINISHED
        # Columns named: a migration that adds a column keeps this insert valid.
        self._write(
            f"INSERT OR REPLACE INTO trials ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,NULL)",
            self._row(spec, status, result, provenance),
        )

    def record_failure(
        self, spec: TrialSpec, failure: Mapping[str, Any], provenance: Mapping[str, Any]
    ) -> None:
        """Store that a trial raised (``failure``: error_type, message, traceback). It replaces an
        older failure of the trial, never a result: a trial another process finished stays done."""
        row = (*self._row(spec, FAILED, {}, provenance), _json(_finite(dict(failure))))
        self._write(
            f"INSERT INTO trials ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT(key) DO UPDATE SET result = excluded.result, "
            "provenance = excluded.provenance, finished_at = excluded.finished_at, "
            "failure = excluded.failure, spec = excluded.spec WHERE trials.status = 'failed'",
            row,
        )

    def trials(self) -> list[TrialRecord]:
        """Every stored trial (failed ones included), in the order they finished."""
        failure = "failure" if self._file_schema >= 2 else "NULL"  # a reader does not migrate
        with self._sqlite_errors():
            rows = self._connection.execute(
                f"SELECT key, status, spec, result, provenance, finished_at, {failure} FROM trials "
                "ORDER BY finished_at"
            ).fetchall()
        records = []
        for key, status, spec, result, provenance, finished, failed in rows:
            try:
                records.append(TrialRecord.from_stored(
                    key, status, json.loads(spec), json.loads(result), json.loads(provenance),
                    finished, json.loads(failed) if failed is not None else None,
                ))
            except (TypeError, ValueError, KeyError, AttributeError) as error:
                # A damaged row (hand-edited, truncated) is named, not a traceback; UserError is a
                # ValueError, so a row's own message passes through with the key added.
                raise UserError(
                    f"{self.path}: the stored trial {key} is damaged ({error}). Delete that row "
                    "(or the file) and run the comparison again to retrain it."
                ) from None
        return records

    def close(self) -> None:
        self._connection.close()
