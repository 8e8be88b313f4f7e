"""What a report says about how its numbers were produced: the command, the grid, and the
provenance of its trials (git revision, versions, machine), with every distinct value when the
trials differ."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sopkit.experiment.records import TrialRecord

# The provenance a report shows (keys of ``sopkit.experiment.provenance.provenance()``), in
# reading order.
PROVENANCE_LABELS: tuple[tuple[str, str], ...] = (
    ("git_revision", "git revision"),
    ("python", "Python"),
    ("platform", "Platform"),
    ("cpu", "CPU"),
    ("cpu_capability", "torch CPU capability"),
    ("torch_threads", "torch threads"),
    ("cuda_device", "CUDA device"),
)
NO_REVISION = "unknown (not a git checkout)"
NO_COMMAND = "not recorded with these trials"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _shown(key: str, value: Any) -> str:
    """A provenance value as the report prints it (None has a meaning that depends on the key)."""
    if key == "git_revision":
        return str(value) if value else NO_REVISION
    if key.startswith("versions."):
        return str(value) if value else "not installed"
    return "none" if value is None else str(value)


def _flat_provenance(provenance: Mapping[str, Any]) -> dict[str, str]:
    """The shown keys of one trial's provenance, versions flattened to ``versions.NAME``."""
    flat = {key: _shown(key, provenance[key]) for key, _ in PROVENANCE_LABELS if key in provenance}
    for name, version in (provenance.get("versions") or {}).items():
        flat[f"versions.{name}"] = _shown(f"versions.{name}", version)
    return flat


@dataclass
class ReportMeta:
    """What a report says about how it was produced (its "How this was produced" section)."""

    title: str
    preset: str | None = None
    # The command line that produced the trials, stored with the plan; "" when it was not stored.
    command: str = ""
    created: str = field(default_factory=_now)  # when the report was written (ISO 8601)
    # The latest trial's: versions, git_revision, python, platform, cpu, cpu_capability,
    # torch_threads, cuda_device (sopkit.experiment.provenance).
    provenance: dict[str, Any] = field(default_factory=dict)
    complete: bool = True  # False: some planned trials have not finished; numbers may still change
    grid_note: str = ""  # e.g. "reduced grid: 5 rates 0.001*1.5^i for i in [-2..2], 3 seeds, ..."
    # Where the trials' provenance differs (two git revisions, two torch versions...): for each such
    # key ("git_revision", "versions.torch", ...), every value shown with its number of trials.
    provenance_spread: dict[str, dict[str, int]] = field(default_factory=dict)
    # What the edge extension did (sopkit.experiment.protocol.Extension.text), one line each.
    extensions: list[str] = field(default_factory=list)

    @classmethod
    def from_trials(cls, trials: Sequence[TrialRecord], *, title: str, **fields: Any) -> ReportMeta:
        """Meta whose provenance is the latest trial's, and whose ``provenance_spread`` counts the
        trials behind every value of every shown key on which the trials disagree (a report mixing
        code versions or machines must say so)."""
        ordered = sorted(trials, key=lambda t: t.finished_at)
        flats = [_flat_provenance(t.provenance) for t in ordered]
        counts: dict[str, dict[str, int]] = {}
        for flat in flats:
            for key in flat:
                counts.setdefault(key, {})
        for flat in flats:  # in time order: the oldest value first
            for key, values in counts.items():
                value = flat.get(key, "not recorded")
                values[value] = values.get(value, 0) + 1
        spread = {key: values for key, values in counts.items() if len(values) > 1}
        return cls(
            title=title,
            provenance=dict(ordered[-1].provenance) if ordered else {},
            provenance_spread=spread,
            **fields,
        )


def _trials(count: int) -> str:
    return f"{count} trial{'s' if count != 1 else ''}"


def _spread_text(values: Mapping[str, int]) -> str:
    """{'abc': 3, 'def': 1} -> 'abc (3 trials), def (1 trial)'."""
    return ", ".join(f"{value} ({_trials(count)})" for value, count in values.items())


def provenance_items(meta: ReportMeta) -> list[tuple[str, str]]:
    """(label, value) pairs for the "How this was produced" section, in reading order."""
    provenance, spread = meta.provenance, meta.provenance_spread
    items = [
        ("Complete", "yes" if meta.complete else "NO: some planned trials had not finished"),
        ("Preset", meta.preset or "none (options given on the command line)"),
        ("Learning-rate grid, seeds, epochs", meta.grid_note or "see the table below"),
        ("Report written", meta.created),
    ]
    items += [("Grid extended", text) for text in meta.extensions]
    if not meta.command:
        items.append(("Command", NO_COMMAND))
    revisions = spread.get("git_revision")
    if revisions:
        items.append(
            (
                "git revision",
                f"the trials come from {len(revisions)} revisions: {_spread_text(revisions)}",
            )
        )
    else:
        items.append(("git revision", _shown("git_revision", provenance.get("git_revision"))))
    for key, label in PROVENANCE_LABELS[1:]:
        if key in spread:
            items.append((label, _spread_text(spread[key])))
        elif key in provenance:
            items.append((label, _shown(key, provenance[key])))
    names = list(provenance.get("versions") or {})
    names += [k.removeprefix("versions.") for k in spread if k.startswith("versions.")]
    versions = []
    for name in dict.fromkeys(names):
        values = spread.get(f"versions.{name}")
        if values:
            shown = " / ".join(f"{v} ({_trials(n)})" for v, n in values.items())
            versions.append(f"{name} {shown}")
        else:
            versions.append(f"{name} {_shown('versions.', provenance['versions'].get(name))}")
    if versions:
        items.append(("Versions", ", ".join(versions)))
    return items
