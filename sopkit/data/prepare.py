"""What every loader shares: the validated load options, the validation carve and normalisation.

A loader turns raw arrays into a :class:`~sopkit.data.splits.DataSplits` through
:func:`vector_splits` (feature vectors, standardised per feature) or :func:`image_splits` (uint8
images, normalised per channel). Both carve the validation split out of the *training* set, seeded
by ``split_seed``, and compute their statistics on the remaining train part only, so neither
validation nor test leaks into preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from sopkit.data.augment import CropFlip
from sopkit.data.splits import DataSplits, TensorSplit
from sopkit.errors import UserError

__all__ = ["LoadOptions", "carve_val", "image_splits", "require_data_dir", "vector_splits"]


@dataclass(frozen=True)
class LoadOptions:
    """Everything a loader may need, already validated by :func:`load_dataset`."""

    data_dir: Path | None
    val_fraction: float
    split_seed: int
    download: bool
    num_workers: int
    cache_dir: Path
    image_size: int
    crop_size: int = 224  # imagenet: the side of the training crop and of the evaluation centre crop
    resize_size: int = 256  # imagenet: the shorter side evaluation images are resized to first
    # The models the data is for: text sets (glue:TASK) tokenise with their hf: model's tokenizer.
    models: tuple[str, ...] = ()
    # Parameters given in the set's name (mnist1d:samples=N), checked against the set's own list.
    parameters: dict[str, str] = field(default_factory=dict)


def carve_val(n: int, name: str, opts: LoadOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, val)`` that split ``n`` training examples, reproducibly by split_seed."""
    if n < 2:
        raise UserError(f"The {name} training set has {n} example(s); at least 2 are needed.")
    # At least one example on each side, so neither split is silently empty.
    n_val = min(max(round(n * opts.val_fraction), 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(opts.split_seed))
    return perm[n_val:], perm[:n_val]


def _safe_std(std: torch.Tensor) -> torch.Tensor:
    # A constant feature (digits' blank border pixels, a blank channel) has std 0; dividing by 1
    # leaves it at 0 after centring instead of turning it into NaN or amplifying rounding noise.
    return torch.where(std > 1e-6, std, torch.ones_like(std))


def vector_splits(
    name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    num_classes: int,
    opts: LoadOptions,
) -> DataSplits:
    """Carve val from (x, y), standardise every feature with the train part's statistics."""
    train_idx, val_idx = carve_val(len(y), name, opts)
    x_train, x_val = x[train_idx], x[val_idx]
    # Statistics of the train part only: val and test must not leak into preprocessing.
    mean = x_train.mean(dim=0, keepdim=True)
    std = _safe_std(x_train.std(dim=0, correction=0, keepdim=True))
    return DataSplits(
        name=name,
        input_shape=tuple(x.shape[1:]),
        num_classes=num_classes,
        train=TensorSplit((x_train - mean) / std, y[train_idx]),
        val=TensorSplit((x_val - mean) / std, y[val_idx]),
        test=TensorSplit((x_test - mean) / std, y_test),
    )


def image_splits(
    name: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    opts: LoadOptions,
    augment: CropFlip | None = None,
) -> DataSplits:
    """Carve val from uint8 (N, C, H, W) images; scale to [0, 1]; normalise per channel.

    The carving indexes the uint8 tensor before conversion so that CIFAR-10's 50k images never
    exist twice as float32 (600 MB each). ``augment`` is the set's standard recipe; its padding is
    set to black (a zero pixel before normalisation), as torchvision pads the raw images.
    """
    train_idx, val_idx = carve_val(len(labels), name, opts)
    x_train = images[train_idx].float().div_(255.0)
    x_val = images[val_idx].float().div_(255.0)
    x_test = test_images.float().div_(255.0)
    mean = x_train.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
    std = _safe_std(x_train.std(dim=(0, 2, 3), correction=0)).view(1, -1, 1, 1)
    for part in (x_train, x_val, x_test):
        part.sub_(mean).div_(std)
    if augment is not None:
        augment = replace(augment, fill=tuple((-mean / std).flatten().tolist()))
    return DataSplits(
        name=name,
        input_shape=tuple(images.shape[1:]),
        num_classes=num_classes,
        train=TensorSplit(x_train, labels[train_idx]),
        val=TensorSplit(x_val, labels[val_idx]),
        test=TensorSplit(x_test, test_labels),
        augment=augment,
    )


def require_data_dir(name: str, opts: LoadOptions, *, downloadable: bool = True) -> Path:
    """The data directory for a file-backed set, or a UserError saying what to pass (and, for a set
    torchvision can fetch, that --download would)."""
    if opts.data_dir is None:
        hint = f" (add --download to fetch {name} there when the network allows)"
        raise UserError(
            f"The {name} data set is read from a local directory, and none was given. "
            f"Pass --data-dir PATH{hint if downloadable else ''}."
        )
    root = opts.data_dir
    if root.exists() and not root.is_dir():
        raise UserError(f"The data directory {root} for {name} is a file, not a directory.")
    if not root.exists():
        if not opts.download:
            hint = f", or add --download to fetch {name} into it" if downloadable else ""
            raise UserError(
                f"The data directory {root} for {name} does not exist. Pass --data-dir with an "
                f"existing directory{hint}."
            )
        # Downloading into a fresh directory is the normal first use of --download.
        try:
            root.mkdir(parents=True)
        except OSError as exc:
            raise UserError(f"Could not create the data directory {root}: {exc}") from exc
    return root
