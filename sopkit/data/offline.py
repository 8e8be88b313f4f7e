"""The data sets that need no files: mnist1d (generated from code, cached) and sklearn's digits.

Both are small vector data sets, loaded whole into :class:`~sopkit.data.splits.TensorSplit`\\ s and
standardised per feature with the statistics of their train part. mnist1d and scikit-learn are
imported inside the loader that needs them: each takes seconds to import.
"""

from __future__ import annotations

import importlib.metadata
import random
from typing import Any

import numpy as np
import torch

from sopkit.data.cache import ArrayCache
from sopkit.data.parameters import mnist1d_samples
from sopkit.data.prepare import LoadOptions, vector_splits
from sopkit.data.splits import DataSplits

__all__ = ["load_digits", "load_mnist1d"]

# Bump when the cached arrays change meaning (dtype, keys), so old caches are not reused.
_MNIST1D_CACHE_FORMAT = 1
_MNIST1D_KEYS = ("x", "y", "x_test", "y_test")

_DIGITS_TEST_FRACTION = 0.2
_DIGITS_TEST_SEED = 0  # fixed on purpose: the test set must not move with split_seed


def _mnist1d_arrays(cache: ArrayCache, samples: int | None = None) -> dict[str, np.ndarray]:
    """The mnist1d arrays for the package's default recipe (``samples`` in all: the recipe's own
    when None), from the cache or freshly generated."""
    from mnist1d import data as mnist1d_data  # lazy: it pulls in matplotlib

    args = mnist1d_data.get_dataset_args()
    if samples is not None:  # part of the recipe, so of the cache key
        args.num_samples = samples
    # The URL only matters for downloading, which we never do; everything else shapes the data.
    recipe: dict[str, Any] = {k: v for k, v in vars(args).items() if k != "url"}
    try:
        # The generator code itself may change between releases, not only its arguments.
        recipe["mnist1d_version"] = importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:
        recipe["mnist1d_version"] = "unknown"
    recipe["cache_format"] = _MNIST1D_CACHE_FORMAT

    def generate() -> dict[str, np.ndarray]:
        # make_dataset reseeds Python's and NumPy's global RNGs (mnist1d.utils.set_seed); restore
        # them so that loading data does not silently change the caller's random streams.
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            generated = mnist1d_data.make_dataset(args)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        return {
            "x": np.asarray(generated["x"], dtype=np.float32),
            "y": np.asarray(generated["y"], dtype=np.int64),
            "x_test": np.asarray(generated["x_test"], dtype=np.float32),
            "y_test": np.asarray(generated["y_test"], dtype=np.int64),
        }

    return cache.get_or_make("mnist1d", recipe, _MNIST1D_KEYS, generate)


def load_mnist1d(opts: LoadOptions) -> DataSplits:
    """MNIST-1D (Greydanus 2020): 40-sample 1-D signals of 10 digit templates, generated offline."""
    arrays = _mnist1d_arrays(ArrayCache(opts.cache_dir), mnist1d_samples(opts.parameters))
    return vector_splits(
        "mnist1d",
        torch.from_numpy(arrays["x"]),
        torch.from_numpy(arrays["y"]),
        torch.from_numpy(arrays["x_test"]),
        torch.from_numpy(arrays["y_test"]),
        num_classes=10,
        opts=opts,
    )


def load_digits(opts: LoadOptions) -> DataSplits:
    """scikit-learn's 1,797 8x8 handwritten digits, flattened to 64 features."""
    from sklearn.datasets import load_digits as sklearn_digits  # lazy: sklearn is slow to import
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    # sklearn ships no test split, so carve a fixed, stratified one; val is carved later from
    # the rest, like every other data set.
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.data,
        bunch.target,
        test_size=_DIGITS_TEST_FRACTION,
        random_state=_DIGITS_TEST_SEED,
        stratify=bunch.target,
    )
    return vector_splits(
        "digits",
        torch.as_tensor(x_train, dtype=torch.float32),
        torch.as_tensor(y_train, dtype=torch.int64),
        torch.as_tensor(x_test, dtype=torch.float32),
        torch.as_tensor(y_test, dtype=torch.int64),
        num_classes=10,
        opts=opts,
    )
