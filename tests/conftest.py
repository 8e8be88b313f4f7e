"""Shared fixtures: a tiny, learnable, in-memory classification task."""

from __future__ import annotations

import pytest
import torch
from blobs import make_blobs

from sopkit.data import DataSplits, TensorSplit

# The tiny models under test gain nothing from intra-op threads, and two OpenMP threads on a busy
# 2-core machine spin-wait each other into 100x slowdowns. Worker processes of `--jobs` get one
# thread each too, so results in and out of workers are computed the same way.
torch.set_num_threads(1)


@pytest.fixture
def tiny_data() -> DataSplits:
    """240 training, 60 validation and 100 test examples of 12-dim blobs in 4 classes."""
    splits = [make_blobs(n, 12, 4, seed) for n, seed in ((240, 0), (60, 1), (100, 2))]
    train, val, test = (TensorSplit(x, y) for x, y in splits)
    return DataSplits("blobs", (12,), 4, train, val, test)
