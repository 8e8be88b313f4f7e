"""The ``Strategy`` base class: what a training method may change, as hooks the one loop calls.

The loop (:mod:`sopkit.training.loop`) owns seeding, the optimizer, ``zero_grad``, ``backward``,
``step``, schedules, timing and evaluation. A strategy only answers hooks, all instance methods, and
keeps nothing on ``self`` between runs: what one run needs lives in ``run.state`` (a namespace the
loop creates for every run), so one instance can train any number of runs, in any order, with the
same results as fresh instances. The hooks, in the order the loop calls them::

    schedule(config)                 -> the TrainConfig this strategy trains with (e.g. more epochs)
    requires(seed)                   -> other trainings this run needs (e.g. distill's teacher
                                        members); the session trains or reuses them first and
                                        hands their results to every hook as ``run.required``
    prepare(model, run)              -> the model to train (e.g. expanded into majority kernels)
    for every step:
        before_step(model, run)      -> e.g. choose a subset of neurons and swap it in
        loss(model, inputs, targets, run) -> scalar loss (default: cross-entropy of model(inputs))
        [loop: zero_grad(set_to_none=True), then backward]
        after_backward(model, run)   -> e.g. gradient surgery
        [loop: optimizer step]
        after_step(model, run)       -> e.g. swap the full tensors back
    every epoch: evaluation_model(model, run) -> the model the validation/test evaluation runs
    deployable(model, run)           -> the model you would ship (e.g. collapsed)
    report(model, run)               -> what the run reports about itself, into ``TrainResult.extra``

A strategy that trains only part of the model in a step (``subset``) owns that step between
``before_step`` and ``after_step``: there, and nowhere else, the loop runs the forward pass,
``zero_grad``, ``backward`` and the optimizer step, so a strategy may swap a parameter's tensor (and
its optimizer state) for the step's part in ``before_step`` and back in ``after_step``. The loop
clears gradients with ``set_to_none=True`` after ``loss`` and before ``backward``, so the previous
step's gradients are still set in ``before_step`` and ``loss``; a strategy that swaps tensors sets
the swapped parameters' ``.grad`` to None when it swaps back.

The models of required trainings are inputs: the loop puts them in eval mode for the run and back in
the mode they were in afterwards. A strategy whose result is not one training of its own (an
ensemble combines its members) overrides ``fit(session)`` and calls ``session.train(...)`` once per
training; it still never runs a loop of its own.

Every strategy trains on its own schedule when asked: the options ``epochs`` and ``milestones``
(``--set mk.epochs=330 --set mk.milestones=90,180,240``) are read in ``Strategy.__init__`` and
applied by the default ``schedule`` (:func:`sopkit.training.config.reschedule`: new epochs without
new milestones stretch the comparison's drops with them). A strategy that overrides ``schedule``
passes its result through ``super().schedule`` to keep them; one without a training of its own (an
ensemble) sets ``schedule_options = False`` and does not take them.

A loss computes its cross-entropy with ``label_smoothing=run.config.label_smoothing``, the
comparison's ``--label-smoothing``, as the default ``loss`` does. A worked example (a strategy that
penalises large logits), registered in a plugin's pyproject.toml under
``[project.entry-points."sopkit.strategies"] calm = "my_plugin:LogitPenalty"``::

    class LogitPenalty(sopkit.Strategy):
        description = "Cross-entropy plus beta times the mean squared logit."

        def __init__(self, settings):
            super().__init__(settings)
            self.beta = self.settings.get("beta", 0.01, float)

        def loss(self, model, inputs, targets, run):
            logits = model(inputs)
            smoothing = run.config.label_smoothing
            ce = F.cross_entropy(logits, targets, label_smoothing=smoothing)
            return ce + self.beta * logits.pow(2).mean()
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from sopkit.checks import MAX_EPOCHS, check_int
from sopkit.data.metrics import task_loss
from sopkit.errors import UserError
from sopkit.training.config import check_milestones, parse_milestones, reschedule
from sopkit.training.settings import StrategySettings
from sopkit.training.types import RunContext, TrainConfig, TrainResult

__all__ = ["Requirement", "Session", "Strategy", "StrategySettings"]


@dataclass(frozen=True)
class Requirement:
    """Another training that a strategy's run needs (``Strategy.requires``): ``strategy`` trained
    with ``seed`` (and the configuration the dependent run was asked for); ``label`` names it in
    progress output (None: the session's default label)."""

    strategy: Strategy
    seed: int
    label: str | None = None


class Session(Protocol):
    """What ``Strategy.fit`` is given: the trainings of one comparison
    (:class:`sopkit.training.loop.TrainingSession` is the implementation)."""

    seed: int
    config: TrainConfig

    def train(
        self,
        strategy: Strategy,
        *,
        seed: int | None = None,
        config: TrainConfig | None = None,
        label: str | None = None,
    ) -> TrainResult: ...

    def evaluate(self, model: nn.Module, split: Literal["train", "val", "test"] = "test") -> float: ...


class Strategy:
    """Base class for a training method; every hook has a do-nothing default (plain training)."""

    #: One line shown by ``sopkit strategies``.
    description: ClassVar[str] = ""
    #: Whether the strategy takes the options ``epochs`` and ``milestones`` (its own schedule).
    schedule_options: ClassVar[bool] = True
    #: Whether the loop may train it with DistributedDataParallel under torchrun (hooks then get
    #: the DDP wrapper). False for a strategy that swaps parameters during a step: DDP reduces
    #: the gradients of the parameters it was built with only.
    data_parallel: ClassVar[bool] = True

    def __init__(self, settings: StrategySettings | None = None) -> None:
        self.settings = settings or StrategySettings()
        #: The name the strategy was registered under (set by the registry; the class name otherwise).
        self.name: str = self.settings.strategy_name or type(self).__name__.lower()
        #: Its own schedule (options ``epochs`` and ``milestones``); None: the comparison's.
        self.own_epochs: int | None = None
        self.own_milestones: tuple[int, ...] | None = None
        if self.schedule_options:
            self.own_epochs = self.settings.get("epochs", None, int)
            if self.own_epochs is not None:
                check_int(f"Option {self.name}.epochs", self.own_epochs, maximum=MAX_EPOCHS)
            self.own_milestones = self.settings.get("milestones", None, parse_milestones)
            if self.own_epochs is not None and self.own_milestones is not None:
                self._check_milestones(self.own_epochs)

    @property
    def expansion(self) -> int:
        return self.settings.expansion

    @property
    def inference_params_multiple(self) -> int:
        """How many times the plain model's parameters the deployable model has (an ensemble: e).

        The contract test holds every strategy to what it declares here.
        """
        return 1

    # ---- planning -------------------------------------------------------------------------------
    def fit(self, session: Session) -> TrainResult:
        """Train and return the result; the default is one run of the shared loop (the trainings
        ``requires`` names first). Override it only for a result that is not one training of this
        strategy (an ensemble combines its members' results)."""
        return session.train(self)

    def schedule(self, config: TrainConfig) -> TrainConfig:
        """The training configuration this strategy uses, derived from the comparison's: with its
        options ``epochs`` and ``milestones`` applied
        (:func:`~sopkit.training.config.reschedule`)."""
        return self._own_schedule(config, self.own_epochs)

    def _own_schedule(self, config: TrainConfig, epochs: int | None) -> TrainConfig:
        """``config`` trained for ``epochs`` (None: as many as it says) with the ``milestones``
        option, if given; a bad combination is reported naming the option."""
        if epochs is None and self.own_milestones is None:
            return config
        if self.own_milestones:
            self._check_milestones(epochs or config.epochs, own=epochs is not None)
            if config.schedule == "cosine":
                raise UserError(
                    f"Option {self.name}.milestones cannot be combined with --schedule cosine: "
                    "milestones are the drops of a step schedule."
                )
        return reschedule(config, epochs, self.own_milestones)

    def _check_milestones(self, epochs: int, *, own: bool = True) -> None:
        epochs_name = f"{self.name}'s epochs" if own else "--epochs"
        name = f"Option {self.name}.milestones"
        check_milestones(name, self.own_milestones, epochs, epochs_name)

    def requires(self, seed: int) -> Mapping[str, Requirement]:
        """The other trainings a run of this strategy with ``seed`` needs, by name (default: none).

        The session trains them (or reuses the same trainings done earlier) before the run, and the
        hooks read their results as ``run.required[name]``.
        """
        return {}

    def identity(self) -> tuple[object, ...]:
        """What makes two trainings of this strategy interchangeable (used to reuse results)."""
        return (
            type(self).__module__,
            type(self).__qualname__,
            self.expansion,
            tuple(sorted(self.settings.options.items())),
        )

    # ---- per run --------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, run: RunContext) -> nn.Module:
        """The model to train, built from the plain model (already on the run's device). Per-run
        state the other hooks need goes into ``run.state`` here."""
        return model

    def before_step(self, model: nn.Module, run: RunContext) -> None:
        """Called before the forward pass of every step."""

    def loss(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, run: RunContext
    ) -> torch.Tensor:
        """The scalar training loss of one batch: the data set's loss (cross-entropy, label-smoothed
        as configured; the mean squared error for a regression such as STS-B)."""
        if run.data.loss != "cross-entropy":
            return task_loss(model(inputs), targets, run.data.loss)
        return F.cross_entropy(model(inputs), targets, label_smoothing=run.config.label_smoothing)

    def after_backward(self, model: nn.Module, run: RunContext) -> None:
        """Called after ``backward`` and before the optimizer step."""

    def after_step(self, model: nn.Module, run: RunContext) -> None:
        """Called after the optimizer step."""

    def evaluation_model(self, model: nn.Module, run: RunContext) -> nn.Module:
        """The model the per-epoch validation and test evaluation runs (in eval mode)."""
        return model

    def deployable(self, model: nn.Module, run: RunContext) -> nn.Module:
        """The model that would be shipped; its test accuracy and parameter count are reported."""
        return model

    def report(self, model: nn.Module, run: RunContext) -> dict[str, Any]:
        """What the run reports about itself (e.g. the sampler it used), merged into
        ``TrainResult.extra``; called once, after ``deployable``, with the trained model."""
        return {}
