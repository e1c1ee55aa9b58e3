"""Applying a new parameters version to a live model and optimizer, in place.

lr and weight decay change through the param groups, so Adam's moments and
SGD's momentum buffers survive; dropout changes `p` on every dropout module;
only an optimizer switch builds a new optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from livetrain.db.contract import Hyperparameters
from livetrain.trainer.layers import set_dropout

SGD_MOMENTUM = 0.9


def build_optimizer(
    name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    params = list(params)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "SGD+Nesterov":
        return torch.optim.SGD(
            params, lr=lr, weight_decay=weight_decay, momentum=SGD_MOMENTUM, nesterov=True
        )
    if name == "RMSprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def apply_parameters(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    current: Hyperparameters,
    new: Hyperparameters,
) -> torch.optim.Optimizer:
    """Bring model and optimizer to `new`; returns the optimizer now in use.

    Raises (ValueError, RuntimeError) if the model cannot take the values;
    nothing is changed then.
    """
    if new.optimizer != current.optimizer:
        optimizer = build_optimizer(
            new.optimizer, trainable(model), new.learning_rate, new.weight_decay
        )
    else:
        for group in optimizer.param_groups:
            group["lr"] = new.learning_rate
            group["weight_decay"] = new.weight_decay
    if new.dropout != current.dropout:
        set_dropout(model, new.dropout / 100)
    return optimizer


LR_SCHEDULES = ("none", "step", "cosine")


def schedule_factor(kind: str, step: int, total: int) -> float:
    """The multiplier on the base learning rate at `step` of `total`.

    step: x0.1 at each third of the run; cosine: from 1 down to 0 over the run.
    A learning rate set from the board becomes the new base.
    """
    if kind == "step":
        return 0.1 ** (step // max(1, total // 3))
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))
    return 1.0


def learning_rate_in_force(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
