"""GLUE tasks as sopkit data sets: ``--dataset glue:TASK`` (cola, sst2, mrpc, qqp, stsb, mnli, qnli,
rte), read through Hugging Face ``datasets`` and tokenised with the compared model's tokenizer.

Where the examples come from:

* with ``--data-dir DIR``: local files ``DIR/<task>/train.<ext>`` and ``DIR/<task>/validation.<ext>``
  (MNLI: ``validation_matched.<ext>``), ``<ext>`` one of tsv, csv, jsonl, json, parquet, with the
  column names of the Hugging Face ``nyu-mll/glue`` data set (``sentence``; ``sentence1`` and
  ``sentence2``; ``question1`` and ``question2``; ``premise`` and ``hypothesis``; ``question`` and
  ``sentence``) and ``label``;
* without it: ``nyu-mll/glue`` from the Hugging Face cache (``--download`` fetches it, and the
  model with it).

Splits. GLUE's test labels are hidden, so, as is common practice for GLUE fine-tuning, the GLUE
validation set (MNLI: validation-matched) is the *test* split, and sopkit's validation split, on
which the protocol chooses learning rates, is carved from the training set (``val_fraction``,
seeded by ``split_seed``) like every other sopkit data set: nothing is chosen on the reported set.

The data depends on the model. Each example is tokenised with the tokenizer of the comparison's
``hf:`` model (the runner passes the models it compares, ``LoadOptions.models``; models whose
tokenizers differ are refused: compare them in separate runs), truncated to :data:`MAX_LENGTH`
tokens, and padded to the longest example. An example is ``(2, L)`` int32: token ids and attention
mask, or ``(3, L)`` with the segment ids where the tokenizer's model reads them (BERT's
``token_type_ids``): what ``sopkit.models.hf.HFClassifier`` reads. The tokenised tensors are cached under
``<cache-dir>/glue/``, keyed by the task, the tokenizer (its full serialisation) and the source data
(the local files' bytes, or the ``datasets`` fingerprint), so a changed file or tokenizer is
tokenised afresh and a damaged cache file is rebuilt.

Each task carries its metric (:mod:`sopkit.task_metrics`): Matthews correlation for CoLA, the mean
of F1 and accuracy for MRPC and QQP, of Pearson and Spearman correlation for STS-B (a regression:
one output, mean squared error), accuracy elsewhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sopkit.data.prepare import LoadOptions, carve_val
from sopkit.data.splits import DataSplits, TensorSplit
from sopkit.errors import UserError
from sopkit.files import write_atomic
from sopkit.models.hf import HF_PREFIX, fetch, load_tokenizer
from sopkit.task_metrics import GLUE_TASK_METRICS, REGRESSION_METRICS

__all__ = ["GLUE_TASKS", "MAX_LENGTH", "GlueTask", "load_glue"]

#: Examples are truncated to this many tokens (BERT's and T5's GLUE fine-tuning use 128 to 512).
MAX_LENGTH = 128

#: The hub data set read when no --data-dir is given.
HUB_DATASET = "nyu-mll/glue"

# Bumped when the cached tensors change meaning, so old cache files are not read.
_CACHE_FORMAT = 2

_EXTENSIONS = ("tsv", "csv", "jsonl", "json", "parquet")


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: its text columns, number of labels (1: regression) and the split reported."""

    name: str
    columns: tuple[str, ...]  # one or two text columns
    num_labels: int
    test_split: str = "validation"  # GLUE's test labels are hidden: its validation set is ours

    @property
    def metric(self) -> str:
        return GLUE_TASK_METRICS[self.name]


GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask("cola", ("sentence",), 2),
        GlueTask("sst2", ("sentence",), 2),
        GlueTask("mrpc", ("sentence1", "sentence2"), 2),
        GlueTask("qqp", ("question1", "question2"), 2),
        GlueTask("stsb", ("sentence1", "sentence2"), 1),
        GlueTask("mnli", ("premise", "hypothesis"), 3, "validation_matched"),
        GlueTask("qnli", ("question", "sentence"), 2),
        GlueTask("rte", ("sentence1", "sentence2"), 2),
    )
}


def _datasets() -> Any:
    """The ``datasets`` module, or a UserError (exit 2) that says how to install it."""
    try:
        import datasets
    except ImportError as error:
        raise UserError(
            f"GLUE needs the optional extra 'hf' (datasets): pip install 'sopkit[hf]'. ({error})"
        ) from None
    return datasets


