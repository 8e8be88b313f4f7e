"""A tiny, learnable classification task made from code: Gaussian blobs (no files needed).

A module of its own, not conftest: tests and the processes they spawn import it by name, and
`baselines/tests` has a conftest of its own.
"""

from __future__ import annotations

import torch


def make_blobs(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around fixed class centres: learnable in a few epochs, no files needed."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234)) * 2
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=generator)
    x = centres[y] + torch.randn(n, dim, generator=generator)
    return x, y
