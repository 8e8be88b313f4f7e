"""The plan of ``sopkit compare``: strategies side by side over seeds, learning rates, models and
optimizers.

A comparison is a plan of trials (one strategy, one seed, one learning rate, one model, one
optimizer). Trials are grouped into jobs by (model, optimizer, seed, rate): a job trains every
strategy for that cell in one process and one ``TrainingSession`` (see ``runner``), so step-time
ratios against ``baseline`` come from the same process and an ensemble and a distilled student
share their members.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sopkit.checks import (
    DEFAULT_EXPANSION,
    MAX_INT,
    MAX_WORKERS,
    check_choice,
    check_expansion,
    check_float,
    check_int,
    check_names,
    default_of,
)
from sopkit.errors import UserError
from sopkit.experiment.presets import load_preset, option_text, rescale_preset, safe_dir_name
from sopkit.experiment.records import TrialSpec
from sopkit.training.config import (
    DEFAULT_DEVICE,
    DEFAULT_LR,
    DEVICE_HELP,
    TrainConfig,
    parse_milestones,
)

# The paper's learning-rate grids (Section 5.1): base * 1.5^i for i in [-4, 5]; the bases are also
# the default rates when no grid is given.
PAPER_LR_BASE = DEFAULT_LR
PAPER_LR_EXPONENTS = tuple(range(-4, 6))
#: The widest paper-grid exponent accepted: 1.5^100 is about 4e17.
MAX_LR_EXPONENT = 100
#: The most seeds one comparison takes: each seed is a trial per strategy and rate.
MAX_SEEDS = 100_000


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
        if max(abs(low), abs(high)) > MAX_LR_EXPONENT:
            raise UserError(
                f"--lr-grid {text}: exponents must be within -{MAX_LR_EXPONENT}..{MAX_LR_EXPONENT} "
                f"(base*1.5^i beyond that is not a learning rate anyone trains with)."
            )
        return tuple(range(low, high + 1))
    try:
        rates = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(
            f"--lr-grid {text!r} is not valid. Use 'paper', 'paper:-2..2' or rates like "
            "'0.01,0.003'."
        ) from None
    if not rates or any(not (rate > 0 and math.isfinite(rate)) for rate in rates):
        raise UserError(f"--lr-grid {text!r}: learning rates must be positive finite numbers.")
    return rates


def _help(text: str, **more: str) -> dict[str, str]:
    return {"help": text, **more}


@dataclass(frozen=True)
class ComparePlan:
    """What a comparison trains. Validated on construction.

    The one home of ``sopkit compare``'s defaults: ``build_plan`` fills what a preset and the command
    line leave out from these fields (and ``TrainConfig``'s), and the CLI shows their ``help``.
    """

    dataset: str = field(default="mnist1d", metadata=_help("Data set (see `sopkit datasets`)."))
    models: tuple[str, ...] = field(default=("mlp-a2",), metadata=_help(
        "Model(s), comma-separated (see `sopkit models`), or package.module:factory."))
    optimizers: tuple[str, ...] = (default_of(TrainConfig, "optimizer"),)
    strategies: tuple[str, ...] = field(default=("baseline", "mk"), metadata=_help(
        "Comma-separated strategies (see `sopkit strategies`)."))
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata=_help(
        "Seeds per trial (consecutive, from --first-seed).", shown_default="3"))
    lr_grid: tuple[int, ...] | tuple[float, ...] | None = field(default=None, metadata=_help(
        "Tune the rate per strategy on validation: 'paper' (base*1.5^i, i in -4..5), "
        "'paper:-2..2', or rates '0.01,0.003'."))  # see parse_lr_grid
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields besides optimizer/lr
    lr: float | None = None  # the single rate when there is no grid (None: the optimizer's default)
    expansion: int = field(default=DEFAULT_EXPANSION, metadata=_help(
        "Expansion factor e (copies per weight, ensemble members)."))
    options: dict[str, str] = field(default_factory=dict)
    device: str = field(default=DEFAULT_DEVICE, metadata=_help(DEVICE_HELP))
    data_dir: str | None = field(default=None, metadata=_help(
        "Directory holding torchvision data sets (cifar10, mnist...)."))
    download: bool = field(default=False, metadata=_help(
        "Download torchvision data sets into --data-dir if missing."))
    preset: str | None = field(default=None, metadata=_help(
        "A shipped preset (e.g. paper-table1) or a TOML file; options override it."))
    save_models: bool = field(default=True, metadata=_help(
        "Save every trial's deployable model beside its record (models/KEY.safetensors, for "
        "`sopkit export`)."))
    extend_grid: int = field(default=0, metadata=_help(
        "After the grid's trials, extend a strategy's grid one rate at a time past the edge its "
        "choice sits on, at most this many rates per side (0: off); see sopkit.experiment.protocol."))
    confirm_seeds: int = field(default=0, metadata=_help(
        "After the search, train this many fresh seeds of every strategy at its chosen rate; "
        "the reported numbers come from them (0: report the search seeds)."))

    def __post_init__(self) -> None:
        if not self.seeds:
            raise UserError("--seeds must be a positive integer, got 0.")
        for seed in self.seeds:
            check_int("--first-seed", seed, minimum=0)
        check_expansion(self.expansion)
        check_int("--extend-grid", self.extend_grid, minimum=0, maximum=MAX_LR_EXPONENT)
        if self.extend_grid and len(self.lr_grid or ()) < 2:
            raise UserError(
                "--extend-grid extends a learning-rate grid: give --lr-grid with two or more "
                "rates (e.g. --lr-grid paper:-2..2)."
            )
        check_int("--confirm-seeds", self.confirm_seeds, minimum=0, maximum=MAX_SEEDS)
        if self.confirm_seeds and self.seeds[-1] + self.confirm_seeds > MAX_INT:
            raise UserError("--confirm-seeds: the confirmation seeds would pass the largest seed.")
        check_names("--strategies", self.strategies)
        check_names("--model", self.models)
        check_names("--optimizer", self.optimizers)
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
        return TrainConfig(**{**self.train, "optimizer": optimizer, "lr": lr})

    @property
    def confirmation_seeds(self) -> tuple[int, ...]:
        """The confirmation stage's seeds: the ``confirm_seeds`` after the search's last seed."""
        first = self.seeds[-1] + 1
        return tuple(range(first, first + self.confirm_seeds))

    def job(
        self, model: str, optimizer: str, seed: int, lr: float | None, strategies: Sequence[str]
    ) -> Job:
        """One cell's job with the trials of ``strategies`` in it."""
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
            for strategy in strategies
        )
        return Job(model, optimizer, seed, lr, specs)

    def jobs(self) -> list[Job]:
        """Every (model, optimizer, seed, rate) cell with the trials of all strategies in it."""
        return [
            self.job(model, optimizer, seed, lr, self.strategies)
            for model in self.models
            for optimizer in self.optimizers
            for seed in self.seeds
            for lr in self.learning_rates(optimizer)
        ]

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
                f"[{exps[0]}..{exps[-1]}] (Adam base {PAPER_LR_BASE['adam']:g}, SGD base "
                f"{PAPER_LR_BASE['sgd']:g}"
                + ("" if full else "; the paper uses i in [-4..5]")
                + ")"
            )
        else:
            parts.append("learning rates " + ", ".join(f"{v:g}" for v in self.lr_grid))
        if self.extend_grid:
            parts.append(f"grid extended by up to {self.extend_grid} rates per side past an edge")
        parts.append(f"{len(self.seeds)} seeds ({self.seeds[0]}..{self.seeds[-1]})")
        if self.confirm_seeds:
            confirm = self.confirmation_seeds
            parts.append(
                f"rates chosen on those, reported on {len(confirm)} confirmation seeds "
                f"({confirm[0]}..{confirm[-1]})"
            )
        if epochs:
            parts.append(f"{epochs} epochs")
        batch = self.train.get("batch_size", default_of(TrainConfig, "batch_size"))
        parts.append(f"batch {batch}, expansion e = {self.expansion}")
        return "; ".join(parts)


