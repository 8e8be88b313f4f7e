"""ENSEMBLE-BASELINE (paper Section 5): ``e`` independently trained baselines, probabilities averaged.

The members are ordinary trainings of the ``baseline`` strategy (or ``baseline-long``, as the paper's
ImageNet protocol uses; option ``member``) through ``session.train``: the ensemble has no training of
its own, so it overrides ``fit`` to combine them. Member 0 trains with the
comparison's own seed and the same strategy settings as the comparison's ``baseline`` row, so the
session returns that very training instead of repeating it; the other members use seeds derived from
the comparison's seed (:func:`member_seed`). The distilled baseline builds its teacher with the same
function (:func:`member_requirements`, which distill declares as its ``requires``), so a comparison
that runs ``baseline``, ``ensemble`` and ``distill`` trains each member once.

What is reported is the cost of the method, not of this process: the wall time is the sum of every
member's training time, reused ones included; the train and inference parameter counts are the sums
over the members (``e`` times the baseline's); the step times are all members' steps.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Sequence
from typing import Any

from torch import nn

from sopkit.deploy.artifacts import AveragedEnsemble
from sopkit.mk import count_parameters
from sopkit.strategies.baseline import Baseline, BaselineLong
from sopkit.training.settings import StrategySettings
from sopkit.training.strategy import Requirement, Session, Strategy
from sopkit.training.types import TrainResult

__all__ = [
    "MEMBER_KINDS", "Ensemble", "EnsembleModel", "combined_result", "member_requirements",
    "member_seed",
]

#: The strategies an ensemble can be made of, by the name they are registered under in sopkit.
MEMBER_KINDS: dict[str, type[Baseline]] = {"baseline": Baseline, "baseline-long": BaselineLong}


def member_seed(seed: int, index: int) -> int:
    """The seed of ensemble member ``index`` for the comparison seed ``seed``.

    Member 0 uses ``seed`` itself (so it is the comparison's baseline run). The others hash
    ``(seed, index)`` to 32 bits rather than using ``seed + index``, which would make member 1 of
    seed 0 the baseline of seed 1 and correlate the ensembles of consecutive seeds.
    """
    if index == 0:
        return seed
    digest = hashlib.blake2b(f"sopkit-ensemble:{seed}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def member_strategy(settings: StrategySettings, kind: str) -> Baseline:
    """The member strategy, built exactly as the comparison builds its ``kind`` row.

    Same class, expansion and options means the same ``identity()``, so ``session.train`` reuses a
    training that row already did.
    """
    return MEMBER_KINDS[kind](StrategySettings(settings.expansion, settings.options, kind))


def member_requirements(settings: StrategySettings, kind: str, seed: int) -> dict[str, Requirement]:
    """The ``settings.expansion`` member trainings of the ensemble for the comparison seed ``seed``,
    in order, named ``member 1``, ``member 2``..."""
    strategy = member_strategy(settings, kind)
    count = settings.expansion
    members = {}
    for index in range(count):
        member = member_seed(seed, index)
        # Member 0 keeps the default label: it is the comparison's own baseline run.
        label = None if index == 0 else f"{kind} ensemble member {index + 1}/{count} (seed {member})"
        members[f"member {index + 1}"] = Requirement(strategy, member, label)
    return members


#: The members' predictions averaged (probabilities; outputs for a one-output regression). It is
#: sopkit's own ``AveragedEnsemble``, so a saved ensemble loads back as exactly this model.
EnsembleModel = AveragedEnsemble


class Ensemble(Strategy):
    """ENSEMBLE-BASELINE: ``e`` baselines with different seeds, averaged; ``e`` times the inference
    parameters. Option ``member``: ``baseline`` (default) or ``baseline-long``."""

    description = "Ensemble of e independently seeded baselines (probabilities averaged)."
    # No training of its own: its members train on their strategy's schedule (``member``), so the
    # options epochs and milestones go to that strategy (``--set baseline-long.epochs=330``).
    schedule_options = False

    def __init__(self, settings: StrategySettings | None = None) -> None:
        super().__init__(settings)
        self.member_kind = self.settings.get("member", "baseline", choices=tuple(MEMBER_KINDS))

    @property
    def inference_params_multiple(self) -> int:
        """The deployable model holds every member: ``e`` times the baseline's parameters."""
        return self.expansion

    def fit(self, session: Session) -> TrainResult:
        """Train (or reuse) the members and report the ensemble they form."""
        needed = member_requirements(self.settings, self.member_kind, session.seed).values()
        members = [session.train(m.strategy, seed=m.seed, label=m.label) for m in needed]
        model = EnsembleModel([member.model for member in members if member.model is not None])
        return combined_result(self.name, session, members, model, {
            "members": len(members),
            "member_seeds": [m.seed for m in members],
            "member_test_accuracy_mean": statistics.fmean(m.test_accuracy for m in members),
        })


def combined_result(
    name: str,
    session: Session,
    members: Sequence[TrainResult],
    model: nn.Module,
    extra: dict[str, Any],
    *,
    diverged_from: Sequence[TrainResult] | None = None,
) -> TrainResult:
    """The result of ``model``, made from the trainings ``members`` (an ensemble, a soup): scored on
    the session's data, at the cost of all members (train parameters, step times, wall time), and
    diverged where one of ``diverged_from`` (default: the members) diverged first."""
    steps = [m.diverged_at_step for m in (diverged_from or members) if m.diverged_at_step is not None]
    return TrainResult(
        strategy=name,
        seed=session.seed,
        config=members[0].config,
        test_accuracy=session.evaluate(model, "test"),
        val_accuracy=session.evaluate(model, "val"),
        train_params=sum(m.train_params for m in members),
        inference_params=count_parameters(model),
        step_times=[t for m in members for t in m.step_times],
        wall_time=sum(m.wall_time for m in members),
        curve=[],
        diverged_at_step=min(steps) if steps else None,
        extra=extra,
        model=model,
    )
