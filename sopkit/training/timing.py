"""``StepTimer``: the wall-clock time of every training step after a warm-up."""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["StepTimer"]


class StepTimer:
    """Wall-clock time of every training step after a warm-up.

    On CUDA, events recorded at step boundaries measure the GPU timeline (gaps where the GPU waits
    for the CPU included) without synchronising every step; they are resolved once at the end.
    """

    def __init__(self, device: torch.device, warmup_steps: int) -> None:
        self.cuda = device.type == "cuda"
        self.warmup_steps = warmup_steps
        self.count = 0
        self._times: list[float] = []
        self._events: list[tuple[Any, Any]] = []
        self._start: Any = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        self.count += 1
        if self.count <= self.warmup_steps:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start, end))
        else:
            self._times.append(time.perf_counter() - self._start)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the timer: the steps counted and the timed durations."""
        return {"count": self.count, "times": self.seconds()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue counting and timing from ``state`` (as ``state_dict`` returned it)."""
        self.count = int(state["count"])
        self._times = [float(seconds) for seconds in state["times"]]
        self._events.clear()

    def seconds(self) -> list[float]:
        """The timed steps' durations in seconds (on CUDA this waits for the device once)."""
        if self.cuda and self._events:
            torch.cuda.synchronize()
            self._times.extend(s.elapsed_time(e) / 1000 for s, e in self._events)
            self._events.clear()
        return list(self._times)
