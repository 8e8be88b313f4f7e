"""One trial: what defines it (``TrialSpec``), its stable key, and what is kept of it (``TrialRecord``).

A trial is one strategy trained once with one seed and one learning rate on one data set, model and
optimizer. Its key names it in the store: a resumed comparison skips every trial whose key is
there, so the key must not change when the code around it grows (see ``TRIAL_KEY_FIELDS``).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypedDict

from sopkit.errors import UserError

FINISHED = "finished"
DIVERGED = "diverged"
FAILED = "failed"  # the trial raised; a rerun retries it (store schema 2)

# What identifies a trial, as of store schema 1. The key is the first 24 hex digits of the SHA-256
# of the canonical JSON (sorted keys, ``default=str``) of these TrialSpec fields, with ``train``
# cut to TRIAL_KEY_TRAIN_FIELDS: exactly the keys the first store wrote, bit for bit.
# Rules that keep stored keys valid:
# - A field added later, to TrialSpec or to TrainConfig, enters the key only when its value differs
#   from its default. Trials stored before it existed ran at that default, so their keys stay, and
#   a resume skips them. A field without a default always enters (so give new fields a default).
# - A field listed here is never removed: every stored key includes it. If TrainConfig drops one,
#   the plan must still put the value trials ran with into ``TrialSpec.train`` (key computation
#   fails loudly when it is missing, rather than silently retraining everything).
TRIAL_KEY_FIELDS = (
    "dataset",
    "model",
    "optimizer",
    "strategy",
    "seed",
    "lr",
    "train",
    "expansion",
    "options",
)
TRIAL_KEY_TRAIN_FIELDS = (
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "schedule",
    "bf16",
    "warmup_steps",
    "eval_batch_size",
)

_NO_DEFAULT = object()  # never equal to a value: a field without a default always enters the key


def _is_default(value: Any, default: Any) -> bool:
    """Whether ``value`` is ``default`` as stored: a tuple default (``milestones=()``) comes back
    from the JSON of a stored trial as a list, and must still count as the default."""
    if default is _NO_DEFAULT:
        return False
    if value == default:
        return True
    return json.dumps(value, sort_keys=True, default=str) == json.dumps(
        default, sort_keys=True, default=str
    )


def _defaults(cls: type) -> dict[str, Any]:
    """A dataclass's field defaults by name (fields without one are left out)."""
    defaults: dict[str, Any] = {}
    for spec_field in fields(cls):
        if spec_field.default is not MISSING:
            defaults[spec_field.name] = spec_field.default
        elif spec_field.default_factory is not MISSING:
            defaults[spec_field.name] = spec_field.default_factory()
    return defaults


def _train_defaults() -> dict[str, Any]:
    # Looked up at call time: only a TrainConfig field added after schema 1 needs the defaults.
    from sopkit.training.config import TrainConfig

    return _defaults(TrainConfig)


