"""``sopkit export DIR``: the model a user would ship from a finished comparison, as files.

Which model: the comparison's protocol chose a learning rate per strategy on validation accuracy
(:mod:`sopkit.experiment.results`); the export takes, of one strategy (``mk`` unless named, or the
first), the trial at that rate with the seed the user names, or else the best validation seed. It
writes that trial's saved model as

- ``model.safetensors``: the weights, byte for byte as the trial saved them;
- ``model.pt2``: a ``torch.export`` program (``torch.export.load(path).module()``), batch size free;
- ``model.onnx``: the same program in ONNX (needs the ``export`` extra: onnx, onnxscript,
  onnxruntime), checked in onnxruntime against PyTorch's outputs before it is kept;
- ``model.json``: the trial's sidecar, plus what was chosen and how.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sopkit.deploy.layout import json_safe, read_meta, saved_keys, weights_path
from sopkit.errors import UserError
from sopkit.files import write_atomic

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sopkit.experiment.records import TrialRecord
    from sopkit.experiment.results import Group

__all__ = ["ExportChoice", "Exported", "choose_trial", "export_trained"]

DEFAULT_STRATEGY = "mk"
EXPORT_DIR = "export"
EXTRA_HINT = "pip install 'sopkit[export]'"
ONNX_TOLERANCE = 1e-5  # float32 outputs of onnxruntime against PyTorch's, absolute
_EXAMPLE_BATCH = 2  # torch.export treats a batch of 1 as a constant: 2 keeps the batch size free


@dataclass(frozen=True)
class ExportChoice:
    """The trial an export takes, and why: its group, strategy, chosen rate and seed."""

    record: TrialRecord
    group: Group
    chosen_lr: float
    seeds: tuple[int, ...]  # the strategy's seeds at the chosen rate
    seed_was_given: bool

    def describe(self) -> str:
        spec = self.record.spec
        how = "as asked" if self.seed_was_given else "the best validation accuracy of seeds " + (
            ", ".join(map(str, self.seeds))
        )
        return (
            f"{self.group.title}: strategy {spec.strategy} at its chosen learning rate "
            f"{self.chosen_lr:g}, seed {spec.seed} ({how}); trial {self.record.key}, test accuracy "
            f"{_percent(self.record.test_accuracy)}, validation {_percent(self.record.val_accuracy)}"
        )


@dataclass
class Exported:
    """What ``sopkit export`` wrote, and from which trial."""

    choice: ExportChoice
    paths: list[Path] = field(default_factory=list)
    onnx_max_difference: float | None = None  # largest |onnxruntime - torch| on the check input

    def summary(self) -> str:
        """What was exported and where, for the terminal."""
        lines = [self.choice.describe(), "Wrote: " + ", ".join(str(p) for p in self.paths)]
        if self.onnx_max_difference is not None:
            lines.append(
                "model.onnx checked in onnxruntime: outputs within "
                f"{self.onnx_max_difference:.2g} of PyTorch's (tolerance {ONNX_TOLERANCE:g})."
            )
        return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.2f}%"


def _group_identity(record: TrialRecord) -> str:
    """What groups trials in a report (``results.aggregate``): everything but strategy, seed and
    rate. The same identity the trial key hashes, so old and new trials of a plan group together."""
    identity = record.spec.identity(strict=False)
    for name in ("strategy", "seed", "lr"):
        identity.pop(name, None)
    identity["train"].pop("lr", None)
    return json.dumps(identity, sort_keys=True, default=str)


def _groups(
    trials: Sequence[TrialRecord], strategies: Sequence[str]
) -> list[tuple[Group, list[TrialRecord]]]:
    from sopkit.experiment.results import aggregate

    buckets: dict[str, list[TrialRecord]] = {}
    for record in trials:
        buckets.setdefault(_group_identity(record), []).append(record)
    return [(aggregate(bucket, strategies)[0], bucket) for bucket in buckets.values()]


def _one_group(
    groups: list[tuple[Group, list[TrialRecord]]], model: str | None, optimizer: str | None
) -> tuple[Group, list[TrialRecord]]:
    for option, value, attribute in (("--model", model, "model"), ("--optimizer", optimizer,
                                                                     "optimizer")):
        if value is None:
            continue
        there = sorted({getattr(group, attribute) for group, _ in groups})
        groups = [item for item in groups if getattr(item[0], attribute) == value]
        if not groups:
            raise UserError(f"{option} {value!r}: the comparison has {', '.join(there)}.")
    if len(groups) > 1:
        titles = "; ".join(group.title for group, _ in groups)
        raise UserError(
            f"The comparison holds {len(groups)} groups of trials ({titles}): name one with "
            "--model and --optimizer."
            + ("" if len({g.title for g, _ in groups}) == len(groups) else
               " Some share a title: they differ in other settings (epochs, options); export "
               "from a directory holding one comparison.")
        )
    return groups[0]


def choose_trial(
    trials: Sequence[TrialRecord],
    plan: Mapping[str, Any],
    *,
    strategy: str | None = None,
    seed: int | None = None,
    model: str | None = None,
    optimizer: str | None = None,
) -> ExportChoice:
    """The trial ``sopkit export`` takes from a comparison's stored ``trials`` (see the module's
    docstring); the latest ``plan``'s trials when it names any, else all of them."""
    planned = set(plan.get("trial_keys") or ())
    if planned and any(t.key in planned for t in trials):
        trials = [t for t in trials if t.key in planned]
    trials = [t for t in trials if not t.failed]  # a failed trial has no model
    if not trials:
        raise UserError("The comparison has no finished trial yet: nothing to export.")
    group, records = _one_group(_groups(trials, plan.get("strategies") or ()), model, optimizer)
    names = [s.strategy for s in group.strategies]
    name = strategy if strategy is not None else (
        DEFAULT_STRATEGY if DEFAULT_STRATEGY in names else names[0]
    )
    if name not in names:
        raise UserError(f"--strategy {name!r}: {group.title} has {', '.join(names)}.")
    summary = next(s for s in group.strategies if s.strategy == name)
    if summary.chosen_lr is None:
        raise UserError(
            f"No learning rate of {name} was chosen in {group.title} (every one diverged or "
            "failed): there is no model to ship."
        )
    at_rate = sorted(
        (
            r for r in records
            if r.spec.strategy == name and r.spec.lr == summary.chosen_lr and not r.failed
        ),
        key=lambda r: r.spec.seed,
    )
    seeds = tuple(r.spec.seed for r in at_rate)
    if seed is not None:
        chosen = next((r for r in at_rate if r.spec.seed == seed), None)
        if chosen is None:
            raise UserError(
                f"--seed {seed}: {name} has seeds {', '.join(map(str, seeds))} at its chosen "
                f"learning rate {summary.chosen_lr:g}."
            )
    else:  # the best validation accuracy; a tie goes to the smallest seed
        chosen = max(at_rate, key=lambda r: (_score(r.val_accuracy), -r.spec.seed))
    return ExportChoice(chosen, group, summary.chosen_lr, seeds, seed is not None)


