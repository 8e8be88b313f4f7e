"""Third-party strategies plug in through the ``sopkit.strategies`` entry-point group, exactly as
sopkit's own and sopkit-baselines' do.

The plugins here are real distributions as far as ``importlib.metadata`` is concerned: a package and
a ``*.dist-info`` directory (METADATA and entry_points.txt) written into a temporary directory that
is put on ``sys.path`` (or ``PYTHONPATH`` for a fresh interpreter). One of them works; the other
fails to import, as a plugin with a missing dependency does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sopkit.cli import USER_ERROR_EXIT, app
from sopkit.errors import UserError
from sopkit.registry import DISABLE_AUTOLOAD_ENV, create_strategy, discover
from sopkit.strategy import StrategySettings

WIDE = {"COLUMNS": "400"}  # rich tables must not truncate the names the tests look for

GOOD_PLUGIN = '''
"""A third-party strategy: cross-entropy with label smoothing."""
import torch.nn.functional as F

from sopkit.strategy import Strategy


class LabelSmoothing(Strategy):
    description = "Plugin test strategy: label smoothing."

    def __init__(self, settings=None):
        super().__init__(settings)
        self.smoothing = self.settings.get("smoothing", 0.1)

    def loss(self, model, inputs, targets, run):
        return F.cross_entropy(model(inputs), targets, label_smoothing=self.smoothing)
'''

BROKEN_PLUGIN = '''
"""A plugin whose dependency is not installed."""
import sopkit_dependency_that_is_not_installed  # noqa: F401
'''


def _write_distribution(root: Path, name: str, package: str, source: str, entry: str) -> None:
    """A minimal installed distribution: the package and its dist-info with one entry point."""
    (root / package).mkdir()
    (root / package / "__init__.py").write_text(textwrap.dedent(source))
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[sopkit.strategies]\n{entry}\n")


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    _write_distribution(root, "sopkit-smoothing", "sopkit_smoothing", GOOD_PLUGIN,
                        "smoothed = sopkit_smoothing:LabelSmoothing")
    _write_distribution(root, "sopkit-broken", "sopkit_broken", BROKEN_PLUGIN,
                        "broken = sopkit_broken:Anything")
    return root


@pytest.fixture
def installed(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The plugins, visible to this process's entry-point discovery."""
    monkeypatch.syspath_prepend(str(plugin_dir))
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    return plugin_dir


def _invoke(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, list(args), env={**WIDE, **(env or {})})


def test_a_plugin_is_discovered_with_its_distribution(installed: Path) -> None:
    entries = discover()
    assert entries["smoothed"].distribution == "sopkit-smoothing"
    assert entries["smoothed"].load().__name__ == "LabelSmoothing"
    # sopkit's own come first; plugins, sopkit-baselines included, after them.
    names = list(entries)
    assert names.index("baseline") < names.index("smoothed")
    assert entries["ensemble"].distribution == "sopkit-baselines"


def test_sopkit_strategies_lists_the_plugin_and_names_the_broken_one(installed: Path) -> None:
    result = _invoke("strategies")
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines()
             if line.count("│") > 2}
    assert "sopkit-smoothing 0.1" in lines["smoothed"] and "yes" in lines["smoothed"]
    assert "sopkit-broken" in lines["broken"] and "no" in lines["broken"]
    assert "ModuleNotFoundError" in result.output  # why (the table may cut the module's name)
    for name in ("baseline", "mk", "adv-mk", "ensemble", "distill", "subset"):
        assert "yes" in lines[name], f"the broken plugin broke {name}"


def test_compare_runs_the_plugin_next_to_the_baseline(installed: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _invoke("compare", "--strategies", "baseline,smoothed", "--epochs", "1", "--seeds",
                     "1", "--dataset", "digits", "--model", "mlp-a1", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "smoothed" in result.output and "baseline" in result.output


def test_requesting_a_broken_plugin_names_it_and_exits_2(installed: Path, tmp_path: Path) -> None:
    result = _invoke("compare", "--strategies", "baseline,broken", "--epochs", "1", "--seeds", "1",
                     "--dataset", "digits", "--model", "mlp-a1", "--out", str(tmp_path / "out"))
    assert result.exit_code == USER_ERROR_EXIT
    assert "broken" in result.output and "sopkit-broken" in result.output
    assert isinstance(result.exception, SystemExit)  # an exit with a message, not a crash
    with pytest.raises(UserError, match=r"'broken' from plugin sopkit-broken 0\.1"):
        create_strategy("broken", StrategySettings())
    # ... and every other strategy still loads.
    smoothed = create_strategy("smoothed", StrategySettings(options={"smoothing": "0.2"}))
    assert smoothed.smoothing == 0.2  # type: ignore[attr-defined]


def test_disabling_autoload_hides_every_plugin(installed: Path) -> None:
    result = _invoke("strategies", env={DISABLE_AUTOLOAD_ENV: "1"})
    assert result.exit_code == 0, result.output
    assert "baseline" in result.output and "adv-mk" in result.output
    for plugin in ("smoothed", "broken", "ensemble"):
        assert plugin not in result.output


def test_a_fresh_interpreter_finds_the_plugin_on_pythonpath(plugin_dir: Path) -> None:
    environment = {**os.environ, **WIDE,
                   "PYTHONPATH": os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")])}
    environment.pop(DISABLE_AUTOLOAD_ENV, None)
    completed = subprocess.run(
        [sys.executable, "-c", "from sopkit.cli import main; main()", "strategies"],
        env=environment, capture_output=True, text=True, timeout=120, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "smoothed" in completed.stdout and "sopkit-smoothing" in completed.stdout


def test_a_plugin_written_against_the_first_round_api_still_trains() -> None:
    """Hooks with their first-round names and signatures, a ``fit`` that wraps ``session.train`` and
    adds to the result, and the first-round import paths (``sopkit.strategy``, ``sopkit.train``)."""
    import torch
    import torch.nn.functional as F

    from sopkit.data.splits import DataSplits, TensorSplit
    from sopkit.models import mlp
    from sopkit.strategy import Strategy
    from sopkit.train import RunContext, TrainConfig, TrainingSession, TrainResult

    class Smoothed(Strategy):
        def __init__(self, settings: StrategySettings | None = None) -> None:
            super().__init__(settings)
            self.smoothing = self.settings.get("smoothing", 0.1)

        def loss(self, model, inputs, targets, run: RunContext):  # type: ignore[no-untyped-def]
            assert run.step < run.total_steps
            return F.cross_entropy(model(inputs), targets, label_smoothing=self.smoothing)

        def fit(self, session: TrainingSession) -> TrainResult:  # type: ignore[override]
            result = session.train(self)
            result.extra["wrapped"] = True
            return result

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=generator)
    split = TensorSplit(x, (x[:, 0] > 0).long())
    session = TrainingSession(
        DataSplits("tiny", (5,), 2, split, split, split), lambda: mlp((5,), 2, hidden=(8,)),
        TrainConfig(epochs=1, batch_size=16), device=torch.device("cpu"),
    )
    result = Smoothed(StrategySettings(options={"smoothing": "0.2"})).fit(session)
    assert result.extra == {"wrapped": True}
    assert [record.step for record in result.curve] == [4]
    # The default label smoothing of 0.1 trains differently: the option reached the loss.
    plain = Smoothed().fit(session)
    assert plain.curve[0].train_loss != result.curve[0].train_loss
