"""One trial on many processes (``sopkit.training.distributed``, ``sopkit.experiment.ranks``).

The equality tests train in two real gloo processes on the CPU (``torch.multiprocessing.spawn``)
and compare with the same training in this process: DDP over two ranks must take the steps one
process takes on the whole batch. One test runs ``torchrun --nproc-per-node 2 -m sopkit compare``
end to end and audits every file rank 1 opens for writing.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from blobs import make_blobs
from torch import nn
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

import sopkit
from sopkit.cli import app
from sopkit.data import DataSplits, LoaderSplit, TensorSplit
from sopkit.data.pipeline import SeededOrder
from sopkit.errors import UserError
from sopkit.registry import create_strategy
from sopkit.training.distributed import Ranks, _loader_shares, _tensor_shares, torchrun_ranks
from sopkit.training.loop import TrainingSession
from sopkit.training.settings import StrategySettings
from sopkit.training.types import TrainConfig

# 195 training examples in batches of 64: three full batches and one of 3, which two ranks share
# unequally (2 and 1); 193 leaves a last batch of 1, so rank 1 has no example of it.
TRAIN_SIZES = (195, 193)
STRATEGIES = ("baseline", "mk", "adv-mk")


def _data(train_size: int) -> DataSplits:
    splits = [make_blobs(n, 12, 4, seed) for n, seed in ((train_size, 0), (61, 1), (101, 2))]
    train, val, test = (TensorSplit(x, y) for x, y in splits)
    return DataSplits("blobs", (12,), 4, train, val, test)


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


def _train(
    strategy: str, train_size: int, device: str = "cpu", lr: float = 0.01
) -> dict[str, Any]:
    """One training of ``strategy`` on ``device``: what must match between one process and two."""
    optimizer = "adam" if lr < 1 else "sgd"  # a huge SGD rate: the loss is not finite within steps
    config = TrainConfig(epochs=3 if lr >= 1 else 2, batch_size=64, optimizer=optimizer, lr=lr)
    data = _data(train_size).to(device)
    session = TrainingSession(data, _model, config, device=torch.device(device), seed=3)
    result = session.train(create_strategy(strategy, StrategySettings(expansion=3)))
    assert result.model is not None
    return {
        "state": {k: v.detach().cpu().clone() for k, v in result.model.state_dict().items()},
        "losses": [record.train_loss for record in result.curve],
        "val": [record.val_accuracy for record in result.curve],
        "test": result.test_accuracy,
        "extra": result.extra,
        "diverged_at": result.diverged_at_step,
        "epochs": len(result.curve),
    }


def _train_batch(batch_size: int) -> None:
    config = TrainConfig(epochs=1, batch_size=batch_size)
    session = TrainingSession(_data(64), _model, config, device=torch.device("cpu"))
    session.train(create_strategy("baseline", StrategySettings()))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(rank: int, world: int, port: int, out: str, device: str = "cpu") -> None:
    """One rank: join a group (gloo on the CPU, NCCL on CUDA, each rank its own GPU), train every
    case, check collapse and FSDP on the wrapped model (CPU), and save what it found."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group("gloo" if device == "cpu" else "nccl", rank=rank, world_size=world)
    try:
        found: dict[str, Any] = {
            f"{name}/{n}": _train(name, n, device) for name in STRATEGIES for n in TRAIN_SIZES
        }
        if device == "cpu":
            found["checks"] = _wrapped_checks()
            found["diverging"] = _train("mk", 195, lr=1e30)
        torch.save(found, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _wrapped_checks() -> dict[str, Any]:
    """collapse() of the DDP-wrapped model, and FSDP refused, inside the process group."""
    from sopkit.training.distributed import wrap

    torch.manual_seed(0)
    expanded = sopkit.expand(_model(), expansion=3, seed=5)
    wrapped = wrap(expanded, torch.device("cpu"))
    checks: dict[str, Any] = {"wrapped": type(wrapped).__name__}
    via_wrapper, direct = sopkit.collapse(wrapped), sopkit.collapse(expanded)
    checks["collapse_equal"] = all(
        torch.equal(a, b)
        for a, b in zip(
            via_wrapper.state_dict().values(), direct.state_dict().values(), strict=True
        )
    )
    checks["collapse_type"] = type(via_wrapper).__name__
    class Swapping(sopkit.Strategy):
        data_parallel = False

    for what, call in (
        ("swapping", lambda: wrap(_model(), torch.device("cpu"), Swapping())),
        ("batch 63", lambda: _train_batch(63)),
    ):
        try:
            call()
            checks[what] = "accepted"
        except UserError as error:
            checks[what] = str(error)
    from torch.distributed.fsdp import fully_shard

    sharded = fully_shard(sopkit.expand(_model(), expansion=3, seed=5))
    for what, call in (("expand", lambda: sopkit.expand(fully_shard(_model()))),
                       ("collapse", lambda: sopkit.collapse(sharded)),
                       ("wrap", lambda: wrap(sharded, torch.device("cpu")))):
        try:
            call()
            checks[what] = "accepted"
        except UserError as error:
            checks[what] = str(error)
    return checks


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What each of two gloo ranks trained (every strategy and data size) and checked."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_rank_main, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("train_size", TRAIN_SIZES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_take_the_steps_one_process_takes_on_the_whole_batch(
    two_ranks: list[dict[str, Any]], strategy: str, train_size: int
) -> None:
    alone = _train(strategy, train_size)
    for rank in two_ranks:
        found = rank[f"{strategy}/{train_size}"]
        assert found["state"].keys() == alone["state"].keys()
        for name, value in alone["state"].items():
            torch.testing.assert_close(found["state"][name], value, rtol=1e-5, atol=1e-6)
        assert found["losses"] == pytest.approx(alone["losses"], rel=1e-5)
        # Evaluation counts are summed over the ranks' parts: one process's accuracy.
        assert found["val"] == alone["val"]
        assert found["test"] == alone["test"]
        assert found["extra"].keys() == alone["extra"].keys()
    # Every rank ends with the same model, bit for bit (the same all-reduced steps).
    first, second = (rank[f"{strategy}/{train_size}"]["state"] for rank in two_ranks)
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.gpu
def test_two_gpus_take_the_steps_one_gpu_takes_on_the_whole_batch(tmp_path: Path) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path), "cuda"), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    for strategy in STRATEGIES:
        for train_size in TRAIN_SIZES:
            alone = _train(strategy, train_size, "cuda:0")
            for rank in ranks:
                found = rank[f"{strategy}/{train_size}"]
                for name, value in alone["state"].items():
                    # cuBLAS sums in other orders on other shapes: a looser tolerance than the CPU's
                    torch.testing.assert_close(found["state"][name], value, rtol=1e-4, atol=1e-5)
                assert found["test"] == pytest.approx(alone["test"], abs=2 / 101)


