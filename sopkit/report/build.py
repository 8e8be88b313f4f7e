"""Every report of a comparison, written from its groups (:func:`write_all`) or regenerated from
its results database alone (:func:`regenerate`).

``sopkit compare`` regenerates when it finishes (or is interrupted) and ``sopkit report DIR`` on an
existing directory: both produce the same files from the same data. The files are written together
(:func:`sopkit.files.staged_writes`): a Ctrl-C or an error leaves them all as they were or all new.
Reading needs no write access to the database; the files go beside it, or where ``report_dir`` says.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sopkit.errors import UserError
from sopkit.files import staged_writes, write_atomic
from sopkit.report.figures import draw_figures
from sopkit.report.html import write_html
from sopkit.report.markdown import write_markdown
from sopkit.report.meta import ReportMeta
from sopkit.report.summary import write_summary

if TYPE_CHECKING:
    from rich.console import Console

    from sopkit.experiment.records import TrialRecord
    from sopkit.experiment.results import Group
    from sopkit.report.figures import FigureSpec

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
FIGURES_DIR = "figures"
TRIALS_FILE = "trials.jsonl"
# What a comparison's run adds to its stored plan (sopkit.experiment.protocol's stages).
PROTOCOL_KEYS = ("protocol_keys", "extensions", "confirmation_seeds")


def _write_pngs(out_dir: Path, specs: Sequence[FigureSpec]) -> list[Path]:
    return [write_atomic(out_dir / f"{spec.slug}.png", spec.png) for spec in specs]


def write_all(out_dir: Path, groups: Sequence[Group], meta: ReportMeta) -> list[Path]:
    """Every report of a comparison: summary.json, summary.csv, report.md, report.html, and the
    figures as PNG under figures/ (which report.md embeds). Returns the paths written.

    The summaries are written first: whatever happens to the figures, the numbers are on disk.
    """
    out_dir = Path(out_dir)
    paths = write_summary(out_dir, groups, meta)
    try:
        figures = draw_figures(groups) if groups else []
        figure_error = None
    except Exception as error:  # a plotting failure must not cost the tables
        figures, figure_error = [], error
    pngs = _write_pngs(out_dir / FIGURES_DIR, figures)
    embedded = [
        (f"{FIGURES_DIR}/{p.name}", spec.title) for p, spec in zip(pngs, figures, strict=True)
    ]
    paths.insert(0, write_markdown(out_dir / REPORT_MD, groups, meta, embedded))
    paths.insert(1, write_html(out_dir / REPORT_HTML, groups, meta, figures))
    if figure_error is not None:
        # Said loudly but not raised: the tables and summaries are already written.
        import warnings

        warnings.warn(
            f"sopkit: the report's figures could not be drawn: {figure_error!r}", stacklevel=2
        )
    return paths + pngs


def regenerate(
    out_dir: Path,
    *,
    console: Console | None = None,
    plan: Mapping[str, Any] | None = None,
    complete: bool | None = None,
    report_dir: Path | None = None,
) -> list[Path]:
    """Write report.md, report.html, summary.json, summary.csv and trials.jsonl into ``report_dir``
    (default: ``out_dir``, the comparison's directory, which holds the database).

    With ``plan`` (a stored plan record), the reports cover exactly that plan's trials: a directory
    can hold several comparisons' trials, written by several processes at once. Without it, they
    cover every trial in the database, described by the latest plan stored there. The command
    line shown is the one stored with the plan (none for a plan stored without one), never the
    command that regenerates. ``complete`` overrides the check that every planned trial finished
    (a failed trial has not).
    """
    from sopkit.experiment.protocol import extension_texts
    from sopkit.experiment.results import aggregate
    from sopkit.experiment.store import TrialStore
    from sopkit.report.terminal import print_report

    report_dir = Path(out_dir if report_dir is None else report_dir)
    _check_writable(report_dir, out_dir)
    with TrialStore.open_existing(out_dir) as store:
        stored_plan = store.read_plan() or {}
        trials = store.trials()
    if plan is None:
        plan = stored_plan
    else:
        if stored_plan.get("trial_keys") == plan["trial_keys"]:
            # The same comparison, as its run stored it: with its protocol stages' trials.
            plan = {**plan, **{k: v for k, v in stored_plan.items() if k in PROTOCOL_KEYS}}
        keys = set(plan["trial_keys"]) | set(plan.get("protocol_keys", []))
        trials = [t for t in trials if t.key in keys]
    planned = set(plan.get("trial_keys", [])) | set(plan.get("protocol_keys", []))
    if not trials:
        raise UserError(f"The results database in {out_dir} holds no finished trial yet.")
    groups = aggregate(trials, plan.get("strategies", ()), plan.get("confirmation_seeds", ()))
    if complete is None:
        complete = bool(planned) and planned <= {t.key for t in trials if not t.failed}
        # Confirmation trials are planned from the search's results: until then, none are listed.
        complete = complete and all(
            len(r.seeds) >= len(plan.get("confirmation_seeds", ()))
            for g in groups
            for r in g.strategies
            if r.chosen_lr is not None
        )
    meta = ReportMeta.from_trials(
        trials,
        title=plan.get("preset") or f"{plan.get('dataset', trials[0].spec.dataset)} comparison",
        preset=plan.get("preset"),
        command=plan.get("command") or "",
        complete=complete,
        grid_note=plan.get("grid_note", ""),
        extensions=extension_texts(plan.get("extensions", [])),
    )
    try:
        with staged_writes():
            paths = write_all(report_dir, groups, meta)
            paths.append(_write_trials(report_dir / TRIALS_FILE, trials))
    except OSError as error:
        raise UserError(
            f"Cannot write the reports into {report_dir}: {error}. Nothing there was changed; "
            f"`sopkit report {out_dir} --out OTHER_DIR` writes them elsewhere."
        ) from None
    if console is not None:
        print_report(console, groups, meta)
    return paths


def _check_writable(report_dir: Path, out_dir: Path) -> None:
    """Say so before reading anything when the reports cannot be written where they go."""
    existing = report_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"Cannot write the reports into {report_dir}: {existing} is read-only. The results "
            f"database is read as it is: `sopkit report {out_dir} --out OTHER_DIR` writes them "
            "elsewhere."
        )


def _write_trials(path: Path, trials: Sequence[TrialRecord]) -> Path:
    """Every per-seed record the report's figures come from, one flat JSON object per line."""
    lines = (json.dumps(t.as_dict(), sort_keys=True) + "\n" for t in trials)
    return write_atomic(path, "".join(lines))
