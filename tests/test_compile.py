"""Compiled models: ``torch.compile`` of an expanded model, ``compare --compile`` and ``bench --compile``.

The mixing of an expanded model runs outside the compiled graph (``sopkit.mk.graph``); the tests pin
that the compiled model draws the same ``p`` from the same stream and gives every copy the
gradient eager mode gives, that ``fullgraph=True`` fails with sopkit's message, and that the loop
compiles every strategy's model with the same result on every run. Compiling costs seconds per
graph on the CPU, so the models are tiny and the compiling tests are marked slow.
"""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
import typer.main
from torch import nn

import sopkit
from sopkit import torch_private
from sopkit.bench.compiled import describe_compiled, with_compiled
from sopkit.bench.config import BenchConfig, command_line
from sopkit.bench.results import EntryResult
from sopkit.checks import default_of
from sopkit.cli import app
from sopkit.data import DataSplits, TensorSplit
from sopkit.errors import UserError
from sopkit.experiment.plan import build_plan
from sopkit.experiment.records import TrialSpec
from sopkit.mk import collapse, compiled, expand, find_majority, graph, is_expanded
from sopkit.mk.graph import FULLGRAPH_MESSAGE, uncompiled
from sopkit.registry import create_strategy
from sopkit.training.compiling import compile_prepared
from sopkit.training.config import TrainConfig
from sopkit.training.settings import StrategySettings


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _tiny_data() -> DataSplits:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(96, 6, generator=generator)
    y = (x @ torch.randn(6, 3, generator=generator)).argmax(dim=1)
    train, held_out = TensorSplit(x[:64], y[:64]), TensorSplit(x[64:], y[64:])
    return DataSplits("tiny", (6,), 3, train, held_out, held_out)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["sfc64", "compiled"])
def test_a_compiled_expanded_model_gives_every_copy_the_eager_gradient(sampler):
    if sampler == "compiled" and not compiled.available(3):  # not at collection: it compiles
        pytest.skip("the 'compiled' sampler needs torch.compile with a C++ compiler")
    torch.manual_seed(0)
    base = _mlp()
    eager, inner = expand(base, 3, seed=5), expand(base, 3, seed=5)
    for model in (eager, inner):
        find_majority(model).sampler = sampler  # type: ignore[union-attr]
    model = torch.compile(inner)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (eager, inner)]
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(2))
    y = torch.arange(10) % 3
    for _ in range(3):  # the copies move between steps, so each step's gradient is a new one
        grads = []
        for net, optimizer in zip((eager, model), optimizers, strict=True):
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            grads.append({name: p.grad.clone() for name, p in uncompiled(net).named_parameters()})
            optimizer.step()
        assert grads[0].keys() == grads[1].keys()
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
        assert grads[0]["sopkit_copies"].abs().sum() > 0
    # The same draws: both streams advanced once per training forward.
    assert find_majority(model).stream.step == find_majority(eager).stream.step == 3  # type: ignore[union-attr]
    eager.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=1e-5, atol=1e-6)
    # collapse sees through the wrapper torch.compile returned, and gives an eager module.
    shipped, reference = collapse(model), collapse(eager)
    assert type(shipped) is nn.Sequential and shipped._compiled_call_impl is None
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(shipped.state_dict()[key], value, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_fullgraph_compilation_of_an_expanded_model_says_why_it_cannot_work():
    model = torch.compile(expand(_mlp(), 3, seed=1), fullgraph=True)
    with pytest.raises(Exception, match=r"fullgraph=True\) cannot compile it") as caught:
        model(torch.randn(4, 6))
    assert FULLGRAPH_MESSAGE in str(caught.value)


@pytest.mark.slow
def test_expand_refuses_what_torch_compile_returned():
    with pytest.raises(UserError, match="expand the model first, then compile"):
        expand(torch.compile(_mlp()), 3)


def _train(name: str, *, compile_models: bool, epochs: int = 1) -> sopkit.TrainResult:
    session = sopkit.TrainingSession(
        _tiny_data(),
        _mlp,
        sopkit.TrainConfig(epochs=epochs, batch_size=16, compile=compile_models),
        device=torch.device("cpu"),
        seed=3,
    )
    return session.train(create_strategy(name, StrategySettings(expansion=3)))


def _same(a: sopkit.TrainResult, b: sopkit.TrainResult) -> bool:
    assert a.model is not None and b.model is not None
    states = a.model.state_dict(), b.model.state_dict()
    return (
        all(torch.equal(states[0][key], states[1][key]) for key in states[0])
        and [r.train_loss for r in a.curve] == [r.train_loss for r in b.curve]
        and a.test_accuracy == b.test_accuracy
    )


@pytest.mark.slow
def test_compare_compile_trains_mk_as_eager_does_and_equally_on_every_run():
    first = _train("mk", compile_models=True)
    again = _train("mk", compile_models=True)  # after a reset: compiled from scratch again
    assert _same(first, again)
    eager = _train("mk", compile_models=False)
    assert first.model is not None and eager.model is not None
    for key, value in eager.model.state_dict().items():
        torch.testing.assert_close(first.model.state_dict()[key], value, rtol=1e-4, atol=1e-6)
    assert first.extra["mk_sampler"] == eager.extra["mk_sampler"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["baseline", "adv-mk"])
def test_compare_compile_runs_the_other_strategies_compiled(name):
    result = _train(name, compile_models=True)
    assert result.diverged_at_step is None and len(result.curve) == 1
    assert result.model is not None and not is_expanded(result.model)
    eager = _train(name, compile_models=False)
    assert eager.model is not None
    for key, value in eager.model.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[key], value, rtol=1e-4, atol=1e-6)


