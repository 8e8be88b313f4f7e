"""A comparison under ``torchrun``: every rank trains every trial together, rank 0 alone writes.

``torchrun --nproc-per-node N -m sopkit compare ...`` starts N copies of the same command. Each
joins the process group (:func:`sopkit.training.distributed.start`), builds the same plan and
checks it; rank 0 opens the store, records the plan and reads which trials are finished, and hands
that list to the other ranks, so all of them train the same trials in the same order (each trial
with DistributedDataParallel, see :mod:`sopkit.training.distributed`). Rank 0 commits every
outcome and writes the reports; the other ranks write nothing (not even to the output directory,
which need not exist on their machines).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sopkit.errors import UserError
from sopkit.experiment.outcome import TrialOutcome
from sopkit.experiment.plan import ComparePlan, Execution, plan_record
from sopkit.experiment.runner import PlanRunner
from sopkit.experiment.store import DATABASE_NAME, TrialStore

if TYPE_CHECKING:
    from sopkit.training.distributed import Ranks
    from sopkit.training.progress import Progress

__all__ = ["compare_on_ranks", "run_plan_on_ranks"]


def compare_on_ranks(
    ranks: Ranks,
    plan: ComparePlan,
    out_dir: Path,
    command: str,
    *,
    jobs: int,
    threads: int,
    data_workers: int,
    executor: str = "local",
    show: Callable[[Callable[[Progress], Any]], Any],
    report: Callable[[], Any],
) -> None:
    """``sopkit compare`` in one torchrun process: join the group, run the plan on every rank, and
    on rank 0 show progress (``show(work)`` runs ``work(progress)``) and write the reports."""
    from sopkit.training import distributed
    from sopkit.training.progress import NullProgress

    if jobs != 1:
        raise UserError(
            f"--jobs {jobs} under torchrun: torchrun's {ranks.world} processes already train each "
            "trial together, one trial at a time. Drop --jobs (or run without torchrun)."
        )
    if executor != "local":
        raise UserError(
            f"--executor {executor} under torchrun: a torchrun comparison runs its trials in its "
            "own processes. Drop --executor (or run without torchrun)."
        )
    if plan.extend_grid or plan.confirm_seeds:  # stages planned from results: not on ranks yet
        raise UserError(
            "--extend-grid and --confirm-seeds are not supported under torchrun yet. Run the "
            "grid under torchrun, then the same command without torchrun adds the stages."
        )
    Execution(threads=threads, data_workers=data_workers)  # the checks run_plan makes
    distributed.start(ranks, plan.device)
    try:

        def work(progress: Progress) -> None:
            run_plan_on_ranks(
                ranks, plan, out_dir, progress, threads=threads, command=command,
                data_workers=data_workers,
            )

        if ranks.writer:
            show(work)  # rank 0 reports an interrupt, and what finished, itself
            report()
        else:
            try:
                work(NullProgress())
            except KeyboardInterrupt:  # torchrun passes Ctrl-C to every rank: one message, rank 0's
                raise SystemExit(130) from None
        distributed.barrier()  # rank 0 reports before anyone leaves the group
    finally:
        distributed.stop()


def run_plan_on_ranks(
    ranks: Ranks,
    plan: ComparePlan,
    out_dir: Path,
    progress: Progress,
    *,
    threads: int,
    command: str,
    data_workers: int,
) -> None:
    """Train every unfinished trial of ``plan`` on all ranks; rank 0 commits each as it ends."""
    from sopkit.training import distributed

    database = out_dir / DATABASE_NAME
    runner = PlanRunner(plan, database, threads, data_workers)
    # Every rank checks (the same plan gets the same verdict everywhere) and loads the data, rank 0
    # first: a download (--download) or a data set's cache is written once, not by N at a time.
    if ranks.writer:
        runner.check()
    distributed.barrier()
    if not ranks.writer:
        runner.check()
    answer: tuple[str, Any] = ("", None)
    if ranks.writer:
        try:
            with TrialStore(database) as store:
                store.write_plan(plan_record(plan, command))
                answer = ("done", sorted(store.done_keys()))
        except UserError as error:  # every rank stops with rank 0's message
            answer = ("error", str(error))
    kind, value = distributed.broadcast_object(answer)
    if kind == "error":
        raise UserError(value)
    done = set(value)
    all_jobs = plan.jobs()
    pending = [job for job in all_jobs if any(spec.key not in done for spec in job.specs)]
    kept = sum(spec.key in done for job in all_jobs for spec in job.specs)
    if kept:
        progress.message(f"Resuming: {kept} finished trials in {database} are kept.")
    progress.message(
        f"Each trial is trained by {ranks.world} processes (DistributedDataParallel); trials are "
        "not checkpointed during training under torchrun."
    )
    progress.jobs_done(0, len(pending))
    for index, job in enumerate(pending, 1):
        todo = [spec for spec in job.specs if spec.key not in done]
        if ranks.writer:
            with TrialStore(database) as store:
                runner.train(job, todo, lambda outcome: runner.commit(outcome, store), progress)
        else:
            runner.train(job, todo, _discard, progress)
        progress.jobs_done(index, len(pending))


def _discard(outcome: TrialOutcome) -> None:
    """The sink of ranks other than 0: rank 0 commits the same outcome."""
