"""Where the jobs of a plan run besides this process: a pool of local worker processes
(``--jobs N``) or Ray tasks on a cluster (``--executor ray``).

Both train with :meth:`PlanRunner.train` and commit with :meth:`PlanRunner.commit`; they differ in
which process commits. A local worker shares this machine's disk, so it commits its own trials to
``results.sqlite``. A Ray task may run on another machine, and SQLite must not be shared over a
network file system, so a task returns its trials' outcomes and the driver, the only writer,
commits them as soon as the task ends: a killed driver loses nothing that had committed, and the
same command resumes. Both wait on ``concurrent.futures`` futures (``ObjectRef.future()`` for
Ray) in one loop, :func:`_wait_for`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from sopkit.errors import UserError
from sopkit.experiment.outcome import TrialOutcome
from sopkit.experiment.plan import ComparePlan, Execution, Job
from sopkit.experiment.records import TrialSpec
from sopkit.experiment.runner import PlanRunner
from sopkit.experiment.store import TrialStore
from sopkit.experiment.workers import (
    next_round,
    prepare_worker,
    record_job_failure,
    round_workers,
    settle_job,
    stop_workers,
)

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized

    from sopkit.training.progress import Progress

__all__ = ["RAY_INSTALL", "check_ray", "import_ray", "run_in_pool", "run_on_ray",
           "settle_ray_job", "worker_cuda_index", "worker_plan"]

T = TypeVar("T")

#: How to get the optional extra that ``--executor ray`` needs.
RAY_INSTALL = "pip install 'sopkit[ray]'"
#: How often Ray runs a trial again whose worker or node died (an exception is not retried: it is
#: the trial's own failure, recorded as such).
RAY_MAX_RETRIES = 3
#: Seconds to wait for a TCP answer from --ray-address before saying nobody is there (ray.init
#: itself keeps retrying an absent cluster for about a minute).
CONNECT_TIMEOUT_S = 5.0


def _wait_for(
    futures: Sequence[Future[T]],
    on_done: Callable[[Future[T]], object],
    progress: Progress,
    cancel: Callable[[], None],
) -> None:
    """Hand every future to ``on_done`` as it completes, counting finished jobs on ``progress``;
    on any error (a job's, or Ctrl-C) ``cancel`` what is still running and re-raise."""
    running = set(futures)
    finished = 0
    try:
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                on_done(future)
                finished += 1
                progress.jobs_done(finished, len(futures))
    except BaseException:
        cancel()
        raise


# ---- the local pool ------------------------------------------------------------------------------


def worker_cuda_index(worker: int, device_count: int) -> int | None:
    """The CUDA device the ``worker``-th process of a local pool trains on: round-robin over the
    visible GPUs when there are several, so that ``--jobs N`` spreads over them; None with one GPU
    or none (the plan's device is used as it is)."""
    if device_count < 2:
        return None
    return worker % device_count


def worker_plan(plan: ComparePlan, worker: int, device_count: int) -> ComparePlan:
    """``plan`` as the ``worker``-th pool process runs it: on its own GPU (``cuda:i``) when several
    are visible and the plan's device is ``auto`` or ``cuda``; an explicit ``cuda:N``, ``cpu`` or
    ``mps`` is kept. The device is not part of a trial's key, so results are stored alike."""
    index = worker_cuda_index(worker, device_count)
    if index is None or plan.device not in ("auto", "cuda"):
        return plan
    return replace(plan, device=f"cuda:{index}")


#: The runner of this worker process (``--jobs N``), made by the pool's initializer.
_worker_runner: PlanRunner | None = None


def _start_worker(
    plan: ComparePlan,
    database: Path,
    threads: int,
    data_workers: int,
    counter: Synchronized[int],
    checkpoint_every: float | None = None,
) -> None:
    """The pool's initializer: number this worker, pick its GPU, make its runner."""
    prepare_worker()  # ends with the main process (even a SIGKILLed one); Ctrl-C is the main's
    import torch

    global _worker_runner
    with counter.get_lock():
        worker = counter.value
        counter.value += 1
    plan = worker_plan(plan, worker, torch.cuda.device_count())
    if plan.device.startswith("cuda:"):
        # Kernels that launch on the current device (Triton's) must agree with the tensors'.
        torch.cuda.set_device(torch.device(plan.device))
    _worker_runner = PlanRunner(plan, database, threads, data_workers, checkpoint_every)


def _run_job_in_worker(job: Job) -> int:
    assert _worker_runner is not None, "the pool's initializer makes the runner"
    return _worker_runner.run_job(job)


def _worker_device() -> str:
    """The device this pool worker trains on (for tests that check the GPU assignment)."""
    assert _worker_runner is not None, "the pool's initializer makes the runner"
    return _worker_runner.plan.device


def local_pool(runner: PlanRunner, execution: Execution) -> ProcessPoolExecutor:
    """``execution.jobs`` spawned worker processes, each with its runner (and its GPU)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state in workers
    counter = context.Value("i", 0)
    return ProcessPoolExecutor(
        max_workers=execution.jobs,
        mp_context=context,
        initializer=_start_worker,
        initargs=(runner.plan, runner.database, execution.threads, execution.data_workers,
                  counter, runner.checkpoint_every),
    )


def run_in_pool(
    runner: PlanRunner, pending: Sequence[Job], progress: Progress, execution: Execution
) -> None:
    """Run ``pending`` in ``execution.jobs`` local worker processes; each commits its own trials.
    A job that raises has its unfinished trials recorded as failed; the jobs a dying worker takes
    down run again (:func:`~sopkit.experiment.workers.next_round` finds the one that kills it, and
    records it as failed). The other jobs go on either way."""
    remaining, breaks = list(pending), 0
    while remaining:
        size = round_workers(execution.jobs, breaks)
        broken = _pool_round(runner, remaining, progress, replace(execution, jobs=size))
        remaining, breaks = next_round(runner, broken, breaks)


def _pool_round(
    runner: PlanRunner, pending: Sequence[Job], progress: Progress, execution: Execution
) -> list[Job]:
    """One pool running ``pending``; returns the jobs its dying worker took down with it."""
    broken: list[Job] = []
    with local_pool(runner, execution) as pool:
        futures = [pool.submit(_run_job_in_worker, job) for job in pending]
        jobs = dict(zip(futures, pending, strict=True))
        _wait_for(
            futures,
            lambda future: settle_job(runner, jobs[future], future, broken),
            progress,
            lambda: stop_workers(pool),
        )
    return [job for job in pending if any(job is b for b in broken)]  # in submission order


# ---- Ray -----------------------------------------------------------------------------------------


def import_ray() -> ModuleType:
    """The ``ray`` module, or a UserError that says how to install it."""
    try:
        import ray
    except ImportError as error:
        raise UserError(
            f"--executor ray needs Ray, which cannot be imported here ({error}). Install it with "
            f"{RAY_INSTALL}, or run with --executor local."
        ) from None
    return ray


def _address(execution: Execution) -> str | None:
    """The cluster to join: --ray-address, else RAY_ADDRESS, else None (start one here)."""
    address = execution.ray_address
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or None
        source = "RAY_ADDRESS"
    else:
        source = "--ray-address"
    if address is not None and not address.strip():
        raise UserError(f"{source} is empty: give HOST:PORT of the cluster's head node.")
    return address.strip() if address is not None else None


def _check_reachable(address: str, source: str = "--ray-address") -> None:
    """Fail in seconds, with a message, when nothing listens at ``address`` (``HOST:PORT`` or
    ``ray://HOST:PORT``); ``auto`` and other forms are left to Ray."""
    if address == "auto":  # Ray's own: the cluster this machine is part of
        return
    host, sep, port_text = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UserError(
            f"{source} {address!r} is not an address: give HOST:PORT of the cluster's head node "
            "(e.g. 127.0.0.1:6379, as `ray start --head` prints it)."
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port_text)), CONNECT_TIMEOUT_S):
            pass
    except OSError as error:
        raise UserError(
            f"No Ray cluster answers at {address} ({error.strerror or error}). Start one with "
            "`ray start --head`, or fix --ray-address / RAY_ADDRESS; without either, "
            "--executor ray starts a Ray instance on this machine."
        ) from None


