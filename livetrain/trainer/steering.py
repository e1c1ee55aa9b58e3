"""Applying a new parameters version to a live model and optimizer, in place.

lr and weight decay change through the param groups, so Adam's moments and SGD's
momentum buffers survive; dropout changes `p` on every dropout module; only an
optimizer switch builds a new optimizer, over the same param groups.

Param groups keep their ratios: a backbone at 1e-5 and a head at 1e-3 stay 100:1
when the board sets a new lr. Group 0's lr is the run's base lr, the one the board
shows. A learning-rate scheduler takes a change as its new base: its base lrs are
scaled by the same factor, so the schedule goes on from the new value instead of
undoing it at its next step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from livetrain.db.contract import OPTIMIZERS, Hyperparameters
from livetrain.trainer.inspection import sparse_parameters
from livetrain.trainer.layers import dropout_percent, set_dropout

SGD_MOMENTUM = 0.9
# Per-group keys that hold learning rates a scheduler keeps: scaled with the lr.
SCHEDULED_LR_KEYS = ("initial_lr", "max_lr", "min_lr")
SCHEDULER_LR_LISTS = ("base_lrs", "max_lrs", "min_lrs", "_last_lr")

Groups = Iterable[nn.Parameter] | Sequence[dict[str, Any]]


# The contract's optimizers whose torch step takes sparse gradients (without weight
# decay); Adam, AdamW and RMSprop raise on them.
SPARSE_OPTIMIZERS = ("SGD", "SGD+Nesterov")


def build_optimizer(name: str, params: Groups, lr: float, weight_decay: float
                    ) -> torch.optim.Optimizer:
    """The optimizer `name` over `params`: parameters, or param groups (dicts) whose own
    lr and weight_decay, when they hold them, win over the defaults given here. No
    parameters at all (a parameter-free or frozen model) make one empty group: torch
    refuses an empty list, and the run still needs an optimizer the board can steer."""
    params = list(params) or [{"params": []}]
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


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """The contract's name for a user's optimizer; ValueError for one the board cannot
    name (and so could not switch back to)."""
    kind = type(optimizer)
    if kind is torch.optim.SGD:
        nesterov = bool(optimizer.param_groups[0].get("nesterov"))
        return "SGD+Nesterov" if nesterov else "SGD"
    for name, cls in (("Adam", torch.optim.Adam), ("AdamW", torch.optim.AdamW),
                      ("RMSprop", torch.optim.RMSprop)):
        if kind is cls:
            return name
    raise ValueError(f"livetrain can steer {', '.join(OPTIMIZERS)}; "
                     f"{kind.__module__}.{kind.__name__} is not one of them")


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def rescale_learning_rates(optimizer: torch.optim.Optimizer, schedulers: Sequence[Any],
                           old: float, new: float) -> None:
    """Multiply every group's lr, and the lrs its schedulers keep, by new/old."""
    factor = new / old
    for group in optimizer.param_groups:  # a group at the base lr takes the new one exactly
        group["lr"] = new if group["lr"] == old else group["lr"] * factor
        for key in SCHEDULED_LR_KEYS:
            if isinstance(group.get(key), int | float):
                group[key] *= factor
    for scheduler in schedulers:
        for name in SCHEDULER_LR_LISTS:
            values = getattr(scheduler, name, None)
            if isinstance(values, list) and all(isinstance(v, int | float) for v in values):
                setattr(scheduler, name, [v * factor for v in values])


def follow_schedules(optimizer: torch.optim.Optimizer, schedulers: Sequence[Any],
                     was: torch.optim.Optimizer, factor: float) -> None:
    """After a rollback: the schedulers of the rolled-back optimizer (`was`) move to
    `optimizer`, their lrs scaled by `factor` (the checkpoint's base lr over the one in
    force), and its groups take the lr the schedule is at. The schedule goes on from its
    position (a framework's own step counter does not roll back), so its next step and
    the update before it agree; the checkpoint's lrs were those of another position."""
    for scheduler in schedulers:
        held = getattr(scheduler, "optimizer", None)  # maybe accelerate's wrapper of `was`
        if held is not was and getattr(held, "optimizer", None) is not was:
            continue  # another optimizer's scheduler (Lightning's manual optimization)
        if optimizer is not was:
            scheduler.optimizer = optimizer
        for name in SCHEDULER_LR_LISTS:
            values = getattr(scheduler, name, None)
            if isinstance(values, list) and all(isinstance(v, int | float) for v in values):
                setattr(scheduler, name, [v * factor for v in values])
        last = getattr(scheduler, "_last_lr", None)
        if isinstance(last, list) and len(last) == len(optimizer.param_groups):
            for group, lr in zip(optimizer.param_groups, last, strict=True):
                group["lr"] = lr


def weight_decays(optimizer: torch.optim.Optimizer, old: float, new: float) -> list[float]:
    """Each group's weight decay once group 0's goes from `old` to `new`: the others keep
    their ratio to it. When group 0 had none there is no ratio to keep: every group takes
    `new`, except a further group of biases and norm scales only (1-d tensors), which by
    convention is never decayed (the no-decay group transformers and timm build)."""
    decays = []
    for index, group in enumerate(optimizer.param_groups):
        decay = group["weight_decay"]
        if old <= 0 and decay == 0 and index > 0 and all(p.dim() <= 1 for p in group["params"]):
            decays.append(decay)
        else:
            decays.append(new if decay == old or old <= 0 else new * decay / old)
    return decays


