"""Every mistake gets a message: the red-team pass of issue 11, as tables of bad invocations of the
real CLI, each of which must exit with status 2 and a clear message naming what was wrong, never a
traceback.

Classes: numbers at the edges of their types (huge, negative, nan, inf, 1e309) in every numeric
option of ``compare`` and ``bench``, every grid and ``--set`` value; presets with wrong types in any
field; devices torch knows but sopkit cannot train on; a user's model factory that does not fit the
data; ``bench --out`` that cannot be written; untrusted presets (a name that reads as a path, models
that are code). Values at the edge that pass validation are trained, stored and reported (slow).
Plugins that misbehave are in ``test_plugin_failures``.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sopkit.cli import USER_ERROR_EXIT, app
from sopkit.errors import UserError
from sopkit.experiment.plan import build_plan, default_out_dir
from sopkit.experiment.presets import check_preset_name, safe_dir_name
from sopkit.models.checks import NO_CODE_MODELS_ENV

I63 = str(2**63 - 1)  # the largest value SQLite and torch hold
I64 = str(2**64)
HUGE = "1" + "0" * 400  # an integer no float holds

COMPARE = ["compare", "--dataset", "digits", "--model", "mlp-a1", "--epochs", "1", "--seeds", "1",
           "--strategies", "baseline"]
BENCH = ["bench", "--model", "mlp-a1", "--input-shape", "8", "--num-classes", "3", "--batch-size",
         "4", "--repeats", "1", "--steps", "1", "--warmup", "0", "--strategies", "baseline"]


def _with(base: list[str], *pairs: str) -> list[str]:
    """``base`` with each ``--flag value`` of ``pairs`` replacing the flag's value (or added)."""
    args = list(base)
    for flag, value in zip(pairs[::2], pairs[1::2], strict=True):
        if flag in args and flag != "--set":
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


def _refused(args: list[str], *words: str, env: dict[str, str] | None = None) -> str:
    """Run the CLI; assert exit status 2, a message with ``words`` and no traceback."""
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400", **(env or {})})
    assert result.exit_code == USER_ERROR_EXIT, (args, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())  # rich wraps long messages
    for word in words:
        assert word in text, (word, text)
    return text


# ---- numbers at the edges of their types ----------------------------------------------------