def _local_files(task: GlueTask, root: Path) -> dict[str, Path]:
    """The train and test files of ``task`` under ``root`` (UserError naming what was looked for)."""
    folder = root / task.name
    files: dict[str, Path] = {}
    for split in ("train", task.test_split):
        found = [folder / f"{split}.{ext}" for ext in _EXTENSIONS if (folder / f"{split}.{ext}").is_file()]
        if not found:
            raise UserError(
                f"No {split} file for glue:{task.name} in {folder}: expected {split}.<ext> with "
                f"<ext> one of {', '.join(_EXTENSIONS)} (columns {', '.join(task.columns)}, label). "
                "Without --data-dir the task is read from the Hugging Face cache."
            )
        if len(found) > 1:
            raise UserError(
                f"Several {split} files for glue:{task.name} in {folder}: "
                f"{', '.join(p.name for p in found)}; keep one."
            )
        files[split] = found[0]
    return files


def _file_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _read_local(task: GlueTask, files: dict[str, Path], opts: LoadOptions) -> dict[str, Any]:
    """The splits of ``files`` as ``datasets`` Datasets (arrow files cached under the cache dir)."""
    datasets = _datasets()

    suffix = files["train"].suffix.lstrip(".")
    if any(path.suffix.lstrip(".") != suffix for path in files.values()):
        raise UserError(f"The glue:{task.name} files must share one format: {sorted(files.values())}.")
    builder = {"tsv": "csv", "jsonl": "json"}.get(suffix, suffix)
    # GLUE's own tsv files have stray quote characters inside sentences: read them unquoted.
    extra: dict[str, Any] = {"sep": "\t", "quoting": 3} if suffix == "tsv" else {}
    try:
        loaded = datasets.load_dataset(
            builder,
            data_files={split: str(path) for split, path in files.items()},
            cache_dir=str(opts.cache_dir / "hf-datasets"),
            **extra,
        )
    except Exception as error:  # a parser error, an unreadable file: both the user's to fix
        cause = f" ({error.__cause__})" if error.__cause__ is not None else ""
        raise UserError(
            f"Cannot read the glue:{task.name} files {sorted(map(str, files.values()))}: "
            f"{type(error).__name__}: {error}{cause}"
        ) from None
    return {split: loaded[split] for split in files}


def _read_hub(task: GlueTask, opts: LoadOptions) -> dict[str, Any]:
    """The task from the Hugging Face cache (or the network with ``--download``)."""
    datasets = _datasets()

    try:
        loaded = datasets.load_dataset(
            HUB_DATASET,
            task.name,
            download_config=datasets.DownloadConfig(local_files_only=not opts.download),
        )
    except Exception as error:
        hint = "" if opts.download else " Add --download, or give --data-dir with local files."
        raise UserError(
            f"Cannot load {HUB_DATASET} {task.name!r} from the Hugging Face "
            f"{'hub' if opts.download else 'cache'}: {type(error).__name__}: {error}.{hint}"
        ) from None
    return {split: loaded[split] for split in ("train", task.test_split)}


def _tokenizer_for(task: GlueTask, opts: LoadOptions) -> Any:
    """The tokenizer of the compared hf: models (one, shared by all of them)."""
    hf_models = [m for m in opts.models if m.startswith(HF_PREFIX)]
    others = [m for m in opts.models if not m.startswith(HF_PREFIX)]
    if others or not hf_models:
        named = f" ({', '.join(others)} is not one)" if others else ""
        raise UserError(
            f"glue:{task.name} is tokenised with the tokenizer of the model it trains: compare "
            f"hf:NAME_OR_PATH models on it{named}."
        )
    tokenizers = []
    for model in hf_models:
        if opts.download:
            fetch(model)
        tokenizers.append(load_tokenizer(model, download=opts.download))
    digests = {_tokenizer_digest(t) for t in tokenizers}
    if len(digests) > 1:
        raise UserError(
            f"The models {', '.join(hf_models)} tokenise differently; glue:{task.name} is "
            "tokenised once per comparison, so compare them in separate runs."
        )
    return tokenizers[0]


