"""`livetrain.transformers.LiveTrainingCallback` in a real `transformers.Trainer`.

`trainer.train()` runs in the test's thread on a tiny random-init BERT (nothing is
downloaded); a second thread plays the user at a plain SQL client, UPDATEs the run's
`parameters` row and watches the Trainer itself:

- two lr changes, each acknowledged at a step, after which the lr the Trainer logs is
  the new base times its own schedule's factor (both param groups follow); a pause
  that holds `state.global_step`; a stop that ends `train()` normally, with the
  Trainer's evaluations and the attention layers' telemetry in the database;
- an optimizer switch, refused with the reason, while the run trains on with AdamW and
  takes the next change (lr, weight decay on the decay group only, every dropout);
- a rollback that puts the checkpoint's weights into the live model, and a clipping
  change that reaches `args.max_grad_norm`;
- the update after a rollback runs at the lr the Trainer's schedule set, not at the
  checkpoint's base lr; an exception in `train()` that the program catches ends the run
  'failed', as it does around a user's own loop; each row shows the lr its step's update
  used (the row of a change's applied step too), also while the schedule moves it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_livetrain_api import SqlClient, wait_for
from torch.utils.data import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    EvalPrediction,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from livetrain.transformers import LiveTrainingCallback, TransformersRun

MAX_STEPS = 100_000  # far away: a stop from SQL ends every run here
SEQUENCE = 16
B0, B1, B2 = 1e-3, 5e-4, 2e-3  # the base lr, then the two board changes


class TokenRule(Dataset):
    """Random token ids; the label says whether most of them are below 50."""

    def __init__(self, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 100, (size, SEQUENCE), generator=generator)
        self.labels = ((self.ids < 50).sum(1) > SEQUENCE // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index],
                "attention_mask": torch.ones(SEQUENCE, dtype=torch.long),
                "labels": self.labels[index]}


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=2))


def accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """The fraction right, which the callback stores as a percent."""
    logits, labels = prediction.predictions, prediction.label_ids
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def live_trainer(tmp_path: Path, url: str, warmup: int = 20, schedule: str = "linear",
                 log_every: int = 10, **options: Any) -> tuple[Trainer, LiveTrainingCallback]:
    """A Trainer with two param groups (weight decay and none), `warmup` steps then the
    `schedule` (linear decay), a log per step and an evaluation every 40 steps; the
    callback logs every `log_every` steps and takes the LiveRun `options`."""
    callback = LiveTrainingCallback(db=url, name="hf-test", log_every=log_every,
                                    checkpoint_dir=tmp_path / "checkpoints", **options)
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=MAX_STEPS, per_device_train_batch_size=16,
        learning_rate=B0, weight_decay=0.01, warmup_steps=warmup, lr_scheduler_type=schedule,
        eval_strategy="steps", eval_steps=40, logging_steps=1, report_to=[],
        save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=TokenRule(512, 0),
                      eval_dataset=TokenRule(64, 1), compute_metrics=accuracy,
                      callbacks=[callback])
    return trainer, callback


def train_while(trainer: Trainer, callback: LiveTrainingCallback,
                steer: Callable[[], Any]) -> Any:
    """`trainer.train()` here while `steer` plays the user in another thread; what it
    returns. A failing `steer` stops the run (else it would train on), then raises here."""
    outcome: dict[str, Any] = {}

    def play() -> None:
        try:
            outcome["value"] = steer()
        except BaseException as exc:
            outcome["error"] = exc
            wait_for("the run, to stop it", lambda: callback.run is not None)
            callback.run.request_stop()

    thread = threading.Thread(target=play, daemon=True)
    thread.start()
    trainer.train()
    thread.join(timeout=120)
    if "error" in outcome:
        raise outcome["error"]
    assert not thread.is_alive(), "the steering thread outlived the run"
    return outcome["value"]


# -- the user at an SQL client ----------------------------------------------------------


def run_of(sql: SqlClient) -> int:
    return wait_for("a run", lambda: sql.one("SELECT run_id FROM runs"))[0]


def submit(sql: SqlClient, run_id: int, assignments: str) -> int:
    """UPDATE the parameters row (its trigger bumps the version); the new version."""
    sql.execute(f"UPDATE parameters SET {assignments} WHERE run_id = :r", r=run_id)
    return sql.one("SELECT version FROM parameters WHERE run_id = :r", r=run_id)[0]


def acknowledged(sql: SqlClient, run_id: int, version: int) -> tuple:
    """Wait for the trainer to acknowledge `version`: (applied_step, learning_rate,
    optimizer, grad_clip, rollback_step) of its parameter_changes row."""
    return wait_for(f"version {version} acknowledged", lambda: sql.one(
        "SELECT applied_step, learning_rate, optimizer, grad_clip, rollback_step "
        "FROM parameter_changes WHERE run_id = :r AND version = :v", r=run_id, v=version))


def status(sql: SqlClient, run_id: int) -> str:
    return sql.one("SELECT status FROM runs WHERE run_id = :r", r=run_id)[0]


def trained_to(trainer: Trainer, step: int) -> None:
    wait_for(f"global step {step}", lambda: trainer.state.global_step >= step, timeout=120)


def pause_and_resume(sql: SqlClient, run_id: int, trainer: Trainer) -> None:
    """Paused: the Trainer's step holds for 3 s and the run says 'paused'; resumed: on."""
    held = acknowledged(sql, run_id, submit(sql, run_id, "pause_train = TRUE"))[0]
    wait_for("the pause", lambda: status(sql, run_id) == "paused")
    assert trainer.state.global_step == held
    time.sleep(3.0)
    assert trainer.state.global_step == held and status(sql, run_id) == "paused"
    assert acknowledged(sql, run_id, submit(sql, run_id, "pause_train = FALSE"))[0] == held
    trained_to(trainer, held + 5)
    wait_for("running again", lambda: status(sql, run_id) == "running")


