"""Running a comparison: every unfinished trial of a plan, in this process, a pool of workers or
on a Ray cluster.

Every finished trial is committed to ``results.sqlite`` in the output directory at once. Running the
same comparison again skips finished trials, so an interrupted comparison resumes where it stopped.
``jobs > 1`` runs jobs in worker processes and ``executor="ray"`` as Ray tasks (both in
``executors``); each trial is seeded on its own, so the results equal those of ``jobs = 1``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sopkit.checks import default_of
from sopkit.deploy.layout import write_model
from sopkit.experiment.outcome import ModelArtifact, OutcomeSink, TrialFailure, TrialOutcome
from sopkit.experiment.plan import ComparePlan, Execution, Job, plan_record
from sopkit.experiment.provenance import provenance
from sopkit.experiment.records import TrialSpec
from sopkit.experiment.results import Group, aggregate
from sopkit.experiment.store import DATABASE_NAME, TrialStore

if TYPE_CHECKING:
    from sopkit.data import DataSplits
    from sopkit.training.checkpoint import Checkpoints
    from sopkit.training.progress import Progress
    from sopkit.training.types import TrainResult

#: The folder of running trials' checkpoints, beside the database.
CHECKPOINTS_DIR = "checkpoints"
# Trial key fields that differ between a job's trials (or are in every training's own key).
_NOT_CELL = ("strategy", "options", "expansion")


class PlanRunner:
    """What the trials of one plan share in one process: the data on the training device and the
    process's provenance, each made once, on first use, and dropped with the runner.

    ``run_plan`` makes one for its own process; every worker process of ``--jobs N`` makes one when
    it starts (:func:`_start_worker`) and keeps it for the jobs it is given.

    With ``checkpoint_every`` (seconds, ``Execution.checkpoint_every``), running trials checkpoint
    into ``checkpoints/`` beside the database, one folder per job, removed once the job's trials
    are committed; None: no checkpoints.
    """

    def __init__(
        self,
        plan: ComparePlan,
        database: Path,
        threads: int | None = None,
        data_workers: int = default_of(Execution, "data_workers"),
        checkpoint_every: float | None = None,
    ) -> None:
        self.plan = plan
        self.database = database
        self.threads = threads
        self.data_workers = data_workers
        self.checkpoint_every = checkpoint_every
        self._progress: Progress | None = None  # of the job in training, for its messages

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
            models=plan.models,  # text sets tokenise with the model's tokenizer
        ).to(select_device(plan.device))

    @cached_property
    def provenance(self) -> dict[str, Any]:
        return provenance()

    def check(self) -> None:
        """Fail in a second on a typo (strategy, option, data set, model, device), not an hour in."""
        from sopkit.models import build_model
        from sopkit.models.checks import check_model_fits
        from sopkit.registry import check_options, create_strategy
        from sopkit.training.device import select_device
        from sopkit.training.hooks_guard import call_hook
        from sopkit.training.settings import StrategySettings

        plan = self.plan
        select_device(plan.device)
        settings = StrategySettings(expansion=plan.expansion, options=dict(plan.options))
        check_options(settings, plan.strategies)
        for name in plan.strategies:  # its own schedule (mk.milestones=...) must fit its epochs
            strategy = create_strategy(name, settings)
            for optimizer in plan.optimizers:
                call_hook(strategy, "schedule", plan.train_config(optimizer, None))
        data, device = self.data, select_device(plan.device)
        for model in plan.models:  # built, and a forward pass on two real inputs, before training
            check_model_fits(
                model,
                build_model(model, input_shape=data.input_shape, num_classes=data.num_classes),
                data.input_shape,
                data.num_classes,
                device,
                example=getattr(data.test, "x", None),
            )

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
        if outcome.artifact is not None:  # the model first: a stored record's model is complete
            write_model(store.path.parent, outcome.artifact)
        if outcome.record is not None:
            store.record(outcome.spec, outcome.record, self.provenance)
        elif outcome.failure is not None:  # kept with its traceback; a rerun retries the trial
            store.record_failure(outcome.spec, asdict(outcome.failure), self.provenance)
        self._discard_checkpoints(outcome.spec, store)

    def _checkpoints(self, job: Job) -> Checkpoints | None:
        """Where and how often the job's trainings checkpoint (None: they do not)."""
        from sopkit.training.checkpoint import Checkpoints

        if self.checkpoint_every is None:
            return None
        scope = f"{self.plan.dataset} {job.model}"
        return Checkpoints(self._checkpoint_dir(job), self.checkpoint_every, scope=scope)

    def _checkpoint_dir(self, job: Job) -> Path:
        """The folder of the job's checkpoints: named by the job's cell (its trials' key fields
        but the strategy's), so a rerun with other strategies or options finds the same one."""
        cell = {k: v for k, v in job.specs[0].identity().items() if k not in _NOT_CELL}
        digest = hashlib.sha256(json.dumps(cell, sort_keys=True, default=str).encode())
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{job.model}-seed{job.seed}")[:60]
        return self.database.parent / CHECKPOINTS_DIR / f"{name}-{digest.hexdigest()[:16]}"

    def _discard_checkpoints(self, spec: TrialSpec, store: TrialStore) -> None:
        """Remove the checkpoints of ``spec``'s job once all of its trials are committed (its
        trials share trainings: an ensemble's members are the baseline's)."""
        job = self._jobs.get(spec.key)
        if self.checkpoint_every is None or job is None:
            return
        done = store.done_keys()
        if all(other.key in done for other in job.specs):
            directory = self._checkpoint_dir(job)
            shutil.rmtree(directory, ignore_errors=True)
            with contextlib.suppress(OSError):  # the last job's: no empty folder left behind
                directory.parent.rmdir()

    @cached_property
    def _jobs(self) -> dict[str, Job]:
        return {spec.key: job for job in self.plan.jobs() for spec in job.specs}

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
        from sopkit.training.hooks_guard import call_hook
        from sopkit.training.loop import TrainingSession
        from sopkit.training.settings import StrategySettings

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        plan, data = self.plan, self.data
        self._progress = progress

        def build() -> torch.nn.Module:
            return build_model(job.model, input_shape=data.input_shape, num_classes=data.num_classes)

        try:
            config = plan.train_config(job.optimizer, job.lr)
            session = TrainingSession(
                data,
                build,
                config,
                device=select_device(plan.device),
                seed=job.seed,
                progress=progress,
                label=f"{job.model} {job.optimizer} lr={config.learning_rate:g}",
                checkpoints=self._checkpoints(job),
            )
            settings = StrategySettings(expansion=plan.expansion, options=dict(plan.options))
        except Exception as error:  # the job's setup: each of its trials failed with it
            for spec in todo:
                sink(TrialOutcome(spec, failure=TrialFailure.from_exception(error)))
            return
        for spec in todo:
            # One trial's error (out of memory, a plugin's hook, shapes that do not fit) is that
            # trial's outcome: recorded, and the grid goes on. Ctrl-C and exits are not caught.
            try:
                strategy = create_strategy(spec.strategy, settings)
                result = call_hook(strategy, "fit", session)  # a plugin's failure names it
                record = result.to_record()
            except Exception as error:
                outcome = TrialOutcome(spec, failure=TrialFailure.from_exception(error))
            else:
                outcome = TrialOutcome(spec, record=record, artifact=self._artifact(result, spec))
            sink(outcome)
            if outcome.failure is not None and torch.cuda.is_available():
                torch.cuda.empty_cache()  # what an out-of-memory trial held goes back to the rest


    def _artifact(self, result: TrainResult, spec: TrialSpec) -> ModelArtifact | None:
        """The trial's deployable model to keep (None with ``--no-save-models``). A model that
        cannot be serialised costs the file, never the trained result: the trial is stored
        without a model and the progress output says why."""
        from sopkit.deploy.artifacts import trial_artifact

        if not self.plan.save_models:
            return None
        try:
            return trial_artifact(result, spec, self.data)
        except Exception as error:
            if self._progress is not None:
                self._progress.message(
                    f"{spec.strategy} seed {spec.seed}: its model was not saved "
                    f"({type(error).__name__}: {error}); the result is kept."
                )
            return None


