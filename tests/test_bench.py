"""``sopkit bench``: it runs, writes what it promises, and rejects bad input with exit status 2.

These tests check the plumbing on a tiny model with a handful of steps; they assert nothing about
speed (timings belong in BENCHMARKS.md, measured by ``sopkit bench`` itself).
"""

from __future__ import annotations

import json
import shlex
import statistics
from collections.abc import Iterator

import pytest
import torch
from typer.testing import CliRunner

import sopkit.bench.run
from sopkit.bench import BenchConfig, EntryResult, command_line, parse_input_shape
from sopkit.bench.entries import Entry, ProbeSession, single_step_note
from sopkit.bench.run import time_rounds
from sopkit.cli import app
from sopkit.errors import UserError
from sopkit.strategies import Baseline, MajorityKernelsStrategy
from sopkit.training.config import TrainConfig
from sopkit.training.strategy import Strategy

runner = CliRunner()

TINY = ("--model", "mlp-a1", "--input-shape", "12", "--batch-size", "8", "--device", "cpu")
FAST = ("--repeats", "3", "--steps", "2", "--warmup", "1", "--threads", "1")


@pytest.fixture(autouse=True)
def keep_thread_count() -> Iterator[None]:
    """``--threads`` sets torch's global thread count; put it back for the tests that follow."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_writes_bench_json_md_and_png(tmp_path):
    out = tmp_path / "bench"
    result = runner.invoke(app, ["bench", *TINY, *FAST, "--strategies", "mk", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "x baseline [IQR]" in result.output and "hand-written loop" in result.output

    record = json.loads((out / "bench.json").read_text())
    assert {"config", "provenance", "device", "threads", "strategies", "loop", "loop_ratio"} <= set(
        record
    )
    assert record["config"]["model"] == "mlp-a1" and record["config"]["input_shape"] == [12]
    assert record["threads"] == 1 and record["rounds_timed"] == 3
    assert {"versions", "git_revision", "torch_threads", "cpu", "cpu_capability"} <= set(
        record["provenance"]
    )
    assert list(record["strategies"]) == ["baseline", "mk"]  # the baseline is always measured
    assert list(record["loop"]) == [
        "sopkit loop (baseline step)", "plain loop", "plain loop, torch.optim defaults"
    ]
    baseline, mk = record["strategies"]["baseline"], record["strategies"]["mk"]
    for entry in [*record["strategies"].values(), *record["loop"].values()]:
        assert entry["measured"] and len(entry["step_ms"]) == 3
        # Paired ratios: each round's step time over the baseline's in the same round.
        for ratio, ms, base_ms in zip(entry["ratios"], entry["step_ms"], baseline["step_ms"],
                                      strict=True):
            assert ratio == pytest.approx(ms / base_ms)
        assert entry["ratio"] == statistics.median(entry["ratios"])
    assert baseline["ratios"] == [1.0, 1.0, 1.0]
    assert len(baseline["cpu_ms"]) == len(mk["cpu_ms"]) == 3
    assert record["loop"]["sopkit loop (baseline step)"]["step_ms"] == baseline["step_ms"]
    assert record["loop_ratio"] == pytest.approx(1 / record["loop"]["plain loop"]["ratio"])
    # mlp-a1 on 12 inputs, 10 classes: 12x100 and 100x10 weights, e = 3 copies of each, biases
    # single.
    assert baseline["train_params"] == 12 * 100 + 100 + 100 * 10 + 10 == 2310
    assert mk["train_params"] == 3 * (12 * 100 + 100 * 10) + 100 + 10 == 6710
    # Parameters, gradients and Adam's two moments: 16 bytes a parameter, plus Adam's 4-byte step
    # count per parameter tensor (4 in the MLP; how many hold mk's copies is mk's choice).
    assert baseline["state_bytes"] == 16 * 2310 + 4 * 4
    assert 0 < mk["state_bytes"] - 16 * 6710 <= 4 * 4 and mk["state_bytes"] % 4 == 0

    # bench.md: the same rows, and the command that measures them again; bench.png drawn for it.
    markdown = (out / "bench.md").read_text()
    assert "![Step time against the baseline's](bench.png)" in markdown
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name, entry in record["strategies"].items():
        low, high = entry["ratio_iqr"]
        row = f"| {name} | {entry['median_step_ms']:.2f} | {entry['ratio']:.2f}x [{low:.2f}-{high:.2f}] |"
        assert row in markdown
    assert "| mk |" in markdown and "| p: sfc64 sampler |" in markdown
    assert "sopkit bench --model mlp-a1 --input-shape 12 --batch-size 8 --strategies mk" in markdown
    assert (record["provenance"]["git_revision"] or "not a git checkout") in markdown
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "bench.png"]


def test_bench_accepts_an_image_shaped_input():
    result = runner.invoke(
        app,
        [
            "bench",
            "--model",
            "mlp-a1",
            "--input-shape",
            "3,4,4",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            *FAST,
            "--strategies",
            "baseline",
        ],
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (("--strategies", "no-such-strategy"), "Unknown strategy"),
        (("--model", "no-such-model"), "Unknown model"),
        (("--batch-size", "0"), "--batch-size must be a positive integer"),
        (("--batch-size", "-3"), "--batch-size must be a positive integer"),
        (("--input-shape", "3,a"), "--input-shape"),
        (("--repeats", "0"), "--repeats must be a positive integer"),
        (("--expansion", "1"), "--expansion must be at least 2"),
        (("--bf16",), "only supported on CUDA"),
        (("--set", "novalue"), "KEY=VALUE"),
        (("--mk-sampler", "dice"), "Unknown --mk-sampler"),
        (("--mk-sampler", "triton"), "--mk-sampler triton"),
        (("--mk-backward", "forget"), "Unknown --mk-backward"),
        (("--strategies=",), "--strategies is empty"),
        (("--threads", "0"), "--threads must be a positive integer"),
        (("--warmup", "-1"), "--warmup must be at least 0"),
    ],
)
def test_bad_input_exits_2_with_a_message(args, message):
    base = ["bench", *TINY, *FAST, "--strategies", "mk"]
    result = runner.invoke(app, [*base, *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert isinstance(result.exception, SystemExit)  # an exit with a message, not a crash


def test_input_shapes_parse():
    assert parse_input_shape("3072") == (3072,)
    assert parse_input_shape("3,32,32") == (3, 32, 32)
    assert parse_input_shape("3x32x32") == (3, 32, 32)
    assert parse_input_shape(" 3, 32 ,32 ") == (3, 32, 32)
    for bad in ("", "0", "3,-1", "a", "3,x", "3,,32", "3,32,", "x32"):
        with pytest.raises(UserError):
            parse_input_shape(bad)


class _TrainsMembers(Strategy):
    """Like an ensemble: its fit trains other strategies."""

    def fit(self, session):  # type: ignore[no-untyped-def]
        return [session.train(Baseline(), seed=s) for s in range(3)]


class _WrapsItsOwnTraining(MajorityKernelsStrategy):
    """Like adv-mk: fit overridden only to add to its own single training."""

    def fit(self, session):  # type: ignore[no-untyped-def]
        result = session.train(self)
        result.extra["note"] = "wrapped"
        return result


def test_only_strategies_that_train_other_models_are_left_untimed(tiny_data):
    probe = ProbeSession(
        tiny_data, lambda: torch.nn.Linear(12, 4), TrainConfig(), device=torch.device("cpu")
    )
    assert single_step_note(Baseline(), probe) is None
    assert single_step_note(_WrapsItsOwnTraining(), probe) is None
    note = single_step_note(_TrainsMembers(), probe)
    assert note is not None and "several models" in note and "baseline" in note


def test_regenerating_mk_keeps_less_for_backward_than_saving(tmp_path):
    saved = {}
    for mode in ("save", "regenerate"):
        out = tmp_path / mode
        args = ["bench", *TINY, *FAST, "--strategies", "mk", "--mk-backward", mode]
        result = runner.invoke(app, [*args, "--out", str(out)])
        assert result.exit_code == 0, result.output
        record = json.loads((out / "bench.json").read_text())
        assert record["config"]["mk_backward"] == mode
        saved[mode] = record["strategies"]["mk"]["saved_bytes"]
    # What "save" keeps on top: p, e = 3 floats for each of mlp-a1's 12 x 100 + 100 x 10 weights.
    assert saved["save"] - saved["regenerate"] == 3 * (12 * 100 + 100 * 10) * 4


@pytest.mark.parametrize(
    "config",
    [
        BenchConfig(),
        BenchConfig(model="resnet18", input_shape=(3, 32, 32), num_classes=100, batch_size=64,
                    expansion=4, strategies=("mk", "adv-mk"), device="cuda", threads=3, bf16=True,
                    repeats=7, steps=4, warmup=2, optimizer="sgd",
                    options={"mk.init": "replicate", "adv-mk.eps": "0.5", "x.y": "two words"},
                    mk_sampler="torch", mk_backward="save"),
    ],
)
def test_the_command_in_bench_md_asks_for_the_same_configuration(
    config: BenchConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[BenchConfig] = []

    def capture(asked: BenchConfig, **callbacks: object) -> None:
        seen.append(asked)
        raise UserError("captured")

    monkeypatch.setattr("sopkit.bench.run_bench", capture)
    words = shlex.split(command_line(config))
    assert words[:2] == ["sopkit", "bench"]
    result = runner.invoke(app, words[1:])
    assert result.exit_code == 2 and "captured" in result.output, result.output
    assert seen == [config]


def _counting_entry(name: str, interrupt_at: int | None, calls: list[str]) -> Entry:
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        calls.append(name)
        if interrupt_at is not None and calls.count(name) == interrupt_at:
            raise KeyboardInterrupt

    model = torch.nn.Linear(1, 1)
    return Entry(name, step, model, torch.optim.SGD(model.parameters()), EntryResult(name, True))


@pytest.mark.parametrize("interrupt_at", [None, 7, 13, 2])
def test_an_interrupt_keeps_the_rounds_that_finished_for_every_entry_alike(
    interrupt_at: int | None,
) -> None:
    # Three entries, 3 steps per round, 5 rounds; "b" is interrupted at its n-th step.
    calls: list[str] = []
    entries = [_counting_entry(n, interrupt_at if n == "b" else None, calls) for n in "abc"]
    batch = (torch.zeros(1, 1), torch.zeros(1, dtype=torch.long))
    progress: list[tuple[int, int]] = []

    def run() -> int:
        return time_rounds(entries, torch.device("cpu"), [batch], 5, 3,
                            lambda done, total: progress.append((done, total)))

    if interrupt_at is not None and interrupt_at <= 3:  # within the first round: nothing measured
        with pytest.raises(KeyboardInterrupt):
            run()
        return
    done = run()
    expected = 5 if interrupt_at is None else (interrupt_at - 1) // 3
    assert done == expected
    assert progress == [(k, 5) for k in range(expected + 1)]
    for entry in entries:  # the round in progress is dropped for all, not only for some
        assert len(entry.result.step_ms) == len(entry.result.cpu_ms) == expected


def test_an_interrupt_before_any_round_finished_exits_130_with_a_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def interrupted(config: BenchConfig, **callbacks: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("sopkit.bench.run_bench", interrupted)
    result = runner.invoke(app, ["bench", *TINY, *FAST])
    assert result.exit_code == 130
    assert "nothing measured" in result.output
    assert isinstance(result.exception, SystemExit)  # an exit with a message, not a crash


def test_an_interrupted_bench_still_writes_its_rounds_and_exits_130(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def two_rounds(entries, device, batches, repeats, steps, on_round=None):  # type: ignore[no-untyped-def]
        return time_rounds(entries, device, batches, 2, steps, on_round)  # as if stopped after 2

    monkeypatch.setattr(sopkit.bench.run, "time_rounds", two_rounds)
    out = tmp_path / "bench"
    result = runner.invoke(app, ["bench", *TINY, *FAST, "--strategies", "mk", "--out", str(out)])
    assert result.exit_code == 130, result.output
    record = json.loads((out / "bench.json").read_text())
    assert record["rounds_timed"] == 2 and record["config"]["repeats"] == 3
    assert record["notes"][0].startswith("Interrupted: 2 of the 3 rounds")
    assert "Interrupted: 2 of the 3 rounds" in (out / "bench.md").read_text()


def _entry(name: str, step_ms: list[float], note: str = "", peak: int | None = None) -> EntryResult:
    base = [1.0, 2.0, 4.0]
    return EntryResult(
        name, bool(step_ms), note, step_ms=step_ms, cpu_ms=list(step_ms),
        ratios=[a / b for a, b in zip(step_ms, base, strict=False)],
        train_params=10, state_bytes=3 << 20, saved_bytes=1 << 19, peak_bytes=peak,
    )


@pytest.mark.parametrize("cuda", [False, True])
def test_bench_tables_are_report_tables_with_a_peak_column_on_cuda_only(cuda: bool) -> None:
    from sopkit.bench import BenchReport
    from sopkit.bench.report import render_markdown, tables
    from sopkit.report.tables import Table

    peak = 7 << 20 if cuda else None
    report = BenchReport(
        BenchConfig(model="mlp-a1", input_shape=(12,)),
        "cpu (test)",
        1,
        [
            _entry("baseline", [1.0, 2.0, 4.0], peak=peak),
            _entry("mk", [2.0, 5.0, 8.0], "p: sfc64 sampler", peak=peak),
            _entry("ensemble", [], "not timed: trains | several"),
        ],
        [
            _entry("sopkit loop (baseline step)", [1.0, 2.0, 4.0]),
            _entry("plain loop", [1.0, 1.0, 2.0]),
        ],
        {"git_revision": None},
        rounds=3,
    )
    steps, loop = tables(report)
    assert isinstance(steps, Table) and isinstance(loop, Table)
    names = [name for name, _ in steps.columns]
    assert names == [
        "strategy", "step ms", "x baseline [IQR]", "CPU ms",
        *(["peak MiB"] if cuda else []),
        "state MiB", "saved MiB", "note",
    ]
    rows = [[cell.text for cell in row] for row in steps.rows]
    # mk's ratios per round: 2, 2.5, 2: median 2.00, quartiles 2.00 and 2.25.
    assert rows[1] == ["mk", "5.00", "2.00x [2.00-2.25]", "5.00", *(["7.0"] if cuda else []),
                       "3.0", "0.5", "p: sfc64 sampler"]
    assert rows[2][:4] == ["ensemble", "", "", ""]  # not timed: no numbers, only why
    assert [[cell.text for cell in row] for row in loop.rows] == [
        ["sopkit loop (baseline step)", "2.00", "1.00x [1.00-1.00]"],
        ["plain loop", "1.00", "0.50x [0.50-0.75]"],
    ]
    markdown = render_markdown(report)
    assert "| ensemble |  |  |  |" in markdown and "not timed: trains \\| several |" in markdown
    assert "- Git revision: unknown (not a git checkout)" in markdown
