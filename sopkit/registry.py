"""Strategy discovery through the ``sopkit.strategies`` entry-point group.

sopkit's own strategies are registered in its pyproject.toml under that group, exactly as a third-party
plugin registers; nothing is registered by importing a module. A plugin that fails to load is reported
by name when it is asked for, and never breaks the others. Set ``SOPKIT_DISABLE_PLUGIN_AUTOLOAD=1`` to
see only sopkit's own strategies (to rule out a broken plugin).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING

from sopkit.errors import UserError, unknown_name
from sopkit.training.hooks_guard import PluginError

if TYPE_CHECKING:
    from sopkit.training.settings import StrategySettings
    from sopkit.training.strategy import Strategy

GROUP = "sopkit.strategies"
DISABLE_AUTOLOAD_ENV = "SOPKIT_DISABLE_PLUGIN_AUTOLOAD"
OWN_DISTRIBUTION = "sopkit"


@dataclass(frozen=True)
class StrategyEntry:
    """One registered strategy: its name, where it comes from, and how to load it."""

    name: str
    target: str  # "package.module:Class"
    distribution: str  # the installed distribution that registers it
    version: str
    entry_point: metadata.EntryPoint

    def load(self) -> type[Strategy]:
        """Import the strategy class; a failure is reported naming the plugin, never a traceback."""
        from sopkit.training.strategy import Strategy

        try:
            loaded = self.entry_point.load()
        except (Exception, SystemExit) as error:  # a plugin may fail in any way while importing
            raise PluginError(
                f"Strategy {self.name!r} from plugin {self.distribution} {self.version} "
                f"({self.target}) failed to load: {type(error).__name__}: {error}",
                strategy=self.name,
                distribution=self.distribution,
                hook="import",
            ) from error
        if not (isinstance(loaded, type) and issubclass(loaded, Strategy)):
            raise PluginError(
                f"Strategy {self.name!r} from plugin {self.distribution} {self.version} "
                f"({self.target}) is not a subclass of sopkit.Strategy.",
                strategy=self.name,
                distribution=self.distribution,
                hook="import",
            )
        return loaded

    def describe(self) -> str:
        """The strategy's one-line ``description``, or why there is none: a plugin's broken
        description (one that raises, or is not a string) must not break ``sopkit strategies``."""
        try:
            description = self.load().description
        except UserError as error:
            return str(error)
        except Exception as error:  # a property on the class's metaclass may raise anything
            return f"(its description raised {type(error).__name__}: {error})"
        if not isinstance(description, str):
            return f"(its description is a {type(description).__name__}, not a string)"
        return description

    def load_error(self) -> str | None:
        """None when the strategy loads, else why not (for ``sopkit strategies``)."""
        try:
            self.load()
        except UserError as error:
            return str(error)
        return None  # (``describe`` reports a broken description)


def discover() -> dict[str, StrategyEntry]:
    """Every registered strategy by name, sopkit's own first, then plugins sorted by name.

    When two distributions register one name, sopkit's own wins over a plugin's and the first plugin
    found wins over later ones; the duplicate is not silently merged but simply shadowed.
    """
    autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("1", "true", "yes")
    entries: dict[str, StrategyEntry] = {}
    for entry_point in metadata.entry_points(group=GROUP):
        dist_name, version = _distribution(entry_point)
        if not autoload and dist_name != OWN_DISTRIBUTION:
            continue
        entry = StrategyEntry(
            name=entry_point.name,
            target=entry_point.value,
            distribution=dist_name,
            version=version,
            entry_point=entry_point,
        )
        existing = entries.get(entry.name)
        if existing is None or (
            existing.distribution != OWN_DISTRIBUTION and entry.distribution == OWN_DISTRIBUTION
        ):
            entries[entry.name] = entry
    own = sorted(n for n, e in entries.items() if e.distribution == OWN_DISTRIBUTION)
    others = sorted(n for n in entries if n not in own)
    return {name: entries[name] for name in _builtin_order(own) + others}


def _distribution(entry_point: metadata.EntryPoint) -> tuple[str, str]:
    """(name, version) of the distribution registering ``entry_point``; ("unknown", "") when its
    metadata is missing or damaged (a broken install must not break discovery)."""
    try:
        dist = entry_point.dist
        if dist is None:
            return "unknown", ""
        return str(dist.metadata["Name"] or "unknown"), str(dist.version or "")
    except Exception:  # damaged METADATA: the entry point is still listed, and named
        return "unknown", ""


def _builtin_order(names: list[str]) -> list[str]:
    preferred = ["baseline", "baseline-long", "mk", "adv-mk", "adv-mk-only"]
    return [n for n in preferred if n in names] + [n for n in names if n not in preferred]


def check_options(settings: StrategySettings, selected: Iterable[str]) -> None:
    """A UserError for a strategy option that no strategy reads, rather than ignoring a typo.

    A scoped option (``mk.init``) must name a registered strategy that reads that key; a bare one
    (``eps``) must be read by some registered strategy. Strategies read their options when they are
    constructed, so every strategy concerned is constructed once here and the keys it asks for are
    recorded (``StrategySettings.asked``). The errors of the ``selected`` strategies, and of those
    a scoped option names, are raised. Other strategies are constructed only to learn their keys,
    and their errors are ignored: a bare ``alpha=2`` meant for one strategy may be out of range for
    another. (Then the bare keys are not checked: that strategy may not have asked for all of its.)
    """
    selected = list(dict.fromkeys(selected))
    for name in selected:
        create_strategy(name, settings)
    options = settings.options
    if not options:
        return
    entries = discover()
    scoped = {key.split(".", 1)[0] for key in options if "." in key}
    for name in sorted(scoped - set(entries)):
        keys = ", ".join(sorted(key for key in options if key.startswith(name + ".")))
        raise UserError(f"Option {keys}: {unknown_name('strategy', name, entries)}")
    for name in sorted(scoped.difference(selected)):
        create_strategy(name, settings)  # an option addressed to it must be valid for it
    # Whether every strategy was constructed: one that stopped at a bad value may not have asked
    # for all of its keys, and then a bare key nobody asked for may still be one of them.
    complete = True
    if any("." not in key for key in options):
        for name in entries:
            if name in selected or name in scoped:
                continue
            try:
                create_strategy(name, settings)
            except UserError:  # it is only asked which keys it reads
                complete = False
    asked = settings.asked
    for key in options:
        if "." in key:
            name, option = key.split(".", 1)
            known = sorted(k for n, k in asked if n == name)
            if option not in known:
                raise UserError(
                    f"Option {key}: the {name} strategy has no option {option!r}."
                    f"{_suggestion(option, known)} Its options: {', '.join(known) or 'none'}."
                )
        elif complete and not any(k == key for _, k in asked):
            known = sorted({k for _, k in asked})
            raise UserError(
                f"Option {key}: no strategy has an option {key!r}.{_suggestion(key, known)} "
                f"Options strategies read: {', '.join(known) or 'none'}; scope one to a strategy "
                "as STRATEGY.KEY (e.g. mk.init)."
            )


def _suggestion(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def create_strategy(name: str, settings: StrategySettings) -> Strategy:
    """Instantiate the strategy registered as ``name`` with ``settings`` scoped to it."""
    entries = discover()
    if name not in entries:
        raise unknown_name("strategy", name, entries)
    entry = entries[name]
    cls = entry.load()
    try:
        return cls(settings.for_strategy(name))
    except UserError:
        raise  # an option out of range: already the user's message
    except (Exception, SystemExit) as error:  # a plugin's __init__ may fail in any way
        raise PluginError(
            f"Strategy {name!r} from plugin {entry.distribution} {entry.version} ({entry.target}) "
            f"failed in __init__: {type(error).__name__}: {error}",
            strategy=name,
            distribution=entry.distribution,
            hook="__init__",
        ) from error
