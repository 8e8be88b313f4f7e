"""Tests for sopkit.data: the data set registry, load_dataset's checks, the offline sets (mnist1d,
digits) and the cache of generated data.

The splits themselves are tested in test_data_splits.py, the torchvision-backed sets and their
on-disk formats in test_data_vision.py. Nothing here touches the network.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sopkit.data import DATASETS, TensorSplit, dataset_spec, load_dataset
from sopkit.data.cache import ArrayCache
from sopkit.errors import UserError

GLUE = [f"glue:{task}" for task in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")]
ALL_NAMES = [
    "mnist1d", "digits", "mnist", "fashion-mnist", "cifar10", "imagefolder", "imagenet", *GLUE
]
FILE_BACKED = ["mnist", "fashion-mnist", "cifar10", "imagefolder", "imagenet"]


def _rows(x: torch.Tensor) -> set[tuple[float, ...]]:
    """The examples of a split as a set of flat tuples, for disjointness checks."""
    return {tuple(row) for row in x.reshape(len(x), -1).tolist()}


def _tensors(split: object) -> TensorSplit:
    assert isinstance(split, TensorSplit)
    return split


# --------------------------------------------------------------------------------------------------
# Registry and argument checking
# --------------------------------------------------------------------------------------------------


def test_registry_names_order_flags_and_default_epochs() -> None:
    assert list(DATASETS) == ALL_NAMES
    for name, spec in DATASETS.items():
        assert spec.name == name
        assert spec.description
        assert spec.needs_data_dir == (name in FILE_BACKED)
    # `sopkit compare` trains this long when --epochs is not given.
    epochs = {name: spec.default_epochs for name, spec in DATASETS.items()}
    assert epochs == {"mnist1d": 200, "digits": 100, "imagenet": 90} | {
        name: 30 for name in FILE_BACKED if name != "imagenet"
    } | dict.fromkeys(GLUE, 3)  # fine-tuning a pretrained model (tests/test_glue.py)
    # ... and with the standard augmentation of every image set, none for the vector sets.
    augment = {name: spec.default_augment for name, spec in DATASETS.items()}
    assert augment == {"mnist1d": "none", "digits": "none"} | {
        n: "standard" for n in FILE_BACKED
    } | dict.fromkeys(GLUE, "none")


@pytest.mark.parametrize(
    ("typed", "name"),
    [("digits", "digits"), (" Digits ", "digits"), ("Fashion_MNIST", "fashion-mnist")],
)
def test_dataset_spec_forgives_case_spaces_and_underscores(typed: str, name: str) -> None:
    assert dataset_spec(typed) is DATASETS[name]


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(UserError) as info:
        load_dataset("cifar11")
    message = str(info.value)
    assert "Unknown dataset 'cifar11'" in message
    for name in ALL_NAMES:
        assert name in message


def test_non_string_name_is_a_user_error() -> None:
    with pytest.raises(UserError, match="must be a string, got None"):
        load_dataset(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, 1, 0.0, 1.0, -0.1, 1.5, math.nan, True, "0.1", None])
def test_val_fraction_must_be_strictly_between_0_and_1(bad: object) -> None:
    with pytest.raises(UserError, match="val_fraction"):
        load_dataset("digits", val_fraction=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("option", "bad"),
    [("num_workers", -1), ("num_workers", 1.5), ("split_seed", -1), ("image_size", 0)],
)
def test_other_bad_options_are_user_errors(option: str, bad: object) -> None:
    with pytest.raises(UserError, match=option):
        load_dataset("digits", **{option: bad})  # type: ignore[arg-type]


def test_import_is_cheap_and_splits_import_no_training_code() -> None:
    # torchvision, scikit-learn and mnist1d each cost seconds; only the loader that needs one may
    # import it. The training types import sopkit.data.splits, so it must not import them back
    # (that would be a cycle). A fresh interpreter is the only honest way to see what an import
    # pulls in.
    code = (
        "import sys, sopkit.data, sopkit.data.splits\n"
        "heavy = [m for m in ('torchvision', 'sklearn', 'mnist1d', 'matplotlib') if m in sys.modules]\n"
        "training = [m for m in sys.modules if m.startswith(('sopkit.train', 'sopkit.strateg'))]\n"
        "print(','.join(heavy + training))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == ""


# --------------------------------------------------------------------------------------------------
# The cache of generated data
# --------------------------------------------------------------------------------------------------


def test_array_cache_makes_once_per_recipe(tmp_path: Path) -> None:
    cache = ArrayCache(tmp_path / "cache")  # created on the first write
    calls: list[int] = []

    def make(value: int) -> dict[str, np.ndarray]:
        calls.append(value)
        return {"a": np.full(3, value, dtype=np.int64)}

    first = cache.get_or_make("toy", {"seed": 1}, ["a"], lambda: make(1))
    again = cache.get_or_make("toy", {"seed": 1}, ["a"], lambda: make(99))
    other = cache.get_or_make("toy", {"seed": 2}, ["a"], lambda: make(2))
    assert calls == [1, 2]  # the second request for seed 1 was served from disk
    assert again["a"].tolist() == first["a"].tolist() == [1, 1, 1]
    assert other["a"].tolist() == [2, 2, 2]
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert names == sorted(p.name for p in (cache.path("toy", {"seed": s}) for s in (1, 2)))
    assert all(name.startswith("toy-") and len(name) == len("toy-") + 16 + 4 for name in names)


# --------------------------------------------------------------------------------------------------
# mnist1d
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def small_mnist1d_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default mnist1d recipe with 500 samples instead of 5000: same code path, faster."""
    from mnist1d import data as mnist1d_data
    from mnist1d.utils import ObjectView

    original = mnist1d_data.get_dataset_args

    def small(as_dict: bool = False) -> object:
        args = dict(original(as_dict=True))
        args["num_samples"] = 500
        return args if as_dict else ObjectView(args)

    monkeypatch.setattr(mnist1d_data, "get_dataset_args", small)


