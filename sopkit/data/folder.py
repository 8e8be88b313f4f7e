"""``imagefolder``: the user's own images in ``<data-dir>/{train,test}/<class>/``.

Unlike the in-memory sets, these are file-backed: each split is a
:class:`~sopkit.data.splits.LoaderSplit` streaming resized images through a ``DataLoader``.
torchvision is imported inside the loader: importing it takes seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

from sopkit.data.prepare import LoadOptions, carve_val, require_data_dir
from sopkit.data.splits import DataSplits, LoaderSplit
from sopkit.errors import UserError

__all__ = ["load_imagefolder"]


def load_imagefolder(opts: LoadOptions) -> DataSplits:
    """Images in ``<data_dir>/{train,test}/<class>/<image>``, resized to a square, RGB in [0, 1]."""
    root = require_data_dir("imagefolder", opts)
    layout = (
        f"{root}/train/<class>/<image> and {root}/test/<class>/<image> "
        "(one subfolder per class, the same class names in both)"
    )
    missing = [sub for sub in ("train", "test") if not (root / sub).is_dir()]
    if missing:
        folders = ", ".join(str(root / sub) for sub in missing)
        raise UserError(f"imagefolder: missing folder(s) {folders}. Expected the layout {layout}.")

    from torchvision import transforms  # lazy: slow to import
    from torchvision.datasets import ImageFolder

    size = opts.image_size
    # A fixed square size so examples of any size batch together; resizing the PIL image before
    # ToTensor is cheaper than resizing the tensor.
    transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])

    def open_folder(path: Path) -> Any:
        try:
            return ImageFolder(str(path), transform=transform)
        except FileNotFoundError as exc:  # no class folders, or a class folder with no images
            raise UserError(f"imagefolder: {exc} Expected the layout {layout}.") from exc

    train_full = open_folder(root / "train")
    test_ds = open_folder(root / "test")

    # ImageFolder numbers classes by the sorted folder names *of each root separately*: a test
    # folder lacking one class would shift every later label. Renumber test by the train classes.
    unknown = sorted(set(test_ds.classes) - set(train_full.classes))
    if unknown:
        raise UserError(
            f"imagefolder: class folder(s) {', '.join(unknown)} in {root / 'test'} have no "
            f"counterpart in {root / 'train'}."
        )
    if test_ds.classes != train_full.classes:
        remap = {i: train_full.class_to_idx[c] for i, c in enumerate(test_ds.classes)}
        test_ds.samples = [(path, remap[label]) for path, label in test_ds.samples]
        test_ds.imgs = test_ds.samples
        test_ds.targets = [label for _, label in test_ds.samples]
        test_ds.classes = list(train_full.classes)
        test_ds.class_to_idx = dict(train_full.class_to_idx)

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
    )
