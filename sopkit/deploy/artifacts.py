"""A trial's deployable model as a file, and back: :func:`trial_artifact` turns what a training
produced into a :class:`~sopkit.experiment.outcome.ModelArtifact` (safetensors bytes and a sidecar),
and :func:`load_trained` rebuilds the plain architecture from the sidecar and loads the weights into
it with ``strict=True``.

What is saved is what the strategy ships (``TrainResult.model``): the collapsed model for majority
kernels, the compact sub-network for subset selection, the student for distillation. Its kind says
how it is rebuilt:

- ``model``: the architecture the comparison names (``build_model(model, input_shape=...,
  num_classes=...)``), as for the baseline;
- ``ensemble``: a module whose ``members`` are each that architecture and whose output is the
  average of the members' probabilities (the ``ensemble`` strategy's); it loads as one
  :class:`AveragedEnsemble`;
- ``opaque``: anything else a plugin ships. Its weights are kept, but sopkit cannot rebuild it, and
  :func:`load_trained` says so.

The kind is not trusted from the class: before a model is called ``model`` or ``ensemble``, its
saved weights are loaded into a freshly built architecture and both are run on the same inputs,
which must give the same outputs. So a loaded model computes what the trial evaluated.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from sopkit.deploy.layout import FORMAT_VERSION, json_safe, read_meta, weights_path
from sopkit.errors import UserError
from sopkit.experiment.outcome import ModelArtifact

if TYPE_CHECKING:
    from sopkit.data import DataSplits
    from sopkit.experiment.records import TrialSpec
    from sopkit.training.types import TrainResult

__all__ = ["AveragedEnsemble", "architecture", "load_trained", "read_weights", "trial_artifact"]

KINDS = ("model", "ensemble", "opaque")
_PROBE_SIZE = 4  # inputs run through a model and its rebuilt copy: enough to tell them apart
_PROBE_SEED = 20240917


class AveragedEnsemble(nn.Module):
    """The members' predictions averaged: in probability space for classifiers,
    ``log(mean_k softmax(member_k(x)))`` (logits whose softmax is the averaged probability, so
    accuracy, cross-entropy and a distillation loss read it as any classifier's logits), and as
    plain outputs for a one-output model (a regression such as STS-B, whose softmax would be 1).

    The ``ensemble`` strategy's model is this class, so a saved ensemble loaded as it gives the
    outputs (and the accuracy) the trial measured.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [member(x) for member in self.members]
        if outputs[0].shape[-1] == 1:  # a regression: the mean prediction
            return torch.stack(outputs).mean(dim=0)
        log_probs = torch.stack([F.log_softmax(output, dim=-1) for output in outputs])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))


def architecture(meta: Mapping[str, Any]) -> nn.Module:
    """A freshly built, untrained module of the architecture a sidecar describes (kind ``model`` or
    ``ensemble``), on the CPU. Building draws initial weights from a forked random state, so the
    caller's torch random stream is left as it was."""
    from sopkit.models import build_model
    from sopkit.models.checks import refuse_code_models

    # A sidecar naming package.module:factory would import and run that module: refused under
    # SOPKIT_NO_CODE_MODELS=1, as a preset naming one is.
    refuse_code_models([str(meta["model"])])

    def build() -> nn.Module:
        return build_model(
            str(meta["model"]),
            input_shape=tuple(int(n) for n in meta["input_shape"]),
            num_classes=int(meta["num_classes"]),
        )

    with torch.random.fork_rng(devices=[]):
        if meta["kind"] == "model":
            return build()
        if meta["kind"] == "ensemble":
            return AveragedEnsemble([build() for _ in range(int(meta["members"]))])
    raise UserError(
        f"The saved model of trial {meta.get('key')} is a {meta.get('module', 'module')} that "
        f"strategy {meta.get('strategy')!r} ships, which sopkit cannot rebuild from the model "
        f"name; its weights are in models/{meta.get('key')}.safetensors of its comparison, to "
        "load into that module with safetensors.torch.load_file."
    )


def _cpu_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], bool]:
    """The state dict's dense tensors on the CPU, sharing no memory (a tied weight is stored under
    each of its names: safetensors refuses shared memory), and whether that is all of it."""
    tensors, complete = {}, True
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.is_meta:
            complete = False  # extra state, a sparse tensor: safetensors holds dense tensors only
            continue
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
    return tensors, complete


