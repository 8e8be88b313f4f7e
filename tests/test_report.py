"""Reports from hand-made trials: every number checked against values computed by hand.

The fixture: one data set and model (mlp-a2), two optimizers (Adam, SGD: two groups), three
strategies (baseline, mk, distill), three seeds and two learning rates each; mk's seed 1 diverges at
Adam's larger rate, where mk's other seeds have the best validation accuracy of all.

Expected (test accuracy %, mean ± std over seeds, at the rate with the best mean val accuracy):

=========  =====================  =====================
strategy   Adam                   SGD
=========  =====================  =====================
baseline   52.00 ± 2.00 @ 0.001   46.00 ± 2.00 @ 0.0375
mk         55.00 ± 1.73 @ 0.001   50.00 ± 3.00 @ 0.025
distill    53.00 ± 2.65 @ 0.0015  47.00 ± 2.00 @ 0.0375
=========  =====================  =====================
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from sopkit.report import ReportMeta, print_report, write_all, write_markdown
from sopkit.results import Group, aggregate

T_975_2 = 4.302653  # Student's t quantile 0.975 with 2 degrees of freedom
SEEDS = (0, 1, 2)
STEP_TIMES = {"baseline": 0.010, "mk": 0.020, "distill": 0.012}
PARAMS = {"baseline": (1000, 1000), "mk": (3000, 1000), "distill": (1000, 1000)}

# (optimizer, strategy, lr) -> per-seed (val accuracy, test accuracy); None: that seed diverged.
RESULTS: dict[tuple[str, str, float], list[tuple[float, float] | None]] = {
    ("adam", "baseline", 0.001): [(0.60, 0.50), (0.62, 0.52), (0.64, 0.54)],
    ("adam", "baseline", 0.0015): [(0.58, 0.40), (0.60, 0.40), (0.62, 0.40)],
    ("adam", "mk", 0.001): [(0.70, 0.53), (0.70, 0.56), (0.70, 0.56)],
    # The best validation accuracy of all, but seed 1 diverged: this rate must never be chosen.
    ("adam", "mk", 0.0015): [(0.90, 0.99), None, (0.90, 0.99)],
    ("adam", "distill", 0.001): [(0.60, 0.45), (0.60, 0.45), (0.60, 0.45)],
    ("adam", "distill", 0.0015): [(0.65, 0.51), (0.65, 0.52), (0.65, 0.56)],
    ("sgd", "baseline", 0.025): [(0.50, 0.40), (0.50, 0.41), (0.50, 0.42)],
    ("sgd", "baseline", 0.0375): [(0.55, 0.44), (0.55, 0.46), (0.55, 0.48)],
    ("sgd", "mk", 0.025): [(0.60, 0.47), (0.60, 0.50), (0.60, 0.53)],
    ("sgd", "mk", 0.0375): [(0.58, 0.90), (0.58, 0.90), (0.58, 0.90)],
    ("sgd", "distill", 0.025): [(0.50, 0.30), (0.50, 0.30), (0.50, 0.30)],
    ("sgd", "distill", 0.0375): [(0.52, 0.45), (0.52, 0.47), (0.52, 0.49)],
}
EXPECTED = {  # (optimizer, strategy) -> (accuracy cell, chosen lr cell)
    ("adam", "baseline"): ("52.00 ± 2.00", "0.001"),
    ("adam", "mk"): ("55.00 ± 1.73", "0.001"),
    ("adam", "distill"): ("53.00 ± 2.65", "0.0015"),
    ("sgd", "baseline"): ("46.00 ± 2.00", "0.0375"),
    ("sgd", "mk"): ("50.00 ± 3.00", "0.025"),
    ("sgd", "distill"): ("47.00 ± 2.00", "0.0375"),
}
DIVERGED_STEP = 17
STRATEGIES = ("baseline", "mk", "distill")
REQUIRED_KEYS = {
    "strategy",
    "dataset",
    "model",
    "optimizer",
    "test_accuracy_mean",
    "test_accuracy_std",
    "seeds",
    "train_params",
    "inference_params",
    "step_time_ratio",
    "median_step_time",
    "chosen_lr",
    "wall_time",
    "paired_difference",
    "diverged",
}


def make_trial(
    optimizer: str, strategy: str, lr: float, seed: int, accuracies: tuple[float, float] | None
) -> dict[str, Any]:
    """One trial in the flat format ``TrialStore.trials()`` returns."""
    diverged = accuracies is None
    val, test = accuracies if accuracies is not None else (None, None)
    train_params, inference_params = PARAMS[strategy]
    curve = [
        {
            "epoch": epoch,
            "step": 10 * epoch,
            "train_loss": 1.0 / epoch,
            "val_accuracy": None if val is None else val * epoch / 3,
            "test_accuracy": None if test is None else test * epoch / 3,
            "seconds": 1.0 * epoch,
        }
        for epoch in (1, 2, 3)
    ]
    return {
        "key": f"{optimizer}-{strategy}-{lr}-{seed}",
        "status": "diverged" if diverged else "finished",
        "dataset": "mnist1d",
        "model": "mlp-a2",
        "optimizer": optimizer,
        "strategy": strategy,
        "seed": seed,
        "lr": lr,
        "train": {
            "epochs": 3,
            "batch_size": 256,
            "optimizer": optimizer,
            "lr": lr,
            "momentum": 0.9,
            "weight_decay": 0.0,
            "schedule": "constant",
            "bf16": False,
        },
        "expansion": 3,
        "options": {},
        "test_accuracy": test,
        "val_accuracy": val,
        "train_params": train_params,
        "inference_params": inference_params,
        "step_times": [STEP_TIMES[strategy]] * 5,
        "median_step_time": STEP_TIMES[strategy],
        "wall_time": 10.0,
        "curve": curve[:1] if diverged else curve,
        "diverged_at_step": DIVERGED_STEP if diverged else None,
        "extra": {"teacher_wall_time": 30.0} if strategy == "distill" else {},
        "provenance": {
            "git_revision": "abc123def456",
            "python": "3.11.9",
            "platform": "Linux",
            "torch_threads": 2,
            "cuda_device": None,
            "versions": {"sopkit": "0.1.0", "torch": "2.15.0"},
        },
        "finished_at": 0.0,
    }


def make_trials() -> list[dict[str, Any]]:
    return [
        make_trial(optimizer, strategy, lr, seed, accuracies)
        for (optimizer, strategy, lr), per_seed in RESULTS.items()
        for seed, accuracies in zip(SEEDS, per_seed, strict=True)
    ]


def make_meta(complete: bool = True) -> ReportMeta:
    return ReportMeta(
        title="Hand-made comparison",
        preset=None,
        command="sopkit compare --optimizer adam,sgd --lr-grid '0.001,0.0015'",
        created="2025-01-01T00:00:00+00:00",
        provenance=make_trials()[0]["provenance"],
        complete=complete,
        grid_note="hand-made grid: 2 rates per optimizer, 3 seeds, 3 epochs",
    )


def find(groups: list[Group], optimizer: str, strategy: str) -> Any:
    group = next(g for g in groups if g.optimizer == optimizer)
    return next(r for r in group.strategies if r.strategy == strategy)


@pytest.fixture(scope="module")
def groups() -> list[Group]:
    return aggregate(make_trials(), STRATEGIES)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory, groups: list[Group]) -> Path:
    """write_all once for the whole module: drawing the figures is the slow part."""
    out = tmp_path_factory.mktemp("report")
    paths = write_all(out, groups, make_meta(complete=True))
    names = {p.relative_to(out).as_posix() for p in paths}
    assert {"report.md", "report.html", "summary.json", "summary.csv"} <= names
    assert all(p.is_file() for p in paths)
    return out


# --- the aggregation the reports rely on ------------------------------------------------------------


def test_a_diverged_rate_is_never_chosen(groups: list[Group]) -> None:
    mk = find(groups, "adam", "mk")
    assert mk.lr_scores[0.0015] is None  # the best mean validation accuracy, but a seed diverged
    assert mk.chosen_lr == 0.001
    assert mk.seeds == [0, 1, 2]
    assert mk.diverged == [{"seed": 1, "lr": 0.0015, "step": DIVERGED_STEP}]
    assert find(groups, "adam", "distill").chosen_lr == 0.0015
    assert find(groups, "sgd", "mk").chosen_lr == 0.025  # val 0.60 > 0.58, whatever the test says


def test_paired_difference_is_the_hand_computed_t_interval(groups: list[Group]) -> None:
    # mk - baseline on seeds 0, 1, 2 (Adam, both at lr 0.001): 0.03, 0.04, 0.02.
    differences = [0.03, 0.04, 0.02]
    mean = sum(differences) / 3
    std = math.sqrt(sum((d - mean) ** 2 for d in differences) / 2)
    half_width = T_975_2 * std / math.sqrt(3)
    paired = find(groups, "adam", "mk").paired
    assert paired.pairs == 3
    assert paired.mean == pytest.approx(0.03, abs=1e-12)
    assert paired.low == pytest.approx(mean - half_width, abs=1e-6)
    assert paired.high == pytest.approx(mean + half_width, abs=1e-6)
    assert paired.low == pytest.approx(0.0051586, abs=1e-6)
    assert paired.significant
    # distill: 0.01, 0.00, 0.02 -> mean 0.01, the same half-width: the interval contains 0.
    distill = find(groups, "adam", "distill").paired
    assert distill.low == pytest.approx(0.01 - half_width, abs=1e-6)
    assert not distill.significant


# --- report.md --------------------------------------------------------------------------------------


def markdown_table(text: str, heading: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the first Markdown table after ``heading``."""
    lines = text[text.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip().strip("*") for cell in line.strip().strip("|").split(" | ")])
    return table[0], table[2:]  # skip the alignment row


