"""SUBSET-BASELINE: submodular neuron-subset selection, paper Appendix D, Algorithm D.1.

Every hidden layer of an MLP holds ``e * m`` neurons instead of ``m`` (and the next layer as many
input columns). Before every step the strategy picks ``m`` neurons per hidden layer with the greedy
maximisation of the objective in :mod:`sopkit_baselines.submodular`, and the step trains only the
sub-network they form. At the end (and for every per-epoch evaluation) it selects once more and
returns that sub-network as an ordinary MLP: the baseline's architecture and parameter count.

Decisions, and why:

* **Which rows are compared.** Layers are selected in order, and the rows of layer ``r`` are its
  weights restricted to the input columns chosen for layer ``r - 1``, i.e. each neuron as it would
  act in this step's sub-network. (Whole rows would let weights on unused inputs decide.) Biases
  are not part of the rows, as in Appendix D where ``U`` holds the weights.
* **What "train one step on the chosen rows" means.** Unchosen rows of a hidden layer, their biases
  and the matching input columns of the next layer do not change in the step: not through their
  (zero) gradient, not through weight decay, and not through optimizer state. Adam's or SGD's
  momentum would otherwise keep moving a row that was chosen in an earlier step. The strategy
  snapshots those entries of the parameters and of every parameter-shaped optimizer state tensor
  before ``optimizer.step()`` and puts them back after it, so for them the step did not happen
  ("lazy" optimizer state, as in sparse Adam). Adam's step counter is per tensor and still
  advances, so a row's bias correction counts the layer's steps, not the row's.
* **A neuron's outgoing weights belong to it.** Algorithm D.1 writes ``W_r`` as ``n_r x m_r x e``
  (and ``v in R^m`` for one hidden layer): only the rows are expanded, and the chosen neurons would
  feed the next layer's ``m`` inputs by their rank in the selection, so a neuron's outgoing weights
  would change whenever the selection reorders. Here the next layer holds ``e * m`` input columns,
  one per neuron, and a step trains the chosen rows and their own columns. The price: a
  hidden-to-hidden matrix is ``e^2`` times the baseline's, which the train-parameter count shows.
* **Initialisation.** Neuron group 0 of every layer is the baseline model's own neurons (so the
  sub-network of group 0 is exactly the baseline at initialisation); every other group is a fresh
  draw from the same initialisation, taken as a random permutation of the baseline tensor's
  elements (as ``sopkit.expand`` draws independent copies). Input columns added to the next layer
  are drawn the same way, so every column keeps the fan-in scale of a width-``m`` layer.
* **Which models.** MLPs only, as in the paper ("impractical beyond simple architectures"): an
  ``nn.Sequential`` of ``nn.Linear`` layers with element-wise activations between them (what
  ``sopkit.models.mlp`` builds), optionally starting with ``nn.Flatten``.

Options: ``t`` (neighbours in the similarity graph, default 10), ``alpha`` and ``beta`` (the weights
of utility and redundancy in ``f``, default 1 and 1; ``f`` is monotone when ``alpha >= beta``).
Cost per step and layer: the ``(e*m) x (e*m)`` similarity matrix (``2 (e*m)^2 d`` flops) dominates;
the greedy is ``m`` vectorised updates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from sopkit.errors import UserError
from sopkit.strategy import Strategy, StrategySettings
from sopkit_baselines.submodular import DEFAULT_NEIGHBOURS, greedy_select

if TYPE_CHECKING:
    from sopkit.train import RunContext

__all__ = ["ELEMENTWISE", "SubsetMLP", "SubsetSelection", "check_mlp"]

#: Layers allowed between the Linear layers of a supported MLP: they act on each neuron separately,
#: so a subset of neurons passes through them unchanged.
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Dropout,
)


def check_mlp(model: nn.Module) -> list[nn.Linear]:
    """The Linear layers of ``model`` in order, or UserError when it is not a supported MLP."""
    problem = _mlp_problem(model)
    if problem is not None:
        raise UserError(
            f"The subset strategy supports MLPs only (an nn.Sequential of nn.Linear layers with "
            f"element-wise activations, optionally after nn.Flatten, as the mlp-* models are); "
            f"this model {problem}. Pick an mlp-* model, e.g. --model mlp-a2."
        )
    return [m for m in model.children() if isinstance(m, nn.Linear)]


def _mlp_problem(model: nn.Module) -> str | None:
    if not isinstance(model, nn.Sequential):
        return f"is a {type(model).__name__}"
    linears = 0
    for position, module in enumerate(model):
        if isinstance(module, nn.Linear):
            linears += 1
        elif isinstance(module, nn.Flatten) and position == 0:
            continue
        elif not isinstance(module, ELEMENTWISE):
            return f"contains a {type(module).__name__} at position {position}"
    if linears < 2:
        return "has no hidden layer"
    return None


def _draw_like(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """An independent draw from the (element-wise i.i.d.) distribution ``tensor`` was drawn from."""
    order = torch.randperm(tensor.numel(), generator=generator).to(tensor.device)
    return tensor.detach().reshape(-1)[order].view_as(tensor)


@dataclass
class _Frozen:
    """What one step must not change in one parameter: where (mask) and what it was before."""

    parameter: torch.Tensor
    mask: torch.Tensor  # True where the entry belongs to an unchosen row or column
    value: torch.Tensor
    state: dict[str, torch.Tensor]  # the parameter-shaped optimizer state before the step


class SubsetMLP(nn.Module):
    """An MLP whose hidden layers hold ``e * m`` neurons, of which the ``selected`` ``m`` are used.

    ``layers`` are the wide modules in order; ``widths`` the ``m`` of each hidden layer;
    ``selected[r]`` the neurons of hidden layer ``r`` that the forward pass uses (sorted indices).
    """

    def __init__(self, layers: Sequence[nn.Module], widths: Sequence[int], expansion: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.widths = list(widths)
        self.expansion = expansion
        self.linears = [m for m in self.layers if isinstance(m, nn.Linear)]
        # Until the first selection, group 0 (the baseline's own neurons) is active.
        self.selected: list[torch.Tensor] = [
            torch.arange(m, device=self.linears[0].weight.device) for m in self.widths
        ]
        self._frozen: list[_Frozen] = []

    @classmethod
    def widen(cls, model: nn.Sequential, expansion: int, generator: torch.Generator) -> SubsetMLP:
        """The wide version of ``model``: group 0 is ``model``'s neurons, the others fresh draws."""
        linears = check_mlp(model)
        widths = [layer.out_features for layer in linears[:-1]]
        wide: list[nn.Module] = []
        previous = 1  # how many groups the input columns of the current layer come in
        for module in model:
            if not isinstance(module, nn.Linear):
                wide.append(module)
                continue
            hidden = module is not linears[-1]
            groups = expansion if hidden else 1
            weight, bias = module.weight, module.bias
            new = nn.Linear(
                module.in_features * previous, module.out_features * groups, bias=bias is not None,
                device=weight.device, dtype=weight.dtype,
            )
            with torch.no_grad():
                blocks = [
                    [weight if (g, h) == (0, 0) else _draw_like(weight, generator)
                     for h in range(previous)]
                    for g in range(groups)
                ]
                new.weight.copy_(torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0))
                if bias is not None:
                    draws = [bias] + [_draw_like(bias, generator) for _ in range(groups - 1)]
                    new.bias.copy_(torch.cat(draws))
            wide.append(new)
            previous = groups
        return cls(wide, widths, expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        columns: torch.Tensor | None = None  # the input columns of the next Linear in use
        hidden = 0
        for module in self.layers:
            if not isinstance(module, nn.Linear):
                x = module(x)
                continue
            weight: torch.Tensor = module.weight
            bias: torch.Tensor | None = module.bias
            if hidden < len(self.widths):
                rows = self.selected[hidden]
                weight = weight.index_select(0, rows)
                bias = bias.index_select(0, rows) if bias is not None else None
                hidden += 1
            else:
                rows = None
            if columns is not None:
                weight = weight.index_select(1, columns)
            x = F.linear(x, weight, bias)
            columns = rows
        return x

    @torch.no_grad()
    def choose(
        self, *, neighbours: int = DEFAULT_NEIGHBOURS, alpha: float = 1.0, beta: float = 1.0
    ) -> list[torch.Tensor]:
        """The greedy selection for the current weights, layer by layer (sorted indices)."""
        chosen: list[torch.Tensor] = []
        columns: torch.Tensor | None = None
        for layer, m in zip(self.linears, self.widths, strict=False):
            rows = layer.weight if columns is None else layer.weight.index_select(1, columns)
            picked = greedy_select(rows, m, neighbours=neighbours, alpha=alpha, beta=beta)
            columns = picked.to(rows.device).sort().values
            chosen.append(columns)
        return chosen

    def select(self, **options: float) -> None:
        """Choose the neurons the next steps use (see :meth:`choose` for the options)."""
        self.selected = self.choose(**options)  # type: ignore[arg-type]

    # ---- keeping unchosen neurons out of a step ---------------------------------------------------
    def frozen_masks(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every parameter with entries outside the current sub-network, and a mask of them."""
        masks: list[tuple[torch.Tensor, torch.Tensor]] = []
        unused_columns: torch.Tensor | None = None
        for index, layer in enumerate(self.linears):
            weight = layer.weight
            row_mask = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
            if index < len(self.widths):
                row_mask.fill_(True)
                row_mask[self.selected[index]] = False
            mask = row_mask[:, None].expand_as(weight)
            if unused_columns is not None:
                mask = mask | unused_columns[None, :]
            masks.append((weight, mask))
            if layer.bias is not None and index < len(self.widths):
                masks.append((layer.bias, row_mask))
            unused_columns = row_mask if index < len(self.widths) else None
        return masks

    @torch.no_grad()
    def freeze_unselected(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Remember the entries of unchosen neurons, and their optimizer state, before a step."""
        self._frozen = []
        for parameter, mask in self.frozen_masks():
            state = optimizer.state.get(parameter, {}) if optimizer is not None else {}
            self._frozen.append(_Frozen(parameter, mask, parameter.detach().clone(),
                                        _shaped_like(state, parameter)))

    @torch.no_grad()
    def restore_unselected(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Undo what the step did to the entries remembered by :meth:`freeze_unselected`."""
        for frozen in self._frozen:
            parameter, mask = frozen.parameter, frozen.mask
            parameter.copy_(torch.where(mask, frozen.value, parameter))
            state = optimizer.state.get(parameter, {}) if optimizer is not None else {}
            for key, tensor in _shaped_like(state, parameter, copy=False).items():
                # State the optimizer created in this step did not exist before: it was zero.
                before = frozen.state.get(key)
                tensor.copy_(torch.where(mask, before if before is not None else 0, tensor))
        self._frozen = []

    # ---- the deployable network ------------------------------------------------------------------
    @torch.no_grad()
    def compact(self, selected: Sequence[torch.Tensor] | None = None) -> nn.Sequential:
        """The sub-network of ``selected`` (default: the current selection) as an ordinary MLP."""
        selected = list(self.selected if selected is None else selected)
        layers: list[nn.Module] = []
        columns: torch.Tensor | None = None
        hidden = 0
        for module in self.layers:
            if not isinstance(module, nn.Linear):
                layers.append(_copy_module(module))
                continue
            weight: torch.Tensor = module.weight
            bias: torch.Tensor | None = module.bias
            rows: torch.Tensor | None = None
            if hidden < len(self.widths):
                rows = selected[hidden]
                weight = weight.index_select(0, rows)
                bias = bias.index_select(0, rows) if bias is not None else None
                hidden += 1
            if columns is not None:
                weight = weight.index_select(1, columns)
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                               device=weight.device, dtype=weight.dtype)
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
            layers.append(linear)
            columns = rows
        return nn.Sequential(*layers)


def _shaped_like(
    state: dict[str, object], parameter: torch.Tensor, *, copy: bool = True
) -> dict[str, torch.Tensor]:
    """The optimizer state tensors of ``parameter`` that hold one value per entry of it."""
    return {
        key: (value.detach().clone() if copy else value)
        for key, value in state.items()
        if isinstance(value, torch.Tensor) and value.shape == parameter.shape
    }


def _copy_module(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


class SubsetSelection(Strategy):
    """SUBSET-BASELINE (paper Appendix D, Algorithm D.1) for MLPs."""

    description = "Submodular subset selection (App. D): e*m neurons per layer, m chosen per step."

    def __init__(self, settings: StrategySettings | None = None) -> None:
        super().__init__(settings)
        self.neighbours = self.settings.get("t", DEFAULT_NEIGHBOURS)
        self.alpha = self.settings.get("alpha", 1.0)
        self.beta = self.settings.get("beta", 1.0)
        if self.neighbours < 1:
            raise UserError(f"Option {self.name}.t must be at least 1, got {self.neighbours}.")
        for key, value in (("alpha", self.alpha), ("beta", self.beta)):
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"Option {self.name}.{key} must be a number >= 0, got {value}.")
        if self.expansion < 2:
            raise UserError(f"The subset strategy needs an expansion of at least 2, got "
                            f"{self.expansion}.")

    def _choose(self, model: SubsetMLP) -> list[torch.Tensor]:
        return model.choose(neighbours=self.neighbours, alpha=self.alpha, beta=self.beta)

    def prepare(self, model: nn.Module, run: RunContext) -> nn.Module:
        check_mlp(model)
        # The extra neurons are drawn from a generator of their own, seeded by the run's seed, so
        # the baseline's neurons (group 0) and the global random stream are those of the baseline.
        generator = torch.Generator().manual_seed(run.seed)
        return SubsetMLP.widen(model, self.expansion, generator)  # type: ignore[arg-type]

    def before_step(self, model: nn.Module, run: RunContext) -> None:
        assert isinstance(model, SubsetMLP)
        model.selected = self._choose(model)

    def after_backward(self, model: nn.Module, run: RunContext) -> None:
        assert isinstance(model, SubsetMLP)
        model.freeze_unselected(run.optimizer)

    def after_step(self, model: nn.Module, run: RunContext) -> None:
        assert isinstance(model, SubsetMLP)
        model.restore_unselected(run.optimizer)

    def evaluation_model(self, model: nn.Module, run: RunContext) -> nn.Module:
        # Evaluate what would be shipped at this point: a fresh selection, compacted.
        return self.deployable(model, run)

    def deployable(self, model: nn.Module, run: RunContext) -> nn.Module:
        assert isinstance(model, SubsetMLP)
        return model.compact(self._choose(model))
