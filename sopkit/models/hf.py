"""Pretrained Hugging Face sequence classifiers as sopkit models: ``--model hf:NAME_OR_PATH``.

``hf:bert-base-uncased``, ``hf:google-t5/t5-small`` or ``hf:/path/to/a/checkpoint`` loads
``AutoModelForSequenceClassification`` (BERT-like encoders, GPT-2-like decoders, T5's
``T5ForSequenceClassification``) from a local directory or the Hugging Face hub cache, never from
the network unless asked (``download=True``; ``sopkit compare --download`` fetches the model with
the data set, :func:`fetch`). The classification head is sized for the data set (``num_labels``:
its number of classes, 1 for a regression such as STS-B) and newly initialised when the checkpoint
has none or one of another size.

The training loop calls ``model(inputs)`` with one tensor, so the pretrained model is wrapped in
:class:`HFClassifier`: ``inputs`` of shape ``(B, 2, L)`` holds the token ids and the attention mask
(what ``sopkit.data.glue`` produces) and the output is the logits. The wrapper says
``sopkit_pretrained = True``, which makes majority kernels start every copy at the pretrained
weight (``init="replicate"``, the paper's upcycling). :func:`save_pretrained` writes the deployable
model, collapsed if it was expanded, as a Hugging Face checkpoint that ``from_pretrained`` loads
into the plain class.

Everything here needs the optional extra ``sopkit[hf]`` (transformers); without it a user gets an
exit-2 message that says how to install it. transformers is imported only when a model is loaded.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sopkit.errors import UserError

__all__ = [
    "HF_PREFIX",
    "HFClassifier",
    "build_hf_model",
    "fetch",
    "hf_source",
    "load_tokenizer",
    "require_transformers",
    "save_pretrained",
]

#: The prefix of a model name that loads a pretrained Hugging Face model.
HF_PREFIX = "hf:"

_INSTALL = "pip install 'sopkit[hf]'"


def require_transformers() -> Any:
    """The ``transformers`` module, or a UserError (exit 2) that says how to install it."""
    try:
        import transformers
    except ImportError as error:
        raise UserError(
            "Pretrained Hugging Face models and GLUE need the optional extra 'hf' (transformers, "
            f"datasets): {_INSTALL}. ({type(error).__name__}: {error})"
        ) from None
    return transformers


def hf_source(name: str) -> str:
    """The directory or hub id of ``hf:NAME_OR_PATH`` (an existing local path wins)."""
    source = name.removeprefix(HF_PREFIX).strip() if name.startswith(HF_PREFIX) else name.strip()
    if not source:
        raise UserError(
            "A Hugging Face model is named 'hf:NAME_OR_PATH' (e.g. 'hf:google-t5/t5-small' or "
            "'hf:./my-checkpoint'); the name after 'hf:' is empty."
        )
    path = Path(source).expanduser()
    return str(path) if path.exists() else source


def _load_error(what: str, source: str, error: Exception, download: bool) -> UserError:
    local = Path(source).exists()
    where = "its directory" if local else "the network" if download else "the Hugging Face cache"
    hint = "" if download or local else " Add --download to fetch it where the network is available."
    reason = str(error).rstrip(".")
    return UserError(
        f"Cannot load the Hugging Face {what} {source!r} from {where}: "
        f"{type(error).__name__}: {reason}.{hint}"
    )


class HFClassifier(nn.Module):
    """A Hugging Face sequence classifier behind sopkit's one-tensor interface.

    ``forward(inputs)`` takes ``inputs`` of shape ``(B, 2, L)``, the token ids and the attention
    mask stacked, or ``(B, 3, L)`` with the segment ids (BERT's ``token_type_ids``; dropped for a
    model that takes none), and returns the logits ``(B, num_labels)``. The pretrained model is
    ``self.hf``.
    """

    #: Majority kernels start from the pretrained weights (init "replicate") for such a model.
    sopkit_pretrained = True

    def __init__(self, model: nn.Module, source: str = "") -> None:
        super().__init__()
        self.hf = model
        self.source = source  # where it was loaded from: the tokenizer saved beside a checkpoint
        # T5 and GPT-2 take no segment ids; passing them would be an error, not a no-op.
        self.takes_segments = "token_type_ids" in inspect.signature(model.forward).parameters

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.dim() != 3 or inputs.shape[1] not in (2, 3):
            raise ValueError(
                "an hf: model takes inputs of shape (batch, 2 or 3, length): token ids, attention "
                f"mask and segment ids (a glue: data set), got {tuple(inputs.shape)}"
            )
        ids, mask = inputs[:, 0].long(), inputs[:, 1].long()
        extra: dict[str, torch.Tensor] = {}
        if inputs.shape[1] == 3 and self.takes_segments:
            extra["token_type_ids"] = inputs[:, 2].long()
        logits: torch.Tensor = self.hf(input_ids=ids, attention_mask=mask, **extra).logits
        return logits

    def save_pretrained(self, directory: str | Path) -> Path:
        """Save the deployable model (collapsed if expanded) and its tokenizer; see
        :func:`save_pretrained`."""
        return save_pretrained(self, directory)


def _classification_model(transformers: Any, source: str, num_labels: int, download: bool) -> Any:
    problem = "regression" if num_labels == 1 else "single_label_classification"
    # "Some weights were newly initialized" is the point here (a new head); keep the log quiet.
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return transformers.AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=num_labels,
            problem_type=problem,
            ignore_mismatched_sizes=True,
            local_files_only=not download,
            dtype=torch.float32,
        )
    except Exception as error:  # missing, damaged or foreign files (safetensors' own error too)
        raise _load_error("model", source, error, download) from None
    finally:
        transformers.logging.set_verbosity(level)


def build_hf_model(
    name: str, *, input_shape: tuple[int, ...], num_classes: int, download: bool = False
) -> HFClassifier:
    """The model ``hf:NAME_OR_PATH`` with a head of ``num_classes`` outputs (1: regression), for
    inputs of ``input_shape`` ``(2, L)`` (token ids and attention mask, from a ``glue:`` set).

    Input and output embeddings are tied as the checkpoint says before anything else sees the
    model (``tie_weights()``), so majority kernels expand a tied weight once.
    """
    transformers = require_transformers()
    if len(input_shape) != 2 or input_shape[0] not in (2, 3):
        raise UserError(
            f"The model {name!r} reads token ids and attention masks (and segment ids), (2, length) "
            "or (3, length) per example; "
            f"the data set gives {tuple(input_shape)}. Use a text data set such as 'glue:sst2'."
        )
    source = hf_source(name)
    model = _classification_model(transformers, source, num_classes, download)
    config = model.config
    if getattr(config, "pad_token_id", None) is None:
        # GPT-2 has no pad token: it classifies from the last token that is not padding, so the
        # padding must be a known id. The data pads with the tokenizer's (eos, as load_tokenizer sets).
        eos = getattr(config, "eos_token_id", None)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if eos is None:
            raise UserError(
                f"The model {name!r} has neither a pad token id nor an eos token id in its config; "
                "set pad_token_id in its config.json."
            )
        config.pad_token_id = eos
    model.tie_weights()
    return HFClassifier(model, source)


def load_tokenizer(name: str, *, download: bool = False) -> Any:
    """The tokenizer of ``hf:NAME_OR_PATH``, with a pad token (its eos where it has none, as for
    GPT-2), from a local directory or the hub cache (the network only with ``download``)."""
    transformers = require_transformers()
    source = hf_source(name)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=not download)
    except Exception as error:  # missing or damaged files, a tokenizer class not installed
        raise _load_error("tokenizer", source, error, download) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(
                f"The tokenizer of {name!r} has neither a pad token nor an eos token to pad with."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def fetch(name: str) -> None:
    """Download ``hf:NAME`` (a hub id) into the hub cache, so that later loads find it offline.
    Nothing to do for a local directory."""
    source = hf_source(name)
    if Path(source).exists():
        return
    require_transformers()
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(source)
    except Exception as error:  # network, authentication, unknown repository: all the user's to fix
        raise UserError(f"Cannot download the Hugging Face model {source!r}: {error}") from None


def _deployable_hf(model: nn.Module) -> Any:
    """The plain pretrained model inside ``model``: collapsed if expanded, unwrapped if wrapped."""
    from sopkit.mk import collapse, is_expanded

    if is_expanded(model):
        model = collapse(model)
    inner: Any = model.hf if isinstance(model, HFClassifier) else model
    if not callable(getattr(inner, "save_pretrained", None)):
        raise UserError(
            f"save_pretrained needs a Hugging Face model (or an hf: model), got {type(model).__name__}."
        )
    return inner


def save_pretrained(model: nn.Module, directory: str | Path) -> Path:
    """Save ``model`` as a Hugging Face checkpoint in ``directory`` (created) and return it.

    ``model`` is an :class:`HFClassifier` or a Hugging Face model, expanded or not: an expanded one
    is collapsed first (its layers hold no weights of their own, so saving it as it is would lose
    them), and the checkpoint loads with ``from_pretrained`` into the plain class with the collapsed
    model's outputs. The tokenizer of an ``hf:`` model is saved beside it when it can be loaded.
    """
    require_transformers()
    directory = Path(directory).expanduser()
    inner = _deployable_hf(model)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        inner.save_pretrained(directory)
    except OSError as error:
        raise UserError(f"Cannot save the model to {directory}: {error}") from None
    source = getattr(model, "source", "")
    if source:
        try:
            load_tokenizer(source).save_pretrained(directory)
        except UserError:
            logging.getLogger(__name__).warning("no tokenizer saved beside %s", directory)
    return directory
