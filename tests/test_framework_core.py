"""What the framework callbacks (issue 14) need from the core, checked without them:

- the core package imports neither Lightning nor transformers;
- a validation reported with `run.record_validation` lands in the next logged row;
- a step whose loss is unknown is counted and logged, and raises no non-finite alarm;
- a layer the recorded forward pass did not run raises no non-finite alarm either;
- a rollback loads the optimizer state in place: the user's optimizer object stays;
- a weight decay set on a run that had none leaves a bias-and-norm group at zero.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, text
from torch import nn

from livetrain import LiveRun
from livetrain.db.store import Store
from livetrain.trainer.steering import set_weight_decay


def test_the_core_imports_neither_framework() -> None:
    code = ("import sys, livetrain, livetrain.trainer.run, livetrain.trainer.framework, "
            "livetrain.db.store, livetrain.board.app\n"
            "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers', "
            "'accelerate') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train(run: LiveRun, model: nn.Module, steps: int, with_loss: bool = True) -> None:
    for _ in range(steps):
        x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
        loss = nn.functional.cross_entropy(model(x), y)
        run.optimizer.zero_grad()
        loss.backward()
        run.optimizer.step()
        run.step(loss if with_loss else None)


def statistics(url: str, run_id: int) -> dict[int, dict]:
    store = Store(url)
    try:
        return {row["step"]: row for row in store.statistics(run_id)}
    finally:
        store.close()


def layer_rows(url: str, run_id: int) -> list[dict]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text(
                "SELECT step, layer_name, act_mean FROM layer_statistics WHERE run_id = :r"),
                {"r": run_id})]
    finally:
        engine.dispose()


def events(url: str, run_id: int) -> list[dict]:
    store = Store(url)
    try:
        return store.events(run_id)
    finally:
        store.close()


def test_a_reported_validation_lands_in_the_next_row(tmp_path: Path, sqlite_url: str) -> None:
    model, optimizer = model_and_optimizer()
    with LiveRun(model, optimizer, db=sqlite_url, log_every=5, checkpoint_dir=tmp_path,
                 handle_signals=False) as run:
        train(run, model, 3)
        run.record_validation(0.75, accuracy=60.0, loss_std=0.1, batches=4)
        train(run, model, 2)
    rows = statistics(sqlite_url, run.run_id)
    assert rows[5]["validate_loss"] == 0.75
    assert rows[5]["validate_accuracy"] == 60.0
    assert rows[5]["validate_loss_count"] == 4


def test_steps_without_a_loss_are_counted_without_an_alarm(
    tmp_path: Path, sqlite_url: str
) -> None:
    model, optimizer = model_and_optimizer()
    with LiveRun(model, optimizer, db=sqlite_url, log_every=5, checkpoint_dir=tmp_path,
                 handle_signals=False) as run:
        train(run, model, 10, with_loss=False)
    assert run.global_step == 10
    rows = statistics(sqlite_url, run.run_id)
    assert rows[10]["train_loss"] is None
    assert run.status == "finished"
    assert "non_finite" not in {e["code"] for e in events(sqlite_url, run.run_id)}


class Branchy(nn.Module):
    """A model whose second head runs only when asked: the logged forward skips it."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.spare = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, spare: bool = False) -> torch.Tensor:
        return self.spare(x) if spare else self.body(x)


def test_a_layer_that_did_not_run_is_not_called_non_finite(
    tmp_path: Path, sqlite_url: str
) -> None:
    torch.manual_seed(0)
    model = Branchy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with LiveRun(model, optimizer, db=sqlite_url, log_every=5, checkpoint_dir=tmp_path,
                 handle_signals=False) as run:
        train(run, model, 10)
    codes = {e["code"] for e in events(sqlite_url, run.run_id)}
    assert "non_finite" not in codes
    assert run.status == "finished"  # never paused by a false alarm


def test_a_rollback_keeps_the_users_optimizer_object(tmp_path: Path, sqlite_url: str) -> None:
    model, optimizer = model_and_optimizer()
    with LiveRun(model, optimizer, db=sqlite_url, log_every=5, checkpoint_dir=tmp_path,
                 checkpoint_every=5, handle_signals=False) as run:
        train(run, model, 5)
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        moments = optimizer.state[next(iter(model.parameters()))]["exp_avg"].clone()
        train(run, model, 5)
        found = run.ring.newest_at_or_before(5)
        run.ring.flush()
        run.control.roll_back(found.step)
        assert run.optimizer is optimizer
        assert run.global_step == 5
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, saved[name]), name
        restored = optimizer.state[next(iter(model.parameters()))]["exp_avg"]
        assert torch.equal(restored, moments)
        train(run, model, 2)  # the hooks still see the optimizer's steps
    assert run.global_step == 7


