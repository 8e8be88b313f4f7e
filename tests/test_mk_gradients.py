"""Every fast path of majority kernels computes the gradient of the straightforward path.

The fast paths draw ``p`` with another sampler (a compiled SplitMix64 kernel or SFC64 on the CPU,
seeded ``torch.rand``, a fused Triton kernel on CUDA), mix with fused multiply-adds in a custom autograd Function, and either keep
``p`` for backward or regenerate it from the step's seed. For the same random draw they must give
the gradients that plain autograd through ``w = sum_k p_k * copies_k`` gives, and a regenerated
``p`` must be exactly the forward's: a mismatch would corrupt gradients silently (as in pytorch
issue 190758, where a recomputed dropout mask differed from the forward's).

CPU tests always run; the ``gpu`` ones skip where there is no CUDA device. The Triton kernels are
also run on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``), so their logic is tested
here even without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from sopkit.mk import (
    MixingDraw,
    compiled,
    expand,
    find_majority,
    fixed_mixing,
    fixed_weights,
    sampling,
    sfc64,
)
from sopkit.mk import triton as mk_triton
from sopkit.mk.autograd import SampledMixing

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_COMPILED = compiled.available(3)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")


def small_model(expansion: int, device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(7, 33), nn.Tanh(), nn.Linear(33, 5)).to(device)
    return expand(plain, expansion, seed=1)


def loss_of(model: nn.Module, device: str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(16, 7, generator=generator).to(device)
    y = torch.randint(0, 5, (16,), generator=generator).to(device)
    return nn.functional.cross_entropy(model(x), y)


def explicit_mix(p: torch.Tensor, copies: torch.Tensor) -> torch.Tensor:
    """The straightforward path: Eq. 4.2 in plain autograd ops, in the fast path's arithmetic (a
    multiply, then fused multiply-adds as ``addcmul`` does them), so that forward values, and
    hence gradients, can be compared bit for bit."""
    w = p[0] * copies[0]
    for k in range(1, p.shape[0]):
        w = torch.addcmul(w, p[k], copies[k])
    return w


def explicit_sum(p: torch.Tensor, copies: torch.Tensor) -> torch.Tensor:
    """The straightforward path in the arithmetic of the "compiled" kernel: a product per copy,
    summed left to right (no fused multiply-add)."""
    w = p[0] * copies[0]
    for k in range(1, p.shape[0]):
        w = w + p[k] * copies[k]
    return w


def fast_and_reference_gradients(
    model: nn.Module, sampler: str, backward: str, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The copies' gradient from a training forward with ``sampler``/``backward``, and from the
    explicit formula with the same ``p`` (the same step of the model's stream), and that ``p``."""
    holder = find_majority(model)
    holder.sampler, holder.backward = sampler, backward
    model.train()

    state = holder.stream.state_dict()
    p = holder.draw().p()  # the draw the next training forward makes
    holder.stream.load_state_dict(state)
    (fast,) = torch.autograd.grad(loss_of(model, device), holder.copies)

    straightforward = explicit_sum if sampler == "compiled" else explicit_mix
    with fixed_weights(model, straightforward(p, holder.copies)):
        (reference,) = torch.autograd.grad(loss_of(model, device), holder.copies)
    return fast, reference, p


CPU_PATHS = [
    (sampler, backward, expansion)
    for sampler in ("compiled", "sfc64", "torch")
    for backward in ("save", "regenerate")
    for expansion in (2, 3, 5)
]
needs_compiled = pytest.mark.skipif(
    not HAS_COMPILED, reason="the 'compiled' sampler needs torch.compile with a C++ compiler"
)


def skip_unless_sampler_works(sampler: str) -> None:
    if sampler == "compiled" and not HAS_COMPILED:
        pytest.skip("the 'compiled' sampler needs torch.compile with a C++ compiler")


@pytest.mark.parametrize("sampler,backward,expansion", CPU_PATHS)
def test_fast_paths_give_the_straightforward_gradient_on_cpu(sampler, backward, expansion):
    skip_unless_sampler_works(sampler)
    model = small_model(expansion)
    fast, reference, p = fast_and_reference_gradients(model, sampler, backward)
    assert torch.equal(fast, reference)
    # And the textbook form of the same thing: (p * copies).sum(0), up to summation order.
    holder = find_majority(model)
    with fixed_weights(model, (p * holder.copies).sum(0)):
        (textbook,) = torch.autograd.grad(loss_of(model), holder.copies)
    torch.testing.assert_close(fast, textbook, rtol=1e-5, atol=1e-7)