def steer_lr_pause_stop(url: str, trainer: Trainer) -> list[tuple[int, float]]:
    """Two lr changes, a pause, a stop; each change's (applied step, new base lr)."""
    sql = SqlClient(url)
    run_id = run_of(sql)
    changes = [(0, B0)]
    trained_to(trainer, 30)
    for lr in (B1, B2):
        step, row_lr, *_ = acknowledged(sql, run_id, submit(sql, run_id, f"learning_rate = {lr}"))
        assert row_lr == lr and step > changes[-1][0]
        changes.append((step, lr))
        trained_to(trainer, step + 15)
    pause_and_resume(sql, run_id, trainer)
    trained_to(trainer, 125)  # past three evaluations
    submit(sql, run_id, "stop_train = TRUE")
    sql.close()
    return changes


def base_at(changes: list[tuple[int, float]], step: int) -> float:
    """The base lr of step `step`'s update: the last change applied before it (a change
    acknowledged at step N is applied after N's update, so N+1's is the first it sets)."""
    return [lr for applied, lr in changes if applied < step or applied == 0][-1]


def check_logged_learning_rates(trainer: Trainer, changes: list[tuple[int, float]]) -> None:
    """Every lr the Trainer logged is its schedule's factor times the base in force. The
    Trainer logs at step s the lr of s's update, which its scheduler set at step s - 1."""
    factor = trainer.lr_scheduler.lr_lambdas[0]  # HF's warmup-then-linear-decay function
    logged = [(e["step"], e["learning_rate"]) for e in trainer.state.log_history
              if "learning_rate" in e]
    for (start, _), (end, _) in zip(changes, [*changes[1:], (MAX_STEPS, 0.0)], strict=True):
        assert sum(start < step <= end for step, _ in logged) >= 10, (start, end)
    for step, lr in logged:
        assert lr == pytest.approx(base_at(changes, step) * factor(step - 1), rel=1e-9), step
    groups = trainer.optimizer.param_groups  # HF's two: with weight decay and without
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    final = B2 * factor(trainer.state.global_step)
    assert [g["lr"] for g in groups] == pytest.approx([final, final], rel=1e-9)


