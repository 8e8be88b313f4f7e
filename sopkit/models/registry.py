"""The models a user can name, and :func:`build_model`, in the spirit of timm's ``create_model``.

Besides the registered names in :data:`MODELS`, any name of the form ``package.module:factory``
imports ``factory`` and calls it, so a user can train their own architecture without touching
sopkit. Options a factory does not take are refused here, with the list of those it does take.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from sopkit.errors import UserError, unknown_name
from sopkit.models.checks import (
    check_input_shape,
    check_num_classes,
    raised_at,
    refuse_code_models,
)
from sopkit.models.conv import cnn1d, cnn2d
from sopkit.models.dense import mlp_a1, mlp_a2, mlp_a3
from sopkit.models.resnet import resnet18, resnet50
from sopkit.models.transformer import transformer

__all__ = ["MODELS", "ModelSpec", "build_model"]

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


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("mlp-a1", "MLP, hidden widths [100] (paper topology A1); any input", mlp_a1),
        ModelSpec("mlp-a2", "MLP, hidden widths [200, 100] (paper topology A2); any input", mlp_a2),
        ModelSpec(
            "mlp-a3",
            "MLP, hidden widths [400, 200, 100] (paper topology A3); any input",
            mlp_a3,
        ),
        ModelSpec(
            "cnn1d", "small 1-D CNN for signals (L,) or (C, L), e.g. mnist1d; option width", cnn1d
        ),
        ModelSpec(
            "cnn2d",
            "small 2-D CNN for images (C, H, W), e.g. CIFAR-10, MNIST; option width",
            cnn2d,
        ),
        ModelSpec(
            "resnet18",
            "torchvision ResNet-18 for images (C, H, W); option small_input_stem",
            resnet18,
        ),
        ModelSpec(
            "resnet50",
            "torchvision ResNet-50 for images (C, H, W); option small_input_stem",
            resnet50,
        ),
        ModelSpec(
            "transformer",
            "small patch Transformer encoder for (L,), (C, L) or (C, H, W) inputs; options patch, "
            "d_model, layers, heads, dim_feedforward, dropout, pool",
            transformer,
        ),
    )
}


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
        # A missing module or a typo in the user's file: their fix, so no traceback.
        raise UserError(
            f"Cannot import module {module_name!r} for model {target!r}: "
            f"{type(exc).__name__}: {exc}. Is it installed or on PYTHONPATH?"
        ) from exc
    except (Exception, SystemExit) as exc:  # the module's own code failed (or called sys.exit)
        raise UserError(
            f"Importing module {module_name!r} for model {target!r} failed: "
            f"{type(exc).__name__}: {exc}{raised_at(exc)}."
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
    refuse_code_models([target])  # SOPKIT_NO_CODE_MODELS=1: before anything is imported
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
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    try:
        model = factory(**kwargs)
    except UserError:
        raise
    except TypeError as exc:
        # Usually a signature mismatch (a required parameter we cannot know about).
        raise UserError(
            f"Calling the model factory {target}({shown}) failed: {exc}. A factory should take "
            "input_shape and num_classes keyword arguments, or no arguments."
        ) from exc
    except (Exception, SystemExit) as exc:  # the factory's own code: name it, and where it raised
        raise UserError(
            f"The model factory {target}({shown}) raised {type(exc).__name__}: {exc}{raised_at(exc)}."
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

    ``name`` is a key of :data:`MODELS`, ``hf:NAME_OR_PATH`` (a pretrained Hugging Face model,
    :mod:`sopkit.models.hf`) or ``package.module:factory``. ``options`` are the
    model's own keyword options (e.g. ``small_input_stem=False`` for the ResNets). Every
    mistake in the request raises :class:`UserError`.
    """
    input_shape = check_input_shape(input_shape)
    num_classes = check_num_classes(num_classes)
    if not isinstance(name, str) or not name.strip():
        raise unknown_name("model", repr(name), MODELS)
    if name.startswith("hf:"):  # a pretrained Hugging Face model (sopkit.models.hf, extra 'hf')
        from sopkit.models.hf import build_hf_model

        return build_hf_model(name, input_shape=input_shape, num_classes=num_classes, **options)
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
