"""train.py's --lr-schedule: the playground's learning-rate schedules, as torch schedulers.

They are ordinary `LambdaLR`s handed to LiveRun, which treats them as any user's
scheduler: a learning rate set from the board becomes the schedule's new base.
"""

from __future__ import annotations

import math

import torch

LR_SCHEDULES = ("none", "step", "cosine", "linear", "warmup", "onecycle")
WARMUP_FRACTION = 0.1  # warmup: the first 10 % of the run ramps the lr up from 0
ONECYCLE_RISE = 0.3  # onecycle: 30 % of the run up to the set lr, then down (torch's default)
ONECYCLE_START = 1 / 25  # ... from 1/25 of it (torch's div_factor) ...
ONECYCLE_END = ONECYCLE_START / 1e4  # ... and down to 1/1e4 of that (final_div_factor)


def _cosine(start: float, end: float, progress: float) -> float:
    """From start to end along half a cosine as progress goes from 0 to 1."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def schedule_factor(kind: str, step: int, total: int) -> float:
    """The multiplier on the base learning rate at `step` of `total`.

    step: x0.1 at each third of the run; cosine: from 1 down to 0 over the run; linear:
    from 1 down to 0 in a straight line (the Hugging Face Trainer's default); warmup: from
    0 up to 1 over the first 10 %, then 1; onecycle: torch's OneCycleLR shape, with the
    set lr as its peak.
    """
    total = max(1, total)
    if kind == "step":
        return 0.1 ** (step // max(1, total // 3))
    if kind == "cosine":
        return _cosine(1.0, 0.0, step / total)
    if kind == "linear":
        return max(0.0, 1 - step / total)
    if kind == "warmup":
        return min(1.0, (step + 1) / max(1, round(WARMUP_FRACTION * total)))
    if kind == "onecycle":
        rise = max(1, round(ONECYCLE_RISE * total))
        if step < rise:
            return _cosine(ONECYCLE_START, 1.0, step / rise)
        return _cosine(1.0, ONECYCLE_END, (step - rise) / max(1, total - rise))
    return 1.0


def lr_scheduler(kind: str, optimizer: torch.optim.Optimizer, total: int
                 ) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The schedule `kind` over `total` steps (stepped once per training step), or None."""
    if kind == "none":
        return None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule_factor(kind, step, total))
