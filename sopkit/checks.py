"""The checks every configuration shares, each written once, and the defaults the paper fixes.

``TrainConfig``, ``ComparePlan``, ``BenchConfig``, ``StrategySettings`` and ``expand`` all validate
their numbers through these functions, so "the expansion must be at least 2" (and its siblings) has
one wording and one rule. A failed check is the user's mistake: :class:`~sopkit.errors.UserError`
(a ``ValueError``), which the CLI turns into a message and exit status 2. No torch here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, Field, fields
from typing import Any

from sopkit.errors import UserError

#: The paper's expansion factor e (Section 5.1): copies per weight, members per ensemble.
DEFAULT_EXPANSION = 3
#: Seeds, counts and sizes are stored in SQLite INTEGER columns and seed numpy and torch: 63 bits.
MAX_INT = 2**63 - 1
#: The most epochs one training takes: 3000 times the paper's longest schedule (330), and small
#: enough that epochs x steps per epoch stays far inside the 64-bit step counters.
MAX_EPOCHS = 1_000_000
#: The largest expansion factor e: e copies of every weight (or e ensemble members) are held at
#: once, so beyond this any model runs out of memory; the paper uses 3.
MAX_EXPANSION = 1024
#: The most worker processes or threads one flag asks for (--jobs, --threads, --data-workers).
MAX_WORKERS = 1024


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: Any, *, minimum: int = 1, maximum: int = MAX_INT) -> int:
    """``value`` as an integer in ``[minimum, maximum]``; ``name`` is the flag the user typed."""
    if not _is_int(value) or not minimum <= value <= maximum:
        # The upper bound is worth naming when it is not the storage limit, or was crossed.
        show_maximum = maximum != MAX_INT or (_is_int(value) and value > maximum)
        if minimum == 1:
            bound = "a positive integer" + (f" at most {maximum}" if show_maximum else "")
        else:
            bound = f"at least {minimum} (an integer" + (
                f", at most {maximum})" if show_maximum else ")")
        raise UserError(f"{name} must be {bound}, got {value!r}.")
    return int(value)


def check_float(
    name: str,
    value: Any,
    *,
    positive: bool = False,
    at_most: float | None = None,
    below: float | None = None,
) -> float:
    """``value`` as a finite float, at least 0 (more than 0 when ``positive``), at most ``at_most``
    and less than ``below``."""
    ok = (isinstance(value, int | float) and not isinstance(value, bool)
          and math.isfinite(value) and (value > 0 if positive else value >= 0))
    if ok and at_most is not None:
        ok = value <= at_most
    if ok and below is not None:
        ok = value < below
    if not ok:
        bound = "a positive number" if positive else "a number of at least 0"
        if at_most is not None:
            bound += f" and at most {at_most:g}"
        if below is not None:
            bound += f" and less than {below:g}"
        raise UserError(f"{name} must be {bound}, got {value!r}.")
    return float(value)


def check_expansion(value: Any, name: str = "--expansion") -> int:
    """The expansion factor e: copies per weight (majority kernels), members (ensemble)."""
    return check_int(name, value, minimum=2, maximum=MAX_EXPANSION)


def check_choice(name: str, value: Any, choices: Iterable[str], kind: str) -> str:
    """``value`` when it is one of ``choices``; else the error lists them (``kind``: "optimizers")."""
    choices = tuple(choices)
    if value not in choices:
        raise UserError(f"Unknown {name} {value!r}. Valid {kind}: {', '.join(choices)}.")
    return str(value)


def check_names(name: str, values: Sequence[str]) -> tuple[str, ...]:
    """A non-empty list of names without repeats (``--strategies``, ``--model``, ...)."""
    if not values:
        raise UserError(f"{name} is empty: name at least one.")
    repeated = sorted({v for v in values if list(values).count(v) > 1})
    if repeated:
        raise UserError(f"{name} names {', '.join(repeated)} more than once.")
    return tuple(values)


# ---- defaults and help, read by the CLI from the configuration dataclasses ----------------------


def _field(cls: type, name: str) -> Field[Any]:
    for candidate in fields(cls):
        if candidate.name == name:
            return candidate
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of the dataclass ``cls`` (calling its factory if it has one)."""
    item = _field(cls, name)
    if item.default is not MISSING:
        return item.default
    if item.default_factory is not MISSING:
        return item.default_factory()
    raise KeyError(f"{cls.__name__}.{name} has no default")


def plain_help_of(cls: type, name: str) -> str:
    """The help text of field ``name`` alone (for a flag whose default Typer shows itself)."""
    return str(_field(cls, name).metadata.get("help", ""))


def help_of(cls: type, name: str, *, default: str | None = None) -> str:
    """The help text of field ``name`` (its ``metadata["help"]``) with ``[default: ...]``: the
    field's default, or ``default`` where the CLI takes it in another form (a count for seeds)."""
    item = _field(cls, name)
    text = item.metadata.get("help", "")
    shown = default if default is not None else item.metadata.get("shown_default")
    if shown is None:
        value = default_of(cls, name)
        if isinstance(value, tuple | list):
            shown = ",".join(map(str, value)) or "none"
        elif value is None:
            return text
        else:
            shown = str(value).lower() if isinstance(value, bool) else str(value)
    # Escaped: Typer renders help as rich markup, which would swallow "[default: ...]" as a tag.
    return f"{text} \\[default: {shown}]"