def check_validations_and_layers(url: str, trainer: Trainer) -> None:
    """The Trainer's evaluations are in the rows of the steps they followed, accuracy
    as a percent; the attention layers have telemetry rows."""
    sql = SqlClient(url)
    rows = {step: (loss, acc) for step, loss, acc in sql.rows(
        "SELECT step, validate_loss, validate_accuracy FROM statistics "
        "WHERE validate_loss IS NOT NULL")}
    evaluations = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert len(evaluations) >= 3
    for e in evaluations:
        assert rows[e["step"]] == pytest.approx((e["eval_loss"], 100 * e["eval_accuracy"]))
    layers = {name for (name,) in sql.rows("SELECT DISTINCT layer_name FROM layer_statistics")}
    assert any("attention.self.query" in name for name in layers), sorted(layers)
    sql.close()


def test_sql_steers_lr_pause_and_stop(tmp_path: Path, db_url: str) -> None:
    trainer, callback = live_trainer(tmp_path, db_url)
    changes = train_while(trainer, callback, lambda: steer_lr_pause_stop(db_url, trainer))

    sql = SqlClient(db_url)
    assert status(sql, callback.run.run_id) == "stopped" == callback.run.status
    assert 125 <= trainer.state.global_step < MAX_STEPS
    sql.close()
    check_logged_learning_rates(trainer, changes)
    check_validations_and_layers(db_url, trainer)


# -- refusal: the Trainer's optimizer stays ---------------------------------------------


def steer_optimizer_switch(url: str, trainer: Trainer) -> tuple[str, int]:
    """Ask for SGD (refused), then, with the optimizer in force, for an lr, a weight
    decay and a dropout; the refusal's message and the change's applied step."""
    sql = SqlClient(url)
    run_id = run_of(sql)
    trained_to(trainer, 10)
    version = submit(sql, run_id, "optimizer = 'SGD'")
    message, refused_at = wait_for("the refusal", lambda: sql.one(
        "SELECT message, step FROM events WHERE run_id = :r AND version = :v "
        "AND code = 'parameters_rejected'", r=run_id, v=version))
    trained_to(trainer, refused_at + 10)  # still training
    step, lr, optimizer, *_ = acknowledged(sql, run_id, submit(
        sql, run_id, "optimizer = 'AdamW', learning_rate = 0.0005, weight_decay = 0.05, "
        "dropout = 30"))
    assert (lr, optimizer) == (5e-4, "AdamW") and step > refused_at
    trained_to(trainer, step + 5)
    submit(sql, run_id, "stop_train = TRUE")
    sql.close()
    return message, step


def test_an_optimizer_switch_is_refused_and_the_run_trains_on(
    tmp_path: Path, sqlite_url: str
) -> None:
    trainer, callback = live_trainer(tmp_path, sqlite_url)
    message, lr_step = train_while(trainer, callback,
                                   lambda: steer_optimizer_switch(sqlite_url, trainer))
    assert "Trainer" in message and "cannot be switched" in message
    assert type(trainer.optimizer.optimizer) is torch.optim.AdamW  # inside accelerate's
    assert callback.run.optimizer is trainer.optimizer.optimizer
    logged = {e["step"]: e["learning_rate"] for e in trainer.state.log_history
              if "learning_rate" in e}
    factor = trainer.lr_scheduler.lr_lambdas[0]
    assert logged[lr_step] == pytest.approx(B0 * factor(lr_step - 1), rel=1e-9)
    assert logged[lr_step + 1] == pytest.approx(5e-4 * factor(lr_step), rel=1e-9)
    # Weight decay: the no-decay group stays at none. Dropout: every layer, attention's
    # too (BERT's attention reads its Dropout's p).
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.05, 0.0]
    dropouts = [m.p for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) >= 5 and set(dropouts) == {0.3}
    assert callback.run.status == "stopped"


# -- rollback and clipping --------------------------------------------------------------


def model_matches(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(value.cpu(), weights[name]) for name, value
               in model.state_dict().items())


