"""Tests for sopkit.data: the data set registry, the splits and the on-disk formats it reads.

Nothing here touches the network. The torchvision-backed sets are exercised with tiny files written
in their real on-disk formats (CIFAR-10 pickles, MNIST idx files, ImageFolder PNGs).
"""

from __future__ import annotations

import math
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

from sopkit.data import (
    DATASETS,
    DataSplits,
    LoaderSplit,
    Split,
    TensorSplit,
    available_datasets,
    load_dataset,
)
from sopkit.errors import UserError

ALL_NAMES = ["mnist1d", "digits", "mnist", "fashion-mnist", "cifar10", "imagefolder"]
FILE_BACKED = ["mnist", "fashion-mnist", "cifar10", "imagefolder"]


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _rows(x: torch.Tensor) -> set[tuple[float, ...]]:
    """The examples of a split as a set of flat tuples, for disjointness checks."""
    return {tuple(row) for row in x.reshape(len(x), -1).tolist()}


def _epoch(split: Split, batch_size: int, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*split.batches(batch_size, **kwargs), strict=True)  # type: ignore[arg-type]
    return torch.cat(xs), torch.cat(ys)


def _pixel(label: int, channel: int) -> int:
    """Raw uint8 value of every pixel of an image with this label (a function of label only)."""
    return 20 * label + 3 * channel + 5


MARK = (2, 5)  # (row, column) of one pixel that is one brighter: catches an H/W transposition


def _image(label: int, channels: int, side: int) -> np.ndarray:
    img = np.empty((channels, side, side), dtype=np.uint8)
    for c in range(channels):
        img[c] = _pixel(label, c)
        img[c][MARK] += 1
    return img


def _check_image_splits(
    splits: DataSplits,
    shape: tuple[int, int, int],
    train_labels: list[int],
    test_labels: list[int],
) -> None:
    """Shapes, label round-trip, image/label pairing and train-statistics normalisation."""
    assert splits.input_shape == shape
    assert splits.num_classes == 10
    for split in (splits.train, splits.val, splits.test):
        assert isinstance(split, TensorSplit)
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert tuple(split.x.shape[1:]) == shape
    # Labels round-trip: val is carved from train (never from test), test keeps its order.
    got_train = sorted(splits.train.y.tolist() + splits.val.y.tolist())
    assert got_train == sorted(train_labels)
    assert splits.test.y.tolist() == test_labels
    assert len(splits.val) == round(0.1 * len(train_labels))

    # Normalised with the statistics of the train part: mean 0, std 1 per channel there.
    x = splits.train.x
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(shape[0]), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3), correction=0), torch.ones(shape[0]), atol=1e-4)

    # Every image is a function of its label, so equal labels must give equal normalised images in
    # every split (images and labels stayed paired, and val/test used the *train* statistics:
    # the test labels are distributed differently, so test statistics would shift its values).
    reference: dict[int, torch.Tensor] = {}
    for split in (splits.train, splits.val, splits.test):
        for img, label in zip(split.x, split.y.tolist(), strict=True):
            if label in reference:
                assert torch.allclose(img, reference[label], atol=1e-5)
            else:
                reference[label] = img
    values = [reference[label][0, 0, 0].item() for label in sorted(reference)]
    assert values == sorted(values)  # brighter label, larger value: pairing not scrambled
    # The marked pixel is at (row 2, column 5), not transposed to (5, 2).
    some = splits.train.x[0]
    assert torch.all(some[:, MARK[0], MARK[1]] > some[:, 0, 0])
    assert torch.allclose(some[:, MARK[1], MARK[0]], some[:, 0, 0])


# CIFAR-10 ------------------------------------------------------------------------------------------

CIFAR_TRAIN_LABELS = [i % 10 for i in range(20)]  # 4 per batch file, 5 files
CIFAR_TEST_LABELS = [0, 1, 1, 2, 2, 2]  # a different label mix from train, on purpose


