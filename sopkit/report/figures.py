"""The report's figures (learning curves, accuracy against step time and against inference
parameters), drawn with matplotlib on a canvas of their own: never through pyplot, so drawing
changes no global backend state, and matplotlib is imported only when a figure is drawn."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sopkit.experiment.results import REFERENCE_STRATEGY
from sopkit.report.colours import strategy_colour, strategy_marker
from sopkit.report.format import finite, format_lr, format_params, optimizer_name
from sopkit.report.labels import Point, place_labels
from sopkit.task_metrics import metric_name

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from sopkit.experiment.results import Group

#: The look of every sopkit figure (compare reports and `sopkit bench`).
FIGURE_STYLE: dict[Any, Any] = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.6,
    "figure.titlesize": 13,
    "figure.titleweight": "bold",
    "svg.fonttype": "path",  # glyphs as paths: the page needs no font to look the same everywhere
    "svg.hashsalt": "sopkit",  # deterministic ids: the same results give the same file
}


@dataclass
class FigureSpec:
    """One figure, drawn once and saved as SVG (for the HTML) and PNG (for report.md)."""

    slug: str  # file name stem
    title: str
    caption: str
    svg: str
    png: bytes


def _new_figure(panels: int) -> tuple[Figure, list[Axes]]:
    """A figure with one panel per group (two per row, three from five groups) on Agg."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(panels, 3 if panels > 4 else 2)
    rows = math.ceil(panels / columns)
    # A lone panel gets more room: the figure title must fit above it.
    width, height = (7.6, 4.6) if panels == 1 else (5.4, 3.9)
    figure = Figure(figsize=(width * columns, height * rows + 0.9), dpi=100)
    FigureCanvasAgg(figure)  # a canvas of our own: no pyplot, no global backend switch
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for extra in axes[panels:]:
        extra.set_visible(False)
    return figure, axes[:panels]


def _panel_title(group: Group, groups: Sequence[Group]) -> str:
    """The shortest title that still tells the groups apart."""
    parts = []
    for attribute, label in (("dataset", None), ("model", None), ("optimizer", "optimizer")):
        values = {getattr(g, attribute) for g in groups}
        if len(values) > 1 or len(groups) == 1:
            value = getattr(group, attribute)
            parts.append(optimizer_name(value) if label else value)
    return " / ".join(parts) or group.title


def _curve_summary(
    curves: Sequence[Sequence[Mapping[str, Any]]], key: str
) -> tuple[list[float], ...]:
    """Per epoch over seeds: epochs, mean, min and max of ``key`` (in %), skipping missing values."""
    by_epoch: dict[float, list[float]] = {}
    for curve in curves:
        for record in curve:
            value, epoch = record.get(key), record.get("epoch")
            if value is not None and epoch is not None and math.isfinite(value):
                by_epoch.setdefault(float(epoch), []).append(float(value) * 100)
    epochs = sorted(by_epoch)
    return (
        epochs,
        [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs],
        [min(by_epoch[e]) for e in epochs],
        [max(by_epoch[e]) for e in epochs],
    )


def _learning_curves(groups: Sequence[Group]) -> Figure:
    from matplotlib.ticker import MaxNLocator

    figure, axes = _new_figure(len(groups))
    for ax, group in zip(axes, groups, strict=True):
        plotted: list[float] = []
        for result in group.strategies:
            colour = strategy_colour(result.strategy)
            epochs, mean, low, high = _curve_summary(result.curves, "val_accuracy")
            label = f"{result.strategy} (lr {format_lr(result.chosen_lr)})"
            if epochs:
                ax.fill_between(epochs, low, high, color=colour, alpha=0.16, linewidth=0)
                ax.plot(epochs, mean, color=colour, linewidth=1.8, label=label)
                # The y range should show where the curves end up, not the first epochs' climb.
                start = len(mean) // 4
                plotted += mean[start:] + low[start:] + high[start:]
            elif finite(result.val_accuracy_mean):
                # No per-epoch curve (an ensemble of trained members): its final validation
                # accuracy as a dashed reference line.
                value = result.val_accuracy_mean * 100
                ax.axhline(
                    value,
                    color=colour,
                    linestyle=(0, (5, 3)),
                    linewidth=1.4,
                    label=f"{label}, final",
                )
                plotted.append(value)
        if plotted:
            bottom, top = min(plotted), max(plotted)
            span = max(top - bottom, 1.0)
            # Extra room below: the legend sits in the lower right, under the curves' plateau.
            ax.set_ylim(max(0.0, bottom - 0.45 * span), min(100.0, top + 0.08 * span))
        else:
            ax.text(
                0.5,
                0.5,
                "no learning curves recorded",
                transform=ax.transAxes,
                ha="center",
                va="center",
                color="#656d76",
            )
        ax.set_title(_panel_title(group, groups))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
        ax.set_ylabel(f"validation {metric_name(group.dataset)} (%)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(
                loc="best",  # the lower right (kept free below the plateau) unless a curve is there
                ncol=2,
                fontsize=8,
                frameon=True,
                framealpha=0.92,
                edgecolor="#d0d7de",
                columnspacing=1.0,
                handlelength=1.6,
            )
    figure.suptitle("Learning curves at each strategy's chosen learning rate")
    figure.text(
        0.5,
        0.005,
        "line: mean over seeds · band: min–max over seeds",
        ha="center",
        va="bottom",
        fontsize=9,
        color="#656d76",
    )
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    return figure


