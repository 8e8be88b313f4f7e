"""Plugins that misbehave in every way a plugin can: fail at import (ImportError, SyntaxError,
``sys.exit``, any exception), break their ``description``, raise in ``__init__`` or in any hook, or
return the wrong type from one.

None of them may break ``sopkit strategies``, a comparison that does not use them, or ``sopkit
bench`` of the other strategies; using one gets a message naming the plugin, its distribution and
the hook (a :class:`~sopkit.training.hooks_guard.PluginError`, a ``UserError``). The plugins are
real distributions on ``sys.path`` (package + ``*.dist-info`` with entry points), as in
``test_plugins``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sopkit.cli import USER_ERROR_EXIT, app
from sopkit.data.splits import DataSplits, TensorSplit
from sopkit.errors import UserError
from sopkit.models import mlp
from sopkit.registry import DISABLE_AUTOLOAD_ENV, create_strategy, discover
from sopkit.training.config import TrainConfig
from sopkit.training.hooks_guard import PluginError, call_hook
from sopkit.training.loop import TrainingSession
from sopkit.training.settings import StrategySettings

DIST = "sopkit-redteam"

HOOKS_MODULE = '''
import sys
import torch
import torch.nn.functional as F
from sopkit.strategy import Strategy


class Boom(RuntimeError):
    pass


def _raise(hook):
    raise Boom(f"boom in {hook}")


class Raising(Strategy):
    """Raises in the hook named by the class attribute ``where``."""
    where = ""

    def schedule(self, config):
        return _raise("schedule") if self.where == "schedule" else super().schedule(config)

    def requires(self, seed):
        return _raise("requires") if self.where == "requires" else {}

    def prepare(self, model, run):
        return _raise("prepare") if self.where == "prepare" else model

    def before_step(self, model, run):
        if self.where == "before_step":
            _raise("before_step")

    def loss(self, model, inputs, targets, run):
        if self.where == "loss":
            _raise("loss")
        return F.cross_entropy(model(inputs), targets)

    def after_backward(self, model, run):
        if self.where == "after_backward":
            _raise("after_backward")

    def after_step(self, model, run):
        if self.where == "after_step":
            _raise("after_step")

    def evaluation_model(self, model, run):
        return _raise("evaluation_model") if self.where == "evaluation_model" else model

    def deployable(self, model, run):
        return _raise("deployable") if self.where == "deployable" else model

    def fit(self, session):
        return _raise("fit") if self.where == "fit" else session.train(self)

    def identity(self):
        return _raise("identity") if self.where == "identity" else super().identity()


def _raising(hook):
    return type(f"Raises_{hook}", (Raising,), {"where": hook, "description": f"raises in {hook}"})


for _hook in ("schedule", "requires", "prepare", "before_step", "loss", "after_backward",
              "after_step", "evaluation_model", "deployable", "fit", "identity"):
    globals()[f"Raises_{_hook}"] = _raising(_hook)


class LateFailure(Strategy):
    """Trains its first steps, then fails: after the bench's warm-up, in its timing rounds."""

    def loss(self, model, inputs, targets, run):
        if run.step >= 4:
            raise Boom("late")
        return F.cross_entropy(model(inputs), targets)


class PrepareNone(Strategy):
    def prepare(self, model, run):
        return None


class LossString(Strategy):
    def loss(self, model, inputs, targets, run):
        return "a loss"


class LossVector(Strategy):
    def loss(self, model, inputs, targets, run):
        return F.cross_entropy(model(inputs), targets, reduction="none")


class LossOne(Strategy):
    def loss(self, model, inputs, targets, run):
        return F.cross_entropy(model(inputs), targets).reshape(1)


class LossDetached(Strategy):
    def loss(self, model, inputs, targets, run):
        return torch.tensor(1.0)


class EvaluationNumber(Strategy):
    def evaluation_model(self, model, run):
        return 3


class DeployableList(Strategy):
    def deployable(self, model, run):
        return [model]


class RequiresList(Strategy):
    def requires(self, seed):
        return [seed]


class ScheduleDict(Strategy):
    def schedule(self, config):
        return {"epochs": 1}


class IdentityList(Strategy):
    def identity(self):
        return ["not", "hashable"]


class FitNone(Strategy):
    def fit(self, session):
        session.train(self)


class InitRaises(Strategy):
    def __init__(self, settings=None):
        super().__init__(settings)
        raise KeyError("no such thing")


class InitExits(Strategy):
    def __init__(self, settings=None):
        sys.exit(4)


