"""Adversarial majority kernels (paper Appendix B): the mixing stays a probability vector whatever
the step, ``u`` is a weight in [0, 1], the gradient with respect to ``p`` is the true one, and with
``eps = 0`` a step is exactly an MK step with the same random draw."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sopkit.data import DataSplits, TensorSplit
from sopkit.errors import UserError
from sopkit.mk import compiled, expand, find_majority, fixed_mixing, fixed_weights, sample_dirichlet
from sopkit.models import mlp
from sopkit.strategies.adversarial import (
    AdversarialMajorityKernels,
    AdversarialOnlyMajorityKernels,
    adversarial_mixing,
    adversarial_weights,
    mixing_gradient,
    normalized_kl_to_uniform,
    project_to_simplex,
    virtual_gradient,
)
from sopkit.strategies.majority import MajorityKernelsStrategy
from sopkit.training.loop import TrainingSession
from sopkit.training.settings import StrategySettings
from sopkit.training.types import RunContext, TrainConfig


def _settings(name: str = "adv-mk", **options: str) -> StrategySettings:
    return StrategySettings(expansion=3, options=options, strategy_name=name)


def _expanded_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return expand(mlp((12,), 4, hidden=(16,)), 3, seed=seed)


def _batch(seed: int = 0, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=generator)
    return x, torch.randint(0, 4, (n,), generator=generator)


def _tiny_data(n: int = 96) -> DataSplits:
    """A small learnable problem: the label is the argmax of a fixed linear map of the input."""
    generator = torch.Generator().manual_seed(123)
    x = torch.randn(n + 64, 12, generator=generator)
    y = (x @ torch.randn(12, 4, generator=generator)).argmax(dim=1)
    train = TensorSplit(x[:n], y[:n])
    held_out = TensorSplit(x[n:], y[n:])
    return DataSplits("tiny", (12,), 4, train, held_out, held_out)


def _run() -> RunContext:
    """A fresh run, as the loop makes one, for hooks called outside the loop."""
    return RunContext(0, TrainConfig(), torch.device("cpu"), _tiny_data(),
                      torch.Generator().manual_seed(0), steps_per_epoch=1)


def _assert_on_simplex(p: torch.Tensor) -> None:
    assert torch.isfinite(p).all()
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(dim=0), torch.ones(p.shape[1]), atol=1e-5, rtol=0)


# ---- the simplex projection and u ---------------------------------------------------------------


def test_projection_matches_a_worked_example_and_keeps_simplex_points() -> None:
    v = torch.tensor([[0.5, 2.0, 1 / 3], [0.5, 0.0, 1 / 3], [0.2, 0.0, 1 / 3]])
    # Column 0: rho = 3, theta = (1.2 - 1) / 3 = 1/15; column 1 is past a vertex; column 2 is uniform.
    expected = torch.tensor([[13 / 30, 1.0, 1 / 3], [13 / 30, 0.0, 1 / 3], [4 / 30, 0.0, 1 / 3]])
    torch.testing.assert_close(project_to_simplex(v), expected)


@pytest.mark.parametrize("e", [2, 3, 4, 6])
def test_projection_is_the_closest_point_of_the_simplex(e: int) -> None:
    generator = torch.Generator().manual_seed(e)
    v = 2 * torch.randn(e, 200, generator=generator)
    projected = project_to_simplex(v)
    _assert_on_simplex(projected)
    # No other point of the simplex is closer (checked against many random ones and the vertices).
    candidates = [sample_dirichlet(e, 200, generator=generator) for _ in range(200)]
    candidates += [F.one_hot(torch.full((200,), k), e).T.float() for k in range(e)]
    best = (v - projected).norm(dim=0)
    for q in candidates:
        assert ((v - q).norm(dim=0) >= best - 1e-5).all()


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e6, 1e30])
def test_projection_stays_on_the_simplex_at_any_scale(scale: float) -> None:
    v = scale * torch.randn(3, 500, generator=torch.Generator().manual_seed(1))
    _assert_on_simplex(project_to_simplex(v))


def test_u_is_zero_at_uniform_one_at_a_vertex_and_in_between_otherwise() -> None:
    uniform = torch.full((3, 5), 1 / 3)
    vertex = F.one_hot(torch.tensor([0, 1, 2, 0, 1]), 3).T.float()
    random = sample_dirichlet(3, 1000, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(normalized_kl_to_uniform(uniform), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(normalized_kl_to_uniform(vertex), torch.ones(5))
    u = normalized_kl_to_uniform(random)
    assert (u >= 0).all() and (u <= 1).all()
    assert 0.05 < u.mean() < 0.95  # a Dirichlet draw is neither uniform nor a vertex
    # KL(p || uniform) / log e, computed the long way.
    p = random[:, :3]
    expected = (p * (p * 3).log()).sum(dim=0) / math.log(3)
    torch.testing.assert_close(normalized_kl_to_uniform(p), expected)


# ---- the adversarial mixing ----------------------------------------------------------------------


@pytest.mark.parametrize("grad_scale", ["l2", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.3, 1e4, 1e30])
@pytest.mark.parametrize("with_random", [False, True])
def test_mixing_is_on_the_simplex_and_u_in_unit_interval_for_any_eps(
    grad_scale: str, eps: float, with_random: bool
) -> None:
    generator = torch.Generator().manual_seed(3)
    grad_p = 1e-4 * torch.randn(3, 400, generator=generator)
    random_p = sample_dirichlet(3, 400, generator=generator) if with_random else None
    p, u = adversarial_mixing(grad_p, eps, grad_scale=grad_scale, random_p=random_p)
    _assert_on_simplex(p)
    assert u.shape == (400,)
    assert (u >= 0).all() and (u <= 1).all()


def test_a_huge_step_goes_to_the_vertex_the_gradient_points_to() -> None:
    grad_p = torch.randn(3, 300, generator=torch.Generator().manual_seed(4))
    p, u = adversarial_mixing(grad_p, 1e30)
    torch.testing.assert_close(p, F.one_hot(grad_p.argmax(dim=0), 3).T.float())
    torch.testing.assert_close(u, torch.ones(300))


def test_a_small_literal_step_is_the_centred_gradient_step() -> None:
    grad_p = torch.randn(3, 50, generator=torch.Generator().manual_seed(5))
    p, _ = adversarial_mixing(grad_p, 0.01, grad_scale="none")
    torch.testing.assert_close(p, 1 / 3 + 0.01 * (grad_p - grad_p.mean(dim=0)))


def test_an_l2_step_has_length_eps_in_p_space() -> None:
    grad_p = torch.randn(3, 500, generator=torch.Generator().manual_seed(8))
    p, _ = adversarial_mixing(grad_p, 0.5, grad_scale="l2")
    assert (p > 0).all()  # still inside the simplex, where the projection only centres the step
    torch.testing.assert_close((p - 1 / 3).norm(), torch.tensor(0.5))
    # The step does not depend on the gradient's scale.
    torch.testing.assert_close(adversarial_mixing(1e-6 * grad_p, 0.5)[0], p)


def test_u_weighs_the_adversarial_against_the_random_mixing() -> None:
    generator = torch.Generator().manual_seed(6)
    grad_p = torch.randn(3, 200, generator=generator)
    random_p = sample_dirichlet(3, 200, generator=generator)
    adversarial, u = adversarial_mixing(grad_p, 0.3)
    mixed, _ = adversarial_mixing(grad_p, 0.3, random_p=random_p)
    torch.testing.assert_close(mixed, u * adversarial + (1 - u) * random_p)


# ---- the gradient with respect to p ---------------------------------------------------------------


def test_mixing_gradient_matches_autograd_through_an_explicit_p() -> None:
    model = _expanded_model()
    holder = find_majority(model)
    assert holder is not None
    x, y = _batch()
    p = torch.full_like(holder.copies, 1 / 3).requires_grad_(True)
    with fixed_mixing(model, p):
        loss = F.cross_entropy(model(x), y)
    (expected,) = torch.autograd.grad(loss, p)
    grad_p, uniform_loss = mixing_gradient(model, holder, x, y)
    torch.testing.assert_close(grad_p, expected, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(uniform_loss, loss.detach())
    assert grad_p.abs().max() > 0


def test_the_uniform_pass_leaves_no_gradient_behind() -> None:
    model = _expanded_model()
    strategy = AdversarialMajorityKernels(_settings())
    x, y = _batch()
    loss = strategy.loss(model, x, y, _run())
    assert all(parameter.grad is None for parameter in model.parameters())
    assert find_majority(model).fixed_mixing is None  # type: ignore[union-attr]
    # The loop's backward then sees only the loss at the chosen mixing.
    loss.backward()
    assert find_majority(model).copies.grad is not None  # type: ignore[union-attr]


def test_the_adversarial_mixing_raises_the_loss() -> None:
    model = _expanded_model()
    holder = find_majority(model)
    assert holder is not None
    x, y = _batch()
    strategy = AdversarialOnlyMajorityKernels(_settings("adv-mk-only"))
    p, _ = strategy.mixing(model, holder, x, y)
    with torch.no_grad(), fixed_mixing(model, "uniform"):
        uniform_loss = F.cross_entropy(model(x), y)
    with torch.no_grad(), fixed_mixing(model, p):
        adversarial_loss = F.cross_entropy(model(x), y)
    assert adversarial_loss > uniform_loss + 1e-3


# ---- eps = 0 is MK ---------------------------------------------------------------------------------


def test_with_eps_zero_a_step_is_an_mk_step_with_the_same_random_draw() -> None:
    mk_model = _expanded_model()
    adv_model = copy.deepcopy(mk_model)
    x, y = _batch()
    torch.manual_seed(7)
    mk_loss = MajorityKernelsStrategy(_settings("mk")).loss(mk_model, x, y, _run())
    mk_loss.backward()
    torch.manual_seed(7)
    adv = AdversarialMajorityKernels(_settings(eps="0"))
    adv_loss = adv.loss(adv_model, x, y, _run())
    adv_loss.backward()
    torch.testing.assert_close(adv_loss, mk_loss, rtol=1e-6, atol=1e-7)
    for (name, mk_param), adv_param in zip(mk_model.named_parameters(), adv_model.parameters(),
                                           strict=True):
        assert adv_param.grad is not None, name
        torch.testing.assert_close(adv_param.grad, mk_param.grad, rtol=1e-5, atol=1e-8)


def test_with_eps_zero_training_follows_mk() -> None:
    session = TrainingSession(
        _tiny_data(), lambda: mlp((12,), 4, hidden=(16,)), TrainConfig(epochs=2, batch_size=16),
        device=torch.device("cpu"), seed=3,
    )
    mk = session.train(MajorityKernelsStrategy(_settings("mk")))
    adv = session.train(AdversarialMajorityKernels(_settings(eps="0")))
    assert adv.model is not None and mk.model is not None
    for (name, a), b in zip(adv.model.state_dict().items(), mk.model.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_adversarial_only_with_eps_zero_trains_at_the_uniform_mixing() -> None:
    model = _expanded_model()
    holder = find_majority(model)
    assert holder is not None
    x, y = _batch()
    state = torch.get_rng_state()
    step = holder.stream.step
    p, u = AdversarialOnlyMajorityKernels(_settings("adv-mk-only", eps="0")).mixing(
        model, holder, x, y
    )
    assert holder.stream.step == step  # B.1 draws no random mixing from the model's stream
    assert torch.equal(torch.get_rng_state(), state)  # nor from torch's global generator
    torch.testing.assert_close(p, torch.full_like(p, 1 / 3))
    torch.testing.assert_close(u, torch.zeros_like(u), atol=1e-6, rtol=0)


# ---- the fused path (the "compiled" sampler) equals the reference path ---------------------------

needs_compiled = pytest.mark.skipif(
    not compiled.available(3), reason="the 'compiled' sampler needs torch.compile with a C++ compiler"
)


@needs_compiled
@pytest.mark.parametrize("diluted", [True, False])
@pytest.mark.parametrize("grad_scale,eps", [("l2", 1.0), ("l2", 40.0), ("none", 3e4)])
def test_the_fused_path_computes_the_reference_mixing_and_gradient(diluted, grad_scale, eps):
    """Same draw, same p: the weights, mean u and copies' gradient of the compiled kernels equal
    adversarial_mixing's on whole tensors followed by the plain mixing (up to float rounding).
    eps = 40 puts many columns on faces and vertices of the simplex."""
    model = _expanded_model()
    holder = find_majority(model)
    assert holder is not None
    holder.sampler = "compiled"
    x, y = _batch()
    grad_w, _ = virtual_gradient(model, holder, x, y)
    draw = holder.draw() if diluted else None
    copies = holder.copies

    fused_w, fused_u = adversarial_weights(holder, grad_w, eps, grad_scale=grad_scale, draw=draw)
    grad_out = torch.randn_like(fused_w)
    (fused_grad,) = torch.autograd.grad(fused_w, copies, grad_out)

    random_p = draw.p() if draw is not None else None
    p, u = adversarial_mixing(
        copies.detach() * grad_w, eps, grad_scale=grad_scale, random_p=random_p
    )
    assert 0 < u.mean() < 1 and (u > 0.5).any() == (eps > 10)
    torch.testing.assert_close(fused_w, (p * copies.detach()).sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_u, u.mean(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fused_grad, p * grad_out, rtol=1e-5, atol=1e-6)


@needs_compiled
def test_the_fused_path_supports_double_backward() -> None:
    """create_graph=True (a gradient penalty) through the fused mixing matches the reference."""
    results = []
    for sampler in ("compiled", "sfc64"):
        model = _expanded_model()
        holder = find_majority(model)
        assert holder is not None
        holder.sampler = sampler
        x, y = _batch()
        torch.manual_seed(11)
        grad_w, _ = virtual_gradient(model, holder, x, y)
        draw = holder.draw()
        if sampler == "sfc64":  # the reference path, with the compiled sampler's random draw
            draw = dataclasses.replace(draw, sampler="compiled")
            p, _ = adversarial_mixing(holder.copies.detach() * grad_w, 2.0, random_p=draw.p())
            weights = holder.mix(p)
        else:
            weights, _ = adversarial_weights(holder, grad_w, 2.0, draw=draw)
        with fixed_weights(model, weights):
            loss = F.cross_entropy(model(x), y)
        (grad,) = torch.autograd.grad(loss, holder.copies, create_graph=True)
        (second,) = torch.autograd.grad(grad.square().sum(), holder.copies)
        results.append((grad.detach(), second))
    for fused, reference in zip(*results, strict=True):
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-7)


@needs_compiled
def test_with_eps_zero_a_fused_step_is_an_mk_step_with_the_same_random_draw() -> None:
    mk_model = _expanded_model()
    adv_model = copy.deepcopy(mk_model)
    for model in (mk_model, adv_model):
        find_majority(model).sampler = "compiled"  # type: ignore[union-attr]
    x, y = _batch()
    torch.manual_seed(7)
    mk_loss = MajorityKernelsStrategy(_settings("mk")).loss(mk_model, x, y, _run())
    mk_loss.backward()
    torch.manual_seed(7)
    adv_loss = AdversarialMajorityKernels(_settings(eps="0")).loss(adv_model, x, y, _run())
    adv_loss.backward()
    torch.testing.assert_close(adv_loss, mk_loss, rtol=1e-6, atol=1e-7)
    copies = find_majority(mk_model).copies  # type: ignore[union-attr]
    torch.testing.assert_close(
        find_majority(adv_model).copies.grad, copies.grad, rtol=1e-5, atol=1e-8  # type: ignore[union-attr]
    )


# ---- options and reporting -------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{"eps": "-1"}, {"eps": "nan"}, {"eps": "x"},
                                     {"grad_scale": "max"}])
def test_bad_options_are_user_errors(options: dict[str, str]) -> None:
    with pytest.raises(UserError, match="adv-mk"):
        AdversarialMajorityKernels(_settings(**options))


def test_options_are_scoped_to_each_strategy() -> None:
    settings = StrategySettings(3, {"adv-mk.eps": "0.7", "eps": "0.2"})
    assert AdversarialMajorityKernels(settings.for_strategy("adv-mk")).eps == 0.7
    assert AdversarialOnlyMajorityKernels(settings.for_strategy("adv-mk-only")).eps == 0.2


def test_a_run_reports_its_mean_u_and_sampler() -> None:
    session = TrainingSession(
        _tiny_data(), lambda: mlp((12,), 4, hidden=(16,)), TrainConfig(epochs=1, batch_size=32),
        device=torch.device("cpu"),
    )

    def extra(cls: type[AdversarialMajorityKernels], name: str, eps: str) -> dict[str, object]:
        return cls(_settings(name, sampler="torch", eps=eps)).fit(session).extra

    # Through the report hook, in this order, and nothing else.
    assert list(extra(AdversarialMajorityKernels, "adv-mk", "1")) == ["mean_u", "mk_sampler"]
    # eps = 0 never leaves the uniform mixing: u is 0 at every step. A huge step lands on a vertex
    # (u = 1) wherever the gradient is not zero. eps = 1 (the default) tilts p only a little.
    assert extra(AdversarialMajorityKernels, "adv-mk", "0")["mean_u"] == 0.0
    assert extra(AdversarialOnlyMajorityKernels, "adv-mk-only", "1e9")["mean_u"] > 0.95
    assert 0 < extra(AdversarialMajorityKernels, "adv-mk", "1")["mean_u"] < 0.1  # type: ignore[operator]
    only = extra(AdversarialOnlyMajorityKernels, "adv-mk-only", "1")
    assert only["mk_sampler"] == "torch"  # B.1 draws no random mixing, and still records


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_mixing_on_cuda_matches_the_cpu() -> None:
    generator = torch.Generator().manual_seed(9)
    grad_p = torch.randn(3, 1000, generator=generator)
    random_p = sample_dirichlet(3, 1000, generator=generator)
    on_cpu = adversarial_mixing(grad_p, 5.0, random_p=random_p)
    on_cuda = adversarial_mixing(grad_p.cuda(), 5.0, random_p=random_p.cuda())
    for a, b in zip(on_cpu, on_cuda, strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-6)


def test_mk_records_its_sampler_and_rejects_one_the_device_cannot_run() -> None:
    session = TrainingSession(
        _tiny_data(), lambda: mlp((12,), 4, hidden=(16,)), TrainConfig(epochs=1, batch_size=32),
        device=torch.device("cpu"),
    )
    assert MajorityKernelsStrategy(_settings("mk")).fit(session).extra["mk_sampler"] == "sfc64"
    with pytest.raises(UserError, match="mk.sampler=triton"):
        MajorityKernelsStrategy(_settings("mk", sampler="triton")).fit(session)
    with pytest.raises(UserError, match="mk.sampler"):
        MajorityKernelsStrategy(_settings("mk", sampler="dice"))
