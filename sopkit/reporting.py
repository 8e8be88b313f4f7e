"""Regenerate every report of a comparison from its results database alone.

``sopkit compare`` calls this when it finishes (or is interrupted) and ``sopkit report DIR`` calls it
on an existing directory: both produce the same files from the same data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sopkit.errors import UserError
from sopkit.store import TrialStore

if TYPE_CHECKING:
    from rich.console import Console

TRIALS_FILE = "trials.jsonl"


def regenerate(
    out_dir: Path,
    *,
    console: Console | None = None,
    plan: Mapping[str, Any] | None = None,
    complete: bool | None = None,
    command: str = "",
) -> list[Path]:
    """Write report.md, report.html, summary.json, summary.csv and trials.jsonl into ``out_dir``.

    With ``plan`` (a ``compare.plan_record``), the reports cover exactly that plan's trials: a
    directory can hold several comparisons' trials, written by several processes at once. Without
    it, they cover every trial in the database, described by the latest plan stored there.
    ``complete`` overrides the check that every planned trial finished.
    """
    from sopkit.report import ReportMeta, print_report, write_all
    from sopkit.results import aggregate

    store = TrialStore.open_existing(out_dir)
    try:
        stored_plan = store.read_plan() or {}
        trials = store.trials()
    finally:
        store.close()
    if plan is None:
        plan = stored_plan
    else:
        trials = [t for t in trials if t["key"] in set(plan["trial_keys"])]
    planned = set(plan.get("trial_keys", []))
    if not trials:
        raise UserError(f"The results database in {out_dir} holds no finished trial yet.")
    if complete is None:
        complete = bool(planned) and planned <= {t["key"] for t in trials}
    groups = aggregate(trials, plan.get("strategies", ()))
    meta = ReportMeta(
        title=plan.get("preset") or f"{plan.get('dataset', trials[0]['dataset'])} comparison",
        preset=plan.get("preset"),
        command=command or plan.get("command", ""),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        provenance=trials[-1]["provenance"],
        complete=complete,
        grid_note=plan.get("grid_note", ""),
    )
    paths = write_all(out_dir, groups, meta)
    paths.append(_write_trials(out_dir / TRIALS_FILE, trials))
    if console is not None:
        print_report(console, groups, meta)
    return paths


def _write_trials(path: Path, trials: list[dict]) -> Path:
    """Every per-seed record the report's figures come from, one JSON object per line."""
    temporary = path.with_suffix(".jsonl.tmp")
    with temporary.open("w") as stream:
        for trial in trials:
            stream.write(json.dumps(trial, sort_keys=True) + "\n")
    os.replace(temporary, path)
    return path
