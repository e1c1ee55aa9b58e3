"""What the Lightning and transformers callbacks share: a LiveRun driven by a framework's
hooks instead of by the user's own loop.

The framework owns the loop, the optimizer and its clipping setting, so the run
changes them through the framework's mechanisms: lr and weight decay on every
optimizer's param groups, clipping through the trainer's own setting, an optimizer
switch only where the framework lets another optimizer in (else it is refused with
the reason, and the run keeps training). A framework validates after the step's
callback returns, so a step's log waits for the next step's start (`flush_log`), and
the validation the framework ran lands in the row of the step it followed.
"""

from __future__ import annotations

import atexit
import math
import sys
import threading
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

import torch
from torch import nn

from livetrain.db.contract import Hyperparameters
from livetrain.trainer.run import LiveRun
from livetrain.trainer.steering import rescale_learning_rates, set_weight_decay


class FrameworkRun(LiveRun):
    """A LiveRun whose steps, validations and clipping belong to a training framework."""

    clips_in_hook = False
    defer_logs = True
    final_checkpoint = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 others: Sequence[torch.optim.Optimizer] = (), **options: Any) -> None:
        self.other_optimizers = list(others)  # manual optimization's further optimizers
        self.watch: LoopWatch | None = None
        # Ctrl-C keeps the framework's own meaning (Lightning shuts down gracefully).
        options.setdefault("handle_signals", False)
        super().__init__(model, optimizer, **options)
        # transformers has no exception hook for callbacks: when an error ends the process
        # inside its loop, the run still ends `failed`, with its last rows written.
        atexit.register(self._ended_inside_the_loop)

    def close(self, error: BaseException | None = None) -> None:
        atexit.unregister(self._ended_inside_the_loop)
        if self.watch is not None:
            self.watch.close()
        super().close(error)

    def watch_loop(self, module: str, function: str) -> None:
        """Watch the framework's training call (`module.function`, found on this thread's
        stack) for an exit without the end-of-training hook."""
        frame = caller_frame(module, function)
        if frame is not None:
            self.watch = LoopWatch(self, frame)
        del frame  # the watch keeps no reference to the loop's locals

    def _ended_inside_the_loop(self) -> None:
        error = getattr(sys, "last_value", None)  # the uncaught exception, once printed
        if not isinstance(error, BaseException):
            error = RuntimeError("the process ended inside the framework's training loop, "
                                 "before its end-of-training hook")
        self.close(error)

    def apply_parameters(self, current: Hyperparameters, new: Hyperparameters) -> None:
        super().apply_parameters(current, new)
        for optimizer in self.other_optimizers:  # each keeps its own ratios to the base
            if new.learning_rate != current.learning_rate:
                rescale_learning_rates(optimizer, (), current.learning_rate, new.learning_rate)
            if new.weight_decay != current.weight_decay:
                set_weight_decay(optimizer, current.weight_decay, new.weight_decay)
        if new.grad_clip != current.grad_clip:
            self.set_grad_clip(new.grad_clip)

    def set_grad_clip(self, max_norm: float) -> None:
        """Hand the board's clipping (0: off) to the framework's own clipping setting."""
        raise NotImplementedError


class LoopWatch:
    """Ends a run `failed` when the framework's training call is left without its
    end-of-training hook: an exception that a notebook or the program around it caught
    (transformers calls no callback on errors). It looks, once a second, whether the
    training thread's stack still holds the frame of that call."""

    PERIOD_SECONDS = 1.0

    def __init__(self, run: LiveRun, loop_frame: FrameType) -> None:
        self.run = run
        self.thread_id = threading.get_ident()
        self.frame_id, self.code = id(loop_frame), loop_frame.f_code  # no reference kept
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="livetrain-loop-watch",
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.done.set()

    def _in_loop(self) -> bool:
        frame = sys._current_frames().get(self.thread_id)
        while frame is not None:
            if id(frame) == self.frame_id and frame.f_code is self.code:
                return True
            frame = frame.f_back
        return False

    def _watch(self) -> None:
        while not self.done.wait(self.PERIOD_SECONDS):
            if self.run.status is not None:
                return
            if not self._in_loop():
                self.run.close(RuntimeError(
                    "the training loop ended without its end-of-training hook (an exception "
                    "inside it, caught by the program around it)"))
                return


def caller_frame(module: str, function: str) -> FrameType | None:
    """The frame of `module.function` on this thread's stack (the framework's training
    loop, seen from inside one of its callbacks); None when it is not there."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == function and frame.f_globals.get("__name__") == module:
            return frame
        frame = frame.f_back
    return None


def loop_variable(module: str, name: str) -> Any:
    """The value of local variable `name` in the innermost frame of `module` on this
    thread's stack that holds one (a figure the framework's loop computed and handed no
    callback); None when no such frame holds it."""
    frame = sys._getframe(1)
    try:
        while frame is not None:
            if frame.f_globals.get("__name__") == module and name in frame.f_code.co_varnames:
                return frame.f_locals.get(name)
            frame = frame.f_back
        return None
    finally:
        del frame


def as_loss(value: Any) -> torch.Tensor | None:
    """The training loss in what a framework's step returned: a tensor, or a mapping's
    "loss" (a Lightning training_step dict, a transformers ModelOutput); None without one."""
    if isinstance(value, Mapping):
        value = value.get("loss")
    if isinstance(value, torch.Tensor) and value.numel() >= 1:
        return value.detach()
    return None


def mean_loss(losses: list[torch.Tensor]) -> torch.Tensor | None:
    """The step's loss over its gradient-accumulation micro-batches (None: none seen)."""
    if not losses:
        return None
    return torch.stack([loss.float().mean() for loss in losses]).mean()


def metric(metrics: Mapping[str, Any], names: str | Sequence[str]) -> float | None:
    """The first of `names` (or the one name) that `metrics` holds as a number."""
    for name in (names,) if isinstance(names, str) else names:
        value = metrics.get(name)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def percent(accuracy: float | None) -> float | None:
    """A framework's accuracy (a fraction, as torchmetrics and `evaluate` give it) in the
    percent the contract stores; a value already above 1 is taken as a percent."""
    if accuracy is None or not math.isfinite(accuracy):
        return None
    return accuracy * 100.0 if accuracy <= 1.0 else accuracy


def json_safe(values: Mapping[str, Any]) -> dict[str, Any]:
    """The plain values of a config (numbers, strings, booleans, None), for the run's row."""
    return {str(k): v for k, v in values.items()
            if v is None or isinstance(v, bool | int | float | str)}
