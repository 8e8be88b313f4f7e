"""Reports built from trials the real store wrote: every number checked against values computed by
hand.

One tiny comparison runs once per session (``run_plan``: digits, mlp-a1, baseline and mk, two
seeds, one epoch) and its trials are read back with ``TrialStore.trials()``. The hand-made scenario
below is made of those stored records with only their numbers replaced (``dataclasses.replace``, so
a renamed or removed record field fails here instead of the tests drifting from what the store
writes), with specs from a real plan, written through ``TrialStore.record`` and reported by
``regenerate``, as ``sopkit report`` does.

The scenario: digits, mlp-a1, two optimizers (Adam, SGD: two groups), three strategies (baseline,
mk, distill), three seeds and two learning rates each (the paper's grid, i in [0..1]); mk's seed 1
diverges at Adam's larger rate, where mk's other seeds have the best validation accuracy of all.

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
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from sopkit.cli import app
from sopkit.experiment import runner
from sopkit.experiment.plan import ComparePlan, build_plan, plan_record
from sopkit.experiment.records import TrialRecord, TrialSpec
from sopkit.experiment.results import Group, aggregate
from sopkit.experiment.runner import run_plan
from sopkit.experiment.store import DATABASE_NAME, TrialStore
from sopkit.report import regenerate, write_all
from sopkit.report.meta import NO_COMMAND, NO_REVISION, ReportMeta
from sopkit.training.progress import NullProgress

T_975_2 = 4.302653  # Student's t quantile 0.975 with 2 degrees of freedom
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
REVISION = "abc123def456"
HAND_COMMAND = "sopkit compare --dataset digits --optimizer adam,sgd --lr-grid paper:0..1"
COMMAND = "sopkit compare --dataset digits --model mlp-a1 --seeds 2 --epochs 1 --out DIR"


def tiny_plan(**overrides: Any) -> ComparePlan:
    """A comparison that trains in a second: digits, mlp-a1, one epoch on the CPU."""
    settings: dict[str, Any] = dict(
        dataset="digits", models=("mlp-a1",), strategies=("baseline", "mk"), seeds=2, epochs=1,
        device="cpu",
    )
    return build_plan(**{**settings, **overrides})


@dataclass
class Comparison:
    """A comparison run by ``run_plan``: its directory, stored plan record and stored trials."""

    out: Path
    plan: dict[str, Any]
    trials: list[TrialRecord]


@pytest.fixture(scope="session")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> Comparison:
    out = tmp_path_factory.mktemp("comparison")
    plan = tiny_plan()
    run_plan(plan, out, NullProgress(), command=COMMAND)
    with TrialStore.open_existing(out) as store:
        return Comparison(out, plan_record(plan, COMMAND), store.trials())


def make_trial(
    template: TrialRecord, spec: TrialSpec, accuracies: tuple[float, float] | None
) -> TrialRecord:
    """``template`` (a stored trial) as the trial ``spec`` with the scenario's numbers."""
    diverged = accuracies is None
    val, test = accuracies if accuracies is not None else (None, None)
    train_params, inference_params = PARAMS[spec.strategy]
    curve = tuple(
        {
            **template.curve[0],
            "epoch": epoch,
            "step": 10 * epoch,
            "train_loss": 1.0 / epoch,
            "val_accuracy": None if val is None else val * epoch / 3,
            "test_accuracy": None if test is None else test * epoch / 3,
            "seconds": 1.0 * epoch,
        }
        for epoch in (1, 2, 3)
    )
    versions = {**template.provenance["versions"], "torch": "2.15.0"}
    return replace(
        template,
        key=spec.key,
        status="diverged" if diverged else "finished",
        spec=spec,
        test_accuracy=test,
        val_accuracy=val,
        train_params=train_params,
        inference_params=inference_params,
        median_step_time=STEP_TIMES[spec.strategy],
        wall_time=10.0,
        curve=curve[:1] if diverged else curve,
        diverged_at_step=DIVERGED_STEP if diverged else None,
        extra={"teacher_wall_time": 30.0} if spec.strategy == "distill" else {},
        provenance={**template.provenance, "git_revision": REVISION, "versions": versions},
    )


