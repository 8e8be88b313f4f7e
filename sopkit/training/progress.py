"""Progress output for long work: a rich live display on a terminal, plain periodic lines otherwise.

CI logs and redirected output get one line per finished epoch and run, never a flood of redraws.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import TaskID

    from sopkit.training.types import EpochRecord, TrainResult


class Progress(Protocol):
    """What the training loop reports while it runs."""

    def run_started(self, label: str, total_steps: int) -> None: ...
    def advance(self, label: str) -> None: ...
    def epoch_finished(self, label: str, record: EpochRecord, epochs: int) -> None: ...
    def run_finished(self, label: str, result: TrainResult) -> None: ...
    def message(self, text: str) -> None: ...
    def jobs_done(self, done: int, total: int) -> None: ...


class NullProgress:
    """Reports nothing (library use and tests)."""

    def run_started(self, label: str, total_steps: int) -> None:
        pass

    def advance(self, label: str) -> None:
        pass

    def epoch_finished(self, label: str, record: EpochRecord, epochs: int) -> None:
        pass

    def run_finished(self, label: str, result: TrainResult) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def jobs_done(self, done: int, total: int) -> None:
        pass


class PlainProgress:
    """One line per epoch and per finished run, for logs that are not a terminal."""

    def __init__(self, stream=None) -> None:  # type: ignore[no-untyped-def]
        self.stream = stream or sys.stdout

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def run_started(self, label: str, total_steps: int) -> None:
        self._print(f"[{label}] training: {total_steps} steps")

    def advance(self, label: str) -> None:
        pass

    def epoch_finished(self, label: str, record: EpochRecord, epochs: int) -> None:
        self._print(
            f"[{label}] epoch {record.epoch}/{epochs}  loss {record.train_loss:.4f}  "
            f"val {record.val_accuracy:.2%}  {record.seconds:.1f}s"
        )

    def run_finished(self, label: str, result: TrainResult) -> None:
        self._print(f"[{label}] done: test {result.test_accuracy:.2%} in {result.wall_time:.1f}s")

    def message(self, text: str) -> None:
        self._print(text)

    def jobs_done(self, done: int, total: int) -> None:
        self._print(f"[{done}/{total} jobs done]")


class RichProgress:
    """A live progress bar per training, with the latest validation accuracy, on a terminal."""

    def __init__(self, console: Console) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._overall: TaskID | None = None
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RichProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def run_started(self, label: str, total_steps: int) -> None:
        self._tasks[label] = self._bar.add_task(label, total=total_steps, status="")

    def advance(self, label: str) -> None:
        self._bar.advance(self._tasks[label])

    def epoch_finished(self, label: str, record: EpochRecord, epochs: int) -> None:
        self._bar.update(
            self._tasks[label],
            status=f"epoch {record.epoch}/{epochs} val {record.val_accuracy:.2%}",
        )

    def run_finished(self, label: str, result: TrainResult) -> None:
        # A finished run leaves the live display (a grid has hundreds) and one line stays above it.
        self._bar.remove_task(self._tasks.pop(label))
        note = (
            f" [red]diverged at step {result.diverged_at_step}[/]"
            if result.diverged_at_step
            else ""
        )
        self.console.print(
            f"{label}: test {result.test_accuracy:.2%} in {result.wall_time:.1f}s{note}",
            highlight=False,
        )

    def message(self, text: str) -> None:
        self.console.print(text)

    def jobs_done(self, done: int, total: int) -> None:
        if self._overall is None:
            self._overall = self._bar.add_task("all jobs", total=total, status="")
        self._bar.update(self._overall, completed=done, total=total)


def progress_for(console: Console) -> RichProgress | PlainProgress:
    """A rich display on an interactive terminal, plain lines everywhere else (CI, pipes, files)."""
    if console.is_terminal and not console.is_dumb_terminal:
        return RichProgress(console)
    return PlainProgress(console.file)