COMPARE_NUMBERS = [
    # (flag, value, words of the message)
    ("--seeds", I63, "--seeds must be a positive integer at most 100000"),
    ("--seeds", "-1", "--seeds"),
    ("--seeds", "nan", "Invalid value"),  # typer's own message: not an integer
    ("--first-seed", I64, "--first-seed must be at least 0"),
    ("--first-seed", HUGE, "--first-seed"),
    ("--epochs", I63, "--epochs must be a positive integer at most 1000000"),
    ("--epochs", HUGE, "--epochs"),
    ("--epochs", "inf", "Invalid value"),
    ("--batch-size", I64, "--batch-size"),
    ("--batch-size", "0", "--batch-size must be a positive integer"),
    ("--warmup-epochs", I64, "--warmup-epochs"),
    ("--expansion", I63, "--expansion must be at least 2 (an integer, at most 1024)"),
    ("--jobs", I63, "--jobs must be a positive integer at most 1024"),
    ("--threads", I63, "--threads must be a positive integer at most 1024"),
    ("--data-workers", I64, "--data-workers"),
    ("--lr", "nan", "--lr must be a positive number"),
    ("--lr", "inf", "--lr"),
    ("--lr", "-inf", "--lr"),
    ("--lr", "1e309", "--lr"),
    ("--lr", "0", "--lr"),
    ("--weight-decay", "nan", "--weight-decay"),
    ("--weight-decay", "1e309", "--weight-decay"),
    ("--lr-decay", "nan", "--lr-decay"),
    ("--lr-decay", "-1", "--lr-decay"),
    ("--label-smoothing", "inf", "--label-smoothing"),
    ("--label-smoothing", "1", "--label-smoothing"),
    ("--milestones", I64, "--milestones"),
    ("--milestones", "nan", "--milestones"),
    ("--lr-grid", "paper:-2000..2000", "exponents must be within -100..100"),
    ("--lr-grid", "paper:0..99999999999999999999999", "exponents must be within"),
    ("--lr-grid", "0.01,1e309", "positive finite"),
    ("--lr-grid", "nan", "positive finite"),
    ("--lr-grid", "0.01,-inf", "positive finite"),
    ("--lr-grid", HUGE, "positive finite"),
]
SET_NUMBERS = [
    # (strategy, option=value, words): every numeric option of every strategy
    ("baseline", f"baseline.epochs={I63}", "baseline.epochs must be a positive integer at most"),
    ("baseline", f"baseline.epochs={I64}", "at most 64 bits"),
    ("baseline", "baseline.milestones=" + I64, "baseline.milestones"),
    ("mk", f"mk.epochs={HUGE}", "mk.epochs"),
    ("mk", "mk.epochs=nan", "mk.epochs"),
    ("mk", f"mk.milestones=1,{I63}", "mk.milestones"),
    ("baseline-long", "baseline-long.long_factor=1e300", "long_factor=1e+300 times --epochs 1"),
    ("baseline-long", "baseline-long.long_factor=nan", "finite"),
    ("baseline-long", "baseline-long.long_factor=1e309", "finite"),
    ("adv-mk", "adv-mk.eps=nan", "adv-mk.eps"),
    ("adv-mk", "adv-mk.eps=-inf", "adv-mk.eps"),
    ("adv-mk-only", "adv-mk-only.eps=1e309", "adv-mk-only.eps"),
    ("distill", "distill.temperature=1e308", "distill.temperature must be a positive number of at "
     "most 1e+06"),
    ("distill", "distill.alpha=nan", "distill.alpha"),
    ("distill", "distill.alpha=inf", "distill.alpha"),
    ("subset", f"subset.t={I64}", "subset.t", ),
    ("subset", "subset.alpha=inf", "subset.alpha"),
    ("subset", "subset.beta=nan", "subset.beta"),
    ("ensemble", f"ensemble.epochs={I63}", "ensemble strategy has no option 'epochs'"),
]
BENCH_NUMBERS = [
    ("--batch-size", I63, "synthetic data"),
    ("--batch-size", I64, "--batch-size"),
    ("--num-classes", I63, "--num-classes must be a positive integer at most 16777216"),
    ("--input-shape", I63, "synthetic data"),
    ("--input-shape", f"3,{I64}", "synthetic data"),
    ("--input-shape", HUGE, "about 10^401"),  # 4 batches of 4: 1.6e401
    ("--input-shape", "65536,65536,65536", "synthetic data"),
    ("--input-shape", "nan", "--input-shape"),
    ("--input-shape", "-1", "--input-shape"),
    ("--repeats", I63, "--repeats must be a positive integer at most 1000000"),
    ("--steps", HUGE, "--steps"),
    ("--warmup", I63, "--warmup"),
    ("--expansion", I63, "--expansion"),
    ("--threads", I63, "--threads"),
    ("--set", "adv-mk.eps=1e309", "adv-mk.eps"),
    ("--set", f"mk.epochs={I64}", "mk.epochs"),
]


@pytest.mark.parametrize(("flag", "value", "words"), COMPARE_NUMBERS,
                         ids=[f"{f}={v[:24]}" for f, v, _ in COMPARE_NUMBERS])
def test_compare_refuses_a_number_at_the_edge(flag, value, words, tmp_path):
    _refused(_with(COMPARE, flag, value, "--out", str(tmp_path / "out")), words)
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize(("strategy", "option", "words"), SET_NUMBERS,
                         ids=[o[:40] for _, o, _ in SET_NUMBERS])
def test_compare_refuses_a_strategy_option_at_the_edge(strategy, option, words, tmp_path):
    _refused(_with(COMPARE, "--strategies", strategy, "--set", option,
                   "--out", str(tmp_path / "out")), words)


@pytest.mark.parametrize(("flag", "value", "words"), BENCH_NUMBERS,
                         ids=[f"{f}={v[:24]}" for f, v, _ in BENCH_NUMBERS])
def test_bench_refuses_a_number_at_the_edge(flag, value, words):
    strategies = value.split(".")[0] if flag == "--set" else "baseline"
    _refused(_with(BENCH, flag, value, "--strategies", strategies), words)


