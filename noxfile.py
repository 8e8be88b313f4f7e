"""CI sessions, run on the uv backend: `uv run nox -s tests` (or lint, typecheck, report, bench)."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["tests", "lint", "typecheck"]

# What `nox -s report` runs when given no arguments: the paper's Table 1 layout on MNIST-1D with a
# reduced learning-rate grid (5 of the paper's 10 rates) so that it finishes within an hour on a
# 2-core machine; the report states the grid it used. Any posargs are appended and win.
REPORT_PRESET = "paper-table1"
REPORT_DEFAULTS = ["--lr-grid", "paper:-2..2", "--jobs", "2"]

PYTHON = "3.11"
# Every Python the lock supports (requires-python >= 3.11) that this project tests on: `nox -s tests`
# runs each one found on the machine and skips the others (`nox -s tests-3.13` picks one).
PYTHONS = ["3.11", "3.12", "3.13", "3.14"]


def _sync(session: nox.Session) -> None:
    """Install the locked environment (sopkit, the baselines plugin and dev tools) into the session."""
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


@nox.session(python=PYTHON)
def gpu(session: nox.Session) -> None:
    """The checks only a CUDA machine can run: every `gpu` test, then the CUDA benchmarks of
    BENCHMARKS.md into runs/bench-cuda-*. Fails at once where there is no CUDA device (the `gpu`
    tests would skip, and a green run would prove nothing)."""
    _sync(session)
    session.run(
        "python", "-c",
        "import torch, sys; sys.exit(0 if torch.cuda.is_available() else "
        "'nox -s gpu needs a CUDA device; torch.cuda.is_available() is False here')",
    )
    session.run("pytest", "-m", "gpu", "-rs", *session.posargs)
    session.run("sopkit", "bench", "--device", "cuda", "--out", "runs/bench-cuda-mlp-a3")
    session.run(
        "sopkit", "bench", "--device", "cuda", "--model", "resnet18", "--input-shape", "3,32,32",
        "--bf16", "--strategies", "mk", "--out", "runs/bench-cuda-resnet18",
    )
