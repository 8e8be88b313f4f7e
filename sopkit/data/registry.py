"""The data sets a user can name on the command line, and :func:`load_dataset`, which loads one.

``load_dataset(name, ...)`` returns a :class:`~sopkit.data.splits.DataSplits`: train, validation
and test splits plus the per-example input shape and the number of classes. The validation split is
always carved out of the *training* set (seeded by ``split_seed``); the test set is never used for
model selection. Every user mistake raises :class:`~sopkit.errors.UserError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from sopkit.data.cache import default_cache_dir
from sopkit.data.folder import load_imagefolder
from sopkit.data.imagenet import load_imagenet
from sopkit.data.offline import load_digits, load_mnist1d
from sopkit.data.parameters import MNIST1D_SAMPLES, split_parameters
from sopkit.data.prepare import LoadOptions
from sopkit.data.splits import DataSplits
from sopkit.data.vision import load_cifar10, load_fashion_mnist, load_mnist
from sopkit.errors import UserError, unknown_name
from sopkit.task_metrics import GLUE_TASK_METRICS, METRIC_LABELS

__all__ = ["DATASETS", "DatasetSpec", "dataset_spec", "load_dataset"]


@dataclass(frozen=True)
class DatasetSpec:
    """A data set a user can name: what it is and how to load it."""

    name: str
    description: str
    needs_data_dir: bool  # True for the sets read from files under --data-dir
    loader: Callable[[LoadOptions], DataSplits]
    # `sopkit compare` trains this many epochs when --epochs is not given: enough for the small
    # offline sets to converge (MK needs more steps than the baseline, paper Section 5).
    default_epochs: int = 30
    # `sopkit compare`'s --augment when it is not given: the standard recipe for the image sets.
    # "none" here also means the set has no standard recipe (--augment standard is then none).
    default_augment: str = "standard"
    # The parameters its name takes (NAME:KEY=VALUE, see sopkit.data.parameters).
    parameters: tuple[str, ...] = ()


def _registry(*specs: DatasetSpec) -> dict[str, DatasetSpec]:
    return {spec.name: spec for spec in specs}


def _load_glue(task: str, opts: LoadOptions) -> DataSplits:
    from sopkit.data.glue import load_glue  # imports transformers' tokenizers lazily

    return load_glue(task, opts)


# The GLUE tasks (sopkit.data.glue): names and metrics live in sopkit.task_metrics, torch-free.
_GLUE_SPECS = tuple(
    DatasetSpec(
        f"glue:{task}",
        f"GLUE {task} ({METRIC_LABELS[metric]}), tokenised for the hf: model; from the Hugging "
        f"Face cache or <data-dir>/{task}/ (extra 'hf').",
        needs_data_dir=False,
        loader=partial(_load_glue, task),
        default_epochs=3,  # fine-tuning a pretrained model
        default_augment="none",
    )
    for task, metric in GLUE_TASK_METRICS.items()
)

DATASETS: dict[str, DatasetSpec] = _registry(
    DatasetSpec(
        "mnist1d",
        "MNIST-1D: 1-D signals of length 40, 10 classes, generated offline (default); "
        "mnist1d:samples=N generates N samples instead of the published 5,000.",
        needs_data_dir=False,
        loader=load_mnist1d,
        default_epochs=200,
        default_augment="none",
        parameters=(MNIST1D_SAMPLES,),
    ),
    DatasetSpec(
        "digits",
        "scikit-learn 8x8 digits as 64 features, 10 classes, offline; fixed 20% test set.",
        needs_data_dir=False,
        loader=load_digits,
        default_epochs=100,
        default_augment="none",
    ),
    DatasetSpec(
        "mnist",
        "MNIST 28x28 grey digits, 10 classes, from <data-dir>/MNIST/raw; augment: crop (pad 2).",
        needs_data_dir=True,
        loader=load_mnist,
    ),
    DatasetSpec(
        "fashion-mnist",
        "Fashion-MNIST 28x28 grey clothing, 10 classes, from <data-dir>/FashionMNIST/raw; "
        "augment: crop (pad 2) + flip.",
        needs_data_dir=True,
        loader=load_fashion_mnist,
    ),
    DatasetSpec(
        "cifar10",
        "CIFAR-10 32x32 colour images, 10 classes, from <data-dir>/cifar-10-batches-py; augment: "
        "crop (pad 4) + flip.",
        needs_data_dir=True,
        loader=load_cifar10,
    ),
    DatasetSpec(
        "imagefolder",
        "Your images in <data-dir>/{train,test}/<class>/, resized square, via a DataLoader; "
        "augment: crop (pad 1/8) + flip.",
        needs_data_dir=True,
        loader=load_imagefolder,
    ),
    DatasetSpec(
        "imagenet",
        "ImageNet in <data-dir>/{train,val}/<wnid>/*.JPEG (val is the test set), 224 crops via "
        "DataLoader workers; augment: random-resized crop + flip.",
        needs_data_dir=True,
        loader=load_imagenet,
        default_epochs=90,  # the standard ResNet recipe
    ),
    *_GLUE_SPECS,
)


def dataset_spec(name: str) -> DatasetSpec:
    """The registry entry for a name a user typed (UserError, listing the valid names, if none)."""
    if not isinstance(name, str):
        raise UserError(f"A data set name must be a string, got {name!r}.")
    base, parameters = split_parameters(name)
    # Forgive case and an underscore for the dash ("Fashion_MNIST"): both are common spellings.
    spec = DATASETS.get(base.strip().lower().replace("_", "-"))
    if spec is None:
        raise unknown_name("dataset", base if parameters else name, DATASETS)
    unknown = sorted(set(parameters) - set(spec.parameters))
    if unknown:
        takes = ", ".join(spec.parameters) if spec.parameters else "none"
        raise UserError(
            f"Data set {name!r}: {spec.name} has no parameter {', '.join(unknown)} "
            f"(it takes: {takes})."
        )
    return spec


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    download: bool = False,
    num_workers: int = 2,
    cache_dir: str | Path | None = None,
    image_size: int = 32,
    crop_size: int = 224,
    resize_size: int = 256,
    models: Sequence[str] = (),
) -> DataSplits:
    """Load a data set by the name a user typed, with validation carved from its training set.

    ``data_dir`` is where file-backed sets live (required for them, ignored by the others);
    ``download`` lets torchvision fetch missing files there. ``val_fraction`` of the training set,
    chosen by ``split_seed``, becomes the validation split. ``num_workers`` is for ``DataLoader``
    -backed splits (imagefolder, imagenet), ``image_size`` the square side imagefolder resizes
    to, ``crop_size`` and ``resize_size`` imagenet's crop side and the shorter side it resizes
    evaluation images to before the centre crop, ``cache_dir`` where generated data (mnist1d)
    and tokenised text (glue) is cached (default: :func:`default_cache_dir`), and ``models`` the
    models the data is for (``glue:TASK`` is tokenised with their ``hf:`` model's tokenizer).

    Every user mistake (unknown name, bad value, missing or corrupt files) raises
    :class:`~sopkit.errors.UserError`. Splits are on the CPU; use :meth:`DataSplits.to`.
    """
    spec = dataset_spec(name)

    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, int | float)
        or not 0.0 < val_fraction < 1.0  # also rejects NaN
    ):
        raise UserError(
            f"val_fraction must be a number strictly between 0 and 1, got {val_fraction!r}."
        )
    if (
        isinstance(split_seed, bool)
        or not isinstance(split_seed, int)
        or not 0 <= split_seed < 2**63
    ):
        raise UserError(f"split_seed must be an integer in [0, 2**63), got {split_seed!r}.")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"num_workers must be a non-negative integer, got {num_workers!r}.")
    for option, size in (
        ("image_size", image_size),
        ("crop_size", crop_size),
        ("resize_size", resize_size),
    ):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise UserError(f"{option} must be a positive integer, got {size!r}.")

    opts = LoadOptions(
        # An empty string is as good as no directory at all (e.g. an unset environment variable).
        data_dir=Path(data_dir).expanduser() if data_dir not in (None, "") else None,
        val_fraction=float(val_fraction),
        split_seed=split_seed,
        download=bool(download),
        num_workers=num_workers,
        cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(),
        image_size=image_size,
        crop_size=crop_size,
        resize_size=resize_size,
        models=tuple(models),
        parameters=split_parameters(name)[1],
    )
    return spec.loader(opts)
