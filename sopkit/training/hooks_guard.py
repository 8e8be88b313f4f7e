"""Strategy plugins that misbehave, named: which plugin, from which distribution, in which hook.

A plugin (a strategy registered by a distribution other than sopkit through the
``sopkit.strategies`` entry-point group) may raise in any hook or return the wrong type from one.
Either becomes a :class:`PluginError`: a :class:`~sopkit.errors.UserError` whose message names the
strategy, its class, its distribution and version, and the hook, so the CLI prints one paragraph
(exit status 2) and a recorded failed trial carries that message. The original exception stays
attached as ``__cause__`` (with its traceback) for whoever debugs the plugin.

What is checked where, and what it costs:

* :func:`call_hook` runs one of the hooks the loop calls a few times per training (``schedule``,
  ``requires``, ``prepare``, ``evaluation_model``, ``deployable``, ``fit``) and checks what it
  returns.
* The per-step hooks (``before_step``, ``loss``, ``after_backward``, ``after_step``) are not wrapped
  one by one: ``TrainingState.step`` has a single ``try`` around the whole step (free in CPython
  3.11+ while nothing raises) and calls :func:`step_failed` only when something did, which reads the
  hook off the traceback (the frame the step called) and the returned loss off the step's frame.
* Exceptions from sopkit's own strategies pass through unchanged (a bug there keeps its traceback);
  a wrong return type is reported for every strategy.

No torch at import: the registry (and ``sopkit strategies``) imports :class:`PluginError` from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sopkit.errors import UserError

if TYPE_CHECKING:
    from sopkit.training.strategy import Strategy

__all__ = [
    "PluginError",
    "call_hook",
    "plugin_failure",
    "plugin_origin",
    "step_failed",
    "strategy_label",
]

#: The hooks ``TrainingState.step`` calls, in its order.
STEP_HOOKS = ("before_step", "loss", "after_backward", "after_step")


class PluginError(UserError):
    """A strategy (usually a third-party plugin) failed in a hook or returned the wrong type.

    ``strategy`` is its registered name, ``distribution`` the distribution that registers it ("" when
    it is not registered through an entry point) and ``hook`` the hook (``__init__``, ``loss``...).
    """

    def __init__(self, message: str, *, strategy: str, distribution: str, hook: str) -> None:
        super().__init__(message)
        self.strategy = strategy
        self.distribution = distribution
        self.hook = hook


def plugin_origin(cls: type) -> tuple[str, str] | None:
    """(distribution, version) of the entry point registering the class ``cls``, or None when no
    entry point names it (a strategy built in a script or a test)."""
    from sopkit.registry import discover

    target = f"{cls.__module__}:{cls.__qualname__}"
    for entry in discover().values():
        if entry.target.replace(" ", "") == target:
            return entry.distribution, entry.version
    return None


def _is_plugin(strategy: Strategy) -> bool:
    from sopkit.registry import OWN_DISTRIBUTION

    origin = plugin_origin(type(strategy))
    return origin is not None and origin[0] != OWN_DISTRIBUTION


def strategy_label(strategy: Strategy) -> str:
    """``Strategy 'calm' (my_plugin.LogitPenalty) from plugin my-plugin 0.1``: who failed (without
    the distribution when no entry point registers the class)."""
    cls = type(strategy)
    name = getattr(strategy, "name", "") or cls.__name__.lower()
    origin = plugin_origin(cls)
    where = "" if origin is None else f" from plugin {origin[0]} {origin[1]}".rstrip()
    return f"Strategy {name!r} ({cls.__module__}.{cls.__qualname__}){where}"


def _error(strategy: Strategy, hook: str, message: str) -> PluginError:
    origin = plugin_origin(type(strategy))
    return PluginError(
        f"{strategy_label(strategy)} {message}",
        strategy=getattr(strategy, "name", type(strategy).__name__),
        distribution="" if origin is None else origin[0],
        hook=hook,
    )


def hook_error(strategy: Strategy, hook: str, error: BaseException) -> PluginError:
    """The error for ``strategy`` raising ``error`` in ``hook`` (to be raised ``from error``)."""
    return _error(strategy, hook, f"failed in its {hook}() hook: {type(error).__name__}: {error}")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80] + '...' if len(text) > 80 else text}"


def _check_returned(strategy: Strategy, hook: str, value: Any) -> None:
    """A PluginError when ``value`` is not what ``hook`` must return."""
    expected: str | None = None
    if hook in ("prepare", "evaluation_model", "deployable"):
        from torch import nn

        if not isinstance(value, nn.Module):
            expected = "a torch.nn.Module"
    elif hook == "schedule":
        from sopkit.training.config import TrainConfig

        if not isinstance(value, TrainConfig):
            expected = "a TrainConfig (e.g. its config argument, or dataclasses.replace of it)"
    elif hook == "requires":
        from sopkit.training.strategy import Requirement

        if not isinstance(value, Mapping) or not all(
            isinstance(key, str) and isinstance(item, Requirement) for key, item in value.items()
        ):
            expected = "a mapping of names (str) to sopkit.training.strategy.Requirement"
    elif hook == "fit":
        from sopkit.training.types import TrainResult

        if not isinstance(value, TrainResult):
            expected = "a TrainResult (what session.train returns)"
    elif hook == "identity":
        try:
            hash(value)  # it keys the session's finished trainings and the checkpoints
        except TypeError:
            expected = "a hashable value (e.g. a tuple of its name and options)"
    if expected is not None:
        raise _error(strategy, hook, f"returned {_describe(value)} from {hook}(); it must return "
                     f"{expected}.")


def call_hook(strategy: Strategy, hook: str, *args: Any) -> Any:
    """``strategy.<hook>(*args)``, its return value checked; a plugin's exception becomes a
    :class:`PluginError` naming it and the hook."""
    try:
        value = getattr(strategy, hook)(*args)
    except UserError:
        raise  # already the user's message (an option out of range, another plugin's error...)
    except Exception as error:
        if not _is_plugin(strategy):
            raise
        raise hook_error(strategy, hook, error) from error
    _check_returned(strategy, hook, value)
    return value


def plugin_failure(strategy: Strategy, error: Exception, hook: str) -> PluginError | None:
    """``error`` as a PluginError when a plugin is to blame (it is one already, or ``strategy`` is
    a plugin's and raised it in ``hook``), else None: a caller that can go on without ``strategy``
    (``sopkit bench`` of every strategy) turns a plugin's failure into a row."""
    if isinstance(error, PluginError):
        return error
    if isinstance(error, UserError) or not _is_plugin(strategy):
        return None
    return hook_error(strategy, hook, error)


def _loss_problem(loss: Any, in_backward: bool) -> str | None:
    """Why ``loss`` (what the loss hook returned) cannot be trained on, or None; whether it needs a
    gradient is asked only when ``backward`` failed (after it, the step holds the detached loss)."""
    import torch

    if not isinstance(loss, torch.Tensor):
        return f"returned {_describe(loss)} from loss(); it must return a scalar tensor"
    if loss.numel() != 1 or loss.dim() != 0:
        return (f"returned a tensor of shape {tuple(loss.shape)} from loss(); it must return a "
                "scalar (0-dimensional) tensor, e.g. the mean of per-example losses")
    if in_backward and not loss.requires_grad:
        return ("returned a tensor that does not require grad from loss(); it must be computed "
                "from the model's output (not detached, not under torch.no_grad)")
    return None


def step_failed(strategy: Strategy, error: Exception) -> None:
    """Called by ``TrainingState.step`` when its step raised ``error``: raises a PluginError when a
    plugin's step hook (or the loss it returned) is to blame; returns otherwise (the caller
    re-raises ``error`` as it is)."""
    if isinstance(error, UserError) or not _is_plugin(strategy):
        return
    step_tb: TracebackType | None = error.__traceback__
    if step_tb is None:
        return
    called = step_tb.tb_next  # the frame the step called when it failed
    if called is not None:
        frame = called.tb_frame
        if frame.f_code.co_name in STEP_HOOKS and frame.f_locals.get("self") is strategy:
            raise hook_error(strategy, frame.f_code.co_name, error) from error
    # Not inside a hook: the loop's own calls (backward, optimizer) failed. A wrong loss is the
    # usual cause (a non-scalar tensor cannot be backpropagated, a non-tensor has no .backward).
    step_locals = step_tb.tb_frame.f_locals
    in_backward = called is not None and called.tb_frame.f_code.co_name == "backward"
    if "loss" in step_locals:
        problem = _loss_problem(step_locals["loss"], in_backward)
        if problem is not None:
            raise _error(strategy, "loss", problem + ".") from error
        if in_backward:
            raise _error(
                strategy, "loss",
                f"returned a loss whose backward() failed: {type(error).__name__}: {error}",
            ) from error
