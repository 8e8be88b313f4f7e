"""The optimizer and the learning-rate schedule every training uses, built from its ``TrainConfig``."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn

from sopkit.training.config import TrainConfig

__all__ = ["make_optimizer", "make_schedule"]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam or SGD with momentum over the trainable parameters.

    torch's fused kernels are used where the parameters' device has them (CPU and CUDA), the
    multi-tensor (foreach) kernels elsewhere. Fused makes one pass over each tensor instead of one
    per arithmetic operation, several times faster on the CPU (BENCHMARKS.md). The two differ only
    in rounding.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    lr, wd = config.learning_rate, config.weight_decay

    def build(fused: bool) -> torch.optim.Optimizer:
        # Exactly one of the two kernels is asked for (torch rejects fused and foreach together).
        use_fused, use_foreach = (True, None) if fused else (None, True)
        if config.optimizer == "adam":
            return torch.optim.Adam(
                parameters, lr=lr, weight_decay=wd, fused=use_fused, foreach=use_foreach
            )
        return torch.optim.SGD(
            parameters,
            lr=lr,
            momentum=config.momentum,
            weight_decay=wd,
            fused=use_fused,
            foreach=use_foreach,
        )

    try:
        return build(fused=True)
    except RuntimeError:  # a device (or torch version) without fused kernels
        return build(fused=False)


def make_schedule(
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    total_steps: int,
    steps_per_epoch: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate of every step, as a multiplier of ``config.learning_rate``.

    - ``constant``: 1.
    - ``step``: ``lr_decay ** k`` after ``k`` drops. The drops are at the start of each epoch in
      ``config.milestones`` (step ``m * steps_per_epoch``, exactly), or without milestones at 1/3
      and 2/3 of the steps (the paper's ResNet recipe drops at epochs 30 and 60 of 90).
    - ``cosine``: from 1 to 0 over the steps after the warm-up.

    A warm-up of ``lr_warmup_epochs`` (``n`` steps) multiplies step ``k`` (from 0) by
    ``(k + 1) / n``, so its last step trains at the full rate. ``steps_per_epoch`` defaults to ``total_steps /
    epochs`` (the loop's ``total_steps`` is a whole number of epochs).
    """
    if steps_per_epoch is None:
        steps_per_epoch = max(1, total_steps // config.epochs)
    warmup = config.lr_warmup_epochs * steps_per_epoch
    factor: Callable[[int], float]
    if config.schedule == "constant":
        factor = _constant
    elif config.schedule == "step":
        # Integers where the drops are at epochs: the rate changes exactly at an epoch's first step.
        drops: tuple[float, ...] = (
            tuple(m * steps_per_epoch for m in config.milestones)
            if config.milestones
            else (total_steps / 3, 2 * total_steps / 3)
        )
        factor = functools.partial(_step, drops=drops, decay=config.lr_decay)
    else:
        factor = functools.partial(_cosine, start=warmup, span=max(1, total_steps - warmup))
    if warmup:
        factor = functools.partial(_warmed_up, factor=factor, warmup=warmup)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _constant(step: int) -> float:
    return 1.0


def _step(step: int, *, drops: tuple[float, ...], decay: float) -> float:
    return decay ** sum(step >= d for d in drops)


def _cosine(step: int, *, start: int, span: int) -> float:
    done = min(max(step - start, 0), span)
    return 0.5 * (1 + math.cos(math.pi * done / span))


def _warmed_up(step: int, *, factor: Callable[[int], float], warmup: int) -> float:
    return factor(step) * ((step + 1) / warmup if step < warmup else 1.0)