@contextlib.contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    """Every module of ``models`` in eval mode, and back in the mode it had afterwards: the model
    checked may be another result's too (an ensemble's member is the baseline's model)."""
    modes = {module: module.training for model in models for module in model.modules()}
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _device_of(model: nn.Module) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def _probe(data: DataSplits, model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """A few inputs to run through a model and its rebuilt copy: real test examples of an in-memory
    set (their dtype too: token ids stay integers), else seeded normal noise of the input shape."""
    device = _device_of(model)
    inputs = getattr(data.test, "x", None)
    if isinstance(inputs, torch.Tensor) and len(inputs):
        return inputs[:_PROBE_SIZE].to(device)
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    return torch.randn((_PROBE_SIZE, *input_shape), generator=generator).to(device)


@torch.no_grad()
def _same_function(trained: nn.Module, rebuilt: nn.Module, probe: torch.Tensor) -> bool:
    """Whether both modules give the same outputs on ``probe`` (to float rounding, NaN = NaN)."""
    with _eval_mode(trained, rebuilt):
        try:
            expected, got = trained(probe), rebuilt(probe)
        except Exception:  # the rebuilt model cannot take the input: it is not the same function
            return False
    if not (isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor)):
        return False
    if expected.shape != got.shape or expected.dtype != got.dtype:
        return False
    return torch.equal(expected, got) or torch.allclose(
        expected, got, rtol=1e-5, atol=1e-6, equal_nan=True
    )


def _kind(
    trained: nn.Module, tensors: Mapping[str, torch.Tensor], meta: dict[str, Any], probe: torch.Tensor
) -> str:
    """How ``trained`` is rebuilt (see the module's docstring): the first kind whose fresh
    architecture takes the weights with ``strict=True`` and computes the same outputs."""
    members = getattr(trained, "members", None)
    candidates: list[dict[str, Any]] = [{"kind": "model"}]
    if isinstance(members, nn.ModuleList) and len(members):
        candidates.append({"kind": "ensemble", "members": len(members)})
    for candidate in candidates:
        try:
            rebuilt = architecture({**meta, **candidate})
            rebuilt.load_state_dict(tensors, strict=True)
        except (RuntimeError, UserError):  # other keys or shapes: not this kind
            continue
        if _same_function(trained, rebuilt.to(probe.device), probe):
            meta.update(candidate)
            return str(candidate["kind"])
    return "opaque"


def trial_artifact(result: TrainResult, spec: TrialSpec, data: DataSplits) -> ModelArtifact | None:
    """The deployable model of a finished training (``result.model``) as safetensors bytes with
    its sidecar; None when the training kept no model. ``data`` gives the input shape, the number
    of classes and the inputs the rebuilt model is checked on."""
    from safetensors.torch import save

    import sopkit

    model = result.model
    if model is None:
        return None
    input_shape = list(data.input_shape)
    meta: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "key": spec.key,
        "kind": "opaque",
        "model": spec.model,
        "input_shape": input_shape,
        "num_classes": data.num_classes,
        "dataset": spec.dataset,
        "strategy": spec.strategy,
        "seed": spec.seed,
        "lr": spec.lr,
        "optimizer": spec.optimizer,
        "expansion": spec.expansion,
        "options": dict(sorted(spec.options.items())),
        "train": dict(spec.train),
        "module": f"{type(model).__module__}.{type(model).__qualname__}",
        "test_accuracy": result.test_accuracy,
        "val_accuracy": result.val_accuracy,
        "diverged_at_step": result.diverged_at_step,
        "sopkit_version": sopkit.__version__,
        "torch_version": torch.__version__,
    }
    tensors, complete = _cpu_tensors(model)
    probe = _probe(data, model, input_shape)
    meta["input_dtype"] = str(probe.dtype).removeprefix("torch.")
    if complete:  # else it stays opaque: what safetensors cannot hold would be lost on reload
        _kind(model, tensors, meta, probe)
    weights = save(tensors, metadata={"sopkit_key": spec.key})
    meta["sha256"] = hashlib.sha256(weights).hexdigest()
    meta["parameters"] = sum(t.numel() for t in tensors.values())
    return ModelArtifact(weights=weights, meta=json_safe(meta))


def read_weights(directory: Path | str, key: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The tensors of trial ``key``'s weights file, checked against the sidecar's checksum."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = weights_path(directory, key)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"The weights file of trial {key} is missing: expected {path}.") from None
    except OSError as error:
        raise UserError(f"Cannot read the weights file {path}: {error}.") from None
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise UserError(
            f"The weights file {path} is damaged: its checksum differs from the one its sidecar "
            f"{path.with_suffix('.json').name} recorded when it was written."
        )
    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise UserError(f"The weights file {path} is damaged ({error}).") from None


def load_trained(
    directory: Path | str, key: str, *, device: torch.device | str = "cpu"
) -> nn.Module:
    """The model trial ``key`` of the comparison in ``directory`` (its ``--out``) shipped, rebuilt
    and loaded with ``strict=True``, in eval mode on ``device``: a plain architecture, or one
    :class:`AveragedEnsemble` of them. Trial keys are the ``key`` of each line of ``trials.jsonl``.
    """
    meta = read_meta(directory, key)
    if meta["kind"] not in KINDS:
        raise UserError(f"The model sidecar of trial {key} has an unknown kind {meta['kind']!r}.")
    model = architecture(meta)  # refuses an opaque model before its weights are read
    tensors = read_weights(directory, key, meta)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise UserError(
            f"The saved weights of trial {key} do not fit {meta['model']} as this sopkit builds "
            f"it: {error}"
        ) from None
    return model.to(device).eval()
