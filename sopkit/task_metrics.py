"""The names of the metrics a data set is scored with, and which data set uses which. No torch here:
the reports read these names (to label their columns) without importing torch.

A data set's metric is the number its validation split chooses learning rates on and its test split
reports (:mod:`sopkit.data.metrics` computes them). Every metric is "higher is better" and, like
accuracy, shown in the reports multiplied by 100. The GLUE tasks use the metrics of the GLUE
benchmark (and the paper's Table 4); a task scored by two numbers (MRPC and QQP: F1 and accuracy;
STS-B: Pearson and Spearman correlation) is chosen on their mean, GLUE's score for that task, and
records both in the trial's ``extra``.
"""

from __future__ import annotations

__all__ = [
    "GLUE_TASK_METRICS",
    "METRIC_COMPONENTS",
    "METRIC_LABELS",
    "METRIC_NAMES",
    "REGRESSION_METRICS",
    "dataset_metric",
    "metric_label",
    "metric_name",
]

#: Column labels of the metrics (the reports put "test" before and "(%)" after them).
METRIC_LABELS: dict[str, str] = {
    "accuracy": "acc.",
    "matthews": "Matthews corr.",
    "f1-accuracy": "F1/acc. mean",
    "pearson-spearman": "Pearson/Spearman mean",
}

#: The numbers each metric is the mean of (recorded apart in a trial's ``extra``).
METRIC_COMPONENTS: dict[str, tuple[str, ...]] = {
    "accuracy": ("accuracy",),
    "matthews": ("matthews",),
    "f1-accuracy": ("f1", "accuracy"),
    "pearson-spearman": ("pearson", "spearman"),
}

#: Metrics of regression tasks: the model has one output, trained with the mean squared error.
REGRESSION_METRICS: frozenset[str] = frozenset({"pearson-spearman"})

#: The metric of each GLUE task (MNLI: the matched validation set).
GLUE_TASK_METRICS: dict[str, str] = {
    "cola": "matthews",
    "sst2": "accuracy",
    "mrpc": "f1-accuracy",
    "qqp": "f1-accuracy",
    "stsb": "pearson-spearman",
    "mnli": "accuracy",
    "qnli": "accuracy",
    "rte": "accuracy",
}


def dataset_metric(dataset: str) -> str:
    """The metric the data set named ``dataset`` (as a user types it) is scored with."""
    name = dataset.strip().lower()
    if name.startswith("glue:"):
        return GLUE_TASK_METRICS.get(name.removeprefix("glue:"), "accuracy")
    return "accuracy"


def metric_label(dataset: str) -> str:
    """The column label of the data set's metric: ``acc.`` for most, ``Matthews corr.`` for CoLA."""
    return METRIC_LABELS[dataset_metric(dataset)]


#: The metrics' names in words, for axis labels.
METRIC_NAMES: dict[str, str] = {
    "accuracy": "accuracy",
    "matthews": "Matthews correlation",
    "f1-accuracy": "F1/accuracy mean",
    "pearson-spearman": "Pearson/Spearman mean",
}


def metric_name(dataset: str) -> str:
    """The data set's metric in words: ``accuracy``, ``Matthews correlation`` for CoLA, ..."""
    return METRIC_NAMES[dataset_metric(dataset)]