def test_running_out_of_memory_while_setting_up_bench_is_a_message():
    # Sizes under the caps can still be too big for the machine: torch's allocator fails, and the
    # message says what was being allocated.
    from sopkit.bench.config import out_of_memory_is_user_error

    with (pytest.raises(UserError, match="Not enough memory for the thing"),
          out_of_memory_is_user_error("the thing")):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 1 bytes")
    # Other errors pass through.
    with pytest.raises(RuntimeError, match="something else"), out_of_memory_is_user_error("x"):
        raise RuntimeError("something else")


@pytest.mark.slow
def test_accepted_values_at_the_edges_train_store_and_report(tmp_path):
    """The largest seed and a near-overflow rate (which diverges) pass validation: they train, are
    stored, and both the comparison's reports and a later ``sopkit report`` of its database work
    (the report's grid description took log(1e308 / 0.001) = inf and failed)."""
    out = tmp_path / "edges"
    args = _with(COMPARE, "--first-seed", I63, "--lr", "1e308", "--out", str(out))
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 0, (result.output, result.exception)
    assert "diverged" in result.output.lower()
    again = CliRunner().invoke(app, ["report", str(out)], env={"COLUMNS": "400"})
    assert again.exit_code == 0, (again.output, again.exception)
    assert I63 in (out / "trials.jsonl").read_text()


# ---- presets with wrong types ---------------------------------------------------------------

BAD_PRESETS = [
    # (TOML text, words of the message: the field, what it must be)
    ('seeds = "3"', "seeds must be an integer"),
    ("seeds = 3.5", "seeds must be an integer"),
    ("seeds = true", "seeds must be an integer"),
    (f"seeds = {I63}", "--seeds must be a positive integer at most 100000"),
    ("epochs = [1]", "epochs must be an integer"),
    ("epochs = 0\nmilestones = [1]", "--epochs must be a positive integer"),
    ("lr = nan", "lr must be a finite number"),
    ("lr = inf", "lr must be a finite number"),
    ('lr = "0.1"', "lr must be a finite number"),
    ("weight_decay = nan", "weight_decay must be a finite number"),
    ("label_smoothing = -inf", "label_smoothing must be a finite number"),
    ("momentum = nan", "momentum must be a finite number"),
    ("momentum = 1e308", "momentum must be a number of at least 0 and at most 1"),
    ('models = "mlp-a1"', "models must be a list of strings"),
    ('models = [["mlp-a1"]]', "models must be a list of strings"),
    ("models = [1]", "models must be a list of strings"),
    ("[strategies]\na = 1", "strategies must be a list of strings"),
    ('[options]\nmk = { init = "replicate" }', "options.mk must be a string, a finite number"),
    ('[options]\n"mk.milestones" = ["a", "b"]', "options.mk.milestones must be"),
    ('[options]\n"adv-mk.eps" = nan', "options.adv-mk.eps must be"),
    ('[options]\n"mk.init" = 1979-05-27', "options.mk.init must be"),
    ('options = "mk.init=replicate"', "options must be a table"),
    (f'[options]\n"mk.epochs" = {I63}', "mk.epochs must be a positive integer at most 1000000"),
    ("milestones = [1.5]", "milestones must be a list of integers"),
    ("milestones = [[1]]", "milestones must be a list of integers"),
    ("lr_grid = 3", "lr_grid must be a string"),
    ('lr_grid = [0.01, "x"]', "lr_grid must be a string"),
    ('lr_grid = "nan"', "positive finite"),
    ("augment = true", "augment must be a string"),
    ("name = 3", "name must be a string"),
    ("dataset = 3", "dataset must be a string"),
    ("expansion = 3.0", "expansion must be an integer"),
    (f"expansion = {I63}", "--expansion must be at least 2"),
    ('warmup_epochs = "1"', "warmup_epochs must be an integer"),
    ('description = ["x"]', "description must be a string"),
    ("bogus = 1", "unknown keys bogus"),
    ("seeds = ", "is not valid TOML"),
]


@pytest.mark.parametrize(("text", "words"), BAD_PRESETS, ids=[t[:30] for t, _ in BAD_PRESETS])
def test_a_preset_with_a_wrong_type_is_refused_naming_the_field(text, words, tmp_path):
    preset = tmp_path / "bad.toml"
    preset.write_text(text + "\n")
    args = ["compare", "--preset", str(preset), "--dataset", "digits", "--model", "mlp-a1",
            "--strategies", "baseline", "--out", str(tmp_path / "out")]
    for flag, key, value in (("--epochs", "epochs", "1"), ("--seeds", "seeds", "1")):
        if key not in text:  # what the command line gives is not the preset's to get wrong
            args += [flag, value]
    _refused(args, words)