def hand_made(comparison: Comparison) -> tuple[dict[str, Any], list[TrialRecord]]:
    """The scenario's plan record and every one of its trials."""
    plan = tiny_plan(
        optimizers=("adam", "sgd"), strategies=STRATEGIES, seeds=3, epochs=3, lr_grid="paper:0..1"
    )
    templates = {t.spec.strategy: t for t in comparison.trials}
    trials = [
        make_trial(
            templates.get(spec.strategy, templates["baseline"]),
            spec,
            RESULTS[(spec.optimizer, spec.strategy, round(spec.lr, 6))][spec.seed],
        )
        for job in plan.jobs()
        for spec in job.specs
    ]
    return plan_record(plan, HAND_COMMAND), trials


def store_trials(out: Path, plan: dict[str, Any], trials: list[TrialRecord]) -> None:
    with TrialStore(out / DATABASE_NAME) as store:
        store.write_plan(plan)
        for trial in trials:
            store.record(trial.spec, trial.result_dict(), trial.provenance)


@pytest.fixture
def no_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reports without their figures, for tests that read only tables (drawing is the slow part)."""
    monkeypatch.setattr("sopkit.report.build.draw_figures", lambda groups: [])


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory, comparison: Comparison) -> Path:
    """The scenario stored and reported once for the module (drawing the figures is slow)."""
    out = tmp_path_factory.mktemp("report")
    store_trials(out, *hand_made(comparison))
    paths = regenerate(out)
    assert sorted(p.relative_to(out).as_posix() for p in paths) == [
        "figures/accuracy-vs-inference-params.png",
        "figures/accuracy-vs-step-time.png",
        "figures/learning-curves.png",
        "report.html",
        "report.md",
        "summary.csv",
        "summary.json",
        "trials.jsonl",
    ]
    return out


@pytest.fixture(scope="module")
def groups(report_dir: Path) -> list[Group]:
    with TrialStore.open_existing(report_dir) as store:
        return aggregate(store.trials(), STRATEGIES)


def find(groups: list[Group], optimizer: str, strategy: str) -> Any:
    group = next(g for g in groups if g.optimizer == optimizer)
    return next(r for r in group.strategies if r.strategy == strategy)


# --- the aggregation the reports rely on ----------------------------------------------------------


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


# --- report.md ------------------------------------------------------------------------------------


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
    assert header == [
        "model",
        "architecture",
        "strategy",
        "Adam test acc. (%)",  # Table 1's order: Adam before SGD
        "Adam lr",
        "SGD test acc. (%)",
        "SGD lr",
        "step / baseline",
        "train params",
        "inference params",
    ]
    # One row per (model, strategy): both optimizers side by side on it.
    by_strategy = {row[2]: dict(zip(header, row, strict=True)) for row in rows}
    assert [(row[0], row[2]) for row in rows] == [("mlp-a1", s) for s in STRATEGIES]
    for strategy, cells in by_strategy.items():
        assert cells["architecture"] == "[100]"  # from the model registry
        for optimizer, name in (("adam", "Adam"), ("sgd", "SGD")):
            accuracy, lr = EXPECTED[(optimizer, strategy)]
            assert cells[f"{name} test acc. (%)"] == accuracy
            # Every choice of a two-rate grid is at one of its edges: marked (sopkit.report.edges).
            assert cells[f"{name} lr"] == f"{lr} †"
    assert by_strategy["mk"]["step / baseline"] == "2.0×"
    assert by_strategy["distill"]["step / baseline"] == "1.2×"
    assert by_strategy["mk"]["train params"] == "3k"
    assert by_strategy["mk"]["inference params"] == "1k"


def test_markdown_shows_paired_differences_and_provenance(report_dir: Path) -> None:
    text = (report_dir / "report.md").read_text()
    # mk vs baseline (Adam): +3.00 pp, [+0.52, +5.48], significant.
    assert "+3.00 [+0.52, +5.48] \\*" in text
    assert "+1.00 [-1.48, +3.48]" in text  # distill: not significant, no marker
    assert "+1.00 [-1.48, +3.48] \\*" not in text
    section = text[text.index("## How this was produced") :]
    assert f"```\n{HAND_COMMAND}\n```" in section  # the command stored with the plan
    for expected in (
        "a reduced learning-rate grid: base\\*1.5^i for i in [0..1]",  # the plan's grid note
        f"**git revision:** {REVISION}",
        "torch 2.15.0",
        "**Complete:** yes",
        "| digits / mlp-a1 / adam | 2 rates 0.001·1.5^i, i ∈ [0..1]",
        "| 0–2 | 3 | 256 | constant | 18 |",  # seeds, epochs, batch, schedule, trials
    ):
        assert expected in section, expected
    assert "revisions" not in section and "**Command:**" not in section
    assert "[!WARNING]" not in text  # complete: no warning
    # The teacher's cost is shown next to the student's, over all seeds (3 × 30 s).
    assert "30.0 s + 1 min 30 s teacher" in text


def test_the_diverged_trial_is_in_markdown_and_html(report_dir: Path) -> None:
    text = (report_dir / "report.md").read_text()
    header, rows = markdown_table(text, "## Diverged trials")
    assert [dict(zip(header, row, strict=True)) for row in rows] == [
        {
            "group": "digits / mlp-a1 / adam",
            "strategy": "mk",
            "lr": "0.0015",
            "seed": "1",
            "what happened": f"diverged at step {DIVERGED_STEP}",
        }
    ]
    assert "6 (1 diverged)" in text  # mk's trial count in its group table
    page = (report_dir / "report.html").read_text()
    assert re.search(r"0\.0015</td><td[^>]*>1</td><td[^>]*>diverged at step 17", page)


def test_the_strategies_section_says_what_each_one_is_and_who_registers_it(
    report_dir: Path,
) -> None:
    from importlib import metadata

    from sopkit_baselines.distill import Distillation

    from sopkit.strategies.baseline import Baseline
    from sopkit.strategies.majority import MajorityKernelsStrategy

    own = f"sopkit {metadata.version('sopkit')}"
    plugin = f"sopkit-baselines {metadata.version('sopkit-baselines')}"
    header, rows = markdown_table((report_dir / "report.md").read_text(), "## Strategies")
    assert header == ["strategy", "what it is", "registered by"]
    assert rows == [
        ["baseline", Baseline.description, own],
        ["mk", MajorityKernelsStrategy.description, own],
        ["distill", Distillation.description, plugin],
    ]
    page = (report_dir / "report.html").read_text()
    assert '<h2 id="strategies">Strategies</h2>' in page and Baseline.description in page


def test_majority_kernels_against_each_strategy_is_mk_minus_it_on_shared_seeds(
    report_dir: Path, groups: list[Group]
) -> None:
    header, rows = markdown_table(
        (report_dir / "report.md").read_text(), "## Majority kernels against each strategy"
    )
    assert header[:3] == ["group", "mk minus", "Δ test accuracy (pp)"]
    expected = []
    for group in groups:
        mk = dict(zip(find(groups, group.optimizer, "mk").seeds,
                      find(groups, group.optimizer, "mk").test_accuracies, strict=True))
        for other in group.strategies:
            if other.strategy == "mk":
                continue
            theirs = dict(zip(other.seeds, other.test_accuracies, strict=True))
            shared = sorted(set(mk) & set(theirs))
            mean = sum(mk[s] - theirs[s] for s in shared) / len(shared)
            expected.append([group.title, other.strategy, f"{100 * mean:+.2f}", str(len(shared))])
    assert [[row[0], row[1], row[2], row[4]] for row in rows] == expected
    # The sign: against the baseline it is the baseline table's difference for mk.
    for group in groups:
        baseline_row = next(r for r in rows if r[0] == group.title and r[1] == "baseline")
        mk = find(groups, group.optimizer, "mk")
        assert baseline_row[2] == f"{100 * mk.paired.mean:+.2f}"
    page = (report_dir / "report.html").read_text()
    assert '<h2 id="against-mk">Majority kernels against each strategy</h2>' in page


def test_without_majority_kernels_there_is_no_row_against_it(groups: list[Group]) -> None:
    from sopkit.report.tables import mk_against_table

    without = [replace(g, strategies=[r for r in g.strategies if r.strategy != "mk"]) for g in groups]
    assert mk_against_table(without).rows == []
    assert len(mk_against_table(groups).rows) == sum(len(g.strategies) - 1 for g in groups)


def test_a_strategy_not_registered_where_the_report_is_written_is_named_not_fatal() -> None:
    from types import SimpleNamespace

    from sopkit.report.tables import strategies_table

    group = SimpleNamespace(strategies=[SimpleNamespace(strategy=n) for n in ("mk", "gone")])
    table = strategies_table([group, group])  # type: ignore[list-item]
    assert [[c.text for c in row] for row in table.rows][1] == [
        "gone", "(not registered where this report was written)", ""
    ]
    assert len(table.rows) == 2  # each strategy once, in order


# --- report.html ----------------------------------------------------------------------------------


def test_html_is_one_offline_file_with_three_plots(report_dir: Path) -> None:
    page = (report_dir / "report.html").read_text()
    for external in ("http://", "https://", "<link", 'src="http', "<script", "@import", "url(http"):
        assert external not in page
    assert page.count("<figure><svg") == 3
    for title in (
        "Learning curves at each strategy",
        "Test accuracy against training cost",
        "Test accuracy against the size of the deployed model",
    ):
        assert title in page
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))  # several inline SVGs must not share ids
    assert "52.00 ± 2.00" in page and "55.00 ± 1.73" in page
    assert f"git {REVISION}" in page
    figures = report_dir / "figures"
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in figures.glob("*.png"))
    markdown = (report_dir / "report.md").read_text()
    for png in figures.glob("*.png"):
        assert f"(figures/{png.name})" in markdown  # report.md embeds every figure


# --- summary.json / summary.csv / trials.jsonl ----------------------------------------------------


def strict_json(path: Path) -> Any:
    """JSON without NaN or Infinity (Python's json would accept them)."""

    def reject(constant: str) -> None:
        raise AssertionError(f"{path.name} holds {constant}")

    return json.loads(path.read_text(), parse_constant=reject)


def test_summary_json_holds_the_hand_computed_numbers(report_dir: Path) -> None:
    summary = strict_json(report_dir / "summary.json")
    assert summary["complete"] is True
    assert summary["meta"]["title"] == "digits comparison"
    assert summary["meta"]["command"] == HAND_COMMAND
    assert summary["meta"]["provenance"]["git_revision"] == REVISION
    assert summary["meta"]["provenance_spread"] == {}
    records = {(r["optimizer"], r["strategy"]): r for r in summary["strategies"]}
    assert list(records) == [(o, s) for o in ("adam", "sgd") for s in STRATEGIES]
    for (optimizer, strategy), record in records.items():
        accuracy, lr = EXPECTED[(optimizer, strategy)]
        mean, std = (float(v) / 100 for v in accuracy.split(" ± "))
        assert (record["dataset"], record["model"]) == ("digits", "mlp-a1")
        assert record["test_accuracy_mean"] == pytest.approx(mean, abs=1e-9)
        assert record["test_accuracy_std"] == pytest.approx(std, abs=5e-5)
        assert record["chosen_lr"] == pytest.approx(float(lr))
        assert record["seeds"] == [0, 1, 2]
        assert record["wall_time"] == pytest.approx(30.0)
        assert record["train"]["epochs"] == 3
    assert records[("adam", "baseline")]["paired_difference"] is None
    assert records[("adam", "baseline")]["step_time_ratio"] == 1.0
    paired = records[("adam", "mk")]["paired_difference"]
    assert paired["pairs"] == 3 and paired["significant"] is True
    assert paired["low"] == pytest.approx(0.0051586, abs=1e-6)
    assert records[("adam", "mk")]["diverged"] == [
        {"seed": 1, "lr": pytest.approx(0.0015), "step": DIVERGED_STEP}
    ]
    assert records[("adam", "mk")]["step_time_ratio"] == pytest.approx(2.0)
    assert records[("adam", "distill")]["teacher_wall_time"] == pytest.approx(90.0)
    assert not list(report_dir.glob("*.tmp")) and not list(report_dir.glob(".*.tmp"))


def test_summary_csv_has_one_row_per_group_and_strategy(report_dir: Path) -> None:
    with (report_dir / "summary.csv").open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [(r["optimizer"], r["strategy"]) for r in rows] == list(EXPECTED)
    for row in rows:
        accuracy, lr = EXPECTED[(row["optimizer"], row["strategy"])]
        mean, std = (float(v) / 100 for v in accuracy.split(" ± "))
        assert float(row["test_accuracy_mean"]) == pytest.approx(mean, abs=5e-5)
        assert float(row["test_accuracy_std"]) == pytest.approx(std, abs=5e-5)
        assert float(row["chosen_lr"]) == pytest.approx(float(lr))
        assert row["n_seeds"] == "3" and row["seeds"] == "0;1;2"
    mk = next(r for r in rows if (r["optimizer"], r["strategy"]) == ("adam", "mk"))
    assert mk["diverged_trials"] == "1" and mk["significant"] == "True"
    baseline = next(r for r in rows if (r["optimizer"], r["strategy"]) == ("adam", "baseline"))
    assert baseline["delta_mean"] == ""  # no difference against itself: empty, not "None"


def test_trials_jsonl_is_every_stored_trial(report_dir: Path) -> None:
    lines = (report_dir / "trials.jsonl").read_text().splitlines()
    with TrialStore.open_existing(report_dir) as store:
        stored = store.trials()
    assert [json.loads(line) for line in lines] == [
        json.loads(json.dumps(t.as_dict())) for t in stored
    ]
    assert len(lines) == len(RESULTS) * 3


# --- incomplete comparisons and the terminal ------------------------------------------------------


@pytest.mark.usefixtures("no_figures")
def test_an_interrupted_comparison_says_so_everywhere(
    tmp_path: Path, comparison: Comparison
) -> None:
    """The last planned trial never finished: every output says the comparison is incomplete."""
    plan, trials = hand_made(comparison)
    store_trials(tmp_path, plan, trials[:-1])  # sgd, seed 2, lr 0.0375, distill is missing
    console = Console(record=True, width=200)
    regenerate(tmp_path, console=console)
    text = (tmp_path / "report.md").read_text()
    assert "> [!WARNING]" in text and "Incomplete comparison" in text
    assert "**Complete:** NO" in text
    assert "distill on digits / mlp-a1 / sgd: 5 of 6 trials (2 rates × 3 seeds)." in text
    page = (tmp_path / "report.html").read_text()
    assert 'class="banner warning"' in page and "Incomplete comparison" in page
    assert strict_json(tmp_path / "summary.json")["complete"] is False
    output = console.export_text()
    assert "Incomplete comparison" in output
    assert f"mk: diverged at step {DIVERGED_STEP} (lr=0.0015, seed=1)" in output
    assert "55.00 ± 1.73" in output and "+3.00 [+0.52, +5.48] *" in output
    assert "Missing trials: distill on digits / mlp-a1 / sgd: 5 of 6 trials" in output


@pytest.mark.usefixtures("no_figures")
def test_a_strategy_that_always_diverged_still_reports(
    tmp_path: Path, comparison: Comparison
) -> None:
    """Every rate diverged: no chosen rate, NaN accuracy -> 'diverged' in tables, null in JSON."""
    _, trials = hand_made(comparison)
    trials = [
        replace(t, val_accuracy=None, test_accuracy=None, diverged_at_step=3, status="diverged")
        if t.spec.strategy == "mk"
        else t
        for t in trials
        if t.spec.optimizer == "adam"
    ]
    write_all(tmp_path, aggregate(trials, STRATEGIES), ReportMeta(title="All mk diverged"))
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


# --- a real comparison, and the provenance its reports show ---------------------------------------


@pytest.mark.usefixtures("no_figures")
def test_the_report_of_a_real_comparison_is_its_stored_trials(
    comparison: Comparison, tmp_path: Path
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(comparison.out, out)
    regenerate(out)
    summary = strict_json(out / "summary.json")
    for record in summary["strategies"]:
        stored = sorted(
            (t for t in comparison.trials if t.spec.strategy == record["strategy"]),
            key=lambda t: t.spec.seed,
        )
        assert record["seeds"] == [0, 1]
        assert record["test_accuracies"] == [t.test_accuracy for t in stored]
        assert record["train_params"] == stored[0].train_params
    mk = next(r for r in summary["strategies"] if r["strategy"] == "mk")
    # mlp-a1 on digits (64 inputs, 10 classes): e = 3 copies of both weights, biases single.
    assert mk["train_params"] == 3 * (64 * 100 + 100 * 10) + 100 + 10
    assert mk["inference_params"] == 64 * 100 + 100 * 10 + 100 + 10
    lines = (out / "trials.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == [t.key for t in comparison.trials]


@pytest.mark.usefixtures("no_figures")
def test_sopkit_report_shows_the_command_that_produced_the_trials(
    comparison: Comparison, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(comparison.out, out)
    monkeypatch.setattr(sys, "argv", ["sopkit", "report", str(out)])
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    assert f"```\n{COMMAND}\n```" in text
    assert "sopkit report" not in text
    assert COMMAND in (out / "report.html").read_text()
    with TrialStore.open_existing(out) as store:
        assert store.read_plan()["command"] == COMMAND  # regenerating stored nothing over it


@pytest.mark.usefixtures("no_figures")
def test_a_database_stored_without_a_command_shows_none(tmp_path: Path) -> None:
    """A results.sqlite written before commands were stored: no command line, never the
    `sopkit report` that regenerated it."""
    out = tmp_path / "old"
    shutil.copytree(Path(__file__).parent / "data" / "store-v1", out)
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    assert f"- **Command:** {NO_COMMAND}" in text
    assert "sopkit report" not in text and "```" not in text
    assert "<pre>" not in (out / "report.html").read_text()


@pytest.mark.usefixtures("no_figures")
def test_trials_from_two_revisions_show_every_revision_with_its_trials(
    tmp_path: Path, comparison: Comparison, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = dict(comparison.trials[0].provenance)
    first = tiny_plan(seeds=1)
    run_plan(first, tmp_path, NullProgress(), command="sopkit compare FIRST")
    other = {**real, "git_revision": "f" * 40, "versions": {**real["versions"], "torch": "9.9.9"}}
    monkeypatch.setattr(runner, "provenance", lambda: other)
    second = tiny_plan(strategies=("baseline",), seeds=1, first_seed=1)
    run_plan(second, tmp_path, NullProgress(), command="sopkit compare SECOND")

    regenerate(tmp_path)  # every trial in the directory: 2 of the first revision, 1 of the second
    text = (tmp_path / "report.md").read_text()
    revision = real["git_revision"] or NO_REVISION
    assert (
        f"**git revision:** the trials come from 2 revisions: {revision} (2 trials), "
        f"{'f' * 40} (1 trial)"
    ) in text
    assert f"torch {real['versions']['torch']} (2 trials) / 9.9.9 (1 trial)" in text
    assert "git: 2 revisions" in (tmp_path / "report.html").read_text()
    spread = strict_json(tmp_path / "summary.json")["meta"]["provenance_spread"]
    assert spread["git_revision"] == {revision: 2, "f" * 40: 1}
    assert spread["versions.torch"] == {real["versions"]["torch"]: 2, "9.9.9": 1}
    assert set(spread) == {"git_revision", "versions.torch"}

    regenerate(tmp_path, plan=plan_record(first, "sopkit compare FIRST"))  # the first plan alone
    text = (tmp_path / "report.md").read_text()
    assert f"**git revision:** {revision}\n" in text and "9.9.9" not in text
