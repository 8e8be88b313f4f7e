"""Fully connected classifiers: :func:`mlp` and the paper's topologies A1-A3 (Section 5.1)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from sopkit.models.checks import check_input_shape, check_num_classes, positive_int

__all__ = ["mlp", "mlp_a1", "mlp_a2", "mlp_a3"]


def mlp(
    input_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int] = (100,)
) -> nn.Sequential:
    """A fully connected classifier: Flatten, then Linear + ReLU per hidden width, Linear head.

    It is a plain ``nn.Sequential`` on purpose: code that rewrites hidden layers (e.g. the
    majority-kernel expansion) finds the hidden ``nn.Linear`` modules in order by iterating it.
    """
    in_features = math.prod(check_input_shape(input_shape))
    num_classes = check_num_classes(num_classes)
    widths = [positive_int("mlp", "hidden", w) for w in hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for width in widths:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


def mlp_a1(*, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Topology A1: one hidden layer of 100 units."""
    return mlp(input_shape, num_classes, hidden=(100,))


def mlp_a2(*, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Topology A2: hidden layers of 200 and 100 units."""
    return mlp(input_shape, num_classes, hidden=(200, 100))


def mlp_a3(*, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Topology A3: hidden layers of 400, 200 and 100 units."""
    return mlp(input_shape, num_classes, hidden=(400, 200, 100))
