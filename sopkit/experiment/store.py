"""Trials kept in an embedded SQLite database, so that a comparison never loses a finished result.

One row per trial, written in ONE transaction when the trial ends. A process killed at any moment
(SIGKILL included) leaves every finished trial and a consistent file: SQLite's journal makes each
commit atomic. Running the same comparison again skips finished trials (``finished`` or
``diverged``) and runs the rest. Several processes may write one database at once: WAL mode lets
readers proceed while one writer commits, and the busy timeout makes writers wait their turn.

The database records its schema version. Opening one written by a newer sopkit is refused (the
user's to fix: upgrade); one written by an older sopkit is migrated on open, in the transaction
that takes the write lock, so concurrent openers migrate it once.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from sopkit.errors import UserError
from sopkit.experiment.records import DIVERGED, FINISHED, TrialRecord, TrialSpec

DATABASE_NAME = "results.sqlite"
SCHEMA_VERSION = 1
# MIGRATIONS[n] turns a schema-n database into schema n + 1, inside the open transaction (it must
# not COMMIT). Schema 1 is the first one, so there is none yet; bump SCHEMA_VERSION with each.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {}

# The current schema, for a new database (an existing one reaches it through MIGRATIONS).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    key TEXT PRIMARY KEY,          -- hash of the trial's identity (see TrialSpec.key)
    status TEXT NOT NULL,          -- finished | diverged
    dataset TEXT NOT NULL,
    model TEXT NOT NULL,
    optimizer TEXT NOT NULL,
    strategy TEXT NOT NULL,
    seed INTEGER NOT NULL,
    lr REAL NOT NULL,
    spec TEXT NOT NULL,            -- JSON: everything that defines the trial
    result TEXT NOT NULL,          -- JSON: accuracies, curve, step times, parameter counts
    provenance TEXT NOT NULL,      -- JSON: versions, git revision, machine
    finished_at REAL NOT NULL
);
"""


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


class TrialStore:
    """The trials of one output directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._connection = sqlite3.connect(path, timeout=60.0, isolation_level=None)
        except (OSError, sqlite3.Error) as error:
            raise UserError(f"Cannot open the results database {path}: {error}.") from None
        try:
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute("PRAGMA synchronous=NORMAL")
            self._prepare()
        except sqlite3.DatabaseError as error:
            self._connection.close()
            raise UserError(f"{path} is not a sopkit results database: {error}.") from None
        except BaseException:
            self._connection.close()
            raise

    @classmethod
    def open_existing(cls, directory: Path) -> TrialStore:
        """The store of a finished or interrupted comparison, for ``sopkit report``."""
        path = directory / DATABASE_NAME
        if not path.is_file():
            raise UserError(
                f"No results database in {directory}: expected {path}. Point `sopkit report` at the "
                "--out directory of a comparison."
            )
        return cls(path)

    def __enter__(self) -> TrialStore:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ---- schema ---------------------------------------------------------------------------------

    def _stored_version(self) -> int | None:
        """The schema version in the file; None for a new (empty) database."""
        has_meta = self._connection.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        row = None
        if has_meta:
            row = self._connection.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'"
            ).fetchone()
        if row is not None:
            try:
                return int(row[0])
            except (TypeError, ValueError):
                raise UserError(
                    f"{self.path} is damaged: its schema version {row[0]!r} is not a number."
                ) from None
        tables = self._connection.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
        if tables:
            raise UserError(
                f"{self.path} is not a sopkit results database: it has no schema version."
            )
        return None

    def _check_not_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise UserError(
                f"{self.path} has results schema version {version}, but this sopkit reads schema "
                f"version {SCHEMA_VERSION} (and older ones). It was written by a newer sopkit: "
                "upgrade sopkit to resume it or report it."
            )

    def _prepare(self) -> None:
        """Create a new database, or check an existing one's version and migrate it if older."""
        version = self._stored_version()
        if version == SCHEMA_VERSION:
            return  # the common case: no write lock taken
        if version is not None:
            self._check_not_newer(version)
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

    # ---- plan and trials ------------------------------------------------------------------------

    def write_plan(self, plan: Mapping[str, Any]) -> None:
        """Remember the latest comparison plan run into this database (reports describe it)."""
        with self._transaction():
            self._connection.execute(
                "INSERT OR REPLACE INTO meta VALUES ('plan', ?)", (_json(_finite(dict(plan))),)
            )

    def read_plan(self) -> dict[str, Any] | None:
        row = self._connection.execute("SELECT value FROM meta WHERE key = 'plan'").fetchone()
        return None if row is None else json.loads(row[0])

    def done_keys(self) -> set[str]:
        """Keys of trials that need not run again (finished, or diverged: rerunning would diverge)."""
        rows = self._connection.execute("SELECT key FROM trials").fetchall()
        return {row[0] for row in rows}

    def record(
        self, spec: TrialSpec, result: Mapping[str, Any], provenance: Mapping[str, Any]
    ) -> None:
        """Store one finished trial in one transaction (replacing an older record of it).

        ``result`` is ``TrainResult.to_record()``: the fields a ``TrialRecord`` reads back.
        """
        status = DIVERGED if result.get("diverged_at_step") is not None else FINISHED
        row = (
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
        for attempt in range(5):
            try:
                with self._transaction():
                    self._connection.execute(
                        # Columns named: a migration that adds a column keeps this insert valid.
                        "INSERT OR REPLACE INTO trials (key, status, dataset, model, optimizer, "
                        "strategy, seed, lr, spec, result, provenance, finished_at) "
                        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                        row,
                    )
                return
            except sqlite3.OperationalError as error:  # "database is locked" past the timeout
                if "locked" not in str(error) or attempt == 4:
                    raise
                time.sleep(1.0 + attempt)

    def trials(self) -> list[TrialRecord]:
        """Every stored trial, in the order they finished."""
        rows = self._connection.execute(
            "SELECT key, status, spec, result, provenance, finished_at FROM trials "
            "ORDER BY finished_at"
        ).fetchall()
        records = []
        for key, status, spec, result, provenance, finished in rows:
            try:
                records.append(TrialRecord.from_stored(
                    key, status, json.loads(spec), json.loads(result), json.loads(provenance),
                    finished,
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
