"""CI sessions, run on the uv backend: `uv run nox -s tests` (or lint, typecheck, report, bench)."""

from __future__ import annotations

from collections.abc import Callable

import nox
import nox.command

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["tests", "lint", "typecheck"]

# What `nox -s report` runs when given no arguments: the paper's Table 1 layout on MNIST-1D with the
# paper's full learning-rate grid (10 rates), extended past its edge where a choice sits there (at
# most 3 more rates per side), and the controls that test the paper's explanations (sam, wide,
# weight-noise, ema) beside its strategies. Two seeds choose each rate; every number in the report
# comes from 5 fresh confirmation seeds at the chosen rate, so the search seeds only rank rates.
# Two hours on a 2-core machine (1436 trials); the store resumes, so an interrupted run picks up where it
# stopped. Any posargs are appended and win.
REPORT_PRESET = "paper-table1"
REPORT_STRATEGIES = "baseline,ensemble,distill,subset,mk,sam,wide,weight-noise,ema"
REPORT_DEFAULTS = [
    "--lr-grid", "paper", "--seeds", "2", "--extend-grid", "3", "--confirm-seeds", "5",
    "--strategies", REPORT_STRATEGIES, "--jobs", "2",
]

PYTHON = "3.11"
# Every Python the lock supports (requires-python >= 3.11) that this project tests on: `nox -s tests`
# runs each one found on the machine and skips the others (`nox -s tests-3.13` picks one).
PYTHONS = ["3.11", "3.12", "3.13", "3.14"]


def _sync(session: nox.Session) -> None:
    """Install the locked environment (sopkit, the baselines plugin and dev tools) into the session.

    Under `nox --no-venv` nothing is installed: the session uses the running interpreter's packages
    as they are. That is for a machine that reaches no registry and brings its own CUDA build of
    torch (a GPU machine's image, say): install sopkit and the plugin there first, then
    `python -m nox --no-venv -s gpu`.
    """
    if session.venv_backend == "none":
        session.log("--no-venv: using this interpreter's installed packages (no uv sync)")
        return
    session.run_install(
        "uv",
        "sync",
        "--locked",
        "--all-extras",
        f"--python={session.virtualenv.location}",
        env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location},
    )


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The README's test command: the whole suite (slow tests included; pass -m 'not slow' to skip)."""
    _sync(session)
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff lint over the package, the plugin and the tests."""
    _sync(session)
    session.run("ruff", "check", "sopkit", "baselines", "tests", "noxfile.py")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy over the sopkit package."""
    _sync(session)
    session.run("mypy", "sopkit", "baselines/src")


@nox.session(python=PYTHON)
def report(session: nox.Session) -> None:
    """Run a preset and write its reports to reports/<preset>/ (resumes an interrupted run).

    `nox -s report` regenerates the committed MNIST-1D Table-1 report; `nox -s report -- --preset
    my.toml --seeds 5` runs another preset or grid (options after `--` are passed to sopkit compare).
    """
    _sync(session)
    args = [*REPORT_DEFAULTS, *session.posargs]
    preset = REPORT_PRESET
    if "--preset" in args:
        preset = args[len(args) - 1 - args[::-1].index("--preset") + 1]
    name = preset.rsplit("/", 1)[-1].removesuffix(".toml")
    session.run("sopkit", "compare", "--preset", preset, *args, "--out", f"reports/{name}")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """BENCHMARKS.md's main measurement: `sopkit bench` into runs/bench/ (bench.json, .md, .png).

    Machine-specific, so not committed (runs/ is ignored): CI keeps it as an artifact. Options after
    `--` go to sopkit bench and win, e.g. `nox -s bench -- --threads 1 --out runs/bench-1t`.
    """
    _sync(session)
    session.run(
        "sopkit", "bench", "--repeats", "15", "--steps", "10", "--out", "runs/bench", *session.posargs
    )


#: Where `nox -s gpu` writes (runs/ is ignored): one folder per step, and summary.md.
GPU_OUT = "runs/gpu"
#: The CUDA targets of BENCHMARKS.md: name, model, input shape; batch 256, bf16, e = 3.
GPU_BENCHES = (("mlp-a3", "mlp-a3", "3072"), ("resnet18-32px", "resnet18", "3,32,32"))
GPU_BENCH_STRATEGIES = "mk,adv-mk"
# A short real training: MNIST-1D (generated offline), the three strategies a torchrun step must
# reproduce. The torchrun run repeats it on two GPUs, so the table shows both.
GPU_COMPARE = [
    "compare", "--dataset", "mnist1d", "--model", "mlp-a2", "--strategies", "baseline,mk,adv-mk",
    "--seeds", "1", "--epochs", "20", "--device", "cuda",
]


