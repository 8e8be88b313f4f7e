"""Trials kept in an embedded SQLite database, so that a comparison never loses a finished result.

One row per trial (a strategy trained once with one seed and one learning rate on one data set, model
and optimizer), written in ONE transaction when the trial ends. A process killed at any moment
(SIGKILL included) leaves every finished trial and a consistent file: SQLite's journal makes each
commit atomic. Running the same comparison again skips finished trials (``finished`` or
``diverged``) and runs the rest. Several processes may write one database at once: WAL mode lets
readers proceed while one writer commits, and the busy timeout makes writers wait their turn.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sopkit.errors import UserError

DATABASE_NAME = "results.sqlite"
SCHEMA_VERSION = 1
FINISHED = "finished"
DIVERGED = "diverged"

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


@dataclass(frozen=True)
class TrialSpec:
    """Everything that defines one trial; equal specs are the same trial (and resume skips it)."""

    dataset: str
    model: str
    optimizer: str
    strategy: str
    seed: int
    lr: float
    train: Mapping[str, Any]  # the TrainConfig as a dict (epochs, batch size, schedule, ...)
    expansion: int
    options: Mapping[str, str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "model": self.model,
            "optimizer": self.optimizer,
            "strategy": self.strategy,
            "seed": self.seed,
            "lr": self.lr,
            "train": dict(self.train),
            "expansion": self.expansion,
            "options": dict(sorted(self.options.items())),
        }

    @property
    def key(self) -> str:
        canonical = json.dumps(self.as_dict(), sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def _json(value: Any) -> str:
    return json.dumps(value, default=_jsonable, allow_nan=False, sort_keys=True)


def _jsonable(value: object) -> object:
    return str(value)


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
            with self._transaction():
                # executescript would COMMIT on its own; run the statements inside our transaction.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._connection.execute(statement)
                self._connection.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
        except sqlite3.DatabaseError as error:
            raise UserError(f"{path} is not a sopkit results database: {error}.") from None

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
        """Store one finished trial in one transaction (replacing an older record of it)."""
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
                        "INSERT OR REPLACE INTO trials VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", row
                    )
                return
            except sqlite3.OperationalError as error:  # "database is locked" past the timeout
                if "locked" not in str(error) or attempt == 4:
                    raise
                time.sleep(1.0 + attempt)

    def trials(self) -> list[dict[str, Any]]:
        """Every stored trial as a flat record: the spec, status, result and provenance."""
        rows = self._connection.execute(
            "SELECT key, status, spec, result, provenance, finished_at FROM trials "
            "ORDER BY finished_at"
        ).fetchall()
        records = []
        for key, status, spec, result, provenance, finished_at in rows:
            records.append(
                {
                    "key": key,
                    "status": status,
                    **json.loads(spec),
                    **json.loads(result),
                    "provenance": json.loads(provenance),
                    "finished_at": finished_at,
                }
            )
        return records

    def close(self) -> None:
        self._connection.close()
