"""Majority kernels draw from an explicit per-model stream (seed, step), never torch's global
generator: a trial's draws survive other code consuming that generator, two models built with one
seed mix alike (what data-parallel ranks need), and a restored (seed, step) reproduces the draws."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import sopkit
from sopkit.data import DataSplits, TensorSplit
from sopkit.errors import UserError
from sopkit.mk import STREAM_TAG, MixingStream, derive_seed, expand, find_majority
from sopkit.strategies.adversarial import AdversarialMajorityKernels
from sopkit.strategies.majority import MK_SEED_TAG, MajorityKernelsStrategy


def _model(seed: int | None, sampler: str = "sfc64") -> nn.Module:
    torch.manual_seed(0)  # the same plain weights every time; the expand seed is what varies
    model = expand(nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3)), 3, seed=seed)
    find_majority(model).sampler = sampler  # type: ignore[union-attr]
    return model


def _mixed_weights(model: nn.Module, steps: int, consume_global: bool = False) -> list[torch.Tensor]:
    """The first layer's training weight at each of ``steps`` forwards (each is one draw)."""
    seen: list[torch.Tensor] = []
    handle = model[0].register_forward_pre_hook(lambda m, a: seen.append(m.weight.detach().clone()))
    model.train()
    x = torch.ones(2, 6)
    for _ in range(steps):
        if consume_global:
            torch.rand(1000)  # dropout, augmentation, another strategy: anything
        model(x)
    handle.remove()
    return seen


@pytest.mark.parametrize("sampler", ["sfc64", "torch"])
def test_draws_do_not_change_when_other_code_consumes_the_global_generator(sampler):
    quiet = _mixed_weights(_model(5, sampler), 4)
    noisy = _mixed_weights(_model(5, sampler), 4, consume_global=True)
    assert all(torch.equal(a, b) for a, b in zip(quiet, noisy, strict=True))
    assert not torch.equal(quiet[0], quiet[1])  # and every step draws afresh


def test_a_training_forward_takes_nothing_from_the_global_generator():
    model = _model(5)
    state = torch.get_rng_state()
    _mixed_weights(model, 3)
    assert torch.equal(torch.get_rng_state(), state)
    assert find_majority(model).stream.step == 3  # type: ignore[union-attr]


def test_two_models_expanded_with_one_seed_draw_the_same_mixings_and_other_seeds_differ():
    a, b, c = _mixed_weights(_model(11), 3), _mixed_weights(_model(11), 3), _mixed_weights(_model(12), 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not any(torch.equal(x, z) for x, z in zip(a, c, strict=True))


def test_without_a_seed_expand_draws_the_stream_seed_once_from_the_global_generator():
    torch.manual_seed(3)
    first = find_majority(_unseeded()).stream.seed  # type: ignore[union-attr]
    torch.manual_seed(3)
    again = find_majority(_unseeded()).stream.seed  # type: ignore[union-attr]
    torch.manual_seed(4)
    other = find_majority(_unseeded()).stream.seed  # type: ignore[union-attr]
    assert first == again != other


def _unseeded() -> nn.Module:
    return expand(nn.Linear(4, 4), 2)


def test_restoring_the_stream_state_reproduces_the_next_draws():
    model = _model(7)
    holder = find_majority(model)
    _mixed_weights(model, 2)
    state = holder.stream.state_dict()
    assert state == {"seed": derive_seed(7, STREAM_TAG), "step": 2}
    following = _mixed_weights(model, 3)
    holder.stream.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(following, _mixed_weights(model, 3), strict=True))
    # ... in another model too (a resumed checkpoint): its copies and stream state restored.
    other = _model(8)
    other.load_state_dict(model.state_dict())
    find_majority(other).stream.load_state_dict(state)  # type: ignore[union-attr]
    assert all(torch.equal(a, b) for a, b in zip(following, _mixed_weights(other, 3), strict=True))


def test_eval_and_fixed_mixing_forwards_do_not_advance_the_stream():
    model = _model(7)
    holder = find_majority(model)
    model.eval()
    model(torch.ones(1, 6))
    model.train()
    with sopkit.fixed_mixing(model, "uniform"):
        model(torch.ones(1, 6))
    assert holder.stream.step == 0


@pytest.mark.parametrize("state", [{"seed": -1, "step": 0}, {"seed": 2**63, "step": 0},
                                   {"seed": 1, "step": -3}])
def test_an_invalid_stream_state_is_refused(state):
    with pytest.raises(ValueError, match="stream"):
        MixingStream(1).load_state_dict(state)


def test_derived_seeds_differ_by_tag_and_from_the_seed_itself():
    seeds = {derive_seed(0, MK_SEED_TAG), derive_seed(0, STREAM_TAG), derive_seed(1, MK_SEED_TAG)}
    assert len(seeds) == 3 and 0 not in seeds and all(0 <= s < 2**63 for s in seeds)
    # Pinned: trials stored under one sopkit version must draw the same under the next.
    assert derive_seed(123, "x") == 0x6D32D6527795BC3C


