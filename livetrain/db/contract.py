"""The contract between trainer and board, defined once: what may be steered and how a
run's life is told.

- The steerable parameters and their ranges. The board, the trainer and the database
  schema (CHECK constraints) all validate against these rules, so a value refused in the
  browser is refused by SQL too.
- The run statuses, the heartbeat period and when a silent trainer counts as lost.

Trainer and board both import this module; neither imports the other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

RUN_STATUSES: tuple[str, ...] = ("running", "paused", "stopped", "finished", "failed")
LIVE_STATUSES: tuple[str, ...] = ("running", "paused")  # a trainer reads the parameters row
HEARTBEAT_SECONDS = 2.0  # a live trainer stamps runs.dt_heartbeat this often
LOST_AFTER_SECONDS = 3 * HEARTBEAT_SECONDS  # three missed heartbeats: the trainer is lost


def effective_status(run: Mapping[str, Any], now: datetime) -> str:
    """The stored status, or "lost" when a live run's trainer stopped sending heartbeats."""
    status = run["status"]
    if status in LIVE_STATUSES and heartbeat_age(run, now) > LOST_AFTER_SECONDS:
        return "lost"
    return status


def heartbeat_age(run: Mapping[str, Any], now: datetime) -> float:
    return (now - run["dt_heartbeat"]).total_seconds()


def is_live(status: str) -> bool:
    """True while a trainer still reads the parameters row (a lost one may come back)."""
    return status in (*LIVE_STATUSES, "lost")

OPTIMIZERS: tuple[str, ...] = ("Adam", "AdamW", "SGD", "SGD+Nesterov", "RMSprop")

LR_MAX = 1.0  # 0 < learning_rate <= LR_MAX
WEIGHT_DECAY_MAX = 1.0  # 0 <= weight_decay <= WEIGHT_DECAY_MAX
DROPOUT_MAX = 90  # 0 <= dropout <= DROPOUT_MAX, integer percent
GRAD_CLIP_MAX = 1000.0  # 0 <= grad_clip <= GRAD_CLIP_MAX; 0 turns clipping off

DEFAULTS: dict[str, Any] = {  # the seed article's suggested start
    "optimizer": "Adam",
    "learning_rate": 3e-4,
    "weight_decay": 0.0,
    "dropout": 50,
}


@dataclass(frozen=True)
class Hyperparameters:
    optimizer: str
    learning_rate: float
    weight_decay: float
    dropout: int  # percent
    grad_clip: float = 0.0  # max gradient L2 norm; 0 = no clipping

    def changes_from(self, other: Hyperparameters) -> dict[str, tuple[Any, Any]]:
        """Fields that differ, as {name: (old, new)}."""
        return {
            name: (getattr(other, name), getattr(self, name))
            for name in ("optimizer", "learning_rate", "weight_decay", "dropout", "grad_clip")
            if getattr(other, name) != getattr(self, name)
        }


def _number(value: Any) -> float | None:
    """A finite float from a number or numeric string, else None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def validate(
    optimizer: Any, learning_rate: Any, weight_decay: Any, dropout: Any, grad_clip: Any = 0.0
) -> tuple[Hyperparameters | None, dict[str, str]]:
    """Check raw values (from a form, a CLI or a database row).

    Returns the parsed parameters and no errors, or None and a message per bad field.
    """
    errors: dict[str, str] = {}
    if optimizer not in OPTIMIZERS:
        errors["optimizer"] = f"optimizer must be one of {', '.join(OPTIMIZERS)}"

    lr = _number(learning_rate)
    if lr is None:
        errors["learning_rate"] = "learning rate must be a finite number"
    elif not 0 < lr <= LR_MAX:
        errors["learning_rate"] = f"learning rate must be > 0 and <= {LR_MAX:g}"

    wd = _number(weight_decay)
    if wd is None:
        errors["weight_decay"] = "weight decay must be a finite number"
    elif not 0 <= wd <= WEIGHT_DECAY_MAX:
        errors["weight_decay"] = f"weight decay must be between 0 and {WEIGHT_DECAY_MAX:g}"

    dp = _number(dropout)
    if dp is None or dp != int(dp):
        errors["dropout"] = "dropout must be a whole number of percent"
    elif not 0 <= dp <= DROPOUT_MAX:
        errors["dropout"] = f"dropout must be between 0 and {DROPOUT_MAX} %"

    clip = _number(grad_clip)
    if clip is None:
        errors["grad_clip"] = "gradient clipping must be a finite number (0 = off)"
    elif not 0 <= clip <= GRAD_CLIP_MAX:
        errors["grad_clip"] = f"gradient clipping must be between 0 (off) and {GRAD_CLIP_MAX:g}"

    if errors:
        return None, errors
    return Hyperparameters(optimizer, lr, wd, int(dp), clip), {}
