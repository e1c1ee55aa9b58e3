"""LiveRun: watch and steer any PyTorch training loop from the board, through the database.

    with LiveRun(model, optimizer, db=URL, name="my-run") as run:
        for x, y in loader:
            out = model(x)
            loss = loss_fn(out, y)
            run.optimizer.zero_grad()
            loss.backward()
            run.optimizer.step()
            run.step(loss=loss, outputs=out, targets=y)
            if run.should_stop:
                break

The loop never waits on the database: a background writer sends what it logs and a
listener brings the board's changes, which `step()` applies at the step boundary and
acknowledges with the step. Hooks on the optimizer clip gradients, refuse a
non-finite update and measure gradients and updates on the steps that log.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from livetrain.db.contract import Hyperparameters, validate
from livetrain.db.listener import ParameterListener
from livetrain.db.store import Store, describe_url, now, open_store, resolve_url
from livetrain.db.writer import SPILL_AFTER_ROWS, BackgroundWriter, NullWriter
from livetrain.trainer.allocator import keep_freed_memory
from livetrain.trainer.cadence import TelemetryCadence
from livetrain.trainer.checkpointing import Checkpoint, CheckpointRing, Restorable
from livetrain.trainer.control import Controller, describe
from livetrain.trainer.distributed import Ranks
from livetrain.trainer.guard import NanGuard
from livetrain.trainer.inspection import (
    awaits_first_batch,
    model_device,
    parameters_count,
    sparse_parameters,
    trains_anything,
    unwrapped,
)
from livetrain.trainer.layers import dropout_percent, set_dropout
from livetrain.trainer.logbook import Logbook, Validate, validation_figures
from livetrain.trainer.ownership import say, trainer_identity
from livetrain.trainer.resuming import resume_run
from livetrain.trainer.signals import StopSignal
from livetrain.trainer.steering import (
    apply_parameters,
    follow_schedules,
    learning_rate_in_force,
    optimizer_name,
    refusals,
    sparse_refusal,
)
from livetrain.trainer.telemetry import (
    IntervalMetrics,
    LayerProbe,
    LayerTable,
    Progress,
    SystemSampler,
)
from livetrain.trainer.updates import UpdateHooks

# The training accuracy of a log counts the right answers of this many of its steps,
# evenly spaced and the logged one included (all of them when a log has no more).
ACCURACY_STEPS = 10


def initial_parameters(model: nn.Module, optimizer: torch.optim.Optimizer,
                       schedulers: list[Any], grad_clip: float) -> Hyperparameters:
    """The run's first parameters row, read from the user's optimizer and model: group 0's
    lr (a scheduler's base lr, when there is one) and weight decay, the first dropout's p.
    ValueError when the board could not steer them (an unknown optimizer, a value out of
    the contract's range, an optimizer that cannot update the model's sparse gradients)."""
    name = optimizer_name(optimizer)
    if why := sparse_refusal(model, optimizer):
        raise ValueError(f"LiveRun cannot steer this run: {why}")
    group = optimizer.param_groups[0]
    lr = schedulers[0].base_lrs[0] if schedulers and hasattr(schedulers[0], "base_lrs") \
        else group["lr"]
    params, errors = validate(name, lr, group.get("weight_decay", 0.0),
                              dropout_percent(model) or 0, grad_clip)
    if params is None:
        raise ValueError(f"LiveRun cannot steer this run: {'; '.join(errors.values())}")
    return params


class LiveRun:
    """One training run, visible on the board and steerable from it (or from any SQL client).

    `run.optimizer` is the optimizer in force (a new object after the board switches
    it); `run.should_stop` says the loop should end (a stop from the board, SQL or
    Ctrl-C, `max_steps` reached or early stopping). Leaving the `with` block ends the
    run: `stopped` after a stop, `finished` at the natural end, `failed` on an
    exception (which propagates).
    """

    # What a framework integration (livetrain.lightning, livetrain.transformers) changes.
    # Whether gradients are ready when the optimizer's step begins: not in Lightning,
    # whose optimizer.step(closure) runs the backward pass inside the step.
    gradients_before_step = True
    # Whether the optimizer hook clips: not where the framework's own clipping does.
    clips_in_hook = True
    # Whether a log waits for `flush_log()`: a framework validates after the step's
    # callback returns, and that validation belongs in the step's row.
    defer_logs = False
    # Whether the end of the run saves a checkpoint: what `resume` continues from. A
    # framework keeps its trained model with its own checkpointing, and a rollback ends
    # with the run.
    final_checkpoint = True

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        db: str | None = None,
        name: str | None = None,
        log_every: int = 50,
        validate: Validate | None = None,
        config: Mapping[str, Any] | None = None,
        scheduler: Any = None,
        layers: Iterable[str] | None = None,
        num_classes: int | None = None,
        grad_clip: float = 0.0,
        steps_per_epoch: int | None = None,
        max_steps: int | None = None,
        early_stopping: int = 0,
        checkpoint_dir: str | Path = "checkpoints",
        checkpoint_every: int = 500,
        checkpoint_keep: int = 5,
        buffer_rows: int = SPILL_AFTER_ROWS,
        model_name: str | None = None,
        dataset: str = "custom",
        resume: int | None = None,
        handle_signals: bool = True,
        nan_guard: str = "auto",
        telemetry_every: int | str = 1,
    ) -> None:
        for option, value in (("log_every", log_every), ("checkpoint_every", checkpoint_every),
                              ("checkpoint_keep", checkpoint_keep), ("buffer_rows", buffer_rows)):
            if value < 1:
                raise ValueError(f"{option} must be at least 1, got {value}")
        # The user's own module to inspect and save: DDP or the compiled wrapper trains it.
        model, self.compiled = unwrapped(model)
        self.model, self._optimizer = model, optimizer
        keep_freed_memory()  # no page-fault storm at every step (allocator.py; train.py too)
        self.schedulers = [] if scheduler is None else \
            list(scheduler) if isinstance(scheduler, list | tuple) else [scheduler]
        params = initial_parameters(model, optimizer, self.schedulers, grad_clip)
        self.log_every, self.steps_per_epoch = log_every, steps_per_epoch
        self.cadence = TelemetryCadence(telemetry_every)
        self.layers_due = True  # the coming log measures the layers (see cadence.py)
        self._answers_every = max(1, log_every // ACCURACY_STEPS)
        self.max_steps, self.checkpoint_every = max_steps, checkpoint_every
        self.global_step, self.epoch, self.rollbacks = 0, 1, 0
        self.finishing = self.validating = False
        # A deferred log: whether it is a full one, what its step's update ran with, and
        # whether it measures the layers.
        self.log_due: tuple[bool, Hyperparameters, float, bool] | None = None
        self.status: str | None = None
        self.ranks = Ranks()
        self.device = model_device(model)
        # Lazy layers without shapes yet: nothing to count or save until the first batch.
        self.shapeless = awaits_first_batch(model)
        self.stop = StopSignal(install=handle_signals)
        self.url = resolve_url(db)
        self.store: Store | None = open_store(db) if self.ranks.is_main else None
        try:
            self._open(params, name, config, model_name, dataset, resume, Path(checkpoint_dir),
                       checkpoint_keep, buffer_rows)
        except BaseException:
            self.stop.close()
            if self.store is not None:
                self.store.close()
            raise
        self.metrics, self.progress = IntervalMetrics(self.device), Progress()
        self._watch_layers(layers)
        self.logbook = Logbook(self, validate, num_classes, early_stopping)
        self.guard = NanGuard(nan_guard, sparse=set(sparse_parameters(model)))
        self.updates = UpdateHooks(self)
        self._between_batches: RemovableHandle | None = None
        self.watch_forward(self.shapeless)
        self.sampler = SystemSampler(self.writer, self.progress, self.device) \
            if self.ranks.is_main else None
        try:
            self._start()
        except BaseException as exc:  # the run exists now: it ends failed, not "running"
            self.close(exc)
            raise

    # -- opening and closing the run --------------------------------------------------------

    def _watch_layers(self, names: Iterable[str] | None) -> None:
        """The probe of the watched layers and, on rank 0 of a new run (a resumed one has
        its table), the table of every layer that the model's first forward pass fills."""
        self.probe = LayerProbe(self.model, names=None if names is None else list(names),
                                eager=self.compiled)
        self.table: LayerTable | None = None
        if self.ranks.is_main and self.resumed is None:
            self.table = LayerTable(self.model, {layer.name for layer in self.probe.layers})
            if self.compiled:
                self.probe.eager_next_forward()  # the table's hooks run, and leave the graph

    def _open(self, params: Hyperparameters, name: str | None, config: Mapping[str, Any] | None,
              model_name: str | None, dataset: str, resume: int | None, checkpoint_dir: Path,
              keep: int, buffer_rows: int) -> None:
        """Create (or reopen) the run in the database; the writer, listener and checkpoints."""
        model_name = model_name or type(self.model).__name__
        seen_version, handled_rollback, run_name = 1, 0, None
        self.resumed: tuple[Checkpoint, Restorable] | None = None
        if resume is not None:
            self.run_id = resume
            self.resumed, self._resumed_row, handled_rollback = resume_run(
                self, resume, checkpoint_dir / f"run_{resume}")
            seen_version = self._resumed_row.version  # adopted at the restored step
            run_name = self.store.get_run(resume)["name"] if self.ranks.is_main else None
        elif self.ranks.is_main:  # under torchrun, rank 0 alone owns the run in the database
            run_name = name or f"{model_name.lower()}-{now():%Y%m%d-%H%M%S}"
            self.run_id = self.store.create_run(run_name, model_name, dataset,
                                                self._config(config), params)
        self.run_id, run_name = self.ranks.from_main((getattr(self, "run_id", None), run_name))
        run_dir = checkpoint_dir / f"run_{self.run_id}"
        if self.ranks.is_main:
            self.writer: BackgroundWriter | NullWriter = BackgroundWriter(
                self.store, self.run_id, spill_dir=run_dir / "unwritten",
                spill_after_rows=buffer_rows)
            self.listener = ParameterListener(self.store, self.run_id, seen_version=seen_version)
        else:
            self.writer, self.listener = NullWriter(), None
        self.ring = CheckpointRing(
            run_dir, keep=keep,
            on_saved=lambda c, size: self.writer.rows("checkpoints", [{
                "step": c.step, "epoch": c.epoch, "reason": c.reason, "path": str(c.path),
                "bytes": size, "dt": now()}]),
            on_removed=lambda c: self.writer.checkpoint_removed(c.step),
        )
        self.control = Controller(self, params, handled_rollback)
        where = f" (rank {self.ranks.rank} of {self.ranks.world_size})" * self.ranks.distributed
        label = f" '{run_name}'" if run_name else ""
        say(f"run {self.run_id}{label} on {self.device}{where}, database {describe_url(self.url)}")

    def _config(self, config: Mapping[str, Any] | None) -> dict[str, Any]:
        """The user's config plus what tells this process and its setup apart. A lazy
        model's parameter count is merged in once its first batch has shaped it."""
        counted = {} if self.shapeless else {"parameters_count": parameters_count(self.model)}
        return {
            **counted,
            "device": str(self.device),
            "world_size": self.ranks.world_size,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            **dict(config or {}),
            "db": describe_url(self.url),
            **trainer_identity(),
        }

    def _start(self) -> None:
        """Step 0 of a new run (its first log and checkpoint), or a resumed run's restore."""
        if self.resumed is None:
            self.writer.event("info", "run_started", f"run {self.run_id} started: "
                              f"{describe(self.control.params)}", step=0)
            if not trains_anything(self.optimizer):
                self.writer.event(
                    "warning", "nothing_to_train", "the optimizer holds no parameter that "
                    "can learn (a parameter-free or frozen model): each step measures the "
                    "loss, no update changes the model, and the learning rate, weight decay "
                    "and optimizer have nothing to act on", step=0)
            if self.logbook.validate is not None:
                self.logbook.log(full_validation=False)  # the untrained model: initial loss
            self.checkpoint("initial")
        else:
            interrupted_at = self.store.last_logged_step(self.run_id) if self.ranks.is_main \
                else None
            if self.ranks.is_main:
                for why in self.ring.seed(self.store.checkpoints(self.run_id)):
                    self.writer.event("warning", "checkpoint_refused", f"{why}; it cannot be "
                                      "rolled back to")
            self.restore(*self.resumed)
            self.control.adopt(self._resumed_row)  # a change made while the run was down
            self.writer.event("info", "run_resumed", f"run {self.run_id} resumed from its "
                              f"checkpoint of step {self.global_step} (it had logged up to step "
                              f"{interrupted_at}); steps after the checkpoint are kept as an "
                              "abandoned branch", step=self.global_step)
            if self.ranks.distributed:
                say(f"rank {self.ranks.rank}: resumed run {self.run_id} at step "
                    f"{self.global_step}")
        self.resumed = None
        self._boundary()

    def __enter__(self) -> LiveRun:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> bool:
        self.close(error)
        return False

    def close(self, error: BaseException | None = None) -> None:
        """End the run: `stopped`, `finished` or (given the exception) `failed`."""
        if self.status is not None:
            return
        try:
            if error is None:
                self._finish()
            elif isinstance(error, KeyboardInterrupt):
                self.writer.event("warning", "run_interrupted",
                                  f"interrupted at step {self.global_step}",
                                  step=self.global_step)
                self.status = "stopped"
                self.writer.status("stopped", ended=True)
            else:
                self.writer.event("error", "run_failed", f"{type(error).__name__}: {error}",
                                  step=self.global_step)
                self.status = "failed"
                self.writer.status("failed", ended=True)
        finally:
            self._release()

    def _finish(self) -> None:
        stopped = self.control.stopping or self.control.stop_asked
        status = "stopped" if stopped else "finished"
        self._write_due_log()
        if self.global_step != self.logbook.last_logged:
            self.logbook.log(full_validation=True)  # the final validation
        if self.final_checkpoint:
            self.checkpoint("final", wait=True)
        self.writer.event("info", f"run_{status}", f"run {status} at step {self.global_step}, "
                          f"epoch {self.epoch}", step=self.global_step)
        self.status = status
        self.writer.status(status, ended=True)
        if self.ranks.distributed:  # equal fingerprints: every rank made the same updates
            fingerprint = sum(p.detach().cpu().double().abs().sum().item()
                              for p in self.model.parameters())
            say(f"rank {self.ranks.rank}: {status} at step {self.global_step}, "
                f"weights {fingerprint:.12g}")

    def _release(self) -> None:
        """Stop the threads and give back the hooks and signals (another run may follow)."""
        self.ring.flush()
        self.updates.remove()
        self.probe.remove()
        if self.table is not None:
            self.table.remove()
        self.watch_forward(False)
        self.stop.close()
        self.ranks.settle()
        if self.ranks.is_main:
            self.sampler.close()
            self.listener.close()
            if not self.writer.close():
                print(f"warning: some rows could not be written to the database; those kept in "
                      f"{self.ring.directory / 'unwritten'} are written when the run is resumed",
                      file=sys.stderr)
            self.store.close()

    # -- the loop's side --------------------------------------------------------------------

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer in force: after a switch from the board, the new one."""
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer
        self.updates.attach(optimizer)

    @property
    def should_stop(self) -> bool:
        return self.control.stopping or self.control.stop_asked or self.finishing

    def request_stop(self) -> None:
        """Ask the run to stop at the next step boundary, as Ctrl-C or the board would."""
        self.stop.requested.set()

    @property
    def parameters(self) -> Hyperparameters:
        """The steerable values in force (what the board last had applied)."""
        return self.control.params

    def record_validation(self, loss: float, accuracy: float | None = None,
                          loss_std: float | None = None, batches: int | None = None) -> None:
        """A validation your loop (or framework) ran itself, on its own schedule: its
        figures go into the next logged row (accuracy in percent). With `loss_std` (the
        std of the per-batch losses) and `batches` the board draws the noise band."""
        self.logbook.reported = validation_figures(
            {"loss": loss, "accuracy": accuracy, "loss_std": loss_std, "batches": batches})

    def flush_log(self) -> None:
        """At a framework's step start: write the last step's log, which waited for the
        framework's validation (see `defer_logs`), or, when a validation was reported
        between two logs, a row for it at this step. A pause the board asked for at the
        last step holds here, after that validation, so its row shows while it waits."""
        if self.status is not None:
            return
        held = self.log_due is not None and self.control.paused
        self._write_due_log()
        if held:
            self.control.wait_while_paused()
            self._prepare_next_step()

    def _write_due_log(self) -> None:
        due, self.log_due = self.log_due, None
        if due is not None:
            self.logbook.log(*due)
        elif self.logbook.reported is not None and self.global_step != self.logbook.last_logged:
            self.logbook.log(full_validation=False)
        # else: that step's row is written; the validation goes into the next one

    def step(self, loss: torch.Tensor | float | None, outputs: torch.Tensor | None = None,
             targets: torch.Tensor | None = None) -> None:
        """Record a training step, log on schedule, then take the board's news at this
        step boundary: a change, a pause (blocks here), a rollback or a stop. A step
        whose loss is unknown (None) is counted and steered, and logs no training loss."""
        if self.status is not None:
            raise RuntimeError(f"run {self.run_id} has ended ({self.status})")
        self.probe.end_forward()
        if loss is not None:
            loss = loss.detach() if isinstance(loss, torch.Tensor) \
                else torch.tensor(float(loss))
            if loss.dim():
                loss = loss.mean()
        # Only the exact guard knows here (it read the flag); the device guard's flag is
        # read at the next log. Under DDP every rank has the same averaged gradients, so
        # every rank drops the same update: nothing to agree on.
        if self.updates.take_dropped():
            self.blow_up(loss)
        else:
            self._count(loss, outputs, targets)
        self._boundary()

    def _boundary(self) -> None:
        """Between two steps: adopt what the board asks, wait while it pauses the run."""
        self.control.poll()
        if self.control.paused and self.log_due is None:  # else it holds in flush_log
            self._write_due_log()  # the board shows where the run stands while it waits
            self.control.wait_while_paused()
        self._prepare_next_step()

    def _count(self, loss: torch.Tensor | None, outputs: Any, targets: Any) -> None:
        # The right answers of ACCURACY_STEPS evenly spaced steps per log, the logged one
        # among them: two ops a step were a tenth of what LiveRun added to a 1 ms step.
        answers = self.updates.logging or (self.global_step + 1) % self._answers_every == 0
        samples = None if loss is None else self.metrics.add(loss, outputs, targets, answers)
        self.global_step += 1
        if samples:
            samples *= self.ranks.world_size  # the job's, not this rank's
            self.logbook.interval_samples += samples
            self.progress.samples += samples
        self.progress.step = self.global_step
        if self.max_steps is not None and self.global_step >= self.max_steps:
            self.finishing = True
        if self.updates.logging:
            full = self._end_of_epoch() or self.finishing
            if self.defer_logs:
                self.log_due = (full, self.control.params, self.lr_of_last_update(),
                                self.layers_due)
            else:
                self.logbook.log(full_validation=full, layers=self.layers_due)
        if self.global_step % self.checkpoint_every == 0:
            self.checkpoint("periodic")

    def lr_of_last_update(self) -> float:
        """Group 0's lr in the last update (before any: the one in force)."""
        last = self.updates.last_lr
        return learning_rate_in_force(self.optimizer) if last is None else last

    def _end_of_epoch(self) -> bool:
        """A full validation ends each epoch, unless epochs are shorter than a log."""
        n = self.steps_per_epoch
        return bool(n) and n >= self.log_every and self.global_step % n == 0

    def _prepare_next_step(self) -> None:
        """Whether the coming step logs, and whether that log measures the layers: its
        update is then measured, and without a validation to record activations on,
        its forward pass is recorded."""
        coming = self.global_step + 1
        n = self.steps_per_epoch
        full = (bool(n) and n >= self.log_every and coming % n == 0) or (
            self.max_steps is not None and coming >= self.max_steps)
        logging = full or coming % self.log_every == 0
        self.updates.logging = logging
        self.layers_due = logging and self.cadence.due(full)
        self.updates.measuring = self.layers_due and self.ranks.is_main
        if self.updates.measuring and self.logbook.validate is None:
            self.probe.arm_next_forward()

    def blow_up(self, loss: torch.Tensor | None, since: int | None = None) -> None:
        """A non-finite loss or gradient: pause before the update can spread it. The exact
        guard knows at the step itself; the device guard (`since`: the last log) at the
        log, when every update since the first non-finite one has been refused."""
        control = self.control
        control.paused = True
        lr = learning_rate_in_force(self.optimizer)
        self.logbook.doctor.note_blow_up(lr)
        if since is not None:
            self.probe.forget_update()  # the refused gradients are no telemetry
            what = f"the gradients were not finite at a step between steps {since + 1} and " \
                f"{self.global_step}: every update from that one on was refused on the " \
                f"device, and training paused at step {self.global_step}"
        else:
            what = "the gradients are not finite"
            if loss is not None and not torch.isfinite(loss).all():
                what = f"the training loss is {loss.float().mean().item()}"
            what += f" at step {self.global_step + 1}: training paused before the update"
        self.writer.event(
            "error", "non_finite", what,
            step=self.global_step,
            recommendation="roll back to an earlier checkpoint and lower the learning rate "
            f"(now {control.params.learning_rate:g})",
            fix={"learning_rate": control.params.learning_rate / 10},
        )
        self.finishing = False

    def watch_forward(self, on: bool) -> None:
        """A hook after the model's forward pass, only while it has work: until the first
        batch shapes lazy layers, and while a log validates (a hook on the model, even
        one that does nothing, slows every forward pass down)."""
        if on and self._between_batches is None:
            self._between_batches = self.model.register_forward_hook(self._after_forward)
        elif not on and self._between_batches is not None:
            self._between_batches.remove()
            self._between_batches = None

    def _after_forward(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """After the model's forward pass: the first one may have shaped lazy layers;
        between two validation batches, a change need not wait for the whole pass."""
        if self.shapeless and not awaits_first_batch(self.model):
            self._shaped()
        if self.validating:
            self.control.poll(during_log=True)
        if not self.shapeless and not self.validating:
            self.watch_forward(False)

    def _shaped(self) -> None:
        """The first batch has given the lazy layers their shapes: the parameter count
        goes into runs.config, and the initial checkpoint, which had nothing to save
        before, is taken now (still step 0: no update can have run before this pass)."""
        self.shapeless = False
        count = parameters_count(self.model)
        self.writer.config({"parameters_count": count})
        self.writer.event("info", "model_shaped", f"the lazy layers took their shapes from "
                          f"the first batch: {count:,} parameters", step=self.global_step)
        if self.global_step == 0:
            self.checkpoint("initial")

    # -- checkpoints and rollback -----------------------------------------------------------

    def checkpoint(self, reason: str, wait: bool = False) -> None:
        """Save the model and optimizer on rank 0 (the ranks hold the same weights); not
        while lazy layers have no shapes (see `_shaped`)."""
        if not self.ranks.is_main or self.shapeless:
            return
        self.ring.save(self.global_step, self.epoch, self.model, self.optimizer,
                       {"run_id": self.run_id, "parameters": vars(self.control.params)},
                       reason, wait=wait)

    def restore(self, found: Checkpoint, loaded: Restorable) -> None:
        """Put a checked checkpoint into the live model and optimizer (nothing here can
        fail: it was checked); later rows become a branch."""
        self.model.load_state_dict(loaded.model_state)  # copies into the optimizer's params
        self.shapeless = awaits_first_batch(self.model)  # lazy layers take the saved shapes
        self.watch_forward(self.shapeless)
        loaded.model_state.clear()  # the model holds the weights now: no second copy kept
        was = self.optimizer
        if type(loaded.optimizer) is type(was):  # in place: references stay valid
            was.load_state_dict(loaded.optimizer.state_dict())
            self.updates.attach(was)  # the guard settles the loaded groups' kernel again
        else:  # the checkpoint predates an optimizer switch
            self.replace_optimizer(loaded.optimizer)
        follow_schedules(self.optimizer, self.schedulers, was,
                         loaded.parameters.learning_rate / self.control.params.learning_rate)
        set_dropout(self.model, loaded.parameters.dropout / 100)
        self.writer.rollback(found.step)
        self.ring.forget_after(found.step)
        self.control.params = loaded.parameters
        self.global_step, self.epoch = found.step, found.epoch
        self.logbook.last_logged = found.step
        self.progress.step = found.step
        self.metrics.reset()
        self.log_due = None
        self.rollbacks += 1

    # -- how changes reach the optimizer (what a framework integration overrides) -----------

    def refusals(self, current: Hyperparameters, new: Hyperparameters) -> dict[str, str]:
        """The values of `new` this run cannot take, by column, with why: what the model
        and optimizer cannot take (steering.refusals), and a switch the framework cannot
        put in force. Only changed values are named."""
        refused = refusals(self.model, self.optimizer, current, new)
        if new.optimizer != current.optimizer and "optimizer" not in refused \
                and (why := self.switch_refusal()):
            refused["optimizer"] = f"optimizer={new.optimizer}: {why}"
        return refused

    def apply_parameters(self, current: Hyperparameters, new: Hyperparameters) -> None:
        """Bring model and optimizer from `current` to `new`, which `refusals` has cleared;
        ValueError (nothing changed) when the model cannot take them all the same."""
        optimizer = apply_parameters(self.model, self.optimizer, current, new, self.schedulers)
        if optimizer is not self.optimizer:
            self.replace_optimizer(optimizer)

    def switch_refusal(self) -> str | None:
        """Why this run cannot put a new optimizer object in force (None: it can)."""
        return None

    def known_gradient_norm(self) -> torch.Tensor | float | None:
        """The coming update's total gradient norm, where the framework has computed it
        already (the finiteness check before the update then reads it instead of
        computing it again); None: the check computes it."""
        return None

    def replace_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Put a new optimizer in force: a switch, or a rollback across one."""
        self.optimizer = optimizer  # the hooks follow it