#: Where ``sopkit compare`` runs trials (``--executor``): see ``sopkit.experiment.executors``.
EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class Execution:
    """How a plan's trials are run. Results never depend on it (each trial is seeded on its own)."""

    jobs: int = field(default=1, metadata=_help("Worker processes running trials in parallel."))
    threads: int = field(default=1, metadata=_help(
        "torch CPU threads per trial; the same with any --jobs, so results do not depend on it. "
        "Raise it for big models on the CPU."))
    data_workers: int = field(default=2, metadata=_help(
        "DataLoader worker processes per split of a file-backed set (imagefolder, imagenet; "
        "ImageNet on a GPU wants 8 or more); 0 loads in the trial's process. Augmentation is "
        "seeded per sample, so results do not depend on it."))
    executor: str = field(default="local", metadata=_help(
        "Where trials run: 'local' (--jobs worker processes here) or 'ray' (Ray tasks on the "
        "cluster at --ray-address; needs sopkit's 'ray' extra)."))
    ray_address: str | None = field(default=None, metadata=_help(
        "The Ray cluster of --executor ray (HOST:PORT); else RAY_ADDRESS, else a Ray instance "
        "started here for the run."))
    gpus_per_trial: float = field(default=0.0, metadata=_help(
        "GPUs each trial asks Ray for (--executor ray); a fraction shares a GPU (0.5: two "
        "trials per GPU); 0 trains on the CPU."))
    checkpoint_every: float | None = field(default=60.0, metadata=_help(
        "Checkpoint a running trial at the end of an epoch once this many seconds have passed "
        "since its last checkpoint (0: every epoch; 'off': never); a killed trial resumes "
        "from its checkpoint. Checkpoints go to OUT/checkpoints and go once trials commit."))

    def __post_init__(self) -> None:
        check_int("--jobs", self.jobs, maximum=MAX_WORKERS)
        check_int("--threads", self.threads, maximum=MAX_WORKERS)
        check_int("--data-workers", self.data_workers, minimum=0, maximum=MAX_WORKERS)
        check_choice("--executor", self.executor, EXECUTORS, "executors")
        if self.checkpoint_every is not None:
            check_float("--checkpoint-every", self.checkpoint_every)
        gpus = check_float("--gpus-per-trial", self.gpus_per_trial)
        if gpus > 1 and not gpus.is_integer():  # Ray's rule: only fractions of one GPU share it
            raise UserError(f"--gpus-per-trial above 1 must be a whole number, got {gpus:g}.")
        if self.executor == "local" and (gpus or self.ray_address is not None):
            raise UserError("--gpus-per-trial and --ray-address are for --executor ray.")
        if self.executor == "ray" and self.jobs != 1:
            raise UserError("--jobs is for --executor local; Ray runs as many trials at once as "
                            "the cluster has CPUs and GPUs for (see --threads, --gpus-per-trial).")


