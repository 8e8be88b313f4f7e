"""``--compile``: every strategy's model compiled with ``torch.compile`` by the loop.

``TrainingState.start`` calls :func:`compile_prepared` after the strategy's ``prepare`` (and after
the data-parallel wrapper, if any), so every strategy, and ``sopkit bench``, gets it in one place.
The model is compiled in place (``nn.Module.compile``), not wrapped: the object the strategy's hooks
receive is still the strategy's model, so ``find_majority``, ``collapse``, ``state_dict`` keys and
parameter swaps see what they see in eager mode, and a deep copy (``collapse`` works on one) is an
ordinary eager module (torch drops the compiled call when a module is copied or pickled). Majority
kernels draw and mix outside the graph (:mod:`sopkit.mk.graph`).

Compiled code is shared by every module of a process (dynamo caches it per code object, and the
shapes it has seen decide whether it specialises or goes dynamic). :func:`fresh_compilation` clears
it before each training of a comparison, so a trial compiles the same code whatever trained before
it in its process: the same seed gives the same result with ``--jobs 1`` or ``--jobs N``.
"""

from __future__ import annotations

import torch
from torch import nn

from sopkit.errors import UserError
from sopkit.mk import compiled
from sopkit.training.types import TrainConfig

__all__ = ["compile_prepared", "fresh_compilation"]


def compile_prepared(model: nn.Module, config: TrainConfig, device: torch.device) -> nn.Module:
    """``model`` (a strategy's prepared model on ``device``), compiled in place when
    ``config.compile``; a UserError where torch.compile cannot work (checked before training, not
    at the first step)."""
    if not config.compile:
        return model
    if device.type == "cpu" and not compiled.cxx_compiler_found():
        raise UserError(
            "--compile on the CPU needs a C++ compiler (g++, c++ or clang++ on the PATH, or CXX); "
            "none was found. Install one, or train without --compile."
        )
    try:
        model.compile()  # default mode, fullgraph=False: an expanded model's draw is a graph break
    except RuntimeError as error:  # e.g. a Python version dynamo does not support yet
        raise UserError(f"--compile: torch.compile cannot run here: {error}") from None
    return model


def fresh_compilation(config: TrainConfig) -> None:
    """Forget every compiled graph of the process before a compiled training (nothing otherwise)."""
    if config.compile:
        torch.compiler.reset()  # imports torch._dynamo (seconds): only with --compile
