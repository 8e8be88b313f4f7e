"""``sopkit bench``: what one training step of each strategy costs against the baseline's.

* :mod:`~sopkit.bench.config`: what is measured (:class:`BenchConfig`) and its command line;
* :mod:`~sopkit.bench.entries`: what is timed, set up as the training loop sets it up;
* :mod:`~sopkit.bench.run`: the measurement (:func:`run_bench`), and how it is made;
* :mod:`~sopkit.bench.results`: what was measured (:class:`BenchReport`);
* :mod:`~sopkit.bench.report`: its tables, ``bench.md``, ``bench.png`` and ``bench.json``.

Only the measurement imports torch; :func:`run_bench` loads it when first asked for, so the
configuration can be read without it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from sopkit.bench.config import BenchConfig, command_line, parse_input_shape
from sopkit.bench.report import print_report, render_markdown, write_report
from sopkit.bench.results import BenchReport, EntryResult

if TYPE_CHECKING:
    from sopkit.bench.run import run_bench

__all__ = [
    "BenchConfig",
    "BenchReport",
    "EntryResult",
    "command_line",
    "parse_input_shape",
    "print_report",
    "render_markdown",
    "run_bench",
    "write_report",
]


def __getattr__(name: str) -> Any:
    if name == "run_bench":
        return import_module("sopkit.bench.run").run_bench
    raise AttributeError(f"module 'sopkit.bench' has no attribute {name!r}")