def _scatter_panel(
    ax: Axes,
    group: Group,
    xs: Mapping[str, float],
    *,
    log_ticks: Sequence[float] | None = None,
    ratio: bool = True,
) -> list[Point]:
    """Accuracy (mean ± std over seeds) against ``xs[strategy]``, one point per strategy; returns
    the points to label once the figure's layout is final.

    ``log_ticks`` makes the x axis logarithmic with ticks (and their labels) at those values: the
    true counts, where ``xs`` may hold positions spread apart for legibility. Otherwise ``ratio``
    says x is a ratio to the baseline (ticks as '2×', always one at 1×) rather than a plain value.
    """
    points = []
    y_low, y_high = math.inf, -math.inf
    for result in group.strategies:
        x = xs.get(result.strategy)
        if x is None or not finite(x) or not finite(result.test_accuracy_mean):
            continue
        colour = strategy_colour(result.strategy)
        y, error = result.test_accuracy_mean * 100, result.test_accuracy_std * 100
        ax.errorbar(
            [x],
            [y],
            yerr=[error],
            fmt=strategy_marker(result.strategy),
            color=colour,
            markersize=8,
            capsize=3,
            elinewidth=1.2,
            markeredgecolor="white",
            markeredgewidth=0.6,
            zorder=3,
        )
        points.append((x, y, error, result.strategy, colour))
        y_low, y_high = min(y_low, y - error), max(y_high, y + error)
    reference = next((r for r in group.strategies if r.strategy == REFERENCE_STRATEGY), None)
    if reference is not None and finite(reference.test_accuracy_mean):
        ax.axhline(
            reference.test_accuracy_mean * 100,
            color=strategy_colour(REFERENCE_STRATEGY),
            linestyle=":",
            linewidth=1,
            alpha=0.7,
            zorder=1,
        )
    if not points:
        ax.text(
            0.5,
            0.5,
            "nothing to plot",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="#656d76",
        )
        return points
    y_span = max(y_high - y_low, 0.5)
    ax.set_ylim(y_low - 0.15 * y_span, y_high + 0.15 * y_span)
    x_values = [p[0] for p in points]
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

    if log_ticks is not None:
        ax.set_xscale("log")
        low, high = min(x_values), max(x_values)
        # Room right of the points for the labels, as a factor on the log axis.
        ax.set_xlim(low / 1.6, high * max(2.2, (high / low) ** 0.35))
        ax.xaxis.set_major_locator(FixedLocator(sorted(set(log_ticks))))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: format_params(round(value))))
        ax.xaxis.set_minor_locator(NullLocator())
    elif not ratio:
        low, high = min(x_values), max(x_values)
        span = max(high - low, 0.1 * abs(high), 1e-9)
        ax.set_xlim(low - 0.12 * span, high + 0.3 * span)
    else:
        low, high = min([*x_values, 1.0]), max([*x_values, 1.0])
        span = max(high - low, 0.2)
        ax.set_xlim(low - 0.12 * span, high + 0.3 * span)
        ticks = list(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(low, high))
        step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
        # The baseline sits at 1×: always a tick there (dropping any too close to read apart).
        ticks = sorted([1.0, *(t for t in ticks if abs(t - 1.0) > 0.4 * step and t > 0)])
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}×"))
    return points