def test_a_preset_that_is_not_utf8_is_refused(tmp_path):
    preset = tmp_path / "binary.toml"
    preset.write_bytes(b"\xff\xfe\x00seeds = 1")
    _refused(["compare", "--preset", str(preset)], "is not valid TOML")


def test_a_preset_with_a_list_of_rates_plans_that_grid(tmp_path):
    preset = tmp_path / "grid.toml"
    preset.write_text("lr_grid = [0.01, 0.003]\n")
    plan = build_plan(preset=str(preset))
    assert plan.learning_rates("adam") == [0.01, 0.003]


# ---- untrusted presets: names that read as paths, models that are code -------------------------

@pytest.mark.parametrize("name", ["../../escaped", "/tmp/escaped", "..", ".hidden", "a\x00b",
                                  "x" * 300, "a\\b", "line\nbreak", ""])
def test_a_preset_name_that_reads_as_a_path_is_refused(name, tmp_path):
    preset = tmp_path / "untrusted.toml"
    preset.write_text(f"name = {json.dumps(name)}\n")  # a TOML basic string, escapes and all
    with pytest.raises(UserError, match="cannot name the output directory"):
        build_plan(preset=str(preset))
    with pytest.raises(UserError):
        check_preset_name("p", name)


@pytest.mark.parametrize("name", ["../../x", "/etc/passwd", "..", "a\x00b", "é" * 200, "c:\\x",
                                  "my preset", ""])
def test_the_default_output_directory_stays_inside_runs(name):
    path = default_out_dir(build_plan()).parent / safe_dir_name(name)
    assert path.parent == Path("runs") and len(path.name.encode()) <= 100
    assert path.name not in ("", ".", "..") and "\x00" not in path.name
    assert (Path("/base") / path).resolve().parent == Path("/base/runs")
    # Names of the allowed characters are kept, so a comparison resumes into the same directory.
    for kept in ("paper-table1", "mnist1d-mlp-a2", "digits-mlp-a1+mlp-a2", "pkg.mod_make"):
        assert safe_dir_name(kept) == kept


def test_a_preset_file_name_becomes_a_safe_directory(tmp_path):
    preset = tmp_path / "their preset (v2).toml"
    preset.write_text("seeds = 1\n")
    assert default_out_dir(build_plan(preset=str(preset))) == Path("runs/their_preset__v2_")