def run_plan(
    plan: ComparePlan,
    out_dir: Path,
    progress: Progress,
    *,
    jobs: int = 1,
    threads: int = 1,
    command: str = "",
    data_workers: int = default_of(Execution, "data_workers"),
    executor: str = default_of(Execution, "executor"),
    ray_address: str | None = default_of(Execution, "ray_address"),
    gpus_per_trial: float = default_of(Execution, "gpus_per_trial"),
    checkpoint_every: float | None = default_of(Execution, "checkpoint_every"),
) -> list[Group]:
    """Run every unfinished trial of ``plan`` and return the aggregated groups of the plan.

    ``command`` is the command line that asked for it, stored with the plan for the reports.
    """
    execution = Execution(  # checks before anything runs
        jobs=jobs, threads=threads, data_workers=data_workers, executor=executor,
        ray_address=ray_address, gpus_per_trial=gpus_per_trial, checkpoint_every=checkpoint_every,
    )
    database = out_dir / DATABASE_NAME
    runner = PlanRunner(plan, database, threads, data_workers, checkpoint_every)
    if executor == "ray":
        from sopkit.experiment.executors import check_ray

        check_ray(runner, execution)  # Ray, the cluster's address, the plan on this CPU
    else:
        runner.check()
    all_jobs = plan.jobs()
    record = plan_record(plan, command)
    with TrialStore(database) as store:
        store.write_plan(record)
        done = store.done_keys()
        retried = len(store.failed_keys() & {s.key for job in all_jobs for s in job.specs})
    skipped = sum(s.key in done for job in all_jobs for s in job.specs)
    if skipped:
        progress.message(f"Resuming: {skipped} finished trials in {database} are kept.")
    if retried:
        progress.message(f"Retrying {retried} failed trial{'s' if retried != 1 else ''}.")
    _run_jobs(runner, all_jobs, progress, execution)
    keys = {spec.key for job in all_jobs for spec in job.specs}
    confirm = plan.confirmation_seeds

    def groups_of(wanted: set[str]) -> list[Group]:
        with TrialStore(database) as store:
            trials = [t for t in store.trials() if t.key in wanted]
        return aggregate(trials, plan.strategies, confirm)

    if plan.extend_grid or plan.confirm_seeds:
        from sopkit.experiment.protocol import run_stages

        def run_stage(jobs: list[Job], stage: str) -> None:
            added = [s.key for job in jobs for s in job.specs if s.key not in keys]
            keys.update(added)
            record["protocol_keys"] = [*record.get("protocol_keys", []), *added]
            with TrialStore(database) as store:  # a report, even of a Ctrl-C, covers them
                store.write_plan(record)
            progress.message(f"{stage}.")
            _run_jobs(runner, jobs, progress, execution)

        stages = run_stages(plan, groups_of, run_stage, set(keys))
        record["extensions"] = [e.as_dict() for e in stages.extensions]
        with TrialStore(database) as store:
            store.write_plan(record)
    return groups_of(keys)


def _run_jobs(
    runner: PlanRunner, jobs: Sequence[Job], progress: Progress, execution: Execution
) -> None:
    """Train the unfinished trials of ``jobs`` where ``execution`` says."""
    runner._jobs.update({spec.key: job for job in jobs for spec in job.specs})
    with TrialStore(runner.database) as store:
        done = store.done_keys()
    pending = [job for job in jobs if any(s.key not in done for s in job.specs)]
    progress.jobs_done(0, len(pending))
    if execution.executor == "ray":
        from sopkit.experiment.executors import run_on_ray

        run_on_ray(runner, pending, progress, execution)
    elif execution.jobs == 1:
        for index, job in enumerate(pending, 1):
            runner.run_job(job, progress)
            progress.jobs_done(index, len(pending))
    else:
        from sopkit.experiment.executors import run_in_pool

        run_in_pool(runner, pending, progress, execution)
        with TrialStore(runner.database) as store:  # a worker's runner knows only the grid's jobs
            for job in pending:
                runner._discard_checkpoints(job.specs[0], store)