def steer_rollback_and_clip(url: str, trainer: Trainer) -> dict[str, int]:
    """Pause (so nothing moves while we look), roll back two checkpoints, compare the
    live weights with the checkpoint file, then resume with a new grad clip."""
    sql = SqlClient(url)
    run_id = run_of(sql)
    trained_to(trainer, 35)
    paused_at = acknowledged(sql, run_id, submit(sql, run_id, "pause_train = TRUE"))[0]
    target, path = sql.rows("SELECT step, path FROM checkpoints WHERE run_id = :r "
                            "AND reason = 'periodic' AND step <= :s ORDER BY step DESC",
                            r=run_id, s=paused_at - 10)[0]
    weights = torch.load(path, weights_only=True)["model"]
    assert not model_matches(trainer.model, weights)  # it trained since
    version = submit(sql, run_id, f"rollback_step = {target}, "
                     "rollback_request = rollback_request + 1")
    assert acknowledged(sql, run_id, version)[4] == target
    wait_for("the rolled_back event", lambda: sql.one(
        "SELECT 1 FROM events WHERE run_id = :r AND code = 'rolled_back' AND step = :s",
        r=run_id, s=target))
    assert trainer.state.global_step == paused_at  # still paused: nothing trained since
    assert model_matches(trainer.model, weights)
    adam_steps = {int(s["step"]) for s in trainer.optimizer.optimizer.state.values()}
    assert adam_steps == {target}  # AdamW's state is the checkpoint's too

    clip = acknowledged(sql, run_id, submit(sql, run_id, "pause_train = FALSE, grad_clip = 0.5"))
    assert clip[3] == 0.5
    trained_to(trainer, paused_at + 15)
    wait_for("rows logged after the rollback", lambda: sql.one(
        "SELECT 1 FROM statistics WHERE run_id = :r AND step > :s", r=run_id, s=target + 10))
    submit(sql, run_id, "stop_train = TRUE")
    sql.close()
    return {"paused_at": paused_at, "target": target}


def test_sql_rollback_restores_the_model_in_place_and_sets_the_clip(
    tmp_path: Path, sqlite_url: str
) -> None:
    trainer, callback = live_trainer(tmp_path, sqlite_url, checkpoint_every=10)
    assert trainer.args.max_grad_norm == 1.0
    steps = train_while(trainer, callback, lambda: steer_rollback_and_clip(sqlite_url, trainer))
    assert trainer.args.max_grad_norm == 0.5
    # The run's logged steps went on from the restored step; the Trainer's own counter
    # did not go back.
    behind = steps["paused_at"] - steps["target"]
    assert callback.run.global_step == trainer.state.global_step - behind
    assert callback.run.status == "stopped" and callback.run.rollbacks == 1


def steer_rollback_in_warmup(url: str, trainer: Trainer) -> None:
    """Pause in the warmup, roll back to step 10, and compare, still paused, the lr the
    next update will use with the one the Trainer's schedule says (and will log)."""
    sql = SqlClient(url)
    run_id = run_of(sql)
    trained_to(trainer, 15)
    paused_at = acknowledged(sql, run_id, submit(sql, run_id, "pause_train = TRUE"))[0]
    assert 10 < paused_at < 200  # in the warmup: each step's lr differs
    version = submit(sql, run_id, "rollback_step = 10, rollback_request = rollback_request + 1")
    assert acknowledged(sql, run_id, version)[4] == 10
    scheduled = trainer.lr_scheduler.get_last_lr()
    submit(sql, run_id, "stop_train = TRUE")
    sql.close()
    assert scheduled == pytest.approx([B0 * paused_at / 200] * 2, rel=1e-9)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx(scheduled, rel=1e-9)


def test_the_update_after_a_rollback_uses_the_schedules_lr(
    tmp_path: Path, sqlite_url: str
) -> None:
    trainer, callback = live_trainer(tmp_path, sqlite_url, warmup=200, checkpoint_every=10)
    train_while(trainer, callback, lambda: steer_rollback_in_warmup(sqlite_url, trainer))


class BreaksAfter(TokenRule):
    """Samples until the `limit`-th, then a bad one: an error in the middle of training."""

    def __init__(self, limit: int) -> None:
        super().__init__(512, 0)
        self.limit, self.served = limit, 0

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.served += 1
        if self.served > self.limit:
            raise RuntimeError("a bad sample")
        return super().__getitem__(index)


