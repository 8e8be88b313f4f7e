"""Majority kernels: expand/collapse round trips, the sampler's distribution, Lemma 4.3, tied weights."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from sopkit.errors import UserError
from sopkit.mk import (
    COPIES_NAME,
    collapse,
    count_parameters,
    expand,
    find_majority,
    fixed_mixing,
    is_expanded,
    sample_dirichlet,
)
from sopkit.models import build_model

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def randomise_normalisation(model: nn.Module, generator: torch.Generator) -> None:
    """Give every norm layer non-trivial statistics and affine parameters, so that a collapse that
    dropped or mixed them up would change the outputs."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BATCH_NORMS):
                module.running_mean.copy_(
                    torch.randn(module.running_mean.shape, generator=generator)
                )
                module.running_var.copy_(
                    torch.rand(module.running_var.shape, generator=generator) + 0.5
                )
            if (
                isinstance(module, (*BATCH_NORMS, nn.LayerNorm))
                and module.weight is not None
            ):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.2)


class TiedLanguageModel(nn.Module):
    """An embedding whose weight is reused by the output layer (weight tying)."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.embed(tokens))))


def _resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


def _transformer_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(
        d_model=32, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.0
    )
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


def _conv3d_and_transposes() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1),
        nn.BatchNorm3d(4),
        nn.ReLU(),
        nn.ConvTranspose3d(4, 2, 3, padding=1),
    )


def _conv1d_and_transposes() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, 8, 5),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.ConvTranspose1d(8, 3, 5),
        nn.Unflatten(1, (3, 1)),
        nn.ConvTranspose2d(3, 2, (2, 1)),
    )


def _attention_only() -> nn.Module:
    return nn.MultiheadAttention(24, 3, batch_first=True, kdim=16, vdim=20)


# (name, builder, example input, how to call). Every entry is checked by the same round-trip test.
ARCHITECTURES: list[tuple[str, Callable[[], nn.Module], Callable[[], object]]] = [
    (
        "mlp-a3",
        lambda: build_model("mlp-a3", input_shape=(40,), num_classes=10),
        lambda: torch.randn(8, 40),
    ),
    (
        "cnn1d",
        lambda: build_model("cnn1d", input_shape=(40,), num_classes=10),
        lambda: torch.randn(8, 40),
    ),
    (
        "cnn2d",
        lambda: build_model("cnn2d", input_shape=(3, 32, 32), num_classes=10),
        lambda: torch.randn(4, 3, 32, 32),
    ),
    (
        "transformer",
        lambda: build_model("transformer", input_shape=(40,), num_classes=10),
        lambda: torch.randn(4, 40),
    ),
    ("torchvision-resnet18", _resnet18, lambda: torch.randn(2, 3, 64, 64)),
    ("nn.TransformerEncoder", _transformer_encoder, lambda: torch.randn(3, 7, 32)),
    ("conv1d+transposes", _conv1d_and_transposes, lambda: torch.randn(4, 3, 20)),
    ("conv3d+transpose", _conv3d_and_transposes, lambda: torch.randn(2, 2, 5, 5, 5)),
    ("tied-embedding", TiedLanguageModel, lambda: torch.randint(0, 50, (4, 9))),
]


def _forward(model: nn.Module, example: object) -> torch.Tensor:
    if isinstance(model, nn.MultiheadAttention):
        query, key, value = example  # type: ignore[misc]
        return model(query, key, value)[0]
    return model(example)


@pytest.mark.parametrize(
    "name,builder,make_input", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES]
)
def test_collapse_matches_expanded_eval_and_loads_into_a_fresh_original(name, builder, make_input):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    original = builder()
    randomise_normalisation(original, generator)
    example = make_input()
    expanded = expand(original, 3, seed=1)
    assert is_expanded(expanded) and not is_expanded(original)

    # Train a few steps so the copies differ and the collapse is not the original in disguise.
    optimizer = torch.optim.SGD(expanded.parameters(), lr=0.05)
    expanded.train()
    for _ in range(2):
        optimizer.zero_grad()
        _forward(expanded, example).float().pow(2).mean().backward()
        optimizer.step()
    randomise_normalisation(expanded, generator)

    expanded.eval()
    collapsed = collapse(expanded)
    collapsed.eval()
    with torch.no_grad():
        want = _forward(expanded, example)
        got = _forward(collapsed, example)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, _forward(original.eval(), example), atol=1e-4)

    assert type(collapsed) is type(original)
    assert [type(m) for m in collapsed.modules()] == [type(m) for m in original.modules()]
    assert count_parameters(collapsed) == count_parameters(original)
    assert not is_expanded(collapsed)
    assert list(collapsed.state_dict()) == list(original.state_dict())
    fresh = builder()
    fresh.load_state_dict(collapsed.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(_forward(fresh, example), want, atol=1e-5, rtol=0)


def test_attention_projections_are_expanded_with_separate_key_value_dims():
    torch.manual_seed(0)
    attention = _attention_only()
    expanded = expand(attention, 2)
    holder = find_majority(expanded)
    assert holder is not None
    names = {k.name for k in holder.kernels}
    assert {"q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"} <= names
    example = (torch.randn(2, 5, 24), torch.randn(2, 6, 16), torch.randn(2, 6, 20))
    expanded.eval()
    collapsed = collapse(expanded).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            _forward(collapsed, example), _forward(expanded, example), atol=1e-5, rtol=0
        )


def test_biases_and_normalisation_stay_single_by_default():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    expanded = expand(model, 3)
    holder = find_majority(expanded)
    assert [k.name for k in holder.kernels] == ["0.weight", "2.weight"]
    params = dict(expanded.named_parameters())
    assert {"0.bias", "1.weight", "1.bias", "2.bias", COPIES_NAME} == set(params)
    assert params[COPIES_NAME].shape == (3, 4 * 8 + 8 * 2)


def test_include_and_exclude_patterns_select_parameters_by_name():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    expanded = expand(model, 2, include=["1.weight", "*.bias"], exclude=["2.*"])
    names = [k.name for k in find_majority(expanded).kernels]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    collapsed = collapse(expanded)
    assert set(collapsed.state_dict()) == set(model.state_dict())


def test_train_mode_draws_fresh_mixing_each_forward_and_eval_uses_the_mean():
    torch.manual_seed(0)
    expanded = expand(nn.Linear(6, 3), 3)
    x = torch.randn(5, 6)
    expanded.train()
    first, second = expanded(x), expanded(x)
    assert not torch.allclose(first, second)
    expanded.eval()
    holder = find_majority(expanded)
    with torch.no_grad():
        mean = holder.copies.mean(0).view(3, 6)
        torch.testing.assert_close(expanded(x), x @ mean.T + expanded.bias)


def test_each_weight_element_gets_its_own_mixing_vector():
    torch.manual_seed(0)
    layer = expand(nn.Linear(50, 40), 3, init="replicate")
    holder = find_majority(layer)
    with torch.no_grad():
        # Give copy k the constant value k so the mixed weight IS the mixing: sum_k p_k * k.
        holder.copies.copy_(torch.arange(3.0).view(3, 1).expand_as(holder.copies))
    layer.train()
    layer(torch.randn(1, 50))
    weights = layer.weight.flatten()
    assert weights.unique().numel() > 0.99 * weights.numel()
    assert weights.min() > 0.0 and weights.max() < 2.0
    # E[sum_k p_k k] = (0 + 1 + 2) / 3 = 1 for a Dirichlet(1,1,1) p.
    assert abs(weights.mean().item() - 1.0) < 0.02


def test_tied_weights_see_one_mixing_per_forward():
    torch.manual_seed(0)
    model = expand(TiedLanguageModel(), 3)
    holder = find_majority(model)
    assert len(holder.kernels) == 2  # embed/out share one kernel; mix is the other
    tied = next(k for k in holder.kernels if len(k.bindings) == 2)
    assert {a for _, a in tied.bindings} == {"weight"}
    seen = []
    model.out.register_forward_pre_hook(lambda m, a: seen.append(m.weight.detach().clone()))
    model.embed.register_forward_pre_hook(lambda m, a: seen.append(m.weight.detach().clone()))
    model.train()
    model(torch.randint(0, 50, (2, 5)))
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], seen[1], rtol=0, atol=0)
    collapsed = collapse(model)
    assert collapsed.out.weight is collapsed.embed.weight
    assert count_parameters(collapsed) == count_parameters(TiedLanguageModel())


@pytest.mark.parametrize("expansion", [2, 3, 5])
def test_sampler_is_dirichlet_ones(expansion):
    generator = torch.Generator().manual_seed(0)
    n = 200_000
    p = sample_dirichlet(expansion, n, generator=generator)
    assert p.shape == (expansion, n)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(0), torch.ones(n), atol=1e-6, rtol=0)
    e = expansion
    mean, var = 1 / e, (e - 1) / (e * e * (e + 1))  # moments of Dirichlet(1, ..., 1)
    standard_error = math.sqrt(var / n)
    for k in range(e):
        assert abs(p[k].mean().item() - mean) < 5 * standard_error
        assert abs(p[k].var().item() - var) < 0.02 * var
    # Each marginal is Beta(1, e-1): P(p_k <= x) = 1 - (1 - x)^(e-1).
    for x in (0.1, 0.3, 0.6):
        cdf = 1 - (1 - x) ** (e - 1)
        assert abs((p[0] <= x).float().mean().item() - cdf) < 0.01
    # Components are exchangeable and negatively correlated: cov = -1 / (e^2 (e+1)).
    cov = ((p[0] - mean) * (p[1] - mean)).mean().item()
    assert abs(cov - (-1 / (e * e * (e + 1)))) < 0.05 * abs(1 / (e * e * (e + 1))) + 1e-4


def test_lemma_4_3_uniform_mixing_with_sgd_moves_the_virtual_weights_by_lr_over_e():
    torch.manual_seed(0)
    expansion, lr = 3, 0.1
    plain = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    x, y = torch.randn(16, 5), torch.randn(16, 2)
    expanded = expand(plain, expansion, init="independent")
    holder = find_majority(expanded)
    virtual_before = holder.copies.detach().mean(0).clone()

    # The gradient of the loss w.r.t. the virtual weights, computed on the ordinary model.
    reference = collapse(expanded)
    nn.functional.mse_loss(reference(x), y).backward()
    grad_w = torch.cat([reference[0].weight.grad.flatten(), reference[2].weight.grad.flatten()])

    optimizer = torch.optim.SGD([holder.copies], lr=lr)
    expanded.train()
    with fixed_mixing(expanded, "uniform"):
        nn.functional.mse_loss(expanded(x), y).backward()
    optimizer.step()
    virtual_after = holder.copies.detach().mean(0)
    torch.testing.assert_close(
        virtual_after, virtual_before - lr / expansion * grad_w, atol=1e-7, rtol=1e-6
    )


def test_gradient_of_each_copy_is_its_mixing_weight_times_the_weight_gradient():
    torch.manual_seed(0)
    layer = expand(nn.Linear(4, 3, bias=False), 3)
    holder = find_majority(layer)
    p = sample_dirichlet(3, holder.num_virtual, generator=torch.Generator().manual_seed(5))
    x = torch.randn(6, 4)
    with fixed_mixing(layer, p):
        layer.train()
        out = layer(x)
    weight_grad = torch.autograd.grad(out.pow(2).sum(), holder.copies)[0]
    mixed = holder.mix(p).detach().view(3, 4).requires_grad_()
    (x @ mixed.T).pow(2).sum().backward()
    torch.testing.assert_close(weight_grad, p * mixed.grad.flatten())


def test_initialisation_modes():
    torch.manual_seed(0)
    layer = nn.Linear(256, 256)
    w = layer.weight.detach().clone()
    var = w.var().item()

    replicated = find_majority(expand(layer, 3, init="replicate")).copies.detach()
    for k in range(3):
        torch.testing.assert_close(replicated[k], w.flatten(), rtol=0, atol=0)

    independent = find_majority(expand(layer, 3, init="independent", seed=0)).copies.detach()
    torch.testing.assert_close(independent[0], w.flatten(), rtol=0, atol=0)
    assert not torch.equal(independent[1], independent[2])
    for k in range(3):  # every copy is a draw from the same distribution as the original
        torch.testing.assert_close(independent[k].sort().values, w.flatten().sort().values)
    assert abs(independent.mean(0).var().item() / var - 1 / 3) < 0.03

    preserving = find_majority(expand(layer, 3, init="variance-preserving", seed=0)).copies.detach()
    assert abs(preserving.mean(0).var().item() / var - 1.0) < 0.05
    assert abs(preserving[1].var().item() / var - 3.0) < 0.15


def test_expansion_is_seeded():
    layer = nn.Linear(8, 8)
    a = find_majority(expand(layer, 3, seed=3)).copies
    b = find_majority(expand(layer, 3, seed=3)).copies
    c = find_majority(expand(layer, 3, seed=4)).copies
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_expanded_model_survives_deepcopy_state_dict_and_device_moves():
    torch.manual_seed(0)
    model = expand(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), 3)
    model.train()
    model(torch.randn(2, 3)).sum().backward()  # weights were graph-attached during this forward
    clone = copy.deepcopy(model)
    assert torch.equal(find_majority(clone).copies, find_majority(model).copies)
    other = expand(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), 3)
    other.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(5, 3)
    model.eval(), other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x))
        model.to(torch.float64)
        assert model(x.double()).dtype == torch.float64


def test_eval_weights_follow_optimizer_steps():
    torch.manual_seed(0)
    model = expand(nn.Linear(3, 2), 2)
    x = torch.randn(4, 3)
    model.eval()
    with torch.no_grad():
        before = model(x).clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(x).sum().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model(x)
    assert not torch.allclose(before, after)
    with torch.no_grad():
        torch.testing.assert_close(after, collapse(model)(x))


@pytest.mark.parametrize("expansion", [2, 3, 5])
def test_mean_weights_in_a_pooled_buffer_are_the_mean_weights_detached(expansion):
    torch.manual_seed(0)
    holder = find_majority(expand(nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 4)), expansion))
    mean = holder.mean_weights()
    torch.testing.assert_close(mean, holder.copies.mean(dim=0), rtol=1e-6, atol=0)
    if expansion == 3:  # the same additions in the same order as torch's mean
        assert torch.equal(mean, holder.copies.mean(dim=0))
    assert mean.requires_grad  # the plain mean stays differentiable (eval with grad enabled)
    mean.sum().backward()
    assert torch.equal(holder.copies.grad, torch.full_like(holder.copies, 1 / expansion))
    first = holder.mean_weights(pooled=True)
    assert torch.equal(first, mean) and not first.requires_grad
    address = first.data_ptr()
    del first
    again = holder.mean_weights(pooled=True)  # the buffer is reused once nothing holds it
    assert again.data_ptr() == address and torch.equal(again, mean)
    held = holder.mean_weights(pooled=True)  # ... and never while something does
    assert held.data_ptr() != again.data_ptr() and torch.equal(held, again)


@pytest.mark.parametrize("fused", [True, False])
def test_eval_weights_follow_every_optimizer_step(fused):
    """torch's fused optimizers write the copies without bumping their version counter: the
    cached eval weights must still follow, also when an eval pass comes between backward and step."""
    torch.manual_seed(0)
    model = expand(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=fused, foreach=not fused or None)
    x = torch.randn(5, 4)
    for eval_before_step in (False, True, False):
        model.train()
        optimizer.zero_grad()
        model(x).square().sum().backward()
        if eval_before_step:
            model.eval()
            with torch.no_grad():
                model(x)
        optimizer.step()
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), collapse(model)(x), rtol=0, atol=0)


def test_collapse_removes_only_its_own_hooks():
    model = expand(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), 2)
    calls: list[str] = []
    model.register_forward_pre_hook(lambda module, args: calls.append("user"))
    collapsed = collapse(model)
    collapsed(torch.randn(1, 3))  # no sopkit hook left: it would look for the copies
    assert calls == ["user"]
    model.train()
    model(torch.randn(1, 3)).sum().backward()  # the original keeps both and still trains
    assert calls == ["user", "user"] and find_majority(model).copies.grad is not None


def test_the_public_alias_sopkit_majority_is_sopkit_mk():
    import sopkit.majority
    import sopkit.mk

    assert sopkit.majority.EXPANDABLE is sopkit.mk.EXPANDABLE
    for name in sopkit.majority.__all__:
        assert getattr(sopkit.majority, name) is getattr(sopkit.mk, name), name
    assert sopkit.expand is sopkit.mk.expand and sopkit.collapse is sopkit.mk.collapse


def test_a_layer_registered_through_the_alias_is_expanded():
    import sopkit.majority

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel = nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.kernel

    sopkit.majority.EXPANDABLE[Scale] = ("kernel",)
    try:
        holder = find_majority(expand(Scale(), 2))
    finally:
        del sopkit.majority.EXPANDABLE[Scale]
    assert [k.name for k in holder.kernels] == ["kernel"]


def test_expand_leaves_the_original_untouched_unless_inplace():
    model = nn.Linear(3, 2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expand(model, 2)
    assert not is_expanded(model) and isinstance(model.weight, nn.Parameter)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert expand(model, 2, inplace=True) is model and is_expanded(model)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: expand(nn.Linear(2, 2), 1), "at least 2"),
        (lambda: expand(nn.Linear(2, 2), 3, init="orthogonal"), "Valid initialisations"),
        (lambda: expand(expand(nn.Linear(2, 2), 2), 2), "already expanded"),
        (lambda: collapse(nn.Linear(2, 2)), "not expanded"),
        (lambda: expand(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)), 2), "found no weight"),
    ],
)
def test_user_mistakes_raise_user_errors(call, message):
    with pytest.raises(UserError, match=message):
        call()