def test_markdown_has_the_paper_table_layout(report_dir: Path) -> None:
    text = (report_dir / "report.md").read_text()
    header, rows = markdown_table(text, "## Test accuracy (paper Table 1 layout)")
    for column in (
        "model",
        "architecture",
        "strategy",
        "Adam test acc. (%)",
        "Adam lr",
        "SGD test acc. (%)",
        "SGD lr",
        "step / baseline",
        "train params",
        "inference params",
    ):
        assert column in header
    assert header.index("Adam test acc. (%)") < header.index("SGD test acc. (%)")  # Table 1's order
    # One row per (model, strategy): both optimizers side by side on it.
    assert [(row[header.index("model")], row[header.index("strategy")]) for row in rows] == [
        ("mlp-a2", s) for s in STRATEGIES
    ]
    for row in rows:
        cells = dict(zip(header, row, strict=True))
        assert cells["architecture"] == "[200, 100]"
        for optimizer, name in (("adam", "Adam"), ("sgd", "SGD")):
            accuracy, lr = EXPECTED[(optimizer, cells["strategy"])]
            assert cells[f"{name} test acc. (%)"] == accuracy
            assert cells[f"{name} lr"] == lr
    by_strategy = {
        row[header.index("strategy")]: dict(zip(header, row, strict=True)) for row in rows
    }
    assert by_strategy["mk"]["step / baseline"] == "2.0×"
    assert by_strategy["mk"]["train params"] == "3k"
    assert by_strategy["mk"]["inference params"] == "1k"