def _score(value: float | None) -> float:
    return -math.inf if value is None or not math.isfinite(value) else value


def _example(meta: Mapping[str, Any]) -> torch.Tensor:
    """An input batch of the model's shape and dtype, to trace and to check the ONNX file with."""
    import torch

    shape = (_EXAMPLE_BATCH, *(int(n) for n in meta["input_shape"]))
    dtype = getattr(torch, str(meta.get("input_dtype", "float32")), torch.float32)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    return torch.zeros(shape, dtype=dtype)


def _program(module: nn.Module, example: torch.Tensor, name: str) -> Any:
    """``module`` traced by ``torch.export`` with a free batch size."""
    import torch

    batch = torch.export.Dim("batch", min=1)
    try:
        return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    except Exception as error:  # a user's model torch.export cannot trace: say which, keep the rest
        raise UserError(
            f"torch.export could not trace {name} ({type(error).__name__}: {error}); the "
            "safetensors file is written."
        ) from None


def _onnx(program: Any, example: torch.Tensor, module: nn.Module, path: Path) -> float:
    """Write ``program`` as ONNX to ``path`` after checking it in onnxruntime against ``module``;
    returns the largest absolute difference of their outputs."""
    import numpy as np
    import torch

    try:
        import onnx  # noqa: F401  (torch.onnx needs both, and onnxruntime checks the result)
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise UserError(
            f"model.safetensors and model.pt2 are written in {path.parent}; the ONNX file needs "
            f"the export extra ({error.name or error} is missing): {EXTRA_HINT}."
        ) from None
    onnx_program = torch.onnx.export(
        program, (example,), dynamo=True, input_names=["input"], output_names=["logits"],
        external_data=False, verbose=False,  # not its progress lines on the user's terminal
    )
    assert onnx_program is not None, "the dynamo exporter returns the program"
    data = onnx_program.model_proto.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = module(example).numpy()
    got = session.run(None, {"input": example.numpy()})[0]
    difference = float(np.max(np.abs(got - expected))) if expected.size else 0.0
    if not np.allclose(got, expected, rtol=0.0, atol=ONNX_TOLERANCE):
        raise UserError(
            f"The ONNX export differs from PyTorch by up to {difference:.3g} (more than "
            f"{ONNX_TOLERANCE:g}) on a check input: not written. model.safetensors and model.pt2 "
            f"are in {path.parent}."
        )
    write_atomic(path, data)
    return difference


