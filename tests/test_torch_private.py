"""Every private torch API sopkit uses is listed in sopkit.torch_private, sits behind its probe, and
has a fallback that gives the fast path's results when the probe is forced off."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from sopkit import torch_private
from sopkit.mk import compiled, expand, find_majority, sampling

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "sopkit", ROOT / "baselines/src/sopkit_baselines"]
# Attribute access to private torch API: torch._x, torch.ops.*, tensor._version, and nn.Module's
# private dictionaries.
PRIVATE = re.compile(
    r"torch\._[A-Za-z]|torch\.ops\.|\._version\b|\._parameters\b|\._buffers\b|\._modules\b"
    r"|_forward_pre_hooks|_forward_hooks|_backward_hooks"
)


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """Lines of code, without comments and docstrings (a docstring may name an API it avoids)."""
    import ast
    import io
    import tokenize

    text = path.read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
            getattr(body[0], "value", None), ast.Constant
        ):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE):
            continue
        if token.start[0] not in docstrings:
            lines.setdefault(token.start[0], "")
            lines[token.start[0]] += token.string + " "
    return sorted(lines.items())


def test_private_torch_api_is_used_only_in_torch_private():
    found = []
    for folder in SOURCES:
        for path in folder.rglob("*.py"):
            if path == ROOT / "sopkit/torch_private.py":
                continue
            for number, line in _code_lines(path):
                if PRIVATE.search(line.replace(" . ", ".").replace(" .", ".").replace(". ", ".")):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == [], "private torch API outside sopkit/torch_private.py:\n" + "\n".join(found)


def test_the_scan_finds_private_uses(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""torch._dynamo in a docstring is fine."""\nx = t._version  # here\n')
    assert [n for n, line in _code_lines(sample) if PRIVATE.search(line.replace(" ", ""))] == [2]


def test_every_probed_entry_has_a_probe_and_names_are_unique():
    names = [use.name for use in torch_private.PRIVATE_USES]
    assert len(names) == len(set(names))
    probed = {use.name for use in torch_private.PRIVATE_USES if use.status == "probed"}
    assert probed == set(torch_private._PROBES)
    with pytest.raises(KeyError, match="no probe"):
        torch_private.usable("module_parameters")  # removed: nothing to probe


@pytest.mark.parametrize("setting,name,expected", [
    ("", "tensor_version", True),
    ("tensor_version", "tensor_version", False),
    ("mkldnn_linear, tensor_version", "tensor_version", False),
    ("mkldnn_linear", "tensor_version", True),
    ("all", "inductor", False),
])
def test_probes_are_forced_off_by_the_environment(setting, name, expected, monkeypatch):
    monkeypatch.setenv(torch_private.ENV_OFF, setting)
    assert torch_private.enabled(name) is expected


# ---- tensor_version ------------------------------------------------------------------------------


def test_the_version_counter_probe_passes_on_this_torch():
    assert torch_private.usable("tensor_version")  # else the fast path is untested here


def test_without_version_counters_keys_never_repeat(monkeypatch):
    tensor = torch.zeros(3)
    assert torch_private.tensor_version(tensor) == torch_private.tensor_version(tensor)
    monkeypatch.setenv(torch_private.ENV_OFF, "tensor_version")
    keys = {torch_private.tensor_version(tensor) for _ in range(5)}
    assert len(keys) == 5 and all(k < 0 for k in keys)


def _eval_outputs(model: nn.Module) -> list[torch.Tensor]:
    """Eval outputs before and after an in-place change of the copies (an optimizer step)."""
    holder = find_majority(model)
    x = torch.linspace(-1, 1, 12).reshape(2, 6)
    model.eval()
    outputs = []
    with torch.no_grad():
        outputs.append(model(x).clone())
        outputs.append(model(x).clone())  # the cached weights
        holder.copies.mul_(1.5)  # type: ignore[union-attr]
        outputs.append(model(x).clone())  # must see the change
    return outputs


def test_without_version_counters_eval_weights_are_recomputed_and_equal(monkeypatch):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    cached = _eval_outputs(expand(plain, 3, seed=0))
    monkeypatch.setenv(torch_private.ENV_OFF, "tensor_version")
    recomputed = _eval_outputs(expand(plain, 3, seed=0))
    for a, b in zip(cached, recomputed, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(cached[0], cached[2])


# ---- inductor (the compiled sampler) -------------------------------------------------------------


def _large_model() -> nn.Module:
    torch.manual_seed(0)
    return expand(nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 3)), 3, seed=0)


def test_without_inductor_auto_takes_sfc64_and_compiled_is_refused(monkeypatch):
    monkeypatch.setattr(sampling, "COMPILED_MIN_WEIGHTS", 100)
    monkeypatch.setenv(torch_private.ENV_OFF, "inductor")
    assert not compiled.available(3)
    holder = find_majority(_large_model())
    assert holder.resolved_sampler() == "sfc64"  # type: ignore[union-attr]
    holder.sampler = "compiled"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="'compiled' sampler"):
        holder.resolved_sampler()  # type: ignore[union-attr]


def test_without_inductor_auto_takes_sfc64_and_trains_with_the_straightforward_gradient(
    monkeypatch,
):
    monkeypatch.setattr(sampling, "COMPILED_MIN_WEIGHTS", 100)
    monkeypatch.setenv(torch_private.ENV_OFF, "inductor")
    model = _large_model()
    holder = find_majority(model)
    model.train()
    x = torch.linspace(-1, 1, 80).reshape(2, 40)
    state = holder.stream.state_dict()  # type: ignore[union-attr]
    p = holder.draw().p()  # type: ignore[union-attr]
    holder.stream.load_state_dict(state)  # type: ignore[union-attr]
    (fast,) = torch.autograd.grad(model(x).square().sum(), holder.copies)  # type: ignore[union-attr]
    assert holder.last_sampler == "sfc64"  # type: ignore[union-attr]
    copies = holder.copies  # type: ignore[union-attr]
    mixed = torch.addcmul(torch.addcmul(p[0] * copies[0], p[1], copies[1]), p[2], copies[2])
    from sopkit.mk import fixed_weights

    with fixed_weights(model, mixed):
        (reference,) = torch.autograd.grad(model(x).square().sum(), copies)
    assert torch.equal(fast, reference)
