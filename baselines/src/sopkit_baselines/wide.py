"""THE TRULY OVERPARAMETERIZED MODEL: what majority kernels simulate, built for real. Every hidden
layer is ``e`` times wider and the model trains plainly; it is shipped as trained, so it carries
(about) ``e`` times the parameters: the honest ceiling beside the ensemble.

The wide model is built in ``prepare`` from the plain model's layout, with fresh weights drawn as
``nn.Linear`` draws them (from torch's generator, which the loop seeds with the run's seed). It can
widen an MLP: an ``nn.Sequential`` of ``nn.Linear`` layers and parameter-free modules between them
(``mlp-a1``, ``mlp-a2``, ``mlp-a3``, or a user's ``sopkit.models.mlp``). The input and output sizes
stay; a layer between two hidden layers grows ``e^2`` times, the first and last ``e`` times, so
the exact count is :func:`widened_parameter_count`, not ``e`` times the plain one.
"""

from __future__ import annotations

import copy

from torch import nn

from sopkit.errors import UserError
from sopkit.training.strategy import Strategy
from sopkit.training.types import RunContext

__all__ = ["MAX_PARAMETERS", "Wide", "widen", "widened_parameter_count"]

#: The largest wide model built (2^32 parameters: 16 GiB in float32, before optimizer state).
MAX_PARAMETERS = 2**32


def _linear_layers(model: nn.Module) -> list[nn.Linear]:
    """The Linear layers of an MLP ``model`` in order, or a UserError saying why it is not one."""
    why = _not_an_mlp(model)
    if why:
        raise UserError(
            f"Strategy wide cannot widen a {type(model).__name__}: {why}. It widens the hidden "
            "layers of an MLP (mlp-a1, mlp-a2, mlp-a3, or an nn.Sequential of nn.Linear layers "
            "with parameter-free modules between them); for another model, train `baseline` on a "
            "wider configuration of it instead."
        )
    return [m for m in model.children() if isinstance(m, nn.Linear)]


def _not_an_mlp(model: nn.Module) -> str:
    if type(model) is not nn.Sequential:
        return "it is not an nn.Sequential"
    for module in model.children():
        if not isinstance(module, nn.Linear) and any(True for _ in module.parameters()):
            return f"it holds a {type(module).__name__} with parameters between its layers"
    linears = [m for m in model.children() if isinstance(m, nn.Linear)]
    if len(linears) < 2:
        return "it has no hidden layer (fewer than two nn.Linear layers)"
    for before, after in zip(linears, linears[1:], strict=False):
        if before.out_features != after.in_features:
            return "its Linear layers do not feed one another in order"
    return ""


def widen(model: nn.Module, expansion: int) -> nn.Sequential:
    """A new MLP like ``model`` with every hidden width ``expansion`` times larger, freshly
    initialised on ``model``'s device and dtype; ``model`` is untouched."""
    linears = _linear_layers(model)
    last = linears[-1]
    layers: list[nn.Module] = []
    in_features = linears[0].in_features
    for module in model.children():
        if not isinstance(module, nn.Linear):
            layers.append(copy.deepcopy(module))
            continue
        out = module.out_features if module is last else module.out_features * expansion
        weight = module.weight
        layers.append(
            nn.Linear(in_features, out, bias=module.bias is not None,
                      device=weight.device, dtype=weight.dtype)
        )
        in_features = out
    return nn.Sequential(*layers)


def widened_parameter_count(model: nn.Module, expansion: int) -> int:
    """The parameter count of ``widen(model, expansion)``, from the layer sizes alone."""
    linears = _linear_layers(model)
    total, in_features = 0, linears[0].in_features
    for layer in linears:
        out = layer.out_features if layer is linears[-1] else layer.out_features * expansion
        total += in_features * out + (out if layer.bias is not None else 0)
        in_features = out
    return total


class Wide(Strategy):
    """WIDE: the MLP with ``e`` times wider hidden layers, trained and shipped as it is."""

    description = "The truly overparameterized model: hidden layers e times wider, trained plainly."

    @property
    def inference_params_multiple(self) -> int:
        """About ``e`` (exactly: :meth:`expected_inference_params`)."""
        return self.expansion

    def expected_inference_params(self, plain: nn.Module) -> int:
        """The deployable model's parameter count for the plain model ``plain``."""
        return widened_parameter_count(plain, self.expansion)

    def prepare(self, model: nn.Module, run: RunContext) -> nn.Module:
        size = widened_parameter_count(model, self.expansion)
        if size > MAX_PARAMETERS:  # refused before a single tensor is allocated
            raise UserError(
                f"Strategy {self.name} with e={self.expansion} would have {size:.3g} parameters "
                f"(at most {MAX_PARAMETERS:.3g}); use a smaller --expansion."
            )
        return widen(model, self.expansion)
