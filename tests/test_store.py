"""The database contract on both back ends: runs, parameters, history, triggers, constraints."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert, text
from sqlalchemy.exc import IntegrityError

from livetrain.db import schema as s
from livetrain.db.contract import Hyperparameters
from livetrain.db.listener import ParameterListener
from livetrain.db.store import Batch, Store, now, resolve_url
from livetrain.db.writer import BackgroundWriter

START = Hyperparameters("Adam", 3e-4, 0.0, 50)


def new_run(store: Store) -> int:
    return store.create_run("run", "smallcnn", "mnist5k", {"lr": 3e-4, "nested": [1, 2]}, START)


def raw_update(store: Store, sql: str, **params: object) -> None:
    """A third-party client: plain SQL, its own transaction."""
    with store.engine.begin() as conn:
        conn.execute(text(sql), params)


def test_plain_postgresql_urls_use_psycopg3(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql+psycopg://")
    plain = "postgresql://" + postgres_url.split("://", 1)[1]
    assert resolve_url(plain).startswith("postgresql+psycopg://")
    assert resolve_url("postgres://u:p@h/d") == "postgresql+psycopg://u:p@h/d"
    store = Store(plain)
    assert store.engine.dialect.driver == "psycopg"
    store.close()


def test_default_url_is_sqlite_in_working_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert resolve_url(None) == "sqlite:///training.db"
    monkeypatch.setenv("DATABASE_URL", "sqlite:///elsewhere.db")
    assert resolve_url(None) == "sqlite:///elsewhere.db"
    assert resolve_url("sqlite:///cli.db") == "sqlite:///cli.db"


def test_create_run_writes_run_parameters_and_first_history_row(store: Store) -> None:
    run_id = new_run(store)
    run = store.get_run(run_id)
    assert run["status"] == "running" and run["config"]["nested"] == [1, 2]
    assert run["dt_started"].tzinfo is not None
    p = store.get_parameters(run_id)
    assert (p.optimizer, p.learning_rate, p.weight_decay, p.dropout) == ("Adam", 3e-4, 0.0, 50)
    assert (p.version, p.applied_version, p.applied_step, p.stop_train) == (1, 1, 0, False)
    history = store.parameter_changes(run_id)
    assert [(h["version"], h["applied_step"]) for h in history] == [(1, 0)]
    assert [r["run_id"] for r in store.list_runs()] == [run_id]


def test_submit_changes_only_given_fields_and_bumps_version(store: Store) -> None:
    run_id = new_run(store)
    before = store.get_parameters(run_id)
    assert store.submit_parameters(run_id, learning_rate=1e-3) == 2
    after = store.get_parameters(run_id)
    assert after.learning_rate == 1e-3 and after.optimizer == "Adam" and after.dropout == 50
    assert after.dt_updated > before.dt_updated
    assert store.submit_parameters(run_id, optimizer="SGD+Nesterov", dropout=20) == 3
    assert store.request_stop(run_id) == 4
    assert store.get_parameters(run_id).stop_train is True


@pytest.mark.parametrize(
    "fields",
    [
        {"learning_rate": 0.0},
        {"learning_rate": -0.1},
        {"learning_rate": 2.0},
        {"learning_rate": float("nan")},
        {"learning_rate": float("inf")},
        {"weight_decay": -1e-9},
        {"dropout": 91},
        {"optimizer": "Adagrad"},
    ],
)
def test_submit_refuses_invalid_values_and_writes_nothing(store: Store, fields: dict) -> None:
    run_id = new_run(store)
    with pytest.raises(ValueError):
        store.submit_parameters(run_id, **fields)
    assert store.get_parameters(run_id).version == 1


@pytest.mark.parametrize(
    "assignment",
    [
        "learning_rate = 0",
        "learning_rate = 1.5",
        "learning_rate = NULL",
        "weight_decay = -0.5",
        "weight_decay = 2",
        "dropout = 95",
        "dropout = -1",
        "optimizer = 'Adagrad'",
        "optimizer = NULL",
        "stop_train = NULL",
    ],
)
def test_schema_constraints_reject_bad_rows_from_any_client(store: Store, assignment: str):
    run_id = new_run(store)
    with pytest.raises(IntegrityError):
        raw_update(store, f"UPDATE parameters SET {assignment} WHERE run_id = :r", r=run_id)
    assert store.get_parameters(run_id).version == 1


def test_nan_learning_rate_is_rejected_by_the_database(store: Store) -> None:
    run_id = new_run(store)
    with pytest.raises(IntegrityError):
        raw_update(
            store, "UPDATE parameters SET learning_rate = :lr WHERE run_id = :r",
            lr=float("nan"), r=run_id,
        )


def test_trigger_versions_a_change_whose_writer_forgot(store: Store) -> None:
    run_id = new_run(store)
    before = store.get_parameters(run_id)
    time.sleep(0.01)
    raw_update(store, "UPDATE parameters SET dropout = 30 WHERE run_id = :r", r=run_id)
    after = store.get_parameters(run_id)
    assert after.version == 2 and after.dropout == 30
    assert after.dt_updated > before.dt_updated
    # A writer that follows the contract is not bumped twice.
    raw_update(
        store, "UPDATE parameters SET dropout = 40, version = version + 1 WHERE run_id = :r",
        r=run_id,
    )
    assert store.get_parameters(run_id).version == 3
    # The trainer's own write-back (applied_*) is not a new version.
    raw_update(store, "UPDATE parameters SET applied_version = 3 WHERE run_id = :r", r=run_id)
    assert store.get_parameters(run_id).version == 3


def test_concurrent_submits_each_get_their_own_version(store: Store) -> None:
    run_id = new_run(store)
    per_thread, threads = 15, 4
    errors: list[Exception] = []

    def submit(i: int) -> None:
        try:
            for j in range(per_thread):
                store.submit_parameters(run_id, learning_rate=(i * per_thread + j + 1) * 1e-5)
        except Exception as exc:
            errors.append(exc)

    workers = [threading.Thread(target=submit, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    assert store.get_parameters(run_id).version == 1 + per_thread * threads


def test_write_batch_and_acknowledgement(store: Store) -> None:
    run_id = new_run(store)
    store.submit_parameters(run_id, learning_rate=1e-3)
    p = store.get_parameters(run_id)
    applied = now()
    stat = {
        "step": 10, "epoch": 1, "dt": applied, "optimizer": "Adam", "learning_rate": 1e-3,
        "weight_decay": 0.0, "dropout": 50, "train_loss": float("nan"), "train_accuracy": 10.0,
        "validate_loss": 2.3, "validate_accuracy": 11.0,
    }
    hist = {
        "step": 10, "layer_name": "features.0", "nn_part": "features", "layer_type": "conv",
        "number": 0, "bin_edges": [0.0, 0.5, 1.0], "counts": [3, 4], "mean": 0.4, "std": 0.2,
    }
    ack = {
        "version": 2, "optimizer": "Adam", "learning_rate": 1e-3, "weight_decay": 0.0,
        "dropout": 50, "stop_train": False, "dt_updated": p.dt_updated, "applied_step": 7,
        "dt_applied": applied,
    }
    store.write_batch(
        run_id,
        Batch(statistics=[stat], activations=[hist], acknowledgements=[ack], heartbeat=applied,
              events=[{"level": "info", "code": "x", "message": "'; DROP TABLE runs; --",
                       "step": 10, "dt": applied, "version": 2}]),
    )
    p = store.get_parameters(run_id)
    assert (p.applied_version, p.applied_step) == (2, 7)
    assert abs(p.dt_applied - applied) < timedelta(milliseconds=1)
    assert [h["version"] for h in store.parameter_changes(run_id)] == [2, 1]
    rows = store.statistics(run_id)
    assert rows[0]["step"] == 10 and rows[0]["validate_loss"] == 2.3
    assert store.statistics(run_id, after_step=10) == []
    [a] = store.latest_activations(run_id)
    assert a["bin_edges"] == [0.0, 0.5, 1.0] and a["counts"] == [3, 4]
    assert store.events(run_id)[0]["message"] == "'; DROP TABLE runs; --"
    assert store.get_run(run_id)["dt_heartbeat"] == applied
    # parameter_changes never holds a version twice: a version adopted again (as a resumed
    # trainer does) is recorded once, and the database refuses a second row of its own
    store.write_batch(run_id, Batch(acknowledgements=[ack]))
    assert [h["version"] for h in store.parameter_changes(run_id)] == [2, 1]
    with pytest.raises(IntegrityError), store.engine.begin() as conn:
        conn.execute(insert(s.parameter_changes).values(run_id=run_id, **ack))


def test_timestamps_are_utc_and_round_trip(store: Store) -> None:
    run_id = new_run(store)
    moment = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    store.write_batch(run_id, Batch(heartbeat=moment))
    assert store.get_run(run_id)["dt_heartbeat"] == moment


def test_listener_hands_over_changes_from_any_client(store: Store) -> None:
    run_id = new_run(store)
    # A long safety poll: only the change signal (NOTIFY on PostgreSQL, the commit
    # counter on SQLite) can deliver within the deadline.
    listener = ParameterListener(store, run_id, seen_version=1, poll_seconds=30)
    try:
        assert listener.connected.wait(10)
        assert listener.take() is None
        started = time.monotonic()
        raw_update(
            store,
            "UPDATE parameters SET learning_rate = 0.002, version = version + 1 WHERE run_id = :r",
            r=run_id,
        )
        assert listener.changed.wait(5)
        latency = time.monotonic() - started
        state = listener.take()
        assert state.version == 2 and state.learning_rate == 0.002
        assert latency < 2.0
        assert listener.take() is None and not listener.changed.is_set()
        # Two quick changes: the loop gets the newest, once.
        store.submit_parameters(run_id, dropout=10)
        store.submit_parameters(run_id, dropout=20)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if listener.changed.wait(0.1) and (s := listener.take()) and s.version == 4:
                break
        assert s.version == 4 and s.dropout == 20
    finally:
        listener.close()


def test_background_writer_writes_everything_and_heartbeats(store: Store) -> None:
    run_id = new_run(store)
    writer = BackgroundWriter(store, run_id, heartbeat_seconds=0.2)
    started = store.get_run(run_id)["dt_heartbeat"]
    for step in range(1, 501):
        writer.statistics({
            "step": step, "epoch": 1, "dt": now(), "optimizer": "Adam", "learning_rate": 3e-4,
            "weight_decay": 0.0, "dropout": 50, "train_loss": 1.0 / step,
        })
    time.sleep(0.5)
    writer.event("info", "done", "done", step=500)
    writer.status("finished", ended=True)
    assert writer.close()
    assert len(store.statistics(run_id)) == 500
    run = store.get_run(run_id)
    assert run["status"] == "finished" and run["dt_ended"] is not None
    assert run["dt_heartbeat"] > started
    assert store.events(run_id)[0]["code"] == "done"


def test_the_writer_holds_plain_rows_but_not_what_the_board_waits_for(store: Store) -> None:
    """Rows wait up to rows_seconds, so that a run logging every few ms pays one
    transaction per while, not one per log; a status (like an acknowledgement) goes
    out at once, with the rows held so far; close() writes what is held, now."""
    run_id = new_run(store)
    writer = BackgroundWriter(store, run_id, heartbeat_seconds=600, rows_seconds=600)
    row = {"epoch": 1, "optimizer": "Adam", "learning_rate": 3e-4, "weight_decay": 0.0,
           "dropout": 50, "train_loss": 1.0}

    def written() -> list[int]:
        return [r["step"] for r in store.statistics(run_id)]

    writer.statistics({"step": 1, "dt": now(), **row})  # goes with the first heartbeat
    deadline = time.monotonic() + 5
    while not written() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert written() == [1]
    for step in (2, 3):
        writer.statistics({"step": step, "dt": now(), **row})
    time.sleep(1.0)
    assert written() == [1]  # held
    writer.status("paused")
    deadline = time.monotonic() + 5
    while store.get_run(run_id)["status"] != "paused" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.get_run(run_id)["status"] == "paused"
    assert written() == [1, 2, 3]
    writer.statistics({"step": 4, "dt": now(), **row})
    started = time.monotonic()
    assert writer.close()
    assert time.monotonic() - started < 5
    assert written() == [1, 2, 3, 4]


def test_a_row_the_database_refuses_does_not_block_the_others(store: Store) -> None:
    run_id = new_run(store)
    writer = BackgroundWriter(store, run_id)
    row = {"epoch": 1, "optimizer": "Adam", "learning_rate": 3e-4, "weight_decay": 0.0,
           "dropout": 50, "train_loss": 1.0}
    for step in (1, 2, 2, 3):  # step 2 twice: the second violates the primary key
        writer.statistics({"step": step, "dt": now(), **row})
    writer.event("info", "after", "still written")
    assert writer.close()
    assert [r["step"] for r in store.statistics(run_id)] == [1, 2, 3]
    assert store.events(run_id)[0]["code"] == "after"
    assert writer.rows_dropped == 1


def test_rollback_moves_the_abandoned_branch_aside_in_queue_order(store: Store) -> None:
    run_id = new_run(store)
    writer = BackgroundWriter(store, run_id)

    def log(step: int, loss: float) -> None:
        writer.statistics({"step": step, "epoch": 1, "dt": now(), "optimizer": "Adam",
                           "learning_rate": 3e-4, "weight_decay": 0.0, "dropout": 50,
                           "train_loss": loss})
        writer.rows("layer_statistics", [{"step": step, "layer_name": "fc",
                                          "has_nonlinearity": False, "grad_norm": loss}])

    for step in range(1, 11):
        log(step, 1.0)
    writer.rollback(5)  # queued right behind steps 6..10: they must land first, then move
    for step in range(6, 9):
        log(step, 2.0)
    writer.rollback(7)
    log(8, 3.0)
    assert writer.close()

    live = store.statistics(run_id)
    assert [(r["step"], r["train_loss"]) for r in live] == [
        *((s, 1.0) for s in range(1, 6)), (6, 2.0), (7, 2.0), (8, 3.0)
    ]
    with store.engine.connect() as conn:
        abandoned = conn.execute(text(
            "SELECT branch, rolled_back_to, step, train_loss FROM abandoned_statistics "
            "WHERE run_id = :r ORDER BY branch, step"), {"r": run_id}).all()
        layers = conn.execute(text(
            "SELECT step, grad_norm FROM layer_statistics WHERE run_id = :r ORDER BY step"),
            {"r": run_id}).all()
    assert [tuple(r) for r in abandoned] == [
        *((1, 5, s, 1.0) for s in range(6, 11)), (2, 7, 8, 2.0)
    ]
    assert [tuple(r) for r in layers][-3:] == [(6, 2.0), (7, 2.0), (8, 3.0)]


def test_pause_grad_clip_and_rollback_requests(store: Store) -> None:
    run_id = new_run(store)
    store.submit_parameters(run_id, pause_train=True, grad_clip=1.5)
    p = store.get_parameters(run_id)
    assert (p.pause_train, p.grad_clip, p.rollback_request, p.version) == (True, 1.5, 0, 2)
    store.submit_parameters(run_id, rollback_step=100)
    store.submit_parameters(run_id, rollback_step=100)  # the same step twice: two requests
    p = store.get_parameters(run_id)
    assert (p.rollback_step, p.rollback_request, p.version) == (100, 2, 4)
    with pytest.raises(ValueError):
        store.submit_parameters(run_id, grad_clip=-1)
    raw_update(store, "UPDATE parameters SET pause_train = FALSE WHERE run_id = :r", r=run_id)
    assert store.get_parameters(run_id).version == 5  # versioned by the trigger


def test_events_with_and_without_details_land_in_one_batch(store: Store) -> None:
    run_id = new_run(store)
    writer = BackgroundWriter(store, run_id)
    writer.event("info", "plain", "no details", step=1)
    writer.event("warning", "dead_relu", "layer fc: 80 % dead", step=1, layer_name="fc",
                 recommendation="lower the lr", fix={"learning_rate": 3e-5})
    writer.event("info", "plain", "again", step=2)
    assert writer.close()
    assert writer.rows_dropped == 0
    rows = store.events(run_id)
    assert [r["code"] for r in rows] == ["plain", "dead_relu", "plain"]
    assert rows[1]["fix"] == {"learning_rate": 3e-5} and rows[0]["layer_name"] is None
