"""Hooks around the user's `optimizer.step()`: the place a loop we did not write still
passes through between its backward pass and its update.

Before the update: clip the gradients when the board asks for clipping (unless the
framework clips them itself), and refuse an update whose gradients are not finite
(livetrain.trainer.guard: on the device, without a host read, unless the run asked for
the exact guard); on a step that logs, note each watched layer's gradient norm and
weights. After it: the update-to-weight ratios.

Under GradScaler with a fused optimizer, the scaler hands the optimizer its scale and
its own `found_inf`: the gradients are unscaled here first, so that clipping and
telemetry see the true ones, and the scaler's skip stands for the guard's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from livetrain.trainer.run import LiveRun


class UpdateHooks:
    """The optimizer hooks of one run; moved to the new optimizer after a switch."""

    def __init__(self, run: LiveRun) -> None:
        self.run = run
        self.logging = False  # the coming update belongs to a step that logs
        self.measuring = False  # ... and that log measures the layers (cadence.py)
        # Group 0's lr in the last update: what a row shows, also when a scheduler (the
        # Trainer's, after each update) has already moved the optimizer to the next one.
        self.last_lr: float | None = None
        self._dropped = False
        self._measuring = False
        self._handles: list[RemovableHandle] = []
        self._told_fused = False
        self.attach(run.optimizer)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self.remove()
        if (switched := self.run.guard.adopt(optimizer)) and not self._told_fused:
            self._told_fused = True  # once a run: a rollback fuses the restored one again
            self.run.writer.event("info", "optimizer_fused", switched,
                                  step=self.run.global_step)
        self._handles = [optimizer.register_step_pre_hook(self._before),
                         optimizer.register_step_post_hook(self._after)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def take_dropped(self) -> bool:
        """Whether an update was refused since the last call."""
        dropped, self._dropped = self._dropped, False
        return dropped

    def _before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.last_lr = float(optimizer.param_groups[0]["lr"])
        if self.run.gradients_before_step:
            self.before_update(optimizer)

    def before_update(self, optimizer: torch.optim.Optimizer) -> None:
        """Between the backward pass and the update: the optimizer's pre-step hook, or
        (where backward runs inside `optimizer.step(closure)`) the framework's own hook."""
        params = [p for group in optimizer.param_groups for p in group["params"]
                  if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        scaler_skips = self.run.guard.scaler_skips(optimizer)
        if scaler_skips and getattr(optimizer, "grad_scale", None) is not None:
            torch._foreach_mul_(grads, optimizer.grad_scale.reciprocal())
            optimizer.grad_scale = None  # unscaled now: the fused step must not divide again
        clip = self.run.control.params.grad_clip if self.run.clips_in_hook else 0.0
        total = None
        if clip > 0:
            total = nn.utils.clip_grad_norm_(params, clip)
        elif (known := self.run.known_gradient_norm()) is not None:
            total = torch.as_tensor(known)
        if not scaler_skips and self.run.guard.check(optimizer, params, grads, total):
            for p in params:  # exact: the update would spread NaN or inf into the weights
                p.grad = None
            self._dropped = True
            return
        if self.measuring and not (
                scaler_skips and optimizer.found_inf.item()):  # a log step may read
            self.run.probe.before_update()  # gradient norms, weights before the step
            self._measuring = True

    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.run.guard.after_step(optimizer)
        if self._measuring:
            self.run.probe.after_update()  # update:parameter ratios
            self._measuring = False
