"""Tests for the model registry (:mod:`sopkit.models`)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from sopkit.errors import UserError
from sopkit.models import MODELS, ModelSpec, build_model, mlp

MNIST1D = (40,)
DIGITS = (64,)
CIFAR = (3, 32, 32)
MNIST = (1, 28, 28)

# Input shapes each registered model must handle. A model added to MODELS without an entry here
# fails the contract test, so nobody can register a model that is never exercised.
CONTRACT_SHAPES: dict[str, list[tuple[int, ...]]] = {
    "mlp-a1": [MNIST1D, DIGITS, CIFAR, MNIST],
    "mlp-a2": [MNIST1D, CIFAR],
    "mlp-a3": [MNIST1D, MNIST],
    "cnn1d": [MNIST1D, DIGITS, (2, 40), (1,)],
    "cnn2d": [CIFAR, MNIST, (3, 7, 5)],
    "resnet18": [CIFAR, MNIST],
    # resnet50 only on a small input: it is the slowest model here.
    "resnet50": [CIFAR],
    "transformer": [MNIST1D, DIGITS, (42,), (2, 40), CIFAR, MNIST],
}


def _contract_cases() -> list[object]:
    return [
        pytest.param(name, shape, id=f"{name}-{'x'.join(map(str, shape or ()))}")
        for name in MODELS
        for shape in CONTRACT_SHAPES.get(name, [None])  # type: ignore[list-item]
    ]


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "shape"), _contract_cases())
def test_model_contract(name: str, shape: tuple[int, ...] | None) -> None:
    """Every registered model builds, maps (N, *shape) to finite (N, C) logits, and trains."""
    if shape is None:
        pytest.fail(f"model {name!r} has no entry in CONTRACT_SHAPES; add the shapes it takes")
    torch.manual_seed(0)
    num_classes = 7
    model = build_model(name, input_shape=shape, num_classes=num_classes)
    assert isinstance(model, nn.Module)
    assert _param_count(model) > 0
    model.train()
    x = torch.randn(3, *shape)
    logits = model(x)
    assert logits.shape == (3, num_classes)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    logits.logsumexp(dim=1).mean().backward()
    # Every parameter takes part in the forward pass (no dead weights for an expansion to miss).
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert any(p.grad.abs().sum() > 0 for p in model.parameters() if p.grad is not None)


def test_registry_names_in_order() -> None:
    # The order `sopkit models` lists them in.
    assert list(MODELS) == [
        "mlp-a1",
        "mlp-a2",
        "mlp-a3",
        "cnn1d",
        "cnn2d",
        "resnet18",
        "resnet50",
        "transformer",
    ]
    for key, spec in MODELS.items():
        assert isinstance(spec, ModelSpec)
        assert spec.name == key
        assert spec.description


@pytest.mark.parametrize(
    ("name", "widths"),
    [("mlp-a1", [100]), ("mlp-a2", [200, 100]), ("mlp-a3", [400, 200, 100])],
)
@pytest.mark.parametrize("shape", [MNIST1D, DIGITS, CIFAR])
def test_mlp_topologies(name: str, widths: list[int], shape: tuple[int, ...]) -> None:
    model = build_model(name, input_shape=shape, num_classes=10)
    assert isinstance(model, nn.Sequential)
    assert isinstance(model[0], nn.Flatten)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [lin.out_features for lin in linears[:-1]] == widths
    assert linears[0].in_features == math.prod(shape)
    assert linears[-1].out_features == 10
    # Flatten, then (Linear, ReLU) per hidden layer, then the head.
    assert len(model) == 1 + 2 * len(widths) + 1
    assert all(isinstance(model[2 + 2 * i], nn.ReLU) for i in range(len(widths)))


def test_mlp_helper() -> None:
    model = mlp((5, 2), 3, hidden=(8, 4))
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [8, 4, 3]
    assert model(torch.randn(2, 5, 2)).shape == (2, 3)
    with pytest.raises(UserError, match="hidden"):
        mlp((5,), 3, hidden=(0,))


def test_resnet18_imagenet_stem_loads_into_torchvision() -> None:
    import torchvision

    model = build_model(
        "resnet18", input_shape=(3, 224, 224), num_classes=10, small_input_stem=False
    )
    assert isinstance(model, torchvision.models.ResNet)
    reference = torchvision.models.resnet18(num_classes=10)
    reference.load_state_dict(model.state_dict(), strict=True)
    # Large images get the ImageNet stem by default, too.
    default = build_model("resnet18", input_shape=(3, 224, 224), num_classes=10)
    assert default.conv1.kernel_size == (7, 7)


def test_resnet_small_input_stem() -> None:
    model = build_model("resnet18", input_shape=CIFAR, num_classes=10)
    assert model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    forced = build_model("resnet18", input_shape=(3, 96, 96), num_classes=10, small_input_stem=True)
    assert forced.conv1.kernel_size == (3, 3)


def test_resnet_conv1_takes_the_data_channels() -> None:
    small = build_model("resnet18", input_shape=MNIST, num_classes=10)
    assert small.conv1.in_channels == 1
    big = build_model("resnet18", input_shape=(1, 128, 128), num_classes=10)
    assert big.conv1.in_channels == 1
    assert big.conv1.kernel_size == (7, 7)
    assert big.conv1.stride == (2, 2)
    assert not isinstance(big.maxpool, nn.Identity)


def test_transformer_structure_and_options() -> None:
    model = build_model("transformer", input_shape=MNIST1D, num_classes=10)
    assert any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    assert any(isinstance(m, nn.TransformerEncoder) for m in model.modules())
    # 40 values in patches of 4 -> 10 tokens, plus the CLS token.
    assert model.pos_embed.shape == (1, 11, 64)
    padded = build_model("transformer", input_shape=(42,), num_classes=10)
    assert padded.pos_embed.shape == (1, 12, 64)  # 42 is padded to 44 -> 11 tokens + CLS
    image = build_model("transformer", input_shape=CIFAR, num_classes=10, patch=8, pool="mean")
    assert image.pos_embed.shape == (1, 16, 64)
    assert image(torch.randn(2, *CIFAR)).shape == (2, 10)
    with pytest.raises(UserError, match="divisible"):
        build_model("transformer", input_shape=MNIST1D, num_classes=10, d_model=30, heads=4)
    with pytest.raises(UserError, match="patch"):
        build_model("transformer", input_shape=MNIST1D, num_classes=10, patch=0)
    with pytest.raises(UserError, match="pool"):
        build_model("transformer", input_shape=MNIST1D, num_classes=10, pool="max")


def _cnn_param_count(kernel: int, channels: list[int], num_classes: int) -> int:
    """Parameters of Conv (no bias) + BatchNorm blocks from channels[0] through channels[-1],
    then a Linear head: counted from the architecture, independently of the code under test."""
    convs = sum(c_in * c_out * kernel for c_in, c_out in zip(channels, channels[1:], strict=False))
    norms = sum(2 * c for c in channels[1:])  # weight and bias per channel
    return convs + norms + channels[-1] * num_classes + num_classes


def test_cnn_sizes_follow_width() -> None:
    # cnn1d: kernel 5, widths (w, 2w, 2w) from one input channel; cnn2d: kernel 3x3, (w, 2w, 4w).
    default_1d = build_model("cnn1d", input_shape=MNIST1D, num_classes=10)
    assert _param_count(default_1d) == _cnn_param_count(5, [1, 32, 64, 64], 10) == 31_850
    narrow = build_model("cnn1d", input_shape=MNIST1D, num_classes=10, width=8)
    assert _param_count(narrow) == _cnn_param_count(5, [1, 8, 16, 16], 10) == 2_210
    two_channels = build_model("cnn1d", input_shape=(2, 40), num_classes=10)
    assert _param_count(two_channels) == _cnn_param_count(5, [2, 32, 64, 64], 10)
    default_2d = build_model("cnn2d", input_shape=CIFAR, num_classes=10)
    assert _param_count(default_2d) == _cnn_param_count(9, [3, 32, 64, 128], 10) == 94_762


_MYMOD = textwrap.dedent(
    """
    from torch import nn

    def make(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], num_classes))

    def make_plain():
        return nn.Sequential(nn.Flatten(), nn.Linear(40, 10))

    def make_kwargs(**kwargs):
        return nn.Linear(kwargs["input_shape"][0], kwargs["num_classes"])

    def make_hidden(input_shape, num_classes, hidden=16):
        return nn.Sequential(nn.Linear(input_shape[0], hidden), nn.Linear(hidden, num_classes))

    def make_needs_more(input_shape, num_classes, depth):
        return nn.Linear(1, 1)

    def not_a_model(input_shape, num_classes):
        return 42

    class Nets:
        @staticmethod
        def make(input_shape, num_classes):
            return nn.Linear(input_shape[0], num_classes)

    VALUE = 3
    """
)


@pytest.fixture
def mymod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A throwaway user module on sys.path; the name is unique so no test sees a stale import."""
    name = f"mymod_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(_MYMOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_custom_factory(mymod: str) -> None:
    x = torch.randn(2, 40)
    model = build_model(f"{mymod}:make", input_shape=MNIST1D, num_classes=10)
    assert model(x).shape == (2, 10)
    plain = build_model(f"{mymod}:make_plain", input_shape=MNIST1D, num_classes=10)
    assert plain(x).shape == (2, 10)
    kw = build_model(f"{mymod}:make_kwargs", input_shape=MNIST1D, num_classes=5)
    assert kw(x).shape == (2, 5)
    dotted = build_model(f"{mymod}:Nets.make", input_shape=MNIST1D, num_classes=3)
    assert dotted(x).shape == (2, 3)
    hidden = build_model(f"{mymod}:make_hidden", input_shape=MNIST1D, num_classes=4, hidden=8)
    assert hidden[0].out_features == 8


