"""GLUE tasks (``--dataset glue:TASK``) on tiny GLUE-shaped files, tokenised with a tiny model's
tokenizer and cached; every task's metric against hand-computed values; the regression loss; the
report's metric label; and the paper-table3 preset (baseline, MK, soups) end to end on a tiny T5."""

from __future__ import annotations

import math
from pathlib import Path

import hf_tiny  # sets the hub offline before transformers is imported
import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import sopkit.data.glue as glue  # noqa: E402
from sopkit.cli import app  # noqa: E402
from sopkit.data import DataSplits, TensorSplit, load_dataset  # noqa: E402
from sopkit.data.metrics import metric_components, score, task_loss  # noqa: E402
from sopkit.errors import UserError  # noqa: E402
from sopkit.experiment.plan import build_plan  # noqa: E402
from sopkit.models.hf import load_tokenizer  # noqa: E402
from sopkit.task_metrics import dataset_metric, metric_label, metric_name  # noqa: E402
from sopkit.training.config import TrainConfig  # noqa: E402
from sopkit.training.loop import evaluate  # noqa: E402
from sopkit.training.strategy import Strategy  # noqa: E402
from sopkit.training.types import RunContext  # noqa: E402


def _load(root: Path, task: str, family: str = "t5", **kwargs: object) -> DataSplits:
    return load_dataset(f"glue:{task}", data_dir=root, cache_dir=root / "cache",
                        models=[f"hf:{hf_tiny.tiny_model(family)}"], **kwargs)  # type: ignore[arg-type]


# ---- metrics, golden values ------------------------------------------------------------------------


def _logits(labels: list[int]) -> torch.Tensor:
    return F.one_hot(torch.tensor(labels), 2).float()


def test_classification_metrics_golden_values() -> None:
    # predictions 1 1 0 0 against labels 1 0 0 0: TP 1, FP 1, TN 2, FN 0.
    outputs, labels = _logits([1, 1, 0, 0]), torch.tensor([1, 0, 0, 0])
    assert metric_components("accuracy", outputs, labels) == {"accuracy": 0.75}
    # MCC = (1*2 - 1*0) / sqrt(2 * 1 * 3 * 2) = 2 / sqrt(12)
    assert score("matthews", outputs, labels) == pytest.approx(2 / math.sqrt(12))
    # F1 of class 1 = 2 * 1 / (2 * 1 + 1 + 0) = 2/3; the task's score is the mean with accuracy.
    parts = metric_components("f1-accuracy", outputs, labels)
    assert parts == pytest.approx({"f1": 2 / 3, "accuracy": 0.75})
    assert score("f1-accuracy", outputs, labels) == pytest.approx((2 / 3 + 0.75) / 2)


