"""``imagenet``: ILSVRC-2012 in its standard folder layout, with the standard ResNet recipe.

``<data-dir>/train/<wnid>/*.JPEG`` and ``<data-dir>/val/<wnid>/*.JPEG`` (the validation images
sorted into class folders, as every ImageNet training script expects). The validation split of a
comparison is carved from train like every set's; the official val is the test set.

Training images take a random-resized crop to ``crop_size`` (224) and a flip; evaluation images
(and training images under ``--augment none``) are resized to ``resize_size`` (256) on the shorter
side and centre-cropped to ``crop_size``. Both run in ``DataLoader`` workers with pinned memory and
persistent workers; they ship uint8 images, normalised with the ImageNet mean and standard deviation
on the training device after the copy. The random crops are seeded per sample from the run (see
:mod:`sopkit.data.pipeline`). torchvision is imported inside the loader.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Subset

from sopkit.data.folder import align_classes, open_image_folder, require_folders
from sopkit.data.pipeline import Normalize, SampleTransform
from sopkit.data.prepare import LoadOptions, carve_val, require_data_dir
from sopkit.data.splits import DataSplits, LoaderSplit
from sopkit.errors import UserError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "load_imagenet"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _transforms(opts: LoadOptions) -> tuple[Any, Any]:
    """(training, evaluation) transforms from a PIL image to a uint8 (3, crop, crop) tensor."""
    from torchvision import transforms  # lazy: slow to import

    crop, resize = opts.crop_size, opts.resize_size
    train = transforms.Compose(
        [
            transforms.RandomResizedCrop(crop),
            transforms.RandomHorizontalFlip(),
            transforms.PILToTensor(),
        ]
    )
    evaluation = transforms.Compose(
        [transforms.Resize(resize), transforms.CenterCrop(crop), transforms.PILToTensor()]
    )
    return train, evaluation


def load_imagenet(opts: LoadOptions) -> DataSplits:
    """ImageNet from ``<data_dir>/{train,val}/<wnid>/*.JPEG``; labels follow train's sorted wnids."""
    if opts.download:
        raise UserError(
            "imagenet cannot be downloaded by sopkit: get ILSVRC-2012 from image-net.org, sort "
            "the validation images into one folder per wnid, and pass --data-dir without "
            "--download."
        )
    root = require_data_dir("imagenet", opts, downloadable=False)
    layout = (
        f"{root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG (one folder per class; every "
        "val class also in train)"
    )
    require_folders("imagenet", root, ("train", "val"), layout)
    if opts.crop_size > opts.resize_size:
        raise UserError(
            f"imagenet: the crop size {opts.crop_size} is larger than the resize size "
            f"{opts.resize_size} it is cut from."
        )
    # No transform here: the splits below apply theirs, so train and val share one file scan.
    train_full = open_image_folder("imagenet", root / "train", layout)
    official_val = open_image_folder("imagenet", root / "val", layout)
    align_classes("imagenet", official_val, train_full, root / "val", root / "train")

    train_idx, val_idx = carve_val(len(train_full), "imagenet", opts)
    train_part = Subset(train_full, train_idx.tolist())
    augmenting, evaluation = _transforms(opts)
    normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def split(dataset: Any, transform: Any, *, random: bool = False) -> LoaderSplit:
        return LoaderSplit(
            SampleTransform(dataset, transform, random=random),
            num_workers=opts.num_workers,
            on_device=normalize,
        )

    return DataSplits(
        name="imagenet",
        input_shape=(3, opts.crop_size, opts.crop_size),
        num_classes=len(train_full.classes),
        train=split(train_part, evaluation),
        val=split(Subset(train_full, val_idx.tolist()), evaluation),
        test=split(official_val, evaluation),
        augmented_train=split(train_part, augmenting, random=True),
    )
