"""Where and how repeatably a run computes: device selection, seeding, bf16 autocast."""

from __future__ import annotations

import contextlib
import random
from typing import Any

import torch

from sopkit.errors import UserError
from sopkit.training.config import DEFAULT_DEVICE

__all__ = ["autocast", "seed_everything", "select_device"]


def select_device(name: str = DEFAULT_DEVICE) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; any other name must be available here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(
            f"Unknown device {name!r}. Valid devices: auto, cpu, cuda, cuda:N, mps."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asks for CUDA, but no CUDA device is available here.")
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise UserError(f"--device {name} asks for MPS, but MPS is not available here.")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device) so a run is repeatable."""
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on ``device`` when ``bf16``, else a context that does nothing."""
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
