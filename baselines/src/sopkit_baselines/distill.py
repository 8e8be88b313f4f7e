"""DISTILLED-BASELINE (paper Section 5): the baseline architecture trained to mimic the ensemble.

The student is the baseline model trained with the knowledge-distillation loss of Hinton et al.
(2015), :func:`kd_loss`, from the ensemble baseline as teacher. The student's run declares the
teacher's members as the trainings it requires (``requires``, from
:func:`sopkit_baselines.ensemble.member_requirements`): the session trains them first, or reuses them
when the comparison also runs ``baseline`` and ``ensemble`` for the same seed, so no member is
trained twice; the hooks read them as ``run.required``, and the loop keeps them in eval mode for the
run. The teacher built from them lives in ``run.state``, not on the strategy.

The teacher's "logits" are the ensemble's output, ``log(mean_k softmax(z_k))``: the student mimics
exactly the predictor reported as ENSEMBLE-BASELINE, and ``softmax(t / T)`` sharpens or softens
that averaged distribution.

Costs are reported apart: ``wall_time`` is the student's own training (its steps include the
teacher's forward passes); ``extra["teacher_wall_time"]`` is the sum of the members' training times,
reused or not. The cost of the method is their sum.

Options: ``temperature`` (``T``, default 4) and ``alpha`` (the weight of the soft-target term,
default 0.9): Hinton et al. found a temperature of a few units and a small weight on the hard
targets to work best. ``member`` (``baseline`` or ``baseline-long``) picks the teacher's members,
and the student is trained on the same schedule as one of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sopkit.errors import UserError
from sopkit.training.loop import evaluate
from sopkit.training.settings import StrategySettings
from sopkit.training.strategy import Requirement, Strategy
from sopkit.training.types import RunContext, TrainConfig
from sopkit_baselines.ensemble import (
    MEMBER_KINDS,
    EnsembleModel,
    member_requirements,
    member_strategy,
)

__all__ = ["Distillation", "kd_loss"]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``, batch-averaged.

    The ``T^2`` keeps the soft term's gradients on the scale of the hard term's as ``T`` changes
    (the soft gradients scale as ``1/T^2``). ``label_smoothing`` smooths the hard term's labels only
    (the comparison's ``--label-smoothing``); the teacher's soft targets are left as they are.
    """
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    # kl_div(input, target) is KL(target || input), with both as log-probabilities here.
    soft = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    hard = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    return alpha * temperature**2 * soft + (1 - alpha) * hard


#: The largest distillation temperature: softmax(logits / T) is uniform long before it.
MAX_TEMPERATURE = 1e6

class Distillation(Strategy):
    """DISTILLED-BASELINE: the baseline architecture trained with a KD loss from the ensemble."""

    description = "Baseline architecture distilled (Hinton KD) from the e-member ensemble."

    def __init__(self, settings: StrategySettings | None = None) -> None:
        super().__init__(settings)
        self.temperature = self.settings.get("temperature", 4.0)
        self.alpha = self.settings.get("alpha", 0.9)
        self.member_kind = self.settings.get("member", "baseline", choices=tuple(MEMBER_KINDS))
        # The soft term is scaled by temperature**2 (Hinton et al.), which must stay a float.
        if not (math.isfinite(self.temperature) and 0 < self.temperature <= MAX_TEMPERATURE):
            raise UserError(
                f"Option {self.name}.temperature must be a positive number of at most "
                f"{MAX_TEMPERATURE:g}, got {self.temperature}."
            )
        if not 0 <= self.alpha <= 1:
            raise UserError(f"Option {self.name}.alpha must be in [0, 1], got {self.alpha}.")

    def schedule(self, config: TrainConfig) -> TrainConfig:
        # The student trains as long as a member does (BASELINE-LONG + KD in the paper's Section 5.2),
        # unless its own options epochs and milestones say otherwise.
        return super().schedule(member_strategy(self.settings, self.member_kind).schedule(config))

    def requires(self, seed: int) -> Mapping[str, Requirement]:
        """The teacher's members: the ensemble's, for the same seed."""
        return member_requirements(self.settings, self.member_kind, seed)

    def prepare(self, model: nn.Module, run: RunContext) -> nn.Module:
        members = [result.model for result in run.required.values() if result.model is not None]
        if not members:
            raise RuntimeError(
                "distill needs its teacher's members in run.required; train it through "
                "TrainingSession.train, which trains what requires() names first"
            )
        if run.data.loss != "cross-entropy":  # KD matches class probabilities: none here
            raise UserError(
                f"distill distils class probabilities; {run.data.name} is scored as a regression "
                f"(loss {run.data.loss!r}). Compare it with baseline, mk, ensemble or soups."
            )
        # The loop keeps the members in eval mode for the run; the wrapper follows them.
        run.state.teacher = EnsembleModel(members).eval()
        return model

    def loss(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, run: RunContext
    ) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = run.state.teacher(inputs)
        return kd_loss(model(inputs), teacher_logits, targets, temperature=self.temperature,
                       alpha=self.alpha, label_smoothing=run.config.label_smoothing)

    def report(self, model: nn.Module, run: RunContext) -> dict[str, Any]:
        """The teacher's cost (its members' training time, reused or not) and its accuracy."""
        teacher_accuracy = evaluate(
            run.state.teacher, run.data.test,
            batch_size=run.config.eval_batch_size, bf16=run.config.bf16,
        )
        return {
            "teacher_wall_time": sum(result.wall_time for result in run.required.values()),
            "teacher_test_accuracy": teacher_accuracy,
        }
