"""The models a user can name on the command line, in the spirit of timm's ``create_model(name)``.

Every model is built from the per-example ``input_shape`` the data set reports (``(40,)`` for
mnist1d, ``(3, 32, 32)`` for CIFAR-10, ...) and a ``num_classes``; it maps a float32 batch
``(N, *input_shape)`` to logits ``(N, num_classes)``. Input sizes are never hard-coded.

Besides the registered names in :data:`MODELS`, any name of the form ``package.module:factory``
imports ``factory`` and calls it, so a user can train their own architecture without touching
sopkit.

Everything the user can get wrong (an unknown name, an input shape a model cannot take, an option
the model does not have, a factory that cannot be imported) raises :class:`~sopkit.errors.UserError`
so the CLI can print one paragraph instead of a traceback.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sopkit.errors import UserError, unknown_name

__all__ = [
    "MODELS",
    "ModelSpec",
    "PatchTransformer",
    "available_models",
    "build_model",
    "mlp",
]

# The two arguments every factory receives; everything else it takes is a user-settable option.
_REQUIRED_ARGS = ("input_shape", "num_classes")


@dataclass(frozen=True)
class ModelSpec:
    """One registered model: the name users type, a one-line description, and how to build it.

    ``factory`` is called as ``factory(input_shape=..., num_classes=..., **options)``; its other
    keyword parameters are the options a user may set.
    """

    name: str
    description: str
    factory: Callable[..., nn.Module]


# --------------------------------------------------------------------------------------------
# Validation helpers: turn a bad shape or option value into a message the user can act on.
# --------------------------------------------------------------------------------------------


def _shape_error(model: str, input_shape: tuple[int, ...], accepts: str) -> UserError:
    """The error for an input shape a model cannot take, saying which shapes it does take."""
    return UserError(
        f"Model {model!r} cannot take inputs of shape {input_shape}: it accepts {accepts}. "
        "Pick a model that fits the data set: the mlp-* models take any input shape, "
        "'transformer' takes (L,), (C, L) and (C, H, W)."
    )


def _positive_int(model: str, option: str, value: Any) -> int:
    """Check that an option is a positive integer (bools are rejected although they are ints)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(
            f"Option {option!r} of model {model!r} must be a positive integer, got {value!r}."
        )
    return value


def _fraction(model: str, option: str, value: Any) -> float:
    """Check that an option is a probability in [0, 1), as dropout needs."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise UserError(
            f"Option {option!r} of model {model!r} must be a number in [0, 1), got {value!r}."
        )
    return float(value)


def _check_input_shape(input_shape: Any) -> tuple[int, ...]:
    """Normalise ``input_shape`` to a tuple of positive ints, or explain what is wrong with it."""
    if isinstance(input_shape, int | str | bytes) or not isinstance(input_shape, Sequence):
        # torch.Size, tuple and list are all Sequences; a bare int is a common slip for (L,).
        raise UserError(
            f"input_shape must be a tuple of positive integers such as (40,) or (3, 32, 32), "
            f"got {input_shape!r}."
        )
    dims = tuple(input_shape)
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise UserError(
            f"input_shape must be a non-empty tuple of positive integers such as (40,) or "
            f"(3, 32, 32), got {input_shape!r}."
        )
    return dims


def _check_num_classes(num_classes: Any) -> int:
    """Check that ``num_classes`` is a positive integer."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}.")
    return num_classes


# --------------------------------------------------------------------------------------------
# Fully connected networks (the paper's topologies A1-A3).
# --------------------------------------------------------------------------------------------


