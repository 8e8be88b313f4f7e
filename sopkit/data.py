"""The data sets a user can name on the command line, and the splits a training run consumes.

``load_dataset(name, ...)`` returns a :class:`DataSplits`: train, validation and test splits plus the
per-example input shape and the number of classes. Every split has the same small interface
(:class:`Split`): ``len()``, ``batches(batch_size, shuffle=..., generator=...)`` and ``to(device)``.

Two kinds of split exist:

* :class:`TensorSplit` keeps the whole split as two tensors on one device and slices batches out of
  them, shuffling with ``torch.randperm`` on that device (the way KellerJordan/cifar10-airbench
  does). For small data sets this is far faster than a ``DataLoader``: no worker processes, no
  per-example Python, no host-to-device copy per batch.
* :class:`LoaderSplit` wraps a file-backed ``torch.utils.data.Dataset`` and batches it with a
  ``DataLoader`` (worker processes, pinned memory), for data that should not sit in memory whole.

The validation split is always carved out of the *training* set (seeded by ``split_seed``); the test
set is never used for model selection.

Importing this module is cheap on purpose: torchvision, scikit-learn and mnist1d each take seconds
to import, so they are imported inside the loader that needs them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import pickle
import random
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from sopkit.errors import UserError, unknown_name

__all__ = [
    "DATASETS",
    "DataSplits",
    "DatasetSpec",
    "LoaderSplit",
    "Split",
    "TensorSplit",
    "available_datasets",
    "default_cache_dir",
    "load_dataset",
]

Batch = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class Split(Protocol):
    """One of train / val / test: something a training loop can measure and iterate in batches."""

    def __len__(self) -> int: ...

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """One epoch of ``(inputs, labels)`` batches; the last batch may be smaller."""
        ...

    def to(self, device: torch.device | str) -> Split:
        """A split with the same examples whose batches live on ``device``."""
        ...


def _check_batch_size(batch_size: int) -> None:
    # batch_size usually comes straight from the command line, so a bad one is the user's mistake.
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size!r}.")


def _permutation(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A random permutation of ``range(n)`` on ``device``, drawn from ``generator`` when given."""
    if generator is None:
        return torch.randperm(n, device=device)
    if generator.device.type == device.type:
        return torch.randperm(n, generator=generator, device=device)
    # randperm refuses a generator that lives on another device type (a CPU generator for CUDA
    # data); drawing on the generator's device keeps the order reproducible from that generator,
    # at the cost of one small index copy per epoch.
    return torch.randperm(n, generator=generator, device=generator.device).to(device)


