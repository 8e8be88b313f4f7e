"""The controls for the paper's explanations of majority kernels: SAM against a hand-computed step,
the wide MLP's size and training, weight noise whose variance matches MK's Dirichlet mixing (Monte
Carlo over real MK copies), and the EMA's hand values. The strategy contract
(tests/test_strategy_contract.py) covers each once registered."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from baselines_helpers import settings, tiny_data, tiny_model
from sopkit_baselines.ema import WeightAverage
from sopkit_baselines.sam import SharpnessAware
from sopkit_baselines.weight_noise import WeightNoise
from sopkit_baselines.wide import Wide, widen
from torch import nn

from sopkit.errors import UserError
from sopkit.mk import COPIES_NAME, count_parameters, expand
from sopkit.models import build_model
from sopkit.training.config import TrainConfig
from sopkit.training.settings import StrategySettings
from sopkit.training.types import RunContext


def _run(seed: int = 0) -> RunContext:
    return RunContext(seed, TrainConfig(), torch.device("cpu"), tiny_data(),
                      torch.Generator().manual_seed(seed), 4)


def _step(strategy, model, inputs, targets, run, lr: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """One step as the loop takes it: hooks, zero_grad(set_to_none), backward, SGD step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    strategy.before_step(model, run)
    loss = strategy.loss(model, inputs, targets, run)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    strategy.after_backward(model, run)
    optimizer.step()
    strategy.after_step(model, run)
    return loss


# ---- sam ----------------------------------------------------------------------------------------
def _ce_grads(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    """The cross-entropy's gradient for a linear model, in closed form: (softmax - onehot) / n."""
    delta = (torch.softmax(x @ w.T + b, dim=1) - F.one_hot(y, w.shape[0]).double()) / len(y)
    return delta.T @ x, delta.sum(dim=0)


def test_sam_takes_the_gradient_at_the_perturbed_point_and_steps_from_the_weights() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    rho, lr = 0.3, 0.5
    gw, gb = _ce_grads(w, b, x, y)
    norm = math.sqrt(gw.pow(2).sum().item() + gb.pow(2).sum().item())
    pw, pb = _ce_grads(w + rho * gw / norm, b + rho * gb / norm, x, y)

    run = _run()
    loss = _step(SharpnessAware(settings("sam", rho=str(rho))), model, x, y, run, lr)
    torch.testing.assert_close(model.weight.detach(), w - lr * pw, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.bias.detach(), b - lr * pb, rtol=0, atol=1e-12)
    # The loss the loop records is the perturbed point's; nothing is left in run.state.
    perturbed = F.cross_entropy(x @ (w + rho * gw / norm).T + b + rho * gb / norm, y)
    assert loss.item() == pytest.approx(perturbed.item(), abs=1e-12)
    assert vars(run.state) == {}


def test_sam_with_rho_zero_is_a_plain_step() -> None:
    torch.manual_seed(1)
    model = tiny_model()
    plain = copy.deepcopy(model)
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    _step(SharpnessAware(settings("sam", rho="0")), model, x, y, _run(), 0.1)
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
    F.cross_entropy(plain(x), y).backward()
    optimizer.step()
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rho", ["nan", "inf", "-0.1", "1e309", "big"])
def test_sam_refuses_a_bad_rho(rho: str) -> None:
    with pytest.raises(UserError, match="sam.rho"):
        SharpnessAware(settings("sam", rho=rho))


def test_sam_reads_rho_with_its_default() -> None:
    assert SharpnessAware(settings("sam")).rho == 0.05
    assert SharpnessAware(StrategySettings(3, {"sam.rho": "0.2"}, "sam")).rho == 0.2


# ---- wide ---------------------------------------------------------------------------------------
def test_wide_mlp_a2_has_hand_counted_parameters() -> None:
    plain = build_model("mlp-a2", input_shape=(784,), num_classes=10)
    assert count_parameters(plain) == 784 * 200 + 200 + 200 * 100 + 100 + 100 * 10 + 10
    # Hidden widths 600 and 300 (e = 3), 400 and 200 (e = 2); input and classes unchanged.
    assert count_parameters(widen(plain, 3)) == 784 * 600 + 600 + 600 * 300 + 300 + 300 * 10 + 10
    assert Wide(settings("wide", expansion=3)).expected_inference_params(plain) == 654310
    assert count_parameters(widen(plain, 2)) == 396210
    widths = [m.out_features for m in widen(plain, 3) if isinstance(m, nn.Linear)]
    assert widths == [600, 300, 10]
    assert count_parameters(plain) == 178110  # untouched


def test_wide_trains_the_wide_model_and_ships_it(make_session) -> None:
    session = make_session(seed=0, epochs=3, lr=0.01)
    result = Wide(settings("wide", expansion=3)).fit(session)
    # tiny_model: 12 -> 16 -> 8 -> 4, widened to 12 -> 48 -> 24 -> 4.
    assert result.inference_params == result.train_params == 12 * 48 + 48 + 48 * 24 + 24 + 24 * 4 + 4
    assert result.curve[-1].train_loss < result.curve[0].train_loss
    assert result.test_accuracy > 0.5  # chance is 1/4


def test_wide_refuses_a_model_too_large_to_build() -> None:
    plain = build_model("mlp-a3", input_shape=(784,), num_classes=10)
    # 784 x 409600, 409600 x 204800 (8.4e10 alone), 204800 x 102400, 102400 x 10, and biases.
    with pytest.raises(UserError, match=r"e=1024 would have 1\.05e\+11 parameters"):
        Wide(settings("wide", expansion=1024)).prepare(plain, _run())


@pytest.mark.parametrize(
    ("model", "why"),
    [
        (nn.Linear(4, 2), "not an nn.Sequential"),
        (build_model("cnn2d", input_shape=(3, 8, 8), num_classes=4), "Conv"),
        (nn.Sequential(nn.Linear(4, 3)), "no hidden layer"),
        (nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)), "BatchNorm1d"),
        (nn.Sequential(nn.Linear(4, 8), nn.Linear(6, 2)), "do not feed"),
    ],
)
def test_wide_names_the_models_it_cannot_widen(model: nn.Module, why: str) -> None:
    with pytest.raises(UserError, match=why) as raised:
        Wide(settings("wide")).prepare(model, _run())
    assert "mlp-a1, mlp-a2, mlp-a3" in str(raised.value)


