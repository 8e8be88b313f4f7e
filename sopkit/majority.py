"""Public alias of :mod:`sopkit.mk` (permanent: the README documents these paths).

``sopkit.majority.EXPANDABLE[MyLayer] = ("kernel",)`` teaches ``expand`` a custom layer and
``sopkit.majority.find_majority(model)`` returns an expanded model's ``MajorityKernels``. Every name
here is the very same object as in :mod:`sopkit.mk` (``EXPANDABLE`` is one dict), so either path
reads and changes the same state. The implementation lives in :mod:`sopkit.mk`.
"""

from __future__ import annotations

from sopkit.mk import (
    BACKWARD_MODES,
    COMPILED_MIN_WEIGHTS,
    COPIES_NAME,
    DEFAULT_INIT,
    EXPANDABLE,
    INIT_MODES,
    SAMPLERS,
    STREAM_TAG,
    MajorityKernels,
    MixingDraw,
    MixingStream,
    collapse,
    count_parameters,
    derive_seed,
    draw_seed,
    expand,
    find_majority,
    fixed_mixing,
    fixed_weights,
    is_expanded,
    pooled_buffer,
    sample_dirichlet,
)

__all__ = [
    "BACKWARD_MODES",
    "COMPILED_MIN_WEIGHTS",
    "COPIES_NAME",
    "DEFAULT_INIT",
    "EXPANDABLE",
    "INIT_MODES",
    "SAMPLERS",
    "STREAM_TAG",
    "MajorityKernels",
    "MixingDraw",
    "MixingStream",
    "collapse",
    "count_parameters",
    "derive_seed",
    "draw_seed",
    "expand",
    "find_majority",
    "fixed_mixing",
    "fixed_weights",
    "is_expanded",
    "pooled_buffer",
    "sample_dirichlet",
]