def one_hot_copies(expansion: int, numel: int, k: int, device: str = "cpu") -> torch.Tensor:
    copies = torch.zeros(expansion, numel, device=device)
    copies[k] = 1.0
    return copies.requires_grad_()


def check_regenerated_p_is_the_forward_p(draw: MixingDraw, save_p: bool) -> None:
    """Forward with copy k = 1 and the others 0 gives w = p_k exactly; backward with grad w = 1
    gives the copies' gradient = p exactly. Both must match ``draw.p()``, every time."""
    p = draw.p()
    assert torch.equal(p, draw.p())
    assert torch.all(p >= 0)
    torch.testing.assert_close(p.sum(0), torch.ones_like(p[0]), rtol=0, atol=1e-6)
    for k in range(draw.expansion):
        copies = one_hot_copies(draw.expansion, draw.numel, k, device=str(draw.device))
        w = SampledMixing.apply(copies, draw, save_p)
        assert torch.equal(w, p[k]), f"forward p_{k} differs from draw.p()"
        (grad,) = torch.autograd.grad(w, copies, torch.ones_like(w))
        assert torch.equal(grad, p), "backward's p differs from the forward's"
    grad_w = torch.randn(draw.numel, generator=torch.Generator().manual_seed(0)).to(draw.device)
    assert torch.equal(draw.grad(grad_w), p * grad_w)


@pytest.mark.parametrize("sampler", ["compiled", "sfc64", "torch"])
@pytest.mark.parametrize("save_p", [True, False])
@pytest.mark.parametrize("expansion", [2, 3, 5])
def test_regenerated_p_is_the_forward_p_on_cpu(sampler, save_p, expansion):
    skip_unless_sampler_works(sampler)
    # 2.5 chunks, so the chunked regeneration is exercised across chunk boundaries.
    numel = 5 * sampling.CHUNK // 2 + 7
    draw = MixingDraw(987654321, expansion, numel, torch.device("cpu"), torch.float32, sampler)
    check_regenerated_p_is_the_forward_p(draw, save_p)


def test_sfc64_draw_does_not_depend_on_the_thread_count():
    threads = torch.get_num_threads()
    numel = 3 * sfc64.BLOCK + 12345
    try:
        torch.set_num_threads(1)
        one = sfc64.sfc64_dirichlet(3, numel, 42)
        torch.set_num_threads(3)
        three = sfc64.sfc64_dirichlet(3, numel, 42)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)
    grid = one * 2**24  # every p_k is a multiple of 2**-24, and they sum to exactly 1
    assert torch.equal(grid, grid.round()) and torch.equal(one.sum(0), torch.ones(numel))
    assert not torch.equal(one, sfc64.sfc64_dirichlet(3, numel, 43))


def saved_shapes(model: nn.Module, device: str = "cpu") -> list[torch.Size]:
    """The shapes of every tensor autograd keeps for backward during one training step."""
    shapes: list[torch.Size] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        shapes.append(tensor.shape)
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_of(model, device)
    loss.backward()
    return shapes


@pytest.mark.parametrize("backward,keeps_p", [("regenerate", False), ("save", True)])
def test_regenerating_keeps_nothing_shaped_like_the_copies(backward, keeps_p):
    model = small_model(3)
    holder = find_majority(model)
    holder.backward = backward
    assert (holder.copies.shape in saved_shapes(model)) == keeps_p


@needs_compiled
def test_compiled_default_keeps_nothing_shaped_like_the_copies():
    model = small_model(3)
    holder = find_majority(model)
    holder.sampler = "compiled"
    assert not holder.saves_p()
    assert holder.copies.shape not in saved_shapes(model)


def test_auto_uses_the_compiled_kernel_only_for_large_models(monkeypatch):
    monkeypatch.setattr(sampling, "COMPILED_MIN_WEIGHTS", 1000)
    monkeypatch.setattr(compiled, "available", lambda expansion: True)
    small, large = small_model(3), expand(nn.Linear(40, 30), 3)
    assert find_majority(small).resolved_sampler() == "sfc64"
    assert find_majority(large).resolved_sampler() == "compiled"


def test_without_a_working_compiler_auto_falls_back_and_compiled_is_refused(monkeypatch):
    monkeypatch.setattr(sampling, "COMPILED_MIN_WEIGHTS", 10)
    monkeypatch.setattr(compiled, "available", lambda expansion: False)
    holder = find_majority(small_model(3))
    assert holder.resolved_sampler() == "sfc64"
    holder.sampler = "compiled"
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        holder.resolved_sampler()