def _tokenizer_digest(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:  # a slow tokenizer: its vocabulary stands for it
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    state = [type(tokenizer).__name__, text, tokenizer.pad_token_id, tokenizer.padding_side]
    return hashlib.sha256(json.dumps(state, default=str).encode()).hexdigest()


def _texts(column: list[Any]) -> list[str]:
    # An empty cell comes back as None (or NaN from a csv reader): tokenise it as empty text.
    return ["" if value is None or value != value else str(value) for value in column]


def _labels(task: GlueTask, split: str, column: list[Any]) -> torch.Tensor:
    if task.num_labels == 1:
        labels = torch.tensor([float("nan") if v is None else float(v) for v in column])
        if not torch.isfinite(labels).all():
            raise UserError(f"glue:{task.name} {split}: some labels are missing or not finite.")
        return labels.float()
    try:
        labels = torch.tensor([int(v) for v in column], dtype=torch.long)
    except (TypeError, ValueError) as error:
        raise UserError(f"glue:{task.name} {split}: a label is not an integer ({error}).") from None
    bad = (labels < 0) | (labels >= task.num_labels)
    if bad.any():
        raise UserError(
            f"glue:{task.name} {split}: {int(bad.sum())} label(s) outside 0..{task.num_labels - 1}, "
            f"e.g. {int(labels[bad][0])} (GLUE's test labels are hidden, -1: its validation set "
            "is sopkit's test split)."
        )
    return labels


Encoded = tuple[list[list[int]], list[list[int]] | None, torch.Tensor]  # ids, segment ids, labels


def _encode(task: GlueTask, split: str, rows: Any, tokenizer: Any) -> Encoded:
    missing = [c for c in (*task.columns, "label") if c not in rows.column_names]
    if missing:
        raise UserError(
            f"glue:{task.name} {split} has no column {', '.join(missing)} (it has "
            f"{', '.join(rows.column_names)})."
        )
    texts = [_texts(rows[c]) for c in task.columns]
    if not texts[0]:
        raise UserError(f"glue:{task.name} {split} has no examples.")
    encoded = tokenizer(*texts, truncation=True, max_length=MAX_LENGTH)
    # Segment ids (BERT's token types) only where the tokenizer says its model reads them.
    segments = encoded.get("token_type_ids") if _uses_segments(tokenizer) else None
    return encoded["input_ids"], segments, _labels(task, split, rows["label"])


def _uses_segments(tokenizer: Any) -> bool:
    return "token_type_ids" in getattr(tokenizer, "model_input_names", ())


def _pad(
    sequences: list[list[int]], segments: list[list[int]] | None, length: int, pad_id: int
) -> torch.Tensor:
    """``(N, 2, length)`` int32: the ids right-padded with ``pad_id`` and the attention mask, and
    with ``segments`` a third row, the segment ids (0 in the padding): ``(N, 3, length)``."""
    out = torch.zeros(len(sequences), 2 if segments is None else 3, length, dtype=torch.int32)
    out[:, 0] = pad_id
    for row, ids in enumerate(sequences):
        out[row, 0, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        out[row, 1, : len(ids)] = 1
        if segments is not None:
            out[row, 2, : len(ids)] = torch.tensor(segments[row], dtype=torch.int32)
    return out


def _tokenise(task: GlueTask, raw: dict[str, Any], tokenizer: Any) -> dict[str, torch.Tensor]:
    encoded = {split: _encode(task, split, rows, tokenizer) for split, rows in raw.items()}
    length = max(len(ids) for sequences, _, _ in encoded.values() for ids in sequences)
    tensors: dict[str, torch.Tensor] = {}
    for split, (sequences, segments, labels) in encoded.items():
        key = "train" if split == "train" else "test"
        pad_id = int(tokenizer.pad_token_id)
        tensors[f"{key}_x"] = _pad(sequences, segments, max(length, 1), pad_id)
        tensors[f"{key}_y"] = labels
    return tensors


def _read_cache(path: Path) -> dict[str, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(tensors, dict) and {"train_x", "train_y", "test_x", "test_y"} <= set(tensors):
            return tensors
    except Exception as error:  # a damaged or truncated file: tokenise again, it is only a cache
        logging.getLogger(__name__).warning("re-tokenising: unreadable cache %s (%s)", path, error)
    return None


def load_glue(task_name: str, opts: LoadOptions) -> DataSplits:
    """The GLUE task ``task_name`` tokenised for the compared model (see the module docstring)."""
    task = GLUE_TASKS[task_name]
    tokenizer = _tokenizer_for(task, opts)
    raw: dict[str, Any] | None = None
    if opts.data_dir is not None:
        files = _local_files(task, opts.data_dir)
        source = _file_digest([files["train"], files[task.test_split]])
    else:
        raw = _read_hub(task, opts)
        source = json.dumps([getattr(raw[s], "_fingerprint", "") for s in sorted(raw)])
    key = json.dumps([_CACHE_FORMAT, task.name, MAX_LENGTH, _tokenizer_digest(tokenizer), source])
    path = opts.cache_dir / "glue" / f"{task.name}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"
    tensors = _read_cache(path)
    if tensors is None:
        if raw is None:
            raw = _read_local(task, files, opts)
        tensors = _tokenise(task, raw, tokenizer)
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        try:
            write_atomic(path, buffer.getvalue())
        except OSError as error:  # a read-only cache costs the next run a tokenisation, no more
            logging.getLogger(__name__).warning("cannot cache %s: %s", path, error)
    x, y = tensors["train_x"], tensors["train_y"]
    train_idx, val_idx = carve_val(len(y), f"glue:{task.name}", opts)
    return DataSplits(
        name=f"glue:{task.name}",
        input_shape=tuple(x.shape[1:]),
        num_classes=task.num_labels,
        train=TensorSplit(x[train_idx], y[train_idx]),
        val=TensorSplit(x[val_idx], y[val_idx]),
        test=TensorSplit(tensors["test_x"], tensors["test_y"]),
        metric=task.metric,
        loss="mse" if task.metric in REGRESSION_METRICS else "cross-entropy",
    )