def _write_cifar10(root: Path) -> Path:
    """A tiny CIFAR-10 in its real layout: python pickles with uint8 'data' (N, 3072), 'labels'."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(labels: list[int]) -> dict[str, object]:
        # 3072 = 3 channels x 32 rows x 32 columns, channel-major then row-major, as in the release.
        data = np.stack([_image(label, 3, 32).reshape(3072) for label in labels])
        return {"batch_label": "fake", "data": data, "labels": list(labels), "filenames": []}

    for i in range(5):
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump(batch(CIFAR_TRAIN_LABELS[4 * i : 4 * i + 4]), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(CIFAR_TEST_LABELS), f)
    with open(folder / "batches.meta", "wb") as f:
        names = ["airplane", "automobile", "bird", "cat", "deer"]
        names += ["dog", "frog", "horse", "ship", "truck"]
        pickle.dump({"label_names": names, "num_cases_per_batch": 4, "num_vis": 3072}, f)
    return folder


@pytest.fixture
def skip_cifar_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make torchvision's CIFAR-10 integrity check test existence only, in this test only.

    torchvision checks the md5 sum of every CIFAR-10 file on every load, so tiny fake files can
    never pass it. The production loader keeps that check (a corrupt training set should fail
    loudly); only the tests swap it out, at the one place torchvision's cifar module looks it up.
    """
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


# MNIST / Fashion-MNIST -----------------------------------------------------------------------------

MNIST_TRAIN_LABELS = [i % 10 for i in range(30)]
MNIST_TEST_LABELS = [3, 3, 4, 9, 9, 9, 9]
MNIST_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def _write_idx_images(path: Path, images: np.ndarray) -> None:
    # idx3-ubyte: magic 0x00000803 (unsigned byte, 3 dims), then big-endian N, rows, columns.
    n, rows, cols = images.shape
    path.write_bytes(
        struct.pack(">IIII", 0x0803, n, rows, cols) + images.astype(np.uint8).tobytes()
    )


def _write_idx_labels(path: Path, labels: list[int]) -> None:
    # idx1-ubyte: magic 0x00000801 (unsigned byte, 1 dim), then big-endian N.
    path.write_bytes(struct.pack(">II", 0x0801, len(labels)) + bytes(labels))


def _write_mnist(root: Path, folder_name: str) -> Path:
    raw = root / folder_name / "raw"
    raw.mkdir(parents=True)
    for prefix, labels in (("train", MNIST_TRAIN_LABELS), ("t10k", MNIST_TEST_LABELS)):
        images = np.stack([_image(label, 1, 28)[0] for label in labels])
        _write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return raw


# ImageFolder ---------------------------------------------------------------------------------------

COLOURS = {"cat": (255, 0, 0), "dog": (0, 0, 255)}  # class 0 is red, class 1 is blue


def _write_imagefolder(root: Path, counts: dict[str, dict[str, int]]) -> None:
    """PNGs of one solid colour per class, of varying sizes (so resizing is needed to batch)."""
    from PIL import Image

    for part, per_class in counts.items():
        for cls, n in per_class.items():
            folder = root / part / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (5 + i, 9 - i % 3), COLOURS[cls]).save(folder / f"{i}.png")


# --------------------------------------------------------------------------------------------------
# Registry and argument checking
# --------------------------------------------------------------------------------------------------


def test_registry_names_order_and_flags() -> None:
    assert available_datasets() == ALL_NAMES
    for name, spec in DATASETS.items():
        assert spec.name == name
        assert spec.description
        assert spec.needs_data_dir == (name in FILE_BACKED)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(UserError) as info:
        load_dataset("cifar11")
    message = str(info.value)
    assert "Unknown dataset 'cifar11'" in message
    for name in ALL_NAMES:
        assert name in message


def test_non_string_name_is_a_user_error() -> None:
    with pytest.raises(UserError):
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