def test_correlation_metrics_golden_values() -> None:
    # x = 1 2 3 4, y = 1 3 2 4: covariance 4/4 ... Pearson r = 0.8; the ranks are the values: 0.8.
    outputs, labels = torch.tensor([[1.0], [2.0], [3.0], [4.0]]), torch.tensor([1.0, 3.0, 2.0, 4.0])
    assert metric_components("pearson-spearman", outputs, labels) == pytest.approx(
        {"pearson": 0.8, "spearman": 0.8})
    # Spearman reads ranks: a monotone but non-linear prediction is a perfect 1.
    cubic = torch.tensor([[1.0], [8.0], [27.0], [64.0]])
    parts = metric_components("pearson-spearman", cubic, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert parts["spearman"] == pytest.approx(1.0) and parts["pearson"] < 0.99
    # A constant prediction has no correlation: 0, not NaN (NaN would read as divergence).
    assert score("pearson-spearman", torch.ones(4, 1), labels) == 0.0
    assert math.isnan(score("pearson-spearman", torch.tensor([[1.0], [math.nan], [0.0], [2.0]]),
                            labels))


def test_regression_loss_is_the_mean_squared_error_and_the_default_loss_follows_the_data() -> None:
    outputs, targets = torch.tensor([[1.0], [3.0]]), torch.tensor([2.0, 5.0])
    assert task_loss(outputs, targets, "mse").item() == pytest.approx((1 + 4) / 2)
    split = TensorSplit(torch.zeros(2, 1), targets)
    data = DataSplits("reg", (1,), 1, split, split, split, metric="pearson-spearman", loss="mse")
    run = RunContext(0, TrainConfig(), torch.device("cpu"), data, torch.Generator(), 1)
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.fill_(1.0)
    assert Strategy().loss(model, torch.zeros(2, 1), targets, run).item() == pytest.approx(
        (1 + 16) / 2)


def test_evaluate_scores_the_data_sets_metric_and_accuracy_by_default() -> None:
    inputs = _logits([1, 1, 0, 0])  # an identity "model": its inputs are its logits
    split = TensorSplit(inputs, torch.tensor([1, 0, 0, 0]))
    assert evaluate(nn.Identity(), split, batch_size=3) == 0.75
    assert evaluate(nn.Identity(), split, batch_size=3, metric="matthews") == pytest.approx(
        2 / math.sqrt(12))


def test_reports_label_the_tasks_metric() -> None:
    assert dataset_metric("glue:cola") == "matthews" and metric_label("glue:cola") == "Matthews corr."
    assert metric_label("glue:stsb") == "Pearson/Spearman mean"
    assert metric_label("mnist1d") == "acc." and metric_label("glue:sst2") == "acc."
    assert metric_name("glue:cola") == "Matthews correlation" and metric_name("digits") == "accuracy"
    from sopkit.report.tables import group_table

    class _Group:
        dataset, title, strategies, expansion, train = "glue:mrpc", "t", [], 3, {}

    headers = [name for name, _ in group_table(_Group()).columns]  # type: ignore[arg-type]
    assert "test F1/acc. mean (%)" in headers


# ---- loading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("task", "ext"), [("sst2", "tsv"), ("stsb", "csv"), ("mnli", "jsonl"),
                                           ("mrpc", "tsv"), ("cola", "tsv")])
def test_a_task_loads_from_local_files_with_its_metric_and_splits(tmp_path, task, ext) -> None:
    hf_tiny.write_glue(tmp_path, task, n_train=40, n_test=12, ext=ext)
    data = _load(tmp_path, task)
    spec = glue.GLUE_TASKS[task]
    assert data.num_classes == spec.num_labels and data.metric == dataset_metric(f"glue:{task}")
    assert data.loss == ("mse" if task == "stsb" else "cross-entropy")
    # The GLUE validation file is the test split; validation is carved from train (10%).
    assert (len(data.train), len(data.val), len(data.test)) == (36, 4, 12)
    assert data.input_shape[0] == 2 and data.train.x.dtype == torch.int32  # type: ignore[attr-defined]
    assert data.test.y.dtype == (torch.float32 if task == "stsb" else torch.long)  # type: ignore[attr-defined]


def test_examples_are_the_models_tokens_padded_with_its_pad_id(tmp_path) -> None:
    hf_tiny.write_glue(tmp_path, "rte", n_train=10, n_test=4)
    for family in ("bert", "gpt2"):
        data = _load(tmp_path, "rte", family)
        tokenizer = load_tokenizer(f"hf:{hf_tiny.tiny_model(family)}")
        first, second = (tmp_path / "rte" / "validation.tsv").read_text().splitlines()[1].split("\t")[:2]
        ids = tokenizer(first, second)["input_ids"]
        row = data.test.x[0]  # type: ignore[attr-defined]
        assert row[0, : len(ids)].tolist() == ids and row[1, : len(ids)].tolist() == [1] * len(ids)
        assert (row[0, len(ids):] == tokenizer.pad_token_id).all() and not row[1, len(ids):].any()
        if family == "bert":  # BERT reads segment ids: a third row, 1 over the second sentence
            assert data.input_shape[0] == 3
            assert row[2, : len(ids)].tolist() == tokenizer(first, second)["token_type_ids"]
            assert row[2].max() == 1
        else:
            assert data.input_shape[0] == 2


