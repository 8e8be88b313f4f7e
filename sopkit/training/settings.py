"""``StrategySettings``: what a strategy is configured with (``--set KEY=VALUE`` options), and how a
strategy reads and checks them. No torch here: options are checked before anything trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sopkit.checks import DEFAULT_EXPANSION, MAX_INT, check_expansion
from sopkit.errors import UserError

__all__ = ["StrategySettings"]

T = TypeVar("T")


@dataclass(frozen=True)
class StrategySettings:
    """What a strategy is configured with: the expansion factor and free-form ``KEY=VALUE`` options.

    Options come from ``sopkit compare --set KEY=VALUE``. ``--set mk.init=replicate`` applies to the
    ``mk`` strategy only; a bare ``--set eps=0.1`` applies to every strategy that reads ``eps``.
    A strategy reads its options in ``__init__``: :func:`sopkit.registry.check_options` constructs
    the strategies concerned to learn which keys each reads, so that a misspelt option fails before
    training instead of being ignored.
    """

    expansion: int = DEFAULT_EXPANSION
    options: Mapping[str, str] = field(default_factory=dict)
    strategy_name: str = ""
    #: ``(strategy name, key)`` of every option asked for, by every strategy these settings (and
    #: their ``for_strategy`` copies) were read by.
    asked: set[tuple[str, str]] = field(default_factory=set, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_expansion(self.expansion)

    def for_strategy(self, name: str) -> StrategySettings:
        """The same settings, read on behalf of the strategy called ``name``."""
        return StrategySettings(self.expansion, self.options, name, self.asked)

    def get(
        self,
        key: str,
        default: T,
        parse: Callable[[str], T] | None = None,
        *,
        choices: tuple[T, ...] | None = None,
    ) -> T:
        """The option ``key`` parsed with ``parse`` (default: the type of ``default``).

        A value that does not parse, or is not one of ``choices``, is the user's mistake: UserError.
        """
        self.asked.add((self.strategy_name, key))
        scoped = f"{self.strategy_name}.{key}" if self.strategy_name else key
        raw = self.options.get(scoped, self.options.get(key))
        if raw is None:
            return default
        parser: Callable[[str], Any] = parse or _parser_for(default)
        try:
            value = parser(raw)
        except (TypeError, ValueError) as error:
            raise UserError(f"Option {scoped}={raw!r} is not valid: {error}.") from None
        _check_number(scoped, raw, value)
        if choices is not None and value not in choices:
            valid = ", ".join(map(str, choices))
            raise UserError(f"Option {scoped}={raw!r} is not valid. Valid values: {valid}.")
        return value  # type: ignore[no-any-return]


def _check_number(scoped: str, raw: str, value: object) -> None:
    """A UserError for a number no strategy can use: nan or an infinity where a float is read
    (``float("1e309")`` is inf), an integer beyond 64 bits (seeds, counts and sizes reach numpy,
    torch and SQLite, which hold 64 bits)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"Option {scoped}={raw!r} is not valid: it must be a finite number.")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise UserError(
            f"Option {scoped}={raw!r} is not valid: it must be an integer of at most 64 bits "
            f"(at most {MAX_INT} in size)."
        )


def _parser_for(default: object) -> Callable[[str], Any]:
    if isinstance(default, bool):
        return _parse_bool
    if default is None:
        return str
    return type(default)


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")