def test_markdown_shows_paired_differences_and_provenance(report_dir: Path) -> None:
    text = (report_dir / "report.md").read_text()
    # mk vs baseline (Adam): +3.00 pp, [+0.52, +5.48], significant.
    assert "+3.00 [+0.52, +5.48] \\*" in text
    assert "+1.00 [-1.48, +3.48]" in text  # distill: not significant, no marker
    assert "+1.00 [-1.48, +3.48] \\*" not in text
    section = text[text.index("## How this was produced") :]
    for expected in (
        "sopkit compare --optimizer adam,sgd",
        "hand-made grid",
        "abc123def456",
        "torch 2.15.0",
        "**Complete:** yes",
        "0–2",
    ):
        assert expected in section
    assert "[!WARNING]" not in text  # complete: no warning
    # The teacher's cost is shown next to the student's, over all seeds (3 × 30 s).
    assert "30.0 s + 1 min 30 s teacher" in text


def test_the_diverged_trial_is_in_markdown_and_html(report_dir: Path) -> None:
    text = (report_dir / "report.md").read_text()
    header, rows = markdown_table(text, "## Diverged trials")
    assert len(rows) == 1
    cells = dict(zip(header, rows[0], strict=True))
    assert cells["strategy"] == "mk"
    assert (cells["lr"], cells["seed"]) == ("0.0015", "1")
    assert cells["what happened"] == f"diverged at step {DIVERGED_STEP}"
    assert "6 (1 diverged)" in text  # mk's trial count in its group table
    page = (report_dir / "report.html").read_text()
    assert f"diverged at step {DIVERGED_STEP}" in page
    assert re.search(r"0\.0015</td><td[^>]*>1</td><td[^>]*>diverged at step 17", page)


