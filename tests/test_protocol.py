"""The protocol stages after a comparison's grid (sopkit.experiment.protocol): the edge flag in every
report, the edge extension, the confirmation seeds, and MNIST-1D's sample count.

Real comparisons on digits (mlp-a1, one epoch, batch 64, the CPU): with Adam, one epoch at 1e-5 or
1e-4 leaves the model near chance while 1e-3 and 1e-2 learn, so a grid of the two small rates chooses
its top edge, and the extension has somewhere to go.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sopkit.cli import app
from sopkit.data import dataset_spec, load_dataset
from sopkit.errors import UserError
from sopkit.experiment.plan import ComparePlan, build_plan
from sopkit.experiment.protocol import STOP_INTERIOR, STOP_LIMIT, next_rate
from sopkit.experiment.results import edge_of
from sopkit.experiment.runner import run_plan
from sopkit.experiment.store import DATABASE_NAME, TrialStore
from sopkit.report import regenerate
from sopkit.report.tables import coverage_warnings
from sopkit.training.progress import NullProgress

SMALL = "0.00001,0.0001"  # both far too small for one epoch: the larger one wins


def plan_of(**overrides: Any) -> ComparePlan:
    settings: dict[str, Any] = dict(
        dataset="digits",
        models=("mlp-a1",),
        strategies=("baseline",),
        seeds=2,
        epochs=1,
        batch_size=64,
        device="cpu",
        save_models=False,
    )
    return build_plan(**{**settings, **overrides})


@pytest.fixture
def no_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sopkit.report.build.draw_figures", lambda groups: [])


def test_edge_of_needs_two_rates_and_an_end() -> None:
    assert edge_of(0.1, [0.1]) is None  # a single rate: nothing was searched
    assert edge_of(0.1, [0.1, 0.2, 0.3]) == "low"
    assert edge_of(0.3, [0.1, 0.2, 0.3]) == "high"
    assert edge_of(0.2, [0.1, 0.2, 0.3]) is None
    assert edge_of(None, [0.1, 0.2]) is None


def test_next_rate_continues_the_grid() -> None:
    paper = plan_of(lr_grid="paper:-1..1", optimizers=("adam", "sgd"))
    adam = [0.001 * 1.5**i for i in (-1, 0, 1)]  # the grid's rates
    assert paper.learning_rates("adam") == adam
    # The next exponent, computed as jobs() computes the grid's own rates (same key on a rerun).
    assert next_rate(paper, "adam", adam, "high") == 0.001 * 1.5**2
    assert next_rate(paper, "adam", adam, "low") == 0.001 * 1.5**-2
    sgd = [0.025 * 1.5**i for i in (-1, 0, 1)]
    assert next_rate(paper, "sgd", sgd, "high") == 0.025 * 1.5**2
    listed = plan_of(lr_grid="0.01,0.03,0.1")
    assert next_rate(listed, "adam", [0.01, 0.03, 0.1], "high") == pytest.approx(0.1 * 0.1 / 0.03)
    assert next_rate(listed, "adam", [0.01, 0.03, 0.1], "low") == pytest.approx(0.01 / 3)
    assert next_rate(listed, "adam", [1e-300, 1e300], "low") is None  # underflows to 0


@pytest.mark.slow  # 10 trainings and three reports
def test_edge_is_flagged_and_extension_adds_rates_until_the_limit(
    tmp_path: Path, no_figures: None
) -> None:
    grid_only = plan_of(lr_grid=SMALL)
    groups = run_plan(grid_only, tmp_path, NullProgress(), checkpoint_every=None)
    (result,) = groups[0].strategies
    assert (result.chosen_lr, result.edge) == (0.0001, "high")
    regenerate(tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "| 0.0001 † |" in markdown
    assert "chosen at the grid's top edge" in markdown and "--extend-grid" in markdown
    row = next(csv.DictReader((tmp_path / "summary.csv").open()))
    assert row["chosen_at_edge"] == "high"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["strategies"][0]["edge"] == "high"

    extended = plan_of(lr_grid=SMALL, extend_grid=2)
    # The same trials plus the extension's: the grid's four trials are kept, not retrained.
    with TrialStore(tmp_path / DATABASE_NAME) as store:
        before = {t.key: t.finished_at for t in store.trials()}
    groups = run_plan(extended, tmp_path, NullProgress(), checkpoint_every=None)
    (result,) = groups[0].strategies
    added = [r for r in result.rates_tried if r > 0.0001]
    assert added == pytest.approx([0.001, 0.01])  # the list's ratio (10), one step at a time
    assert result.chosen_lr == pytest.approx(0.01) and result.edge == "high"
    with TrialStore(tmp_path / DATABASE_NAME) as store:
        trials = store.trials()
        plan = store.read_plan()
    assert len(trials) == 8  # 4 rates x 2 seeds
    assert all(t.finished_at == before[t.key] for t in trials if t.key in before)
    assert plan is not None
    (extension,) = plan["extensions"]
    assert (extension["strategy"], extension["side"]) == ("baseline", "high")
    assert extension["stopped"] == STOP_LIMIT
    # Rerunning the same command resumes the stages too: nothing new is trained.
    run_plan(extended, tmp_path, NullProgress(), checkpoint_every=None)
    with TrialStore(tmp_path / DATABASE_NAME) as store:
        assert {t.key: t.finished_at for t in store.trials()} == {
            t.key: t.finished_at for t in trials
        }
    # Rates one strategy's extension added are not missing from another strategy...
    other = replace(result, strategy="mk", rates_tried=[0.00001, 0.0001], trials=4)
    assert coverage_warnings([replace(groups[0], strategies=[result, other])]) == []
    # ...but a rate inside the grid that one strategy lacks is.
    lacking = replace(result, strategy="mk", rates_tried=[0.00001, 0.01], trials=4)
    (warning,) = coverage_warnings([replace(groups[0], strategies=[result, lacking])])
    assert warning.startswith("mk on digits / mlp-a1 / adam: 4 of 8 trials")
    regenerate(tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "grid extended up by 0.001, 0.01; stopped: the limit of --extend-grid" in markdown
    html = (tmp_path / "report.html").read_text()
    assert "grid extended up by 0.001, 0.01" in html and "0.01 †" in html

    # One more step allowed: 0.1 trains worse than 0.01 (86.8% against 94.4% validation), so the
    # choice is interior and the extension says so, also when a rerun finds everything stored.
    for _ in range(2):
        groups = run_plan(
            plan_of(lr_grid=SMALL, extend_grid=3), tmp_path, NullProgress(), checkpoint_every=None
        )
        (result,) = groups[0].strategies
        assert result.chosen_lr == pytest.approx(0.01) and result.edge is None
        with TrialStore(tmp_path / DATABASE_NAME) as store:
            plan = store.read_plan()
        assert plan is not None
        (extension,) = plan["extensions"]
        assert extension["added"] == pytest.approx([0.001, 0.01, 0.1])
        assert extension["stopped"] == STOP_INTERIOR


def test_confirmation_seeds_report_fresh_seeds(tmp_path: Path, no_figures: None) -> None:
    plan = plan_of(
        lr_grid="0.001,0.01", strategies=("baseline", "mk"), expansion=2, confirm_seeds=2
    )
    assert plan.confirmation_seeds == (2, 3)
    groups = run_plan(plan, tmp_path, NullProgress(), checkpoint_every=None)
    with TrialStore(tmp_path / DATABASE_NAME) as store:
        trials = store.trials()
    assert len(trials) == 2 * 2 * 2 + 2 * 2  # the search, then 2 seeds x 2 strategies
    for result in groups[0].strategies:
        assert result.search_seeds == [0, 1] and result.seeds == [2, 3] and result.confirmed
        at_chosen = {
            t.spec.seed: t.test_accuracy
            for t in trials
            if t.spec.strategy == result.strategy and t.spec.lr == result.chosen_lr
        }
        assert result.test_accuracies == [at_chosen[2], at_chosen[3]]  # not seeds 0 and 1
        assert result.trials == 4  # the search's
    mk = groups[0].strategies[1]
    assert mk.paired is not None and mk.paired.pairs == 2  # on the confirmation seeds
    regenerate(tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "Rates chosen on validation over seeds 0–1" in markdown
    assert "confirmation seeds 2–3" in markdown
    assert "Incomplete" not in markdown and "Some strategies lack trials" not in markdown
    row = next(csv.DictReader((tmp_path / "summary.csv").open()))
    assert (row["seeds"], row["search_seeds"]) == ("2;3", "0;1")


def test_protocol_options_are_checked_and_on_the_cli() -> None:
    with pytest.raises(UserError, match="--extend-grid"):
        plan_of(extend_grid=-1)
    with pytest.raises(UserError, match="--confirm-seeds"):
        plan_of(confirm_seeds=math.inf)
    with pytest.raises(UserError, match="--lr-grid"):
        plan_of(extend_grid=2)  # nothing to extend
    assert build_plan().extend_grid == 0 and build_plan().confirm_seeds == 0
    result = CliRunner().invoke(app, ["compare", "--help"])
    assert "--extend-grid" in result.output and "--confirm-seeds" in result.output
    result = CliRunner().invoke(app, ["compare", "--dataset", "digits", "--confirm-seeds", "-2"])
    assert result.exit_code == 2 and "--confirm-seeds" in result.output


def test_mnist1d_sample_count_is_a_parameter_of_its_name(tmp_path: Path) -> None:
    published = load_dataset("mnist1d")  # the shared cache: generated once per machine
    more = load_dataset("mnist1d:samples=1000", cache_dir=tmp_path)
    # 80% for training (10% of it validation), 20% test, as the published 5,000 are split.
    assert len(published.train) + len(published.val) == 4000 and len(published.test) == 1000
    assert len(more.train) + len(more.val) == 800 and len(more.test) == 200
    load_dataset("mnist1d:samples=500", cache_dir=tmp_path)
    assert len(list(tmp_path.rglob("mnist1d-*.npz"))) == 2  # the count is in the cache key
    assert dataset_spec("mnist1d:samples=20000").name == "mnist1d"
    for bad in (
        "mnist1d:seed=3",
        "digits:samples=9",
        "mnist1d:samples=",
        "mnist1d:samples=1,samples=2",
    ):
        with pytest.raises(UserError):
            dataset_spec(bad)
    for bad in ("mnist1d:samples=abc", "mnist1d:samples=10000000", "mnist1d:samples=-5"):
        with pytest.raises(UserError, match="samples"):
            load_dataset(bad, cache_dir=tmp_path)
    # The name is in the trial key: the default keeps its keys, a count makes other trials.
    keys = {
        plan_of(dataset=name).jobs()[0].specs[0].key
        for name in ("mnist1d", "mnist1d", "mnist1d:samples=1000")
    }
    assert len(keys) == 2