def _out_dir(directory: Path, out: Path | str | None) -> Path:
    target = Path(out) if out is not None else directory / EXPORT_DIR
    if target.exists() and not target.is_dir():
        raise UserError(f"--out {target} is a file; the export writes a directory of files.")
    return target


def export_trained(
    directory: Path | str,
    *,
    out: Path | str | None = None,
    strategy: str | None = None,
    seed: int | None = None,
    model: str | None = None,
    optimizer: str | None = None,
) -> Exported:
    """Export the model to ship from the comparison in ``directory`` (see the module's docstring)
    into ``out`` (default ``directory/export``)."""
    from sopkit.experiment.store import TrialStore

    directory = Path(directory)
    with TrialStore.open_existing(directory) as store:
        plan = store.read_plan() or {}
        trials = store.trials()
    target = _out_dir(directory, out)
    if not saved_keys(directory):
        raise UserError(
            f"No models were saved in {directory}: the comparison ran with --no-save-models (or "
            "with a sopkit that did not save them). Run it again with --save-models into a new "
            "--out to train and keep them."
        )
    choice = choose_trial(
        trials, plan, strategy=strategy, seed=seed, model=model, optimizer=optimizer
    )
    return _write(directory, target, choice)


def _write(directory: Path, target: Path, choice: ExportChoice) -> Exported:
    import torch

    from sopkit.deploy.artifacts import load_trained

    key = choice.record.key
    meta = read_meta(directory, key)
    module = load_trained(directory, key)  # checks the weights file against the sidecar
    exported = Exported(choice)
    sidecar = {
        **meta,
        "exported": {
            "from": str(directory),
            "chosen_lr": choice.chosen_lr,
            "seeds_at_chosen_lr": list(choice.seeds),
            "seed_chosen_by": "user" if choice.seed_was_given else "best validation accuracy",
            "files": ["model.safetensors", "model.pt2", "model.onnx"],
        },
    }
    try:
        # An earlier export's program files must not sit beside this model's weights if this
        # export stops before writing its own (no export extra, a model torch.export cannot trace).
        for stale in ("model.pt2", "model.onnx"):
            (target / stale).unlink(missing_ok=True)
        weights = weights_path(directory, key).read_bytes()
        if hashlib.sha256(weights).hexdigest() != meta["sha256"]:
            raise UserError(f"{weights_path(directory, key)} changed while it was exported.")
        exported.paths.append(write_atomic(target / "model.safetensors", weights))
        exported.paths.append(write_atomic(
            target / "model.json", json.dumps(json_safe(sidecar), indent=2, sort_keys=True) + "\n"
        ))
        example = _example(meta)
        program = _program(module, example, f"{meta['model']} ({meta['strategy']})")
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        exported.paths.append(write_atomic(target / "model.pt2", buffer.getvalue()))
        exported.onnx_max_difference = _onnx(program, example, module, target / "model.onnx")
        exported.paths.append(target / "model.onnx")
    except OSError as error:
        raise UserError(f"Cannot write the export into {target}: {error}.") from None
    return exported