def test_the_seeds_of_a_streams_steps_are_pinned():
    stream = MixingStream(1)
    assert [stream.next_seed(), stream.next_seed()] == [0x3396C772B6B3C8FF, 0x8A34C4A36F9AD6]
    assert stream.step == 2


def test_the_mk_strategy_seeds_its_model_from_the_run_seed_alone():
    """Two ranks of one data-parallel trial prepare with the same run seed: same copies, same
    stream, whatever their global generators did before."""
    strategy = MajorityKernelsStrategy(sopkit.StrategySettings(expansion=3, strategy_name="mk"))
    run = types.SimpleNamespace(seed=4)
    torch.manual_seed(0)
    rank0 = strategy.prepare(nn.Linear(5, 5), run)  # type: ignore[arg-type]
    torch.manual_seed(0)
    plain = nn.Linear(5, 5)  # every rank builds the same model ...
    torch.rand(99)  # ... and then its global generator may have done anything
    rank1 = strategy.prepare(plain, run)  # type: ignore[arg-type]
    h0, h1 = find_majority(rank0), find_majority(rank1)
    assert h0.stream == h1.stream  # type: ignore[union-attr]
    assert h0.stream.seed == derive_seed(derive_seed(4, MK_SEED_TAG), STREAM_TAG)  # type: ignore[union-attr]
    assert torch.equal(h0.copies, h1.copies)  # type: ignore[union-attr]
    other = strategy.prepare(nn.Linear(5, 5), types.SimpleNamespace(seed=5))  # type: ignore[arg-type]
    assert find_majority(other).stream.seed != h0.stream.seed  # type: ignore[union-attr]


def test_adversarial_random_mixing_is_the_next_draw_of_the_stream():
    model, reference = _model(9, "torch"), _model(9, "torch")
    holder, reference_holder = find_majority(model), find_majority(reference)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    strategy = AdversarialMajorityKernels(sopkit.StrategySettings(expansion=3, strategy_name="adv-mk"))
    torch.rand(7)  # the global generator's state is irrelevant
    p, _ = strategy.mixing(model, holder, x, y)
    assert holder.stream.step == 1  # type: ignore[union-attr]
    expected, _ = strategy.mixing(reference, reference_holder, x, y)
    assert torch.equal(p, expected)


def _tiny_data(n: int = 64) -> DataSplits:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n + 32, 6, generator=generator)
    y = (x @ torch.randn(6, 3, generator=generator)).argmax(dim=1)
    return DataSplits("tiny", (6,), 3, TensorSplit(x[:n], y[:n]), TensorSplit(x[n:], y[n:]),
                      TensorSplit(x[n:], y[n:]))


class _NoisyMK(MajorityKernelsStrategy):
    """MK whose every step first consumes the global generator (as dropout would)."""

    def loss(self, model, inputs, targets, run):  # type: ignore[no-untyped-def]
        torch.rand(5)
        return super().loss(model, inputs, targets, run)


def test_a_trial_does_not_depend_on_other_consumers_of_the_global_generator():
    def train(cls: type[MajorityKernelsStrategy]) -> dict[str, torch.Tensor]:
        session = sopkit.TrainingSession(
            _tiny_data(), lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)),
            sopkit.TrainConfig(epochs=2, batch_size=16), device=torch.device("cpu"), seed=2,
        )
        result = session.train(cls(sopkit.StrategySettings(expansion=3, strategy_name="mk")))
        assert result.model is not None
        return result.model.state_dict()

    plain, noisy = train(MajorityKernelsStrategy), train(_NoisyMK)
    assert all(torch.equal(plain[k], noisy[k]) for k in plain)


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64, True, 1.5, "7"])
def test_expand_refuses_a_seed_that_is_not_a_63_bit_natural_number(seed):
    with pytest.raises(UserError, match="seed must be"):
        expand(nn.Linear(2, 2), 2, seed=seed)


_RANK_SCRIPT = """
import hashlib, sys, torch
from torch import nn
import sopkit
torch.manual_seed(0)  # the same initial weights, as DDP broadcasts them to every rank
model = sopkit.expand(nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3)), 3, seed=11)
torch.manual_seed(int(sys.argv[1]))  # but each process's global generator differs from then on
torch.rand(int(sys.argv[1]) + 1)
model.train()
digest = hashlib.sha256()
for _ in range(3):
    model(torch.ones(2, 6))
    digest.update(model[0].weight.detach().numpy().tobytes())
print(digest.hexdigest())
"""


def test_separate_processes_with_one_seed_mix_alike_whatever_their_global_generators():
    """What data-parallel ranks rely on: the same seed gives the same p in another process."""
    import subprocess
    import sys

    def rank(global_seed: int) -> str:
        done = subprocess.run([sys.executable, "-c", _RANK_SCRIPT, str(global_seed)],
                              capture_output=True, text=True, check=True)
        return done.stdout.strip()

    first, second = rank(0), rank(5)
    assert len(first) == 64 and first == second
