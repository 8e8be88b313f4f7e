"""``imagefolder``: the user's own images in ``<data-dir>/{train,test}/<class>/``; and the folder
checks it shares with ``imagenet``.

Unlike the in-memory sets, these are file-backed: each split is a
:class:`~sopkit.data.splits.LoaderSplit` streaming resized images through a ``DataLoader``.
torchvision is imported inside the loader: importing it takes seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

from sopkit.data.augment import CropFlip
from sopkit.data.prepare import LoadOptions, carve_val, require_data_dir
from sopkit.data.splits import DataSplits, LoaderSplit
from sopkit.errors import UserError

__all__ = ["align_classes", "load_imagefolder", "open_image_folder", "require_folders"]


def require_folders(name: str, root: Path, parts: tuple[str, ...], layout: str) -> None:
    """A UserError naming every folder of ``parts`` missing under ``root``, and the layout."""
    missing = [sub for sub in parts if not (root / sub).is_dir()]
    if missing:
        folders = ", ".join(str(root / sub) for sub in missing)
        raise UserError(f"{name}: missing folder(s) {folders}. Expected the layout {layout}.")


def open_image_folder(
    name: str, path: Path, layout: str, transform: Callable[[Any], Any] | None = None
) -> Any:
    """torchvision's ``ImageFolder`` over ``path``; no class folders, or a class folder without
    images, is a UserError naming it and the layout."""
    from torchvision.datasets import ImageFolder  # lazy: slow to import

    try:
        return ImageFolder(str(path), transform=transform)
    except FileNotFoundError as exc:  # no class folders, or a class folder with no images
        raise UserError(f"{name}: {exc} (in {path}). Expected the layout {layout}.") from exc


def align_classes(name: str, dataset: Any, train: Any, folder: Path, train_folder: Path) -> None:
    """Renumber ``dataset``'s labels by ``train``'s classes (both ``ImageFolder``\\ s), in place.

    ImageFolder numbers classes by the sorted folder names *of each root separately*: a test
    folder lacking one class would shift every later label. A class ``train`` lacks is an error.
    """
    unknown = sorted(set(dataset.classes) - set(train.classes))
    if unknown:
        raise UserError(
            f"{name}: class folder(s) {', '.join(unknown)} in {folder} have no counterpart in "
            f"{train_folder}."
        )
    if dataset.classes != train.classes:
        remap = {i: train.class_to_idx[c] for i, c in enumerate(dataset.classes)}
        dataset.samples = [(path, remap[label]) for path, label in dataset.samples]
        dataset.imgs = dataset.samples
        dataset.targets = [label for _, label in dataset.samples]
        dataset.classes = list(train.classes)
        dataset.class_to_idx = dict(train.class_to_idx)


def load_imagefolder(opts: LoadOptions) -> DataSplits:
    """Images in ``<data_dir>/{train,test}/<class>/<image>``, resized to a square, RGB in [0, 1].

    Its standard augmentation is CIFAR's, scaled: a random crop of the image padded by 1/8 of its
    side (black) and a flip, applied by the training loop to each batch on the device.
    """
    root = require_data_dir("imagefolder", opts)
    layout = (
        f"{root}/train/<class>/<image> and {root}/test/<class>/<image> "
        "(one subfolder per class, the same class names in both)"
    )
    require_folders("imagefolder", root, ("train", "test"), layout)

    from torchvision import transforms  # lazy: slow to import

    size = opts.image_size
    # A fixed square size so examples of any size batch together; resizing the PIL image before
    # ToTensor is cheaper than resizing the tensor.
    transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    train_full = open_image_folder("imagefolder", root / "train", layout, transform)
    test_ds = open_image_folder("imagefolder", root / "test", layout, transform)
    align_classes("imagefolder", test_ds, train_full, root / "test", root / "train")

    train_idx, val_idx = carve_val(len(train_full), "imagefolder", opts)

    def split(dataset: Dataset[Any]) -> LoaderSplit:
        return LoaderSplit(dataset, num_workers=opts.num_workers)

    return DataSplits(
        name="imagefolder",
        input_shape=(3, size, size),  # ImageFolder's loader converts every image to RGB
        num_classes=len(train_full.classes),
        train=split(Subset(train_full, train_idx.tolist())),
        val=split(Subset(train_full, val_idx.tolist())),
        test=split(test_ds),
        augment=CropFlip(padding=max(1, size // 8), flip=True, fill=(0.0,)),
    )
