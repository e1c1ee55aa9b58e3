"""LiveRun under faults a user's loop meets: Ctrl-C, a non-finite loss, a rollback."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest
import torch
from test_livetrain_api import (
    SqlClient,
    batch,
    max_step,
    output,
    started,
    two_layer_model,
    user_run,
    wait_for,
)
from torch import nn

from livetrain import LiveRun
from livetrain.db.store import Store


def test_ctrl_c_stops_a_user_loop_gracefully(tmp_path: Path, sqlite_url: str) -> None:
    with user_run(tmp_path, sqlite_url, "--epochs", "1000", "--sleep", "0.02") as proc:
        sql, run_id = started(sqlite_url)
        wait_for("a few logs", lambda: max_step(sql, run_id) >= 10)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    assert "status=stopped" in output(tmp_path)
    assert sql.one("SELECT status FROM runs WHERE run_id = :r", r=run_id) == ("stopped",)
    final = sql.one("SELECT count(*) FROM checkpoints WHERE run_id = :r AND reason = 'final'",
                    r=run_id)
    assert final == (1,)
    sql.close()


def poisoned(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(seed)
    return x * float("nan"), y


@pytest.mark.parametrize("guard", ["exact", "auto"])
def test_a_non_finite_loss_pauses_before_the_update_and_the_fix_resumes(
    tmp_path: Path, db_url: str, guard: str
) -> None:
    """The NaN batch's update is refused (the weights stay finite), the run pauses in
    run.step() with the heartbeat alive, and the board's fix (a lower lr, unpaused)
    lets the same loop go on. The exact guard pauses at the NaN step itself (7, not
    counted); the default guard (SGD runs fused, the flag stays on the device) refuses
    that update and the next ones on the device and pauses at the next log (10)."""
    model = two_layer_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    store = Store(db_url)
    fixed = threading.Event()
    paused_after = 6 if guard == "exact" else 9  # the seed whose run.step() blocks

    def board() -> None:  # what a user does from the board once the alert shows
        wait_for("the alert", lambda: [e for e in store.events(run.run_id)
                                       if e["code"] == "non_finite"], timeout=30)
        store.submit_parameters(run.run_id, learning_rate=0.01, pause_train=False)
        fixed.set()

    with LiveRun(model, optimizer, db=db_url, log_every=5, checkpoint_dir=tmp_path / "ck",
                 handle_signals=False, nan_guard=guard) as run:
        helper = threading.Thread(target=board, daemon=True)
        helper.start()
        for seed in range(12):
            x, y = poisoned(seed) if seed == 6 else batch(seed)
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            run.optimizer.zero_grad()
            loss.backward()
            if seed == 6:
                before = [p.detach().clone() for p in model.parameters()]
            run.optimizer.step()
            run.step(loss=loss, outputs=out, targets=y)
            if seed == paused_after:
                assert fixed.is_set()  # step() blocked until the board answered
                assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before,
                                                             strict=True))
    events = {e["code"]: e for e in store.events(run.run_id)}
    if guard == "exact":
        assert run.status == "finished" and run.global_step == 11  # the NaN step is not counted
        assert events["non_finite"]["step"] == 6
        assert "paused before the update" in events["non_finite"]["message"]
    else:
        assert run.status == "finished" and run.global_step == 12
        assert events["non_finite"]["step"] == 10
        assert "between steps 6 and 10" in events["non_finite"]["message"]
        assert "refused on the device" in events["non_finite"]["message"]
    assert run.optimizer.param_groups[0]["lr"] == 0.01
    store.close()


def test_a_rollback_restores_weights_and_step_in_place(tmp_path: Path, db_url: str) -> None:
    model = two_layer_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    store = Store(db_url)
    with LiveRun(model, optimizer, db=db_url, log_every=5, checkpoint_every=10,
                 checkpoint_dir=tmp_path / "ck", handle_signals=False) as run:
        weights_at_10 = None
        for seed in range(30):
            x, y = batch(seed)
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            run.optimizer.zero_grad()
            loss.backward()
            run.optimizer.step()
            run.step(loss=loss, outputs=out, targets=y)
            if run.global_step == 10 and weights_at_10 is None:
                weights_at_10 = [p.detach().clone() for p in model.parameters()]
            if seed == 19:
                store.submit_parameters(run.run_id, rollback_step=10)
                wait_for("the listener", lambda: run.listener.changed.is_set(), timeout=30)
            if run.rollbacks:
                break
    assert run.global_step == 10 and run.rollbacks == 1
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights_at_10,
                                                 strict=True))
    sql = SqlClient(db_url)
    assert sql.one("SELECT count(*) FROM events WHERE code = 'rolled_back'") == (1,)
    sql.close()
    store.close()