def test_sample_gives_the_p_a_training_forward_draws():
    """Adversarial MK relies on holder.sample() drawing the very p plain MK would."""
    model = small_model(3)
    holder = find_majority(model)
    model.train()
    state = holder.stream.state_dict()
    p = holder.sample()
    assert holder.stream.step == state["step"] + 1
    holder.stream.load_state_dict(state)
    weights = []
    model[0].register_forward_pre_hook(lambda m, a: weights.append(m.weight.detach().clone()))
    loss_of(model)
    expected = explicit_mix(p, holder.copies.detach())[: model[0].weight.numel()]
    assert torch.equal(weights[0].flatten(), expected)


def test_fixed_mixing_gradients_in_p_and_copies_match_plain_autograd():
    model = small_model(3)
    holder = find_majority(model)
    p = holder.sample().requires_grad_()
    with fixed_mixing(model, p):
        model.train()
        fast = torch.autograd.grad(loss_of(model), [holder.copies, p])
    with fixed_weights(model, explicit_mix(p, holder.copies)):
        reference = torch.autograd.grad(loss_of(model), [holder.copies, p])
    for a, b in zip(fast, reference, strict=True):
        assert torch.equal(a, b)


def test_seeded_torch_sampler_is_dirichlet_ones():
    n, e = 400_000, 3
    draw = MixingDraw(7, e, n, torch.device("cpu"), torch.float32, "torch")
    p = draw.p()
    mean, var = 1 / e, (e - 1) / (e * e * (e + 1))
    for k in range(e):
        assert abs(p[k].mean().item() - mean) < 5 * (var / n) ** 0.5
        assert abs(p[k].var().item() - var) < 0.02 * var
    assert abs((p[0] <= 0.3).float().mean().item() - (1 - 0.7**2)) < 0.01


# ---- the Triton kernels, on the CPU through Triton's interpreter --------------------------------


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def test_triton_kernels_under_the_interpreter():
    """Runs the ``interpreted`` tests below in a fresh process with ``TRITON_INTERPRET=1``.

    The interpreter must be on before triton is first imported (its own ``tl`` functions are
    built at import), and other tests of a session may import triton first (torch._dynamo does).
    """
    if not HAS_TRITON:
        pytest.skip("needs triton")
    if INTERPRETED:
        pytest.skip("already inside the interpreter run")
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            __file__,
            "-q",
            "-k",
            "interpreted",
            "-p",
            "no:cacheprovider",
        ],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
    assert "7 passed" in completed.stdout, completed.stdout[-2000:]


@pytest.fixture
def interpreted_triton(monkeypatch: pytest.MonkeyPatch) -> object:
    """The "triton" sampler's kernels, run on CPU tensors by Triton's interpreter."""
    if not (HAS_TRITON and INTERPRETED):
        pytest.skip("runs through test_triton_kernels_under_the_interpreter")
    kernels = mk_triton.TritonMixing()
    monkeypatch.setattr(sampling, "triton_mixing", lambda: kernels)
    monkeypatch.setattr(sampling, "triton_applies", lambda *args: True)
    return kernels


@pytest.mark.parametrize("expansion", [2, 3])
@pytest.mark.parametrize("save_p", [True, False])
def test_triton_kernels_regenerate_the_forward_p_interpreted(interpreted_triton, expansion, save_p):
    draw = MixingDraw(
        2**62 + 12345, expansion, 3 * 1024 + 77, torch.device("cpu"), torch.float32, "triton"
    )
    check_regenerated_p_is_the_forward_p(draw, save_p)
    p = draw.p()
    assert torch.equal(p * 2**24, (p * 2**24).round())  # uniforms on the k / 2**24 grid
    other = MixingDraw(draw.seed + 1, expansion, draw.numel, draw.device, draw.dtype, "triton")
    assert not torch.equal(p, other.p())


@pytest.mark.parametrize("backward", ["save", "regenerate"])
def test_triton_path_gives_the_straightforward_gradient_interpreted(interpreted_triton, backward):
    model = small_model(3)
    fast, reference, _ = fast_and_reference_gradients(model, "triton", backward)
    # The kernel computes w in its own order (lo*c0 + (hi-lo)*c1 + (1-hi)*c2, possibly fused).
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-7)


