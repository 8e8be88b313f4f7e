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

A worked example (a strategy that adds label smoothing), registered in a plugin's pyproject.toml under
``[project.entry-points."sopkit.strategies"] smooth = "my_plugin:LabelSmoothing"``::

    class LabelSmoothing(sopkit.Strategy):
        description = "Cross-entropy with label smoothing."

        def __init__(self, settings):
            super().__init__(settings)
            self.smoothing = settings.get("smoothing", 0.1, float)

        def loss(self, model, inputs, targets, run):
            return F.cross_entropy(model(inputs), targets, label_smoothing=self.smoothing)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

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

    def __init__(self, settings: StrategySettings | None = None) -> None:
        self.settings = settings or StrategySettings()
        #: The name the strategy was registered under (set by the registry; the class name otherwise).
        self.name: str = self.settings.strategy_name or type(self).__name__.lower()

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
        """The training configuration this strategy uses, derived from the comparison's."""
        return config

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
        """The scalar training loss of one batch."""
        return F.cross_entropy(model(inputs), targets)

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
