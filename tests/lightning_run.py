"""A user's Lightning script with livetrain's callback, for tests/test_browser_lightning.py.

A small CNN (one Conv2d, one Linear) on random 28x28 images, a Lightning Trainer with
`LiveTrainingCallback`, and steps enough to run until the board stops it (or
`--max-steps`). Every `--report-every` steps it prints the lr the Trainer's optimizer
holds, so a test can see that a change from the board reached the optimizer Lightning
steps, not only the database. At the end it prints the run's status and step. With
`--devices 2` Lightning's DDP strategy trains it in two processes (gloo, on CPU), each
printing its own lines, prefixed with its rank.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from livetrain.lightning import LiveTrainingCallback


class SmallCNN(pl.LightningModule):
    """MNIST-sized: a convolution, a pooling, a dropout and a linear classifier."""

    def __init__(self, lr: float = 3e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conv = nn.Conv2d(1, 8, 3)
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(0.1)
        self.fc = nn.Linear(8 * 13 * 13, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv(x)))
        return self.fc(self.dropout(x.flatten(1)))

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return {"loss": nn.functional.cross_entropy(logits, y), "logits": logits.detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class LearningRateReport(pl.Callback):
    """Prints the lr of the optimizer Lightning steps, every `every` steps; sleeps after
    each step so that the run leaves the board and the browser some CPU."""

    def __init__(self, every: int, sleep: float) -> None:
        self.every, self.sleep = every, sleep

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step % self.every == 0:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            say(f"{rank_prefix(trainer)}step {trainer.global_step} lr {lr:g}")
        time.sleep(self.sleep)


def say(line: str) -> None:
    """One write per line: under DDP both ranks write to the same file."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def rank_prefix(trainer: pl.Trainer) -> str:
    return f"rank {trainer.global_rank} " if trainer.world_size > 1 else ""


def random_images(samples: int) -> TensorDataset:
    """Images labelled by the brightness of their top-left quarter: learnable, no file."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 1, 28, 28, generator=generator)
    y = (x[:, 0, :14, :14].mean((1, 2)) * 40).long().clamp(-5, 4) + 5
    return TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--root", required=True, help="Lightning's and livetrain's files")
    parser.add_argument("--name", default="lightning-cnn")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--report-every", type=int, default=5)
    parser.add_argument("--sleep", type=float, default=0.01, help="seconds after a step")
    parser.add_argument("--max-steps", type=int, default=1_000_000)
    parser.add_argument("--devices", type=int, default=1, help="2 or more: DDP on CPU")
    args = parser.parse_args()

    torch.manual_seed(0)
    loader = DataLoader(random_images(1024), batch_size=32, shuffle=True)
    live = LiveTrainingCallback(db=args.db, name=args.name, log_every=args.log_every,
                                checkpoint_dir=f"{args.root}/checkpoints")
    trainer = pl.Trainer(
        max_steps=args.max_steps, max_epochs=-1, accelerator="cpu", devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=args.root,
        callbacks=[live, LearningRateReport(args.report_every, args.sleep)])
    trainer.fit(SmallCNN(), loader)
    say(f"{rank_prefix(trainer)}status={live.run.status} steps={live.run.global_step}")


if __name__ == "__main__":
    main()
