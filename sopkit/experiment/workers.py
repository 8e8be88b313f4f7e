"""The life of a ``--jobs N`` worker pool: workers that end with the main process, and a grid that
goes on when a job fails or a worker dies.

- :func:`prepare_worker` runs first in every worker (the pool's initializer calls it). A worker
  stops within a second or so of its main process's death, SIGKILL included (the kernel's OOM
  killer sends that to the biggest process alone): on Linux the kernel kills it
  (``prctl(PR_SET_PDEATHSIG)``), elsewhere a thread sees the parent gone. A worker ignores Ctrl-C:
  the main process stops the pool (:func:`stop_workers`) and writes the reports.
- :func:`settle_job` takes a finished job's future: a job that raised has its unfinished trials
  recorded as failed (:func:`record_job_failure`); one whose worker died is handed back to run again.
- :func:`next_round` decides what runs again after a pool broke: the same jobs in a fresh pool, and
  after a second break one at a time, so that the job that kills its worker is found, recorded as
  failed, and the others go on.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any

from sopkit.errors import UserError
from sopkit.experiment.outcome import TrialFailure, TrialOutcome
from sopkit.experiment.store import TrialStore

if TYPE_CHECKING:
    from sopkit.experiment.plan import Job
    from sopkit.experiment.runner import PlanRunner

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
#: How often the fallback thread looks for the parent (seconds).
PARENT_POLL_S = 0.5


class WorkerDied(RuntimeError):
    """A job's worker process ended without an answer (killed, out of memory, a crash in native
    code), in a pool of one worker, so this job was the one running."""


def _parent_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now holds the number: ours is gone
        return False
    return True


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent_pid:  # re-parented: the main process is gone
            os._exit(1)


def stop_with_parent() -> None:
    """End this process when the process that started it ends (called in a pool worker)."""
    if sys.platform == "win32":  # no re-parenting to watch, and os.kill would kill
        return
    parent = multiprocessing.parent_process()
    expected = parent.pid if parent is not None and parent.pid is not None else os.getppid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    parent_pid = os.getppid()
    if parent_pid != expected and not _parent_alive(expected):
        os._exit(1)  # the main process died before the kernel was told to watch it
    threading.Thread(
        target=_watch_parent, args=(parent_pid,), name="sopkit-parent-watch", daemon=True
    ).start()


def prepare_worker() -> None:
    """What every ``--jobs`` worker does first: end with the main process, and leave Ctrl-C to it
    (a terminal sends SIGINT to the whole process group; the main process stops the pool)."""
    stop_with_parent()
    with contextlib.suppress(ValueError):  # only possible in the main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_workers(pool: ProcessPoolExecutor) -> None:
    """Stop ``pool`` now (Ctrl-C or an error in the main process): cancel what has not started and
    terminate the running workers (their finished trials are committed; a trial cut off mid-way is
    not, and runs again on resume)."""
    processes: dict[int, Any] = dict(getattr(pool, "_processes", None) or {})
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes.values():
        with contextlib.suppress(Exception):
            process.terminate()


def record_job_failure(runner: PlanRunner, job: Job, error: BaseException) -> None:
    """Record every unfinished trial of ``job`` as failed with ``error`` (from the main process:
    the job's worker could not record it itself)."""
    failure = TrialFailure.from_exception(error)
    with TrialStore(runner.database) as store:
        done = store.done_keys()
        for spec in job.specs:
            if spec.key not in done:
                runner.commit(TrialOutcome(spec, failure=failure), store)


def settle_job(runner: PlanRunner, job: Job, future: Future[Any], broken: list[Job]) -> None:
    """A finished job's future: nothing to do when it ran, its trials failed when it raised, and
    into ``broken`` when its worker died (the pool is then broken: every job still in it too).

    A UserError (the database became unwritable, say) is the user's to fix: it stops the grid.
    """
    try:
        future.result()
    except BrokenProcessPool:
        broken.append(job)
    except UserError:
        raise
    except Exception as error:
        record_job_failure(runner, job, error)


def next_round(runner: PlanRunner, broken: Sequence[Job], breaks: int) -> tuple[list[Job], int]:
    """After a round of the pool (``breaks`` rounds in a row broke before it): the jobs to run
    again and the new count of breaks; :func:`round_workers` gives the pool size for it.

    A first break runs the broken jobs again as before: a worker may have died of something outside
    its job (memory another process took). A second runs them in one worker, so that the next break
    names its job: in a pool of one, the first broken job (in submission order) is the one that was
    running. That job is recorded as failed and the rest go on in full.
    """
    remaining = list(broken)
    if not remaining:
        return [], 0
    if breaks < 2:
        return remaining, breaks + 1
    culprit, *rest = remaining
    record_job_failure(
        runner,
        culprit,
        WorkerDied(
            "the worker process running this job died without an answer (killed, out of memory, "
            "or a crash in native code): twice in a pool with other jobs, then alone"
        ),
    )
    return rest, 0


def round_workers(jobs: int, breaks: int) -> int:
    """The pool size for a round after ``breaks`` broken rounds in a row (see :func:`next_round`)."""
    return 1 if breaks >= 2 else jobs