def test_compile_is_part_of_a_trial_only_when_asked_for():
    plain, compiled_plan = build_plan(dataset="digits"), build_plan(dataset="digits", compile_models=True)
    assert plain.train_config("adam", None).compile is False
    assert compiled_plan.train_config("adam", None).compile is True

    def key(train: dict) -> str:
        return str(TrialSpec("digits", "mlp-a1", "adam", "mk", 0, 0.001, train, 3, {}).identity())

    eager = asdict(plain.train_config("adam", 0.001))
    without = {k: v for k, v in eager.items() if k != "compile"}
    assert key(eager) == key(without)  # trials stored before --compile existed keep their keys
    assert key(asdict(compiled_plan.train_config("adam", 0.001))) != key(eager)


def test_the_compile_flags_default_to_the_configs_and_are_listed():
    command = typer.main.get_command(app)
    for name, config in (("compare", TrainConfig), ("bench", BenchConfig)):
        flag = next(p for p in command.commands[name].params if "--compile" in p.opts)
        assert flag.default is default_of(config, "compile") is False
        assert "--no-compile" not in flag.opts
    assert "--compile" in command_line(BenchConfig(compile=True))
    assert "--compile" not in command_line(BenchConfig())


def test_compile_without_a_cxx_compiler_is_refused_before_training(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    monkeypatch.setenv("CXX", "")
    compiled._compiler_found.cache_clear()
    try:
        with pytest.raises(UserError, match="--compile on the CPU needs a C.. compiler"):
            compile_prepared(_mlp(), TrainConfig(compile=True), torch.device("cpu"))
        model = _mlp()
        assert compile_prepared(model, TrainConfig(), torch.device("cpu")) is model
        assert model._compiled_call_impl is None  # without --compile nothing is compiled
    finally:
        monkeypatch.undo()
        compiled._compiler_found.cache_clear()


def test_bench_puts_each_compiled_row_after_its_eager_row_and_compares_the_two():
    results = {
        "baseline": EntryResult("baseline", True, step_ms=[10.0, 12.0], cpu_ms=[8.0, 8.0]),
        "baseline (compiled)": EntryResult(
            "baseline (compiled)", True, note="torch.compile", step_ms=[5.0, 6.0], cpu_ms=[4.0, 6.0]
        ),
        "mk": EntryResult("mk", True, step_ms=[20.0, 20.0], cpu_ms=[16.0, 16.0]),
        "distill": EntryResult("distill", False, note="not timed"),
    }
    assert with_compiled(["baseline", "mk", "distill"], results) == [
        "baseline", "baseline (compiled)", "mk", "distill",
    ]
    describe_compiled(results)
    assert results["baseline (compiled)"].note == (
        "torch.compile; 0.50x eager baseline's step (0.62x its CPU time)"
    )
    assert results["mk"].note == ""  # no compiled row, nothing said


@pytest.mark.slow
def test_without_dynamo_internals_torch_compile_output_is_not_seen_through(monkeypatch):
    model = torch.compile(expand(_mlp(), 3, seed=1))  # lazy: nothing is compiled here
    assert find_majority(model) is not None
    monkeypatch.setenv(torch_private.ENV_OFF, "dynamo")
    assert find_majority(model) is None and uncompiled(model) is model
    with pytest.raises(UserError):  # it says the model is not expanded
        collapse(model)
    assert collapse(model._orig_mod) is not None  # the module that was compiled still collapses


@pytest.mark.slow
def test_without_dynamo_internals_an_expanded_model_still_compiles_to_eager_gradients(monkeypatch):
    monkeypatch.setattr(graph, "_GRAPH_BREAK_ALLOWED", False)  # as SOPKIT_TORCH_PRIVATE_OFF=dynamo
    torch.manual_seed(0)
    base = _mlp()
    eager, inner = expand(base, 3, seed=7), expand(base, 3, seed=7)
    model = torch.compile(inner)
    x, y = torch.randn(10, 6, generator=torch.Generator().manual_seed(3)), torch.arange(10) % 3
    for net in (eager, model):
        F.cross_entropy(net(x), y).backward()
    assert inner.sopkit_copies.grad is not None
    torch.testing.assert_close(inner.sopkit_copies.grad, eager.sopkit_copies.grad, rtol=1e-5, atol=1e-7)
