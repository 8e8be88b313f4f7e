"""Majority kernels (paper Section 4, Algorithm 4.1, Eq. 4.2): expand a model, mix its copies, collapse.

Where things are:

- :mod:`sopkit.mk.convert`: ``expand`` / ``collapse`` (a model to majority kernels and back),
  which layers are expanded (``EXPANDABLE``), how the copies start (``INIT_MODES``), and
  ``fixed_mixing`` / ``fixed_weights``.
- :mod:`sopkit.mk.kernels`: the ``MajorityKernels`` container an expanded model carries, its
  forward hooks, ``find_majority``, ``is_expanded``, ``count_parameters``.
- :mod:`sopkit.mk.sampling`: where ``p`` is drawn: the model's random stream (seed, step), the
  samplers and their choice, one step's ``MixingDraw``.
- :mod:`sopkit.mk.sfc64`, :mod:`sopkit.mk.compiled`, :mod:`sopkit.mk.triton`: the three fast
  samplers (numpy SFC64 on CPU threads, an inductor-compiled CPU kernel, a fused CUDA kernel).
- :mod:`sopkit.mk.autograd`: the mixing as autograd Functions, and what backward keeps of ``p``.
- :mod:`sopkit.mk.buffers`: reusable CPU buffers with an explicit lifecycle.
- :mod:`sopkit.mk.graph`: ``torch.compile`` of an expanded model (the mixing outside the graph).

``sopkit.majority`` is the documented public alias of this package's API.
"""

from __future__ import annotations

from sopkit.mk.autograd import BACKWARD_MODES
from sopkit.mk.buffers import pooled_buffer
from sopkit.mk.convert import (
    DEFAULT_INIT,
    EXPANDABLE,
    INIT_MODES,
    STREAM_TAG,
    collapse,
    expand,
    fixed_mixing,
    fixed_weights,
)
from sopkit.mk.kernels import (
    COPIES_NAME,
    MajorityKernels,
    count_parameters,
    find_majority,
    is_expanded,
)
from sopkit.mk.sampling import (
    COMPILED_MIN_WEIGHTS,
    SAMPLERS,
    MixingDraw,
    MixingStream,
    derive_seed,
    draw_seed,
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
