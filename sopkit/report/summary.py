"""``summary.json`` and ``summary.csv``: every (group, strategy) of a comparison as data, for
scripts and spreadsheets (the numbers the reports show, unrounded)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sopkit.experiment.results import REFERENCE_STRATEGY
from sopkit.files import write_atomic
from sopkit.report.tables import coverage_warnings, teacher_wall_time

if TYPE_CHECKING:
    from sopkit.experiment.results import Group, StrategyResult
    from sopkit.report.meta import ReportMeta

SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"


def _jsonable(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null; tuples become lists; keys become strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


def strategy_record(group: Group, result: StrategyResult) -> dict[str, Any]:
    """One (group, strategy) of summary.json: the group's identity and everything measured."""
    record: dict[str, Any] = {
        "strategy": result.strategy,
        "dataset": group.dataset,
        "model": group.model,
        "optimizer": group.optimizer,
        "expansion": group.expansion,
        "train": dict(group.train),
        "lr_grid": list(group.lr_grid),
    }
    record.update(result.as_dict())
    paired = result.paired
    record["paired_difference"] = (
        None
        if paired is None
        else {
            "mean": paired.mean,
            "low": paired.low,
            "high": paired.high,
            "pairs": paired.pairs,
            "significant": paired.significant,
        }
    )
    teacher = teacher_wall_time(result)
    if teacher is not None:
        record["teacher_wall_time"] = teacher  # over all seeds, like wall_time
    return _jsonable(record)  # type: ignore[no-any-return]


def summary_payload(groups: Sequence[Group], meta: ReportMeta) -> dict[str, Any]:
    """summary.json's content."""
    return _jsonable(
        {
            "meta": asdict(meta),
            "reference": REFERENCE_STRATEGY,
            "strategies": [strategy_record(g, r) for g in groups for r in g.strategies],
            "missing_trials": coverage_warnings(groups),
            "complete": meta.complete,
        }
    )  # type: ignore[no-any-return]


CSV_COLUMNS = (
    "dataset",
    "model",
    "optimizer",
    "expansion",
    "epochs",
    "batch_size",
    "schedule",
    "strategy",
    "chosen_lr",
    "test_accuracy_mean",
    "test_accuracy_std",
    "val_accuracy_mean",
    "n_seeds",
    "seeds",
    "delta_mean",
    "delta_low",
    "delta_high",
    "pairs",
    "significant",
    "step_time_ratio",
    "median_step_time",
    "train_params",
    "inference_params",
    "wall_time",
    "teacher_wall_time",
    "diverged_trials",
    "failed_trials",
    "trials",
    "chosen_at_edge",  # "low" / "high": the chosen rate is the grid's smallest / largest
    "search_seeds",  # the seeds that chose the rate ("seeds" are the reported, confirmation ones)
)


def _csv_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return value


def summary_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """summary.csv's rows: one per (group, strategy), scalars only (lists joined with ';')."""
    rows = []
    for group in groups:
        for r in group.strategies:
            paired = r.paired
            row = {
                "dataset": group.dataset,
                "model": group.model,
                "optimizer": group.optimizer,
                "expansion": group.expansion,
                "epochs": group.train.get("epochs"),
                "batch_size": group.train.get("batch_size"),
                "schedule": group.train.get("schedule"),
                "strategy": r.strategy,
                "chosen_lr": r.chosen_lr,
                "chosen_at_edge": r.edge or "",
                "search_seeds": ";".join(map(str, r.search_seeds)),
                "test_accuracy_mean": r.test_accuracy_mean,
                "test_accuracy_std": r.test_accuracy_std,
                "val_accuracy_mean": r.val_accuracy_mean,
                "n_seeds": len(r.seeds),
                "seeds": ";".join(map(str, r.seeds)),
                "delta_mean": paired.mean if paired else None,
                "delta_low": paired.low if paired else None,
                "delta_high": paired.high if paired else None,
                "pairs": paired.pairs if paired else None,
                "significant": paired.significant if paired else None,
                "step_time_ratio": r.step_time_ratio,
                "median_step_time": r.median_step_time,
                "train_params": r.train_params,
                "inference_params": r.inference_params,
                "wall_time": r.wall_time,
                "teacher_wall_time": teacher_wall_time(r),
                "diverged_trials": len(r.diverged),
                "failed_trials": len(r.failed),
                "trials": r.trials,
            }
            rows.append({k: _csv_value(v) for k, v in row.items()})
    return rows


def write_summary(out_dir: Path, groups: Sequence[Group], meta: ReportMeta) -> list[Path]:
    """Write summary.json and summary.csv (atomically) into ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    json_path, csv_path = out_dir / SUMMARY_JSON, out_dir / SUMMARY_CSV
    text = json.dumps(summary_payload(groups, meta), indent=2, allow_nan=False, ensure_ascii=False)
    write_atomic(json_path, text + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(summary_rows(groups))
    write_atomic(csv_path, buffer.getvalue())
    return [json_path, csv_path]
