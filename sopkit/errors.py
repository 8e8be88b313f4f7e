"""Errors that are the user's to fix.

The CLI turns a :class:`UserError` into a one-paragraph message and exit status 2, never a traceback.
Library code raises it for bad names, bad values and missing files; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class UserError(ValueError):
    """A mistake in what the user asked for (an unknown name, a bad value, a missing file).

    A ``ValueError``, so that library callers (``sopkit.expand(model, expansion=1)``) can catch it
    the way they catch any bad argument."""


def unknown_name(
    kind: str, name: str, valid: Iterable[str], plural: str | None = None
) -> UserError:
    """The error for a name that is not in a registry, listing the names that are."""
    choices = ", ".join(sorted(valid))
    kinds = plural or (kind[:-1] + "ies" if kind.endswith("y") else kind + "s")
    return UserError(f"Unknown {kind} {name!r}. Valid {kinds}: {choices}.")
