"""A Lightning run with OneCycleLR, trained to its end: bench.insight's evaluation half.

An MLP on scikit-learn's 8x8 digits with SGD and Nesterov momentum; OneCycleLR warms
the lr up from max_lr / 25 to max_lr over 30 % of the run and anneals it to nearly 0,
both by design: no health rule may read either as a learning rate too low.

    python bench/insight_cases/lightning_onecycle.py --db sqlite:///training.db
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F  # noqa: N812  (PyTorch's own convention)
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from livetrain.lightning import LiveTrainingCallback


class DigitsMLP(pl.LightningModule):
    def __init__(self, max_lr: float, total_steps: int) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor],
                      batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.max_lr, momentum=0.9,
                                    nesterov=True)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.max_lr, total_steps=self.hparams.total_steps)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def digits(seed: int) -> tuple[DataLoader, DataLoader]:
    """The 1797 digits, standardised, split 80/20."""
    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, random_state=seed)

    def loader(x: Any, y: Any, **kw: Any) -> DataLoader:
        return DataLoader(TensorDataset(torch.tensor(x, dtype=torch.float32),
                                        torch.tensor(y, dtype=torch.long)), **kw)
    return loader(x_train, y_train, batch_size=32, shuffle=True), loader(x_val, y_val,
                                                                         batch_size=120)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A Lightning MLP with OneCycleLR, live")
    parser.add_argument("--db", default=None, help="SQLAlchemy URL")
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--max-lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    pl.seed_everything(args.seed, verbose=False)
    train, val = digits(args.seed)
    live = LiveTrainingCallback(db=args.db, name="lightning-onecycle", log_every=args.log_every,
                                num_classes=10, dataset="digits",
                                config={"num_classes": 10})  # what a replay reads back
    trainer = pl.Trainer(max_steps=args.max_steps, max_epochs=-1, callbacks=[live],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(DigitsMLP(args.max_lr, args.max_steps), train, val)
    print(f"run {live.run.run_id} {live.run.status} after {live.run.global_step} steps")


if __name__ == "__main__":
    main()
