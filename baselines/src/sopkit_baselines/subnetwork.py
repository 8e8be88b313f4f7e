"""The wide MLP of the subset baseline (:mod:`sopkit_baselines.subset`) and how a step trains only the
sub-network its chosen neurons form: gathering the sub-network and its optimizer state before the
step, scattering them back after it, and the first layer's similarities kept between steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sopkit import torch_private
from sopkit.errors import UserError
from sopkit_baselines.submodular import DEFAULT_NEIGHBOURS, greedy_select, inner_products

__all__ = ["ELEMENTWISE", "SubsetMLP", "check_mlp"]

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
class _Entries:
    """The entries of a wide parameter (or of an optimizer state tensor shaped like it) that the
    step's sub-network uses, and the copies between the wide tensor and the gathered block."""

    rows: torch.Tensor | None  # these rows (None: all) ...
    columns: torch.Tensor | None  # ... of these columns (None: all; weights only)
    # With both: the entries' positions in the flattened wide tensor, for the copy back. One flat
    # copy (through NumPy on the CPU) takes half the time of index_put_ with broadcast row and
    # column indices. (Gathering, a flat index_select is no faster than rows, then columns.)
    positions: torch.Tensor | None

    @classmethod
    def of(cls, rows: torch.Tensor | None, columns: torch.Tensor | None, width: int) -> _Entries:
        positions = None
        if rows is not None and columns is not None:
            positions = (rows[:, None] * width + columns[None, :]).reshape(-1)
        return cls(rows, columns, positions)

    def gather(self, wide: torch.Tensor) -> torch.Tensor:
        """``wide[rows][:, columns]``, a new tensor."""
        if self.rows is not None:
            wide = wide.index_select(0, self.rows)
        if self.columns is not None:
            wide = wide.index_select(1, self.columns)
        return wide

    def scatter(self, wide: torch.Tensor, block: torch.Tensor) -> None:
        """``wide[rows][:, columns] = block``, in place."""
        if self.positions is not None and wide.is_contiguous():
            _copy_rows(wide.view(-1), self.positions, block.reshape(-1))
        elif self.rows is not None and self.columns is not None:
            wide.index_put_((self.rows[:, None], self.columns[None, :]), block)
        elif self.rows is not None:
            _copy_rows(wide, self.rows, block)
        elif self.columns is not None:
            wide.index_copy_(1, self.columns, block)
        else:
            wide.copy_(block)


#: Dtypes NumPy has (bfloat16 is not among them).
_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)


def _copy_rows(target: torch.Tensor, index: torch.Tensor, source: torch.Tensor) -> None:
    """``target[index] = source`` (along dim 0, in place; ``index`` without repeats).

    On the CPU through NumPy, whose fancy assignment copies rows several times faster than
    ``index_copy_`` (BENCHMARKS.md); elsewhere torch's.
    """
    if target.device.type == "cpu" and target.dtype in _NUMPY_DTYPES:
        target.detach().numpy()[index.numpy()] = source.detach().numpy()
    else:
        target.index_copy_(0, index, source)


def _normalise_rows_(rows: torch.Tensor) -> torch.Tensor:
    """Divide every row of ``rows`` by its norm in place, and return the norms.

    Bit for bit ``F.normalize(rows, dim=1)`` (the same norm, clamped at the same eps, the same
    division) without its new tensor; the norms are those ``rows.norm(dim=1)`` gives.
    """
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    rows.div_(norms.clamp_min(1e-12))
    return norms.squeeze(1)


@dataclass
class _Swapped:
    """One parameter while a step trains only its sub-network's entries (see ``enter_step``)."""

    parameter: torch.Tensor  # an nn.Parameter (typed as the Tensor nn.Linear declares)
    full: torch.Tensor  # the wide tensor, put back in ``leave_step``
    entries: _Entries  # the entries in use
    state: dict[str, torch.Tensor]  # the wide optimizer state tensors the step started with