# ---- weight-noise -------------------------------------------------------------------------------
@pytest.mark.parametrize(("expansion", "init"), [(3, "variance-preserving"), (2, "independent"),
                                                 (4, "variance-preserving")])
def test_weight_noise_variance_matches_mk_dirichlet_mixing(expansion: int, init: str) -> None:
    torch.manual_seed(expansion)
    layer = nn.Linear(128, 64)
    plain = nn.Sequential(layer)
    weight = layer.weight.detach().clone()
    copies = getattr(expand(copy.deepcopy(plain), expansion, init=init, seed=5), COPIES_NAME)
    weight_copies = copies.detach()[:, : weight.numel()].double()
    center = weight.mean()
    scale = math.sqrt(expansion) if init == "variance-preserving" else 1.0
    torch.testing.assert_close(weight_copies[0].float(), center + scale * (weight.flatten() - center))

    # MK's mixed weight, sampled: p ~ Dirichlet(1..1) drawn per element and per draw, as MK does.
    # Dirichlet(1..1) as normalised Exp(1) draws: another sampler than MK's own spacings.
    exponentials = torch.empty(300, weight.numel(), expansion, dtype=torch.float64).exponential_(
        generator=torch.Generator().manual_seed(11)
    )
    p = exponentials / exponentials.sum(dim=-1, keepdim=True)  # (draws, elements, e)
    mixed = (p * weight_copies.T).sum(dim=-1)
    per_element = mixed.var(dim=0)
    # The derivation: per element, Var = sum_k (w_k - mean)^2 / (e (e + 1)).
    spread = (weight_copies - weight_copies.mean(dim=0)).pow(2).sum(dim=0)
    formula = spread / (expansion * (expansion + 1))
    assert (per_element.mean() / formula.mean()).item() == pytest.approx(1.0, abs=0.01)
    assert torch.corrcoef(torch.stack([per_element, formula]))[0, 1] > 0.9

    noise_std = WeightNoise(settings("weight-noise", expansion=expansion, init=init)).noise_std(plain)
    assert len(noise_std) == 2  # weight and bias
    assert noise_std[0] ** 2 == pytest.approx(per_element.mean().item(), rel=0.06)