def test_weight_decay_leaves_the_no_decay_group_at_zero() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=1e-3)
    set_weight_decay(optimizer, 0.0, 0.01)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    set_weight_decay(optimizer, 0.01, 0.02)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.02, 0.0]


def test_a_run_that_watches_no_layer_logs_its_losses(tmp_path: Path, sqlite_url: str) -> None:
    model, optimizer = model_and_optimizer()
    with LiveRun(model, optimizer, db=sqlite_url, log_every=5, checkpoint_dir=tmp_path,
                 layers=[], handle_signals=False) as run:
        train(run, model, 10)
    assert run.status == "finished"
    assert statistics(sqlite_url, run.run_id)[10]["train_loss"] is not None


def test_the_probe_hooks_the_model_only_while_it_records(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A forward hook, even an idle one, slows every call of its module: between the
    passes it records, the probe leaves the layers without hooks."""
    model, optimizer = model_and_optimizer()
    layers = [model[0], model[1], model[2]]
    with LiveRun(model, optimizer, db=sqlite_url, log_every=5, checkpoint_dir=tmp_path,
                 handle_signals=False) as run:
        train(run, model, 7)  # logged at 5; the pass of step 10 is not armed yet
        assert all(not layer._forward_hooks for layer in layers)
        train(run, model, 2)  # step 10's pass is armed at step 9's boundary
        assert all(layer._forward_hooks for layer in (model[0], model[1]))
        train(run, model, 1)
        assert all(not layer._forward_hooks for layer in layers)
    rows = {(r["step"], r["layer_name"]): r for r in layer_rows(sqlite_url, run.run_id)}
    assert rows[(10, "0")]["act_mean"] is not None  # recorded through the hooks
    assert rows[(10, "2")]["act_mean"] is not None


def test_after_a_rollback_the_groups_follow_the_schedule(tmp_path: Path, sqlite_url: str) -> None:
    """The schedule goes on from where it is (a framework's step counter does not roll
    back): the update after a rollback runs at the schedule's lr, not the checkpoint's."""
    model, optimizer = model_and_optimizer()
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.1)
    with LiveRun(model, optimizer, db=sqlite_url, log_every=5, checkpoint_dir=tmp_path,
                 checkpoint_every=5, scheduler=schedule, handle_signals=False) as run:
        for _ in range(8):
            train(run, model, 1)
            schedule.step()
        assert schedule.get_last_lr() == [pytest.approx(1e-4)]  # 1e-2 x 0.1 x 0.1
        run.ring.flush()
        run.control.roll_back(5)
        assert run.global_step == 5
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)


class LockedOptimizerRun(LiveRun):
    """A run whose framework, from some point on, cannot take another optimizer object
    (as transformers' Trainer, or a Lightning strategy that owns its optimizer)."""

    locked = False

    def switch_refusal(self) -> str | None:
        return "the framework holds its optimizer" if self.locked else None


def test_a_rollback_across_a_switch_the_framework_refuses_is_rejected(
    tmp_path: Path, sqlite_url: str
) -> None:
    model, optimizer = model_and_optimizer()
    with LockedOptimizerRun(model, optimizer, db=sqlite_url, log_every=5,
                            checkpoint_dir=tmp_path, checkpoint_every=5,
                            handle_signals=False) as run:
        train(run, model, 5)  # the Adam checkpoint of step 5
        switched = dataclasses.replace(run.parameters, optimizer="SGD")
        run.apply_parameters(run.parameters, switched)  # as the Controller does
        run.control.params = switched
        train(run, model, 3)
        run.locked = True
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        assert run.control.roll_back(5) is None
        assert run.global_step == 8  # nothing restored: training goes on from here
        assert isinstance(run.optimizer, torch.optim.SGD)
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
        train(run, model, 2)
    rejected = [e for e in events(sqlite_url, run.run_id) if e["code"] == "parameters_rejected"]
    assert len(rejected) == 1
    assert "no rollback to step 5" in rejected[0]["message"]
    assert "the framework holds its optimizer" in rejected[0]["message"]