def _identity_train(train: Mapping[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """The part of a TrainConfig dict that identifies a trial (see TRIAL_KEY_FIELDS).

    ``strict``: a listed field missing is an error (a key computed without it would silently differ
    from every stored one). Grouping stored trials is not strict: a row written by hand or by
    another tool without a field still groups (with the rows that lack it too).
    """
    missing = [name for name in TRIAL_KEY_TRAIN_FIELDS if name not in train]
    if missing and strict:
        raise KeyError(f"the trial key needs train fields {', '.join(missing)}")
    identity = {name: train[name] for name in TRIAL_KEY_TRAIN_FIELDS if name in train}
    added = [name for name in train if name not in TRIAL_KEY_TRAIN_FIELDS]
    if added:
        defaults = _train_defaults()
        identity.update(
            {n: train[n] for n in added if not _is_default(train[n], defaults.get(n, _NO_DEFAULT))}
        )
    return identity


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
        """Every field, as stored in the ``spec`` column and in the flat trial dict."""
        record = {spec_field.name: getattr(self, spec_field.name) for spec_field in fields(self)}
        record["train"] = dict(self.train)
        record["options"] = dict(sorted(self.options.items()))
        return record

    def identity(self, *, strict: bool = True) -> dict[str, Any]:
        """The fields the key hashes: TRIAL_KEY_FIELDS, and later fields away from their default
        (``strict``: see ``_identity_train``)."""
        record = self.as_dict()
        identity = {name: record[name] for name in TRIAL_KEY_FIELDS}
        defaults = _defaults(type(self))
        for name, value in record.items():
            if name not in TRIAL_KEY_FIELDS and value != defaults.get(name, _NO_DEFAULT):
                identity[name] = value
        identity["train"] = _identity_train(self.train, strict=strict)
        return identity

    @property
    def key(self) -> str:
        canonical = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:24]

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> TrialSpec:
        """A spec from a stored ``spec`` column or a flat trial dict (other keys are ignored)."""
        names = {spec_field.name for spec_field in fields(cls)}
        # Mappings a hand-edited or foreign row may lack read as empty, not as a crash.
        values: dict[str, Any] = {"train": {}, "options": {}}
        values.update({name: value for name, value in record.items() if name in names})
        missing = sorted(names - set(values))
        if missing:
            raise UserError(f"A stored trial lacks the fields {', '.join(missing)}: {dict(record)}")
        return cls(**values)


class CurvePoint(TypedDict):
    """One point of a learning curve, as stored (a non-finite float is stored as None)."""

    epoch: int
    step: int
    train_loss: float | None
    val_accuracy: float | None
    test_accuracy: float | None
    seconds: float


class StepTimeStats(TypedDict, total=False):
    """The timed steps of a trial (warm-up excluded); only ``count`` when none was timed."""

    count: int
    median: float
    mean: float
    p10: float
    p90: float


# The result fields a TrialRecord names; ``strategy`` and ``seed`` are stored in the result too but
# are the spec's.
_RESULT_FIELDS = (
    "test_accuracy",
    "val_accuracy",
    "train_params",
    "inference_params",
    "wall_time",
    "median_step_time",
    "step_time_stats",
    "curve",
    "diverged_at_step",
    "extra",
    "config",
)


@dataclass(frozen=True)
class TrialRecord:
    """A stored trial: its spec, its result fields, where it came from and when it finished."""

    key: str
    status: str  # FINISHED, DIVERGED or FAILED
    spec: TrialSpec
    test_accuracy: float | None
    val_accuracy: float | None
    train_params: int
    inference_params: int
    wall_time: float
    median_step_time: float | None  # None when no step was timed
    step_time_stats: StepTimeStats
    curve: tuple[CurvePoint, ...]
    diverged_at_step: int | None
    extra: Mapping[str, Any]  # what the strategy reported about itself (adv-mk's mean u, ...)
    config: Mapping[str, Any]  # the TrainConfig the training reported (equals spec.train)
    provenance: Mapping[str, Any]
    finished_at: float
    # Flat fields this version does not name (written by a newer sopkit): kept so that as_dict()
    # gives back what was stored.
    unknown: Mapping[str, Any] = field(default_factory=dict)
    # A FAILED trial's error: ``error_type``, ``message`` and ``traceback`` (TrialFailure's fields).
    failure: Mapping[str, Any] | None = None

    @property
    def diverged(self) -> bool:
        return self.diverged_at_step is not None

    @property
    def failed(self) -> bool:
        return self.status == FAILED

    @property
    def error(self) -> str:
        """A failed trial's error on one line ("RuntimeError: out of memory"); "" otherwise."""
        if self.failure is None:
            return ""
        return error_line(self.failure.get("error_type"), self.failure.get("message"))

    @classmethod
    def from_stored(
        cls,
        key: str,
        status: str,
        spec: Mapping[str, Any],
        result: Mapping[str, Any],
        provenance: Mapping[str, Any],
        finished_at: float,
        failure: Mapping[str, Any] | None = None,
    ) -> TrialRecord:
        """A record from the columns of a ``trials`` row (spec, result, provenance and failure
        parsed)."""
        spec_names = {spec_field.name for spec_field in fields(TrialSpec)}
        unknown = {k: v for k, v in spec.items() if k not in spec_names}
        unknown.update(
            {k: v for k, v in result.items() if k not in _RESULT_FIELDS and k not in spec_names}
        )
        return cls(
            key=key,
            status=status,
            spec=TrialSpec.from_dict(spec),
            test_accuracy=result.get("test_accuracy"),
            val_accuracy=result.get("val_accuracy"),
            train_params=result.get("train_params", 0),
            inference_params=result.get("inference_params", 0),
            wall_time=result.get("wall_time", 0.0),
            median_step_time=result.get("median_step_time"),
            step_time_stats=result.get("step_time_stats", {}),
            curve=tuple(result.get("curve", ())),
            diverged_at_step=result.get("diverged_at_step"),
            extra=result.get("extra", {}),
            config=result.get("config", {}),
            provenance=provenance,
            finished_at=finished_at,
            unknown=unknown,
            failure=dict(failure) if failure is not None else None,
        )

    def result_dict(self) -> dict[str, Any]:
        """The result fields as the ``result`` column holds them."""
        result: dict[str, Any] = {"strategy": self.spec.strategy, "seed": self.spec.seed}
        result.update({name: getattr(self, name) for name in _RESULT_FIELDS})
        result["curve"] = list(self.curve)
        return copy.deepcopy(result)

    def as_dict(self) -> dict[str, Any]:
        """The flat dict of spec, result and provenance that ``trials.jsonl`` and reports read."""
        flat: dict[str, Any] = {"key": self.key, "status": self.status, **self.spec.as_dict()}
        flat.update(self.result_dict())
        flat.update(copy.deepcopy(dict(self.unknown)))
        flat["provenance"] = copy.deepcopy(dict(self.provenance))
        flat["finished_at"] = self.finished_at
        if self.failure is not None:
            flat["failure"] = copy.deepcopy(dict(self.failure))
        return flat


ERROR_LINE_LIMIT = 300  # characters of an error message a report shows (trials.jsonl has it all)


def error_line(error_type: Any, message: Any) -> str:
    """An error as one line: its type and the first line of its message."""
    lines = str(message or "").strip().splitlines()
    first = lines[0].strip() if lines else ""
    more = " …" if len(lines) > 1 or len(first) > ERROR_LINE_LIMIT else ""
    first = first[:ERROR_LINE_LIMIT]
    kind = str(error_type or "Error")
    return f"{kind}: {first}{more}" if first else kind
