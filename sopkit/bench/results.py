"""What ``sopkit bench`` measured: a row per strategy or loop (:class:`EntryResult`) and the whole
report (:class:`BenchReport`), with the record ``bench.json`` holds."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from sopkit.bench.config import BenchConfig

BASELINE = "baseline"
PLAIN = "plain loop"
PLAIN_DEFAULTS = "plain loop, torch.optim defaults"


@dataclass
class EntryResult:
    """One row of the report: a strategy (or a plain loop) and what its step costs."""

    name: str
    measured: bool
    note: str = ""
    step_ms: list[float] = field(default_factory=list)  # per round: median step time (ms)
    cpu_ms: list[float] = field(default_factory=list)  # per round: process CPU time per step (ms)
    ratios: list[float] = field(default_factory=list)  # per round: step time / baseline's
    train_params: int | None = None
    state_bytes: int | None = None  # parameters + gradients + optimizer state
    saved_bytes: int | None = None  # kept by autograd for backward, parameters not counted
    peak_bytes: int | None = None  # CUDA only: peak allocated during warm-up above the start

    @property
    def median_ms(self) -> float:
        return statistics.median(self.step_ms) if self.step_ms else math.nan

    @property
    def median_cpu_ms(self) -> float:
        return statistics.median(self.cpu_ms) if self.cpu_ms else math.nan

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios) if self.ratios else math.nan

    @property
    def ratio_iqr(self) -> tuple[float, float]:
        if len(self.ratios) < 2:
            return (self.ratio, self.ratio)
        q = statistics.quantiles(self.ratios, n=4, method="inclusive")
        return (q[0], q[2])

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["median_step_ms"] = self.median_ms
        record["median_cpu_ms"] = self.median_cpu_ms
        record["ratio"] = self.ratio
        record["ratio_iqr"] = list(self.ratio_iqr)
        return record


@dataclass
class BenchReport:
    """Everything ``sopkit bench`` measured, and how."""

    config: BenchConfig
    device: str
    threads: int
    strategies: list[EntryResult]
    loop: list[EntryResult]  # sopkit's baseline step and the hand-written loops
    provenance: dict[str, Any]
    rounds: int = 0  # timing rounds that finished (fewer than config.repeats when interrupted)
    notes: list[str] = field(default_factory=list)

    def entry(self, name: str) -> EntryResult:
        for entry in self.strategies + self.loop:
            if entry.name == name:
                return entry
        raise KeyError(name)

    @property
    def loop_ratio(self) -> float:
        """sopkit's baseline step over the hand-written loop's (same optimizer)."""
        return 1.0 / self.entry(PLAIN).ratio

    def to_record(self) -> dict[str, Any]:
        config = asdict(self.config)
        config["options"] = dict(self.config.options)
        return {
            "config": config,
            "device": self.device,
            "threads": self.threads,
            "data": "synthetic: standard-normal inputs, uniform random labels",
            "method": (
                f"{self.config.warmup} warm-up steps, then {self.config.repeats} interleaved rounds "
                f"of {self.config.steps} steps per strategy; ratio = median over rounds of "
                "(median step time / baseline's in the same round)"
            ),
            "strategies": {e.name: e.to_record() for e in self.strategies},
            "loop": {e.name: e.to_record() for e in self.loop},
            "loop_ratio": self.loop_ratio,
            "rounds_timed": self.rounds,
            "provenance": self.provenance,
            "notes": self.notes,
        }
