"""One log of a run: its statistics row, per-layer telemetry, diagnosis and early stop.

Between logs the loop only adds to on-device sums (IntervalMetrics); a log is where the
figures are synchronised, validated, written through the background writer and read
by the health rules (livetrain.trainer.diagnostics).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from livetrain.db.contract import Hyperparameters
from livetrain.db.store import now
from livetrain.trainer.diagnostician import Diagnostician
from livetrain.trainer.diagnostics import LayerRecord, StepRecord
from livetrain.trainer.episodes import Episode
from livetrain.trainer.steering import learning_rate_in_force
from livetrain.trainer.telemetry import IntervalSummary

if TYPE_CHECKING:
    from livetrain.trainer.run import LiveRun

Validate = Callable[..., Mapping[str, Any]]


def _float(value: float | None) -> float:
    return float("nan") if value is None else value


def _finite_or_none(value: float | None) -> float | None:
    """What a JSON-safe, database-safe column may hold: no NaN or infinity."""
    return value if value is not None and math.isfinite(value) else None


def _standard_error(std: float | None, count: int | None) -> float | None:
    """std / sqrt(count): how far a mean of `count` values can be off (None: unknown)."""
    return None if std is None or not count else std / math.sqrt(count)


def takes_full(validate: Validate | None) -> bool:
    """Whether `validate` accepts `full=`: True at an epoch's end and at the last log,
    when a playground validation covers the whole set instead of a few batches."""
    if validate is None:
        return False
    try:
        return "full" in inspect.signature(validate).parameters
    except (TypeError, ValueError):  # a builtin or C callable: called without it
        return False


@dataclass(frozen=True)
class ValidationFigures:
    """What a validation said: its loss, and how far that loss can be trusted."""

    loss: float
    accuracy: float | None
    loss_std: float | None  # std of the per-batch losses, when the validation gave it
    batches: int | None


def _optional_number(result: Mapping[str, Any], key: str) -> float | None:
    value = result.get(key)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"validate returned a {key} that is not a number: {value!r:.40}") \
            from None


def validation_figures(result: Any) -> ValidationFigures:
    """The figures of what a user's validate returned; ValueError when it is not a mapping
    with a numeric "loss" (a clear message, not a crash deep inside).

    "loss_std" (the std of the per-batch losses) and "batches" are optional: with them the
    board draws the loss's noise band and the rules know the noise without guessing it."""
    if not isinstance(result, Mapping) or "loss" not in result:
        raise ValueError(f"validate must return a mapping with a 'loss', got {result!r:.80}")
    loss = _optional_number(result, "loss")
    if loss is None:
        raise ValueError("validate returned a loss of None")
    std, batches = _optional_number(result, "loss_std"), _optional_number(result, "batches")
    usable = (std is not None and batches is not None and batches >= 2 and std >= 0
              and math.isfinite(std) and batches == int(batches))
    return ValidationFigures(loss, _optional_number(result, "accuracy"),
                             std if usable else None, int(batches) if usable else None)


