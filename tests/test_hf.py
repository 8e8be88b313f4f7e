"""Pretrained Hugging Face models (``--model hf:...``): tiny random BERT, GPT-2 and T5 saved to a
temporary directory and loaded offline; majority kernels on them (every linear layer, GPT-2's
Conv1D, tied embeddings, replicate upcycling), the deployable saved with ``save_pretrained``, and
generation from an expanded model with the mean weights."""

from __future__ import annotations

import sys

import hf_tiny  # noqa: E402  (sets the hub offline before transformers is imported)
import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from sopkit.errors import UserError  # noqa: E402
from sopkit.mk import collapse, expand, find_majority, is_expanded  # noqa: E402
from sopkit.models import build_model  # noqa: E402
from sopkit.models.hf import HFClassifier, load_tokenizer, save_pretrained  # noqa: E402
from sopkit.strategies.majority import MajorityKernelsStrategy  # noqa: E402
from sopkit.training.config import TrainConfig  # noqa: E402
from sopkit.training.settings import StrategySettings  # noqa: E402
from sopkit.training.types import RunContext  # noqa: E402

CLASSES = {"bert": "BertForSequenceClassification", "gpt2": "GPT2ForSequenceClassification",
           "t5": "T5ForSequenceClassification"}


def _model(family: str, num_classes: int = 3) -> HFClassifier:
    model = build_model(f"hf:{hf_tiny.tiny_model(family)}", input_shape=(2, 8),
                        num_classes=num_classes)
    assert isinstance(model, HFClassifier)
    return model


def _inputs(family: str) -> torch.Tensor:
    tokenizer = load_tokenizer(f"hf:{hf_tiny.tiny_model(family)}")
    encoded = tokenizer(["the movie was good", "bad", "i hated the ending"],
                        ["it is great", "very dull film", "and the plot"],
                        padding="max_length", max_length=8, truncation=True)
    return torch.stack([torch.tensor(encoded["input_ids"]),
                        torch.tensor(encoded["attention_mask"])], dim=1)


def _expanded_layers(model: nn.Module) -> set[int]:
    """Every module a kernel is bound to (a tied weight is bound to several), by identity."""
    holder = find_majority(model)
    assert holder is not None
    return {id(module) for kernel in holder.kernels for module, _ in kernel.bindings}


@pytest.mark.parametrize("family", hf_tiny.FAMILIES)
def test_each_family_loads_offline_with_a_head_sized_for_the_data(family: str) -> None:
    model = _model(family, num_classes=3)
    assert type(model.hf).__name__ == CLASSES[family]
    assert model.sopkit_pretrained
    model.eval()
    logits = model(_inputs(family))
    assert logits.shape == (3, 3)
    regression = _model(family, num_classes=1)
    assert regression.hf.config.problem_type == "regression"
    assert regression.eval()(_inputs(family)).shape == (3, 1)


def test_segment_ids_reach_a_model_that_reads_them_and_are_dropped_for_one_that_does_not() -> None:
    for family, reads in (("bert", True), ("t5", False)):
        model = _model(family).eval()
        inputs = _inputs(family)
        segments = torch.cat([inputs, torch.ones_like(inputs[:, :1])], dim=1)
        with torch.no_grad():
            same = torch.equal(model(segments), model(inputs))
        assert same is not reads, family


@pytest.mark.parametrize("family", hf_tiny.FAMILIES)
def test_expand_covers_every_linear_layer_and_embedding_of_the_family(family: str) -> None:
    model = _model(family)
    kinds = (nn.Linear, nn.Embedding, transformers.pytorch_utils.Conv1D)
    layers = {name for name, m in model.named_modules(remove_duplicate=False)
              if isinstance(m, kinds)}
    if family == "gpt2":  # its attention and MLP are Conv1D, which sopkit knows by name
        assert any(isinstance(m, transformers.pytorch_utils.Conv1D) for m in model.modules())
    expanded = expand(model, 3, init="replicate", seed=0)
    modules = dict(expanded.named_modules(remove_duplicate=False))
    assert _expanded_layers(expanded) == {id(modules[name]) for name in layers}
    for name, module in modules.items():
        if name in layers:  # the weight is the mixing's, no longer a parameter of the layer
            assert "weight" not in dict(module.named_parameters(recurse=False))