@dataclass
class _Similarities:
    """The cosine similarities of the first layer's rows, and which weights they are of."""

    # (data_ptr, version counter) of the weight they were computed for (torch_private.tensor_version)
    key: tuple[int, int]
    unit: torch.Tensor  # the unit rows
    norms: torch.Tensor  # the rows' norms (the greedy's utilities)
    matrix: torch.Tensor  # their similarities (diagonal -inf)
    stale: torch.Tensor | None  # rows that changed since (written by ``leave_step``)
    # By number of changed rows: whether updating only their rows and columns was checked to give
    # the full recomputation's matrix bit for bit (True), or not (False: recompute all).
    exact_update: dict[int, bool] = field(default_factory=dict)


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
        self._swapped: list[_Swapped] = []  # non-empty while a step trains the sub-network
        self._similarities: _Similarities | None = None
        self._entered_with: tuple[int, int] | None = None  # the first weight's key at enter_step

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
        if self._swapped:  # within a step the parameters hold the sub-network itself
            for module in self.layers:
                x = module(x)
            return x
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
        if self._swapped:
            raise RuntimeError("choose() within a step: the parameters hold the sub-network")
        chosen: list[torch.Tensor] = []
        columns: torch.Tensor | None = None
        for layer, m in zip(self.linears, self.widths, strict=False):
            similarity: torch.Tensor | None = None
            norms: torch.Tensor | None = None
            if columns is None:
                rows = layer.weight
                similarity, norms = self._first_similarities()
            else:
                rows = layer.weight.index_select(1, columns)
            picked = greedy_select(rows, m, neighbours=neighbours, alpha=alpha, beta=beta,
                                   similarity=similarity, norms=norms)
            columns = picked.to(rows.device).sort().values
            chosen.append(columns)
        return chosen

    def _first_similarities(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cosine similarities of the first layer's rows, and their norms, kept between steps.

        The first layer's rows are whole rows (no column restriction), and a step changes only the
        chosen ones (``leave_step`` writes just those back), so only their rows and columns of the
        matrix are recomputed: ``m`` of ``e * m`` rows, a third of the matmul for ``e = 3``. A
        recomputed entry is the same dot product of the same unit rows as in a full recomputation,
        so the matrix equals the one a fresh :func:`cosine_similarities` gives, bit for bit when
        the matmul rounds a block of rows as it rounds the whole. oneDNN's, which
        :func:`inner_products` uses for float32 on the CPU, does (tested with 1 to 300 of 900 rows
        of 64 and 3072 entries, with oneDNN's AVX2 and AVX-512 code); MKL's, which float64 takes,
        rounds blocks of some sizes differently, by an ulp, and so does oneDNN's code for CPUs
        without AVX2. The selection must not depend on that (a run resumed without this cache must
        choose what the uninterrupted run chose), so the first update with a given number of rows
        is checked against a full recomputation; where they differ, the matrix is recomputed whole
        from then on.
        Any other change of the weight (a new tensor, an in-place write through the parameter, so
        ``load_state_dict`` too) changes its ``(data_ptr, _version)`` and recomputes everything.
        """
        weight = self.linears[0].weight.detach()
        key = (weight.data_ptr(), torch_private.tensor_version(self.linears[0].weight))
        cache = self._similarities
        if cache is None or cache.key != key or cache.matrix.shape[0] != weight.shape[0]:
            unit = weight.clone()
            norms = _normalise_rows_(unit)
            self._similarities = _Similarities(key, unit, norms, inner_products(unit, unit), None)
            return self._similarities.matrix, norms
        if cache.stale is not None:
            rows, n = cache.stale, weight.shape[0]
            fresh = weight.index_select(0, rows)
            _copy_rows(cache.norms, rows, _normalise_rows_(fresh))
            _copy_rows(cache.unit, rows, fresh)
            exact = cache.exact_update.get(len(rows))
            if exact is not False:
                block = inner_products(fresh, cache.unit)
                _copy_rows(cache.matrix, rows, block)
                cache.matrix.index_copy_(1, rows, block.T)
                cache.matrix.view(-1).index_fill_(0, rows * (n + 1), -torch.inf)
            if exact is not True:  # not checked yet for this many rows, or inexact
                whole = inner_products(cache.unit, cache.unit).fill_diagonal_(-torch.inf)
                if exact is None:
                    cache.exact_update[len(rows)] = torch.equal(whole, cache.matrix)
                cache.matrix = whole
            cache.stale = None
        return cache.matrix, cache.norms

    def select(self, **options: float) -> None:
        """Choose the neurons the next steps use (see :meth:`choose` for the options)."""
        self.selected = self.choose(**options)  # type: ignore[arg-type]

    # ---- training only the chosen neurons in a step ------------------------------------------------
    def _used(self) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
        """Every parameter of the wide network, with the rows and columns the sub-network uses."""
        used: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
        hidden = len(self.widths)
        for index, layer in enumerate(self.linears):
            rows = self.selected[index] if index < hidden else None
            columns = self.selected[index - 1] if index > 0 else None
            used.append((layer.weight, rows, columns))
            if layer.bias is not None:
                used.append((layer.bias, rows, None))
        return used

    @torch.no_grad()
    def enter_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Make every parameter, and its optimizer state, hold only the sub-network's entries.

        Until :meth:`leave_step`, each parameter's ``.data`` is the gathered block of the current
        selection (the chosen rows, and of them the columns of the previous layer's chosen
        neurons), and so is every parameter-shaped optimizer state tensor. Forward, backward and
        the optimizer step then run on the sub-network alone: the baseline's work, not ``e`` (or
        ``e^2``) times it, and nothing outside the sub-network can change, not through a zero
        gradient, weight decay or momentum ("lazy" optimizer state, as in sparse Adam). The
        optimizers are element-wise, so each entry is updated exactly as in the wide tensor.
        """
        if self._swapped:
            raise RuntimeError("enter_step() twice without leave_step()")
        first = self.linears[0].weight
        key = (first.data_ptr(), torch_private.tensor_version(first))
        self._entered_with = key
        for parameter, rows, columns in self._used():
            if rows is None and columns is None:
                continue  # the output layer's bias: wholly in the sub-network
            full = parameter.data
            entries = _Entries.of(rows, columns, full.shape[-1])
            state = optimizer.state.get(parameter, {}) if optimizer is not None else {}
            shaped = _shaped_like(state, full, copy=False)
            self._swapped.append(_Swapped(parameter, full, entries, shaped))
            parameter.data = entries.gather(full)
            for name, value in shaped.items():
                state[name] = entries.gather(value)

    @torch.no_grad()
    def leave_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Write the step's sub-network entries (and optimizer state) back into the wide tensors."""
        for swapped in self._swapped:
            parameter, entries = swapped.parameter, swapped.entries
            block = parameter.data
            entries.scatter(swapped.full, block)
            parameter.data = swapped.full
            parameter.grad = None  # of the sub-network's shape; the step has used it
            state = optimizer.state.get(parameter) if optimizer is not None else None
            if state is None:
                continue
            for name, value in list(state.items()):
                if not isinstance(value, torch.Tensor) or value.shape != block.shape:
                    continue
                wide = swapped.state.get(name)
                if wide is None:
                    # State the optimizer created in this step did not exist before: it was zero.
                    wide = value.new_zeros(swapped.full.shape)
                entries.scatter(wide, value)
                state[name] = wide
        self._swapped = []
        first = self.linears[0].weight
        cache = self._similarities
        if cache is not None and cache.key == self._entered_with:
            # The step changed the chosen rows of the first layer and nothing else in it.
            stale = self.selected[0]
            cache.stale = stale if cache.stale is None else torch.cat([cache.stale, stale]).unique()
            cache.key = (first.data_ptr(), torch_private.tensor_version(first))

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