def test_custom_factory_errors(mymod: str) -> None:
    kw = {"input_shape": MNIST1D, "num_classes": 10}
    with pytest.raises(UserError, match=r"nosuchmod_xyz.*No module named"):
        build_model("nosuchmod_xyz:f", **kw)
    with pytest.raises(UserError, match=rf"{mymod}.*no attribute 'nosuch'"):
        build_model(f"{mymod}:nosuch", **kw)
    with pytest.raises(UserError, match="returned an object of type 'int', not a torch.nn.Module"):
        build_model(f"{mymod}:not_a_model", **kw)
    with pytest.raises(UserError, match="not a callable"):
        build_model(f"{mymod}:VALUE", **kw)
    with pytest.raises(UserError, match=r"make_needs_more.*failed.*depth"):
        build_model(f"{mymod}:make_needs_more", **kw)
    with pytest.raises(UserError, match="Options it takes: hidden"):
        build_model(f"{mymod}:make_hidden", **kw, depth=3)
    with pytest.raises(UserError, match="package.module:factory"):
        build_model(":make", **kw)


def test_custom_module_with_syntax_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_models_mod.py").write_text("def make(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="SyntaxError"):
        build_model("broken_models_mod:make", input_shape=MNIST1D, num_classes=10)


def test_unknown_model_name() -> None:
    with pytest.raises(UserError) as info:
        build_model("mlp-a4", input_shape=MNIST1D, num_classes=10)
    message = str(info.value)
    assert "Unknown model 'mlp-a4'" in message
    assert all(name in message for name in MODELS)
    assert "package.module:factory" in message
    assert "Did you mean" in message


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("cnn2d", MNIST1D),
        ("resnet18", MNIST1D),
        ("resnet50", (2, 40)),
        ("cnn1d", CIFAR),
        ("transformer", (1, 2, 3, 4)),
    ],
)
def test_bad_input_shape(name: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(UserError, match=rf"'{name}' cannot take inputs of shape .*accepts"):
        build_model(name, input_shape=shape, num_classes=10)


@pytest.mark.parametrize("shape", [(), (0,), (3, -1), 40, "40", (40.0,)])
def test_malformed_input_shape(shape: object) -> None:
    with pytest.raises(UserError, match="input_shape"):
        build_model("mlp-a1", input_shape=shape, num_classes=10)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_classes", [0, -3, 2.0, True])
def test_bad_num_classes(num_classes: object) -> None:
    with pytest.raises(UserError, match="num_classes"):
        build_model("mlp-a1", input_shape=MNIST1D, num_classes=num_classes)  # type: ignore[arg-type]


def test_unknown_option() -> None:
    with pytest.raises(UserError, match=r"no option 'depth'.*Options it takes: width"):
        build_model("cnn1d", input_shape=MNIST1D, num_classes=10, depth=4)
    with pytest.raises(UserError, match="Options it takes: none"):
        build_model("mlp-a1", input_shape=MNIST1D, num_classes=10, hidden=(5,))
    with pytest.raises(UserError, match="small_input_stem"):
        build_model("resnet18", input_shape=CIFAR, num_classes=10, small_stem=True)
    with pytest.raises(UserError, match="positive integer"):
        build_model("cnn2d", input_shape=CIFAR, num_classes=10, width="32")


@pytest.mark.parametrize("name", ["mlp-a2", "cnn1d", "transformer"])
def test_same_seed_same_weights(name: str) -> None:
    def weights(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return build_model(name, input_shape=MNIST1D, num_classes=10).state_dict()

    first, second, other = weights(1), weights(1), weights(2)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


def test_import_does_not_load_torchvision() -> None:
    code = "import sys, sopkit.models; assert 'torchvision' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
