"""Steer a Hugging Face `transformers.Trainer` run from the board: one callback.

    from livetrain.transformers import LiveTrainingCallback

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                      callbacks=[LiveTrainingCallback(name="my-run")])
    trainer.train()

Built on transformers 5.x (`pip install -e .[transformers]`). The run's step is the
Trainer's `state.global_step`. The board's changes apply at that boundary, through
what the Trainer hands its callbacks: lr and weight decay on the optimizer's param
groups (ratios kept; the Trainer's schedule, linear decay by default, keeps following
the new lr because its `base_lrs` are rescaled), dropout on every dropout layer,
clipping through `args.max_grad_norm`. A stop sets `control.should_training_stop`, a
pause holds the step with the heartbeat alive. A rollback restores model and optimizer
state in place (the Trainer's own step counter and schedule go on). The Trainer builds
its optimizer once and accelerate holds it, so an optimizer switch is refused with a
`parameters_rejected` event that says so, and the run keeps training.

The training loss is the `loss` the model's forward returns (what every transformers
model returns when given labels); the validation loss and accuracy are the Trainer's
`eval_loss` and `eval_accuracy` (from your `compute_metrics`, as a fraction).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import transformers
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from livetrain.trainer.framework import (
    FrameworkRun,
    as_loss,
    json_safe,
    loop_variable,
    mean_loss,
    metric,
    percent,
)
from livetrain.trainer.ownership import say

VALIDATION_LOSS = ("eval_loss",)
VALIDATION_ACCURACY = ("eval_accuracy", "eval_acc")
TRAINING_CONFIG = ("learning_rate", "weight_decay", "max_grad_norm", "num_train_epochs",
                   "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                   "lr_scheduler_type", "warmup_steps", "optim", "seed")


class TransformersRun(FrameworkRun):
    """The LiveRun of one `Trainer.train()`: clipping goes through `args.max_grad_norm`."""

    def __init__(self, args: TrainingArguments, model: nn.Module,
                 optimizer: torch.optim.Optimizer, **options: Any) -> None:
        self.args = args
        self._last_norm: torch.Tensor | float | None = None
        super().__init__(model, optimizer, **options)

    def set_grad_clip(self, max_norm: float) -> None:
        self.args.max_grad_norm = max_norm  # read by the Trainer before each update

    def known_gradient_norm(self) -> torch.Tensor | float | None:
        """The norm the Trainer computed before this update (it does before every one, to
        log it and to clip): its loop's `grad_norm`. A value already seen is the last
        update's (a subclass that steps the optimizer itself): then, or where the loop
        holds none, the check computes its own."""
        norm = loop_variable("transformers.trainer", "grad_norm")
        if not isinstance(norm, torch.Tensor | float) or norm is self._last_norm:
            return None
        self._last_norm = norm
        return norm

    def switch_refusal(self) -> str | None:
        return "the transformers Trainer builds its optimizer once and accelerate holds it, " \
            "so it cannot be switched mid-run; choose it with TrainingArguments(optim=...) " \
            "and start a new run"


class LiveTrainingCallback(TrainerCallback):
    """Watch and steer a transformers Trainer run from the board, through the database.

    `db` is a database URL (default: $DATABASE_URL, else training.db in the working
    directory), `name` the run's name on the board, `log_every` the steps between two
    logged rows.
    `eval_loss` and `eval_accuracy` name the metrics (from `compute_metrics`, accuracy as
    a fraction) read after each evaluation. Further keyword arguments go to LiveRun
    (`checkpoint_every`, `layers`, `config`...).
    """

    def __init__(self, db: str | None = None, name: str | None = None, log_every: int = 50,
                 *, eval_loss: str | Sequence[str] = VALIDATION_LOSS,
                 eval_accuracy: str | Sequence[str] = VALIDATION_ACCURACY,
                 **options: Any) -> None:
        self.options = {"db": db, "name": name, "log_every": log_every, **options}
        self.eval_loss, self.eval_accuracy = eval_loss, eval_accuracy
        self.run: TransformersRun | None = None
        self._losses: list[torch.Tensor] = []  # this update's micro-batch losses
        self._loss_hook: Any = None
        self._warned = False

    # -- the run's life ---------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None or optimizer is None:
            raise ValueError("LiveTrainingCallback needs the model and optimizer the Trainer "
                             "hands its callbacks")
        scheduler = kwargs.get("lr_scheduler")
        options = dict(self.options)
        options["config"] = _config(args) | dict(options.get("config") or {})
        if state.max_steps and state.max_steps > 0:
            options.setdefault("max_steps", state.max_steps)
        self.run = TransformersRun(
            args, model, _unwrapped(optimizer), grad_clip=float(args.max_grad_norm or 0.0),
            scheduler=None if scheduler is None else getattr(scheduler, "scheduler", scheduler),
            **options)
        self.run.watch_loop("transformers.trainer", "_inner_training_loop")
        if self._loss_hook is not None:  # a train() that ended in an exception
            self._loss_hook.remove()
        self._loss_hook = model.register_forward_hook(self._capture_loss)

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        if self.run is not None:
            self.run.close()
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None

    # -- each step --------------------------------------------------------------------------

    def _capture_loss(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self.run is None or self.run.status is not None:
            return  # the run ended (an exception left train() without on_train_end)
        if module.training and (loss := as_loss(output)) is not None:
            self._losses.append(loss)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState,
                      control: TrainerControl, **kwargs: Any) -> None:
        if self.run is not None:
            self.run.flush_log()  # the last step's log, with the evaluation that followed it

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        run = self.run
        if run is None:
            return
        loss, self._losses = mean_loss(self._losses), []
        if loss is None and not self._warned:
            self._warned = True
            say("the model's outputs hold no `loss`: this run logs no training loss")
        run.epoch = int(state.epoch or 0) + 1
        run.step(loss)
        if run.should_stop:
            control.should_training_stop = True

    def on_evaluate(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, metrics: dict[str, Any] | None = None,
                    **kwargs: Any) -> None:
        if self.run is None or self.run.status is not None or not metrics:
            return
        loss = metric(metrics, self.eval_loss)
        if loss is not None:
            self.run.record_validation(loss, percent(metric(metrics, self.eval_accuracy)))


def _unwrapped(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's AcceleratedOptimizer (its step runs the
    inner one's, so the inner one's hooks see every update)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _config(args: TrainingArguments) -> dict[str, Any]:
    """What tells this run apart on the board: the Trainer's training arguments."""
    values = {name: getattr(args, name, None) for name in TRAINING_CONFIG}
    values = {k: str(v) if not isinstance(v, bool | int | float | str | None) else v
              for k, v in values.items()}
    return json_safe(values) | {"framework": f"transformers {transformers.__version__}"}
