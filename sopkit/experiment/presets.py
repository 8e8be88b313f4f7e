"""Named comparison plans shipped as TOML (``presets/*.toml`` beside this module), or a user's file.

A preset gives the values of ``sopkit compare`` options; options given on the command line override
it (``plan.build_plan``). Its counts of epochs (``milestones``, ``warmup_epochs`` and the strategy
options ``epochs`` and ``milestones``) are written for its ``epochs``: ``--epochs N`` scales them to
N (:func:`rescale_preset`), so a short trial run of a preset keeps its shape.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from sopkit.errors import UserError

PRESET_KEYS = {
    "name",
    "description",
    "dataset",
    "models",
    "optimizers",
    "strategies",
    "seeds",
    "lr_grid",
    "epochs",
    "batch_size",
    "expansion",
    "schedule",
    "weight_decay",
    "options",
    # The training recipe (``TrainConfig``): a single rate instead of a grid, drops, warm-up, ...
    "lr",
    "milestones",
    "lr_decay",
    "warmup_epochs",
    "label_smoothing",
    "momentum",
    "augment",  # none or standard (the data set's recipe); a preset without it takes the set's
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    # TOML has nan and inf; no field of a preset takes them.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_option_value(value: Any) -> bool:
    # A list of integers is an option's comma-separated list (``"mk.milestones" = [90, 180]``).
    return isinstance(value, str | bool | int) or _is_number(value) or (
        isinstance(value, list) and all(_is_int(v) for v in value)
    )


def _is_lr_grid(value: Any) -> bool:
    # A string as --lr-grid takes it, or a list of rates (``[0.01, 0.003]``).
    return isinstance(value, str) or (
        isinstance(value, list) and bool(value) and all(_is_number(v) for v in value)
    )


#: Each key's check, and what it expects in words.
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (lambda v: isinstance(v, str), "a string"),
    "description": (lambda v: isinstance(v, str), "a string"),
    "models": (_is_names, "a list of strings"),
    "optimizers": (_is_names, "a list of strings"),
    "strategies": (_is_names, "a list of strings"),
    "seeds": (_is_int, "an integer"),
    "epochs": (_is_int, "an integer"),
    "batch_size": (_is_int, "an integer"),
    "expansion": (_is_int, "an integer"),
    "dataset": (lambda v: isinstance(v, str), "a string"),
    "lr_grid": (_is_lr_grid, "a string such as \"paper:-2..2\" or a list of rates"),
    "schedule": (lambda v: isinstance(v, str), "a string"),
    "weight_decay": (_is_number, "a finite number"),
    "options": (lambda v: isinstance(v, dict), "a table"),  # its values: see _check_options
    "lr": (_is_number, "a finite number"),
    "milestones": (lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
                   "a list of integers"),
    "lr_decay": (_is_number, "a finite number"),
    "warmup_epochs": (_is_int, "an integer"),
    "label_smoothing": (_is_number, "a finite number"),
    "momentum": (_is_number, "a finite number"),
    "augment": (lambda v: isinstance(v, str), "a string"),
}


def shipped_presets() -> dict[str, Path]:
    """The presets that come with sopkit (``sopkit/experiment/presets/*.toml``), by name."""
    folder = resources.files("sopkit.experiment") / "presets"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".toml")}


def load_preset(name_or_path: str) -> dict[str, Any]:
    """A preset by shipped name or TOML file path, checked for unknown keys and wrong types."""
    presets = shipped_presets()
    path = presets.get(name_or_path) or Path(name_or_path).expanduser()
    if not path.is_file():
        raise UserError(
            f"Unknown preset {name_or_path!r}: neither a shipped preset ({', '.join(sorted(presets))})"
            " nor a TOML file."
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UserError(f"Preset {path} cannot be read: {error.strerror or error}.") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise UserError(f"Preset {path} is not valid TOML: {error}.") from None
    unknown = sorted(set(data) - PRESET_KEYS)
    if unknown:
        raise UserError(
            f"Preset {path} has unknown keys {', '.join(unknown)}. Valid keys: "
            f"{', '.join(sorted(PRESET_KEYS))}."
        )
    for key, value in data.items():
        check, kind = _KINDS.get(key, (lambda v: True, ""))
        if not check(value):
            raise UserError(f"Preset {path}: {key} must be {kind}, got {_shown(value)}.")
    _check_options(path, data.get("options", {}))
    if isinstance(data.get("lr_grid"), list):  # as --lr-grid takes it
        data["lr_grid"] = ",".join(repr(float(rate)) for rate in data["lr_grid"])
    if "name" in data:
        data["name"] = check_preset_name(path, data["name"])
    if "lr" in data and "lr_grid" in data:
        raise UserError(f"Preset {path} gives both lr and lr_grid: give one.")
    data.setdefault("name", path.stem)
    return data


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:120] + "..."


def _check_options(path: Path, options: dict[str, Any]) -> None:
    """Each value of a preset's ``[options]`` table, named by its key when it is of the wrong type
    (a nested table, a list of strings, nan...)."""
    for key, value in options.items():
        if not _is_option_value(value):
            raise UserError(
                f"Preset {path}: options.{key} must be a string, a finite number, a boolean or a "
                f"list of integers, got {_shown(value)}."
            )


#: The longest preset name: it becomes a directory name (``runs/NAME``), and file systems allow
#: 255 bytes for one.
MAX_NAME_BYTES = 100


def check_preset_name(path: Path | str, name: str) -> str:
    """A preset's ``name``, refused when it reads as a path: a preset may come from someone else,
    and its name picks the default output directory (``runs/NAME``), so ``../../x``, ``/etc``, a
    NUL or other control character, a leading dot or more than :data:`MAX_NAME_BYTES` bytes is a
    UserError naming the preset. (Other characters, spaces say, are replaced in the directory name
    by :func:`safe_dir_name`.)"""
    if (
        not name.strip()
        or len(name.encode("utf-8", "replace")) > MAX_NAME_BYTES
        or name.startswith(".")
        or re.search(r"[/\\\x00-\x1f\x7f]", name)
    ):
        raise UserError(
            f"Preset {path}: name {_shown(name)} cannot name the output directory (runs/NAME): "
            f"it must not be empty, contain '/', '\\' or control characters, start with '.', or "
            f"be longer than {MAX_NAME_BYTES} bytes."
        )
    return name


def safe_dir_name(name: str) -> str:
    """``name`` as one directory name that stays inside its parent: every character other than
    letters, digits, ``.``, ``_``, ``-`` and ``+`` becomes ``_`` (``/``, ``\\``, ``:``, spaces, NUL...),
    leading dots become ``_`` (no ``..``, no hidden directory), and it is cut to
    :data:`MAX_NAME_BYTES` bytes. Names made of the allowed characters come back unchanged, so the
    same comparison keeps resuming into the same directory."""
    safe = re.sub(r"[^\w.+-]", "_", name)
    safe = re.sub(r"^\.+", lambda dots: "_" * len(dots.group()), safe)
    return safe.encode("utf-8")[:MAX_NAME_BYTES].decode("utf-8", "ignore") or "_"


def option_text(value: Any) -> str:
    """A preset's option value as ``--set`` gives it: a list of integers comma-separated."""
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def rescale_preset(settings: dict[str, Any], epochs: int) -> dict[str, Any]:
    """``settings`` (a loaded preset) with every count of epochs scaled from its ``epochs`` to
    ``epochs``: its ``milestones`` and ``warmup_epochs``, and the strategy options ``epochs`` and
    ``milestones`` in its ``options``, each times ``epochs / settings["epochs"]``, rounded.

    A scaled training lasts at least one epoch and a warm-up less than the training. Scaled
    milestones that land at 0, on another, or at or past the end of their training (the strategy's
    own scaled ``epochs`` where it has them) are left out; a step schedule left without any trains
    at a constant rate. A value that does not parse is kept as it is (the check that reads it
    reports it). Without ``epochs`` in the preset, or at the same value, nothing changes.
    """
    old = settings.get("epochs")
    # An invalid one (0, a string) is left for its check to report.
    if not isinstance(old, int) or isinstance(old, bool) or old < 1 or old == epochs:
        return settings
    ratio = epochs / old

    def stretched(values: list[int], end: int | None) -> list[int]:
        kept = {round(v * ratio) for v in values}
        return sorted(v for v in kept if v >= 1 and (end is None or v < end))

    scaled = dict(settings, epochs=epochs)
    if "milestones" in settings:
        scaled["milestones"] = stretched(settings["milestones"], epochs)
        if settings["milestones"] and not scaled["milestones"]:
            scaled["schedule"] = "constant"
    if "warmup_epochs" in settings:
        scaled["warmup_epochs"] = min(round(settings["warmup_epochs"] * ratio), epochs - 1)
    options = dict(settings.get("options", {}))
    for key, value in settings.get("options", {}).items():
        count = _ints(value)
        if key.rpartition(".")[2] == "epochs" and count and len(count) == 1:
            options[key] = max(1, round(count[0] * ratio))
    for key, value in settings.get("options", {}).items():
        scope, _, name = key.rpartition(".")
        values = _ints(value)
        if name == "milestones" and values is not None:
            own = _ints(options.get(f"{scope}.epochs" if scope else "epochs", ""))
            options[key] = stretched(values, own[0] if own else None)
    if options:
        scaled["options"] = options
    return scaled


def _ints(value: Any) -> list[int] | None:
    """An option value as integers (``330``, ``"90,180"``, ``[90, 180]``), or None if it is not."""
    try:
        return [int(part) for part in option_text(value).split(",") if part.strip()]
    except ValueError:
        return None
