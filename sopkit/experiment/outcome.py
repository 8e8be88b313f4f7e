"""What training one trial produced, on its way from the process that trained it to the store.

Training and committing are separate steps so that the process that writes ``results.sqlite`` (and
the files beside it) need not be the one that trained: a ``--jobs N`` worker commits its own
outcomes to the local database, while a Ray task returns them to the driver, the only writer.
"""

from __future__ import annotations

import traceback as traceback_module
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sopkit.experiment.records import TrialSpec

__all__ = ["ModelArtifact", "OutcomeSink", "TrialFailure", "TrialOutcome"]


@dataclass(frozen=True)
class TrialFailure:
    """A trial that raised: what it raised, with the traceback, as text (it crosses processes)."""

    error_type: str
    message: str
    traceback: str

    @classmethod
    def from_exception(cls, error: BaseException) -> TrialFailure:
        try:
            message = str(error)
        except Exception:  # a plugin's exception whose __str__ raises must not stop the grid
            message = f"<{type(error).__name__} whose str() failed>"
        return cls(
            error_type=type(error).__name__,
            message=message,
            traceback="".join(traceback_module.format_exception(error)),
        )


@dataclass(frozen=True)
class ModelArtifact:
    """The deployable model of a trial as bytes: its weights in safetensors format, and what is
    needed to rebuild the architecture they load into (``meta``, JSON-able)."""

    weights: bytes
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrialOutcome:
    """One trial's outcome: a stored result (``record``, ``TrainResult.to_record()``) or a
    ``failure``, and, when models are kept, the deployable model."""

    spec: TrialSpec
    record: Mapping[str, Any] | None = None
    failure: TrialFailure | None = None
    artifact: ModelArtifact | None = None


#: Where a process hands each outcome as soon as the trial ends (commit it, or collect it).
OutcomeSink = Callable[[TrialOutcome], None]
