"""A regression in a loop of its own, through LiveRun: bench.insight's evaluation half.

An MLP fits a smooth function of 8 inputs plus noise of std 0.1, so its loss falls to a
floor of about 0.01 (the noise's variance) and stays there: a converged run that is not
a classifier, whose plateau is no sign of a learning rate too low.

    python bench/insight_cases/regression.py --db sqlite:///training.db --max-steps 1500
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F  # noqa: N812  (PyTorch's own convention)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from livetrain import LiveRun

INPUTS, NOISE = 8, 0.1


def dataset(samples: int, seed: int) -> TensorDataset:
    """y = sin(x.a) + 0.3 (x.b)^2 + noise, with directions a and b fixed for every seed."""
    directions = torch.randn(2, INPUTS, generator=torch.Generator().manual_seed(0))
    x = torch.randn(samples, INPUTS, generator=torch.Generator().manual_seed(seed))
    a, b = (x @ directions.T / INPUTS**0.5).unbind(1)
    noise = NOISE * torch.randn(samples, generator=torch.Generator().manual_seed(seed + 1))
    return TensorDataset(x, (torch.sin(2 * a) + 0.3 * b**2 + noise).unsqueeze(1))


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    """The mean squared error over the validation set, and its per-batch spread."""
    model.eval()
    losses = torch.stack([F.mse_loss(model(x), y) for x, y in loader])
    model.train()
    return {"loss": losses.mean().item(), "loss_std": losses.std().item(),
            "batches": len(losses)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="An MLP regression in its own loop, live")
    parser.add_argument("--db", default=None, help="SQLAlchemy URL")
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    train = DataLoader(dataset(4096, args.seed + 10), batch_size=64, shuffle=True)
    val = DataLoader(dataset(1024, args.seed + 20), batch_size=128)
    model = nn.Sequential(nn.Linear(INPUTS, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    with LiveRun(model, optimizer, db=args.db, name="mlp-regression", log_every=args.log_every,
                 validate=partial(validate, model, val), max_steps=args.max_steps,
                 steps_per_epoch=len(train), dataset="generated-regression") as run:
        while not run.should_stop:
            for x, y in train:
                loss = F.mse_loss(model(x), y)
                run.optimizer.zero_grad()
                loss.backward()
                run.optimizer.step()
                run.step(loss=loss)
                if run.should_stop:
                    break
    print(f"run {run.run_id} {run.status} at step {run.global_step}")


if __name__ == "__main__":
    main()
