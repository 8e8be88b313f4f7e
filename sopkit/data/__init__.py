"""The data sets a user can name on the command line, and the splits a training run consumes.

Where things live:

* :mod:`sopkit.data.splits`: the :class:`Split` protocol, :class:`TensorSplit` (in memory, batches
  sliced on the device), :class:`LoaderSplit` (file-backed, through a ``DataLoader``) and
  :class:`DataSplits` (train, val and test with the input shape and class count).
* :mod:`sopkit.data.registry`: :data:`DATASETS`, the names a user types, and :func:`load_dataset`.
* :mod:`sopkit.data.offline` (mnist1d, digits), :mod:`sopkit.data.vision` (CIFAR-10, MNIST,
  Fashion-MNIST), :mod:`sopkit.data.folder` (imagefolder), :mod:`sopkit.data.imagenet`: the loaders.
* :mod:`sopkit.data.augment`: the per-image crop and flip the training loop applies to in-memory
  training batches (``--augment standard``); :mod:`sopkit.data.pipeline`: the seeded per-sample
  transforms of the file-backed splits' ``DataLoader`` workers.
* :mod:`sopkit.data.prepare`: the validation carve and normalisation every loader shares;
  :mod:`sopkit.data.cache`: the on-disk cache of generated data.

Importing this package is cheap on purpose: torchvision, scikit-learn and mnist1d are imported
inside the loader that needs them.
"""

from sopkit.data.augment import AUGMENTS, CropFlip
from sopkit.data.cache import default_cache_dir
from sopkit.data.registry import DATASETS, DatasetSpec, dataset_spec, load_dataset
from sopkit.data.splits import Batch, DataSplits, LoaderSplit, Split, TensorSplit

__all__ = [
    "AUGMENTS",
    "DATASETS",
    "Batch",
    "CropFlip",
    "DataSplits",
    "DatasetSpec",
    "LoaderSplit",
    "Split",
    "TensorSplit",
    "dataset_spec",
    "default_cache_dir",
    "load_dataset",
]