# --- report.html ------------------------------------------------------------------------------------


def test_html_is_one_offline_file_with_three_plots(report_dir: Path) -> None:
    page = (report_dir / "report.html").read_text()
    for external in ("http://", "https://", "<link", 'src="http', "<script", "@import", "url(http"):
        assert external not in page
    assert page.count("<svg") + page.count('src="data:image') >= 3
    for title in (
        "Learning curves",
        "Test accuracy against training cost",
        "Test accuracy against the size of the deployed model",
    ):
        assert title in page or title.lower() in page.lower()
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))  # several inline SVGs must not share ids
    assert "52.00 ± 2.00" in page and "55.00 ± 1.73" in page
    pngs = sorted(p.name for p in (report_dir / "figures").glob("*.png"))
    assert len(pngs) == 3
    assert all((report_dir / "figures" / name).read_bytes()[:4] == b"\x89PNG" for name in pngs)


# --- summary.json / summary.csv ---------------------------------------------------------------------


def strict_json(path: Path) -> Any:
    """JSON without NaN or Infinity (Python's json would accept them)."""

    def reject(constant: str) -> None:
        raise AssertionError(f"{path.name} holds {constant}")

    return json.loads(path.read_text(), parse_constant=reject)


def test_summary_json_matches_the_aggregation(report_dir: Path, groups: list[Group]) -> None:
    summary = strict_json(report_dir / "summary.json")
    assert summary["complete"] is True
    assert summary["meta"]["title"] == "Hand-made comparison"
    assert summary["meta"]["provenance"]["git_revision"] == "abc123def456"
    records = summary["strategies"]
    assert len(records) == 6
    for record in records:
        assert record.keys() >= REQUIRED_KEYS
        result = find(groups, record["optimizer"], record["strategy"])
        assert record["dataset"] == "mnist1d" and record["model"] == "mlp-a2"
        assert record["test_accuracy_mean"] == pytest.approx(result.test_accuracy_mean)
        assert record["test_accuracy_std"] == pytest.approx(result.test_accuracy_std)
        assert record["chosen_lr"] == result.chosen_lr
        assert record["seeds"] == [0, 1, 2]
        assert record["step_time_ratio"] == pytest.approx(result.step_time_ratio)
        assert record["wall_time"] == pytest.approx(30.0)
    by_key = {(r["optimizer"], r["strategy"]): r for r in records}
    assert by_key[("adam", "baseline")]["paired_difference"] is None
    paired = by_key[("adam", "mk")]["paired_difference"]
    assert paired["pairs"] == 3 and paired["significant"] is True
    assert paired["low"] == pytest.approx(0.0051586, abs=1e-6)
    assert by_key[("adam", "mk")]["diverged"] == [{"seed": 1, "lr": 0.0015, "step": DIVERGED_STEP}]
    assert by_key[("adam", "mk")]["step_time_ratio"] == pytest.approx(2.0)
    assert by_key[("adam", "distill")]["teacher_wall_time"] == pytest.approx(90.0)
    assert not list(report_dir.glob("*.tmp")) and not list(report_dir.glob(".*.tmp"))


