"""Named comparison plans shipped as TOML (``presets/*.toml`` beside this module), or a user's file.

A preset gives the values of ``sopkit compare`` options; options given on the command line override
it (``plan.build_plan``).
"""

from __future__ import annotations

import tomllib
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
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise UserError(f"Preset {path} is not valid TOML: {error}.") from None
    unknown = sorted(set(data) - PRESET_KEYS)
    if unknown:
        raise UserError(
            f"Preset {path} has unknown keys {', '.join(unknown)}. Valid keys: "
            f"{', '.join(sorted(PRESET_KEYS))}."
        )
    expected = {
        "models": list,
        "optimizers": list,
        "strategies": list,
        "seeds": int,
        "epochs": int,
        "batch_size": int,
        "expansion": int,
        "dataset": str,
        "lr_grid": str,
        "options": dict,
        "schedule": str,
    }
    for key, kind in expected.items():
        if key in data and not isinstance(data[key], kind):
            raise UserError(f"Preset {path}: {key} must be a {kind.__name__}, got {data[key]!r}.")
    data.setdefault("name", path.stem)
    return data