def parse_checkpoint_every(text: str) -> float | None:
    """``--checkpoint-every``: seconds (``0``: every epoch), or ``off`` (None: no checkpoints)."""
    if text.strip().lower() in ("off", "never", "none"):
        return None
    try:
        seconds = float(text)
    except ValueError:
        raise UserError(
            f"--checkpoint-every must be a number of seconds or 'off', got {text!r}."
        ) from None
    if seconds == math.inf:
        raise UserError("--checkpoint-every inf: for no checkpoints at all, give 'off'.")
    return check_float("--checkpoint-every", seconds)


@dataclass(frozen=True)
class Job:
    """One (model, optimizer, seed, rate) cell: its trials run in one process and session."""

    model: str
    optimizer: str
    seed: int
    lr: float | None
    specs: tuple[TrialSpec, ...]


def build_plan(
    *,
    preset: str | None = None,
    dataset: str | None = None,
    models: Sequence[str] | None = None,
    strategies: Sequence[str] | None = None,
    optimizers: Sequence[str] | None = None,
    seeds: int | None = None,
    first_seed: int = default_of(ComparePlan, "seeds")[0],
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    lr_grid: str | None = None,
    weight_decay: float | None = None,
    schedule: str | None = None,
    milestones: str | None = None,
    lr_decay: float | None = None,
    warmup_epochs: int | None = None,
    label_smoothing: float | None = None,
    augment: str | None = None,
    expansion: int | None = None,
    bf16: bool = False,
    compile_models: bool = default_of(TrainConfig, "compile"),
    options: dict[str, str] | None = None,
    device: str = DEFAULT_DEVICE,
    data_dir: str | None = None,
    download: bool = False,
    save_models: bool = default_of(ComparePlan, "save_models"),
    extend_grid: int = default_of(ComparePlan, "extend_grid"),
    confirm_seeds: int = default_of(ComparePlan, "confirm_seeds"),
) -> ComparePlan:
    """A plan from a preset (if any) with every explicitly given value overriding it; what neither
    gives comes from ``ComparePlan``'s and ``TrainConfig``'s defaults (the data set's epochs).

    ``epochs`` other than the preset's scales the preset's other counts of epochs with it
    (:func:`~sopkit.experiment.presets.rescale_preset`); values given here are never scaled.
    """
    from sopkit.data import dataset_spec

    settings = load_preset(preset) if preset is not None else {}
    if epochs is not None:
        settings = rescale_preset(settings, epochs)

    def pick(value: Any, key: str, default: Any) -> Any:
        return value if value is not None else settings.get(key, default)

    def plan_default(name: str) -> Any:
        return default_of(ComparePlan, name)

    def train_default(name: str) -> Any:
        return default_of(TrainConfig, name)

    dataset_name = pick(dataset, "dataset", plan_default("dataset"))
    seed_count = check_int(
        "--seeds", pick(seeds, "seeds", len(plan_default("seeds"))), maximum=MAX_SEEDS
    )
    first_seed = check_int("--first-seed", first_seed, minimum=0, maximum=MAX_INT - seed_count + 1)
    if lr is not None and lr_grid is not None:
        raise UserError("Give either --lr or --lr-grid, not both.")
    if milestones is not None:
        try:
            drops: tuple[int, ...] | None = parse_milestones(milestones)
        except ValueError as error:
            raise UserError(f"--milestones {milestones!r} is not valid: {error}.") from None
    else:
        drops = None
    # A preset's single rate, unless the command line gives a rate or a grid.
    rate = lr if lr is not None or lr_grid is not None else settings.get("lr")
    train = {
        "epochs": pick(epochs, "epochs", dataset_spec(dataset_name).default_epochs),
        "batch_size": pick(batch_size, "batch_size", train_default("batch_size")),
        "weight_decay": pick(weight_decay, "weight_decay", train_default("weight_decay")),
        "schedule": pick(schedule, "schedule", train_default("schedule")),
        "milestones": tuple(pick(drops, "milestones", train_default("milestones"))),
        "lr_decay": pick(lr_decay, "lr_decay", train_default("lr_decay")),
        "lr_warmup_epochs": pick(
            warmup_epochs, "warmup_epochs", train_default("lr_warmup_epochs")
        ),
        "label_smoothing": pick(
            label_smoothing, "label_smoothing", train_default("label_smoothing")
        ),
        "momentum": settings.get("momentum", train_default("momentum")),
        "bf16": bf16,
        "compile": compile_models,
        "augment": _augment(
            pick(augment, "augment", None), dataset_spec(dataset_name).default_augment
        ),
    }
    preset_options = {k: option_text(v) for k, v in settings.get("options", {}).items()}
    return ComparePlan(
        dataset=dataset_name,
        models=tuple(pick(models, "models", plan_default("models"))),
        optimizers=tuple(pick(optimizers, "optimizers", plan_default("optimizers"))),
        strategies=tuple(pick(strategies, "strategies", plan_default("strategies"))),
        seeds=tuple(range(first_seed, first_seed + seed_count)),
        # An explicit --lr replaces the preset's grid.
        lr_grid=parse_lr_grid(
            lr_grid if (lr_grid is not None or lr is not None) else settings.get("lr_grid")
        ),
        train=train,
        lr=rate,
        expansion=pick(expansion, "expansion", plan_default("expansion")),
        options={**preset_options, **(options or {})},
        device=device,
        data_dir=data_dir,
        download=download,
        preset=settings.get("name"),
        save_models=save_models,
        extend_grid=extend_grid,
        confirm_seeds=confirm_seeds,
    )


def _augment(value: str | None, dataset_default: str) -> str:
    """The ``--augment`` a plan trains with: the data set's default when not given; ``standard``
    on a set without a standard recipe (its default is ``none``: mnist1d, digits) is ``none``, so
    such a trial keeps its key."""
    if value is None:
        return dataset_default
    if value == "standard" and dataset_default == "none":
        return "none"
    return value  # TrainConfig checks it


def default_out_dir(plan: ComparePlan) -> Path:
    """``runs/PRESET`` or ``runs/DATASET-MODELS``: the same command resumes into the same place."""
    name = plan.preset or f"{plan.dataset}-{'+'.join(plan.models)}"
    # A preset may come from someone else: its name must not choose a place outside runs/.
    return Path("runs") / safe_dir_name(name)


def plan_record(plan: ComparePlan, command: str = "") -> dict[str, Any]:
    """The plan as stored next to the trials: reports name the grid and select its trials by key,
    and show ``command``, the command line that ran the plan ("" when not run from one)."""
    record = asdict(plan)
    record["command"] = command
    record["grid_note"] = plan.grid_note()
    record["trial_keys"] = [spec.key for job in plan.jobs() for spec in job.specs]
    record["confirmation_seeds"] = list(plan.confirmation_seeds)
    return record