@pytest.mark.parametrize("family", hf_tiny.FAMILIES)
def test_mk_upcycles_a_pretrained_model_by_replicating_its_kernels(family: str) -> None:
    model = _model(family).eval()
    inputs = _inputs(family)
    with torch.no_grad():
        before = model(inputs)
    run = RunContext(0, TrainConfig(), torch.device("cpu"), None, torch.Generator(), 1)  # type: ignore[arg-type]
    expanded = MajorityKernelsStrategy(StrategySettings(3, {}, "mk")).prepare(model, run)
    copies = find_majority(expanded).copies  # type: ignore[union-attr]
    assert torch.equal(copies[0], copies[1]) and torch.equal(copies[0], copies[2])
    with torch.no_grad():
        after = expanded.eval()(inputs)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_an_explicit_init_still_wins_over_the_pretrained_default() -> None:
    model = _model("bert")
    run = RunContext(0, TrainConfig(), torch.device("cpu"), None, torch.Generator(), 1)  # type: ignore[arg-type]
    settings = StrategySettings(3, {"mk.init": "variance-preserving"}, "mk")
    expanded = MajorityKernelsStrategy(settings).prepare(model, run)
    copies = find_majority(expanded).copies  # type: ignore[union-attr]
    assert not torch.equal(copies[0], copies[1])


def _t5_generator() -> nn.Module:
    return transformers.T5ForConditionalGeneration.from_pretrained(
        hf_tiny.tiny_model("t5"), local_files_only=True
    )


def test_tied_input_and_output_embeddings_are_one_kernel_with_one_draw() -> None:
    model = _t5_generator()
    model.tie_weights()
    assert model.lm_head.weight is model.shared.weight
    expanded = expand(model, 3, seed=0)
    holder = find_majority(expanded)
    tied = [k for k in holder.kernels if len(k.bindings) > 1]  # type: ignore[union-attr]
    assert len(tied) == 1 and {a for _, a in tied[0].bindings} == {"weight"}
    ids = torch.tensor([[5, 6, 7, 4]])
    expanded.train()
    expanded(input_ids=ids, labels=ids)
    # One draw for both uses: the same memory (release() detaches each use on its own).
    assert expanded.lm_head.weight.data_ptr() == expanded.shared.weight.data_ptr()
    mean = holder.mean_weights()[tied[0].offset : tied[0].offset + tied[0].numel]  # type: ignore[union-attr]
    assert not torch.equal(expanded.shared.weight.reshape(-1), mean)  # a training draw, not the mean


def test_save_pretrained_writes_the_collapsed_model_that_from_pretrained_loads(tmp_path) -> None:
    model = _model("t5", num_classes=2)
    inputs = _inputs("t5")
    expanded = expand(model, 3, init="variance-preserving", seed=1)
    optimizer = torch.optim.Adam(expanded.parameters(), lr=1e-2)
    for _ in range(2):  # the copies move apart, so the mean is not the pretrained weight
        optimizer.zero_grad()
        expanded.train()(inputs).sum().backward()
        optimizer.step()
    directory = save_pretrained(expanded, tmp_path / "deploy")
    assert is_expanded(expanded)  # saving collapsed a copy, the expanded model goes on training
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(
        directory, local_files_only=True
    )
    assert type(loaded).__name__ == "T5ForSequenceClassification"
    collapsed = collapse(expanded).eval()
    with torch.no_grad():
        want = collapsed(inputs)
        got = HFClassifier(loaded).eval()(inputs)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(expanded.eval()(inputs), want, rtol=1e-5, atol=1e-6)
    assert load_tokenizer(f"hf:{directory}").get_vocab() == load_tokenizer(
        f"hf:{hf_tiny.tiny_model('t5')}").get_vocab()  # the tokenizer ships with it


