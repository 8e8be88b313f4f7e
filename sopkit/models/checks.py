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
    "check_num_classes",
    "fraction",
    "positive_int",
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