def mlp(
    input_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int] = (100,)
) -> nn.Sequential:
    """A fully connected classifier: Flatten, then Linear + ReLU per hidden width, Linear head.

    It is a plain ``nn.Sequential`` on purpose: code that rewrites hidden layers (e.g. the
    majority-kernel expansion) finds the hidden ``nn.Linear`` modules in order by iterating it.
    """
    in_features = math.prod(_check_input_shape(input_shape))
    num_classes = _check_num_classes(num_classes)
    widths = [_positive_int("mlp", "hidden", w) for w in hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for width in widths:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


def _mlp_a1(*, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Topology A1: one hidden layer of 100 units."""
    return mlp(input_shape, num_classes, hidden=(100,))


def _mlp_a2(*, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Topology A2: hidden layers of 200 and 100 units."""
    return mlp(input_shape, num_classes, hidden=(200, 100))


def _mlp_a3(*, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Topology A3: hidden layers of 400, 200 and 100 units."""
    return mlp(input_shape, num_classes, hidden=(400, 200, 100))


# --------------------------------------------------------------------------------------------
# Small convolutional networks.
# --------------------------------------------------------------------------------------------


def _cnn1d(*, input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> nn.Module:
    """A small 1-D CNN for signals such as mnist1d: three Conv1d+BN+ReLU blocks, average pool.

    A 1-D input ``(L,)`` is read as one channel; ``(C, L)`` as C channels. ``width`` is the
    channel count of the first block (the later blocks use twice as many).
    """
    width = _positive_int("cnn1d", "width", width)
    if len(input_shape) == 1:
        channels, length = 1, input_shape[0]
        # Give the flat signal its channel axis inside the model so the data need no reshaping.
        layers: list[nn.Module] = [nn.Unflatten(1, (1, length))]
    elif len(input_shape) == 2:
        channels, layers = input_shape[0], []
    else:
        raise _shape_error("cnn1d", input_shape, "1-D signals shaped (L,) or (C, L)")
    widths = (width, 2 * width, 2 * width)
    for i, out_channels in enumerate(widths):
        # Stride 2 after the first block halves the length: cheap on CPU, wider receptive field.
        # Padding 2 with kernel 5 keeps even a length-1 signal valid.
        stride = 1 if i == 0 else 2
        layers += [
            nn.Conv1d(channels, out_channels, kernel_size=5, stride=stride, padding=2, bias=False),
            nn.BatchNorm1d(out_channels),
            nn.ReLU(),
        ]
        channels = out_channels
    layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def _cnn2d(*, input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> nn.Module:
    """A small 2-D CNN for 32x32-ish images (C, H, W): three Conv2d+BN+ReLU blocks, average pool.

    The first two blocks max-pool by 2. ``width`` is the channel count of the first block
    (then 2x and 4x).
    """
    width = _positive_int("cnn2d", "width", width)
    if len(input_shape) != 3:
        raise _shape_error("cnn2d", input_shape, "images shaped (C, H, W), e.g. (3, 32, 32)")
    channels = input_shape[0]
    layers: list[nn.Module] = []
    for i, out_channels in enumerate((width, 2 * width, 4 * width)):
        layers += [
            nn.Conv2d(channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        ]
        if i < 2:
            # ceil_mode keeps odd and tiny images valid (a 1x1 map pools to 1x1, not 0x0).
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        channels = out_channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------
# torchvision ResNets.
# --------------------------------------------------------------------------------------------


def _resnet(
    arch: str, input_shape: tuple[int, ...], num_classes: int, small_input_stem: bool | None
) -> nn.Module:
    """A torchvision ResNet (random weights) whose stem fits the data set's images.

    ``small_input_stem`` (default: on when the image is at most 64 px) swaps the 7x7 stride-2
    conv and the max-pool for a 3x3 stride-1 conv, the usual CIFAR stem; otherwise the ImageNet
    stem is kept and the state_dict stays loadable into ``torchvision.models.<arch>``.
    """
    if len(input_shape) != 3:
        raise _shape_error(arch, input_shape, "images shaped (C, H, W), e.g. (3, 32, 32)")
    if small_input_stem is not None and not isinstance(small_input_stem, bool):
        raise UserError(
            f"Option 'small_input_stem' of model {arch!r} must be true, false or unset, "
            f"got {small_input_stem!r}."
        )
    # Imported here, not at module level: importing torchvision costs seconds.
    import torchvision.models

    channels, height, width = input_shape
    if small_input_stem is None:
        small_input_stem = max(height, width) <= 64
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    conv1: nn.Conv2d = model.conv1
    if small_input_stem:
        model.conv1 = nn.Conv2d(channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif channels != conv1.in_channels:
        model.conv1 = nn.Conv2d(channels, conv1.out_channels, 7, stride=2, padding=3, bias=False)
    if model.conv1 is not conv1:
        # Same initialisation torchvision gives its convolutions, so only the shape differs.
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def _resnet18(
    *, input_shape: tuple[int, ...], num_classes: int, small_input_stem: bool | None = None
) -> nn.Module:
    """torchvision ResNet-18, see :func:`_resnet`."""
    return _resnet("resnet18", input_shape, num_classes, small_input_stem)


def _resnet50(
    *, input_shape: tuple[int, ...], num_classes: int, small_input_stem: bool | None = None
) -> nn.Module:
    """torchvision ResNet-50, see :func:`_resnet`."""
    return _resnet("resnet50", input_shape, num_classes, small_input_stem)


# --------------------------------------------------------------------------------------------
# A small patch Transformer.
# --------------------------------------------------------------------------------------------


class PatchTransformer(nn.Module):
    """A small Transformer-encoder classifier over non-overlapping patches of the input.

    ``(L,)`` and ``(C, L)`` inputs are cut into patches of ``patch`` positions, ``(C, H, W)``
    images into ``patch x patch`` squares; inputs that do not divide evenly are zero-padded at
    the end. Patches go through a Linear embedding plus a learned positional embedding, a
    pre-norm ``nn.TransformerEncoder``, then a CLS token (or the mean of the tokens), LayerNorm
    and a Linear head.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        patch: int = 4,
        d_model: int = 64,
        layers: int = 2,
        heads: int = 4,
        dim_feedforward: int = 128,
        dropout: float = 0.0,
        pool: str = "cls",
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.patch = patch
        self.pool = pool
        if len(self.input_shape) == 1:
            self._spatial: tuple[int, ...] = self.input_shape
            channels = 1
        else:
            channels, *rest = self.input_shape
            self._spatial = tuple(rest)
        # Round every spatial size up to a multiple of the patch; the difference is zero-padded.
        self._padded = tuple(math.ceil(s / patch) * patch for s in self._spatial)
        num_tokens = math.prod(s // patch for s in self._padded)
        patch_dim = channels * patch ** len(self._spatial)

        self.embed = nn.Linear(patch_dim, d_model)
        extra = 1 if pool == "cls" else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens + extra, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model,
            heads,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            batch_first=True,
            # Pre-norm trains stably without warm-up, which matters for short runs.
            norm_first=True,
        )
        # Nested tensors only help with padding masks, which we never use; off avoids a warning.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Cut a batch ``(N, *input_shape)`` into patch vectors ``(N, tokens, patch_dim)``."""
        n = x.shape[0]
        x = x.reshape(n, -1, *self._spatial)  # give (L,) inputs their single channel
        pad: list[int] = []
        for size, padded in zip(reversed(self._spatial), reversed(self._padded), strict=True):
            pad += [0, padded - size]  # F.pad lists the last dimension first
        if any(pad):
            x = F.pad(x, pad)
        p = self.patch
        if len(self._spatial) == 1:
            (length,) = self._padded
            x = x.reshape(n, -1, length // p, p).permute(0, 2, 1, 3)
        else:
            height, width = self._padded
            x = x.reshape(n, -1, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, math.prod(s // p for s in self._padded), -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for a batch ``(N, *input_shape)``."""
        h = self.embed(self.tokens(x))
        if self.cls_token is not None:
            h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        h = self.encoder(h + self.pos_embed)
        h = h[:, 0] if self.cls_token is not None else h.mean(dim=1)
        return self.head(self.norm(h))


def _transformer(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    patch: int = 4,
    d_model: int = 64,
    layers: int = 2,
    heads: int = 4,
    dim_feedforward: int = 128,
    dropout: float = 0.0,
    pool: str = "cls",
) -> nn.Module:
    """Validate the options, then build a :class:`PatchTransformer`."""
    name = "transformer"
    if len(input_shape) not in (1, 2, 3):
        raise _shape_error(name, input_shape, "signals (L,) or (C, L) and images (C, H, W)")
    patch = _positive_int(name, "patch", patch)
    d_model = _positive_int(name, "d_model", d_model)
    layers = _positive_int(name, "layers", layers)
    heads = _positive_int(name, "heads", heads)
    dim_feedforward = _positive_int(name, "dim_feedforward", dim_feedforward)
    dropout = _fraction(name, "dropout", dropout)
    if d_model % heads:
        raise UserError(
            f"Model {name!r}: d_model ({d_model}) must be divisible by heads ({heads})."
        )
    if pool not in ("cls", "mean"):
        raise UserError(f"Option 'pool' of model {name!r} must be 'cls' or 'mean', got {pool!r}.")
    return PatchTransformer(
        input_shape,
        num_classes,
        patch=patch,
        d_model=d_model,
        layers=layers,
        heads=heads,
        dim_feedforward=dim_feedforward,
        dropout=dropout,
        pool=pool,
    )


# --------------------------------------------------------------------------------------------
# The registry.
# --------------------------------------------------------------------------------------------

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("mlp-a1", "MLP, hidden widths [100] (paper topology A1); any input", _mlp_a1),
        ModelSpec(
            "mlp-a2", "MLP, hidden widths [200, 100] (paper topology A2); any input", _mlp_a2
        ),
        ModelSpec(
            "mlp-a3",
            "MLP, hidden widths [400, 200, 100] (paper topology A3); any input",
            _mlp_a3,
        ),
        ModelSpec(
            "cnn1d", "small 1-D CNN for signals (L,) or (C, L), e.g. mnist1d; option width", _cnn1d
        ),
        ModelSpec(
            "cnn2d",
            "small 2-D CNN for images (C, H, W), e.g. CIFAR-10, MNIST; option width",
            _cnn2d,
        ),
        ModelSpec(
            "resnet18",
            "torchvision ResNet-18 for images (C, H, W); option small_input_stem",
            _resnet18,
        ),
        ModelSpec(
            "resnet50",
            "torchvision ResNet-50 for images (C, H, W); option small_input_stem",
            _resnet50,
        ),
        ModelSpec(
            "transformer",
            "small patch Transformer encoder for (L,), (C, L) or (C, H, W) inputs; options patch, "
            "d_model, layers, heads, dim_feedforward, dropout, pool",
            _transformer,
        ),
    )
}


def available_models() -> list[str]:
    """The registered model names, in registry order (``package.module:factory`` also works)."""
    return list(MODELS)


def _parameters(factory: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], bool] | None:
    """The keyword-passable parameters of ``factory`` and whether it takes ``**kwargs``.

    ``None`` when the signature cannot be read (some builtins), so callers can fall back.
    """
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    named = {
        name: p
        for name, p in signature.parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    var_keyword = any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()
    )
    return named, var_keyword


def _check_options(model: str, factory: Callable[..., Any], options: dict[str, Any]) -> None:
    """Raise a UserError naming the options ``model`` takes if ``options`` has any other key."""
    if not options:
        return
    params = _parameters(factory)
    if params is None or params[1]:
        return  # unreadable signature or **kwargs: let the factory judge its own options
    takes = [name for name in params[0] if name not in _REQUIRED_ARGS]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        listed = ", ".join(takes) if takes else "none"
        raise UserError(
            f"Model {model!r} has no option {', '.join(map(repr, unknown))}. "
            f"Options it takes: {listed}."
        )


def _resolve_factory(target: str) -> Callable[..., Any]:
    """Import ``package.module:attr`` (``attr`` may be dotted) and return the callable it names."""
    module_name, _, attr_path = target.partition(":")
    module_name, attr_path = module_name.strip(), attr_path.strip()
    if not module_name or not attr_path:
        raise UserError(
            f"Model {target!r} is not of the form 'package.module:factory' "
            "(both parts are needed, e.g. 'mypkg.nets:make_net')."
        )
    try:
        module = importlib.import_module(module_name)
    except (ImportError, SyntaxError) as exc:
        # A missing module or a typo in the user's file: their fix, so no traceback. Any other
        # exception raised while the module runs keeps its traceback, which they need to debug it.
        raise UserError(
            f"Cannot import module {module_name!r} for model {target!r}: "
            f"{type(exc).__name__}: {exc}. Is it installed or on PYTHONPATH?"
        ) from exc
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise UserError(
                f"Module {module_name!r} has no attribute {attr_path!r} (looking for the model "
                f"factory of {target!r})."
            ) from exc
    if not callable(obj):
        raise UserError(
            f"{target!r} names an object of type {type(obj).__name__!r}, not a callable that "
            "returns a model."
        )
    return obj


def _build_custom(
    target: str, input_shape: tuple[int, ...], num_classes: int, options: dict[str, Any]
) -> nn.Module:
    """Build a model from a user's ``package.module:factory``.

    ``input_shape`` and ``num_classes`` are passed only if the factory's signature accepts them
    (by name or through ``**kwargs``); a factory taking neither is called with no arguments.
    """
    factory = _resolve_factory(target)
    _check_options(target, factory, options)
    params = _parameters(factory)
    kwargs: dict[str, Any] = {}
    if params is not None:
        named, var_keyword = params
        for key, value in (("input_shape", input_shape), ("num_classes", num_classes)):
            if key in named or var_keyword:
                kwargs[key] = value
    kwargs.update(options)
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        # Usually a signature mismatch (a required parameter we cannot know about).
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise UserError(
            f"Calling the model factory {target}({shown}) failed: {exc}. A factory should take "
            "input_shape and num_classes keyword arguments, or no arguments."
        ) from exc
    if not isinstance(model, nn.Module):
        raise UserError(
            f"The model factory {target!r} returned an object of type "
            f"{type(model).__name__!r}, not a torch.nn.Module."
        )
    return model


def build_model(
    name: str, *, input_shape: tuple[int, ...], num_classes: int, **options: Any
) -> nn.Module:
    """Build the model a user named, sized for the data set's ``input_shape`` and ``num_classes``.

    ``name`` is a key of :data:`MODELS` or ``package.module:factory``. ``options`` are the
    model's own keyword options (e.g. ``small_input_stem=False`` for the ResNets). Every
    mistake in the request raises :class:`UserError`.
    """
    input_shape = _check_input_shape(input_shape)
    num_classes = _check_num_classes(num_classes)
    if not isinstance(name, str) or not name.strip():
        raise unknown_name("model", repr(name), MODELS)
    if ":" in name:
        return _build_custom(name, input_shape, num_classes, options)
    spec = MODELS.get(name)
    if spec is None:
        error = unknown_name("model", name, MODELS)
        close = difflib.get_close_matches(name.lower(), list(MODELS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UserError(
            f"{error}{hint} Your own model can be given as 'package.module:factory', a callable "
            "taking input_shape and num_classes that returns a torch.nn.Module."
        )
    _check_options(name, spec.factory, options)
    return spec.factory(input_shape=input_shape, num_classes=num_classes, **options)
