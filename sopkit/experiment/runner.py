"""Running a comparison: every unfinished trial of a plan, in this process or a pool of workers.

Every finished trial is committed to ``results.sqlite`` in the output directory at once. Running the
same comparison again skips finished trials, so an interrupted comparison resumes where it stopped.
``jobs > 1`` runs jobs in worker processes; each trial is seeded on its own, so the results equal
those of ``jobs = 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sopkit.checks import default_of
from sopkit.experiment.plan import ComparePlan, Execution, Job, plan_record
from sopkit.experiment.provenance import provenance
from sopkit.experiment.outcome import OutcomeSink, TrialOutcome
from sopkit.experiment.records import TrialSpec
from sopkit.experiment.results import Group, aggregate
from sopkit.experiment.store import DATABASE_NAME, TrialStore

if TYPE_CHECKING:
    from sopkit.data import DataSplits
    from sopkit.training.progress import Progress


class PlanRunner:
    """What the trials of one plan share in one process: the data on the training device and the
    process's provenance, each made once, on first use, and dropped with the runner.

    ``run_plan`` makes one for its own process; every worker process of ``--jobs N`` makes one when
    it starts (:func:`_start_worker`) and keeps it for the jobs it is given.
    """

    def __init__(
        self,
        plan: ComparePlan,
        database: Path,
        threads: int | None = None,
        data_workers: int = default_of(Execution, "data_workers"),
    ) -> None:
        self.plan = plan
        self.database = database
        self.threads = threads
        self.data_workers = data_workers

    @cached_property
    def data(self) -> DataSplits:
        from sopkit.data import load_dataset
        from sopkit.training.device import select_device

        plan = self.plan
        return load_dataset(
            plan.dataset,
            data_dir=plan.data_dir,
            download=plan.download,
            num_workers=self.data_workers,
        ).to(select_device(plan.device))

    @cached_property
    def provenance(self) -> dict[str, Any]:
        return provenance()

    def check(self) -> None:
        """Fail in a second on a typo (strategy, option, data set, model, device), not an hour in."""
        from sopkit.models import build_model
        from sopkit.registry import check_options, create_strategy
        from sopkit.training.device import select_device
        from sopkit.training.settings import StrategySettings

        plan = self.plan
        select_device(plan.device)
        settings = StrategySettings(expansion=plan.expansion, options=dict(plan.options))
        check_options(settings, plan.strategies)
        for name in plan.strategies:  # its own schedule (mk.milestones=...) must fit its epochs
            strategy = create_strategy(name, settings)
            for optimizer in plan.optimizers:
                strategy.schedule(plan.train_config(optimizer, None))
        for model in plan.models:
            build_model(model, input_shape=self.data.input_shape, num_classes=self.data.num_classes)

    def run_job(self, job: Job, progress: Progress | None = None) -> int:
        """Train the job's unfinished trials and commit each to this process's store as it
        finishes; returns how many ran."""
        with TrialStore(self.database) as store:
            done = store.done_keys()
            todo = [spec for spec in job.specs if spec.key not in done]
            if todo:
                self.train(job, todo, lambda outcome: self.commit(outcome, store), progress)
        return len(todo)

    def commit(self, outcome: TrialOutcome, store: TrialStore) -> None:
        """Write one trial's outcome to ``store`` (and the files beside it). Only the process that
        owns the output directory calls this: itself, a ``--jobs`` worker, or the Ray driver."""
        if outcome.record is not None:
            store.record(outcome.spec, outcome.record, self.provenance)

    def train(
        self,
        job: Job,
        todo: Sequence[TrialSpec],
        sink: OutcomeSink,
        progress: Progress | None = None,
    ) -> None:
        """Train ``todo`` (trials of ``job``) in one session, handing each outcome to ``sink`` as
        soon as its trial ends."""
        import torch

        from sopkit.models import build_model
        from sopkit.registry import create_strategy
        from sopkit.training.device import select_device
        from sopkit.training.loop import TrainingSession
        from sopkit.training.settings import StrategySettings

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        plan, data = self.plan, self.data

        def build() -> torch.nn.Module:
            return build_model(job.model, input_shape=data.input_shape, num_classes=data.num_classes)

        config = plan.train_config(job.optimizer, job.lr)
        session = TrainingSession(
            data,
            build,
            config,
            device=select_device(plan.device),
            seed=job.seed,
            progress=progress,
            label=f"{job.model} {job.optimizer} lr={config.learning_rate:g}",
        )
        settings = StrategySettings(expansion=plan.expansion, options=dict(plan.options))
        for spec in todo:
            strategy = create_strategy(spec.strategy, settings)
            result = strategy.fit(session)
            sink(TrialOutcome(spec, record=result.to_record()))


#: The runner of this worker process (``--jobs N``), made by the pool's initializer.
_worker_runner: PlanRunner | None = None


def _start_worker(plan: ComparePlan, database: Path, threads: int, data_workers: int) -> None:
    global _worker_runner
    _worker_runner = PlanRunner(plan, database, threads, data_workers)


def _run_job_in_worker(job: Job) -> int:
    assert _worker_runner is not None, "the pool's initializer makes the runner"
    return _worker_runner.run_job(job)


def run_plan(
    plan: ComparePlan,
    out_dir: Path,
    progress: Progress,
    *,
    jobs: int = 1,
    threads: int = 1,
    command: str = "",
    data_workers: int = default_of(Execution, "data_workers"),
) -> list[Group]:
    """Run every unfinished trial of ``plan`` and return the aggregated groups of the plan.

    ``command`` is the command line that asked for it, stored with the plan for the reports.
    """
    Execution(jobs=jobs, threads=threads, data_workers=data_workers)  # checks before anything runs
    database = out_dir / DATABASE_NAME
    runner = PlanRunner(plan, database, threads, data_workers)
    runner.check()
    all_jobs = plan.jobs()
    with TrialStore(database) as store:
        store.write_plan(plan_record(plan, command))
        done = store.done_keys()
    pending = [job for job in all_jobs if any(s.key not in done for s in job.specs)]
    skipped = sum(len(job.specs) for job in all_jobs) - sum(
        sum(s.key not in done for s in job.specs) for job in pending
    )
    if skipped:
        progress.message(f"Resuming: {skipped} finished trials in {database} are kept.")
    progress.jobs_done(0, len(pending))
    if jobs == 1:
        for index, job in enumerate(pending, 1):
            runner.run_job(job, progress)
            progress.jobs_done(index, len(pending))
    else:
        _run_parallel(plan, pending, database, progress, jobs, threads, data_workers)
    keys = {spec.key for job in all_jobs for spec in job.specs}
    with TrialStore(database) as store:
        trials = [t for t in store.trials() if t.key in keys]
    return aggregate(trials, plan.strategies)


def _run_parallel(
    plan: ComparePlan,
    pending: Sequence[Job],
    database: Path,
    progress: Progress,
    jobs: int,
    threads: int,
    data_workers: int,
) -> None:
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state in workers
    with ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=context,
        initializer=_start_worker,
        initargs=(plan, database, threads, data_workers),
    ) as pool:
        running: set[Future[int]] = {pool.submit(_run_job_in_worker, job) for job in pending}
        finished = 0
        try:
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()  # re-raise a worker's error here
                    finished += 1
                    progress.jobs_done(finished, len(pending))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