class TensorSplit:
    """An in-memory split: inputs ``x`` of shape ``(N, *input_shape)`` and int64 labels ``y`` (N,).

    Batches are slices (or, when shuffled, index gathers) of the tensors on their own device; no
    ``DataLoader`` and no copies to another device are involved, which is what makes small data
    sets on a GPU fast.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if y.dim() != 1:
            raise ValueError(f"labels must be one-dimensional, got shape {tuple(y.shape)}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
        if x.device != y.device:
            raise ValueError(f"inputs on {x.device} but labels on {y.device}")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        return f"TensorSplit(n={len(self)}, x={tuple(self.x.shape)}, device={self.x.device})"

    @property
    def device(self) -> torch.device:
        """The device the examples (and hence every batch) live on."""
        return self.x.device

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """One epoch in batches of ``batch_size``; the last, partial batch is kept.

        With ``shuffle`` the order is a fresh permutation drawn from ``generator`` (so the same
        generator state gives the same order); without it the stored order is kept.
        """
        # Validate now rather than inside the generator, so a bad batch size fails at the call.
        _check_batch_size(batch_size)
        order = _permutation(len(self), generator, self.x.device) if shuffle else None
        return self._iterate(batch_size, order)

    def _iterate(self, batch_size: int, order: torch.Tensor | None) -> Iterator[Batch]:
        for start in range(0, len(self), batch_size):
            if order is None:
                # Plain slices are views: no copy at all for an unshuffled pass (evaluation).
                yield self.x[start : start + batch_size], self.y[start : start + batch_size]
            else:
                index = order[start : start + batch_size]
                yield self.x[index], self.y[index]

    def to(self, device: torch.device | str) -> TensorSplit:
        """This split with its tensors on ``device`` (no copy when they are there already)."""
        device = torch.device(device)
        return TensorSplit(self.x.to(device), self.y.to(device))


class LoaderSplit:
    """A file-backed split: a ``Dataset`` of ``(input, label)`` batched by a ``DataLoader``.

    Each batch is moved to :attr:`device` with ``non_blocking=True``; memory is pinned when the
    device is CUDA so that copy really overlaps with compute. With ``num_workers > 0`` the workers
    are persistent, and the ``DataLoader`` is kept between epochs (for the same batch size, shuffle
    flag and generator) so they are not re-spawned every epoch. :meth:`close` lets them go.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        *,
        num_workers: int = 2,
        device: torch.device | str = "cpu",
    ) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise UserError(f"num_workers must be a non-negative integer, got {num_workers!r}.")
        self.dataset = dataset
        self.num_workers = num_workers
        self.device = torch.device(device)
        self._length = len(dataset)  # type: ignore[arg-type]
        self._loader: DataLoader[Any] | None = None
        self._loader_key: tuple[int, bool, int | None] | None = None

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return f"LoaderSplit(n={len(self)}, num_workers={self.num_workers}, device={self.device})"

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """One epoch in batches of ``batch_size`` (last partial batch kept), on :attr:`device`.

        With ``shuffle`` the ``DataLoader``'s sampler draws its order from ``generator``, which
        also seeds the workers, so the same generator state gives the same epoch.
        """
        _check_batch_size(batch_size)
        return self._iterate(self._get_loader(batch_size, shuffle, generator))

    def _get_loader(
        self, batch_size: int, shuffle: bool, generator: torch.Generator | None
    ) -> DataLoader[Any]:
        # The loader holds a reference to the generator, so its id cannot be recycled while cached.
        key = (batch_size, shuffle, None if generator is None else id(generator))
        if self._loader is None or self._loader_key != key:
            self.close()
            self._loader = DataLoader(
                self.dataset,
                batch_size=batch_size,
                shuffle=shuffle,
                num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=self.num_workers > 0,
                generator=generator,
                drop_last=False,
            )
            self._loader_key = key
        return self._loader

    def _iterate(self, loader: DataLoader[Any]) -> Iterator[Batch]:
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Drop the cached ``DataLoader`` so its persistent worker processes can exit."""
        self._loader = None
        self._loader_key = None

    def to(self, device: torch.device | str) -> LoaderSplit:
        """A split over the same dataset whose batches are moved to ``device``."""
        return LoaderSplit(self.dataset, num_workers=self.num_workers, device=device)


@dataclass
class DataSplits:
    """A loaded data set: its three splits and what a model needs to know about its examples."""

    name: str
    input_shape: tuple[int, ...]  # per example, e.g. (40,) for mnist1d, (3, 32, 32) for cifar10
    num_classes: int
    train: Split
    val: Split  # carved from the training set, never the test set
    test: Split

    def to(self, device: torch.device | str) -> DataSplits:
        """The same data set with every split's batches on ``device``."""
        device = torch.device(device)
        return replace(
            self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device)
        )


# --------------------------------------------------------------------------------------------------
# Shared helpers: validation carving and normalisation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LoadOptions:
    """Everything a loader may need, already validated by :func:`load_dataset`."""

    data_dir: Path | None
    val_fraction: float
    split_seed: int
    download: bool
    num_workers: int
    cache_dir: Path
    image_size: int


def _carve_val(n: int, name: str, opts: _LoadOptions) -> tuple[torch.Tensor, torch.Tensor]:
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


def _vector_splits(
    name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    num_classes: int,
    opts: _LoadOptions,
) -> DataSplits:
    """Carve val from (x, y), standardise every feature with the train part's statistics."""
    train_idx, val_idx = _carve_val(len(y), name, opts)
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


