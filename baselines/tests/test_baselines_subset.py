"""The subset-selection strategy (paper Algorithm D.1): the wide MLP, the one-step-on-the-chosen-rows
rule (optimizer state included), and the compact network it ships."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from baselines_helpers import settings, tiny_data, tiny_model
from sopkit_baselines.submodular import cosine_similarities
from sopkit_baselines.subnetwork import SubsetMLP, _Entries, _normalise_rows_
from sopkit_baselines.subset import SubsetSelection
from torch import nn

from sopkit.errors import UserError
from sopkit.mk import count_parameters
from sopkit.models import build_model, mlp
from sopkit.training.optim import make_optimizer
from sopkit.training.types import RunContext, TrainConfig


def _run(config: TrainConfig, seed: int = 0) -> RunContext:
    data = tiny_data()
    return RunContext(seed, config, torch.device("cpu"), data,
                      torch.Generator().manual_seed(seed), steps_per_epoch=4)


def _frozen_masks(model: SubsetMLP) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every parameter with entries outside the current sub-network, and a mask of them (shaped
    like the wide tensor, also while a step has the sub-network swapped in)."""
    wide = {id(swapped.parameter): swapped.full for swapped in model._swapped}
    masks: list[tuple[torch.Tensor, torch.Tensor]] = []
    for parameter, rows, columns in model._used():
        if rows is None and columns is None:
            continue
        shape = wide.get(id(parameter), parameter).shape
        mask = torch.ones(shape, dtype=torch.bool, device=parameter.device)
        if rows is not None and columns is not None:
            mask[rows[:, None], columns[None, :]] = False
        elif rows is not None:
            mask[rows] = False
        else:
            mask[:, columns] = False
        masks.append((parameter, mask))
    return masks


def _train_step(
    strategy: SubsetSelection,
    model: nn.Module,
    run: RunContext,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
) -> None:
    """The loop's step after ``before_step`` (``TrainingState.step``; tests check the selection in
    between)."""
    loss = strategy.loss(model, x, y, run)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    strategy.after_backward(model, run)
    optimizer.step()
    strategy.after_step(model, run)


def test_the_wide_model_holds_e_times_the_neurons_and_starts_as_the_baseline() -> None:
    torch.manual_seed(0)
    base = tiny_model()  # 12 -> 16 -> 8 -> 4
    wide = SubsetSelection(settings("subset")).prepare(base, _run(TrainConfig()))
    assert isinstance(wide, SubsetMLP)
    shapes = [tuple(m.weight.shape) for m in wide.linears]
    assert shapes == [(48, 12), (24, 48), (4, 24)]
    # Group 0 is the baseline's own neurons: with it selected, the wide model is the baseline.
    x = torch.randn(5, 12)
    wide.selected = [torch.arange(16), torch.arange(8)]
    torch.testing.assert_close(wide(x), base(x))
    # The other groups are fresh draws, not copies.
    assert not torch.equal(wide.linears[0].weight[16:32], wide.linears[0].weight[:16])


def test_the_compact_network_is_the_baseline_architecture_and_computes_the_selection() -> None:
    base = tiny_model()
    strategy = SubsetSelection(settings("subset"))
    run = _run(TrainConfig())
    wide = strategy.prepare(base, run)
    assert isinstance(wide, SubsetMLP)
    wide.select()
    compact = wide.compact()
    assert [type(m) for m in compact] == [type(m) for m in base]
    assert {k: v.shape for k, v in compact.state_dict().items()} == {
        k: v.shape for k, v in base.state_dict().items()
    }
    assert count_parameters(compact) == count_parameters(base)
    x = torch.randn(7, 12)
    torch.testing.assert_close(compact(x), wide(x))
    # The deployable selects once more, on the current weights.
    deployed = strategy.deployable(wide, run)
    torch.testing.assert_close(deployed(x), wide.compact(wide.choose())(x))


