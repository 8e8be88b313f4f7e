"""Numbers to the text a report prints: accuracies, rates, durations, parameter counts, seeds."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

from sopkit.experiment.plan import PAPER_LR_BASE, PAPER_LR_EXPONENTS

OPTIMIZER_ORDER = ("adam", "sgd")  # Table 1's column order
OPTIMIZER_NAMES = {"adam": "Adam", "sgd": "SGD"}


def finite(value: float | None) -> bool:
    """Whether ``value`` is a number that can be printed or plotted (not None, NaN or infinite)."""
    return value is not None and isinstance(value, int | float) and math.isfinite(value)


def format_params(count: int) -> str:
    """1234567 -> '1.23M'; exact counts stay in summary.json."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= limit:
            return f"{count / limit:.3g}{suffix}"
    return str(count)


def format_accuracy(mean: float, std: float, seeds: int) -> str:
    """Mean ± std in percent with two decimals, as the paper's Table 1 prints them."""
    if not finite(mean):
        return "n/a"
    if seeds < 2:
        return f"{mean * 100:.2f} (1 seed)"
    return f"{mean * 100:.2f} ± {std * 100:.2f}"


def format_lr(lr: float | None) -> str:
    """Three significant digits: 0.001 * 1.5^-4 -> '0.000198'."""
    return "none" if lr is None else f"{lr:.3g}"


def format_ratio(ratio: float | None, decimals: int = 2) -> str:
    """A ratio to the baseline: 1.9 -> '1.90×'."""
    return f"{ratio:.{decimals}f}×" if ratio is not None and math.isfinite(ratio) else "n/a"


def format_duration(seconds: float | None) -> str:
    """Wall times from seconds to hours, in the unit a reader would use."""
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest:02d} s"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min"


def format_step_time(seconds: float | None) -> str:
    """Three significant digits, trailing zeros kept (4.00 ms next to 7.48 ms)."""
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    value, unit = (seconds * 1e3, "ms") if seconds < 1 else (seconds, "s")
    return f"{value:.0f} {unit}" if value >= 100 else f"{value:#.3g} {unit}"


def format_pp(value: float) -> str:
    """A difference of accuracies (fractions) in percentage points, always signed."""
    return f"{value * 100:+.2f}"


def optimizer_name(optimizer: str) -> str:
    """'adam' -> 'Adam', as the paper names them; unknown names unchanged."""
    return OPTIMIZER_NAMES.get(optimizer, optimizer)


def describe_lr_grid(optimizer: str, rates: Sequence[float]) -> str:
    """A grid in the paper's terms when it is one (``0.001·1.5^i, i ∈ [-2..2]``), else the rates."""
    rates = sorted(rates)
    if not rates:
        return "none"
    centre = PAPER_LR_BASE.get(optimizer)
    if centre is not None:
        exponents = [math.log(lr / centre) / math.log(1.5) for lr in rates]
        # A rate near the float limit gives an infinite exponent: not a grid point, just a rate.
        if all(math.isfinite(e) and abs(e - round(e)) < 1e-6 for e in exponents):
            ints = [round(e) for e in exponents]
            if len(ints) == 1:
                return f"1 rate: {format_lr(rates[0])} = {centre:g}·1.5^{ints[0]}"
            if ints == list(range(ints[0], ints[-1] + 1)):
                span = f"i ∈ [{ints[0]}..{ints[-1]}]"
            else:
                span = "i ∈ {" + ", ".join(map(str, ints)) + "}"
            low, high = PAPER_LR_EXPONENTS[0], PAPER_LR_EXPONENTS[-1]
            paper = (
                "the paper's full grid"
                if (ints[0], ints[-1], len(ints)) == (low, high, high - low + 1)
                else f"the paper uses i ∈ [{low}..{high}]"
            )
            return f"{len(rates)} rates {centre:g}·1.5^i, {span} ({paper})"
    return f"{len(rates)} rate{'s' if len(rates) > 1 else ''}: " + ", ".join(map(format_lr, rates))


def seed_list(seeds: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0–2, 5'."""
    values = sorted(set(seeds))
    parts: list[str] = []
    start = previous = None
    for seed in [*values, None]:
        if seed is not None and previous is not None and seed == previous + 1:
            previous = seed
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}–{previous}")
        start = previous = seed
    return ", ".join(parts) if parts else "none"


def architecture(model: str) -> str:
    """'mlp-a2' -> '[200, 100]' (Table 1's "Architecture" column), from the model registry."""
    try:
        # The registry imports torch; a report must still be written if that fails for any reason.
        from sopkit.models.registry import MODELS
    except Exception:
        return ""
    spec = MODELS.get(model)
    if spec is None:
        return ""
    match = re.search(r"hidden widths (\[[^\]]*\])", spec.description)
    if match:
        return match.group(1)
    return re.split(r";| for ", spec.description)[0].strip()