@nox.session(python=PYTHON)
def gpu(session: nox.Session) -> None:
    """What only a CUDA machine can check, in one go (a few minutes on one GPU): every `gpu` test,
    `sopkit bench` on BENCHMARKS.md's CUDA targets (ResNet-18 at 32x32 and mlp-a3, batch 256,
    bf16, with peak memory), a short `sopkit compare --device cuda`, and the same comparison with
    `torchrun --nproc-per-node 2` where two GPUs are visible; then one summary table (also in
    runs/gpu/summary.md). Fails at once where there is no CUDA device: the `gpu` tests would skip
    there, and a green run would prove nothing. Options after `--` go to pytest."""
    import shutil
    import time

    if shutil.which("nvidia-smi") is None:
        session.error("nox -s gpu needs a CUDA device: nvidia-smi is not on this machine's PATH")
    _sync(session)
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    gpus = int(str(session.run("python", "-c", probe, silent=True)).strip().splitlines()[-1])
    if gpus == 0:
        session.error("nox -s gpu needs a CUDA device; torch.cuda.is_available() is False here")
    rows: list[tuple[str, str, float, str]] = []

    def step(name: str, *args: str, summary: Callable[[], str] = lambda: "") -> None:
        started = time.perf_counter()
        try:
            session.run(*args)
            status = "ok"
        except nox.command.CommandFailed:
            status = "FAILED"
        seconds = time.perf_counter() - started
        rows.append((name, status, seconds, _gpu_safely(summary) if status == "ok" else ""))

    step("gpu tests", "pytest", "-m", "gpu", "-rs", "-p", "no:cacheprovider", *session.posargs)
    for name, model, shape in GPU_BENCHES:
        out = f"{GPU_OUT}/bench-{name}"
        step(
            f"bench {name}", "sopkit", "bench", "--device", "cuda", "--bf16", "--batch-size", "256",
            "--model", model, "--input-shape", shape, "--strategies", GPU_BENCH_STRATEGIES,
            "--out", out, summary=lambda out=out: _gpu_bench_summary(out),
        )
    one = f"{GPU_OUT}/compare-1gpu"
    step("compare, 1 GPU", "sopkit", *GPU_COMPARE, "--out", one,
         summary=lambda: _gpu_compare_summary(one))
    if gpus >= 2:
        two = f"{GPU_OUT}/compare-torchrun-2gpu"
        step(
            "compare, torchrun 2 GPUs", "torchrun", "--nproc-per-node", "2", "-m", "sopkit",
            *GPU_COMPARE, "--out", two, summary=lambda: _gpu_compare_summary(two),
        )
    else:
        rows.append(("compare, torchrun 2 GPUs", "skipped", 0.0, f"{gpus} GPU visible"))
    table = _gpu_table(rows)
    print(table)
    from pathlib import Path

    Path(GPU_OUT).mkdir(parents=True, exist_ok=True)
    Path(GPU_OUT, "summary.md").write_text(table + "\n")
    if any(status == "FAILED" for _, status, _, _ in rows):
        session.error("nox -s gpu: a step failed (see the table above)")


def _gpu_safely(summary: Callable[[], str]) -> str:
    try:
        return summary()
    except (OSError, ValueError, KeyError, TypeError) as error:  # a missing or odd result file
        return f"(no summary: {type(error).__name__}: {error})"


def _gpu_bench_summary(out: str) -> str:
    """Per strategy: the ratio to the baseline's step, and the peak memory (CUDA allocator)."""
    import json
    from pathlib import Path

    record = json.loads(Path(out, "bench.json").read_text())
    parts = []
    for name, entry in record["strategies"].items():
        peak = entry.get("peak_bytes")
        memory = f", peak {peak / 2**20:.0f} MiB" if peak is not None else ""
        timing = f"{entry['median_step_ms']:.2f} ms" if name == "baseline" else f"{entry['ratio']:.2f}x"
        parts.append(f"{name} {timing}{memory}")
    return "; ".join(parts)


def _gpu_compare_summary(out: str) -> str:
    """Per strategy: test accuracy and median step time."""
    import json
    from pathlib import Path

    record = json.loads(Path(out, "summary.json").read_text())
    return "; ".join(
        f"{entry['strategy']} {100 * entry['test_accuracy_mean']:.2f}% "
        f"({1000 * entry['median_step_time']:.2f} ms/step)"
        for entry in record["strategies"]
    )


def _gpu_table(rows: list[tuple[str, str, float, str]]) -> str:
    lines = ["| step | status | seconds | result |", "| --- | --- | ---: | --- |"]
    lines += [f"| {name} | {status} | {seconds:.0f} | {result} |" for name, status, seconds, result in rows]
    return "\n".join(["nox -s gpu summary", "", *lines])
