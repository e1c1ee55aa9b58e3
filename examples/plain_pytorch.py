"""Your own model and your own loop, watched and steered live: an MLP on scikit-learn's digits.

Nothing here is a CNN or comes from livetrain's playground: a plain PyTorch loop, with
`LiveRun` wrapped around it. Start the board (`python board.py`) and change the learning
rate, weight decay, dropout or optimizer while this runs; stop it from there too.

    python examples/plain_pytorch.py --db sqlite:///training.db --epochs 20
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812  (PyTorch's own convention)
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from livetrain import LiveRun


class Net(nn.Module):
    """Two hidden layers with dropout between them: the board can steer its `p`."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def digits(batch_size: int) -> tuple[DataLoader, DataLoader]:
    """The 1797 8x8 digits that ship with scikit-learn, scaled to [0, 1]: no download."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x / 16.0, y, test_size=0.2, random_state=0, stratify=y)
    return (DataLoader(as_dataset(x_train, y_train), batch_size=batch_size, shuffle=True),
            DataLoader(as_dataset(x_test, y_test), batch_size=512))


def as_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    """The held-out loss and accuracy (percent) that LiveRun logs beside the training loss,
    with the spread of the per-batch losses: the board draws it as the loss's noise band,
    and the health rules judge a rise against it."""
    model.eval()
    batch_losses, correct, seen = [], 0, 0
    for x, y in loader:
        out = model(x)
        batch_losses.append(F.cross_entropy(out, y).item())
        correct += (out.argmax(1) == y).sum().item()
        seen += len(y)
    model.train()
    return {"loss": statistics.fmean(batch_losses), "accuracy": 100.0 * correct / seen,
            "loss_std": statistics.stdev(batch_losses) if len(batch_losses) > 1 else None,
            "batches": len(batch_losses)}


def train_epoch(run: LiveRun, model: nn.Module, loader: DataLoader) -> None:
    """One pass over the data: the loop is yours; `run.optimizer` is the one in force."""
    for x, y in loader:
        out = model(x)
        loss = F.cross_entropy(out, y)
        run.optimizer.zero_grad()
        loss.backward()
        run.optimizer.step()
        run.step(loss=loss, outputs=out, targets=y)
        if run.should_stop:
            break


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="An MLP on scikit-learn's digits, steered live")
    parser.add_argument("--db", default=None,
                        help="SQLAlchemy URL (default: $DATABASE_URL, else sqlite:///training.db)")
    parser.add_argument("--name", default="digits-mlp", help="the run's name on the board")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--log-every", type=int, default=20, help="steps between logged rows")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    train_loader, test_loader = digits(args.batch_size)
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    config = {k: v for k, v in vars(args).items() if k != "db"}  # a URL may hold a password
    with LiveRun(model, optimizer, db=args.db, name=args.name, log_every=args.log_every,
                 validate=partial(evaluate, model, test_loader), max_steps=args.max_steps,
                 config=config, model_name="MLP", dataset="sklearn-digits") as run:
        for epoch in range(args.epochs):
            run.epoch = epoch
            train_epoch(run, model, train_loader)
            if run.should_stop:
                break
    print(f"run {run.run_id} {run.status} after {run.global_step} steps: "
          f"{evaluate(model, test_loader)['accuracy']:.1f} % on the test digits")


if __name__ == "__main__":
    main()
