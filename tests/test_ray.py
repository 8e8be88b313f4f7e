"""Grids on Ray (``--executor ray``) against a real two-node Ray cluster started on this machine,
and the local pool's GPU assignment.

The cluster (a head and a second node on 127.0.0.1, one CPU each) is started once for this module
with ``ray start`` in a temporary directory of its own and stopped at the end by killing exactly
the processes those ``ray start`` calls made (their process groups and their children), never any
other Ray on the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import proc_stat
from typer.testing import CliRunner

from sopkit.cli import app
from sopkit.deploy.layout import saved_keys, weights_path
from sopkit.errors import UserError
from sopkit.experiment.executors import (
    _ray_plan,
    _train_on_node,
    worker_cuda_index,
    worker_plan,
)
from sopkit.experiment.plan import Execution, build_plan
from sopkit.experiment.runner import run_plan
from sopkit.experiment.store import DATABASE_NAME, TrialStore
from sopkit.training.progress import NullProgress

TINY = {"dataset": "digits", "epochs": 2, "batch_size": 256, "strategies": ["baseline", "mk"]}

# A model factory that kills the Ray worker process training it, once per marker file: the first
# Ray task to build a model dies the way a lost node's task does (no exception, the process is
# gone), so Ray must run it again. Outside a Ray task (the driver's check, the --jobs 1 reference)
# it only builds the model.
MODEL_MODULE = '''
import os
from pathlib import Path

from torch import nn

MARKER = Path(__file__).with_name("worker-killed")


def _in_ray_task():
    try:
        import ray
        from ray._private import worker
    except ImportError:
        return False
    return ray.is_initialized() and worker.global_worker.mode == ray.WORKER_MODE


def make_net(input_shape, num_classes):
    if _in_ray_task():
        try:
            os.close(os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            os._exit(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, num_classes))
'''
MODEL = "raytest_model:make_net"


# ---- the local pool: a worker per GPU ------------------------------------------------------------


def test_pool_workers_take_the_visible_gpus_round_robin():
    assert [worker_cuda_index(w, 2) for w in range(5)] == [0, 1, 0, 1, 0]
    assert [worker_cuda_index(w, 3) for w in range(4)] == [0, 1, 2, 0]
    # One GPU or none: the plan's device as it is (every worker on the one GPU, or the CPU).
    assert worker_cuda_index(3, 1) is None and worker_cuda_index(0, 0) is None


@pytest.mark.parametrize(
    "device,worker,count,expected",
    [
        ("auto", 1, 2, "cuda:1"),
        ("cuda", 2, 2, "cuda:0"),
        ("cuda", 5, 4, "cuda:1"),
        ("auto", 1, 1, "auto"),  # a single GPU: nothing to spread
        ("cpu", 1, 2, "cpu"),  # the user's explicit choices are kept
        ("cuda:1", 0, 2, "cuda:1"),
    ],
)
def test_a_pool_worker_runs_the_plan_on_its_own_gpu(device, worker, count, expected):
    plan = build_plan(**TINY, models=["mlp-a1"], device=device)
    placed = worker_plan(plan, worker, count)
    assert placed.device == expected
    # The device is not part of a trial's identity: the same trials are stored alike.
    assert [s.key for j in placed.jobs() for s in j.specs] == [
        s.key for j in plan.jobs() for s in j.specs
    ]


def _device_after_a_while() -> str:
    from sopkit.experiment.executors import _worker_device

    time.sleep(2)  # long enough for the other worker to take the other call
    return _worker_device()


@pytest.mark.gpu
def test_pool_workers_train_on_different_gpus(tmp_path):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    from sopkit.experiment.executors import local_pool
    from sopkit.experiment.runner import PlanRunner

    plan = build_plan(**TINY, models=["mlp-a1"], device="cuda")
    runner = PlanRunner(plan, tmp_path / DATABASE_NAME)
    with local_pool(runner, Execution(jobs=2)) as pool:
        futures = [pool.submit(_device_after_a_while) for _ in range(2)]
        devices = {future.result(timeout=120) for future in futures}
    assert devices == {"cuda:0", "cuda:1"}


# ---- what is refused, before anything runs -------------------------------------------------------


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"executor": "ray", "gpus_per_trial": float("nan")}, "at least 0, got nan"),
        ({"executor": "ray", "gpus_per_trial": float("inf")}, "at least 0, got inf"),
        ({"executor": "ray", "gpus_per_trial": -0.5}, "at least 0, got -0.5"),
        ({"executor": "ray", "gpus_per_trial": 1.5}, "whole number, got 1.5"),
        ({"executor": "dask"}, "Valid executors: local, ray"),
        ({"gpus_per_trial": 0.5}, "are for --executor ray"),
        ({"ray_address": "127.0.0.1:6379"}, "are for --executor ray"),
        ({"executor": "ray", "jobs": 2}, "--jobs is for --executor local"),
    ],
)
def test_execution_refuses_what_cannot_run(fields, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        Execution(**fields)


def test_a_ray_trial_trains_on_the_gpus_it_asks_for():
    plan = build_plan(**TINY, models=["mlp-a1"])  # device auto
    assert _ray_plan(plan, 0).device == "cpu"  # asked for none: never takes a node's GPU
    assert _ray_plan(plan, 0.5).device == "cuda"  # the GPU Ray made visible to the task
    with pytest.raises(UserError, match="needs --gpus-per-trial above 0"):
        _ray_plan(build_plan(**TINY, models=["mlp-a1"], device="cuda"), 0)
    with pytest.raises(UserError, match="leaves unused"):
        _ray_plan(build_plan(**TINY, models=["mlp-a1"], device="cpu"), 0.5)


def _compare(tmp_path: Path, *extra: str) -> Any:
    arguments = ["compare", "--dataset", "digits", "--model", "mlp-a1", "--epochs", "1",
                 "--out", str(tmp_path / "run"), *extra]
    return CliRunner().invoke(app, arguments)


def test_without_ray_the_ray_executor_exits_2_and_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = _compare(tmp_path, "--executor", "ray")
    assert result.exit_code == 2, result.output
    assert "pip install 'sopkit[ray]'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "address,message",
    [("127.0.0.1:1", "No Ray cluster answers at 127.0.0.1:1"), ("nonsense", "is not an address")],
)
def test_a_bad_ray_address_exits_2_with_a_message(tmp_path, address, message):
    pytest.importorskip("ray")
    result = _compare(tmp_path, "--executor", "ray", "--ray-address", address)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_ray_address_comes_from_the_environment_too(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    result = _compare(tmp_path, "--executor", "ray")
    assert result.exit_code == 2, result.output
    assert "No Ray cluster answers at 127.0.0.1:1" in result.output


def test_a_ray_task_returns_its_outcomes_and_the_driver_commits_them(tmp_path):
    """What a task runs, in this process: every trial of the job comes back, trained, and the task
    has no path to the run's database at all. The driver commits each trial with the provenance
    of the node that trained it, the same results as ``--jobs 1``."""
    ray = pytest.importorskip("ray")
    from concurrent.futures import Future

    from sopkit.experiment.executors import settle_ray_job
    from sopkit.experiment.runner import PlanRunner

    plan = build_plan(**TINY, models=["mlp-a1"], seeds=1, device="cpu")
    job = plan.jobs()[0]
    outcomes, provenance = _train_on_node(plan, job, job.specs, 1, 0)
    assert [o.spec for o in outcomes] == list(job.specs)
    assert all(o.record is not None and o.failure is None for o in outcomes)
    assert provenance["torch_threads"] == 1

    driver = tmp_path / "driver"
    driver.mkdir()
    returned: Future[Any] = Future()
    returned.set_result((outcomes, {**provenance, "node": "the node"}))
    settle_ray_job(ray, PlanRunner(plan, driver / DATABASE_NAME), job, returned)
    stored = TrialStore(driver / DATABASE_NAME).trials()
    assert {t.provenance["node"] for t in stored} == {"the node"}

    run_plan(plan, tmp_path / "one", NullProgress())
    assert _results(driver) == _results(tmp_path / "one")


def test_a_job_ray_gave_up_on_is_recorded_as_failed_and_the_grid_goes_on(tmp_path):
    ray = pytest.importorskip("ray")
    from concurrent.futures import Future

    from sopkit.experiment.executors import settle_ray_job
    from sopkit.experiment.runner import PlanRunner

    plan = build_plan(**TINY, models=["mlp-a1"], seeds=1, device="cpu")
    job = plan.jobs()[0]
    runner = PlanRunner(plan, tmp_path / DATABASE_NAME)
    lost: Future[Any] = Future()
    lost.set_exception(ray.exceptions.WorkerCrashedError())  # after its retries
    settle_ray_job(ray, runner, job, lost)  # no raise: the other jobs go on
    stored = TrialStore(tmp_path / DATABASE_NAME).trials()
    assert sorted(t.spec.strategy for t in stored) == ["baseline", "mk"]
    assert {t.status for t in stored} == {"failed"}
    assert {t.failure["error_type"] for t in stored} == {"WorkerCrashedError"}


def test_a_users_mistake_seen_on_a_node_stops_the_run_with_its_message(tmp_path):
    ray = pytest.importorskip("ray")
    from concurrent.futures import Future

    from sopkit.experiment.executors import settle_ray_job
    from sopkit.experiment.runner import PlanRunner

    plan = build_plan(**TINY, models=["mlp-a1"], seeds=1, device="cpu")
    mistake = UserError("--data-dir /data/cifar does not exist.")
    raised = ray.exceptions.RayTaskError("_train_on_node", "Traceback ...", mistake)
    failed: Future[Any] = Future()
    failed.set_exception(raised.as_instanceof_cause())  # what a task's future holds
    with pytest.raises(UserError, match=r"^On the Ray cluster: --data-dir /data/cifar does not"):
        settle_ray_job(ray, PlanRunner(plan, tmp_path / DATABASE_NAME), plan.jobs()[0], failed)
    assert not (tmp_path / DATABASE_NAME).exists()


# ---- a real cluster ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _cluster_env(temp_dir: Path) -> dict[str, str]:
    """The environment of the cluster's processes and of the driver: one thread per trial, and
    bytecode cached under the cluster's directory, so that each Ray worker does not compile torch
    from source again where PYTHONDONTWRITEBYTECODE is set (the venv is left untouched)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "PYTHONDONTWRITEBYTECODE")}
    return {**env, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
            "PYTHONPYCACHEPREFIX": str(temp_dir / "pycache"), **_NO_TOKEN(temp_dir)}