def test_the_tokenised_set_is_cached_and_a_changed_file_or_a_damaged_cache_is_redone(
    tmp_path, monkeypatch
) -> None:
    hf_tiny.write_glue(tmp_path, "sst2", n_train=10, n_test=4)
    first = _load(tmp_path, "sst2")
    calls: list[str] = []
    real = glue._read_local
    monkeypatch.setattr(glue, "_read_local", lambda *a: calls.append("read") or real(*a))
    again = _load(tmp_path, "sst2")
    assert calls == [] and torch.equal(again.test.x, first.test.x)  # type: ignore[attr-defined]
    (cached,) = (tmp_path / "cache" / "glue").iterdir()
    cached.write_bytes(b"not a torch file")
    assert torch.equal(_load(tmp_path, "sst2").test.x, first.test.x)  # type: ignore[attr-defined]
    assert calls == ["read"]
    train = tmp_path / "sst2" / "train.tsv"
    train.write_text(train.read_text() + "the film was good\t1\n")
    assert len(_load(tmp_path, "sst2").train) + 1 == 11 and calls == ["read", "read"]


def test_glue_mistakes_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserError, match=r"train\.<ext>"):
        _load(tmp_path, "rte")
    hf_tiny.write_glue(tmp_path, "sst2", n_train=10, n_test=4)
    with pytest.raises(UserError, match="hf:NAME_OR_PATH"):
        load_dataset("glue:sst2", data_dir=tmp_path, cache_dir=tmp_path, models=["mlp-a2"])
    with pytest.raises(UserError, match="separate runs"):
        load_dataset("glue:sst2", data_dir=tmp_path, cache_dir=tmp_path,
                     models=[f"hf:{hf_tiny.tiny_model('bert')}", f"hf:{hf_tiny.tiny_model('t5')}"])
    validation = tmp_path / "sst2" / "validation.tsv"
    validation.write_text("sentence\tlabel\nthe film\t-1\n")
    with pytest.raises(UserError, match="outside 0..1"):
        _load(tmp_path, "sst2")
    validation.write_text("text\tlabel\nthe film\t1\n")
    with pytest.raises(UserError, match="Cannot read the glue:sst2 files"):  # train's columns differ
        _load(tmp_path, "sst2")
    (tmp_path / "sst2" / "train.tsv").write_text("text\tlabel\nthe film\t1\na film\t0\n")
    with pytest.raises(UserError, match="no column sentence"):
        _load(tmp_path, "sst2")