@pytest.mark.slow
def test_a_diverging_trial_stops_at_the_same_step_on_every_rank(
    two_ranks: list[dict[str, Any]],
) -> None:
    alone = _train("mk", 195, lr=1e30)
    assert alone["diverged_at"] is not None and alone["epochs"] < 3
    for rank in two_ranks:
        found = rank["diverging"]
        assert (found["diverged_at"], found["epochs"]) == (alone["diverged_at"], alone["epochs"])


@pytest.mark.slow
def test_collapse_sees_through_ddp_and_fsdp_is_refused(two_ranks: list[dict[str, Any]]) -> None:
    checks = two_ranks[0]["checks"]
    assert checks["wrapped"] == "RankParallel"
    assert checks["collapse_equal"] and checks["collapse_type"] == "Sequential"
    for what in ("expand", "collapse", "wrap"):
        assert "FSDP is not supported" in checks[what], (what, checks[what])
    assert "cannot train data-parallel" in checks["swapping"]
    assert "Batch size 63 does not split evenly over 2 processes" in checks["batch 63"]


_AUDIT = """
import os, sys
_out = os.path.realpath(os.environ["SOPKIT_TEST_OUT"])
_log = os.environ["SOPKIT_TEST_AUDIT"] + "." + os.environ.get("RANK", "x")

def _under(path):
    try:
        return os.path.realpath(os.fsdecode(path)).startswith(_out)
    except (TypeError, ValueError):
        return False

def _hook(event, args):
    written = (
        (event == "open" and args[1] is not None and any(c in str(args[1]) for c in "wax+"))
        or (event == "open" and isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR))
        or event in ("os.mkdir", "os.rename", "os.remove", "sqlite3.connect")
    )
    if written and args and _under(args[0]):
        with open(_log, "a") as log:
            log.write(f"{event} {os.fsdecode(args[0])}\\n")

sys.addaudithook(_hook)
"""


@pytest.mark.slow
def test_torchrun_compare_trains_on_two_ranks_and_only_rank_0_writes(tmp_path: Path) -> None:
    out, audit = tmp_path / "out", tmp_path / "audit"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(_AUDIT))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "SOPKIT_TEST_OUT": str(out),
        "SOPKIT_TEST_AUDIT": str(audit),
        "OMP_NUM_THREADS": "1",
    }
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun), "--nproc-per-node", "2", "--master-port", str(_free_port()),
        "-m", "sopkit", "compare", "--dataset", "digits", "--model", "mlp-a1",
        "--strategies", "baseline,mk", "--seeds", "1", "--epochs", "1", "--batch-size", "128",
        "--device", "cpu", "--out", str(out),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    with sqlite3.connect(out / "results.sqlite") as db:
        assert db.execute("select count(*) from trials").fetchone()[0] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert "torchrun --nproc-per-node 2 -m sopkit compare" in json.dumps(summary)
    written_by_0 = Path(f"{audit}.0").read_text()
    assert "results.sqlite" in written_by_0 and "report.md" in written_by_0  # the audit sees writes
    assert not Path(f"{audit}.1").exists(), Path(f"{audit}.1").read_text()