def _NO_TOKEN(temp_dir: Path) -> dict[str, str]:  # noqa: N802
    """No token authentication: a ``~/.ray/auth_token`` that a local ``ray.init()`` left behind
    would be read by the head's GCS but not sent by the joining node (ray 2.60)."""
    return {"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN_PATH": str(temp_dir / "no-auth-token")}


def _ray_start(arguments: list[str], temp_dir: Path) -> int:
    """Run ``ray start`` in a new session; returns its process group, which the daemons it
    leaves behind keep."""
    ray = Path(sys.executable).with_name("ray")
    process = subprocess.Popen(
        [str(ray), "start", *arguments, "--temp-dir", str(temp_dir), "--disable-usage-stats"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=_cluster_env(temp_dir),
    )
    output, _ = process.communicate(timeout=180)
    if process.returncode != 0:
        raise RuntimeError(f"ray start failed:\n{output}")
    return process.pid


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every process visible in /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        fields = proc_stat(entry.name) if entry.name.isdigit() else None
        if fields is not None:
            found[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return found


def _stop_cluster(groups: list[int]) -> None:
    """Kill the processes of ``groups`` and all their descendants (Ray workers set a process
    group of their own but stay children of their raylet); SIGTERM first, then SIGKILL."""

    def members() -> set[int]:
        table = _processes()
        chosen = {pid for pid, (_, group) in table.items() if group in groups}
        grew = True
        while grew:
            children = {pid for pid, (parent, _) in table.items() if parent in chosen}
            grew = not children <= chosen
            chosen |= children
        return chosen

    for sig, wait_s in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
        for pid in members():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _alive(members()):
            time.sleep(0.1)


def _alive(pids: set[int]) -> bool:
    return any((fields := proc_stat(pid)) is not None and fields[0] != "Z" for pid in pids)


class Cluster:
    """A running Ray cluster: its ``address`` and the environment its processes share."""

    def __init__(self, address: str, temp_dir: Path) -> None:
        self.address = address
        self.env = _cluster_env(temp_dir)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    """A running two-node Ray cluster on this machine."""
    pytest.importorskip("ray")
    # Short: Ray's socket paths live under it and must fit in 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="sopray", dir="/tmp"))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    groups: list[int] = []
    saved = {name: os.environ.get(name) for name in _NO_TOKEN(temp_dir)}
    os.environ.update(_NO_TOKEN(temp_dir))  # this process is the driver of the library runs
    try:
        groups.append(_ray_start(["--head", "--node-ip-address", "127.0.0.1", "--port",
                                  str(port), "--num-cpus", "1", "--include-dashboard", "false"],
                                 temp_dir))
        groups.append(_ray_start(["--address", address, "--node-ip-address", "127.0.0.1",
                                  "--num-cpus", "1"], temp_dir))
        yield Cluster(address, temp_dir)
    finally:
        _stop_cluster(groups)
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def model_module(tmp_path, monkeypatch) -> Path:
    """A directory holding ``raytest_model``, importable here and (as the driver's working
    directory, which Ray adds to its workers' path) on the cluster's workers."""
    directory = tmp_path / "models"
    directory.mkdir()
    # The marker's absolute path, not one from __file__: a Ray worker that found the module through
    # a relative sys.path entry would make the marker relative to its own working directory.
    marker = f"Path({str(directory / 'worker-killed')!r})"
    source = MODEL_MODULE.replace('Path(__file__).with_name("worker-killed")', marker)
    assert marker in source
    (directory / "raytest_model.py").write_text(source)
    monkeypatch.syspath_prepend(str(directory))
    return directory


class Messages(NullProgress):
    def __init__(self) -> None:
        self.messages: list[str] = []

    def message(self, text: str) -> None:
        self.messages.append(text)


def _results(directory: Path) -> dict[str, Any]:
    """What a trial computed (not when, nor how fast), by key."""
    return {
        t.key: (t.status, t.test_accuracy, t.val_accuracy, t.train_params,
                [{k: v for k, v in point.items() if k != "seconds"} for point in t.curve])
        for t in TrialStore(directory / DATABASE_NAME).trials()
    }


@pytest.mark.slow
def test_a_grid_on_a_ray_cluster_equals_jobs_1_survives_a_lost_worker_and_resumes(
    ray_cluster, model_module, tmp_path, monkeypatch
):
    plan = build_plan(**TINY, models=[MODEL], seeds=2)
    run_plan(plan, tmp_path / "one", NullProgress(), jobs=1)  # the reference, in this process
    reference = _results(tmp_path / "one")
    assert len(reference) == 4 and not (model_module / "worker-killed").exists()

    # The command line, one seed: its only task loses its worker process and runs again. The
    # driver's working directory is where Ray's workers find the model's module.
    monkeypatch.chdir(model_module)
    out = tmp_path / "ray"
    first = CliRunner().invoke(app, [
        "compare", "--dataset", "digits", "--model", MODEL, "--strategies", "baseline,mk",
        "--epochs", "2", "--batch-size", "256", "--seeds", "1", "--executor", "ray",
        "--ray-address", ray_cluster.address, "--out", str(out),
    ])
    assert first.exit_code == 0, first.output
    failures = [t.unknown.get("failure") or t.status for t in
                TrialStore(out / DATABASE_NAME).trials() if t.status != "finished"]
    # The worker did die (else: what the trials say, for the run's log).
    assert (model_module / "worker-killed").exists(), (first.output, failures)
    seed0 = {t.key: t.finished_at for t in TrialStore(out / DATABASE_NAME).trials()}
    assert len(seed0) == 2

    # Both seeds, through the library, into the same directory: seed 0 is kept, seed 1 runs.
    progress = Messages()
    run_plan(build_plan(**TINY, models=[MODEL], seeds=2), out, progress, executor="ray",
             ray_address=ray_cluster.address)
    assert any("Resuming: 2 finished trials" in m for m in progress.messages)
    stored = TrialStore(out / DATABASE_NAME).trials()
    assert {t.key: t.finished_at for t in stored if t.key in seed0} == seed0
    # Bit for bit what --jobs 1 computed, every trial, and the models the tasks sent back.
    assert _results(out) == reference
    assert saved_keys(out) == set(reference)
    for key in reference:
        assert weights_path(out, key).read_bytes() == weights_path(tmp_path / "one", key).read_bytes()
    # Each trial is stored with the provenance of the process that trained it (one thread).
    assert {t.provenance["torch_threads"] for t in stored} == {1}


@pytest.mark.slow
def test_the_extension_and_confirmation_stages_on_a_ray_cluster_equal_jobs_1(
    ray_cluster, tmp_path
):
    """Both stages are planned from what the driver stored, so they run on Ray as the search does:
    a two-rate grid always chooses at an edge, so each strategy gets one rate more, then a fresh
    seed at its chosen rate; every trial equals --jobs 1's bit for bit."""
    plan = build_plan(**TINY, models=["mlp-a1"], seeds=1, lr_grid="0.03,0.01", extend_grid=1,
                      confirm_seeds=1, device="cpu")
    run_plan(plan, tmp_path / "one", NullProgress(), jobs=1)
    run_plan(plan, tmp_path / "ray", NullProgress(), executor="ray",
             ray_address=ray_cluster.address)
    assert _results(tmp_path / "ray") == _results(tmp_path / "one")
    stored = TrialStore(tmp_path / "ray" / DATABASE_NAME).trials()
    for strategy in TINY["strategies"]:
        mine = [t.spec for t in stored if t.spec.strategy == strategy]
        assert len({s.lr for s in mine if s.seed == 0}) == 3  # the grid and one rate past its edge
        assert [s.seed for s in mine if s.seed != 0] == [1]  # the confirmation seed
