"""What the reports say about the protocol stages: a chosen rate at an edge of its grid, and
which seeds chose the rates and which confirmed them (:mod:`sopkit.experiment.protocol`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from sopkit.report.format import format_lr, seed_list

if TYPE_CHECKING:
    from sopkit.experiment.results import Group, StrategyResult

#: The marker on a chosen rate at an edge of the rates tried.
EDGE_MARK = "†"
_SIDE = {"low": "bottom", "high": "top"}


def edge_hint(result: StrategyResult) -> str:
    """A chosen-rate cell's hint: why it is marked ("" when it is not)."""
    if result.edge is None:
        return ""
    return f"chosen at the grid's {_SIDE[result.edge]} edge: a better rate may lie beyond it"


def chosen_lr_text(result: StrategyResult) -> str:
    """The chosen rate, with the edge marker when it sits at an edge of the rates tried."""
    text = format_lr(result.chosen_lr)
    return f"{text} {EDGE_MARK}" if result.edge is not None else text


def edge_notes(groups: Sequence[Group]) -> list[str]:
    """One footnote per strategy whose chosen rate is at an edge of its grid."""
    notes = []
    for group in groups:
        for result in group.strategies:
            if result.edge is None:
                continue
            notes.append(
                f"{EDGE_MARK} {result.strategy} on {group.title}: chosen at the grid's "
                f"{_SIDE[result.edge]} edge ({format_lr(result.chosen_lr)} of "
                f"{', '.join(format_lr(r) for r in result.rates_tried)}): extend with "
                "--extend-grid (or raise it)."
            )
    return notes


def seed_notes(group: Group) -> list[str]:
    """Which seeds chose the rates and which confirmed them, for a confirmed group."""
    confirmed = [r for r in group.strategies if r.confirmed]
    if not confirmed:
        return []
    chose = sorted({s for r in confirmed for s in r.search_seeds})
    confirming = sorted({s for r in confirmed for s in r.seeds})
    return [
        f"Rates chosen on validation over seeds {seed_list(chose)}; every number shown comes from "
        f"the confirmation seeds {seed_list(confirming) if confirming else '(none finished yet)'} "
        "at the chosen rate."
    ]


def expected_rates(group: Group, result: StrategyResult) -> set[float]:
    """The rates ``result`` should have been trained at: its own and every rate of the group
    between the smallest and largest rate all its strategies tried. An edge extension adds rates
    past the grid to one strategy only: those are not missing from the others."""
    every = [set(r.rates_tried) for r in group.strategies]
    common = set.intersection(*every) if every else set()
    if not common:
        return set(result.rates_tried)
    low, high = min(common), max(common)
    return set(result.rates_tried) | {r for rates in every for r in rates if low <= r <= high}