def _image_splits(
    name: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    opts: _LoadOptions,
) -> DataSplits:
    """Carve val from uint8 (N, C, H, W) images; scale to [0, 1]; normalise per channel.

    The carving indexes the uint8 tensor before conversion so that CIFAR-10's 50k images never
    exist twice as float32 (600 MB each).
    """
    train_idx, val_idx = _carve_val(len(labels), name, opts)
    x_train = images[train_idx].float().div_(255.0)
    x_val = images[val_idx].float().div_(255.0)
    x_test = test_images.float().div_(255.0)
    mean = x_train.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
    std = _safe_std(x_train.std(dim=(0, 2, 3), correction=0)).view(1, -1, 1, 1)
    for part in (x_train, x_val, x_test):
        part.sub_(mean).div_(std)
    return DataSplits(
        name=name,
        input_shape=tuple(images.shape[1:]),
        num_classes=num_classes,
        train=TensorSplit(x_train, labels[train_idx]),
        val=TensorSplit(x_val, labels[val_idx]),
        test=TensorSplit(x_test, test_labels),
    )


# --------------------------------------------------------------------------------------------------
# mnist1d: generated from code, cached as .npz
# --------------------------------------------------------------------------------------------------

# Bump when the cached arrays change meaning (dtype, keys), so old caches are not reused.
_MNIST1D_CACHE_FORMAT = 1
_MNIST1D_KEYS = ("x", "y", "x_test", "y_test")