def test_bench_under_torchrun_is_refused() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    result = CliRunner().invoke(app, ["bench", "--device", "cpu"], env=env)
    assert result.exit_code == 2 and "run it without torchrun" in result.output, result.output


def test_torchrun_environment_is_read_whole_or_refused() -> None:
    assert torchrun_ranks({}) is None
    assert torchrun_ranks({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}) is None
    ranks = torchrun_ranks(
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    )
    assert ranks is not None and (ranks.rank, ranks.world, ranks.writer) == (3, 4, False)
    assert ranks.launcher() == "torchrun --nnodes 2 --nproc-per-node 2 -m"
    with pytest.raises(UserError, match="LOCAL_RANK not set"):
        torchrun_ranks({"RANK": "0", "WORLD_SIZE": "2"})
    for bad in ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
                {"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
                {"RANK": "0", "WORLD_SIZE": str(2**64), "LOCAL_RANK": "-1"}):
        with pytest.raises(UserError, match="torchrun's environment"):
            torchrun_ranks(bad)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--jobs", "2", "--device", "cpu"], "--jobs 2 under torchrun"),
        (["--device", "cuda:0"], "--device cuda:0 names one GPU"),
    ],
)
def test_what_torchrun_cannot_do_is_refused_before_anything_starts(
    tmp_path: Path, options: list[str], message: str
) -> None:
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    result = CliRunner().invoke(
        app, ["compare", "--dataset", "digits", *options, "--out", str(tmp_path / "out")], env=env
    )
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not dist.is_initialized() and not (tmp_path / "out").exists()


def test_rank_shares_of_a_seeded_order_are_strided_slices_of_one_process_order() -> None:
    whole = list(SeededOrder(11, shuffle=True, generator=torch.Generator().manual_seed(4),
                             seeded=True))
    shares = [
        list(SeededOrder(11, shuffle=True, generator=torch.Generator().manual_seed(4),
                         seeded=True, rank=rank, world=3))
        for rank in range(3)
    ]
    assert shares == [whole[rank::3] for rank in range(3)]
    assert [len(SeededOrder(11, shuffle=True, generator=None, seeded=False, rank=r, world=3))
            for r in range(3)] == [4, 4, 3]
    with pytest.raises(ValueError, match="rank must be in"):
        SeededOrder(3, shuffle=False, generator=None, seeded=False, rank=2, world=2)


@pytest.mark.parametrize("kind", ["tensor", "loader"])
def test_rank_batches_cover_each_batch_once_with_weights_that_make_its_mean(kind: str) -> None:
    # 17 examples in batches of 8 over two ranks: 8, 8 and a last batch of 1, which rank 1 lacks.
    x, y = torch.arange(17, dtype=torch.float32).unsqueeze(1), torch.arange(17)
    split: Any = TensorSplit(x, y)
    if kind == "loader":
        split = LoaderSplit(TensorDataset(x, y), num_workers=0)
    take = _tensor_shares if kind == "tensor" else _loader_shares
    whole = [t for _, t in split.batches(8, shuffle=True, generator=torch.Generator().manual_seed(2))]
    ranks = [
        list(take(split, Ranks(rank, 2), 8, torch.Generator().manual_seed(2), None))
        for rank in range(2)
    ]
    assert [len(steps) for steps in ranks] == [3, 3]  # every rank takes every step
    for step, batch in enumerate(whole):
        labels = [ranks[rank][step][1] for rank in range(2)]
        fractions = [ranks[rank][step][2].fraction for rank in range(2)]
        if step < 2:
            assert [t.tolist() for t in labels] == [batch[0::2].tolist(), batch[1::2].tolist()]
            assert fractions == [0.5, 0.5]
        else:  # rank 1 steps on one example at weight 0: only rank 0's example counts
            assert labels[0].tolist() == batch.tolist() and fractions == [1.0, 0.0]
            assert ranks[1][step][2].scaled(torch.tensor(3.0)).item() == 0.0
    assert ranks[0][2][2].scaled(torch.tensor(3.0)).item() == 6.0  # = 2 ranks x the whole mean


def test_a_loader_share_loads_the_strided_share_of_each_batch() -> None:
    x = torch.arange(23, dtype=torch.float32).unsqueeze(1)
    split = LoaderSplit(TensorDataset(x, torch.arange(23)), num_workers=0)
    whole = [y for _, y in split.batches(8, shuffle=True, generator=torch.Generator().manual_seed(1))]
    for rank in range(2):
        share = split.shard(rank, 2)
        assert split.shard(rank, 2) is share  # kept: its workers persist between epochs
        mine = [y for _, y in share.batches(4, shuffle=True,
                                            generator=torch.Generator().manual_seed(1))]
        assert [y.tolist() for y in mine] == [y[rank::2].tolist() for y in whole]
