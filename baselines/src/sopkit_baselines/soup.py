"""MODEL SOUPS (Wortsman et al. 2022; the paper's Appendix C, Table 5): ``e`` fine-tunings from one
start, their weights averaged into one model.

Every member starts from the same weights, the model the comparison's ``baseline`` starts from (for
a pretrained ``hf:`` model: the checkpoint and the same new head), and is fine-tuned with the
baseline's recipe under its own seed (data order, dropout). Member 1 is the comparison's own
``baseline`` run, reused; the others train a :class:`SoupMember`, which builds its start with the
comparison's seed (``RunContext.build_model``) and trains it with its own. Member seeds are the
ensemble's (:func:`sopkit_baselines.ensemble.member_seed`).

* ``soup`` ships the uniform soup: every floating-point weight and buffer is the mean over members.
* ``soup-greedy`` ships the greedy soup (Wortsman et al., Algorithm 1): members sorted by validation
  score, best first; each joins the soup if the soup's validation score with it is at least the
  score without it. A diverged member never joins.

Either ships one model with the baseline's parameters; what is reported is the method's cost, as
for the ensemble: train parameters, steps and wall time summed over the members, reused ones
included.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sopkit.errors import UserError
from sopkit.strategies.baseline import Baseline
from sopkit.training.settings import StrategySettings
from sopkit.training.strategy import Requirement, Session, Strategy
from sopkit.training.types import RunContext, TrainResult
from sopkit_baselines.ensemble import combined_result, member_seed

__all__ = ["GreedySoup", "SoupMember", "UniformSoup", "average_weights", "soup_requirements"]


class SoupMember(Baseline):
    """The baseline's training, started from the weights the comparison's seed ``start_seed``
    builds instead of the run's own: a soup's ingredient."""

    description = "A model soup's member: the baseline recipe from the comparison seed's start."

    def __init__(self, settings: StrategySettings | None = None, *, start_seed: int = 0) -> None:
        super().__init__(settings)
        self.start_seed = start_seed

    def identity(self) -> tuple[object, ...]:
        return (*super().identity(), "start", self.start_seed)

    def prepare(self, model: nn.Module, run: RunContext) -> nn.Module:
        if run.seed == self.start_seed:
            return model  # the loop built it with this very seed
        if run.build_model is None:
            raise UserError("A model soup's member needs the session's model builder (RunContext).")
        # The loop builds a run's model right after seeding torch with the run's seed: the start of
        # the comparison's baseline is that build under start_seed. Forked, so the run's own
        # random stream (dropout) goes on from its own seed.
        devices = [run.device] if run.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.start_seed)
            start = run.build_model()
        return start.to(run.device)


def soup_requirements(settings: StrategySettings, seed: int) -> list[Requirement]:
    """The ``settings.expansion`` member trainings of the soup for the comparison seed ``seed``:
    member 1 is the comparison's baseline run, the others :class:`SoupMember` from its start."""
    options = StrategySettings(settings.expansion, settings.options, "baseline")
    count = settings.expansion
    members = [Requirement(Baseline(options), seed, None)]
    for index in range(1, count):
        member = member_seed(seed, index)
        label = f"soup member {index + 1}/{count} (seed {member})"
        members.append(Requirement(SoupMember(options, start_seed=seed), member, label))
    return members


@torch.no_grad()
def average_weights(models: Sequence[nn.Module]) -> nn.Module:
    """A copy of ``models[0]`` whose floating-point parameters and buffers are the mean over
    ``models`` (same architecture); integer buffers (counters, position ids) are the first's."""
    if not models:
        raise ValueError("a soup needs at least one model")
    soup = copy.deepcopy(models[0])
    states = [model.state_dict() for model in models]
    averaged: dict[str, torch.Tensor] = {}
    for key, value in states[0].items():
        if value.is_floating_point():
            total = torch.zeros_like(value, dtype=torch.float64)
            for state in states:
                total += state[key].to(torch.float64)
            averaged[key] = (total / len(states)).to(value.dtype)
        else:
            averaged[key] = value
    soup.load_state_dict(averaged)
    return soup


def _finite(value: float) -> bool:
    return not math.isnan(value) and not math.isinf(value)


class UniformSoup(Strategy):
    """MODEL SOUP, uniform: ``e`` fine-tunings from one start, every weight averaged."""

    description = "Model soup: e fine-tunings from one start with their weights averaged (uniform)."
    # No training of its own: the members train on the baseline's schedule (--set baseline.epochs).
    schedule_options = False
    greedy = False

    def fit(self, session: Session) -> TrainResult:
        """Train (or reuse) the members and report the soup they make."""
        needed = soup_requirements(self.settings, session.seed)
        members = [session.train(m.strategy, seed=m.seed, label=m.label) for m in needed]
        for member in members:
            if member.model is None:
                raise UserError(f"Soup member (seed {member.seed}) returned no model to average.")
        chosen, model = self._soup(session, members)
        details = getattr(session, "metric_details", None)
        extra: dict[str, Any] = {
            "members": len(members),
            "member_seeds": [m.seed for m in members],
            "soup_seeds": [m.seed for m in chosen],
            "member_val_accuracy": [m.val_accuracy for m in members],
            "member_test_accuracy_mean": statistics.fmean(m.test_accuracy for m in members),
            **(details(model) if callable(details) else {}),
        }
        return combined_result(self.name, session, members, model, extra, diverged_from=chosen)

    def _soup(
        self, session: Session, members: list[TrainResult]
    ) -> tuple[list[TrainResult], nn.Module]:
        """The members in the soup and the soup: all of them, averaged."""
        return members, average_weights([m.model for m in members if m.model is not None])


class GreedySoup(UniformSoup):
    """MODEL SOUP, greedy: members by validation score, each kept if the soup does not get worse."""

    description = (
        "Greedy model soup: e fine-tunings from one start, added best first while validation "
        "does not drop."
    )
    greedy = True

    def _soup(
        self, session: Session, members: list[TrainResult]
    ) -> tuple[list[TrainResult], nn.Module]:
        healthy = [
            m for m in members if m.diverged_at_step is None and _finite(m.val_accuracy)
        ]
        if not healthy:  # every member diverged: the soup is theirs, reported as diverged
            return super()._soup(session, members)
        # Best first; equal scores keep the members' order (member 1 is the baseline run).
        ordered = sorted(healthy, key=lambda m: -m.val_accuracy)
        chosen = [ordered[0]]
        assert ordered[0].model is not None
        soup, best = ordered[0].model, session.evaluate(ordered[0].model, "val")
        for candidate in ordered[1:]:
            trial = average_weights([m.model for m in (*chosen, candidate) if m.model is not None])
            score = session.evaluate(trial, "val")
            if _finite(score) and score >= best:
                chosen.append(candidate)
                soup, best = trial, score
        if len(chosen) == 1:
            soup = copy.deepcopy(soup)  # never hand out the member's own model as the soup's
        return chosen, soup