def set_weight_decay(optimizer: torch.optim.Optimizer, old: float, new: float) -> None:
    """Group 0's weight decay becomes `new`, the others follow (see weight_decays)."""
    for group, decay in zip(optimizer.param_groups, weight_decays(optimizer, old, new),
                            strict=True):
        group["weight_decay"] = decay


def switch_optimizer(optimizer: torch.optim.Optimizer, name: str, schedulers: Sequence[Any],
                     weight_decay: float) -> torch.optim.Optimizer:
    """A new optimizer of kind `name` over the same param groups, with their lrs and the
    lrs a scheduler keeps; the schedulers move to it."""
    keep = ("params", "lr", "weight_decay", *SCHEDULED_LR_KEYS)
    groups = [{k: v for k, v in g.items() if k in keep} | {"weight_decay": weight_decay}
              for g in optimizer.param_groups]
    new = build_optimizer(name, groups, groups[0]["lr"], weight_decay)
    for scheduler in schedulers:
        scheduler.optimizer = new
    return new


def _holds_sparse(group: dict[str, Any], sparse: dict[int, str]) -> bool:
    return any(id(p) in sparse for p in group["params"])


def sparse_refusal(model: nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """Why `optimizer` cannot update the model's sparse gradients (its first step would
    raise deep inside torch), or None: said before the run starts instead."""
    sparse = sparse_parameters(model)
    if not sparse:
        return None
    where = ", ".join(sorted(set(sparse.values())))
    name = optimizer_name(optimizer)
    if name not in SPARSE_OPTIMIZERS:
        return f"{name} cannot update the sparse gradients of {where} " \
            f"(nn.Embedding(sparse=True)); use {' or '.join(SPARSE_OPTIMIZERS)}"
    if any(g["weight_decay"] > 0 and _holds_sparse(g, sparse) for g in optimizer.param_groups):
        return f"torch cannot apply weight decay to the sparse gradients of {where}; " \
            "give their param group a weight decay of 0"
    return None


def _sparse_refusals(optimizer: torch.optim.Optimizer, sparse: dict[int, str],
                     current: Hyperparameters, new: Hyperparameters) -> dict[str, str]:
    """The changes torch's step could not apply to sparse gradients: a switch to an
    optimizer without sparse support, or a weight decay on a group holding them."""
    where = ", ".join(sorted(set(sparse.values())))
    refused = {}
    switching = new.optimizer != current.optimizer
    if switching and new.optimizer not in SPARSE_OPTIMIZERS:
        refused["optimizer"] = f"optimizer={new.optimizer}: it cannot update the sparse " \
            f"gradients of {where}; {' and '.join(SPARSE_OPTIMIZERS)} can"
        switching = False
    groups = optimizer.param_groups
    decays = [new.weight_decay] * len(groups) if switching \
        else weight_decays(optimizer, current.weight_decay, new.weight_decay)
    if any(d > 0 and _holds_sparse(g, sparse) for g, d in zip(groups, decays, strict=True)):
        column = "weight_decay" if new.weight_decay != current.weight_decay else "optimizer"
        refused[column] = f"{column}={getattr(new, column)}: torch cannot apply weight " \
            f"decay to the sparse gradients of {where}"
    return refused


def refusals(model: nn.Module, optimizer: torch.optim.Optimizer, current: Hyperparameters,
             new: Hyperparameters) -> dict[str, str]:
    """The values of `new` that this model and optimizer cannot take, by column, each with
    why: a dropout for a model without a dropout layer; for a model with sparse gradients,
    an optimizer or a weight decay torch cannot apply to them. Only values that differ
    from `current` are named, so putting them back always leaves a version that fits,
    and the other values of the same change still apply."""
    refused = {}
    if new.dropout != current.dropout and dropout_percent(model) is None:
        refused["dropout"] = f"dropout={new.dropout}: the model has no dropout layer"
    if sparse := sparse_parameters(model):
        refused |= _sparse_refusals(optimizer, sparse, current, new)
    return refused


def apply_parameters(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    current: Hyperparameters,
    new: Hyperparameters,
    schedulers: Sequence[Any] = (),
) -> torch.optim.Optimizer:
    """Bring model and optimizer to `new`, which `refusals` has cleared; returns the
    optimizer now in use."""
    if new.learning_rate != current.learning_rate:
        rescale_learning_rates(optimizer, schedulers, current.learning_rate, new.learning_rate)
    if new.weight_decay != current.weight_decay:
        set_weight_decay(optimizer, current.weight_decay, new.weight_decay)
    if new.optimizer != current.optimizer:
        optimizer = switch_optimizer(optimizer, new.optimizer, schedulers, new.weight_decay)
    if new.dropout != current.dropout:
        set_dropout(model, new.dropout / 100)
    return optimizer


def learning_rate_in_force(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