def test_weight_noise_perturbs_the_forward_and_restores_the_weights() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 4), nn.LayerNorm(4))
    strategy = WeightNoise(settings("weight-noise", expansion=3))
    run = _run(seed=4)
    strategy.prepare(model, run)
    saved = [p.detach().clone() for p in model.parameters()]
    stds = run.state.noise_std
    assert stds[-2:] == [0.0, 0.0]  # LayerNorm's ones and zeros do not spread: no noise
    strategy.before_step(model, run)
    noise = [p.detach() - s for p, s in zip(model.parameters(), saved, strict=True)]
    assert noise[0].std().item() == pytest.approx(stds[0], rel=0.02)
    assert abs(noise[0].mean().item()) < 0.01 * stds[0]
    assert torch.equal(noise[-1], torch.zeros(4))
    # The gradient is the noisy point's, the weights come back exactly.
    noisy = copy.deepcopy(model)
    x, y = torch.randn(6, 256), torch.randint(0, 4, (6,))
    strategy.loss(model, x, y, run).backward()
    F.cross_entropy(noisy(x), y).backward()
    strategy.after_backward(model, run)
    for p, s, q in zip(model.parameters(), saved, noisy.parameters(), strict=True):
        assert torch.equal(p, s)
        assert p.grad is not None and q.grad is not None and torch.equal(p.grad, q.grad)
    assert set(vars(run.state)) == {"noise_std"}


def test_weight_noise_refuses_an_init_without_spread() -> None:
    with pytest.raises(UserError, match="weight-noise.init"):
        WeightNoise(settings("weight-noise", init="replicate"))
    checkpoint = nn.Linear(4, 2)
    checkpoint.sopkit_pretrained = True  # type: ignore[assignment]  # as sopkit.models.hf marks a pretrained model
    with pytest.raises(UserError, match="replicas"):
        WeightNoise(settings("weight-noise")).prepare(checkpoint, _run())
    chosen = WeightNoise(settings("weight-noise", init="independent"))
    assert len(chosen.prepare(checkpoint, run := _run()).state_dict()) == 2
    assert run.state.noise_std[0] > 0


# ---- ema ----------------------------------------------------------------------------------------
def test_ema_follows_hand_values_and_is_what_is_evaluated_and_shipped() -> None:
    linear, norm = nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1)
    model = nn.Sequential(linear, norm)
    with torch.no_grad():
        linear.weight.fill_(1.0)
    strategy = WeightAverage(settings("ema", decay="0.5"))
    run = _run()
    strategy.prepare(model, run)
    x = torch.randn(8, 1)
    values = []
    for new in (3.0, 5.0, 9.0):
        with torch.no_grad():
            linear.weight.fill_(new)
        model(x)  # moves the running statistics
        strategy.after_step(model, run)
        values.append(run.state.ema[0].weight.item())
    # Decays min(0.5, (1 + t) / (10 + t)): 0.1, 2/11, 0.25 for t = 0, 1, 2.
    first = 0.1 * 1.0 + 0.9 * 3.0
    second = 2 / 11 * first + 9 / 11 * 5.0
    third = 0.25 * second + 0.75 * 9.0
    assert values == pytest.approx([first, second, third], abs=1e-6)
    assert norm.running_mean is not None
    assert torch.equal(run.state.ema[1].running_mean, norm.running_mean)
    assert strategy.evaluation_model(model, run) is run.state.ema
    shipped = strategy.deployable(model, run)
    assert shipped is run.state.ema and all(p.requires_grad for p in shipped.parameters())


def test_ema_decay_reaches_the_option_after_warm_up() -> None:
    model = nn.Linear(1, 1, bias=False)
    strategy = WeightAverage(settings("ema", decay="0.9"))
    run = _run()
    strategy.prepare(model, run)
    run.state.ema_updates = 1000  # long after the warm-up
    before = run.state.ema.weight.item()
    with torch.no_grad():
        model.weight.add_(1.0)
    strategy.after_step(model, run)
    assert run.state.ema.weight.item() == pytest.approx(0.9 * before + 0.1 * model.weight.item())


@pytest.mark.parametrize("decay", ["0", "1", "1.5", "-0.1", "nan", "x"])
def test_ema_refuses_a_decay_outside_zero_and_one(decay: str) -> None:
    with pytest.raises(UserError, match="ema.decay"):
        WeightAverage(settings("ema", decay=decay))


def test_ema_default_decay() -> None:
    assert WeightAverage(settings("ema")).decay == 0.999
