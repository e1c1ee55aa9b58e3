"""Steer a PyTorch Lightning run from the board: one callback.

    from livetrain.lightning import LiveTrainingCallback

    trainer = L.Trainer(max_epochs=5, callbacks=[LiveTrainingCallback(name="my-run")])
    trainer.fit(model, train_loader, val_loader)

Built on `lightning.pytorch` (Lightning 2.x; `pip install -e .[lightning]`). The run
steps once per optimizer step, so its step is `trainer.global_step`. The board's
changes apply at that boundary: lr and weight decay on every optimizer's param
groups (ratios between groups kept, lr schedulers rebased on the new value), dropout
on every dropout layer, clipping through `trainer.gradient_clip_val`. An optimizer
switch and a rollback across one go through `trainer.strategy`; a strategy that owns
its optimizer (sharded, or a manual-optimization module) refuses them with a
`parameters_rejected` event and the run keeps training. A stop sets
`trainer.should_stop`, so Lightning ends the fit its own way and its checkpoint
callbacks run; a pause holds the step with the heartbeat alive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType

from livetrain.trainer.framework import (
    FrameworkRun,
    as_loss,
    json_safe,
    mean_loss,
    metric,
    percent,
)

# Where the training loss is when training_step returns none (manual optimization).
TRAINING_LOSS = ("train_loss", "train/loss", "train_loss_step", "loss")
VALIDATION_LOSS = ("val_loss", "val/loss", "validation_loss", "valid_loss")
VALIDATION_ACCURACY = ("val_acc", "val/acc", "val_accuracy", "validation_accuracy",
                       "valid_acc")
# Strategies whose optimizers are plain torch optimizers a new one can replace.
SWITCHABLE = (SingleDeviceStrategy, DDPStrategy)


class LightningRun(FrameworkRun):
    """The LiveRun of one `Trainer.fit`: clipping and optimizers go through the trainer."""

    def __init__(self, trainer: pl.Trainer, module: pl.LightningModule, **options: Any) -> None:
        self.trainer = trainer
        self.automatic = module.automatic_optimization
        # Lightning runs backward inside optimizer.step(closure): the callback measures
        # and checks the gradients in on_before_optimizer_step instead of the step's hook.
        # Manual optimization calls step() after its own backward, and clips nothing.
        self.gradients_before_step = not self.automatic
        self.clips_in_hook = not self.automatic
        optimizer, *others = trainer.optimizers
        super().__init__(module, optimizer, others=others, **options)

    def set_grad_clip(self, max_norm: float) -> None:
        trainer = self.trainer
        trainer.gradient_clip_val = max_norm or None
        if max_norm and trainer.gradient_clip_algorithm is None:
            trainer.gradient_clip_algorithm = GradClipAlgorithmType.NORM

    def switch_refusal(self) -> str | None:
        if not self.automatic:
            return "this LightningModule optimizes manually: its training_step holds its " \
                "own optimizers, which a switch cannot reach"
        strategy = self.trainer.strategy
        if not isinstance(strategy, SWITCHABLE):
            return f"Lightning's {type(strategy).__name__} owns its optimizer's state and " \
                "cannot take another one mid-run"
        return None

    def replace_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        super().replace_optimizer(optimizer)
        self.trainer.strategy.optimizers = [optimizer, *self.other_optimizers]


class LiveTrainingCallback(pl.Callback):
    """Watch and steer a Lightning run from the board, through the database.

    `db` is a database URL (default: $DATABASE_URL, else training.db in the working
    directory), `name` the run's name on the board, `log_every` the steps between two
    logged rows.
    The validation loss and accuracy come from what the module logs with `self.log`
    (`val_loss`, `val_acc` by default; accuracy as a fraction). Further keyword
    arguments go to LiveRun (`checkpoint_every`, `layers`, `num_classes`, `config`...).
    """

    def __init__(self, db: str | None = None, name: str | None = None, log_every: int = 50,
                 *, val_loss: str | Sequence[str] = VALIDATION_LOSS,
                 val_accuracy: str | Sequence[str] = VALIDATION_ACCURACY,
                 **options: Any) -> None:
        self.options = {"db": db, "name": name, "log_every": log_every, **options}
        self.val_loss, self.val_accuracy = val_loss, val_accuracy
        self.run: LightningRun | None = None
        self._losses: list[torch.Tensor] = []  # this optimizer step's micro-batches
        self._stepped = 0  # trainer.global_step at the last counted step

    # -- the run's life ---------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.optimizers:
            raise ValueError("LiveTrainingCallback needs the optimizer configure_optimizers "
                             "returns; this module has none")
        options = dict(self.options)
        options["config"] = _config(trainer, pl_module) | dict(options.get("config") or {})
        options.setdefault("steps_per_epoch", _steps_per_epoch(trainer))
        if trainer.max_steps and trainer.max_steps > 0:
            options.setdefault("max_steps", trainer.max_steps)
        self.run = LightningRun(
            trainer, pl_module, grad_clip=float(trainer.gradient_clip_val or 0.0),
            scheduler=[config.scheduler for config in trainer.lr_scheduler_configs],
            **options)
        self._stepped = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run is not None:
            self.run.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if self.run is not None:
            self.run.close(exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.run is not None:  # a fit that ended without on_train_end: its threads stop
            self.run.close()

    # -- each step --------------------------------------------------------------------------

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self.run is not None:
            self.run.flush_log()  # the last step's log, with the validation that followed it

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        run = self.run
        if run is not None and not run.gradients_before_step and optimizer is run.optimizer:
            run.updates.before_update(optimizer)  # measure; drop non-finite gradients

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        run = self.run
        if run is None:
            return
        loss = as_loss(outputs)
        if loss is None and (logged := metric(trainer.callback_metrics, TRAINING_LOSS)) \
                is not None:
            loss = torch.tensor(logged)  # what the module logged with self.log this step
        if loss is not None:
            self._losses.append(loss)
        if trainer.global_step == self._stepped:
            return  # accumulating gradients: the optimizer has not stepped yet
        self._stepped = trainer.global_step
        loss, self._losses = mean_loss(self._losses), []
        predictions, targets = _predictions(outputs, batch)
        run.epoch = trainer.current_epoch + 1
        run.step(loss, outputs=predictions, targets=targets)
        if run.should_stop:
            trainer.should_stop = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run is None or trainer.sanity_checking or self.run.status is not None:
            return
        metrics = trainer.callback_metrics
        loss = metric(metrics, self.val_loss)
        if loss is not None:
            self.run.record_validation(loss, percent(metric(metrics, self.val_accuracy)))


def _predictions(outputs: Any, batch: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Scores and targets for the training accuracy, when the step returns its scores
    ("logits" or "preds") and the batch is (inputs, targets)."""
    if not isinstance(outputs, Mapping):
        return None, None
    scores = outputs.get("logits", outputs.get("preds"))
    if isinstance(scores, torch.Tensor) and isinstance(batch, list | tuple) and len(batch) == 2:
        return scores.detach(), batch[1]
    return None, None


def _steps_per_epoch(trainer: pl.Trainer) -> int | None:
    batches = trainer.num_training_batches
    if not isinstance(batches, int) or batches <= 0:
        return None  # an iterable dataset without a length
    return max(1, -(-batches // trainer.accumulate_grad_batches))


def _config(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, Any]:
    """What tells this fit apart on the board: the module's hparams and the trainer's."""
    return json_safe(dict(module.hparams)) | {
        "framework": f"lightning {pl.__version__}",
        "max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "precision": str(trainer.precision), "strategy": type(trainer.strategy).__name__,
    }
