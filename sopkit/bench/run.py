"""``sopkit bench``: what one training step of each strategy costs against the baseline's.

Everything runs in one process, on one model, one batch size and one device, with synthetic data
(random inputs of the requested shape and random labels: step time does not depend on the values).
Each strategy is set up by the loop's own machinery (``TrainingState.start``: ``prepare``,
``make_optimizer``, ``make_schedule``) and stepped by the loop's own step (``TrainingState.step``:
the hooks in the loop's order, backward, optimizer, schedule, timing and divergence bookkeeping),
so a ratio here is the ratio a real training pays per step.

How it is measured, and why:

* **Warm-up** steps first (allocator, lazy initialisation, caches), excluded.
* **Interleaved rounds**: every round times ``steps`` consecutive steps of every strategy in turn,
  in an order rotated from round to round. Other processes loading the machine then slow all
  strategies of a round alike, instead of whichever strategy happened to run during the load.
* **Paired ratios**: a strategy's ratio in a round is its median step time over the baseline's in
  the same round; the reported ratio is the median over rounds, with the interquartile range.
* **CUDA**: each round's steps are bracketed by ``torch.cuda.synchronize()``, so queued kernels are
  counted in the round that launched them.
* **Memory**, measured strategy by strategy before timing: on CUDA the peak of
  ``torch.cuda.max_memory_allocated`` over the warm-up steps above what was allocated before the
  strategy was built. On every device: the bytes of parameters + gradients + optimizer state
  ("state"), and the bytes of tensors autograd keeps between forward and backward, parameters not
  counted ("saved"), recorded by a ``saved_tensors_hooks`` during one step. On the CPU torch has
  no allocator statistics, so there is no peak column there (tracemalloc does not see torch).

It also times sopkit's loop against a minimal hand-written loop
(``zero_grad; loss = cross_entropy(model(x), y); backward; step``) on the same model and batches,
once with sopkit's optimizer (the same kernels: what is left is the loop itself) and once with
``torch.optim`` defaults (what a user writing the loop by hand would get).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from sopkit.bench.compiled import (
    compiled_entry,
    compiled_name,
    describe_compiled,
    with_compiled,
)
from sopkit.bench.config import BenchConfig, out_of_memory_is_user_error
from sopkit.bench.entries import (
    Batch,
    Entry,
    ProbeSession,
    plain_entry,
    single_step_note,
    strategy_entry,
    synchronize,
    synthetic_data,
    warm_up_and_measure_memory,
)
from sopkit.bench.results import BASELINE, PLAIN, PLAIN_DEFAULTS, BenchReport, EntryResult
from sopkit.errors import UserError
from sopkit.training.config import TrainConfig
from sopkit.training.device import select_device
from sopkit.training.hooks_guard import PluginError, plugin_failure
from sopkit.training.strategy import Strategy


def time_rounds(
    entries: list[Entry],
    device: torch.device,
    batches: list[Batch],
    repeats: int,
    steps: int,
    on_round: Callable[[int, int], None] | None = None,
) -> int:
    """Interleaved rounds; each entry's round value is its median step time in that round (CPU) or
    its mean over the synchronised round (CUDA, where per-step host times mean nothing).

    The process CPU time per step is recorded too: on a CPU shared with other processes it is
    the steadier number (time spent waiting for a core is not in it), though threads that
    spin-wait for work count in it. ``on_round(done, repeats)`` is called as timing starts
    (``done = 0``) and after every round.

    Returns how many rounds were timed: an interrupt (Ctrl-C) after the first round keeps the
    rounds that finished, for every entry alike, and drops the one in progress; before it, the
    interrupt propagates (nothing was measured).
    """
    cuda = device.type == "cuda"
    done = 0
    if on_round is not None:
        on_round(done, repeats)
    try:
        for round_index in range(repeats):
            shift = round_index % len(entries)
            for entry in entries[shift:] + entries[:shift]:  # every entry gets every position
                times: list[float] = []
                synchronize(device)
                round_start, cpu_start = time.perf_counter(), time.process_time()
                try:
                    for i in range(steps):
                        started = time.perf_counter()
                        entry.step(*batches[i % len(batches)])
                        times.append(time.perf_counter() - started)
                except PluginError as error:  # a plugin failing after its warm-up: a row, and
                    _drop(entry, entries, error)  # the other entries are timed on
                    continue
                if cuda:
                    synchronize(device)
                    value = (time.perf_counter() - round_start) / steps
                else:
                    value = statistics.median(times)
                entry.result.step_ms.append(value * 1e3)
                entry.result.cpu_ms.append((time.process_time() - cpu_start) / steps * 1e3)
            done += 1
            if on_round is not None:
                on_round(done, repeats)
    except KeyboardInterrupt:
        if done == 0:
            raise
        for entry in entries:  # the unfinished round was timed for some entries only
            del entry.result.step_ms[done:]
            del entry.result.cpu_ms[done:]
    return done


def _drop(entry: Entry, entries: list[Entry], error: PluginError) -> None:
    """Stop timing ``entry`` (its plugin failed during the rounds): it leaves ``entries`` (the
    list being timed) and becomes an untimed row saying why."""
    entries.remove(entry)
    entry.result.measured = False
    entry.result.step_ms.clear()
    entry.result.cpu_ms.clear()
    entry.result.note = f"not timed: {error}"


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    from sopkit.experiment.provenance import cpu_model

    threads = torch.get_num_threads()
    count = f"{threads} thread{'s' if threads != 1 else ''}"
    return f"{device} ({cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, {count})"


# ------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------


def run_bench(
    config: BenchConfig,
    log: Callable[[str], None] | None = None,
    on_round: Callable[[int, int], None] | None = None,
) -> BenchReport:
    """Set up every strategy, warm up, time interleaved rounds, and return the report.

    ``log`` receives what is being set up; ``on_round(done, total)`` is called as timing starts
    and after each timing round. Ctrl-C during the rounds ends them early: the report covers the
    rounds that finished (and says so); before the first round finishes, it propagates.
    """
    from sopkit.experiment.provenance import provenance
    from sopkit.models.checks import check_model_fits
    from sopkit.models.registry import build_model
    from sopkit.registry import check_options, create_strategy, discover
    from sopkit.training.settings import StrategySettings

    say = log or (lambda message: None)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = select_device(config.device)
    if config.bf16 and device.type != "cuda":
        raise UserError("--bf16 autocast is only supported on CUDA devices.")
    train_config = TrainConfig(
        epochs=1,
        batch_size=config.batch_size,
        optimizer=config.optimizer,
        bf16=config.bf16,
        warmup_steps=0,
    )

    def build() -> nn.Module:
        return build_model(
            config.model, input_shape=config.input_shape, num_classes=config.num_classes
        )

    # An unknown model, an input shape it cannot take, layers that do not fit the data or a model
    # too big for the memory fail here, before anything runs.
    with out_of_memory_is_user_error(f"model {config.model} ({config.num_classes} classes)"):
        check_model_fits(config.model, build(), config.input_shape, config.num_classes, device)

    # The requested strategies (an unknown name is the user's mistake), else every registered one
    # that loads (a broken plugin becomes a row with its error). The baseline is always measured.
    settings = StrategySettings(expansion=config.expansion, options=dict(config.options))
    requested = list(dict.fromkeys(config.strategies))
    names = list(dict.fromkeys([BASELINE, *(requested or discover())]))
    strategies: dict[str, Strategy] = {}
    results: dict[str, EntryResult] = {}
    for name in names:
        try:
            strategies[name] = create_strategy(name, settings)
        except UserError as error:
            if name in requested or name == BASELINE:
                raise
            results[name] = EntryResult(name, measured=False, note=f"not timed: {error}")
    check_options(settings, [name for name in requested if name in strategies])

    with out_of_memory_is_user_error(f"the synthetic data (4 batches of {config.batch_size})"):
        data, batches = synthetic_data(config, device)
    probe = ProbeSession(data, build, train_config, device=device, seed=config.seed)
    entries: list[Entry] = []
    for name, strategy in strategies.items():
        try:
            note = single_step_note(strategy, probe)
            if note is None:
                say(f"setting up and warming up {name}")
                entry = strategy_entry(name, strategy, config, train_config, device, data, build)
                warm_up_and_measure_memory(entry, device, batches, config.warmup)
        except Exception as error:  # a plugin that fails is a row, unless it was asked for
            failure = plugin_failure(strategy, error, "set-up")
            if failure is None or name in requested:
                raise
            results[name] = EntryResult(name, measured=False, note=f"not timed: {failure}")
            continue
        if note is not None:
            results[name] = EntryResult(name, measured=False, note=note)
            continue
        entries.append(entry)
        results[name] = entry.result
        if config.compile:  # --compile: the same strategy compiled by the loop, a row of its own
            say(f"setting up, compiling and warming up {compiled_name(name)}")
            entries.append(
                compiled_entry(name, strategy, config, train_config, device, data, build, batches)
            )
            results[compiled_name(name)] = entries[-1].result
    plain = [
        plain_entry(PLAIN, config, train_config, device, build, same_optimizer=True),
        plain_entry(PLAIN_DEFAULTS, config, train_config, device, build, same_optimizer=False),
    ]
    for entry in plain:
        warm_up_and_measure_memory(entry, device, batches, config.warmup)

    timed = entries + plain
    say(f"timing {len(timed)} loops: {config.repeats} interleaved rounds of {config.steps} steps")
    load_before = _load_average()
    rounds = time_rounds(timed, device, batches, config.repeats, config.steps, on_round)
    load_after = _load_average()
    baseline = results[BASELINE]
    for entry in timed:
        result = entry.result
        result.ratios = [a / b for a, b in zip(result.step_ms, baseline.step_ms, strict=True)]
    describe_compiled(results)
    if "baseline-long" in results and results["baseline-long"].measured:
        results["baseline-long"].note = "the baseline's step (it trains longer): a noise check"

    loop_baseline = EntryResult(
        "sopkit loop (baseline step)",
        measured=True,
        step_ms=list(baseline.step_ms),
        ratios=list(baseline.ratios),
        train_params=baseline.train_params,
        state_bytes=baseline.state_bytes,
        saved_bytes=baseline.saved_bytes,
        peak_bytes=baseline.peak_bytes,
    )
    report = BenchReport(
        config=config,
        device=_describe(device),
        threads=torch.get_num_threads(),
        strategies=[results[name] for name in with_compiled(names, results)],
        loop=[loop_baseline] + [e.result for e in plain],
        provenance=provenance(),
        rounds=rounds,
    )
    report.notes = _notes(report, device)
    if rounds < config.repeats:
        report.notes.insert(
            0,
            f"Interrupted: {rounds} of the {config.repeats} rounds were timed; every ratio is over "
            "those rounds.",
        )
    if load_before is not None and load_after is not None:
        report.notes.append(
            f"Load average (1 min) before/after timing: {load_before:.2f} / {load_after:.2f} on "
            f"{os.cpu_count()} CPUs; a load above the thread count means other processes competed."
        )
    return report


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def _notes(report: BenchReport, device: torch.device) -> list[str]:
    notes = [
        "Synthetic data: standard-normal inputs and uniform random labels.",
        "step ms: median wall time per step; CPU ms: process CPU time per step (all threads; "
        "steadier than wall time on a shared machine, but spin-waiting threads count in it).",
    ]
    if device.type != "cuda":
        notes.append(
            "No peak-memory column: torch keeps no allocator statistics on the CPU. 'state' is "
            "parameters + gradients + optimizer state; 'saved' is what autograd keeps for backward "
            "(parameters not counted)."
        )
    else:
        # The CUDA memory target: baseline peak + (e - 1) x (params + grads + optimizer state).
        base = report.entry(BASELINE)
        if base.peak_bytes is not None and base.state_bytes is not None:
            allowance = base.peak_bytes + (report.config.expansion - 1) * base.state_bytes
            notes.append(
                f"Memory allowance for e = {report.config.expansion}: baseline peak + (e - 1) x "
                f"baseline state = {allowance / 2**20:.1f} MiB (+5% tolerance)."
            )
    loop = 1.0 / report.entry(PLAIN).ratio if report.entry(PLAIN).ratios else math.nan
    notes.append(f"sopkit's loop / the hand-written loop with the same optimizer: {loop:.3f}x.")
    return notes