# Adam and SGD with momentum, both with weight decay: every way an optimizer could move an entry
# that has no gradient.
OPTIMIZERS = pytest.mark.parametrize(
    "config",
    [
        TrainConfig(optimizer="adam", lr=0.05, weight_decay=0.1),
        TrainConfig(optimizer="sgd", lr=0.5, momentum=0.9, weight_decay=0.1),
    ],
    ids=["adam", "sgd-momentum"],
)


@OPTIMIZERS
def test_unchosen_neurons_do_not_change_in_a_step_not_even_through_optimizer_state(
    config: TrainConfig,
) -> None:
    torch.manual_seed(1)
    strategy = SubsetSelection(settings("subset"))
    run = _run(config)
    model = strategy.prepare(tiny_model(), run)
    assert isinstance(model, SubsetMLP)
    optimizer = make_optimizer(model, config)
    run.optimizer = optimizer
    generator = torch.Generator().manual_seed(2)
    first = model.linears[0]
    reselected_with_momentum = 0
    seen: set[int] = set()
    for _ in range(8):
        x = torch.randn(32, 12, generator=generator)
        y = torch.randint(0, 4, (32,), generator=generator)
        # The wide tensors and state before the step (before_step swaps the sub-network in).
        before = {p: p.detach().clone() for p in model.parameters()}
        wide_state = {
            p: {k: v.clone() for k, v in optimizer.state.get(p, {}).items() if v.shape == p.shape}
            for p in model.parameters()
        }
        strategy.before_step(model, run)
        masks = _frozen_masks(model)
        assert masks and all(p.shape != mask.shape for p, mask in masks)  # swapped in
        chosen = set(model.selected[0].tolist())
        reselected_with_momentum += len(seen - chosen)  # had state, now unchosen: the hard case
        seen |= chosen
        _train_step(strategy, model, run, optimizer, x, y)
        for parameter, mask in masks:
            old, old_state = before[parameter], wide_state[parameter]
            assert parameter.grad is None and parameter.shape == mask.shape  # swapped back
            assert torch.equal(parameter[mask], old[mask]), "an unchosen entry moved"
            assert not torch.equal(parameter[~mask], old[~mask]), "the chosen entries did not train"
            for key, value in optimizer.state[parameter].items():
                if value.shape == parameter.shape:
                    previous = old_state.get(key, torch.zeros_like(value))
                    assert torch.equal(value[mask], previous[mask]), f"{key} moved when unchosen"
        assert first.weight.shape == (48, 12)
    # Rows that had momentum were unchosen later: without the restore they would have moved.
    assert reselected_with_momentum > 0


def test_training_learns_and_counts_wide_training_and_baseline_inference_parameters(
    make_session,  # type: ignore[no-untyped-def]
) -> None:
    session = make_session(epochs=8, lr=0.03)
    result = session.train(SubsetSelection(settings("subset")))
    assert result.inference_params == count_parameters(tiny_model())
    assert result.train_params == 48 * 12 + 48 + 24 * 48 + 24 + 4 * 24 + 4
    assert result.test_accuracy > 0.6  # four classes: chance is 0.25 (the baseline gets 0.81)


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Linear(12, 4)),
        nn.Sequential(nn.Conv1d(1, 4, 3), nn.Flatten(), nn.Linear(40, 4)),
        nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)),
        build_model("cnn1d", input_shape=(40,), num_classes=10),
    ],
    ids=["no-hidden-layer", "conv", "batchnorm", "cnn1d"],
)
def test_models_other_than_mlps_are_a_user_error(model: nn.Module) -> None:
    with pytest.raises(UserError, match="supports MLPs"):
        SubsetSelection(settings("subset")).prepare(model, _run(TrainConfig()))


@pytest.mark.parametrize("options", [{"t": "0"}, {"alpha": "-1"}, {"beta": "nan"}, {"t": "x"}])
def test_bad_options_are_user_errors(options: dict[str, str]) -> None:
    with pytest.raises(UserError, match="subset"):
        SubsetSelection(settings("subset", **options))


