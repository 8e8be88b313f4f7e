"""The command line as a user runs it: exit codes, messages, files written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from sopkit.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from sopkit.cli import app\n"
        "result = CliRunner().invoke(app, ['--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "assert 'compare' in result.output\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'numpy', 'sklearn') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert completed.stdout.strip() == ""


def test_compare_writes_summary_and_per_seed_records(tmp_path, monkeypatch):
    out = tmp_path / "my out"
    args = [
        "compare", "--dataset", "digits", "--model", "mlp-a1", "--strategies", "baseline,mk",
        "--seeds", "2", "--epochs", "2", "--batch-size", "128", "--out", str(out),
    ]
    monkeypatch.setattr(sys, "argv", ["sopkit", *args])  # what the console script would see
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "epoch 2/2" in result.output  # plain progress lines: the runner is not a terminal
    assert "digits / mlp-a1 / adam" in result.output
    for name in ("report.md", "report.html", "summary.json", "summary.csv", "trials.jsonl"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True
    provenance = summary["meta"]["provenance"]
    assert provenance["versions"]["torch"] and "git_revision" in provenance
    rows = {row["strategy"]: row for row in summary["strategies"]}
    assert list(rows) == ["baseline", "mk"]
    for row in rows.values():
        for key in ("strategy", "test_accuracy_mean", "test_accuracy_std", "seeds", "train_params",
                    "inference_params", "step_time_ratio", "median_step_time", "wall_time"):
            assert key in row
        assert row["seeds"] == [0, 1]
        assert row["test_accuracy_mean"] > 0.3  # learnt something: chance is 0.1
        assert row["train"]["epochs"] == 2 and row["train"]["batch_size"] == 128
    assert rows["baseline"]["step_time_ratio"] == 1.0
    # mlp-a1 on digits (64 inputs, 10 classes); mk trains e = 3 copies of each weight.
    assert rows["baseline"]["train_params"] == rows["baseline"]["inference_params"] == 7510
    assert rows["mk"]["inference_params"] == 7510
    assert rows["mk"]["train_params"] == 3 * (64 * 100 + 100 * 10) + 100 + 10
    records = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [(r["strategy"], r["seed"]) for r in records] == [
        ("baseline", 0), ("mk", 0), ("baseline", 1), ("mk", 1)
    ]
    assert all(len(r["curve"]) == 2 and r["provenance"]["versions"]["torch"] for r in records)
    for name, row in rows.items():
        stored = [r["test_accuracy"] for r in records if r["strategy"] == name]
        assert row["test_accuracies"] == stored
    # The command line that produced the trials is kept with them, quoted for a shell.
    command = (
        "sopkit compare --dataset digits --model mlp-a1 --strategies baseline,mk --seeds 2 "
        f"--epochs 2 --batch-size 128 --out '{out}'"
    )
    assert f"```\n{command}\n```" in (out / "report.md").read_text()

    monkeypatch.setattr(sys, "argv", ["sopkit", "report", str(out)])
    again = run("report", str(out))  # the same reports, from the database alone
    assert again.exit_code == 0, again.output
    assert json.loads((out / "summary.json").read_text())["strategies"] == summary["strategies"]
    text = (out / "report.md").read_text()
    assert f"```\n{command}\n```" in text and "sopkit report" not in text


def test_report_on_a_directory_without_results_is_a_user_error(tmp_path):
    result = run("report", str(tmp_path))
    assert result.exit_code == 2 and "No results database" in result.output


def test_strategies_lists_builtins_with_their_distribution():
    result = run("strategies")
    assert result.exit_code == 0, result.output
    for name in ("baseline", "baseline-long", "mk"):
        assert name in result.output
    assert "sopkit" in result.output


def test_datasets_and_models_are_listed():
    assert "mnist1d" in run("datasets").output
    assert "mlp-a3" in run("models").output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dataset", "mnist2d"], "Valid datasets"),
        (["--model", "mlp-a9"], "Valid models"),
        (["--strategies", "baseline,mkk"], "Valid strategies"),
        (["--expansion", "1"], "--expansion must be at least 2"),
        (["--epochs", "0"], "--epochs must be a positive"),
        (["--batch-size", "0"], "--batch-size must be a positive"),
        (["--seeds", "0"], "--seeds must be a positive"),
        (["--dataset", "cifar10"], "--data-dir"),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "/nonexistent/cifar"),
        (["--model", "no_such_module:make"], "no_such_module"),
        (["--set", "mk.init=orthogonal"], "Valid values: independent"),
        (["--set", "novalue"], "KEY=VALUE"),
        (["--set", "mk.sampeler=sfc64"], "Did you mean 'sampler'?"),
        (["--set", "mkk.init=replicate"], "Valid strategies"),
        (["--set", "smoothing=0.1"], "no strategy has an option 'smoothing'"),
        (["--strategies", "baseline", "--set", "adv-mk.eps=-1"], "adv-mk.eps must be"),
        (["--optimizer", "rmsprop"], "Valid optimizers"),
    ],
)
def test_user_mistakes_exit_2_with_a_message_and_no_traceback(args, message, tmp_path):
    result = run("compare", "--epochs", "1", "--seeds", "1", "--out", str(tmp_path / "o"), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert isinstance(result.exception, SystemExit)  # an exit with a message, not a crash
