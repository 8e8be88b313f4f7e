"""One fixed colour and marker per strategy, in every plot and next to every table row."""

from __future__ import annotations

import zlib

# Okabe–Ito based, readable by colour-blind readers; the reference is neutral dark grey, the paper's
# method the most saturated colour, and related strategies share a hue family.
STRATEGY_COLOURS: dict[str, str] = {
    "baseline": "#4d4d4d",
    "baseline-long": "#8a8a8a",
    "mk": "#d55e00",
    "adv-mk": "#e69f00",
    "adv-mk-only": "#b8860b",
    "ensemble": "#0072b2",
    "distill": "#56b4e9",
    "subset": "#009e73",
}
_FALLBACK_COLOURS = ("#cc79a7", "#8c564b", "#7b3294", "#e7298a", "#808000", "#2f4b7c")
STRATEGY_MARKERS: dict[str, str] = {
    "baseline": "o",
    "baseline-long": "s",
    "mk": "D",
    "adv-mk": "^",
    "adv-mk-only": "v",
    "ensemble": "P",
    "distill": "X",
    "subset": "h",
}


def strategy_colour(name: str) -> str:
    """The strategy's colour; an unknown (plugin) strategy gets a stable one from its name."""
    if name in STRATEGY_COLOURS:
        return STRATEGY_COLOURS[name]
    # crc32, not hash(): Python salts str hashes per process, and colours must not change per run.
    return _FALLBACK_COLOURS[zlib.crc32(name.encode()) % len(_FALLBACK_COLOURS)]


def strategy_marker(name: str) -> str:
    """The strategy's matplotlib marker (a circle for strategies without one of their own)."""
    return STRATEGY_MARKERS.get(name, "o")