FACTORIES = '''
import sys
from torch import nn


def fits(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], num_classes))


def wrong_shape(input_shape, num_classes):
    return nn.Linear(784, num_classes)


def wrong_classes(input_shape, num_classes):
    return nn.Linear(input_shape[0], 3)


def no_params(input_shape, num_classes):
    return nn.Flatten()


def frozen(input_shape, num_classes):
    return nn.Linear(input_shape[0], num_classes).requires_grad_(False)


def raises(input_shape, num_classes):
    raise RuntimeError("factory exploded")


def exits(input_shape, num_classes):
    sys.exit(5)


def returns_int(input_shape, num_classes):
    return 3


class Pair(nn.Module):
    def __init__(self, n, c):
        super().__init__()
        self.fc = nn.Linear(n, c)

    def forward(self, x):
        return self.fc(x), None


def returns_tuple(input_shape, num_classes):
    return Pair(input_shape[0], num_classes)


not_callable = 3
'''


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "rt_factories.py").write_text(textwrap.dedent(FACTORIES))
    (tmp_path / "rt_import_raises.py").write_text("raise RuntimeError('import exploded')\n")
    (tmp_path / "rt_import_exits.py").write_text("import sys\nsys.exit(2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(NO_CODE_MODELS_ENV, raising=False)
    return tmp_path


MODELS = [
    # (model, words of the message): digits are (64,) inputs in 10 classes
    ("rt_factories:wrong_shape", "does not fit the data", "(64,)", "10 classes", "784"),
    ("rt_factories:wrong_classes", "does not fit the data", "shape (2, 3)", "(2, 10)"),
    ("rt_factories:no_params", "has no trainable parameters", "(64,)"),
    ("rt_factories:frozen", "has no trainable parameters"),
    ("rt_factories:raises", "rt_factories:raises(input_shape=(64,), num_classes=10) raised "
     "RuntimeError: factory exploded", "rt_factories.py:"),
    ("rt_factories:exits", "raised SystemExit: 5"),
    ("rt_factories:returns_int", "returned an object of type 'int'"),
    ("rt_factories:returns_tuple", "returns a tuple", "(2, 10)"),
    ("rt_factories:not_callable", "not a callable"),
    ("rt_import_raises:make", "Importing module 'rt_import_raises'", "import exploded"),
    ("rt_import_exits:make", "Importing module 'rt_import_exits'", "SystemExit"),
]


@pytest.mark.parametrize(("model", "words"), [(m, w) for m, *w in MODELS],
                         ids=[m for m, *_ in MODELS])
def test_a_model_factory_that_does_not_fit_is_named_before_training(factories, model, words):
    text = _refused(_with(COMPARE, "--model", model, "--out", str(factories / "out")), *words)
    assert model.split(":")[0] in text


def test_bench_checks_a_model_factory_before_measuring(factories):
    _refused(_with(BENCH, "--model", "rt_factories:wrong_shape", "--input-shape", "64"),
             "does not fit the data", "(64,)", "3 classes")


def test_code_models_can_be_refused(factories, tmp_path):
    base = _with(COMPARE, "--model", "rt_factories:fits", "--out", str(tmp_path / "out"))
    _refused([*base, "--no-code-models"], "'rt_factories:fits' is code", "--no-code-models")
    _refused(base, "is code", env={NO_CODE_MODELS_ENV: "1"})
    preset = tmp_path / "theirs.toml"
    preset.write_text('name = "theirs"\nmodels = ["rt_factories:fits"]\n')
    _refused(["compare", "--preset", str(preset), "--no-code-models"],
             "from preset 'theirs'", "is code")
    _refused(_with(BENCH, "--model", "rt_factories:fits", "--input-shape", "64"), "is code",
             env={NO_CODE_MODELS_ENV: "1"})


# ---- devices that exist in torch but cannot train ------------------------------------------------

DEVICES = [
    ("meta", "cannot train on 'meta' devices"),
    ("cpu:5", "the CPU is one device"),
    ("xla", "cannot train on 'xla'"),
    ("lazy", "cannot train on 'lazy'"),
    ("garbage", "Unknown device 'garbage'"),
    ("CPU", "Unknown device 'CPU'"),
    ("", "Unknown device ''"),
    ("cuda:99999999999999999999", "Unknown device"),
]


@pytest.mark.parametrize(("device", "words"), DEVICES, ids=[d or "empty" for d, _ in DEVICES])
def test_a_device_that_cannot_train_is_refused_before_training(device, words, tmp_path):
    _refused(_with(COMPARE, "--device", device, "--out", str(tmp_path / "out")), words)
    _refused(_with(BENCH, "--device", device), words)


def test_unavailable_accelerators_are_refused():
    import torch

    from sopkit.training.device import select_device

    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            select_device("cuda")
    else:
        with pytest.raises(UserError, match="CUDA devices? here"):
            select_device(f"cuda:{torch.cuda.device_count()}")
    if not torch.backends.mps.is_available():
        with pytest.raises(UserError, match="MPS is not available"):
            select_device("mps")
    assert select_device("cpu:0") == torch.device("cpu")


# ---- bench --out ---------------------------------------------------------------------------------

def test_bench_out_is_checked_before_measuring(tmp_path):
    existing = tmp_path / "a-file"
    existing.write_text("mine\n")
    text = _refused([*BENCH, "--out", str(existing)], "is an existing file")
    assert "timing" not in text and existing.read_text() == "mine\n"
    _refused([*BENCH, "--out", str(existing / "below")], "cannot be written")
    (tmp_path / "dir" / "bench.json").mkdir(parents=True)
    _refused([*BENCH, "--out", str(tmp_path / "dir")], "bench.json exists and is not a file")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        _refused([*BENCH, "--out", str(locked)], "cannot be written")


@pytest.mark.parametrize("inside", ["", "sub"])
def test_compare_out_naming_a_file_is_refused_before_training(inside, tmp_path):
    existing = tmp_path / "report.md"
    existing.write_text("mine")
    out = existing / inside if inside else existing
    _refused([*COMPARE, "--out", str(out)], "is a file, not a directory")
    assert existing.read_text() == "mine"
