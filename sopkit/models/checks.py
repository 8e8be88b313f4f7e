"""Checks on a model request: turn a bad shape or option value into a message the user can act on.

Every factory validates its own options through these helpers, so that a mistake raises
:class:`~sopkit.errors.UserError` (one paragraph from the CLI) instead of a traceback from deep
inside ``torch.nn``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sopkit.errors import UserError

__all__ = [
    "check_input_shape",
    "check_model_fits",
    "code_models_refused",
    "refuse_code_models",
    "check_num_classes",
    "fraction",
    "positive_int",
    "raised_at",
    "shape_error",
]


def shape_error(model: str, input_shape: tuple[int, ...], accepts: str) -> UserError:
    """The error for an input shape a model cannot take, saying which shapes it does take."""
    return UserError(
        f"Model {model!r} cannot take inputs of shape {input_shape}: it accepts {accepts}. "
        "Pick a model that fits the data set: the mlp-* models take any input shape, "
        "'transformer' takes (L,), (C, L) and (C, H, W)."
    )


def positive_int(model: str, option: str, value: Any) -> int:
    """Check that an option is a positive integer (bools are rejected although they are ints)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(
            f"Option {option!r} of model {model!r} must be a positive integer, got {value!r}."
        )
    return value


def fraction(model: str, option: str, value: Any) -> float:
    """Check that an option is a probability in [0, 1), as dropout needs."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise UserError(
            f"Option {option!r} of model {model!r} must be a number in [0, 1), got {value!r}."
        )
    return float(value)


def check_input_shape(input_shape: Any) -> tuple[int, ...]:
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


def check_num_classes(num_classes: Any) -> int:
    """Check that ``num_classes`` is a positive integer."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}.")
    return num_classes


def raised_at(error: BaseException) -> str:
    """`` (at file.py:12)``: where ``error`` was raised, for a message about a user's code."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return ""
    return f" (at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})"


def check_model_fits(
    name: str,
    model: Any,
    input_shape: tuple[int, ...],
    num_classes: int,
    device: Any = None,
    example: Any = None,
) -> None:
    """A UserError, naming the model and the shapes, unless ``model`` can be trained on inputs of
    ``input_shape`` into ``num_classes`` classes: it is a module with trainable parameters, and a
    forward pass (eval mode, no gradients) on a batch of two inputs on ``device`` returns logits of
    shape ``(2, num_classes)``. The inputs are the first two of ``example`` (a tensor of real
    inputs: token ids stay integers) or, without it, zeros. Run before training, so a user's
    factory whose layers do not fit the data fails in a second, not after a trial's set-up."""
    import torch
    from torch import nn

    what = f"inputs of shape {input_shape} and {num_classes} classes"
    if not isinstance(model, nn.Module):
        raise UserError(
            f"Model {name!r} is a {type(model).__name__}, not a torch.nn.Module ({what})."
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(
            f"Model {name!r} has no trainable parameters (built for {what}): there is nothing to "
            "train. A factory must return a module whose layers hold parameters."
        )
    if isinstance(example, torch.Tensor) and len(example) >= 1:
        batch = example[:2].to(device)
    else:
        batch = torch.zeros((2, *input_shape), device=device)
    rows = len(batch)
    was_training = model.training
    try:
        model.to(device)
        model.eval()
        with torch.no_grad():
            output = model(batch)
    except UserError:
        raise
    except Exception as error:  # a user's layers may raise anything on a shape they do not take
        raise UserError(
            f"Model {name!r} does not fit the data: its forward pass on a batch of {rows} inputs of "
            f"shape {input_shape} ({num_classes} classes) failed: {type(error).__name__}: "
            f"{error}{raised_at(error)}"
        ) from error
    finally:
        model.train(was_training)
    # One output per example is also a regression's (num_classes 1: STS-B's score).
    shapes = {(rows, num_classes)} | ({(rows,)} if num_classes == 1 else set())
    if not isinstance(output, torch.Tensor) or tuple(output.shape) not in shapes:
        got = (f"a tensor of shape {tuple(output.shape)}" if isinstance(output, torch.Tensor)
               else f"a {type(output).__name__}")
        raise UserError(
            f"Model {name!r} does not fit the data: on a batch of {rows} inputs of shape "
            f"{input_shape} it returns {got}; sopkit needs logits of shape ({rows}, {num_classes}), one score per "
            "class of the data set."
        )


#: Set to 1 to refuse every ``package.module:factory`` model (``--no-code-models`` does the same
#: for one ``sopkit compare``).
NO_CODE_MODELS_ENV = "SOPKIT_NO_CODE_MODELS"


def code_models_refused() -> bool:
    """Whether ``SOPKIT_NO_CODE_MODELS`` asks to refuse ``package.module:factory`` models."""
    import os

    return os.environ.get(NO_CODE_MODELS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def refuse_code_models(
    models: Sequence[str], *, refuse: bool = False, preset: str | None = None
) -> None:
    """A UserError when code models are refused (``refuse``, or ``SOPKIT_NO_CODE_MODELS=1``) and
    ``models`` names one: ``package.module:factory`` imports that module, which runs its code, so a
    preset received from someone else can run anything through it."""
    if not (refuse or code_models_refused()):
        return
    # hf:NAME loads weights and a configuration, not code (sopkit.models.hf never trusts remote code).
    code = [model for model in models if ":" in model and not model.startswith("hf:")]
    if code:
        source = f" (from preset {preset!r})" if preset else ""
        raise UserError(
            f"Model {code[0]!r}{source} is code: 'package.module:factory' imports that module, "
            f"which runs it. Refused because --no-code-models or {NO_CODE_MODELS_ENV}=1 is set; "
            "use a registered model (see `sopkit models`) or drop the switch if you trust it."
        )
