"""Direct labels for scatter points, placed where they cover no other label, marker or error bar."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes

_LABEL_STYLE: dict[str, Any] = {"fontsize": 9.0, "fontweight": "bold"}


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """The overlapping area of two (x0, y0, x1, y1) boxes."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return width * height if width > 0 and height > 0 else 0.0


# A labelled point: x, y, its error bar's half-length (y units), the label, its colour.
Point = tuple[float, float, float, str, str]


def place_labels(ax: Axes, points: Sequence[Point]) -> None:
    """Label points directly, each where it covers no other label, marker or error bar.

    Labels are placed one after another (in strategy order, so the baseline's comes first); each
    takes the cheapest of a few candidate spots beside its point (right, left, then shifted up or
    down with a thin leader line), where overlaps and leaving the axes cost the most and distance
    from the point a little.
    """
    if not points:
        return
    figure = ax.figure
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    frame = ax.get_window_extent(renderer)
    anchors = [tuple(ax.transData.transform((x, y))) for x, y, _, _, _ in points]
    sizes = []
    for _, _, _, text, _ in points:
        probe = ax.text(0, 0, text, **_LABEL_STYLE)  # measured with the label's own font
        extent = probe.get_window_extent(renderer)
        sizes.append((extent.width + 4.0, extent.height + 2.0))  # + the backing box's padding
        probe.remove()
    marker = 6.0  # half a marker's size, px
    obstacles = [(px - marker, py - marker, px + marker, py + marker) for px, py in anchors]
    bars = []
    for x, y, error, _, _ in points:
        low = ax.transData.transform((x, y - error))
        high = ax.transData.transform((x, y + error))
        bars.append((low[0] - 1.5, low[1], low[0] + 1.5, high[1]))
    gap = 6.0
    placed: list[tuple[float, float, float, float]] = []
    to_points = 72.0 / figure.dpi
    for index, ((x, y, _, text, colour), (px, py), (width, height)) in enumerate(
        zip(points, anchors, sizes, strict=True)
    ):
        best: tuple[float, float, float, str] | None = None
        for shift in (0, 1, -1, 2, -2, 3, -3, 4, -4):
            for side in ("right", "left"):
                dy = shift * height * 0.9
                x0 = px + gap if side == "right" else px - gap - width
                candidate = (x0, py + dy - height / 2, x0 + width, py + dy + height / 2)
                inside = _overlap(candidate, (frame.x0, frame.y0, frame.x1, frame.y1))
                cost = 20.0 * (width * height - inside)
                cost += 10.0 * sum(_overlap(candidate, other) for other in placed)
                cost += 10.0 * sum(
                    _overlap(candidate, box) for j, box in enumerate(obstacles) if j != index
                )
                cost += 2.0 * sum(
                    _overlap(candidate, bar) for j, bar in enumerate(bars) if j != index
                )
                cost += 0.5 * abs(dy) + (3.0 if side == "left" else 0.0)
                if best is None or cost < best[0]:
                    best = (cost, x0, dy, side)
        assert best is not None
        _, x0, dy, side = best
        placed.append((x0, py + dy - height / 2, x0 + width, py + dy + height / 2))
        # Offsets to the text's anchor: its left edge on the right side, its right edge on the left.
        offset_x = (x0 + 2.0 - px) if side == "right" else (x0 + width - 2.0 - px)
        arrow = None
        if dy:
            arrow = {
                "arrowstyle": "-",
                "color": colour,
                "linewidth": 0.7,
                "shrinkA": 1,
                "shrinkB": 4,
                "alpha": 0.8,
            }
        ax.annotate(
            text,
            (x, y),
            xytext=(offset_x * to_points, dy * to_points),
            textcoords="offset points",
            ha="left" if side == "right" else "right",
            va="center",
            color=colour,
            arrowprops=arrow,
            # A light backing so grid and reference lines never run through the text.
            bbox={
                "boxstyle": "round,pad=0.15",
                "facecolor": "white",
                "edgecolor": "none",
                "alpha": 0.8,
            },
            zorder=5,
            **_LABEL_STYLE,
        )