def default_cache_dir() -> Path:
    """Where generated data is cached: $SOPKIT_CACHE_DIR, else $XDG_CACHE_HOME/sopkit, else
    ~/.cache/sopkit."""
    explicit = os.environ.get("SOPKIT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sopkit"


def _read_npz(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The arrays in a cache file, or None when it is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        # Atomic writes make this unlikely, but a damaged cache should be rebuilt, not fatal.
        warnings.warn(f"Ignoring unreadable cache file {path}: {exc}", stacklevel=3)
        return None


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` so that readers see either no file or a complete one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary file must be in the same directory for os.replace to be an atomic rename.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def _mnist1d_arrays(cache_dir: Path) -> dict[str, np.ndarray]:
    """The mnist1d arrays for the package's default recipe, from the cache or freshly generated."""
    from mnist1d import data as mnist1d_data  # lazy: pulls in matplotlib, about 2 s

    args = mnist1d_data.get_dataset_args()
    # The URL only matters for downloading, which we never do; everything else shapes the data.
    recipe: dict[str, Any] = {k: v for k, v in vars(args).items() if k != "url"}
    try:
        # The generator code itself may change between releases, not only its arguments.
        recipe["mnist1d_version"] = importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:
        recipe["mnist1d_version"] = "unknown"
    recipe["cache_format"] = _MNIST1D_CACHE_FORMAT
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()
    path = cache_dir / f"mnist1d-{digest[:16]}.npz"

    cached = _read_npz(path, _MNIST1D_KEYS)
    if cached is not None:
        return cached

    # make_dataset reseeds Python's and NumPy's global RNGs (mnist1d.utils.set_seed); restore
    # them so that loading data does not silently change the caller's random streams.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        generated = mnist1d_data.make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays: dict[str, np.ndarray] = {
        "x": np.asarray(generated["x"], dtype=np.float32),
        "y": np.asarray(generated["y"], dtype=np.int64),
        "x_test": np.asarray(generated["x_test"], dtype=np.float32),
        "y_test": np.asarray(generated["y_test"], dtype=np.int64),
    }
    try:
        _write_npz_atomic(path, arrays)
    except OSError as exc:
        # A read-only or full cache directory costs a regeneration next time, nothing more.
        warnings.warn(f"Could not write the mnist1d cache {path}: {exc}", stacklevel=3)
    return arrays


def _load_mnist1d(opts: _LoadOptions) -> DataSplits:
    """MNIST-1D (Greydanus 2020): 40-sample 1-D signals of 10 digit templates, generated offline."""
    arrays = _mnist1d_arrays(opts.cache_dir)
    return _vector_splits(
        "mnist1d",
        torch.from_numpy(arrays["x"]),
        torch.from_numpy(arrays["y"]),
        torch.from_numpy(arrays["x_test"]),
        torch.from_numpy(arrays["y_test"]),
        num_classes=10,
        opts=opts,
    )


# --------------------------------------------------------------------------------------------------
# digits: scikit-learn's bundled 8x8 digits
# --------------------------------------------------------------------------------------------------

_DIGITS_TEST_FRACTION = 0.2
_DIGITS_TEST_SEED = 0  # fixed on purpose: the test set must not move with split_seed


def _load_digits(opts: _LoadOptions) -> DataSplits:
    """scikit-learn's 1,797 8x8 handwritten digits, flattened to 64 features."""
    from sklearn.datasets import load_digits  # lazy: scikit-learn takes seconds to import
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # sklearn ships no test split, so carve a fixed, stratified one; val is carved later from
    # the rest, like every other data set.
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.data,
        bunch.target,
        test_size=_DIGITS_TEST_FRACTION,
        random_state=_DIGITS_TEST_SEED,
        stratify=bunch.target,
    )
    return _vector_splits(
        "digits",
        torch.as_tensor(x_train, dtype=torch.float32),
        torch.as_tensor(y_train, dtype=torch.int64),
        torch.as_tensor(x_test, dtype=torch.float32),
        torch.as_tensor(y_test, dtype=torch.int64),
        num_classes=10,
        opts=opts,
    )


# --------------------------------------------------------------------------------------------------
# torchvision sets read from a local directory
# --------------------------------------------------------------------------------------------------

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


def _require_data_dir(name: str, opts: _LoadOptions) -> Path:
    """The data directory for a file-backed set, or a UserError saying what to pass."""
    if opts.data_dir is None:
        raise UserError(
            f"The {name} data set is read from a local directory, and none was given. "
            f"Pass --data-dir PATH (add --download to fetch {name} there when the network allows)."
        )
    root = opts.data_dir
    if root.exists() and not root.is_dir():
        raise UserError(f"The data directory {root} for {name} is a file, not a directory.")
    if not root.exists():
        if not opts.download:
            raise UserError(
                f"The data directory {root} for {name} does not exist. Pass --data-dir with an "
                f"existing directory, or add --download to fetch {name} into it."
            )
        # Downloading into a fresh directory is the normal first use of --download.
        try:
            root.mkdir(parents=True)
        except OSError as exc:
            raise UserError(f"Could not create the data directory {root}: {exc}") from exc
    return root


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


def _load_cifar10(opts: _LoadOptions) -> DataSplits:
    """CIFAR-10 from ``<data_dir>/cifar-10-batches-py`` (the python-pickle release)."""
    root = _require_data_dir("cifar10", opts)
    from torchvision.datasets import CIFAR10  # lazy: torchvision takes seconds to import

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
    return _image_splits(
        "cifar10", images, labels, test_images, test_labels, num_classes=num_classes, opts=opts
    )


def _load_mnist_family(name: str, class_name: str, opts: _LoadOptions) -> DataSplits:
    """MNIST or Fashion-MNIST from ``<data_dir>/<class_name>/raw`` (decompressed idx files)."""
    root = _require_data_dir(name, opts)
    import torchvision.datasets  # lazy: torchvision takes seconds to import

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
    return _image_splits(
        name,
        train_ds.data.unsqueeze(1),  # (N, 28, 28) uint8 -> (N, 1, 28, 28)
        train_ds.targets.to(torch.int64),
        test_ds.data.unsqueeze(1),
        test_ds.targets.to(torch.int64),
        num_classes=len(train_ds.classes),
        opts=opts,
    )


def _load_mnist(opts: _LoadOptions) -> DataSplits:
    """MNIST handwritten digits, 28x28 grey."""
    return _load_mnist_family("mnist", "MNIST", opts)


def _load_fashion_mnist(opts: _LoadOptions) -> DataSplits:
    """Fashion-MNIST clothing images, 28x28 grey."""
    return _load_mnist_family("fashion-mnist", "FashionMNIST", opts)


# --------------------------------------------------------------------------------------------------
# imagefolder: file-backed, streamed through a DataLoader
# --------------------------------------------------------------------------------------------------


def _load_imagefolder(opts: _LoadOptions) -> DataSplits:
    """Images in ``<data_dir>/{train,test}/<class>/<image>``, resized to a square, RGB in [0, 1]."""
    root = _require_data_dir("imagefolder", opts)
    layout = (
        f"{root}/train/<class>/<image> and {root}/test/<class>/<image> "
        "(one subfolder per class, the same class names in both)"
    )
    missing = [sub for sub in ("train", "test") if not (root / sub).is_dir()]
    if missing:
        folders = ", ".join(str(root / sub) for sub in missing)
        raise UserError(f"imagefolder: missing folder(s) {folders}. Expected the layout {layout}.")

    from torchvision import transforms  # lazy: torchvision takes seconds to import
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

    train_idx, val_idx = _carve_val(len(train_full), "imagefolder", opts)

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


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """A data set a user can name: what it is and how to load it."""

    name: str
    description: str
    needs_data_dir: bool  # True for the sets read from files under --data-dir
    loader: Callable[..., DataSplits]  # internal: takes a _LoadOptions
    # `sopkit compare` trains this many epochs when --epochs is not given: enough for the small
    # offline sets to converge (MK needs more steps than the baseline, paper Section 5).
    default_epochs: int = 30


def _registry(*specs: DatasetSpec) -> dict[str, DatasetSpec]:
    return {spec.name: spec for spec in specs}


DATASETS: dict[str, DatasetSpec] = _registry(
    DatasetSpec(
        "mnist1d",
        "MNIST-1D: 1-D signals of length 40, 10 classes, generated offline (default).",
        needs_data_dir=False,
        loader=_load_mnist1d,
        default_epochs=200,
    ),
    DatasetSpec(
        "digits",
        "scikit-learn 8x8 digits as 64 features, 10 classes, offline; fixed 20% test set.",
        needs_data_dir=False,
        loader=_load_digits,
        default_epochs=100,
    ),
    DatasetSpec(
        "mnist",
        "MNIST 28x28 grey digits, 10 classes, from <data-dir>/MNIST/raw.",
        needs_data_dir=True,
        loader=_load_mnist,
    ),
    DatasetSpec(
        "fashion-mnist",
        "Fashion-MNIST 28x28 grey clothing, 10 classes, from <data-dir>/FashionMNIST/raw.",
        needs_data_dir=True,
        loader=_load_fashion_mnist,
    ),
    DatasetSpec(
        "cifar10",
        "CIFAR-10 32x32 colour images, 10 classes, from <data-dir>/cifar-10-batches-py.",
        needs_data_dir=True,
        loader=_load_cifar10,
    ),
    DatasetSpec(
        "imagefolder",
        "Your images in <data-dir>/{train,test}/<class>/, resized square, via a DataLoader.",
        needs_data_dir=True,
        loader=_load_imagefolder,
    ),
)


def dataset_spec(name: str) -> DatasetSpec:
    """The registry entry for a name a user typed (UserError, listing the valid names, if none)."""
    if not isinstance(name, str):
        raise UserError(f"A data set name must be a string, got {name!r}.")
    # Forgive case and an underscore for the dash ("Fashion_MNIST"): both are common spellings.
    spec = DATASETS.get(name.strip().lower().replace("_", "-"))
    if spec is None:
        raise unknown_name("dataset", name, DATASETS)
    return spec


def available_datasets() -> list[str]:
    """The names :func:`load_dataset` accepts, in registry order."""
    return list(DATASETS)


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
) -> DataSplits:
    """Load a data set by the name a user typed, with validation carved from its training set.

    ``data_dir`` is where file-backed sets live (required for them, ignored by the others);
    ``download`` lets torchvision fetch missing files there. ``val_fraction`` of the training set,
    chosen by ``split_seed``, becomes the validation split. ``num_workers`` is for ``DataLoader``
    -backed splits (imagefolder), ``image_size`` the square side imagefolder resizes to, and
    ``cache_dir`` where generated data (mnist1d) is cached (default: :func:`default_cache_dir`).

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
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"image_size must be a positive integer, got {image_size!r}.")

    opts = _LoadOptions(
        # An empty string is as good as no directory at all (e.g. an unset environment variable).
        data_dir=Path(data_dir).expanduser() if data_dir not in (None, "") else None,
        val_fraction=float(val_fraction),
        split_seed=split_seed,
        download=bool(download),
        num_workers=num_workers,
        cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(),
        image_size=image_size,
    )
    return spec.loader(opts)
