"""Data set parameters in the name a user types: ``NAME:KEY=VALUE[,KEY=VALUE]``.

A data set that can make more data (MNIST-1D generates its samples from code) takes parameters in
its name, e.g. ``mnist1d:samples=20000``. The name is what a trial's key holds, so a set named
without parameters keeps the key of every trial stored before parameters existed, and a set named
with them is a different data set with its own trials. ``glue:cola`` is a name, not a parameter:
only a part after ``:`` holding ``=`` is read as parameters.
"""

from __future__ import annotations

from sopkit.errors import UserError

#: ``mnist1d:samples=N``: N samples generated in all, 80% for training (validation is carved from
#: those) and 20% for test, as the published recipe splits its 5,000.
MNIST1D_SAMPLES = "samples"
MNIST1D_PUBLISHED_SAMPLES = 5000
#: Enough for a validation split that tells strategies apart; more is memory and minutes spent.
MNIST1D_MAX_SAMPLES = 2_000_000
MNIST1D_MIN_SAMPLES = 50


def split_parameters(name: str) -> tuple[str, dict[str, str]]:
    """``"mnist1d:samples=20000"`` -> ``("mnist1d", {"samples": "20000"})``; a name without
    parameters (``"glue:cola"``) comes back whole with none."""
    base, sep, rest = name.partition(":")
    if not sep or "=" not in rest:
        return name, {}
    parameters: dict[str, str] = {}
    for part in rest.split(","):
        key, eq, value = part.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise UserError(
                f"Data set {name!r}: parameters are KEY=VALUE separated by commas "
                f"(e.g. mnist1d:samples=20000), got {part!r}."
            )
        if key.strip() in parameters:
            raise UserError(f"Data set {name!r}: {key.strip()} is given twice.")
        parameters[key.strip()] = value.strip()
    return base, parameters


def mnist1d_samples(parameters: dict[str, str]) -> int | None:
    """The number of MNIST-1D samples to generate; None when not given: the recipe's own (the
    published 5,000), with the cache key of every cache written before the parameter existed."""
    text = parameters.get(MNIST1D_SAMPLES)
    if text is None:
        return None
    try:
        samples = int(text)
    except ValueError:
        samples = -1
    if not MNIST1D_MIN_SAMPLES <= samples <= MNIST1D_MAX_SAMPLES:
        raise UserError(
            f"mnist1d:samples={text}: give a whole number from {MNIST1D_MIN_SAMPLES:,} to "
            f"{MNIST1D_MAX_SAMPLES:,} (the published set has {MNIST1D_PUBLISHED_SAMPLES:,})."
        )
    return samples
