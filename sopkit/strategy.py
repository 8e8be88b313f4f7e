"""The ``Strategy`` base class: what a training method may change, as hooks the one loop calls.

The loop (``sopkit.train``) owns seeding, the optimizer, ``backward``, ``step``, schedules, timing and
evaluation. A strategy only answers hooks, all instance methods, so two strategies (or two
configurations of one) can live in one process. The hooks, in the order the loop calls them::

    schedule(config)                 -> the TrainConfig this strategy trains with (e.g. more epochs)
    prepare(model, run)              -> the model to train (e.g. expanded into majority kernels)
    for every step:
        before_step(model, run)      -> e.g. choose a subset of neurons, an adversarial mixing
        loss(model, inputs, targets, run) -> scalar loss (default: cross-entropy of model(inputs))
        [loop: backward]
        after_backward(model, run)   -> e.g. gradient surgery
        [loop: optimizer step]
        after_step(model, run)
    evaluation_model(model, run)     -> the model the per-epoch validation/test evaluation runs
    deployable(model, run)           -> the model you would ship (e.g. collapsed)

Strategies that need several trainings (an ensemble, a distilled student and its teacher) override
``fit(session)`` and call ``session.train(...)`` once per member; they still never run a loop of
their own.

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

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from sopkit.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sopkit.train import RunContext, TrainConfig, TrainingSession, TrainResult

T = TypeVar("T")


@dataclass(frozen=True)
class StrategySettings:
    """What a strategy is configured with: the expansion factor and free-form ``KEY=VALUE`` options.

    Options come from ``sopkit compare --set KEY=VALUE``. ``--set mk.init=replicate`` applies to the
    ``mk`` strategy only; a bare ``--set eps=0.1`` applies to every strategy that reads ``eps``.
    A strategy reads its options in ``__init__``: :func:`sopkit.registry.check_options` constructs
    the strategies concerned to learn which keys each reads, so that a misspelt option fails before
    training instead of being ignored.
    """

    expansion: int = 3
    options: Mapping[str, str] = field(default_factory=dict)
    strategy_name: str = ""
    #: ``(strategy name, key)`` of every option asked for, by every strategy these settings (and
    #: their ``for_strategy`` copies) were read by.
    asked: set[tuple[str, str]] = field(default_factory=set, compare=False, repr=False)

    def for_strategy(self, name: str) -> StrategySettings:
        """The same settings, read on behalf of the strategy called ``name``."""
        return StrategySettings(self.expansion, self.options, name, self.asked)

    def get(
        self,
        key: str,
        default: T,
        parse: Callable[[str], T] | None = None,
        *,
        choices: tuple[T, ...] | None = None,
    ) -> T:
        """The option ``key`` parsed with ``parse`` (default: the type of ``default``).

        A value that does not parse, or is not one of ``choices``, is the user's mistake: UserError.
        """
        self.asked.add((self.strategy_name, key))
        scoped = f"{self.strategy_name}.{key}" if self.strategy_name else key
        raw = self.options.get(scoped, self.options.get(key))
        if raw is None:
            return default
        parser: Callable[[str], Any] = parse or _parser_for(default)
        try:
            value = parser(raw)
        except (TypeError, ValueError) as error:
            raise UserError(f"Option {scoped}={raw!r} is not valid: {error}.") from None
        if choices is not None and value not in choices:
            valid = ", ".join(map(str, choices))
            raise UserError(f"Option {scoped}={raw!r} is not valid. Valid values: {valid}.")
        return value  # type: ignore[no-any-return]


def _parser_for(default: object) -> Callable[[str], Any]:
    if isinstance(default, bool):
        return _parse_bool
    if default is None:
        return str
    return type(default)


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


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
    def fit(self, session: TrainingSession) -> TrainResult:
        """Train and return the result; the default is one run of the shared loop."""
        return session.train(self)

    def schedule(self, config: TrainConfig) -> TrainConfig:
        """The training configuration this strategy uses, derived from the comparison's."""
        return config

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
        """The model to train, built from the plain model (already on the run's device)."""
        return model

    def before_step(self, model: nn.Module, run: RunContext) -> None:
        """Called before the forward pass of every step."""

    def loss(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, run: RunContext
    ) -> torch.Tensor:
        """The scalar training loss of one batch."""
        import torch.nn.functional as F

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