def test_mnist1d_loads_the_same_data_and_second_load_reads_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_dataset("mnist1d", cache_dir=tmp_path)
    assert first.name == "mnist1d"
    assert first.input_shape == (40,)
    assert first.num_classes == 10
    train, val, test = (_tensors(s) for s in (first.train, first.val, first.test))
    # The package's default recipe: 5000 signals, 80% train, of which we carve 10% as val.
    assert (len(train), len(val), len(test)) == (3600, 400, 1000)
    assert train.x.shape == (3600, 40) and train.x.dtype == torch.float32
    assert train.y.dtype == torch.int64
    # Golden values: the same seed gives the same examples in the same order.
    assert train.y[:12].tolist() == [2, 0, 9, 0, 2, 5, 2, 2, 0, 4, 9, 8]
    assert val.y[:12].tolist() == [1, 5, 3, 6, 9, 2, 4, 9, 4, 2, 6, 2]
    assert test.y[:12].tolist() == [2, 6, 3, 9, 4, 3, 1, 9, 5, 2, 0, 7]
    expected = [
        [-0.881588, -0.262552, 0.277077, -0.066583],
        [-0.777364, -0.983338, -0.943739, -0.928738],
        [-0.091370, -0.217770, -0.096093, 0.264520],
    ]
    for split, row in zip((train, val, test), expected, strict=True):
        assert split.x[0, :4].tolist() == pytest.approx(row, abs=1e-5)
    # Features standardised with train statistics.
    assert torch.allclose(train.x.mean(0), torch.zeros(40), atol=1e-4)
    assert torch.allclose(train.x.std(0, correction=0), torch.ones(40), atol=1e-4)

    cached = list(tmp_path.iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".npz"  # no temporary file left behind

    from mnist1d import data as mnist1d_data

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the second load regenerated mnist1d instead of reading the cache")

    monkeypatch.setattr(mnist1d_data, "make_dataset", must_not_run)
    second = load_dataset("mnist1d", cache_dir=tmp_path)
    for a, b in ((first.train, second.train), (first.val, second.val), (first.test, second.test)):
        assert torch.equal(_tensors(a).x, _tensors(b).x) and torch.equal(
            _tensors(a).y, _tensors(b).y
        )


def test_mnist1d_default_cache_dir_follows_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_mnist1d_recipe: None
) -> None:
    monkeypatch.setenv("SOPKIT_CACHE_DIR", str(tmp_path / "explicit"))
    load_dataset("mnist1d")
    assert len(list((tmp_path / "explicit").glob("mnist1d-*.npz"))) == 1

    monkeypatch.delenv("SOPKIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_dataset("mnist1d")
    assert len(list((tmp_path / "xdg" / "sopkit").glob("mnist1d-*.npz"))) == 1


def test_mnist1d_changed_recipe_does_not_reuse_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_mnist1d_recipe: None
) -> None:
    small = load_dataset("mnist1d", cache_dir=tmp_path)
    assert len(small.train) + len(small.val) + len(small.test) == 500

    from mnist1d import data as mnist1d_data

    original = mnist1d_data.get_dataset_args  # the 500-sample recipe from the fixture

    def other_seed(as_dict: bool = False) -> object:
        args = original()
        args.seed = 7
        return args

    monkeypatch.setattr(mnist1d_data, "get_dataset_args", other_seed)
    reseeded = load_dataset("mnist1d", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 2
    assert not torch.equal(_tensors(small.test).x, _tensors(reseeded.test).x)


def test_mnist1d_corrupt_cache_is_rebuilt(tmp_path: Path, small_mnist1d_recipe: None) -> None:
    good = load_dataset("mnist1d", cache_dir=tmp_path)
    (path,) = tmp_path.glob("mnist1d-*.npz")
    path.write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="unreadable cache"):
        again = load_dataset("mnist1d", cache_dir=tmp_path)
    assert torch.equal(_tensors(good.test).x, _tensors(again.test).x)
    with np.load(path) as archive:  # rewritten, readable again
        assert archive["x"].shape[1] == 40


