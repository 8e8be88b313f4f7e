"""How a model is scored on a split and trained on a data set whose metric is not accuracy.

A :class:`~sopkit.data.splits.DataSplits` names its ``metric`` (one of
:data:`sopkit.task_metrics.METRIC_LABELS`, ``"accuracy"`` by default) and its ``loss``
(``"cross-entropy"`` by default, ``"mse"`` for a regression task such as STS-B). The training loop
scores with :func:`score` and the strategies' default loss is :func:`task_loss`, so a data set
carries both and no strategy has to know about GLUE. This module imports nothing from the training
loop (it is imported by it).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sopkit.data.splits import DataSplits, Split
from sopkit.errors import UserError
from sopkit.task_metrics import METRIC_COMPONENTS

__all__ = [
    "LOSSES",
    "collect_outputs",
    "metric_components",
    "metric_details",
    "score",
    "task_loss",
]

#: The training losses a data set may ask for.
LOSSES: tuple[str, ...] = ("cross-entropy", "mse")


def task_loss(
    outputs: torch.Tensor, targets: torch.Tensor, loss: str, *, label_smoothing: float = 0.0
) -> torch.Tensor:
    """The training loss of one batch for a data set's ``loss``: cross-entropy of the logits
    (label-smoothed as configured), or the mean squared error of a one-output regression."""
    if loss == "mse":
        if outputs.dim() == 2 and outputs.shape[1] == 1:
            outputs = outputs.squeeze(1)
        return F.mse_loss(outputs.float(), targets.float())
    if loss != "cross-entropy":
        raise UserError(f"Unknown loss {loss!r}. Valid: {', '.join(LOSSES)}.")
    return F.cross_entropy(outputs, targets, label_smoothing=label_smoothing)


@torch.no_grad()
def collect_outputs(
    model: nn.Module,
    split: Split,
    *,
    batch_size: int,
    autocast: Callable[[torch.device], AbstractContextManager[Any]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every output of ``model`` (put in eval mode) on ``split`` and the targets, on the CPU,
    in the split's order; ``autocast(device)`` wraps each forward (the loop's bf16 setting)."""
    was_training = model.training
    model.eval()
    outputs: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    try:
        for inputs, labels in split.batches(batch_size, shuffle=False):
            with autocast(inputs.device):
                out = model(inputs)
            outputs.append(out.float().cpu())
            targets.append(labels.cpu())
    finally:
        model.train(was_training)
    if not outputs:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(outputs), torch.cat(targets)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    # Undefined for a constant prediction (a model that predicts the mean): scored 0, no better than
    # chance, instead of NaN, which the rate search would read as divergence.
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata  # scipy comes with scikit-learn, a core dependency

    return np.asarray(rankdata(x), dtype=np.float64)


def metric_components(metric: str, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """The numbers ``metric`` is the mean of (:data:`~sopkit.task_metrics.METRIC_COMPONENTS`), each
    in [0, 1] (correlations in [-1, 1]), for model ``outputs`` (logits, or one value per example)."""
    if metric not in METRIC_COMPONENTS:
        raise UserError(f"Unknown metric {metric!r}. Valid: {', '.join(METRIC_COMPONENTS)}.")
    if targets.numel() == 0:
        return dict.fromkeys(METRIC_COMPONENTS[metric], math.nan)
    if metric == "pearson-spearman":
        predicted = outputs.reshape(len(targets), -1)[:, 0].double().numpy()
        truth = targets.double().numpy()
        if not np.isfinite(predicted).all():
            return {"pearson": math.nan, "spearman": math.nan}
        return {
            "pearson": _pearson(predicted, truth),
            "spearman": _pearson(_ranks(predicted), _ranks(truth)),
        }
    if not torch.isfinite(outputs).all():
        return dict.fromkeys(METRIC_COMPONENTS[metric], math.nan)
    predicted_labels = outputs.argmax(dim=1).numpy()
    labels = targets.long().numpy()
    accuracy = float((predicted_labels == labels).mean())
    if metric == "accuracy":
        return {"accuracy": accuracy}
    from sklearn.metrics import f1_score, matthews_corrcoef

    with warnings.catch_warnings():
        # One class only (a tiny split, or a model that predicts one class): the score is
        # defined (0 for MCC), sklearn's warning about the confusion matrix's shape is noise.
        warnings.simplefilter("ignore", UserWarning)
        if metric == "matthews":
            return {"matthews": float(matthews_corrcoef(labels, predicted_labels))}
        # F1 of the positive class (1: "equivalent" / "duplicate"), as GLUE scores MRPC and QQP.
        f1 = float(f1_score(labels, predicted_labels, pos_label=1, zero_division=0.0))
    return {"f1": f1, "accuracy": accuracy}


def score(metric: str, outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The value of ``metric`` (the mean of its components), NaN where the outputs are not finite."""
    components = metric_components(metric, outputs, targets)
    return sum(components.values()) / len(components)


def metric_details(
    model: nn.Module,
    data: DataSplits,
    *,
    batch_size: int,
    autocast: Callable[[torch.device], AbstractContextManager[Any]],
) -> dict[str, float]:
    """The components of ``data.metric`` on val and test (``{"val_f1": ..., "test_accuracy":
    ...}``), for a trial's ``extra``; empty for a data set scored by accuracy alone."""
    if data.metric == "accuracy":
        return {}
    details: dict[str, float] = {}
    for name in ("val", "test"):
        outputs, targets = collect_outputs(
            model, getattr(data, name), batch_size=batch_size, autocast=autocast
        )
        for key, value in metric_components(data.metric, outputs, targets).items():
            details[f"{name}_{key}"] = value
    return details