class _RaisingDescription(type):
    @property
    def description(cls):
        raise RuntimeError("description is broken")


class DescriptionRaises(Strategy, metaclass=_RaisingDescription):
    pass


class DescriptionNumber(Strategy):
    description = 42


class DescriptionMarkup(Strategy):
    description = "closing [/oops] tag and [bold]"


NOT_A_CLASS = 3
'''

HOOKS = ("schedule", "requires", "prepare", "before_step", "loss", "after_backward", "after_step",
         "evaluation_model", "deployable", "fit", "identity")
WRONG_TYPES = {  # entry-point name: (class, hook, words the message has)
    "prepare-none": ("PrepareNone", "prepare", "NoneType"),
    "loss-string": ("LossString", "loss", "scalar tensor"),
    "loss-vector": ("LossVector", "loss", "shape (16,)"),
    "loss-one": ("LossOne", "loss", "shape (1,)"),
    "loss-detached": ("LossDetached", "loss", "does not require grad"),
    "evaluation-number": ("EvaluationNumber", "evaluation_model", "torch.nn.Module"),
    "deployable-list": ("DeployableList", "deployable", "torch.nn.Module"),
    "requires-list": ("RequiresList", "requires", "mapping"),
    "schedule-dict": ("ScheduleDict", "schedule", "TrainConfig"),
    "fit-none": ("FitNone", "fit", "TrainResult"),
    "identity-list": ("IdentityList", "identity", "hashable"),
}
BROKEN_IMPORTS = {  # module name: its source; registered as the name with dashes
    "rt_import_error": "import sopkit_module_that_is_not_installed\n",
    "rt_syntax_error": "def broken(:\n",
    "rt_exits": "import sys\nsys.exit(3)\n",
    "rt_raises": "raise RuntimeError('plugin import failed')\n",
}


def _install(root: Path) -> None:
    """One distribution (``sopkit-redteam``) registering every misbehaving strategy."""
    lines = []
    (root / "rt_hooks").mkdir()
    (root / "rt_hooks" / "__init__.py").write_text(textwrap.dedent(HOOKS_MODULE))
    for hook in HOOKS:
        lines.append(f"raises-{hook.replace('_', '-')} = rt_hooks:Raises_{hook}")
    for name, (cls, _, _) in WRONG_TYPES.items():
        lines.append(f"{name} = rt_hooks:{cls}")
    for name in ("InitRaises", "InitExits", "DescriptionRaises", "DescriptionNumber",
                 "DescriptionMarkup"):
        lines.append(f"{name.lower()} = rt_hooks:{name}")
    lines.append("not-a-class = rt_hooks:NOT_A_CLASS")
    lines.append("late-failure = rt_hooks:LateFailure")
    for module, source in BROKEN_IMPORTS.items():
        (root / f"{module}.py").write_text(source)
        lines.append(f"{module.replace('_', '-')} = {module}:Anything")
    info = root / "sopkit_redteam-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sopkit.strategies]\n" + "\n".join(lines) + "\n")


@pytest.fixture
def redteam(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    _install(root)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    return root


def _invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "400"})


def _session() -> TrainingSession:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=generator)
    split = TensorSplit(x, (x[:, 0] > 0).long())
    return TrainingSession(
        DataSplits("tiny", (5,), 2, split, split, split), lambda: mlp((5,), 2, hidden=(8,)),
        TrainConfig(epochs=1, batch_size=16), device=torch.device("cpu"),
    )


def _fails_naming(name: str, hook: str) -> PluginError:
    with pytest.raises(PluginError) as caught:
        # As the runner calls it: call_hook(strategy, "fit", session).
        call_hook(create_strategy(name, StrategySettings()), "fit", _session())
    error = caught.value
    assert (error.strategy, error.distribution, error.hook) == (name, DIST, hook)
    assert f"{DIST} 0.1" in str(error) and f"{hook}()" in str(error) and repr(name) in str(error)
    return error


@pytest.mark.parametrize("hook", HOOKS)
def test_a_hook_that_raises_is_named_with_its_plugin_and_distribution(redteam, hook):
    error = _fails_naming(f"raises-{hook.replace('_', '-')}", hook)
    assert f"Boom: boom in {hook}" in str(error)
    assert type(error.__cause__).__name__ == "Boom"  # the plugin's own error, for its author


@pytest.mark.parametrize("name", sorted(WRONG_TYPES))
def test_a_hook_returning_the_wrong_type_is_named(redteam, name):
    _, hook, words = WRONG_TYPES[name]
    assert words in str(_fails_naming(name, hook))


def test_a_plugin_failing_in_init_is_named_and_does_not_break_other_strategies(redteam):
    for name, kind in (("initraises", "KeyError"), ("initexits", "SystemExit")):
        with pytest.raises(PluginError, match=rf"{name}.*{DIST} 0\.1.*__init__: {kind}"):
            create_strategy(name, StrategySettings())
    # A bare option constructs every strategy to learn which reads it: the broken ones are skipped.
    from sopkit.registry import check_options

    check_options(StrategySettings(options={"init": "replicate"}), ["baseline", "mk"])


@pytest.mark.parametrize("module", sorted(BROKEN_IMPORTS))
def test_a_plugin_failing_at_import_is_named(redteam, module):
    name = module.replace("_", "-")
    with pytest.raises(UserError, match=rf"{name!r} from plugin {DIST} 0\.1 .*failed to load"):
        create_strategy(name, StrategySettings())


def test_sopkit_strategies_lists_every_plugin_however_broken(redteam):
    result = _invoke("strategies")
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines()
            if line.count("│") > 2}
    for name in ("baseline", "mk", "adv-mk", "raises-loss", "loss-vector", "initraises"):
        assert "yes" in rows[name], name  # a class that imports loads; it fails when used
    for name, why in (("rt-exits", "SystemExit"), ("rt-syntax-error", "SyntaxError"),
                      ("rt-raises", "RuntimeError"), ("rt-import-error", "ModuleNotFoundError"),
                      ("not-a-class", "not a subclass")):
        assert "no" in rows[name], name
        assert why in (discover()[name].load_error() or ""), name  # the table folds long text
    assert "description raised RuntimeError" in rows["descriptionraises"]
    assert "description is a int" in rows["descriptionnumber"]
    assert "closing [/oops] tag and [bold]" in result.output  # text, not rich markup


@pytest.mark.slow
def test_a_comparison_without_the_plugins_runs_and_one_using_it_names_it(redteam, tmp_path):
    common = ["--dataset", "digits", "--model", "mlp-a1", "--epochs", "1", "--seeds", "1"]
    result = _invoke("compare", *common, "--set", "init=replicate", "--strategies", "baseline,mk",
                     "--out", str(tmp_path / "ok"))
    assert result.exit_code == 0, result.output
    result = _invoke("compare", *common, "--strategies", "initraises",
                     "--out", str(tmp_path / "init"))
    assert result.exit_code == USER_ERROR_EXIT
    assert "initraises" in result.output and DIST in result.output
    assert "__init__" in result.output and "Traceback" not in result.output
    result = _invoke("compare", *common, "--strategies", "schedule-dict",
                     "--out", str(tmp_path / "schedule"))  # found by the check, before training
    assert result.exit_code == USER_ERROR_EXIT
    assert "schedule-dict" in result.output and DIST in result.output
    assert "schedule()" in result.output


@pytest.mark.slow
def test_bench_of_every_strategy_times_the_others_and_names_the_broken_plugins(redteam):
    result = _invoke("bench", "--model", "mlp-a1", "--input-shape", "8", "--num-classes", "3",
                     "--batch-size", "4", "--repeats", "2", "--steps", "3", "--warmup", "1")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    for name in ("raises-loss", "loss-vector", "late-failure", "initraises"):
        # set-up, warm-up, timing rounds, __init__: each a row saying why, naming the plugin
        assert "not timed" in rows[name] and DIST in rows[name], name
    assert "not timed" not in rows["mk"] and "x [" in rows["mk"]  # the others are timed
    asked = _invoke("bench", "--model", "mlp-a1", "--input-shape", "8", "--num-classes", "3",
                    "--batch-size", "4", "--repeats", "1", "--steps", "1", "--warmup", "1",
                    "--strategies", "raises-loss")
    assert asked.exit_code == USER_ERROR_EXIT, asked.output
    assert DIST in asked.output and "loss()" in asked.output


def test_sopkit_own_strategies_keep_their_errors(redteam):
    """A failure inside one of sopkit's own strategies is a bug there, not a plugin's: it keeps its
    type and traceback."""
    from sopkit.strategies.baseline import Baseline

    class Failing(Baseline):  # not registered: not a plugin
        def loss(self, model, inputs, targets, run):  # type: ignore[no-untyped-def]
            raise ArithmeticError("mine")

    with pytest.raises(ArithmeticError, match="mine"):
        Failing(StrategySettings()).fit(_session())
    assert discover()["baseline"].distribution == "sopkit"