def _dodged(xs: Mapping[str, float], factor: float = 1.07) -> dict[str, float]:
    """Spread points that share an x (same parameter count) slightly apart on a log axis."""
    by_value: dict[float, list[str]] = {}
    for name, value in xs.items():
        by_value.setdefault(value, []).append(name)
    result = {}
    for value, names in by_value.items():
        for index, name in enumerate(names):
            result[name] = value * factor ** (index - (len(names) - 1) / 2)
    return result


def _accuracy_vs_step_time(groups: Sequence[Group]) -> Figure:
    figure, axes = _new_figure(len(groups))
    labels = []
    for ax, group in zip(axes, groups, strict=True):
        ratios = {
            r.strategy: float(r.step_time_ratio)
            for r in group.strategies
            if r.step_time_ratio is not None and finite(r.step_time_ratio)
        }
        if ratios:
            labels.append(_scatter_panel(ax, group, ratios))
            ax.axvline(1.0, color="#8c959f", linestyle=":", linewidth=1, zorder=1)
            ax.set_xlabel("training step time / baseline's (median, ×)")
        else:
            # No baseline to divide by: absolute step times still compare the strategies.
            times = {r.strategy: r.median_step_time * 1e3 for r in group.strategies}
            labels.append(_scatter_panel(ax, group, times, ratio=False))
            ax.set_xlabel("median training step time (ms)")
        ax.set_ylabel(f"test {metric_name(group.dataset)} (%)")  # the data set's metric
        ax.set_title(_panel_title(group, groups))
    figure.suptitle("Test accuracy against training cost")
    _finish_scatter(figure, axes, labels, "mean ± std over seeds · dotted: baseline")
    return figure


def _accuracy_vs_params(groups: Sequence[Group]) -> Figure:
    figure, axes = _new_figure(len(groups))
    labels = []
    for ax, group in zip(axes, groups, strict=True):
        params = {
            r.strategy: float(r.inference_params)
            for r in group.strategies
            if r.inference_params and r.inference_params > 0
        }
        labels.append(_scatter_panel(ax, group, _dodged(params), log_ticks=list(params.values())))
        ax.set_xlabel("inference parameters (log scale)")
        ax.set_ylabel(f"test {metric_name(group.dataset)} (%)")  # the data set's metric
        ax.set_title(_panel_title(group, groups))
    figure.suptitle("Test accuracy against the size of the deployed model")
    _finish_scatter(
        figure,
        axes,
        labels,
        "mean ± std over seeds · dotted: baseline · points with "
        "equal counts are spread slightly sideways",
    )
    return figure


def _finish_scatter(
    figure: Figure,
    axes: Sequence[Axes],
    labels: Sequence[Sequence[Point]],
    footnote: str,
) -> None:
    figure.text(0.5, 0.005, footnote, ha="center", va="bottom", fontsize=9, color="#656d76")
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    # Labels are placed in pixels, so only once the layout has fixed every axes' size.
    for ax, points in zip(axes, labels, strict=True):
        place_labels(ax, points)


def draw_figures(groups: Sequence[Group]) -> list[FigureSpec]:
    """The report's three figures, each rendered as SVG and PNG."""
    import matplotlib

    specs = []
    with matplotlib.rc_context(FIGURE_STYLE):
        for slug, title, caption, build in (
            (
                "learning-curves",
                "Learning curves",
                "Validation accuracy per epoch at each strategy's chosen learning rate: the line is "
                "the mean over seeds, the band spans the lowest to the highest seed. Strategies that "
                "record no per-epoch curve (e.g. an ensemble of trained members) are drawn as a "
                "dashed line at their final validation accuracy.",
                _learning_curves,
            ),
            (
                "accuracy-vs-step-time",
                "Accuracy against step time",
                "Test accuracy (mean ± std over seeds) against the median training-step time "
                "relative to the baseline's in the same group. Up and left is better; the dotted "
                "lines mark the baseline. A distilled student's step includes the teacher's "
                "forward pass but not the teacher's own training (see the wall times).",
                _accuracy_vs_step_time,
            ),
            (
                "accuracy-vs-inference-params",
                "Accuracy against inference parameters",
                "Test accuracy (mean ± std over seeds) against the parameters of the model that is "
                "deployed (log scale). Majority kernels and distillation ship the baseline's size; "
                "an ensemble ships every member.",
                _accuracy_vs_params,
            ),
        ):
            figure = build(groups)
            svg = io.StringIO()
            figure.savefig(svg, format="svg", metadata={"Date": None})
            png = io.BytesIO()
            figure.savefig(png, format="png", dpi=150)
            specs.append(FigureSpec(slug, title, caption, svg.getvalue(), png.getvalue()))
    return specs
