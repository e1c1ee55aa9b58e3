"""Past its memory bound the writer spills unwritten rows to a file, and writes them later.

The outage is real: another connection holds SQLite's write lock, so every write
the writer tries fails after the busy timeout, as it would for a trainer whose
database is busy. (The PostgreSQL outage test, test_outage.py, runs the same path
with train.py and the real server stopped.)
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from test_train_e2e import wait_for

from livetrain.db import store as store_module
from livetrain.db.contract import DEFAULTS, Hyperparameters
from livetrain.db.store import Store, now
from livetrain.db.writer import BackgroundWriter


@pytest.fixture(autouse=True)
def short_busy_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each failed write waits out SQLite's busy timeout (10 s) before it fails; 1 s here
    fails the same way, sooner (a write that waits for the lock is still one that fails:
    the lock is held until the test lets it go)."""
    monkeypatch.setattr(store_module, "SQLITE_BUSY_SECONDS", 1.0)


def statistics_row(step: int) -> dict:
    return {"step": step, "epoch": 1, "dt": now(), "optimizer": "Adam", "learning_rate": 3e-4,
            "weight_decay": 0.0, "dropout": 50, "train_loss": 1.0 / step}


def locked(url: str) -> sqlite3.Connection:
    locker = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    return locker


def test_rows_beyond_the_bound_go_to_disk_and_all_land(sqlite_url: str, tmp_path: Path) -> None:
    store = Store(sqlite_url)
    run_id = store.create_run("spill", "smallcnn", "mnist5k", {}, Hyperparameters(**DEFAULTS))
    spill = tmp_path / "unwritten"
    writer = BackgroundWriter(store, run_id, spill_dir=spill, spill_after_rows=100)
    locker = locked(sqlite_url)
    try:
        for step in range(1, 1001):
            writer.statistics(statistics_row(step))
            if step % 100 == 0:
                writer.event("info", "mark", f"step {step}", step=step)
        wait_for("a spill file", lambda: list(spill.glob("batch-*.jsonl")))
        assert writer.failures >= 1
    finally:
        locker.execute("COMMIT")
        locker.close()
    assert writer.close()
    assert [r["step"] for r in store.statistics(run_id)] == list(range(1, 1001))
    assert len(store.events(run_id)) == 10
    assert not list(spill.glob("batch-*"))
    store.close()


def test_a_later_writer_for_the_run_writes_what_an_earlier_one_spilled(
    sqlite_url: str, tmp_path: Path
) -> None:
    store = Store(sqlite_url)
    run_id = store.create_run("spill", "smallcnn", "mnist5k", {}, Hyperparameters(**DEFAULTS))
    spill = tmp_path / "unwritten"
    first = BackgroundWriter(store, run_id, spill_dir=spill, spill_after_rows=10,
                             close_seconds=1)
    locker = locked(sqlite_url)
    try:
        for step in range(1, 201):
            first.statistics(statistics_row(step))
        wait_for("a spill file", lambda: list(spill.glob("batch-*.jsonl")))
        assert not first.close()  # the database is still locked: rows stay on disk
        first._thread.join(30)  # its last write attempt gives up too: the process is gone
        assert not first._thread.is_alive()
    finally:
        locker.execute("COMMIT")
        locker.close()
    assert list(spill.glob("batch-*.jsonl"))
    second = BackgroundWriter(store, run_id, spill_dir=spill)  # what --resume builds
    second.statistics(statistics_row(201))
    assert second.close()
    steps = [r["step"] for r in store.statistics(run_id)]
    # What the first writer still held in memory when it gave up is lost with it;
    # everything it had spilled is written, in order, before the newer row.
    assert steps == sorted(steps) and steps[-1] == 201
    assert len(steps) > 10
    assert not list(spill.glob("batch-*"))
    store.close()