class Logbook:
    """The logs of one run: when to log, what to write, what the rules make of it."""

    def __init__(self, run: LiveRun, validate: Validate | None, num_classes: int | None,
                 early_stopping: int) -> None:
        self.run = run
        self.validate = validate
        self.reported: ValidationFigures | None = None  # run.record_validation's figures
        self.full_argument = takes_full(validate)
        self.doctor = Diagnostician(num_classes)
        self.opened_at: dict[str, datetime] = {}  # open episodes' first moment, by alert_id
        self.early_stopping = early_stopping
        self.best_val, self.logs_since_best = math.inf, 0
        self.last_logged = -1
        self.interval_start, self.interval_samples = time.perf_counter(), 0
        self.last: dict[str, float | None] = {}  # the latest log's figures, for a progress bar

    def log(self, full_validation: bool, ran_with: Hyperparameters | None = None,
            lr: float | None = None, layers: bool = True) -> None:
        """One statistics row plus, when `layers` (see cadence.py), per-layer telemetry
        for the current step, with the parameters and lr its update ran with (given for
        a deferred log: a change may have been applied at the step's boundary since).

        Under torchrun the training figures are summed over the ranks, and rank 0
        validates and writes while the others wait for what it decided.
        """
        run = self.run
        if run.guard.tripped():  # the device guard refused an update since the last log
            run.blow_up(None, since=max(self.last_logged, 0))
        interval = run.metrics.summary(run.ranks.sum)
        if run.ranks.is_main:
            self.write(full_validation, interval, ran_with or run.control.params,
                       run.lr_of_last_update() if lr is None else lr, layers)
        control = run.control
        control.paused, run.finishing = run.ranks.any(control.paused, run.finishing)
        self.last_logged = run.global_step
        self.interval_start, self.interval_samples = time.perf_counter(), 0

    def run_validation(self, full: bool, layers: bool) -> ValidationFigures | None:
        """The user's validation, with the probe recording its first forward pass (when
        the log measures the layers) and parameter changes taken between its batches;
        or the one reported since the last log (run.record_validation)."""
        if self.reported is not None:
            reported, self.reported = self.reported, None
            return reported
        if self.validate is None:
            return None
        run = self.run
        if layers:
            run.probe.arm_next_forward()
        run.validating = not run.ranks.distributed  # between batches needs no agreement
        run.watch_forward(run.validating or run.shapeless)
        try:
            result = self.validate(full=full) if self.full_argument else self.validate()
        finally:
            run.validating = False
            run.watch_forward(run.shapeless)
        return validation_figures(result)

    def write(self, full_validation: bool, interval: IntervalSummary,
              ran_with: Hyperparameters, lr: float, layers: bool) -> None:
        run = self.run
        validation = self.run_validation(full_validation, layers)
        elapsed = time.perf_counter() - self.interval_start
        run.writer.statistics({
            "step": run.global_step, "epoch": run.epoch, "dt": now(),
            "optimizer": ran_with.optimizer, "learning_rate": lr,
            "base_learning_rate": ran_with.learning_rate,
            "weight_decay": ran_with.weight_decay, "dropout": ran_with.dropout,
            "train_loss": interval.loss, "train_accuracy": interval.accuracy,
            "train_loss_count": interval.steps or None, "train_loss_std": interval.loss_std,
            "validate_loss": validation and validation.loss,
            "validate_accuracy": validation and validation.accuracy,
            "validate_loss_count": validation and validation.batches,
            "validate_loss_std": validation and validation.loss_std,
            "samples_per_second": self.interval_samples / elapsed
            if self.interval_samples else None,
        })
        if run.table is not None and run.table.rows is not None:
            run.writer.rows("model_layers", run.table.rows)
            run.table = None
        telemetry = run.probe.rows(run.global_step) if layers else {}
        for table, rows in telemetry.items():
            run.writer.rows(table, rows)
        run.cadence.logged(layers, run.probe.take_spent())
        val_loss = validation and validation.loss
        self.diagnose(interval, validation, telemetry.get("layer_statistics"), ran_with, lr)
        if val_loss is not None:
            self.early_stop(val_loss)
        self.last = {"train_loss": interval.loss, "validate_loss": val_loss,
                     "learning_rate": learning_rate_in_force(run.optimizer)}

    def diagnose(
        self, interval: IntervalSummary, validation: ValidationFigures | None,
        layers: list[dict[str, Any]] | None, ran_with: Hyperparameters, lr: float,
    ) -> None:
        """Run the health rules on this log (`layers` None: it did not measure them); a
        non-finite value pauses the run."""
        run = self.run
        record = StepRecord(
            step=run.global_step, train_loss=_float(interval.loss),
            train_loss_se=_standard_error(interval.loss_std, interval.steps),
            validate_loss=None if validation is None else validation.loss,
            validate_loss_se=None if validation is None
            else _standard_error(validation.loss_std, validation.batches),
            train_loss_measured=interval.loss is not None,
            train_accuracy=interval.accuracy,
            validate_accuracy=None if validation is None else validation.accuracy,
            learning_rate=lr, base_learning_rate=ran_with.learning_rate,
            optimizer=ran_with.optimizer,
            weight_decay=ran_with.weight_decay, dropout=ran_with.dropout,
            layers=tuple(LayerRecord(
                name=r["layer_name"], act_mean=_float(r["act_mean"]),
                act_std=_float(r["act_std"]), zero_fraction=_float(r["zero_fraction"]),
                dead_fraction=_float(r["dead_fraction"]), grad_norm=r["grad_norm"],
                update_ratio=_float(r["update_ratio"]), has_nonlinearity=r["has_nonlinearity"],
                activation_measured=r["act_mean"] is not None,
            ) for r in layers or ()),
            layers_measured=layers is not None,
        )
        changes = self.doctor.observe(record)
        for change in changes:
            finding = change.episode.finding
            if change.kind != "opened":
                continue
            run.writer.event(finding.level, finding.code, finding.message, step=run.global_step,
                             layer_name=finding.layer, recommendation=finding.recommendation,
                             fix=finding.fix)
            if finding.code == "non_finite" and run.global_step > 0:
                run.control.paused = True  # before the next update
        if changes:
            run.writer.rows("alerts", [self.alert_row(c.episode) for c in changes])

    def alert_row(self, episode: Episode) -> dict[str, Any]:
        """The episode as its `alerts` row (a snapshot: the latest one replaces the rest)."""
        moment = now()
        opened = self.opened_at.setdefault(episode.alert_id, moment)
        if episode.status != "open":
            del self.opened_at[episode.alert_id]
        finding = episode.finding
        return {
            "alert_id": episode.alert_id, "code": finding.code, "level": finding.level,
            "layer_name": finding.layer, "status": episode.status,
            "first_step": episode.first_step, "last_step": episode.last_step,
            "logs": episode.logs, "resolved_step": episode.resolved_step,
            "measure": finding.measure, "worst_value": _finite_or_none(episode.worst_value),
            "message": finding.message, "recommendation": finding.recommendation,
            "fix": finding.fix, "dt_first": opened, "dt_last": moment,
        }

    def early_stop(self, val_loss: float) -> None:
        """seed 002: finish when validation has not improved for `early_stopping` logs."""
        if val_loss < self.best_val:
            self.best_val, self.logs_since_best = val_loss, 0
            return
        self.logs_since_best += 1
        run = self.run
        if self.early_stopping and self.logs_since_best >= self.early_stopping \
                and not run.finishing:
            run.finishing = True
            run.writer.event("info", "early_stopped", f"validation loss has not improved on "
                             f"{self.best_val:.4g} for {self.logs_since_best} logs: finishing "
                             f"at step {run.global_step}", step=run.global_step)
