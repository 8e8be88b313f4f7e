"""Tiny random Hugging Face models of each family (BERT, GPT-2, T5) and tiny GLUE-shaped files, built
once per test process and saved to a temporary directory, for the tests of ``sopkit.models.hf`` and
``sopkit.data.glue``. Nothing is downloaded: the hub and ``datasets`` are put offline before
transformers is imported.

A module with a unique name (not ``conftest``) so that test files can import it by name.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

FAMILIES = ("bert", "gpt2", "t5")

WORDS = [
    "the", "a", "movie", "film", "plot", "actor", "good", "bad", "great", "awful", "fine", "dull",
    "is", "was", "not", "very", "it", "this", "and", "but", "i", "liked", "hated", "loved", "story",
    "ending",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]
VOCAB = {word: index for index, word in enumerate(SPECIALS + WORDS)}

_ROOT = Path(tempfile.mkdtemp(prefix="sopkit-hf-tiny-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


def _tokenizer(family: str, directory: Path) -> None:
    """A word-level tokenizer over :data:`WORDS` with each family's special tokens, saved."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if family == "bert":
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", VOCAB["[CLS]"]), ("[SEP]", VOCAB["[SEP]"])],
        )
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
            cls_token="[CLS]", sep_token="[SEP]",
            model_input_names=["input_ids", "token_type_ids", "attention_mask"],  # as BERT's
        )
    elif family == "t5":
        backend.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B:1 </s>:1", special_tokens=[("</s>", VOCAB["</s>"])]
        )
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>",
            model_input_names=["input_ids", "attention_mask"],  # as T5's own: no segment ids
        )
    else:  # GPT-2: no pad token, padded with eos (as sopkit does for it)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>",
            model_input_names=["input_ids", "attention_mask"],
        )
    tokenizer.save_pretrained(directory)


def _config(family: str):  # type: ignore[no-untyped-def]
    import transformers

    size = len(VOCAB)
    if family == "bert":
        return transformers.BertConfig(
            vocab_size=size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=64, pad_token_id=0,
        )
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=size, n_embd=16, n_layer=2, n_head=2, n_positions=64,
            bos_token_id=VOCAB["</s>"], eos_token_id=VOCAB["</s>"],
        )
    return transformers.T5Config(
        vocab_size=size, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
        pad_token_id=0, eos_token_id=VOCAB["</s>"], decoder_start_token_id=0,
    )


@functools.cache
def tiny_model(family: str) -> Path:
    """A directory holding a tiny random pretrained model of ``family`` and its tokenizer (the
    language-model class: sopkit loads it for sequence classification with a new head)."""
    import torch
    import transformers

    directory = _ROOT / family
    classes = {
        "bert": transformers.BertForMaskedLM,
        "gpt2": transformers.GPT2LMHeadModel,
        "t5": transformers.T5ForConditionalGeneration,
    }
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = classes[family](_config(family))
    model.save_pretrained(directory)
    _tokenizer(family, directory)
    return directory


def _sentence(index: int, positive: bool) -> str:
    good = ("good", "great", "fine", "liked", "loved")
    bad = ("bad", "awful", "dull", "hated", "not")
    word = (good if positive else bad)[index % 5]
    subject = ("movie", "film", "plot", "story", "ending")[(index * 3) % 5]
    return f"the {subject} was very {word}"


def write_glue(root: Path, task: str = "sst2", *, n_train: int = 48, n_test: int = 16,
               ext: str = "tsv") -> Path:
    """Tiny GLUE-shaped files for ``task`` in ``root/<task>/`` (train and validation; MNLI:
    validation_matched), learnable from the sentiment word. Returns ``root``."""
    from sopkit.data.glue import GLUE_TASKS

    spec = GLUE_TASKS[task]
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    for split, count, offset in (("train", n_train, 0), (spec.test_split, n_test, 1000)):
        rows = []
        for i in range(count):
            positive = (i * 7 + offset) % 3 != 0
            texts = [_sentence(i + offset, positive)]
            if len(spec.columns) == 2:
                texts.append(_sentence(i + offset + 1, positive))
            if spec.num_labels == 1:
                label: object = round(4.0 * positive + (i % 5) / 5, 2)
            else:
                label = int(positive) if spec.num_labels == 2 else i % 3
            rows.append((*texts, label))
        header = (*spec.columns, "label")
        if ext == "jsonl":
            import json

            text = "".join(json.dumps(dict(zip(header, row, strict=True))) + "\n" for row in rows)
        else:
            sep = "\t" if ext == "tsv" else ","
            text = sep.join(header) + "\n" + "".join(
                sep.join(map(str, row)) + "\n" for row in rows
            )
        (folder / f"{split}.{ext}").write_text(text)
    return root


@functools.cache
def network_available() -> bool:
    """Whether the Hugging Face hub answers (tests marked ``network`` are skipped otherwise)."""
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=2).close()
    except OSError:
        return False
    return True
