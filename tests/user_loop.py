"""A user's own training script, written the way the API's ten lines show, for the tests.

tests/test_livetrain_api.py copies it into a temporary directory outside the repository
and runs it there as a subprocess, with a fresh venv's python or the project's, so it
sees livetrain only as an installed package. An MLP on generated data: nothing of
livetrain's playground. `--sleep` slows each step so that a test can steer it.
It prints, at the end, what the run ended with, for the test to read.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import livetrain
from livetrain import LiveRun


def make_data(samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points labelled by a random linear teacher: learnable, and no file to read."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 20, generator=generator)
    teacher = torch.randn(20, 4, generator=generator)
    return x, (x @ teacher).argmax(dim=1)


def train_epoch(run: LiveRun, model: nn.Module, data: tuple[torch.Tensor, torch.Tensor],
                sleep: float) -> None:
    loss_fn = nn.CrossEntropyLoss()
    for x, y in zip(data[0].split(64), data[1].split(64), strict=True):
        out = model(x)
        loss = loss_fn(out, y)
        run.optimizer.zero_grad()
        loss.backward()
        run.optimizer.step()
        run.step(loss=loss, outputs=out, targets=y)
        time.sleep(sleep)
        if run.should_stop:
            break


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to wait after a step")
    args = parser.parse_args()

    torch.manual_seed(0)
    data = make_data(1024)  # 16 steps an epoch
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    with LiveRun(model, optimizer, db=args.db, name="user-mlp", log_every=args.log_every) as run:
        for epoch in range(args.epochs):
            run.epoch = epoch
            train_epoch(run, model, data, args.sleep)
            if run.should_stop:
                break
    group = run.optimizer.param_groups[0]
    print(f"livetrain={livetrain.__file__}")
    print(f"optimizer={type(run.optimizer).__name__} nesterov={group.get('nesterov', False)} "
          f"lr={group['lr']:g} status={run.status} steps={run.global_step}")


if __name__ == "__main__":
    main()
