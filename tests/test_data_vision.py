"""Tests for the file-backed data sets: CIFAR-10, MNIST, Fashion-MNIST and imagefolder.

Nothing here touches the network. Each set is exercised with tiny files written in its real on-disk
format (CIFAR-10 pickles, MNIST idx files, ImageFolder PNGs), so the real torchvision readers run.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

from sopkit.data import CropFlip, DataSplits, LoaderSplit, Split, TensorSplit, load_dataset
from sopkit.errors import UserError

FILE_BACKED = ["mnist", "fashion-mnist", "cifar10", "imagefolder", "imagenet"]


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


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


def _check_recipe(splits: DataSplits, padding: int, flip: bool) -> None:
    """The set's standard augmentation: crop padding, flip, and padding with *black*: the value a
    raw 0 pixel normalises to, extrapolated from two labels' known raw values and normalised ones."""
    recipe = splits.augment
    assert isinstance(recipe, CropFlip)
    assert (recipe.padding, recipe.flip) == (padding, flip)
    x, y = splits.train.x, splits.train.y.tolist()  # type: ignore[attr-defined]
    a, b = x[y.index(0)], x[y.index(1)]  # labels 0 and 1: raw 5 + 3c and 25 + 3c
    for c in range(x.shape[1]):
        per_raw_unit = (b[c, 0, 0] - a[c, 0, 0]) / 20
        black = a[c, 0, 0] - per_raw_unit * _pixel(0, c)
        assert recipe.fill[c] == pytest.approx(black.item(), abs=1e-4)


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
# torchvision sets: CIFAR-10, MNIST, Fashion-MNIST
# --------------------------------------------------------------------------------------------------


def test_cifar10_tiny_files_load(tmp_path: Path, skip_cifar_md5: None) -> None:
    _write_cifar10(tmp_path)
    splits = load_dataset("cifar10", data_dir=tmp_path)
    assert splits.name == "cifar10"
    _check_image_splits(splits, (3, 32, 32), CIFAR_TRAIN_LABELS, CIFAR_TEST_LABELS)
    _check_recipe(splits, padding=4, flip=True)


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
    # A mirrored digit is another glyph: MNIST crops only; clothing is left-right symmetric.
    _check_recipe(splits, padding=2, flip=name == "fashion-mnist")


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


def _solid_images(labels: torch.Tensor, side: int) -> torch.Tensor:
    """What imagefolder must yield for the solid-colour PNGs of these labels: each class's colour
    as RGB scaled to [0, 1] (not normalised), in every pixel of a ``side`` x ``side`` square."""
    colours = torch.tensor([COLOURS[c] for c in sorted(COLOURS)], dtype=torch.float32) / 255
    return colours[labels].view(-1, 3, 1, 1).expand(-1, 3, side, side)


def test_imagefolder_loads_through_a_dataloader(tmp_path: Path) -> None:
    # The test folder lacks 'cat': ImageFolder alone would number 'dog' 0 there; it must stay 1.
    _write_imagefolder(tmp_path, {"train": {"cat": 6, "dog": 5}, "test": {"dog": 3}})
    splits = load_dataset("imagefolder", data_dir=tmp_path, num_workers=0, image_size=8)
    assert splits.input_shape == (3, 8, 8) and splits.num_classes == 2
    assert all(isinstance(s, LoaderSplit) for s in (splits.train, splits.val, splits.test))
    # Its standard augmentation: CIFAR's scaled (padding 1/8 of the side), black in [0, 1] is 0.
    assert splits.augment == CropFlip(padding=1, flip=True, fill=(0.0,))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 1, 3)

    x, y = _epoch(splits.train, 4, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert x.shape == (10, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, _solid_images(y, 8))  # resized, scaled, and paired with its label
    _, y_val = _epoch(splits.val, 4, shuffle=False)
    assert sorted(y.tolist() + y_val.tolist()) == [0] * 6 + [1] * 5
    x_test, y_test = _epoch(splits.test, 2, shuffle=False)
    assert y_test.tolist() == [1, 1, 1]
    assert torch.equal(x_test, _solid_images(y_test, 8))


def test_imagefolder_with_a_worker_process(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path, {"train": {"cat": 4, "dog": 4}, "test": {"cat": 1, "dog": 1}})
    splits = load_dataset("imagefolder", data_dir=tmp_path, num_workers=1, image_size=4)
    train = splits.train
    assert isinstance(train, LoaderSplit)
    _, a = _epoch(train, 3, shuffle=True, generator=torch.Generator().manual_seed(5))
    _, b = _epoch(train, 3, shuffle=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)  # same generator seed, same order, through a worker process
    x, y = _epoch(train, 3, shuffle=False)
    assert torch.equal(x, _solid_images(y, 4)) and len(y) == len(train)
    x_test, y_test = _epoch(splits.test, 2, shuffle=False)
    assert y_test.tolist() == [0, 1]
    assert torch.equal(x_test, _solid_images(y_test, 4))
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