def test_a_task_neither_on_disk_nor_in_the_cache_says_how_to_get_it(tmp_path, monkeypatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # an empty cache
    with pytest.raises(UserError, match="--download"):
        load_dataset("glue:rte", cache_dir=tmp_path, models=[f"hf:{hf_tiny.tiny_model('t5')}"])


@pytest.mark.network
@pytest.mark.skipif(not hf_tiny.network_available(), reason="the Hugging Face hub is not reachable")
def test_a_task_downloads_from_the_hub_with_download(tmp_path, monkeypatch) -> None:
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    data = load_dataset("glue:rte", cache_dir=tmp_path, download=True,
                        models=[f"hf:{hf_tiny.tiny_model('t5')}"])
    assert len(data.test) == 277 and data.num_classes == 2  # RTE's validation set


# ---- the preset --------------------------------------------------------------------------------------


def test_paper_table3_is_t5_small_on_glue_with_mk_replicate_and_soups() -> None:
    plan = build_plan(preset="paper-table3")
    assert plan.models == ("hf:google-t5/t5-small",) and plan.dataset.startswith("glue:")
    assert plan.strategies == ("baseline", "mk", "soup", "soup-greedy")
    assert plan.expansion == 3 and dict(plan.options)["mk.init"] == "replicate"
    assert plan.optimizers == ("adam",) and plan.lr_grid == (-4, -3, -2, -1, 0)
    assert len(plan.jobs()) == 3 * 5  # seeds x rates


def _register_soups(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The soups' entry points as an installed distribution would declare them (the repository's
    baselines/pyproject.toml does once installed)."""
    info = root / "sopkit_soups_test-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sopkit-soups-test\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[sopkit.strategies]\nsoup = sopkit_baselines.soup:UniformSoup\n"
        "soup-greedy = sopkit_baselines.soup:GreedySoup\n")
    monkeypatch.syspath_prepend(str(root))


@pytest.mark.slow
def test_paper_table3_runs_end_to_end_on_a_tiny_t5_and_tiny_cola(tmp_path, monkeypatch) -> None:
    from sopkit.experiment.store import DATABASE_NAME, TrialStore

    _register_soups(tmp_path / "site", monkeypatch)
    monkeypatch.setenv("SOPKIT_CACHE_DIR", str(tmp_path / "cache"))
    hf_tiny.write_glue(tmp_path / "data", "cola", n_train=24, n_test=8)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "compare", "--preset", "paper-table3", "--dataset", "glue:cola",
        "--data-dir", str(tmp_path / "data"), "--model", f"hf:{hf_tiny.tiny_model('t5')}",
        "--seeds", "1", "--epochs", "1", "--lr-grid", "0.001", "--batch-size", "8",
        "--device", "cpu", "--threads", "1", "--out", str(out),
    ], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    trials = {t.spec.strategy: t for t in TrialStore(out / DATABASE_NAME).trials()}
    assert sorted(trials) == ["baseline", "mk", "soup", "soup-greedy"]
    baseline = trials["baseline"]
    for name in ("mk", "soup", "soup-greedy"):  # every one ships the baseline's size
        assert trials[name].inference_params == baseline.inference_params, name
    assert trials["mk"].train_params > 2 * baseline.train_params
    assert "val_matthews" in baseline.extra and "test_matthews" in trials["soup"].extra
    assert "Matthews corr." in (out / "report.md").read_text()


def test_without_the_extra_glue_says_how_to_install_it(tmp_path, monkeypatch) -> None:
    import sys

    hf_tiny.write_glue(tmp_path, "sst2", n_train=10, n_test=4)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now fails
    with pytest.raises(UserError, match=r"pip install 'sopkit\[hf\]'"):
        _load(tmp_path, "sst2")


def _regression_data() -> DataSplits:
    """A one-output regression scored like STS-B: y = x . w + noise, 8 features."""
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(8, generator=generator)

    def split(n: int) -> TensorSplit:
        x = torch.randn(n, 8, generator=generator)
        return TensorSplit(x, x @ w + 0.1 * torch.randn(n, generator=generator))

    return DataSplits("regression", (8,), 1, split(128), split(32), split(64),
                      metric="pearson-spearman", loss="mse")


def test_every_strategy_trains_a_regression_or_says_it_cannot() -> None:
    """adv-mk ascends the data set's loss (squared error here, not cross-entropy); an ensemble of
    regressors averages their predictions (it learns: its score beats an untrained model's); distill,
    which matches class probabilities, refuses with a message naming the data set."""
    from sopkit.registry import create_strategy
    from sopkit.training.loop import TrainingSession
    from sopkit.training.settings import StrategySettings

    data = _regression_data()
    session = TrainingSession(
        data, lambda: nn.Linear(8, 1), TrainConfig(epochs=15, batch_size=32, lr=0.05),
        device=torch.device("cpu"), seed=0,
    )
    settings = StrategySettings(expansion=3, options={})
    untrained = session.evaluate(nn.Linear(8, 1), "test")
    for name in ("adv-mk", "ensemble"):
        result = create_strategy(name, settings).fit(session)
        assert result.diverged_at_step is None, name
        assert result.test_accuracy > 0.9 > untrained, (name, result.test_accuracy, untrained)
    with pytest.raises(UserError, match="distill distils class probabilities; regression"):
        create_strategy("distill", settings).fit(session)
