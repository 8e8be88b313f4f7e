"""``sopkit compare``: train strategies side by side over seeds, learning rates, models and optimizers.

A comparison is a plan of trials (one strategy, one seed, one learning rate, one model, one
optimizer). Trials are grouped into jobs by (model, optimizer, seed, rate): a job trains every
strategy for that cell in one process and one ``TrainingSession``, so step-time ratios against
``baseline`` come from the same process and an ensemble and a distilled student share their members.

Every finished trial is committed to ``results.sqlite`` in the output directory at once. Running the
same comparison again skips finished trials, so an interrupted comparison resumes where it stopped.
``jobs > 1`` runs jobs in worker processes; each trial is seeded on its own, so the results equal
those of ``jobs = 1``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sopkit.errors import UserError
from sopkit.results import PAPER_LR_BASE, PAPER_LR_EXPONENTS
from sopkit.store import DATABASE_NAME, TrialSpec, TrialStore

if TYPE_CHECKING:
    from sopkit.data import DataSplits
    from sopkit.progress import Progress
    from sopkit.results import Group
    from sopkit.train import TrainConfig



def parse_lr_grid(text: str | None) -> tuple[int, ...] | tuple[float, ...] | None:
    """``paper`` (i in -4..5), ``paper:A..B`` (a sub-range of exponents), or rates ``0.01,0.003``.

    Returns exponents (ints) for paper grids, rates (floats) for explicit lists, None for no grid.
    """
    if text is None or text.strip() in ("", "none"):
        return None
    text = text.strip()
    match = re.fullmatch(r"paper(?::(-?\d+)\.\.(-?\d+))?", text)
    if match:
        if match.group(1) is None:
            return PAPER_LR_EXPONENTS
        low, high = int(match.group(1)), int(match.group(2))
        if low > high:
            raise UserError(f"--lr-grid {text}: the range {low}..{high} is empty.")
        return tuple(range(low, high + 1))
    try:
        rates = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(
            f"--lr-grid {text!r} is not valid. Use 'paper', 'paper:-2..2' or rates like "
            "'0.01,0.003'."
        ) from None
    if not rates or any(not rate > 0 for rate in rates):
        raise UserError(f"--lr-grid {text!r}: learning rates must be positive numbers.")
    return rates


@dataclass(frozen=True)
class ComparePlan:
    """What a comparison trains. Validated on construction."""

    dataset: str = "mnist1d"
    models: tuple[str, ...] = ("mlp-a2",)
    optimizers: tuple[str, ...] = ("adam",)
    strategies: tuple[str, ...] = ("baseline", "mk")
    seeds: tuple[int, ...] = (0, 1, 2)
    lr_grid: tuple[int, ...] | tuple[float, ...] | None = None  # see parse_lr_grid
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields besides optimizer/lr
    lr: float | None = None  # the single rate when there is no grid (None: the optimizer's default)
    expansion: int = 3
    options: dict[str, str] = field(default_factory=dict)
    device: str = "auto"
    data_dir: str | None = None
    download: bool = False
    preset: str | None = None

    def __post_init__(self) -> None:
        if not self.seeds:
            raise UserError("--seeds must be a positive number.")
        if self.expansion < 2:
            raise UserError(f"--expansion must be at least 2, got {self.expansion}.")
        for kind, values in (
            ("strategies", self.strategies),
            ("models", self.models),
            ("optimizers", self.optimizers),
        ):
            if not values:
                raise UserError(f"--{kind} is empty: name at least one.")
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise UserError(f"--{kind} names {', '.join(repeated)} more than once.")
        for optimizer in self.optimizers:
            self.train_config(optimizer, None)  # validates every value now, not an hour in

    def learning_rates(self, optimizer: str) -> list[float | None]:
        """The rates tried with ``optimizer`` (``[None]`` = the optimizer's default rate)."""
        if self.lr_grid is None:
            return [self.lr]
        if all(isinstance(v, int) for v in self.lr_grid):
            base = PAPER_LR_BASE[optimizer]
            return [base * 1.5**i for i in self.lr_grid]
        return [float(v) for v in self.lr_grid]

    def train_config(self, optimizer: str, lr: float | None) -> TrainConfig:
        from sopkit.train import TrainConfig

        return TrainConfig(**{**self.train, "optimizer": optimizer, "lr": lr})

    def jobs(self) -> list[Job]:
        """Every (model, optimizer, seed, rate) cell with the trials of all strategies in it."""
        jobs = []
        for model in self.models:
            for optimizer in self.optimizers:
                for seed in self.seeds:
                    for lr in self.learning_rates(optimizer):
                        config = self.train_config(optimizer, lr)
                        specs = tuple(
                            TrialSpec(
                                dataset=self.dataset,
                                model=model,
                                optimizer=optimizer,
                                strategy=strategy,
                                seed=seed,
                                lr=config.learning_rate,
                                train=asdict(replace(config, lr=config.learning_rate)),
                                expansion=self.expansion,
                                options=self.options,
                            )
                            for strategy in self.strategies
                        )
                        jobs.append(Job(model, optimizer, seed, lr, specs))
        return jobs

    def grid_note(self) -> str:
        """Which grid this plan runs, in words, for reports."""
        epochs = self.train.get("epochs")
        parts = []
        if self.lr_grid is None:
            parts.append(
                "a single learning rate" + (f" ({self.lr:g})" if self.lr else " (default)")
            )
        elif all(isinstance(v, int) for v in self.lr_grid):
            exps = list(self.lr_grid)
            full = tuple(exps) == PAPER_LR_EXPONENTS
            parts.append(
                f"{'the paper' if full else 'a reduced'} learning-rate grid: base*1.5^i for i in "
                f"[{exps[0]}..{exps[-1]}] (Adam base 0.001, SGD base 0.025"
                + ("" if full else "; the paper uses i in [-4..5]")
                + ")"
            )
        else:
            parts.append("learning rates " + ", ".join(f"{v:g}" for v in self.lr_grid))
        parts.append(f"{len(self.seeds)} seeds ({self.seeds[0]}..{self.seeds[-1]})")
        if epochs:
            parts.append(f"{epochs} epochs")
        parts.append(f"batch {self.train.get('batch_size', 256)}, expansion e = {self.expansion}")
        return "; ".join(parts)


@dataclass(frozen=True)
class Job:
    """One (model, optimizer, seed, rate) cell: its trials run in one process and session."""

    model: str
    optimizer: str
    seed: int
    lr: float | None
    specs: tuple[TrialSpec, ...]


# ---- presets ------------------------------------------------------------------------------------

PRESET_KEYS = {
    "name",
    "description",
    "dataset",
    "models",
    "optimizers",
    "strategies",
    "seeds",
    "lr_grid",
    "epochs",
    "batch_size",
    "expansion",
    "schedule",
    "weight_decay",
    "options",
}


def shipped_presets() -> dict[str, Path]:
    """The presets that come with sopkit (``sopkit/presets/*.toml``), by name."""
    folder = resources.files("sopkit") / "presets"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".toml")}