def test_an_exception_in_train_fails_the_run(tmp_path: Path, sqlite_url: str) -> None:
    """transformers calls no callback when train() raises: the run's loop watch sees the
    training call left without on_train_end and ends the run 'failed', with its threads,
    while the program that caught the exception goes on (a notebook)."""
    trainer, callback = live_trainer(tmp_path, sqlite_url)
    trainer.train_dataset = BreaksAfter(limit=16 * 15)  # in the 16th step's batch
    with pytest.raises(RuntimeError, match="a bad sample"):
        trainer.train()
    assert trainer.state.global_step >= 10
    run = callback.run
    assert run.watch is not None
    run.watch.thread.join(timeout=30)  # the watch ends the run, then its threads, then itself
    sql = SqlClient(sqlite_url)
    left = (run.status, status(sql, run.run_id))
    failed = sql.rows("SELECT message FROM events WHERE run_id = :r AND code = 'run_failed'",
                      r=run.run_id)
    sql.close()
    assert left == ("failed", "failed")
    assert len(failed) == 1 and "end-of-training hook" in failed[0][0]
    threads = {t.name for t in threading.enumerate()}
    assert not threads & {"db-listener", "livetrain-loop-watch"}, threads


def steer_one_change(url: str, trainer: Trainer) -> int:
    """Halve the lr after 10 steps, stop 10 steps later; the change's applied step."""
    sql = SqlClient(url)
    run_id = run_of(sql)
    trained_to(trainer, 10)
    step = acknowledged(sql, run_id, submit(sql, run_id, f"learning_rate = {B0 / 2}"))[0]
    trained_to(trainer, step + 10)
    submit(sql, run_id, "stop_train = TRUE")
    sql.close()
    return step


def test_each_row_shows_the_lr_its_step_used(tmp_path: Path, sqlite_url: str) -> None:
    """With a constant schedule and a row at every step, the row of step s shows the lr
    the Trainer logged for s (the lr its update used); a plain LiveRun loop logs so."""
    trainer, callback = live_trainer(tmp_path, sqlite_url, warmup=0, schedule="constant",
                                     log_every=1)
    applied = train_while(trainer, callback, lambda: steer_one_change(sqlite_url, trainer))
    used = {e["step"]: e["learning_rate"] for e in trainer.state.log_history
            if "learning_rate" in e}
    sql = SqlClient(sqlite_url)
    rows = dict(sql.rows("SELECT step, learning_rate FROM statistics WHERE step > 0"))
    sql.close()
    assert (used[applied], used[applied + 1]) == (B0, B0 / 2)
    assert {step: rows[step] for step in used} == used


def test_each_row_shows_the_lr_the_schedule_gave_its_step(tmp_path: Path, sqlite_url: str) -> None:
    """With the linear schedule (warmup, then decay) the optimizer already holds the next
    step's lr when the step's callback runs; the row shows the one its update used."""
    trainer, callback = live_trainer(tmp_path, sqlite_url, warmup=5, log_every=1)
    train_while(trainer, callback, lambda: steer_one_change(sqlite_url, trainer))
    used = {e["step"]: e["learning_rate"] for e in trainer.state.log_history
            if "learning_rate" in e}
    sql = SqlClient(sqlite_url)
    rows = dict(sql.rows("SELECT step, learning_rate FROM statistics WHERE step > 0"))
    sql.close()
    assert len(set(used.values())) > 10  # the schedule moved the lr at every step
    assert {step: rows[step] for step in used} == pytest.approx(used, rel=1e-9)


# -- a pause at an evaluation step ------------------------------------------------------


class PauseAt(TrainerCallback):
    """Plays the user who presses Pause just as step `step` ends: the pause is in the
    run's listener before the LiveTrainingCallback (listed after this one) takes the
    step's boundary, so the run pauses at exactly that step."""

    def __init__(self, url: str, live: LiveTrainingCallback, step: int) -> None:
        self.url, self.live, self.step = url, live, step

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any,
                    **kwargs: Any) -> None:
        if state.global_step != self.step:
            return
        sql = SqlClient(self.url)
        submit(sql, self.live.run.run_id, "pause_train = TRUE")
        sql.close()
        wait_for("the pause, in the listener", self.live.run.listener.changed.is_set)


