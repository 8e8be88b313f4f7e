"""The torchvision data sets read from a local directory: CIFAR-10, MNIST and Fashion-MNIST.

Each is read whole into memory as uint8 images and turned into normalised
:class:`~sopkit.data.splits.TensorSplit`\\ s. Every missing, corrupt or failed-download case becomes
a :class:`~sopkit.errors.UserError` that names the folder searched and the files expected there.
torchvision is imported inside the loaders: importing it takes seconds.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sopkit.data.augment import CropFlip
from sopkit.data.prepare import LoadOptions, image_splits, require_data_dir
from sopkit.data.splits import DataSplits
from sopkit.errors import UserError

__all__ = ["load_cifar10", "load_fashion_mnist", "load_mnist"]

# The standard recipes (--augment standard): CIFAR-10's random 32x32 crop of the image padded by 4
# and a flip; for the 28x28 sets a crop of the image padded by 2, and a flip for Fashion-MNIST only
# (clothing is left-right symmetric; a mirrored digit is another glyph, or none).
CIFAR10_AUGMENT = CropFlip(padding=4, flip=True)
MNIST_AUGMENT = CropFlip(padding=2, flip=False)
FASHION_MNIST_AUGMENT = CropFlip(padding=2, flip=True)

# What a failed download raises: network errors are OSErrors (URLError, socket timeouts, SSL),
# torchvision raises RuntimeError for a checksum mismatch or when every mirror failed, and a
# truncated archive fails in tarfile/gzip (TarError is not an OSError; gzip raises EOFError).
_DOWNLOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, RuntimeError, EOFError)

# What reading present-but-bad files raises: torchvision's own "not found or corrupted"
# RuntimeError (CIFAR-10 checks md5 sums), and the idx reader's asserts and dtype/shape errors.
_CORRUPT_ERRORS: tuple[type[BaseException], ...] = (
    RuntimeError,
    ValueError,
    TypeError,
    AssertionError,
    EOFError,
    KeyError,
    pickle.UnpicklingError,
)

_CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_FILES = (
    *(f"data_batch_{i}" for i in range(1, 6)),
    "test_batch",
    "batches.meta",
)
# torchvision reads the decompressed files only; its download step is what un-gzips them.
_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _expected_files_message(folder: Path, files: Sequence[str], missing: Sequence[str]) -> str:
    listing = ", ".join(files)
    text = f"Expected in {folder}: {listing}."
    if missing and len(missing) < len(files):
        text += f" Missing: {', '.join(missing)}."
    return text


def _open_vision_dataset(
    factory: Callable[..., Any],
    *,
    name: str,
    root: Path,
    folder: Path,
    files: Sequence[str],
    train: bool,
    download: bool,
    hint: str = "",
    present: Callable[[], bool] | None = None,
) -> Any:
    """Construct a torchvision data set, turning every missing/corrupt/download failure into a
    UserError that names the folder searched and the files expected there.

    ``present`` overrides the plain "all files exist" check (MNIST also accepts a legacy layout).
    """
    missing = [f for f in files if not (folder / f).is_file()]
    found = present() if present is not None else not missing
    if download and not found:
        try:
            return factory(str(root), train=train, download=True)
        except _DOWNLOAD_ERRORS as exc:
            raise UserError(
                f"Could not download {name} into {root}: {exc}. "
                f"{_expected_files_message(folder, files, missing)} "
                "Copy them there by hand if this machine has no network."
            ) from exc
    if not found:
        raise UserError(
            f"The {name} files were not found under {root}. "
            f"{_expected_files_message(folder, files, missing)}{hint} "
            f"Pass --download to fetch them (needs network), or --data-dir to point elsewhere."
        )
    try:
        return factory(str(root), train=train, download=False)
    except _CORRUPT_ERRORS as exc:
        raise UserError(
            f"The {name} files in {folder} are present but could not be read ({exc}). They are "
            f"probably corrupted or from an interrupted download: delete {folder} and fetch them "
            "again (--download)."
        ) from exc


def load_cifar10(opts: LoadOptions) -> DataSplits:
    """CIFAR-10 from ``<data_dir>/cifar-10-batches-py`` (the python-pickle release)."""
    root = require_data_dir("cifar10", opts)
    from torchvision.datasets import CIFAR10  # lazy: slow to import

    folder = root / _CIFAR10_FOLDER
    # torchvision verifies the md5 sum of every file on every load; we keep that check (a silently
    # corrupt training set is worse than an error) and report its failure as a UserError.
    common = functools.partial(
        _open_vision_dataset,
        CIFAR10,
        name="cifar10",
        root=root,
        folder=folder,
        files=_CIFAR10_FILES,
    )
    # One download fetches both parts, so only the first open may download.
    train_ds = common(train=True, download=opts.download)
    test_ds = common(train=False, download=False)

    def to_tensors(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # torchvision stores HWC uint8; models want CHW. contiguous() on uint8 is the cheap copy.
        images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return images, torch.as_tensor(ds.targets, dtype=torch.int64)

    images, labels = to_tensors(train_ds)
    test_images, test_labels = to_tensors(test_ds)
    num_classes = len(train_ds.classes)
    return image_splits(
        "cifar10",
        images,
        labels,
        test_images,
        test_labels,
        num_classes=num_classes,
        opts=opts,
        augment=CIFAR10_AUGMENT,
    )


def _load_mnist_family(
    name: str, class_name: str, opts: LoadOptions, augment: CropFlip
) -> DataSplits:
    """MNIST or Fashion-MNIST from ``<data_dir>/<class_name>/raw`` (decompressed idx files)."""
    root = require_data_dir(name, opts)
    import torchvision.datasets  # lazy: slow to import

    factory = getattr(torchvision.datasets, class_name)
    folder = root / class_name / "raw"
    processed = root / class_name / "processed"

    def present() -> bool:
        # torchvision also accepts the pre-0.9 layout (processed/training.pt and test.pt).
        legacy = (processed / "training.pt").is_file() and (processed / "test.pt").is_file()
        return legacy or all((folder / f).is_file() for f in _MNIST_FILES)

    gz_only = [
        f for f in _MNIST_FILES if not (folder / f).is_file() and (folder / f"{f}.gz").is_file()
    ]
    hint = ""
    if gz_only:
        hint = (
            f" Found only the compressed {', '.join(f + '.gz' for f in gz_only)}: torchvision "
            "reads decompressed files, so gunzip them (or pass --download, which extracts them "
            "without re-downloading when their checksums match)."
        )
    common = functools.partial(
        _open_vision_dataset,
        factory,
        name=name,
        root=root,
        folder=folder,
        files=_MNIST_FILES,
        hint=hint,
        present=present,
    )
    # One download fetches all four files, so only the first open may download.
    train_ds = common(train=True, download=opts.download)
    test_ds = common(train=False, download=False)
    return image_splits(
        name,
        train_ds.data.unsqueeze(1),  # (N, 28, 28) uint8 -> (N, 1, 28, 28)
        train_ds.targets.to(torch.int64),
        test_ds.data.unsqueeze(1),
        test_ds.targets.to(torch.int64),
        num_classes=len(train_ds.classes),
        opts=opts,
        augment=augment,
    )


def load_mnist(opts: LoadOptions) -> DataSplits:
    """MNIST handwritten digits, 28x28 grey."""
    return _load_mnist_family("mnist", "MNIST", opts, MNIST_AUGMENT)


def load_fashion_mnist(opts: LoadOptions) -> DataSplits:
    """Fashion-MNIST clothing images, 28x28 grey."""
    return _load_mnist_family("fashion-mnist", "FashionMNIST", opts, FASHION_MNIST_AUGMENT)