def test_triton_sampler_is_dirichlet_ones_interpreted(interpreted_triton):
    n, e = 60_000, 3
    p = MixingDraw(11, e, n, torch.device("cpu"), torch.float32, "triton").p()
    mean, var = 1 / e, (e - 1) / (e * e * (e + 1))
    for k in range(e):
        assert abs(p[k].mean().item() - mean) < 5 * (var / n) ** 0.5
        assert abs(p[k].var().item() - var) < 0.05 * var


# ---- CUDA ----------------------------------------------------------------------------------------

GPU_PATHS = [
    (sampler, backward) for sampler in ("torch", "triton") for backward in ("save", "regenerate")
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("sampler,backward", GPU_PATHS)
def test_fast_paths_give_the_straightforward_gradient_on_cuda(sampler, backward):
    if sampler == "triton" and not HAS_TRITON:
        pytest.skip("needs triton")
    model = small_model(3, "cuda")
    fast, reference, _ = fast_and_reference_gradients(model, sampler, backward, "cuda")
    if sampler == "torch":
        assert torch.equal(fast, reference)
    else:
        torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("sampler", ["torch", "triton"])
@pytest.mark.parametrize("save_p", [True, False])
@pytest.mark.parametrize("expansion", [2, 3])
def test_regenerated_p_is_the_forward_p_on_cuda(sampler, save_p, expansion):
    if sampler == "triton" and not HAS_TRITON:
        pytest.skip("needs triton")
    numel = 5 * sampling.CHUNK // 2
    draw = MixingDraw(2**61 + 3, expansion, numel, torch.device("cuda"), torch.float32, sampler)
    check_regenerated_p_is_the_forward_p(draw, save_p)


@pytest.mark.gpu
@needs_cuda
def test_cuda_default_keeps_nothing_shaped_like_the_copies():
    model = small_model(3, "cuda")
    holder = find_majority(model)
    assert not holder.saves_p()
    assert holder.resolved_sampler() == ("triton" if HAS_TRITON else "torch")
    assert holder.copies.shape not in saved_shapes(model, "cuda")


@pytest.mark.parametrize("sampler", ["compiled", "sfc64"])
@pytest.mark.parametrize("backward", ["save", "regenerate"])
def test_two_forwards_then_two_backwards_accumulate_the_right_gradients(backward, sampler):
    """Gradient accumulation keeps two graphs alive at once: reused buffers must not be shared."""
    skip_unless_sampler_works(sampler)
    model = small_model(3)
    holder = find_majority(model)
    holder.backward, holder.sampler = backward, sampler
    model.train()
    state = holder.stream.state_dict()
    first, second = loss_of(model), loss_of(model) * 0.5
    first.backward()
    second.backward()
    accumulated = holder.copies.grad.clone()

    holder.copies.grad = None
    holder.stream.load_state_dict(state)
    expected = torch.autograd.grad(loss_of(model), holder.copies)[0]
    expected = expected + torch.autograd.grad(loss_of(model) * 0.5, holder.copies)[0]
    torch.testing.assert_close(accumulated, expected, rtol=0, atol=0)


@pytest.mark.parametrize("sampler", ["compiled", "sfc64"])
def test_weights_handed_to_torch_are_never_overwritten_while_held(sampler):
    skip_unless_sampler_works(sampler)
    model = small_model(3)
    holder = find_majority(model)
    holder.sampler = sampler
    model.train()
    kept = [holder.mix_sampled(holder.draw()).detach() for _ in range(6)]
    snapshots = [w.clone() for w in kept]
    for _ in range(6):
        holder.mix_sampled(holder.draw())
    for w, snapshot in zip(kept, snapshots, strict=True):
        assert torch.equal(w, snapshot)


@pytest.mark.parametrize("sampler", ["compiled", "sfc64", "torch"])
def test_double_backward_matches_between_saving_and_regenerating(sampler):
    skip_unless_sampler_works(sampler)
    """create_graph=True (e.g. a gradient penalty) differentiates through the copies' gradient."""
    results = []
    for backward in ("save", "regenerate"):
        model = small_model(3)
        holder = find_majority(model)
        holder.sampler, holder.backward = sampler, backward
        model.train()
        torch.manual_seed(4)
        (grad,) = torch.autograd.grad(loss_of(model), holder.copies, create_graph=True)
        (second,) = torch.autograd.grad(grad.square().sum(), holder.copies)
        results.append((grad.detach(), second))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