def test_mnist1d_generation_leaves_global_rngs_alone(
    tmp_path: Path, small_mnist1d_recipe: None
) -> None:
    import random

    np.random.seed(123)
    random.seed(123)
    expected = (np.random.rand(), random.random())
    np.random.seed(123)
    random.seed(123)
    load_dataset("mnist1d", cache_dir=tmp_path)  # empty cache: really generates
    assert (np.random.rand(), random.random()) == expected


def test_mnist1d_unwritable_cache_warns_and_still_loads(
    tmp_path: Path, small_mnist1d_recipe: None
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    with pytest.warns(UserWarning, match="Could not write the mnist1d cache"):
        splits = load_dataset("mnist1d", cache_dir=blocker / "cache")
    assert splits.input_shape == (40,)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 500


# --------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------


def test_digits_sizes_and_disjoint_splits() -> None:
    splits = load_dataset("digits")
    assert splits.input_shape == (64,) and splits.num_classes == 10
    train, val, test = (_tensors(s) for s in (splits.train, splits.val, splits.test))
    assert (len(train), len(val), len(test)) == (1293, 144, 360)  # 20% test, 10% of the rest val
    # Stratified test set: each class's share of the 360 follows its share of the 1,797.
    assert torch.bincount(test.y, minlength=10).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    # The same standardisation is applied to all splits, so equal raw rows stay equal.
    train_rows = _rows(train.x)
    assert len(train_rows) == len(train)
    assert train_rows.isdisjoint(_rows(val.x))
    assert train_rows.isdisjoint(_rows(test.x))
    assert _rows(val.x).isdisjoint(_rows(test.x))


def test_digits_golden_values() -> None:
    """The same split_seed gives the same examples, in the same order, with the same values."""
    splits = load_dataset("digits")
    train, val, test = (_tensors(s) for s in (splits.train, splits.val, splits.test))
    assert train.y[:12].tolist() == [8, 1, 5, 3, 7, 8, 7, 1, 4, 5, 2, 5]
    assert val.y[:12].tolist() == [8, 3, 2, 9, 2, 2, 3, 9, 5, 1, 8, 8]
    assert test.y[:12].tolist() == [7, 6, 3, 7, 7, 3, 2, 8, 9, 3, 2, 6]
    expected = {
        "train": [0.920123, 0.347895, 0.139951, 1.168893, 0.058540, -0.115479],
        "val": [1.095598, 0.347895, 1.432500, 0.684529, -0.246670, -0.115479],
        "test": [0.744648, -0.675605, -1.152598, 1.330348, 0.668958, -0.115479],
    }
    for split, name in ((train, "train"), (val, "val"), (test, "test")):
        assert split.x[0, 18:24].tolist() == pytest.approx(expected[name], abs=1e-5)
    other = _tensors(load_dataset("digits", split_seed=3, val_fraction=0.25).val)
    assert other.y[:12].tolist() == [9, 3, 9, 9, 1, 8, 5, 5, 5, 9, 0, 2]


def test_digits_split_seed_moves_val_but_never_test() -> None:
    a = load_dataset("digits", split_seed=0)
    b = load_dataset("digits", split_seed=0)
    c = load_dataset("digits", split_seed=1)
    assert torch.equal(_tensors(a.val).x, _tensors(b.val).x)
    assert torch.equal(_tensors(a.train).y, _tensors(b.train).y)
    assert _rows(_tensors(a.val).x) != _rows(_tensors(c.val).x)
    # The test set is fixed; it does not depend on split_seed (only its standardisation, which
    # uses the train part, may shift slightly), so compare labels and order.
    assert torch.equal(_tensors(a.test).y, _tensors(c.test).y)


def test_digits_val_fraction_is_respected() -> None:
    splits = load_dataset("Digits", val_fraction=0.25)  # names are case-insensitive
    assert (len(splits.train), len(splits.val)) == (1078, 359)  # 359 = round(0.25 * 1437)