def load_preset(name_or_path: str) -> dict[str, Any]:
    """A preset by shipped name or TOML file path, checked for unknown keys and wrong types."""
    presets = shipped_presets()
    path = presets.get(name_or_path) or Path(name_or_path).expanduser()
    if not path.is_file():
        raise UserError(
            f"Unknown preset {name_or_path!r}: neither a shipped preset ({', '.join(sorted(presets))})"
            " nor a TOML file."
        )
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise UserError(f"Preset {path} is not valid TOML: {error}.") from None
    unknown = sorted(set(data) - PRESET_KEYS)
    if unknown:
        raise UserError(
            f"Preset {path} has unknown keys {', '.join(unknown)}. Valid keys: "
            f"{', '.join(sorted(PRESET_KEYS))}."
        )
    expected = {
        "models": list,
        "optimizers": list,
        "strategies": list,
        "seeds": int,
        "epochs": int,
        "batch_size": int,
        "expansion": int,
        "dataset": str,
        "lr_grid": str,
        "options": dict,
        "schedule": str,
    }
    for key, kind in expected.items():
        if key in data and not isinstance(data[key], kind):
            raise UserError(f"Preset {path}: {key} must be a {kind.__name__}, got {data[key]!r}.")
    data.setdefault("name", path.stem)
    return data


def build_plan(
    *,
    preset: str | None = None,
    dataset: str | None = None,
    models: Sequence[str] | None = None,
    strategies: Sequence[str] | None = None,
    optimizers: Sequence[str] | None = None,
    seeds: int | None = None,
    first_seed: int = 0,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    lr_grid: str | None = None,
    weight_decay: float | None = None,
    schedule: str | None = None,
    expansion: int | None = None,
    bf16: bool = False,
    options: dict[str, str] | None = None,
    device: str = "auto",
    data_dir: str | None = None,
    download: bool = False,
) -> ComparePlan:
    """A plan from a preset (if any) with every explicitly given value overriding it."""
    from sopkit.data import dataset_spec

    settings = load_preset(preset) if preset else {}

    def pick(value: Any, key: str, default: Any) -> Any:
        return value if value is not None else settings.get(key, default)

    dataset_name = pick(dataset, "dataset", "mnist1d")
    seed_count = pick(seeds, "seeds", 3)
    if seed_count < 1:
        raise UserError(f"--seeds must be a positive number, got {seed_count}.")
    if lr is not None and lr_grid is not None:
        raise UserError("Give either --lr or --lr-grid, not both.")
    train = {
        "epochs": pick(epochs, "epochs", dataset_spec(dataset_name).default_epochs),
        "batch_size": pick(batch_size, "batch_size", 256),
        "weight_decay": pick(weight_decay, "weight_decay", 0.0),
        "schedule": pick(schedule, "schedule", "constant"),
        "bf16": bf16,
    }
    preset_options = {k: str(v) for k, v in settings.get("options", {}).items()}
    return ComparePlan(
        dataset=dataset_name,
        models=tuple(pick(models, "models", ["mlp-a2"])),
        optimizers=tuple(pick(optimizers, "optimizers", ["adam"])),
        strategies=tuple(pick(strategies, "strategies", ["baseline", "mk"])),
        seeds=tuple(range(first_seed, first_seed + seed_count)),
        # An explicit --lr replaces the preset's grid.
        lr_grid=parse_lr_grid(
            lr_grid if (lr_grid is not None or lr is not None) else settings.get("lr_grid")
        ),
        train=train,
        lr=lr,
        expansion=pick(expansion, "expansion", 3),
        options={**preset_options, **(options or {})},
        device=device,
        data_dir=data_dir,
        download=download,
        preset=settings.get("name"),
    )