def test_summary_csv_has_one_row_per_group_and_strategy(report_dir: Path) -> None:
    with (report_dir / "summary.csv").open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 6
    assert {(r["optimizer"], r["strategy"]) for r in rows} == set(EXPECTED)
    for row in rows:
        accuracy, lr = EXPECTED[(row["optimizer"], row["strategy"])]
        mean, std = (float(v) / 100 for v in accuracy.split(" ± "))
        assert float(row["test_accuracy_mean"]) == pytest.approx(mean, abs=5e-5)
        assert float(row["test_accuracy_std"]) == pytest.approx(std, abs=5e-5)
        assert float(row["chosen_lr"]) == float(lr)
        assert row["n_seeds"] == "3"
    mk = next(r for r in rows if (r["optimizer"], r["strategy"]) == ("adam", "mk"))
    assert mk["diverged_trials"] == "1" and mk["significant"] == "True"
    baseline = next(r for r in rows if (r["optimizer"], r["strategy"]) == ("adam", "baseline"))
    assert baseline["delta_mean"] == ""  # no difference against itself: empty, not "None"


# --- incomplete comparisons and the terminal ---------------------------------------------------------


def test_an_incomplete_comparison_says_so_everywhere(tmp_path: Path, groups: list[Group]) -> None:
    meta = make_meta(complete=False)
    text = write_markdown(tmp_path / "report.md", groups, meta).read_text()
    assert "> [!WARNING]" in text and "Incomplete comparison" in text
    assert "**Complete:** NO" in text
    from sopkit.report import render_html, write_summary

    page = render_html(groups, meta, figures=[])
    assert 'class="banner warning"' in page and "Incomplete comparison" in page
    write_summary(tmp_path, groups, meta)
    assert strict_json(tmp_path / "summary.json")["complete"] is False
    console = Console(record=True, width=200)
    print_report(console, groups, meta)
    output = console.export_text()
    assert "Incomplete comparison" in output
    assert f"mk: diverged at step {DIVERGED_STEP} (lr=0.0015, seed=1)" in output
    assert "55.00 ± 1.73" in output and "+3.00 [+0.52, +5.48] *" in output


def test_a_strategy_that_always_diverged_still_reports(tmp_path: Path) -> None:
    """Every rate diverged: no chosen rate, NaN accuracy -> 'diverged' in tables, null in JSON."""
    trials = [t for t in make_trials() if t["optimizer"] == "adam"]
    for trial in trials:
        if trial["strategy"] == "mk":
            trial.update(
                val_accuracy=None, test_accuracy=None, diverged_at_step=3, status="diverged"
            )
    groups = aggregate(trials, STRATEGIES)
    write_all(tmp_path, groups, make_meta())
    record = next(
        r for r in strict_json(tmp_path / "summary.json")["strategies"] if r["strategy"] == "mk"
    )
    assert record["chosen_lr"] is None and record["test_accuracy_mean"] is None
    assert len(record["diverged"]) == 6
    header, rows = markdown_table(
        (tmp_path / "report.md").read_text(), "## Test accuracy (paper Table 1 layout)"
    )
    mk = dict(zip(header, next(r for r in rows if r[2] == "mk"), strict=True))
    assert mk["Adam test acc. (%)"] == "diverged"


def test_meta_from_trials_names_every_git_revision(tmp_path: Path, groups: list[Group]) -> None:
    """A report mixing trials from two code versions must say so, not quote just one."""
    trials = make_trials()
    trials[-1] = {
        **trials[-1],
        "finished_at": 1.0,
        "provenance": {**trials[-1]["provenance"], "git_revision": "fedcba987654"},
    }
    meta = ReportMeta.from_trials(trials, title="Mixed", complete=True)
    assert meta.provenance["git_revision"] == "fedcba987654"  # the latest trial's
    assert meta.provenance["git_revisions"] == ["abc123def456", "fedcba987654"]
    text = write_markdown(tmp_path / "report.md", groups, meta).read_text()
    assert "the trials come from 2 revisions: abc123def456, fedcba987654" in text
