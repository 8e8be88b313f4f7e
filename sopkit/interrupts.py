"""Ctrl-C (SIGINT) handled so that a comparison keeps what finished and its reports stay whole.

Two things go wrong with Python's default handling:

- ``uv run`` forwards the terminal's SIGINT to the process, which on a terminal also gets the one
  the terminal sends its whole process group: one Ctrl-C arrives twice. The second would interrupt
  what the first started (writing the reports). :func:`interrupt_once` takes signals that arrive
  within :data:`REPEAT_GRACE_S` of the first as the same Ctrl-C; a later one interrupts again.
- A Ctrl-C in the middle of writing several files leaves some new and some old.
  :func:`deferred_sigint` holds SIGINT back while files are renamed into place
  (:func:`sopkit.files.staged_writes`), and delivers it after.

Signal handlers belong to the main thread: off it, both are no-ops.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["REPEAT_GRACE_S", "deferred_sigint", "interrupt_once"]

#: Seconds after a Ctrl-C during which another SIGINT is taken as the same Ctrl-C delivered twice.
REPEAT_GRACE_S = 1.0

_Handler = Callable[[int, FrameType | None], Any] | int | None


# When the latest SIGINT that raised arrived (time.monotonic): shared by nested interrupt_once
# blocks, so that the reports written after a Ctrl-C ignore its second copy too.
_last_interrupt: list[float] = []


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _deliver(previous: _Handler, frame: FrameType | None) -> None:
    """Hand a held-back SIGINT to the handler that was in place before."""
    if previous == signal.SIG_IGN:
        return
    if callable(previous):
        previous(signal.SIGINT, frame)
        return
    raise KeyboardInterrupt  # SIG_DFL, or a handler set outside Python: Python's default


@contextmanager
def deferred_sigint() -> Iterator[None]:
    """Hold SIGINT back while the block runs (keep it short), then deliver it once."""
    if not _in_main_thread():
        yield
        return
    held: list[FrameType | None] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append(frame)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        _deliver(previous, held[0])


@contextmanager
def interrupt_once(grace_s: float = REPEAT_GRACE_S) -> Iterator[None]:
    """Within the block, a SIGINT raises KeyboardInterrupt, but one that follows the previous one
    that raised by less than ``grace_s`` seconds is ignored (see the module's docstring). Blocks
    may nest (the reports written after an interrupt)."""
    if not _in_main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if _last_interrupt and now - _last_interrupt[-1] < grace_s:
            return
        _last_interrupt[:] = [now]
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
