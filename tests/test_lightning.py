"""LiveTrainingCallback under a real Lightning Trainer, steered from a plain SQL client.

Each test runs `trainer.fit` in the main thread on a small MLP over scikit-learn's
digits, while a steering thread plays the user at an SQL client: a plain UPDATE of the
run's `parameters` row, then a wait for its `parameter_changes` acknowledgment. The
module records what Lightning itself hands the optimizer step (the optimizer, its
param groups' lrs, the clipping value), so the assertions check what training used,
not what livetrain says it set.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F  # noqa: N812  (PyTorch's own convention)
from sklearn.datasets import load_digits
from test_livetrain_api import SqlClient, wait_for
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from livetrain.lightning import LiveTrainingCallback

LR = 0.01  # the body's lr; the head runs at ten times it
MAX_STEPS = 100_000  # far beyond any test: each fit ends by a stop from SQL
BASE_LINEARS = {"net.0", "net.3"}  # the MLP's Linear layers, as layer_statistics names them


def digits_loaders() -> tuple[DataLoader, DataLoader]:
    """1437 training and 360 validation digits (8x8, scaled to [0, 1]); 45 steps an epoch."""
    x, y = load_digits(return_X_y=True)
    data = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    generator = torch.Generator().manual_seed(0)
    train, val = torch.utils.data.random_split(data, [1437, 360], generator=generator)
    return (DataLoader(train, batch_size=32, shuffle=True, generator=generator),
            DataLoader(val, batch_size=120))


class DigitsMLP(pl.LightningModule):
    """An MLP with a dropout, two param groups (body at LR, head at 10 x LR), Adam; it
    records, at each optimizer step, the step, the optimizer Lightning steps and its lrs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(64, 10))
        self.seen: list[tuple[int, type, list[float]]] = []
        self.clipping: list[tuple[int, float | None, float, float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([{"params": self.net[0].parameters(), "lr": LR},
                                 {"params": self.net[3].parameters(), "lr": 10 * LR}])

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.seen.append((self.trainer.global_step, type(optimizer),
                          [group["lr"] for group in optimizer.param_groups]))

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping, recording the value it was handed and the gradient norm
        before and after it."""
        before = gradient_norm(self)
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.clipping.append((self.trainer.global_step, gradient_clip_val, before,
                              gradient_norm(self)))


class ManualDigitsMLP(DigitsMLP):
    """The same MLP optimized by hand: its training_step holds the optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        optimizer = self.optimizers()
        outputs = super().training_step(batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(outputs["loss"])
        optimizer.step()
        return outputs


def gradient_norm(module: nn.Module) -> float:
    """0 when the gradients were dropped (a non-finite update refused)."""
    norms = [torch.linalg.vector_norm(p.grad) for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


# -- the user at an SQL client, beside the fit --------------------------------------------


class RunSql:
    """The user at an SQL client: plain UPDATEs of the run's parameters row, and waits for
    the trainer's acknowledgments."""

    def __init__(self, url: str) -> None:
        self.sql = SqlClient(url)
        self.run_id = 0

    def find_run(self, timeout: float = 60.0) -> None:
        self.run_id = wait_for("a run", lambda: self.sql.one("SELECT run_id FROM runs"),
                               timeout=timeout)[0]

    def update(self, assignments: str, **values: Any) -> int:
        """A plain UPDATE of the run's parameters row, bumping its version; the version."""
        self.sql.execute(f"UPDATE parameters SET {assignments}, version = version + 1 "
                         "WHERE run_id = :r", r=self.run_id, **values)
        return self.sql.one("SELECT version FROM parameters WHERE run_id = :r",
                            r=self.run_id)[0]

    def acknowledged(self, version: int) -> int:
        """Wait for the trainer's parameter_changes row of `version`; its applied_step."""
        return wait_for(f"version {version} acknowledged", lambda: self.sql.one(
            "SELECT applied_step FROM parameter_changes WHERE run_id = :r AND version = :v",
            r=self.run_id, v=version))[0]

    def stop(self) -> int:
        """stop_train from SQL; the step it was acknowledged at."""
        return self.acknowledged(self.update("stop_train = TRUE"))

    def status(self) -> str:
        return self.sql.one("SELECT status FROM runs WHERE run_id = :r", r=self.run_id)[0]


class Steering(RunSql, threading.Thread):
    """Runs `script(steering)` beside the fit. A failure is kept for the main thread and
    ends the fit (a stop request also ends a pause), so the test does not train on."""

    def __init__(self, url: str, trainer: pl.Trainer, callback: LiveTrainingCallback,
                 script: Callable[[Steering], None]) -> None:
        RunSql.__init__(self, url)
        threading.Thread.__init__(self, daemon=True)
        self.script = script
        self.trainer, self.callback = trainer, callback
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.find_run()
            wait_for("20 steps", lambda: self.trainer.global_step >= 20)
            self.script(self)
        except BaseException as exc:
            self.error = exc
            if self.callback.run is not None:
                self.callback.run.request_stop()
            self.trainer.should_stop = True

    def steps_past(self, step: int, more: int = 20) -> None:
        wait_for(f"step {step + more}", lambda: self.trainer.global_step >= step + more)


def trainer_for(tmp_path: Path, db: str, name: str, log_every: int,
                **options: Any) -> tuple[pl.Trainer, LiveTrainingCallback]:
    callback = LiveTrainingCallback(db=db, name=name, log_every=log_every,
                                    checkpoint_dir=tmp_path / "checkpoints", **options)
    trainer = pl.Trainer(max_steps=MAX_STEPS, accelerator="cpu", devices=1,
                         enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[callback])
    return trainer, callback


def fit_while_steering(tmp_path: Path, db: str, module: DigitsMLP,
                       script: Callable[[Steering], None],
                       log_every: int = 10) -> tuple[pl.Trainer, Steering]:
    """Fit in this thread while `script` steers from another; its failure is raised here."""
    trainer, callback = trainer_for(tmp_path, db, type(module).__name__, log_every)
    steering = Steering(db, trainer, callback, script)
    steering.start()
    trainer.fit(module, *digits_loaders())
    steering.join(timeout=60)
    if steering.error is not None:
        raise steering.error
    assert not steering.is_alive()
    assert trainer.global_step < MAX_STEPS  # the stop from SQL ended it
    assert callback.run is not None and callback.run.status == "stopped"
    assert steering.status() == "stopped"
    return trainer, steering


def in_force(step: int, changes: list[tuple[int, Any]], first: Any) -> Any:
    """The value at `step` given (applied_step, value) changes: a change applied at step N
    is in force for the optimizer step Lightning takes at global_step N and after."""
    value = first
    for applied_step, new in changes:
        if step >= applied_step:
            value = new
    return value


# -- a, b, c: lr twice, pause and resume, stop -----------------------------------------------


class LrPauseStop:
    """The user's session: two lr changes, a pause of 3 s, a resume, a stop."""

    def __init__(self) -> None:
        self.changes: list[tuple[int, float]] = []
        self.paused_steps: set[int] = set()
        self.stopped_at = 0

    def __call__(self, steering: Steering) -> None:
        for lr in (LR / 2, LR * 2):
            step = steering.acknowledged(steering.update("learning_rate = :lr", lr=lr))
            self.changes.append((step, lr))
            steering.steps_past(step, 60)  # past a validation and several logs
        self.pause_and_resume(steering)
        self.stopped_at = steering.stop()

    def pause_and_resume(self, steering: Steering) -> None:
        paused_at = steering.acknowledged(steering.update("pause_train = TRUE"))
        wait_for("status paused", lambda: steering.status() == "paused")
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            self.paused_steps.add(steering.trainer.global_step)
            time.sleep(0.05)
        assert self.paused_steps == {paused_at}
        assert steering.status() == "paused"
        steering.acknowledged(steering.update("pause_train = FALSE"))
        steering.steps_past(paused_at)
        wait_for("status running", lambda: steering.status() == "running")


def test_sql_steers_lr_pause_and_stop_of_a_lightning_fit(tmp_path: Path, db_url: str) -> None:
    module, session = DigitsMLP(), LrPauseStop()
    trainer, steering = fit_while_steering(tmp_path, db_url, module, session)

    assert trainer.global_step == session.stopped_at  # no step after the acknowledged stop
    (first, _), (second, _) = session.changes
    assert 20 <= first < second < session.stopped_at
    for step, _, lrs in module.seen:  # what Lightning's optimizer step used
        assert lrs[0] == pytest.approx(in_force(step, session.changes, LR)), step
        assert lrs[1] / lrs[0] == pytest.approx(10)
    assert {in_force(step, session.changes, LR) for step, _, _ in module.seen} == \
        {LR, LR / 2, LR * 2}
    check_logged_lrs(steering, session.changes)
    check_telemetry(steering)
    steering.sql.close()


def check_logged_lrs(steering: Steering, changes: list[tuple[int, float]]) -> None:
    """Every statistics row after a change's step shows its lr, every row before the first
    change the initial one; each stretch has rows."""
    rows = steering.sql.rows("SELECT step, learning_rate FROM statistics WHERE run_id = :r",
                             r=steering.run_id)
    bounds = [step for step, _ in changes]
    for lr, low, high in ((LR, -1, bounds[0]), (LR / 2, bounds[0], bounds[1]),
                          (LR * 2, bounds[1], math.inf)):
        logged = {row_lr for step, row_lr in rows if low < step < high}
        assert logged and all(value == pytest.approx(lr) for value in logged), \
            (lr, low, high, logged)


def check_telemetry(steering: Steering) -> None:
    """Validation rows (from the module's val_loss / val_acc) and per-layer rows."""
    validated = steering.sql.rows(
        "SELECT step, validate_loss, validate_accuracy FROM statistics WHERE run_id = :r "
        "AND validate_loss IS NOT NULL", r=steering.run_id)
    assert len(validated) >= 3
    assert all(loss > 0 and 0 <= accuracy <= 100 for _, loss, accuracy in validated)
    assert max(accuracy for *_, accuracy in validated) > 50  # percent, not a fraction
    layers = {name for (name,) in steering.sql.rows(
        "SELECT DISTINCT layer_name FROM layer_statistics WHERE run_id = :r "
        "AND grad_norm IS NOT NULL", r=steering.run_id)}
    assert layers >= BASE_LINEARS


# -- refusals, clipping and an optimizer switch ----------------------------------------------


class SwitchToSgd:
    """An optimizer switch from SQL; the event (or acknowledgment) and the steps after it."""

    def __init__(self) -> None:
        self.version = self.step = 0
        self.message = ""

    def __call__(self, steering: Steering) -> None:
        self.version = steering.update("optimizer = 'SGD'")
        self.message, self.step = wait_for("the switch's event", lambda: steering.sql.one(
            "SELECT message, step FROM events WHERE run_id = :r AND version = :v AND code "
            "IN ('parameters_rejected', 'parameters_applied')", r=steering.run_id,
            v=self.version))
        steering.steps_past(self.step, 40)
        steering.stop()


def test_manual_optimization_refuses_an_optimizer_switch(tmp_path: Path,
                                                         sqlite_url: str) -> None:
    module, session = ManualDigitsMLP(), SwitchToSgd()
    trainer, steering = fit_while_steering(tmp_path, sqlite_url, module, session)

    code = steering.sql.one("SELECT code FROM events WHERE run_id = :r AND version = :v",
                            r=steering.run_id, v=session.version)[0]
    assert code == "parameters_rejected"
    assert "manual" in session.message and "SGD" in session.message, session.message
    assert steering.sql.one("SELECT count(*) FROM parameter_changes WHERE run_id = :r "
                            "AND version = :v", r=steering.run_id, v=session.version)[0] == 0
    after = [kind for step, kind, _ in module.seen if step > session.step]
    assert len(after) >= 30 and set(after) == {torch.optim.Adam}  # it trained on, with Adam
    assert isinstance(trainer.optimizers[0], torch.optim.Adam)
    logged = steering.sql.rows("SELECT DISTINCT optimizer FROM statistics WHERE run_id = :r",
                               r=steering.run_id)
    assert logged == [("Adam",)]
    steering.sql.close()


def test_an_optimizer_switch_reaches_lightnings_optimizer_step(tmp_path: Path,
                                                               db_url: str) -> None:
    module, session = DigitsMLP(), SwitchToSgd()
    trainer, steering = fit_while_steering(tmp_path, db_url, module, session)

    applied_step, optimizer = steering.sql.one(
        "SELECT applied_step, optimizer FROM parameter_changes WHERE run_id = :r "
        "AND version = :v", r=steering.run_id, v=session.version)
    assert (applied_step, optimizer) == (session.step, "SGD"), session.message
    kinds = [(step, kind) for step, kind, _ in module.seen]
    assert {kind for step, kind in kinds if step < applied_step} == {torch.optim.Adam}
    after = [kind for step, kind in kinds if step >= applied_step]
    assert len(after) >= 40 and set(after) == {torch.optim.SGD}
    assert isinstance(trainer.optimizers[0], torch.optim.SGD)
    assert [group["lr"] for group in trainer.optimizers[0].param_groups] == \
        [pytest.approx(LR), pytest.approx(10 * LR)]  # the groups and their ratio carried over
    losses = steering.sql.rows("SELECT train_loss FROM statistics WHERE run_id = :r "
                               "AND step > :s", r=steering.run_id, s=applied_step)
    assert len(losses) >= 3 and all(math.isfinite(loss) for (loss,) in losses)
    steering.sql.close()


class ClipFromSql:
    """grad_clip set from SQL; the step it was acknowledged at."""

    CLIP = 0.05

    def __init__(self) -> None:
        self.step = 0

    def __call__(self, steering: Steering) -> None:
        self.step = steering.acknowledged(steering.update("grad_clip = :c", c=self.CLIP))
        steering.steps_past(self.step, 30)
        steering.stop()


def test_grad_clip_from_sql_reaches_lightnings_clipping(tmp_path: Path, sqlite_url: str) -> None:
    module, session = DigitsMLP(), ClipFromSql()
    trainer, steering = fit_while_steering(tmp_path, sqlite_url, module, session)

    assert trainer.gradient_clip_val == session.CLIP
    before = [value for step, value, _, _ in module.clipping if step < session.step]
    assert before and set(before) == {None}
    after = [(value, pre, post) for step, value, pre, post in module.clipping
             if step >= session.step]
    assert len(after) >= 30 and {value for value, _, _ in after} == {session.CLIP}
    assert any(pre > 2 * session.CLIP for _, pre, _ in after)  # the clipping had work to do
    assert all(post <= session.CLIP * 1.001 for _, _, post in after)
    steering.sql.close()


class HalveLr:
    """One lr change from SQL; the step it was acknowledged at."""

    def __init__(self) -> None:
        self.step = 0

    def __call__(self, steering: Steering) -> None:
        self.step = steering.acknowledged(steering.update("learning_rate = :lr", lr=LR / 2))
        steering.steps_past(self.step, 5)
        steering.stop()


def test_the_row_of_the_applied_step_shows_the_lr_its_update_used(
    tmp_path: Path, sqlite_url: str
) -> None:
    """With a row at every step, the row of step N (the update from N-1 to N) shows the lr
    Lightning's optimizer step used then; a plain LiveRun loop logs it that way."""
    module, session = DigitsMLP(), HalveLr()
    fit_while_steering(tmp_path, sqlite_url, module, session, log_every=1)
    used = {step + 1: lrs[0] for step, _, lrs in module.seen}  # seen before step N+1's update
    sql = SqlClient(sqlite_url)
    rows = sql.rows("SELECT step, learning_rate FROM statistics WHERE step > 0")
    sql.close()
    assert used[session.step] == pytest.approx(LR)  # the applied step's update: the old lr
    assert {step: lr for step, lr in rows if step in used} == pytest.approx(
        {step: used[step] for step, _ in rows if step in used})


class SilentManualMLP(ManualDigitsMLP):
    """Manual optimization whose training_step returns nothing and logs its loss."""

    def training_step(self, batch: Any, batch_idx: int) -> None:
        outputs = super().training_step(batch, batch_idx)
        self.log("train_loss", outputs["loss"])


def test_a_step_that_returns_nothing_logs_the_loss_it_logged(
    tmp_path: Path, sqlite_url: str
) -> None:
    trainer, callback = trainer_for(tmp_path, sqlite_url, "silent", log_every=5)
    trainer.fit_loop.epoch_loop.max_steps = 20
    module = SilentManualMLP()
    trainer.fit(module, *digits_loaders())
    assert callback.run is not None and callback.run.status == "finished"
    sql = SqlClient(sqlite_url)
    losses = sql.rows("SELECT step, train_loss FROM statistics WHERE run_id = :r AND step > 0",
                      r=callback.run.run_id)
    sql.close()
    assert [step for step, _ in losses] == [5, 10, 15, 20]
    assert all(loss is not None and 0 < loss < 5 for _, loss in losses), losses


class BlowsUp(DigitsMLP):
    """The MLP whose 8th batch yields a NaN loss (a corrupt sample would): its backward
    pass fills the gradients with NaN."""

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        outputs = super().training_step(batch, batch_idx)
        if self.trainer.global_step == 7:
            outputs["loss"] = outputs["loss"] * float("nan")
        return outputs


def test_a_blow_up_pauses_the_fit_before_the_update(tmp_path: Path, sqlite_url: str) -> None:
    """As in train.py with the exact guard: the non-finite update is dropped, the run
    pauses at that step with the reason and a fix, the weights stay finite; a stop from
    SQL then ends the paused fit. (The default guard's refusal on the device, paused at
    the next log, is tests/test_step_sync.py's.)"""
    trainer, callback = trainer_for(tmp_path, sqlite_url, "blows-up", log_every=10,
                                    nan_guard="exact")
    module = BlowsUp()
    seen: dict[str, Any] = {}

    def watch() -> None:
        sql = SqlClient(sqlite_url)
        try:
            wait_for("the run paused", lambda: sql.one(
                "SELECT status FROM runs WHERE status = 'paused'"))
            seen["finite"] = all(bool(torch.isfinite(p).all()) for p in module.parameters())
            seen["event"] = sql.one("SELECT step, message, fix FROM events "
                                    "WHERE code = 'non_finite'")
            sql.execute("UPDATE parameters SET stop_train = TRUE, version = version + 1")
        finally:
            sql.close()
            if "event" not in seen and callback.run is not None:
                callback.run.request_stop()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    trainer.fit(module, digits_loaders()[0])
    watcher.join(timeout=60)
    assert callback.run is not None and callback.run.status == "stopped"
    assert seen["finite"] is True
    step, message, fix = seen["event"]
    assert "loss is nan at step 8" in message and "paused before the update" in message
    assert step == callback.run.global_step == 7  # the 8th update was never applied
    assert "learning_rate" in str(fix)
