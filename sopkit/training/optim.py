"""The optimizer and the learning-rate schedule every training uses, built from its ``TrainConfig``."""

from __future__ import annotations

import math

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
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step multiplier: constant; step (x0.1 at 1/3 and 2/3 of training, as the paper's
    ResNet recipe drops at epochs 30 and 60 of 90); or cosine to zero."""
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if config.schedule == "step":
        milestones = (total_steps / 3, 2 * total_steps / 3)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.1 ** sum(step >= m for m in milestones)
        )
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
