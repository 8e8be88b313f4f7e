"""``sopkit compare``: train several strategies on one data set and model, over several seeds.

Runs are interleaved (every strategy for seed 0, then for seed 1, ...) so that all strategies see the
machine in the same state, and step-time ratios against ``baseline`` come from the same process.
Every finished run is appended to ``runs.jsonl`` at once (flushed and fsynced), so an interrupted
comparison loses nothing it finished; ``summary.json`` is rewritten after every run.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sopkit.errors import UserError

if TYPE_CHECKING:
    from sopkit.progress import Progress
    from sopkit.train import TrainConfig, TrainResult

REFERENCE_STRATEGY = "baseline"


@dataclass(frozen=True)
class CompareConfig:
    """One comparison: what to train, on what, how often, and where the results go."""

    dataset: str = "mnist1d"
    model: str = "mlp-a2"
    strategies: tuple[str, ...] = ("baseline", "mk")
    seeds: int = 3
    first_seed: int = 0
    expansion: int = 3
    device: str = "auto"
    data_dir: str | None = None
    download: bool = False
    options: dict[str, str] = field(default_factory=dict)
    out_dir: str = "runs/latest"

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise UserError(f"--seeds must be a positive number, got {self.seeds}.")
        if self.expansion < 2:
            raise UserError(f"--expansion must be at least 2, got {self.expansion}.")
        if not self.strategies:
            raise UserError("--strategies is empty: name at least one strategy.")
        duplicates = sorted({s for s in self.strategies if self.strategies.count(s) > 1})
        if duplicates:
            raise UserError(f"--strategies names {', '.join(duplicates)} more than once.")

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))


@dataclass
class StrategySummary:
    """One row of the comparison table: a strategy's results aggregated over seeds."""

    strategy: str
    seeds: list[int]
    test_accuracy_mean: float
    test_accuracy_std: float
    val_accuracy_mean: float
    train_params: int
    inference_params: int
    median_step_time: float
    step_time_ratio: float | None  # against baseline's median step time in the same comparison
    wall_time: float  # total over seeds, including the training of members/teachers it reused
    diverged_seeds: list[int]
    extra: dict[str, Any] = field(default_factory=dict)


def summarize(results: Sequence[TrainResult]) -> list[StrategySummary]:
    """Aggregate per-seed results into one summary per strategy, in first-seen order."""
    by_strategy: dict[str, list[TrainResult]] = {}
    for result in results:
        by_strategy.setdefault(result.strategy, []).append(result)
    reference = by_strategy.get(REFERENCE_STRATEGY)
    reference_step = _median_step(reference) if reference else math.nan
    summaries = []
    for name, runs in by_strategy.items():
        accuracies = [r.test_accuracy for r in runs]
        step = _median_step(runs)
        ratio = step / reference_step if reference and reference_step > 0 else None
        extra: dict[str, Any] = {}
        for key in sorted({k for r in runs for k in r.extra}):
            values = [r.extra[key] for r in runs if isinstance(r.extra.get(key), int | float)]
            if values:
                extra[key] = statistics.fmean(values)
        summaries.append(
            StrategySummary(
                strategy=name,
                seeds=[r.seed for r in runs],
                test_accuracy_mean=statistics.fmean(accuracies),
                test_accuracy_std=statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                val_accuracy_mean=statistics.fmean(r.val_accuracy for r in runs),
                train_params=runs[0].train_params,
                inference_params=runs[0].inference_params,
                median_step_time=step,
                step_time_ratio=ratio,
                wall_time=sum(r.wall_time for r in runs),
                diverged_seeds=[r.seed for r in runs if r.diverged_at_step is not None],
                extra=extra,
            )
        )
    return summaries


def _median_step(runs: Sequence[TrainResult]) -> float:
    times = [t for r in runs for t in r.step_times]
    return statistics.median(times) if times else math.nan


class ResultWriter:
    """Writes per-run records as they finish and the summary after each, in ``out_dir``."""

    def __init__(self, out_dir: Path, config: CompareConfig, train_config: TrainConfig) -> None:
        from sopkit.provenance import provenance

        self.out_dir = out_dir
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"Cannot create the output directory {out_dir}: {error}.") from None
        self.header = {
            "config": asdict(config),
            "train_config": asdict(train_config),
            "provenance": provenance(),
        }
        self.runs_path = out_dir / "runs.jsonl"
        self.runs_path.write_text("")

    def add_run(self, result: TrainResult) -> None:
        record = {**result.to_record(), "git_revision": self.header["provenance"]["git_revision"]}
        with self.runs_path.open("a") as stream:
            stream.write(json.dumps(record, default=_jsonable) + "\n")
            stream.flush()
            os.fsync(stream.fileno())

    def write_summary(self, summaries: Sequence[StrategySummary], complete: bool) -> Path:
        path = self.out_dir / "summary.json"
        payload = {
            **self.header,
            "complete": complete,
            "reference": REFERENCE_STRATEGY,
            "strategies": [asdict(s) for s in summaries],
            "runs_file": self.runs_path.name,
        }
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
        os.replace(temporary, path)  # atomic: a reader never sees half a summary
        return path


def _jsonable(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def run_comparison(
    config: CompareConfig, train_config: TrainConfig, progress: Progress
) -> tuple[list[StrategySummary], Path]:
    """Train every strategy for every seed; return the summaries and the summary file's path."""
    from sopkit.data import load_dataset
    from sopkit.models import build_model
    from sopkit.registry import create_strategy
    from sopkit.strategy import StrategySettings
    from sopkit.train import TrainingSession, select_device

    device = select_device(config.device)
    settings = StrategySettings(expansion=config.expansion, options=dict(config.options))
    # Instantiate every strategy before any training so a typo fails in a second, not an hour in.
    strategies = [create_strategy(name, settings) for name in config.strategies]
    data = load_dataset(config.dataset, data_dir=config.data_dir, download=config.download)
    data = data.to(device)

    def build() -> Any:
        return build_model(config.model, input_shape=data.input_shape, num_classes=data.num_classes)

    build()  # fail fast on a model that does not fit the data
    writer = ResultWriter(Path(config.out_dir), config, train_config)
    results: list[TrainResult] = []
    complete = False
    try:
        for seed in config.seed_list:
            session = TrainingSession(
                data, build, train_config, device=device, seed=seed, progress=progress
            )
            for strategy in strategies:
                result = strategy.fit(session)
                results.append(result)
                writer.add_run(result)
                writer.write_summary(summarize(results), complete=False)
        complete = True
    finally:
        summaries = summarize(results)
        path = writer.write_summary(summaries, complete=complete)
    return summaries, path
