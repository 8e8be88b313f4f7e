"""SUBSET-BASELINE: submodular neuron-subset selection, paper Appendix D, Algorithm D.1.

This module is the strategy and the decisions it makes; the wide network and the gathering and
scattering of a step's sub-network are in :mod:`sopkit_baselines.subnetwork`.

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
  momentum would otherwise keep moving a row that was chosen in an earlier step. So for the step
  the strategy owns the loop's step between its ``before_step`` and ``after_step`` hooks (the
  contract ``sopkit.training.strategy`` documents): from ``before_step``, which selects, to
  ``after_step``, every parameter's ``.data``, and every parameter-shaped
  optimizer state tensor, is the gathered block of the sub-network (``SubsetMLP.enter_step``);
  forward, backward and the optimizer step run on it, and ``after_step`` writes it back. For the
  unchosen entries the step did not happen ("lazy" optimizer state, as in sparse Adam); the chosen
  ones are updated exactly as in the wide tensors (the optimizers are element-wise; a test checks
  bit-for-bit equality with a wide step whose unchosen entries are snapshotted and restored, a
  simpler rule that costs several times as much). Adam's step counter is per tensor and
  still advances, so a row's bias correction counts the layer's steps, not the row's.
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

Cost per step. The selection's similarity matrices dominate: ``2 (e*m)^2 d`` flops for a hidden
layer, except the first, whose matrix (and whose rows' norms) are kept between steps: only the
``m`` rows and columns of the neurons the last step trained are recomputed (``2 m (e*m) d`` flops;
the same values as a full recomputation, bit for bit in float32 on the CPU, see
:meth:`sopkit_baselines.subnetwork.SubsetMLP._first_similarities`). The matmuls go through
:func:`~sopkit_baselines.submodular.inner_products` (oneDNN on the CPU, faster than torch's
float32 matmul on some processors). Then a top-``t`` per row, the graph, and the greedy's ``m``
vectorised updates. The training step itself costs what the baseline's does, plus gathering the
sub-network and its optimizer state and scattering them back (row copies through NumPy on the CPU,
see ``sopkit_baselines.subnetwork._copy_rows``). BENCHMARKS.md ("subset") measures the step and its parts. Computing each pair
of recomputed rows once by splitting the matmul into blocks would save a sixth of its flops but
round some entries differently from the full matrix, so it is not done.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sopkit.errors import UserError
from sopkit.training.settings import StrategySettings
from sopkit.training.strategy import Strategy
from sopkit.training.types import RunContext
from sopkit_baselines.submodular import DEFAULT_NEIGHBOURS
from sopkit_baselines.subnetwork import ELEMENTWISE, SubsetMLP, check_mlp

__all__ = ["ELEMENTWISE", "SubsetMLP", "SubsetSelection", "check_mlp"]


class SubsetSelection(Strategy):
    """SUBSET-BASELINE (paper Appendix D, Algorithm D.1) for MLPs."""

    description = "Submodular subset selection (App. D): e*m neurons per layer, m chosen per step."
    data_parallel = False  # swaps the sub-network's parameters in every step; DDP cannot follow

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

    def _choose(self, model: SubsetMLP) -> list[torch.Tensor]:
        return model.choose(neighbours=self.neighbours, alpha=self.alpha, beta=self.beta)

    def prepare(self, model: nn.Module, run: RunContext) -> nn.Module:
        check_mlp(model)
        # The extra neurons are drawn from a generator of their own, seeded by the run's seed, so
        # the baseline's neurons (group 0) and the global random stream are those of the baseline.
        generator = torch.Generator().manual_seed(run.seed)
        return SubsetMLP.widen(model, self.expansion, generator)  # type: ignore[arg-type]

    def before_step(self, model: nn.Module, run: RunContext) -> None:
        """Select this step's neurons and swap their sub-network (and its optimizer state) in: the
        loop's forward, backward and optimizer step until ``after_step`` train it alone."""
        assert isinstance(model, SubsetMLP)
        model.selected = self._choose(model)
        model.enter_step(run.optimizer)

    def after_step(self, model: nn.Module, run: RunContext) -> None:
        """Write the step's sub-network back into the wide tensors (``.grad`` left None)."""
        assert isinstance(model, SubsetMLP)
        model.leave_step(run.optimizer)

    def evaluation_model(self, model: nn.Module, run: RunContext) -> nn.Module:
        # Evaluate what would be shipped at this point: a fresh selection, compacted.
        return self.deployable(model, run)

    def deployable(self, model: nn.Module, run: RunContext) -> nn.Module:
        assert isinstance(model, SubsetMLP)
        return model.compact(self._choose(model))