def default_out_dir(plan: ComparePlan) -> Path:
    """``runs/PRESET`` or ``runs/DATASET-MODELS``: the same command resumes into the same place."""
    name = plan.preset or f"{plan.dataset}-{'+'.join(plan.models)}"
    return Path("runs") / name.replace(":", "_").replace("/", "_")


# ---- running ------------------------------------------------------------------------------------


@cache
def _process_provenance() -> dict[str, Any]:
    from sopkit.provenance import provenance

    return provenance()


@cache
def _load_data(dataset: str, data_dir: str | None, download: bool, device: str) -> DataSplits:
    from sopkit.data import load_dataset
    from sopkit.train import select_device

    return load_dataset(dataset, data_dir=data_dir, download=download).to(select_device(device))


def check_plan(plan: ComparePlan) -> None:
    """Fail in a second on a typo (strategy, option, data set, model, device), not an hour in."""
    from sopkit.models import build_model
    from sopkit.registry import check_options
    from sopkit.strategy import StrategySettings
    from sopkit.train import select_device

    select_device(plan.device)
    check_options(StrategySettings(expansion=plan.expansion, options=dict(plan.options)),
                  plan.strategies)
    data = _load_data(plan.dataset, plan.data_dir, plan.download, plan.device)
    for model in plan.models:
        build_model(model, input_shape=data.input_shape, num_classes=data.num_classes)


def run_job(
    plan: ComparePlan,
    job: Job,
    database: Path,
    progress: Progress | None = None,
    threads: int | None = None,
) -> int:
    """Train the job's unfinished trials and commit each as it finishes; returns how many ran."""
    import torch

    from sopkit.models import build_model
    from sopkit.registry import create_strategy
    from sopkit.strategy import StrategySettings
    from sopkit.train import TrainingSession, select_device

    if threads is not None:
        torch.set_num_threads(threads)
    store = TrialStore(database)
    done = store.done_keys()
    todo = [spec for spec in job.specs if spec.key not in done]
    if not todo:
        return 0
    data = _load_data(plan.dataset, plan.data_dir, plan.download, plan.device)

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
        store.record(spec, result.to_record(), _process_provenance())
    store.close()
    return len(todo)


def _run_job_in_worker(plan: ComparePlan, job: Job, database: Path, threads: int) -> int:
    return run_job(plan, job, database, None, threads)


def run_plan(
    plan: ComparePlan,
    out_dir: Path,
    progress: Progress,
    *,
    jobs: int = 1,
    threads: int = 1,
) -> list[Group]:
    """Run every unfinished trial of ``plan`` and return the aggregated groups of the plan."""
    from sopkit.results import aggregate

    if jobs < 1:
        raise UserError(f"--jobs must be a positive number, got {jobs}.")
    if threads < 1:
        raise UserError(f"--threads must be a positive number, got {threads}.")
    check_plan(plan)
    database = out_dir / DATABASE_NAME
    store = TrialStore(database)
    store.write_plan(plan_record(plan))
    all_jobs = plan.jobs()
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
            run_job(plan, job, database, progress, threads)
            progress.jobs_done(index, len(pending))
    else:
        _run_parallel(plan, pending, database, progress, jobs, threads)
    keys = {spec.key for job in all_jobs for spec in job.specs}
    trials = [t for t in store.trials() if t["key"] in keys]
    store.close()
    return aggregate(trials, plan.strategies)


def _run_parallel(
    plan: ComparePlan,
    pending: Sequence[Job],
    database: Path,
    progress: Progress,
    jobs: int,
    threads: int,
) -> None:
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state in workers
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        running: set[Future[int]] = {
            pool.submit(_run_job_in_worker, plan, job, database, threads) for job in pending
        }
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


def plan_record(plan: ComparePlan) -> dict[str, Any]:
    """The plan as stored next to the trials: reports name the grid and select its trials by key."""
    record = asdict(plan)
    record["grid_note"] = plan.grid_note()
    record["trial_keys"] = [spec.key for job in plan.jobs() for spec in job.specs]
    return record
