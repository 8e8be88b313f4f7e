"""Where and how repeatably a run computes: device selection, seeding, bf16 autocast."""

from __future__ import annotations

import contextlib
import random
from typing import Any

import torch

from sopkit.errors import UserError
from sopkit.training.config import DEFAULT_DEVICE

__all__ = ["autocast", "seed_everything", "select_device"]


#: The device types sopkit trains on; torch knows others (meta, xla, hpu...) that it cannot use.
TRAINABLE_TYPES = ("cpu", "cuda", "mps")
_VALID = "auto, cpu, cuda, cuda:N, mps"


def select_device(name: str = DEFAULT_DEVICE) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; any other name must be a device sopkit can train on
    that is available here. Anything else is a UserError, before a model or a batch is built."""
    if not isinstance(name, str):
        raise UserError(f"--device must be a device name ({_VALID}), got {name!r}.")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"Unknown device {name!r}. Valid devices: {_VALID}.") from None
    if device.type not in TRAINABLE_TYPES:
        why = (" 'meta' tensors have shapes but no data, so nothing can be trained on them."
               if device.type == "meta" else "")
        raise UserError(
            f"--device {name}: sopkit cannot train on {device.type!r} devices.{why} Valid devices: "
            f"{_VALID}."
        )
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise UserError(f"--device {name}: the CPU is one device; use --device cpu.")
        device = torch.device("cpu")  # "cpu:0" is "cpu": tensors report the latter
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {name} asks for CUDA, but no CUDA device is available here."
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(
                f"--device {name}: there {'is' if count == 1 else 'are'} {count} CUDA "
                f"device{'' if count == 1 else 's'} here (cuda:0..cuda:{count - 1})."
            )
    if device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"--device {name} asks for MPS, but MPS is not available here.")
        if device.index not in (None, 0):
            raise UserError(f"--device {name}: there is one MPS device; use --device mps.")
    try:  # a device that exists can still refuse work (a broken driver, a busy GPU)
        torch.ones(1, device=device).add_(1)
    except Exception as error:  # torch raises RuntimeError and others here
        raise UserError(f"--device {name} cannot be used: {type(error).__name__}: {error}") from None
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