def check_ray(runner: PlanRunner, execution: Execution) -> None:
    """The driver's checks of ``--executor ray``, before anything trains: Ray imports, the
    cluster's address answers, the device fits the GPUs asked for, and the plan checks (on this
    machine's CPU: the trials' GPUs are on the cluster's nodes)."""
    import_ray()
    address = _address(execution)
    if address is not None:
        source = "--ray-address" if execution.ray_address is not None else "RAY_ADDRESS"
        _check_reachable(address, source)
    _ray_plan(runner.plan, execution.gpus_per_trial)
    PlanRunner(replace(runner.plan, device="cpu"), runner.database, runner.threads,
               runner.data_workers).check()


def _connect(ray: ModuleType, execution: Execution) -> bool:
    """Join the cluster (or start a local instance); True when this call connected, so the run
    disconnects at its end. A process already connected (a library user's) is used as it is."""
    if ray.is_initialized():
        return False
    address = _address(execution)
    try:
        ray.init(
            address=address if address is not None else "local",
            logging_level=logging.WARNING,
            log_to_driver=False,  # a trial's output would tear the driver's progress display
            **({} if address is not None else {"include_dashboard": False}),
        )
    except Exception as error:  # Ray raises bare Exceptions too (a node that timed out starting)
        where = f"connect to {address}" if address is not None else "start a local instance"
        raise UserError(
            f"Ray could not {where} ({error}). Start a cluster with `ray start --head` and give "
            "its address with --ray-address."
        ) from None
    return True