def test_generate_from_an_expanded_model_uses_the_mean_weights() -> None:
    model = _t5_generator().eval()
    expanded = expand(model, 3, init="variance-preserving", seed=3)
    ids = torch.tensor([[5, 9, 12, 4], [7, 8, 4, 0]])
    mask = (ids != 0).long()
    expanded.train()
    expanded(input_ids=ids, attention_mask=mask, labels=ids)  # the layers now hold a training draw
    query = expanded.encoder.block[0].layer[0].SelfAttention.q
    drawn = query.weight.clone()
    collapsed = collapse(expanded).eval()
    expanded.eval()
    settings = {"max_new_tokens": 5, "do_sample": False, "output_scores": True,
                "return_dict_in_generate": True}
    with torch.no_grad():
        got = expanded.generate(input_ids=ids, attention_mask=mask, **settings)
        want = collapsed.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(drawn, query.weight)  # generate replaced the training draw by the mean
    torch.testing.assert_close(
        query.weight, collapsed.encoder.block[0].layer[0].SelfAttention.q.weight, rtol=0, atol=0)
    # The encoder called directly (as generate does) sees the mean too, not the training draw.
    expanded.train()
    expanded(input_ids=ids, attention_mask=mask, labels=ids)
    expanded.eval()
    with torch.no_grad():
        encoded = expanded.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        reference = collapsed.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(encoded, reference, rtol=1e-5, atol=1e-6)


def test_a_wrapped_model_called_without_its_wrapper_trains_through_the_copies() -> None:
    model = expand(_model("gpt2"), 3, seed=0)
    inputs = _inputs("gpt2")
    model.train()
    out = model.hf(input_ids=inputs[:, 0], attention_mask=inputs[:, 1]).logits
    out.sum().backward()  # the inner model's own call drew and mixed: gradients reach the copies
    assert find_majority(model).copies.grad is not None  # type: ignore[union-attr]
    assert find_majority(model).stream.step == 1  # type: ignore[union-attr]


def test_a_missing_checkpoint_is_a_user_error_that_says_how_to_fetch_it(tmp_path) -> None:
    with pytest.raises(UserError, match="--download"):
        build_model("hf:nobody/no-such-model-here", input_shape=(2, 8), num_classes=2)
    with pytest.raises(UserError, match="empty"):
        build_model("hf:", input_shape=(2, 8), num_classes=2)
    with pytest.raises(UserError, match="glue:sst2"):
        build_model(f"hf:{hf_tiny.tiny_model('bert')}", input_shape=(40,), num_classes=2)


def test_a_damaged_checkpoint_is_a_user_error_naming_the_file(tmp_path) -> None:
    import shutil

    damaged = tmp_path / "t5"
    shutil.copytree(hf_tiny.tiny_model("t5"), damaged)
    (damaged / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="SafetensorError"):
        build_model(f"hf:{damaged}", input_shape=(2, 8), num_classes=2)
    (damaged / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json"):
        load_tokenizer(f"hf:{damaged}")


def test_without_the_extra_it_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    with pytest.raises(UserError, match=r"pip install 'sopkit\[hf\]'"):
        build_model("hf:google-t5/t5-small", input_shape=(2, 8), num_classes=2)


@pytest.mark.network
@pytest.mark.skipif(not hf_tiny.network_available(), reason="the Hugging Face hub is not reachable")
def test_a_hub_model_downloads_and_then_loads_offline(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    from sopkit.models.hf import fetch

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    fetch("hf:hf-internal-testing/tiny-random-BertModel")
    model = build_model("hf:hf-internal-testing/tiny-random-BertModel", input_shape=(2, 8),
                        num_classes=2)
    assert isinstance(model, HFClassifier)