def test_import_is_cheap() -> None:
    # torchvision, scikit-learn and mnist1d each cost seconds; only the loader that needs one may
    # import it. A fresh interpreter is the only honest way to see what an import pulls in.
    code = (
        "import sys, sopkit.data\n"
        "heavy = [m for m in ('torchvision', 'sklearn', 'mnist1d', 'matplotlib') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == ""


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


def test_mnist1d_loads_and_second_load_reads_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_dataset("mnist1d", cache_dir=tmp_path)
    assert first.name == "mnist1d"
    assert first.input_shape == (40,)
    assert first.num_classes == 10
    # The package's default recipe: 5000 signals, 80% train, of which we carve 10% as val.
    assert (len(first.train), len(first.val), len(first.test)) == (3600, 400, 1000)
    assert first.train.x.shape == (3600, 40) and first.train.x.dtype == torch.float32
    assert first.train.y.dtype == torch.int64
    assert set(first.train.y.tolist()) == set(range(10))
    # Features standardised with train statistics.
    assert torch.allclose(first.train.x.mean(0), torch.zeros(40), atol=1e-4)
    assert torch.allclose(first.train.x.std(0, correction=0), torch.ones(40), atol=1e-4)

    cached = list(tmp_path.iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".npz"  # no temporary file left behind

    from mnist1d import data as mnist1d_data

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the second load regenerated mnist1d instead of reading the cache")

    monkeypatch.setattr(mnist1d_data, "make_dataset", must_not_run)
    second = load_dataset("mnist1d", cache_dir=tmp_path)
    for a, b in ((first.train, second.train), (first.val, second.val), (first.test, second.test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


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
    assert not torch.equal(small.test.x, reseeded.test.x)


def test_mnist1d_corrupt_cache_is_rebuilt(tmp_path: Path, small_mnist1d_recipe: None) -> None:
    good = load_dataset("mnist1d", cache_dir=tmp_path)
    (path,) = tmp_path.glob("mnist1d-*.npz")
    path.write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="unreadable cache"):
        again = load_dataset("mnist1d", cache_dir=tmp_path)
    assert torch.equal(good.test.x, again.test.x)
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


# --------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------


def test_digits_sizes_and_disjoint_splits() -> None:
    splits = load_dataset("digits")
    assert splits.input_shape == (64,) and splits.num_classes == 10
    n_train, n_val, n_test = len(splits.train), len(splits.val), len(splits.test)
    assert n_train + n_val + n_test == 1797
    assert n_test == 360  # the fixed 20% test set
    assert n_val == round(0.1 * (1797 - 360))
    # Stratified test set: every class holds 35 to 37 of its 360 examples.
    counts = torch.bincount(splits.test.y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    # The same standardisation is applied to all splits, so equal raw rows stay equal.
    train_rows = _rows(splits.train.x)
    assert len(train_rows) == n_train
    assert train_rows.isdisjoint(_rows(splits.val.x))
    assert train_rows.isdisjoint(_rows(splits.test.x))
    assert _rows(splits.val.x).isdisjoint(_rows(splits.test.x))


def test_digits_split_seed_moves_val_but_never_test() -> None:
    a = load_dataset("digits", split_seed=0)
    b = load_dataset("digits", split_seed=0)
    c = load_dataset("digits", split_seed=1)
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.train.y, b.train.y)
    assert _rows(a.val.x) != _rows(c.val.x)
    # The test set is fixed; it does not depend on split_seed (only its standardisation, which
    # uses the train part, may shift slightly), so compare labels and order.
    assert torch.equal(a.test.y, c.test.y)


def test_digits_val_fraction_is_respected() -> None:
    splits = load_dataset("Digits", val_fraction=0.25)  # names are case-insensitive
    assert len(splits.val) == round(0.25 * 1437)


# --------------------------------------------------------------------------------------------------
# TensorSplit and DataSplits
# --------------------------------------------------------------------------------------------------


def _toy_split(n: int = 10) -> TensorSplit:
    return TensorSplit(torch.arange(n * 2, dtype=torch.float32).view(n, 2), torch.arange(n))


def test_tensor_split_batches_cover_each_example_once() -> None:
    split = _toy_split(10)
    assert isinstance(split, Split)
    sizes = [len(y) for _, y in split.batches(4, shuffle=True, generator=torch.Generator())]
    assert sizes == [4, 4, 2]  # last partial batch kept
    x, y = _epoch(split, 3, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert sorted(y.tolist()) == list(range(10))
    assert torch.equal(x[:, 0], 2 * y.float())  # inputs stayed paired with their labels


def test_tensor_split_shuffle_is_reproducible_by_generator() -> None:
    split = _toy_split(50)
    _, a = _epoch(split, 8, shuffle=True, generator=torch.Generator().manual_seed(1))
    _, b = _epoch(split, 8, shuffle=True, generator=torch.Generator().manual_seed(1))
    _, c = _epoch(split, 8, shuffle=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, torch.arange(50))
    # One generator over two epochs gives two different orders.
    gen = torch.Generator().manual_seed(1)
    _, first = _epoch(split, 8, shuffle=True, generator=gen)
    _, second = _epoch(split, 8, shuffle=True, generator=gen)
    assert torch.equal(first, a) and not torch.equal(first, second)


def test_tensor_split_without_shuffle_keeps_order() -> None:
    split = _toy_split(10)
    x, y = _epoch(split, 4, shuffle=False)
    assert torch.equal(y, torch.arange(10)) and torch.equal(x, split.x)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_batch_size_is_a_user_error_at_call_time(bad: object) -> None:
    with pytest.raises(UserError, match="batch size"):
        _toy_split().batches(bad, shuffle=False)  # type: ignore[arg-type]


def test_tensor_split_rejects_mismatched_tensors() -> None:
    with pytest.raises(ValueError):
        TensorSplit(torch.zeros(3, 2), torch.zeros(4, dtype=torch.int64))


def test_data_splits_to_moves_every_split() -> None:
    splits = DataSplits("toy", (2,), 10, _toy_split(), _toy_split(4), _toy_split(6))
    moved = splits.to("cpu")
    assert moved.name == "toy" and moved.input_shape == (2,)
    assert [len(s) for s in (moved.train, moved.val, moved.test)] == [10, 4, 6]
    assert all(s.x.device.type == "cpu" for s in (moved.train, moved.val, moved.test))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensor_split_on_cuda_shuffles_on_device() -> None:
    split = _toy_split(20).to("cuda")
    # A CPU generator still works (drawn on CPU, moved) and a CUDA one draws on the device.
    for gen in (torch.Generator().manual_seed(0), torch.Generator("cuda").manual_seed(0)):
        x, y = _epoch(split, 6, shuffle=True, generator=gen)
        assert x.is_cuda and y.is_cuda
        assert sorted(y.tolist()) == list(range(20))


# --------------------------------------------------------------------------------------------------
# torchvision sets: CIFAR-10, MNIST, Fashion-MNIST
# --------------------------------------------------------------------------------------------------


def test_cifar10_tiny_files_load(tmp_path: Path, skip_cifar_md5: None) -> None:
    _write_cifar10(tmp_path)
    splits = load_dataset("cifar10", data_dir=tmp_path)
    assert splits.name == "cifar10"
    _check_image_splits(splits, (3, 32, 32), CIFAR_TRAIN_LABELS, CIFAR_TEST_LABELS)


def test_cifar10_checksum_failure_is_a_user_error(tmp_path: Path) -> None:
    # Without the test-only bypass, torchvision's md5 check rejects the fake files: that is
    # exactly what a user with a corrupted download sees.
    folder = _write_cifar10(tmp_path)
    with pytest.raises(UserError, match="corrupted") as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(folder) in str(info.value)


def test_cifar10_missing_files_name_folder_and_files(tmp_path: Path) -> None:
    folder = _write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    (folder / "batches.meta").unlink()
    with pytest.raises(UserError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(info.value)
    assert str(folder) in message
    for name in ["data_batch_1", "data_batch_5", "test_batch", "batches.meta"]:
        assert name in message
    assert "Missing: data_batch_3, batches.meta" in message


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_mnist_family_tiny_files_load(tmp_path: Path, name: str) -> None:
    _write_mnist(tmp_path, MNIST_FOLDERS[name])
    splits = load_dataset(name, data_dir=tmp_path)
    assert splits.name == name
    _check_image_splits(splits, (1, 28, 28), MNIST_TRAIN_LABELS, MNIST_TEST_LABELS)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_mnist_family_missing_files_name_folder_and_files(tmp_path: Path, name: str) -> None:
    with pytest.raises(UserError) as info:
        load_dataset(name, data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / MNIST_FOLDERS[name] / "raw") in message
    for file in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"]:
        assert file in message
    assert "t10k-labels-idx1-ubyte" in message


def test_mnist_only_gz_files_get_a_gunzip_hint(tmp_path: Path) -> None:
    raw = _write_mnist(tmp_path, "MNIST")
    for path in list(raw.iterdir()):
        path.rename(path.with_name(path.name + ".gz"))  # content irrelevant: never read
    with pytest.raises(UserError, match="gunzip"):
        load_dataset("mnist", data_dir=tmp_path)


def test_mnist_truncated_file_is_a_user_error(tmp_path: Path) -> None:
    raw = _write_mnist(tmp_path, "MNIST")
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="could not be read") as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(raw) in str(info.value)


def test_failed_download_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def offline(self: object) -> None:
        raise URLError("no network in this test")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    target = tmp_path / "new" / "dir"
    with pytest.raises(UserError, match="Could not download mnist") as info:
        load_dataset("mnist", data_dir=target, download=True)
    assert "train-images-idx3-ubyte" in str(info.value)
    assert target.is_dir()  # --download into a fresh directory creates it


@pytest.mark.parametrize("name", FILE_BACKED)
def test_missing_data_dir_says_to_pass_one(name: str) -> None:
    with pytest.raises(UserError, match="--data-dir"):
        load_dataset(name)


@pytest.mark.parametrize("name", FILE_BACKED)
def test_nonexistent_data_dir_is_named(tmp_path: Path, name: str) -> None:
    missing = tmp_path / "no-such-dir"
    with pytest.raises(UserError, match="does not exist") as info:
        load_dataset(name, data_dir=missing)
    assert str(missing) in str(info.value)
    assert "--data-dir" in str(info.value)


def test_data_dir_that_is_a_file_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(UserError, match="not a directory"):
        load_dataset("cifar10", data_dir=path)


# --------------------------------------------------------------------------------------------------
# imagefolder
# --------------------------------------------------------------------------------------------------


def _colour_labels(x: torch.Tensor) -> list[int]:
    """Class index recovered from the pixels: red images are 'cat' (0), blue ones 'dog' (1)."""
    return [0 if img[0].mean() > img[2].mean() else 1 for img in x]


def test_imagefolder_loads_through_a_dataloader(tmp_path: Path) -> None:
    # The test folder lacks 'cat': ImageFolder alone would number 'dog' 0 there; it must stay 1.
    _write_imagefolder(tmp_path, {"train": {"cat": 6, "dog": 5}, "test": {"dog": 3}})
    splits = load_dataset("imagefolder", data_dir=tmp_path, num_workers=0, image_size=8)
    assert splits.input_shape == (3, 8, 8) and splits.num_classes == 2
    assert all(isinstance(s, LoaderSplit) for s in (splits.train, splits.val, splits.test))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 1, 3)

    x, y = _epoch(splits.train, 4, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert x.shape == (10, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert y.tolist() == _colour_labels(x)
    _, y_val = _epoch(splits.val, 4, shuffle=False)
    assert sorted(y.tolist() + y_val.tolist()) == [0] * 6 + [1] * 5
    x_test, y_test = _epoch(splits.test, 2, shuffle=False)
    assert y_test.tolist() == [1, 1, 1] == _colour_labels(x_test)


def test_imagefolder_with_a_worker_process(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path, {"train": {"cat": 4, "dog": 4}, "test": {"cat": 1, "dog": 1}})
    splits = load_dataset("imagefolder", data_dir=tmp_path, num_workers=1, image_size=4)
    train = splits.train
    assert isinstance(train, LoaderSplit)
    _, a = _epoch(train, 3, shuffle=True, generator=torch.Generator().manual_seed(5))
    _, b = _epoch(train, 3, shuffle=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)  # same generator seed, same order, through a worker process
    x, y = _epoch(train, 3, shuffle=False)
    assert y.tolist() == _colour_labels(x) and len(y) == len(train)
    x_test, y_test = _epoch(splits.test, 2, shuffle=False)
    assert y_test.tolist() == [0, 1] == _colour_labels(x_test)
    train.close()


def test_imagefolder_missing_layout_names_folders(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError) as info:
        load_dataset("imagefolder", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "test") in message
    assert "train/<class>" in message and "test/<class>" in message


def test_imagefolder_empty_or_unknown_classes_are_user_errors(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path, {"train": {"cat": 2}, "test": {"cat": 1, "dog": 1}})
    with pytest.raises(UserError, match="dog"):
        load_dataset("imagefolder", data_dir=tmp_path, num_workers=0)
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        load_dataset("imagefolder", data_dir=tmp_path, num_workers=0)