def steer_resume_and_stop(url: str, trainer: Trainer) -> tuple[tuple, int]:
    """While paused: the paused step's row as the board sees it, and the step held."""
    sql = SqlClient(url)
    run_id = run_of(sql)
    wait_for("the pause", lambda: status(sql, run_id) == "paused", timeout=120)
    seen = sql.one("SELECT step, validate_loss FROM statistics WHERE run_id = :r "
                   "ORDER BY step DESC LIMIT 1", r=run_id)
    held = trainer.state.global_step
    submit(sql, run_id, "pause_train = FALSE")
    trained_to(trainer, held + 5)
    submit(sql, run_id, "stop_train = TRUE")
    sql.close()
    return seen, held


def test_a_pause_at_an_evaluation_step_keeps_the_evaluation_in_its_row(
    tmp_path: Path, db_url: str
) -> None:
    """Step 40 logs and evaluates: a pause taken there holds after the evaluation, whose
    figures are in step 40's row while the board waits (not moved to a later row)."""
    trainer, callback = live_trainer(tmp_path, db_url)
    trainer.callback_handler.callbacks.insert(  # ahead of the LiveTrainingCallback
        trainer.callback_handler.callbacks.index(callback), PauseAt(db_url, callback, 40))
    (step, loss), held = train_while(trainer, callback,
                                     lambda: steer_resume_and_stop(db_url, trainer))
    evaluated = [e for e in trainer.state.log_history if e.get("step") == 40
                 and "eval_loss" in e]
    assert held == 40 and step == 40
    assert len(evaluated) == 1 and loss == pytest.approx(evaluated[0]["eval_loss"])


# -- a blow-up: the check before the update reads the Trainer's own gradient norm -------


class NanAtStep(Trainer):
    """A Trainer whose 8th update's loss is multiplied by NaN after the model's forward
    (a corrupt batch would do it): the gradients of that update are NaN."""

    def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step == 7 else loss


def steer_stop_when_paused(url: str, trainer: Trainer) -> tuple[bool, tuple]:
    """Wait for the pause, note whether the weights are finite and the event, stop."""
    sql = SqlClient(url)
    run_id = run_of(sql)
    wait_for("the pause", lambda: status(sql, run_id) == "paused", timeout=120)
    finite = all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    event = sql.one("SELECT step, message FROM events WHERE run_id = :r "
                    "AND code = 'non_finite'", r=run_id)
    submit(sql, run_id, "stop_train = TRUE")
    sql.close()
    return finite, event


def test_a_nan_gradient_is_dropped_before_the_update_and_pauses(
    tmp_path: Path, sqlite_url: str
) -> None:
    """The check before each update uses the norm the Trainer computed (the norms it
    read are the Trainer's logged `grad_norm`s); step 8's is NaN: that update is
    dropped, the weights stay finite, and the run pauses with the reason (the exact
    guard: at that step; the default refuses on the device, tests/test_step_sync.py)."""
    trainer, callback = live_trainer(tmp_path, sqlite_url, log_every=5, nan_guard="exact")
    trainer.__class__ = NanAtStep
    read: list[float | None] = []
    original = TransformersRun.known_gradient_norm

    def recording(run: TransformersRun) -> torch.Tensor | float | None:
        norm = original(run)
        read.append(None if norm is None else float(norm))
        return norm

    TransformersRun.known_gradient_norm = recording  # type: ignore[method-assign]
    try:
        finite, (step, message) = train_while(
            trainer, callback, lambda: steer_stop_when_paused(sqlite_url, trainer))
    finally:
        TransformersRun.known_gradient_norm = original  # type: ignore[method-assign]
    logged = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    assert finite and step == 7
    assert "gradients are not finite at step 8" in message
    assert read[:7] == pytest.approx(logged[:7], rel=1e-6) and math.isnan(read[7])
