"""``sopkit bench --compile``: every timed strategy also compiled by the loop, as a row of its own.

A compiled row is the strategy set up exactly as its eager row, with ``TrainConfig.compile`` on, so
``TrainingState.start`` compiles its prepared model (:mod:`sopkit.training.compiling`). Its ratio is
against the eager baseline, like every other row; its note gives its step against its own eager
step, in wall and in CPU time (paired per round, median over rounds). Compiling happens in its
warm-up, which is at least one step, so no timed step compiles.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import replace

import torch
from torch import nn

from sopkit.bench.config import BenchConfig
from sopkit.bench.entries import Batch, Entry, strategy_entry, warm_up_and_measure_memory
from sopkit.bench.results import EntryResult
from sopkit.data.splits import DataSplits
from sopkit.training.config import TrainConfig
from sopkit.training.strategy import Strategy

__all__ = ["SUFFIX", "compiled_entry", "compiled_name", "describe_compiled", "with_compiled"]

SUFFIX = " (compiled)"


def compiled_name(name: str) -> str:
    """The row of strategy ``name`` compiled."""
    return name + SUFFIX


def compiled_entry(
    name: str,
    strategy: Strategy,
    config: BenchConfig,
    train_config: TrainConfig,
    device: torch.device,
    data: DataSplits,
    build: Callable[[], nn.Module],
    batches: list[Batch],
) -> Entry:
    """``strategy``'s entry with its model compiled by the loop, compiled and warmed up."""
    compiled_config = replace(train_config, compile=True)
    entry = strategy_entry(
        compiled_name(name), strategy, config, compiled_config, device, data, build
    )
    warm_up_and_measure_memory(entry, device, batches, max(config.warmup, 1))
    entry.result.note = "; ".join(filter(None, [entry.result.note, "torch.compile"]))
    return entry


def describe_compiled(results: Mapping[str, EntryResult]) -> None:
    """Note on each timed compiled row its step time against its eager row's (after timing)."""
    for name, eager in results.items():
        compiled = results.get(compiled_name(name))
        if compiled is None or not (compiled.step_ms and eager.step_ms):
            continue
        wall = [c / e for c, e in zip(compiled.step_ms, eager.step_ms, strict=True)]
        cpu = [c / e for c, e in zip(compiled.cpu_ms, eager.cpu_ms, strict=True) if e > 0]
        compiled.note = f"{compiled.note}; {statistics.median(wall):.2f}x eager {name}'s step"
        if cpu:  # the steadier number on a shared machine (see the CPU ms column)
            compiled.note += f" ({statistics.median(cpu):.2f}x its CPU time)"


def with_compiled(names: list[str], results: Mapping[str, EntryResult]) -> list[str]:
    """``names`` with each one's compiled row, where there is one, right after it."""
    ordered: list[str] = []
    for name in names:
        ordered.append(name)
        if compiled_name(name) in results:
            ordered.append(compiled_name(name))
    return ordered