def _check_fits(ray: ModuleType, cpus: int, gpus: float) -> None:
    """Refuse a trial no node of the cluster can hold (Ray would wait for it forever)."""
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    if any(node.get("CPU", 0) >= cpus and node.get("GPU", 0) >= gpus for node in nodes):
        return
    shown = ", ".join(f"{node.get('CPU', 0):g} CPUs and {node.get('GPU', 0):g} GPUs"
                      for node in nodes) or "none alive"
    raise UserError(
        f"No node of the Ray cluster can run a trial that asks for {cpus} CPUs (--threads) and "
        f"{gpus:g} GPUs (--gpus-per-trial); its nodes have: {shown}."
    )


def _ray_plan(plan: ComparePlan, gpus: float) -> ComparePlan:
    """The plan as a Ray task runs it. Ray shows a task only the GPUs it asked for, so a trial
    with no GPU trains on the CPU even where ``auto`` would find one."""
    on_gpu = plan.device == "cuda" or plan.device.startswith("cuda:")
    if gpus == 0 and on_gpu:
        raise UserError(f"--device {plan.device} with --executor ray needs --gpus-per-trial above "
                        "0: Ray gives a trial only the GPUs it asks for.")
    if gpus > 0 and plan.device not in ("auto", "cuda"):
        raise UserError(f"--gpus-per-trial {gpus:g} asks Ray for GPUs that --device {plan.device} "
                        "leaves unused: use --device auto or cuda.")
    if gpus == 0 and plan.device == "auto":
        return replace(plan, device="cpu")
    if gpus > 0:
        return replace(plan, device="cuda")  # the task's first visible GPU
    return plan


#: What a Ray task returns: its trials' outcomes and the provenance of the process that ran them.
TaskResult = tuple[list[TrialOutcome], dict[str, Any]]

#: The runner of a Ray worker process, kept between tasks of the same plan so its data loads once.
_node_runner: tuple[str, PlanRunner] | None = None


def _train_on_node(
    plan: ComparePlan, job: Job, todo: Sequence[TrialSpec], threads: int, data_workers: int
) -> TaskResult:
    """The body of a Ray task: train ``todo`` and return the outcomes (never written here) with
    this process's provenance (the CPU, GPU and threads the trials ran on)."""
    global _node_runner
    key = repr((plan, threads, data_workers))
    if _node_runner is None or _node_runner[0] != key:
        # No database here, the driver alone writes it; and no checkpoints, as the run's folder
        # is on the driver's machine (a task whose node dies starts its trials over).
        _node_runner = key, PlanRunner(plan, Path(os.devnull), threads, data_workers, None)
    runner = _node_runner[1]
    outcomes: list[TrialOutcome] = []
    runner.train(job, todo, outcomes.append)
    return outcomes, runner.provenance


def run_on_ray(
    runner: PlanRunner, pending: Sequence[Job], progress: Progress, execution: Execution
) -> None:
    """Run ``pending`` as Ray tasks (one per job, ``--threads`` CPUs and ``--gpus-per-trial``
    GPUs each) and commit every returned outcome here, as soon as its task ends."""
    ray = import_ray()
    plan = _ray_plan(runner.plan, execution.gpus_per_trial)
    connected = _connect(ray, execution)
    try:
        _check_fits(ray, execution.threads, execution.gpus_per_trial)
        task = ray.remote(_train_on_node).options(
            num_cpus=execution.threads,
            num_gpus=execution.gpus_per_trial,
            max_retries=RAY_MAX_RETRIES,
            retry_exceptions=False,
        )
        with TrialStore(runner.database) as store:
            done = store.done_keys()
        refs, futures = [], []
        for job in pending:
            todo = [spec for spec in job.specs if spec.key not in done]
            ref = task.remote(plan, job, todo, execution.threads, execution.data_workers)
            refs.append(ref)
            futures.append(ref.future())
        jobs = dict(zip(futures, pending, strict=True))

        def commit(future: Future[TaskResult]) -> None:
            settle_ray_job(ray, runner, jobs[future], future)

        def cancel() -> None:
            for ref in refs:
                # Best effort on the way out (Ctrl-C, an error): a finished task has nothing to stop.
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)

        _wait_for(futures, commit, progress, cancel)
    finally:
        if connected:
            ray.shutdown()


def settle_ray_job(
    ray: ModuleType, runner: PlanRunner, job: Job, future: Future[TaskResult]
) -> None:
    """Commit what a finished task returned, each trial with the provenance of the node that
    trained it. A user's mistake seen on a node (a missing data directory, no CUDA there) stops
    the run with its message; a task that raised past the trials' own failure handling, or that
    Ray gave up on after its retries (its worker or node kept dying), has its unfinished trials
    recorded as failed, and the grid goes on."""
    try:
        outcomes, node_provenance = future.result()
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, UserError):
            raise UserError(f"On the Ray cluster: {cause}") from None
        record_job_failure(runner, job, cause if isinstance(cause, Exception) else error)
        return
    except ray.exceptions.RayError as error:
        record_job_failure(runner, job, error)
        return
    committer = copy.copy(runner)  # the driver's runner, with where these trials ran
    committer.provenance = node_provenance
    with TrialStore(runner.database) as store:
        for outcome in outcomes:
            committer.commit(outcome, store)
