"""train.py's --lr-schedule: the playground's learning-rate schedules, as torch schedulers.

They are ordinary `LambdaLR`s handed to LiveRun, which treats them as any user's
scheduler: a learning rate set from the board becomes the schedule's new base.
"""

from __future__ import annotations

import math

import torch

LR_SCHEDULES = ("none", "step", "cosine")


def schedule_factor(kind: str, step: int, total: int) -> float:
    """The multiplier on the base learning rate at `step` of `total`.

    step: x0.1 at each third of the run; cosine: from 1 down to 0 over the run.
    """
    if kind == "step":
        return 0.1 ** (step // max(1, total // 3))
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))
    return 1.0


def lr_scheduler(kind: str, optimizer: torch.optim.Optimizer, total: int
                 ) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The schedule `kind` over `total` steps (stepped once per training step), or None."""
    if kind == "none":
        return None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule_factor(kind, step, total))
