"""Parameter changes applied in place to a live model and optimizer."""

from __future__ import annotations

import torch
from torch import nn

from livetrain.db.contract import Hyperparameters
from livetrain.playground.models import build_model
from livetrain.trainer.steering import (
    apply_parameters,
    build_optimizer,
    learning_rate_in_force,
    trainable,
)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, n: int) -> None:
    torch.manual_seed(0)
    for _ in range(n):
        x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def setup() -> tuple[nn.Module, torch.optim.Optimizer, Hyperparameters]:
    model = build_model("smallcnn", 10, 1, 28, dropout=0.5)
    hp = Hyperparameters("Adam", 3e-4, 0.0, 50)
    return model, build_optimizer("Adam", trainable(model), 3e-4, 0.0), hp


def test_lr_and_weight_decay_change_in_place_and_keep_adam_moments() -> None:
    model, optimizer, hp = setup()
    train_steps(model, optimizer, 3)
    moments = {k: v["exp_avg"].clone() for k, v in optimizer.state_dict()["state"].items()}
    new = Hyperparameters("Adam", 1e-3, 1e-4, 50)
    same = apply_parameters(model, optimizer, hp, new)
    assert same is optimizer
    assert learning_rate_in_force(optimizer) == 1e-3
    assert all(g["weight_decay"] == 1e-4 for g in optimizer.param_groups)
    state = optimizer.state_dict()["state"]
    assert all(float(s["step"]) == 3 for s in state.values())
    assert all(torch.equal(state[k]["exp_avg"], m) for k, m in moments.items())


def test_dropout_changes_every_dropout_module() -> None:
    model, optimizer, hp = setup()
    apply_parameters(model, optimizer, hp, Hyperparameters("Adam", 3e-4, 0.0, 20))
    ps = [m.p for m in model.modules() if isinstance(m, nn.Dropout | nn.Dropout2d)]
    assert ps and all(p == 0.2 for p in ps)


def test_optimizer_switch_builds_the_new_one() -> None:
    model, optimizer, hp = setup()
    train_steps(model, optimizer, 2)
    new = apply_parameters(
        model, optimizer, hp, Hyperparameters("SGD+Nesterov", 0.01, 0.0, 50)
    )
    assert isinstance(new, torch.optim.SGD)
    assert new.param_groups[0]["nesterov"] and new.param_groups[0]["momentum"] == 0.9
    train_steps(model, new, 1)  # and it trains
