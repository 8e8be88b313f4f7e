"""Where a comparison keeps its trained models, and reading what is said about them.

Every trial's deployable model lies beside its record in the output directory:
``models/<trial key>.safetensors`` (the weights) and ``models/<trial key>.json`` (the sidecar:
what rebuilds the architecture, and the trial it came from). The sidecar is written after the
weights and the store record after both, so a sidecar names a complete weights file and a record
whose model was kept has both.

This module imports no torch: ``sopkit report`` reads it to say where the models are.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sopkit.errors import UserError
from sopkit.files import write_atomic

if TYPE_CHECKING:
    from sopkit.experiment.outcome import ModelArtifact

__all__ = [
    "FORMAT_VERSION",
    "MODELS_DIR",
    "json_safe",
    "meta_path",
    "read_meta",
    "saved_keys",
    "saved_models",
    "weights_path",
    "write_model",
]

#: The folder of an output directory that holds the trained models.
MODELS_DIR = "models"
#: The sidecar format this sopkit writes and reads (and older ones).
FORMAT_VERSION = 1
_KEY = re.compile(r"[0-9a-f]{24}")  # a trial key (TrialSpec.key): never a path


def _checked_key(key: str) -> str:
    """``key`` if it is a trial key; anything else (``../x``, a typo) is a message, never a path."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise UserError(
            f"{key!r} is not a trial key (24 hex digits, the `key` of a line of trials.jsonl)."
        )
    return key


def weights_path(directory: Path | str, key: str) -> Path:
    """The safetensors file of trial ``key`` in the output directory ``directory``."""
    return Path(directory) / MODELS_DIR / f"{_checked_key(key)}.safetensors"


def meta_path(directory: Path | str, key: str) -> Path:
    """The JSON sidecar of trial ``key`` in the output directory ``directory``."""
    return Path(directory) / MODELS_DIR / f"{_checked_key(key)}.json"


def saved_keys(directory: Path | str) -> set[str]:
    """The keys of the trials whose model (sidecar and weights) is in ``directory``."""
    folder = Path(directory) / MODELS_DIR
    if not folder.is_dir():
        return set()
    return {
        path.stem
        for path in folder.glob("*.json")
        if _KEY.fullmatch(path.stem) and path.with_suffix(".safetensors").is_file()
    }


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None: a sidecar is strict JSON (no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def read_meta(directory: Path | str, key: str) -> dict[str, Any]:
    """The sidecar of trial ``key``, checked; a missing or damaged one is a ``UserError``."""
    path = meta_path(directory, key)
    if not path.is_file():
        raise UserError(
            f"No saved model for trial {key} in {Path(directory)}: {path} does not exist. Models "
            "are saved unless the comparison ran with --no-save-models; rerunning it with "
            "--save-models does not retrain finished trials (delete results.sqlite to retrain)."
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"The model sidecar {path} is damaged ({error}).") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), int):
        raise UserError(f"The model sidecar {path} is damaged: it has no format version.")
    if meta["format"] > FORMAT_VERSION:
        raise UserError(
            f"The model sidecar {path} has format {meta['format']}, but this sopkit reads format "
            f"{FORMAT_VERSION} (and older): it was written by a newer sopkit."
        )
    wrong = [name for name, valid in _FIELDS.items() if not valid(meta.get(name))]
    if meta.get("kind") == "ensemble" and not _count(meta.get("members")):
        wrong.append("members")
    if wrong or meta["key"] != key:
        raise UserError(
            f"The model sidecar {path} is damaged: "
            + (f"{', '.join(wrong)} missing or wrong." if wrong else f"it names trial {meta['key']}.")
        )
    return meta


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31


# What rebuilding reads from a sidecar, each with its check: a hand-edited sidecar is a message.
_FIELDS = {
    "key": lambda v: isinstance(v, str),
    "kind": lambda v: isinstance(v, str),
    "model": lambda v: isinstance(v, str) and bool(v),
    "input_shape": lambda v: isinstance(v, list) and all(_count(n) for n in v),
    "num_classes": _count,
    "sha256": lambda v: isinstance(v, str),
}


def write_model(directory: Path | str, artifact: ModelArtifact) -> list[Path]:
    """Write a trial's model into the output directory ``directory``: the weights, then the
    sidecar, each atomically. Called before the trial's record is stored, so a kill at any moment
    leaves no record whose model is half-written (at worst a model without a record, which the
    resumed comparison trains and writes again)."""
    key = str(artifact.meta["key"])
    text = json.dumps(json_safe(dict(artifact.meta)), indent=2, sort_keys=True) + "\n"
    return [
        write_atomic(weights_path(directory, key), artifact.weights),
        write_atomic(meta_path(directory, key), text),
    ]


def saved_models(directory: Path | str) -> list[dict[str, Any]]:
    """The sidecars of every model saved in ``directory``, by trial key (damaged ones skipped:
    :func:`read_meta` names them when one is asked for)."""
    metas = []
    for key in sorted(saved_keys(directory)):
        try:
            metas.append(read_meta(directory, key))
        except UserError:
            continue
    return metas