def _old_step(model: SubsetMLP, optimizer: torch.optim.Optimizer, x: torch.Tensor,
              y: torch.Tensor) -> None:
    """The step as this strategy once took it: the wide forward, then a snapshot of the unchosen
    entries and their optimizer state before optimizer.step() and a restore after it."""
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    frozen = []
    for parameter, mask in _frozen_masks(model):
        state = optimizer.state.get(parameter, {})
        shaped = {k: v.clone() for k, v in state.items() if v.shape == parameter.shape}
        frozen.append((parameter, mask, parameter.detach().clone(), shaped))
    optimizer.step()
    with torch.no_grad():
        for parameter, mask, value, shaped in frozen:
            parameter.copy_(torch.where(mask, value, parameter))
            for key, tensor in optimizer.state[parameter].items():
                if tensor.shape == parameter.shape:
                    before = shaped.get(key)
                    tensor.copy_(torch.where(mask, before if before is not None else 0, tensor))


@OPTIMIZERS
def test_steps_on_the_gathered_sub_network_equal_the_wide_step_with_snapshot_and_restore(
    config: TrainConfig,
) -> None:
    strategy = SubsetSelection(settings("subset"))
    models = []
    for _ in range(2):
        torch.manual_seed(3)
        model = strategy.prepare(tiny_model(), _run(config))
        assert isinstance(model, SubsetMLP)
        models.append((model, make_optimizer(model, config)))
    (new, new_optimizer), (old, old_optimizer) = models
    run = _run(config)
    run.optimizer = new_optimizer
    generator = torch.Generator().manual_seed(4)
    for _ in range(10):
        x = torch.randn(32, 12, generator=generator)
        y = torch.randint(0, 4, (32,), generator=generator)
        strategy.before_step(new, run)
        old.selected = old.choose()
        assert all(torch.equal(a, b) for a, b in zip(new.selected, old.selected, strict=True))
        _train_step(strategy, new, run, new_optimizer, x, y)
        _old_step(old, old_optimizer, x, y)
        for p, q in zip(new.parameters(), old.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
            for key, value in old_optimizer.state[q].items():
                torch.testing.assert_close(new_optimizer.state[p][key], value, rtol=0, atol=0)


@pytest.mark.parametrize("inputs", [12, 3072])  # 3072: a CIFAR-sized row, blocked by the matmul
def test_the_kept_first_layer_similarities_are_those_of_the_current_weights(inputs: int) -> None:
    config = TrainConfig(optimizer="adam", lr=0.05)
    torch.manual_seed(5)
    strategy = SubsetSelection(settings("subset"))
    run = _run(config)
    model = strategy.prepare(mlp((inputs,), 4, hidden=(16, 8)), run)
    assert isinstance(model, SubsetMLP)
    run.optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(6)
    for step in range(6):
        model.choose()  # what before_step does first: uses (and updates) the kept similarities
        kept = model._similarities
        assert kept is not None
        unit = F.normalize(model.linears[0].weight.detach(), dim=1)
        fresh = cosine_similarities(model.linears[0].weight.detach()).fill_diagonal_(-torch.inf)
        assert torch.equal(kept.matrix, fresh), step
        assert torch.equal(kept.unit, unit), step
        assert torch.equal(kept.norms, model.linears[0].weight.detach().norm(dim=1)), step
        cached = model.choose()
        model._similarities = None  # forget: choose from scratch
        assert all(torch.equal(a, b) for a, b in zip(cached, model.choose(), strict=True))
        x = torch.randn(32, inputs, generator=generator)
        y = torch.randint(0, 4, (32,), generator=generator)
        strategy.before_step(model, run)
        _train_step(strategy, model, run, run.optimizer, x, y)
    # A change made outside the strategy's steps is noticed: the similarities are recomputed.
    with torch.no_grad():
        model.linears[0].weight[0].mul_(-1)
    model.choose()
    kept = model._similarities
    assert kept is not None
    fresh = cosine_similarities(model.linears[0].weight.detach()).fill_diagonal_(-torch.inf)
    assert torch.equal(kept.matrix, fresh)


@pytest.mark.parametrize("rounds_blocks_differently", [False, True])
def test_a_matmul_that_rounds_row_blocks_differently_is_caught_and_the_matrix_recomputed(
    rounds_blocks_differently: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a CPU where the matmul rounds a block of rows differently from the whole matrix (MKL's
    # float64; oneDNN without AVX2), updating only the changed rows would make the kept matrix,
    # and so the selection, depend on the cache's history. A stand-in for such a matmul: one ulp
    # off whenever it multiplies fewer rows than the whole.
    from sopkit_baselines import subnetwork

    exact = subnetwork.inner_products

    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        product = exact(a, b)
        if rounds_blocks_differently and a.shape[0] < b.shape[0]:
            product = torch.nextafter(product, torch.full_like(product, torch.inf))
        return product

    monkeypatch.setattr(subnetwork, "inner_products", matmul)
    torch.manual_seed(5)
    strategy = SubsetSelection(settings("subset"))
    run = _run(TrainConfig(optimizer="adam", lr=0.05))
    model = strategy.prepare(tiny_model(), run)
    assert isinstance(model, SubsetMLP)
    run.optimizer = make_optimizer(model, run.config)
    generator = torch.Generator().manual_seed(6)
    for _ in range(4):
        strategy.before_step(model, run)
        kept = model._similarities
        assert kept is not None
        fresh = exact(kept.unit, kept.unit).fill_diagonal_(-torch.inf)
        assert torch.equal(kept.matrix, fresh)
        x = torch.randn(32, 12, generator=generator)
        y = torch.randint(0, 4, (32,), generator=generator)
        _train_step(strategy, model, run, run.optimizer, x, y)
    assert kept.exact_update == {16: not rounds_blocks_differently}  # m = 16 rows change a step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("d", [1, 12, 37, 784])
def test_rows_normalised_in_place_are_bit_for_bit_f_normalize(dtype: torch.dtype, d: int) -> None:
    rows = torch.randn(50, d, generator=torch.Generator().manual_seed(d)).to(dtype)
    rows[3] = 0  # a zero row: the clamp of the norm decides
    expected, norms = F.normalize(rows, dim=1), rows.norm(dim=1)
    in_place = rows.clone()
    assert torch.equal(_normalise_rows_(in_place), norms)
    assert torch.equal(in_place, expected)
    # The norms of some rows are those of the same rows in the whole matrix (the cache keeps them).
    some = torch.tensor([0, 3, 17, 49])
    assert torch.equal(_normalise_rows_(rows[some].clone()), norms[some])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # through NumPy, and not
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize(
    ("rows", "columns"), [([5, 0, 2], [1, 6, 3]), ([4, 1], None), (None, [0, 7]), (None, None)]
)
def test_the_entries_of_a_step_are_gathered_and_scattered_like_plain_indexing(
    dtype: torch.dtype, contiguous: bool, rows: list[int] | None, columns: list[int] | None
) -> None:
    generator = torch.Generator().manual_seed(0)
    wide = torch.randn(6, 8, generator=generator).to(dtype)
    if not contiguous:
        wide = wide.T.contiguous().T  # the same values, column-major
    row_index = torch.tensor(rows) if rows is not None else torch.arange(6)
    column_index = torch.tensor(columns) if columns is not None else torch.arange(8)
    entries = _Entries.of(None if rows is None else row_index,
                          None if columns is None else column_index, wide.shape[1])
    expected = wide[row_index][:, column_index]
    assert torch.equal(entries.gather(wide), expected)
    block = torch.randn(expected.shape, generator=generator).to(dtype)
    scattered, reference = wide.clone(), wide.clone()
    entries.scatter(scattered, block)
    reference[row_index[:, None], column_index[None, :]] = block
    assert torch.equal(scattered, reference)
