"""Model soups: the weight average against hand values, members fine-tuned from one start with their
own seeds (the comparison's baseline reused as member 1), the greedy recipe's rule, and costs
reported for the method."""

from __future__ import annotations

import math

import pytest
import torch
from baselines_helpers import settings, tiny_data, tiny_model
from sopkit_baselines.ensemble import member_seed
from sopkit_baselines.soup import GreedySoup, SoupMember, UniformSoup, average_weights
from torch import nn

from sopkit.mk import count_parameters
from sopkit.strategies.baseline import Baseline
from sopkit.training.config import TrainConfig
from sopkit.training.types import RunContext


def test_average_weights_is_the_mean_of_float_tensors_and_keeps_integer_buffers() -> None:
    models = []
    for value in (1.0, 2.0, 6.0):
        model = nn.BatchNorm1d(2)
        with torch.no_grad():
            model.weight.fill_(value)
            model.running_mean.fill_(-value)
        model.num_batches_tracked.fill_(int(value))
        models.append(model)
    soup = average_weights(models)
    assert torch.equal(soup.weight, torch.full((2,), 3.0))
    assert torch.equal(soup.running_mean, torch.full((2,), -3.0))
    assert int(soup.num_batches_tracked) == 1  # the first member's counter, not a mean
    assert torch.equal(models[0].weight, torch.ones(2))  # the members are untouched


def test_a_soup_member_starts_from_the_comparison_seeds_weights() -> None:
    torch.manual_seed(0)
    start = tiny_model()
    torch.manual_seed(5)
    own = tiny_model()
    run = RunContext(5, TrainConfig(), torch.device("cpu"), tiny_data(), torch.Generator(), 1,
                     build_model=tiny_model)
    state_before = torch.get_rng_state()
    member = SoupMember(settings("baseline"), start_seed=0).prepare(own, run)
    for a, b in zip(member.parameters(), start.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(next(own.parameters()), next(start.parameters()))
    assert torch.equal(torch.get_rng_state(), state_before)  # the run's own stream goes on


def test_uniform_soup_averages_members_trained_from_one_start_reusing_the_baseline(
    make_session,
) -> None:
    session = make_session(seed=0, epochs=2, lr=0.01)
    baseline = session.train(Baseline(settings("baseline")))
    result = UniformSoup(settings("soup")).fit(session)
    seeds = [0, member_seed(0, 1), member_seed(0, 2)]
    # The baseline run is member 1 (reused, not retrained); two more fine-tunings ran.
    assert session.runs == [("baseline", 0), ("baseline", seeds[1]), ("baseline", seeds[2])]
    assert result.extra["member_seeds"] == seeds and result.extra["soup_seeds"] == seeds
    members = [session.train(r.strategy, seed=r.seed) for r in _requirements(0)]
    assert members[0] is baseline
    expected = [torch.stack([p for p in ps]).mean(dim=0)
                for ps in zip(*(m.model.parameters() for m in members), strict=True)]
    for got, want in zip(result.model.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    # One model of the baseline's size; the training cost of all three members.
    assert result.inference_params == count_parameters(baseline.model) == baseline.inference_params
    assert result.train_params == 3 * baseline.train_params
    assert result.wall_time == pytest.approx(sum(m.wall_time for m in members))
    assert len(result.step_times) == sum(len(m.step_times) for m in members)
    assert result.test_accuracy == session.evaluate(result.model, "test")


def _requirements(seed: int):  # type: ignore[no-untyped-def]
    from sopkit_baselines.soup import soup_requirements

    return soup_requirements(settings("soup"), seed)


def test_greedy_soup_is_never_worse_on_validation_than_its_best_member(make_session) -> None:
    session = make_session(seed=1, epochs=2, lr=0.01)
    result = GreedySoup(settings("soup-greedy")).fit(session)
    members = [session.train(r.strategy, seed=r.seed) for r in _requirements(1)]
    best = max(members, key=lambda m: m.val_accuracy)
    assert result.extra["soup_seeds"][0] == best.seed  # the best member goes in first
    assert result.val_accuracy >= best.val_accuracy
    assert set(result.extra["soup_seeds"]) <= {m.seed for m in members}
    if len(result.extra["soup_seeds"]) == 1:  # the soup is a copy of the best, not the member itself
        assert result.model is not best.model


def test_same_seed_gives_the_same_soup(make_session) -> None:
    one = UniformSoup(settings("soup")).fit(make_session(seed=2, lr=0.01))
    two = UniformSoup(settings("soup")).fit(make_session(seed=2, lr=0.01))
    for a, b in zip(one.model.parameters(), two.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert one.test_accuracy == two.test_accuracy


def test_a_diverged_member_is_left_out_of_the_greedy_soup(make_session) -> None:
    session = make_session(seed=0, epochs=1, lr=0.01)
    member = session.train(Baseline(settings("baseline")))
    member.val_accuracy = math.nan  # as a member whose loss went NaN scores
    member.diverged_at_step = 3
    result = GreedySoup(settings("soup-greedy")).fit(session)
    assert 0 not in result.extra["soup_seeds"]
    assert result.diverged_at_step is None
