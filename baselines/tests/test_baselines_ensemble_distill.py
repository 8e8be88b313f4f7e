"""The ensemble and distillation baselines: the KD loss against hand-computed values, members trained
once per comparison (reused through the session), the teacher reaching the student's run through
``requires`` and ``run.required``, and costs reported for the method."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from baselines_helpers import settings, tiny_model
from sopkit_baselines.distill import Distillation, kd_loss
from sopkit_baselines.ensemble import Ensemble, EnsembleModel, member_seed
from torch import nn

from sopkit.errors import UserError
from sopkit.mk import count_parameters
from sopkit.strategies.baseline import Baseline
from sopkit.training.settings import StrategySettings

# ---- the KD loss, golden values ---------------------------------------------------------------------


def test_kd_loss_golden_value_with_temperature_and_mixing() -> None:
    # s = (1, 0), t = (0, 1), y = 0, T = 2, alpha = 0.5.
    # softmax(s/T) = (q, 1-q), softmax(t/T) = (1-q, q) with q = 1/(1+e^-0.5) = 0.6224593;
    # KL = (2q - 1) * ln(q / (1-q)) = tanh(0.25) * 0.5 = 0.1224593;
    # CE = ln(1 + e^-1) = 0.3132617;
    # loss = 0.5 * 4 * 0.1224593 + 0.5 * 0.3132617 = 0.4015495.
    loss = kd_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0]),
                   temperature=2.0, alpha=0.5)
    assert loss.item() == pytest.approx(0.4015495, abs=1e-6)


def test_kd_loss_golden_value_averages_over_the_batch() -> None:
    # Sample 1: student = teacher, KL = 0. Sample 2: s = (0, 0, 0), t = (ln 2, 0, 0), so
    # softmax(t) = (1/2, 1/4, 1/4) against uniform: KL = 1/2 ln(3/2) + 1/2 ln(3/4) = 0.0588915.
    # alpha = 1, T = 1: the loss is the batch mean of KL, 0.0294457.
    student = torch.tensor([[0.3, -1.0, 2.0], [0.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.3, -1.0, 2.0], [math.log(2), 0.0, 0.0]])
    loss = kd_loss(student, teacher, torch.tensor([2, 1]), temperature=1.0, alpha=1.0)
    assert loss.item() == pytest.approx(0.0294457, abs=1e-6)


def test_kd_loss_with_alpha_zero_is_cross_entropy() -> None:
    student, teacher = torch.randn(5, 4), torch.randn(5, 4)
    targets = torch.tensor([0, 1, 2, 3, 0])
    torch.testing.assert_close(
        kd_loss(student, teacher, targets, temperature=3.0, alpha=0.0),
        F.cross_entropy(student, targets),
    )


@pytest.mark.parametrize("options", [{"temperature": "0"}, {"alpha": "1.5"}, {"member": "mk"}])
def test_bad_distill_options_are_user_errors(options: dict[str, str]) -> None:
    with pytest.raises(UserError, match="distill"):
        Distillation(settings("distill", **options))


# ---- the ensemble -----------------------------------------------------------------------------------


class _Constant(nn.Module):
    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


def test_the_ensemble_averages_probabilities_not_logits() -> None:
    # Logit averaging would give (0.5, 0.5, 0) -> a tie; probability averaging favours class 2...
    members = [_Constant([10.0, 0.0, 9.0]), _Constant([-9.0, 1.0, 0.0])]
    probs = torch.stack([F.softmax(m.logits, dim=0) for m in members]).mean(dim=0)
    output = EnsembleModel(members)(torch.zeros(1, 1))
    torch.testing.assert_close(output.softmax(dim=1)[0], probs)
    torch.testing.assert_close(output[0], probs.log())
    assert count_parameters(EnsembleModel(members)) == 6


def test_an_ensemble_of_one_output_regressors_averages_their_predictions() -> None:
    # STS-B's models have one output: its softmax is 1 whatever the input, so an ensemble of them
    # averages predictions instead (2.5 and -0.5 -> 1.0; a softmax path would give 0.0 for all).
    members = [_Constant([2.5]), _Constant([-0.5])]
    output = EnsembleModel(members)(torch.zeros(3, 1))
    torch.testing.assert_close(output, torch.full((3, 1), 1.0))


def test_member_seeds_are_distinct_and_do_not_collide_with_other_comparison_seeds() -> None:
    seeds = {(s, i): member_seed(s, i) for s in range(20) for i in range(5)}
    assert all(member_seed(s, 0) == s for s in range(20))
    assert len(set(seeds.values())) == len(seeds)
    assert not {v for (s, i), v in seeds.items() if i > 0} & set(range(20))


def test_the_ensemble_reuses_the_baseline_run_and_reports_the_method_cost(make_session) -> None:  # type: ignore[no-untyped-def]
    session = make_session(seed=5)
    baseline = session.train(Baseline(settings("baseline")))
    ensemble = Ensemble(settings("ensemble")).fit(session)
    # One baseline run (seed 5) and two more members; member 0 is the baseline run itself.
    assert session.runs == [("baseline", 5), ("baseline", member_seed(5, 1)),
                            ("baseline", member_seed(5, 2))]
    assert ensemble.extra["member_seeds"][0] == 5
    assert ensemble.inference_params == 3 * baseline.inference_params
    assert ensemble.train_params == 3 * baseline.train_params
    members = [session.train(Baseline(settings("baseline")), seed=s)
               for s in ensemble.extra["member_seeds"]]
    assert ensemble.wall_time == pytest.approx(sum(m.wall_time for m in members))
    assert baseline.wall_time < ensemble.wall_time
    assert len(ensemble.step_times) == sum(len(m.step_times) for m in members)
    assert Ensemble(settings("ensemble")).inference_params_multiple == 3
    assert Ensemble(settings("ensemble", expansion=2)).inference_params_multiple == 2


def test_baseline_long_members_reuse_the_baseline_long_run(make_session) -> None:  # type: ignore[no-untyped-def]
    from sopkit.strategies.baseline import BaselineLong

    session = make_session(seed=1, epochs=1)
    options = {"member": "baseline-long", "baseline-long.long_factor": "2"}
    long_run = session.train(BaselineLong(settings("baseline-long", **options)))
    ensemble = Ensemble(settings("ensemble", **options)).fit(session)
    assert session.runs[0] == ("baseline-long", 1) and len(session.runs) == 3
    assert long_run.config.epochs == 2 and ensemble.config.epochs == 2


# ---- distillation -------------------------------------------------------------------------------------


def test_distill_trains_no_member_twice_and_reports_the_teacher_apart(make_session) -> None:  # type: ignore[no-untyped-def]
    session = make_session(seed=2)
    ensemble = Ensemble(settings("ensemble")).fit(session)
    runs_before = len(session.runs)
    result = Distillation(settings("distill")).fit(session)
    assert session.runs[runs_before:] == [("distill", 2)]  # only the student
    assert result.extra["teacher_wall_time"] == pytest.approx(ensemble.wall_time)
    assert result.extra["teacher_test_accuracy"] == ensemble.test_accuracy
    assert list(result.extra) == ["teacher_wall_time", "teacher_test_accuracy"]
    assert result.inference_params == count_parameters(tiny_model())
    # The cached members were put back in the mode they were in.
    assert all(m.training == ensemble.model.training for m in ensemble.model.modules())  # type: ignore[union-attr]


def test_distill_declares_the_ensemble_members_as_the_trainings_its_run_requires() -> None:
    required = Distillation(settings("distill")).requires(9)
    assert list(required) == ["member 1", "member 2", "member 3"]
    assert [r.seed for r in required.values()] == [member_seed(9, i) for i in range(3)]
    assert all(r.strategy.name == "baseline" for r in required.values())
    assert required["member 1"].label is None  # the comparison's own baseline run
    long = Distillation(settings("distill", member="baseline-long")).requires(9)
    assert {r.strategy.name for r in long.values()} == {"baseline-long"}


def test_session_train_of_the_student_alone_trains_its_teacher_first(make_session) -> None:  # type: ignore[no-untyped-def]
    session = make_session(seed=6)
    student = session.train(Distillation(settings("distill")))
    assert session.runs == [("baseline", 6), ("baseline", member_seed(6, 1)),
                            ("baseline", member_seed(6, 2)), ("distill", 6)]
    # The same as through fit, which is the default fit: one training of its own.
    assert Distillation(settings("distill")).fit(session) is student


def test_the_student_cannot_run_without_its_teacher() -> None:
    from baselines_helpers import tiny_data

    from sopkit.training.types import RunContext, TrainConfig

    run = RunContext(0, TrainConfig(), torch.device("cpu"), tiny_data(),
                     torch.Generator().manual_seed(0), steps_per_epoch=4)
    with pytest.raises(RuntimeError, match="run.required"):
        Distillation(settings("distill")).prepare(tiny_model(), run)


def test_distill_first_trains_the_members_the_ensemble_then_reuses(make_session) -> None:  # type: ignore[no-untyped-def]
    session = make_session(seed=3)
    Distillation(settings("distill")).fit(session)
    assert len(session.runs) == 4  # three members and the student
    Ensemble(settings("ensemble")).fit(session)
    session.train(Baseline(settings("baseline")))
    assert len(session.runs) == 4


def test_the_student_follows_the_teacher(make_session) -> None:  # type: ignore[no-untyped-def]
    # With alpha = 1 the labels are never seen: the student can only learn from the teacher.
    session = make_session(seed=4, epochs=6, lr=0.03)
    ensemble = Ensemble(settings("ensemble")).fit(session)
    student = Distillation(settings("distill", alpha="1", temperature="1")).fit(session)
    assert ensemble.test_accuracy > 0.6
    assert student.test_accuracy > 0.6


def test_a_bare_alpha_for_subset_is_not_refused_because_distill_would_reject_it() -> None:
    # Both read "alpha"; distill allows [0, 1], subset any alpha >= 0. With only subset selected,
    # distill is asked which keys it reads, and its objection to the value is not the user's.
    from sopkit.registry import check_options

    check_options(StrategySettings(3, {"alpha": "2"}), ["subset"])
    with pytest.raises(UserError, match="distill.alpha must be in"):
        check_options(StrategySettings(3, {"alpha": "2"}), ["subset", "distill"])
    with pytest.raises(UserError, match="Did you mean 'temperature'"):
        check_options(StrategySettings(3, {"distill.temprature": "2"}), ["subset"])


def test_sopkit_bench_leaves_ensemble_and_distill_untimed_and_names_their_members() -> None:
    from baselines_helpers import tiny_data

    from sopkit.bench.entries import ProbeSession, single_step_note
    from sopkit.training.config import TrainConfig

    probe = ProbeSession(tiny_data(), tiny_model, TrainConfig(), device=torch.device("cpu"))
    expected = "not timed: trains several models (baseline first); its cost is their steps"
    assert single_step_note(Ensemble(settings("ensemble")), probe) == expected
    assert single_step_note(Distillation(settings("distill")), probe) == expected
    assert single_step_note(Baseline(settings("baseline")), probe) is None
