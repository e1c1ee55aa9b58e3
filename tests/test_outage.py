"""A database outage mid-run, inflicted for real: training goes on and no row is lost.

PostgreSQL: this machine's server is stopped with pg_ctlcluster and started again.
SQLite: another process holds the write lock. Either way the trainer keeps
training, its background writer keeps what it could not write (past --buffer-rows,
in files next to the checkpoints), the listener reconnects, and a change submitted
after recovery is applied.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from itertools import pairwise
from pathlib import Path

from conftest import ServerLock
from test_train_e2e import SMALL, SqlClient, max_step, trainer, wait_for

OUTAGE_SECONDS = 30  # the most an outage is waited on for the trainer to react to it
AFTER_REACTION_SECONDS = 3  # the outage goes on that long once the trainer has reacted
BUFFER_ROWS = "60"  # a few logs' worth: the outage must spill rows to disk


def cluster(action: str) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action],
                   check=True, capture_output=True)
    if action == "start":
        for _ in range(60):
            if subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1"]).returncode == 0:
                return
            time.sleep(0.5)


def spilled(tmp_path: Path, run_id: int) -> list[Path]:
    return list((tmp_path / "checkpoints" / f"run_{run_id}" / "unwritten").glob("batch-*"))


def assert_no_row_lost(sql: SqlClient, run_id: int, log_every: int) -> None:
    """Every step the trainer logged is in the database, with its per-layer rows."""
    steps = [s for (s,) in sql.rows(
        "SELECT step FROM statistics WHERE run_id = ? ORDER BY step", (run_id,))]
    gaps = [(a, b) for a, b in pairwise(steps) if b - a > log_every]
    assert steps[0] == 0 and gaps == [], f"logged steps missing between {gaps}"
    last = sql.one("SELECT event_id FROM events WHERE run_id = ? AND code = 'run_stopped'",
                   (run_id,))
    assert last is not None  # the final event, queued after everything else, landed
    for per_layer in ("SELECT count(DISTINCT step) FROM layer_statistics WHERE run_id = ?",
                      "SELECT count(DISTINCT step) FROM activations WHERE run_id = ?"):
        assert sql.one(per_layer, (run_id,))[0] == len(steps), per_layer


def recover_and_steer(sql: SqlClient, run_id: int, proc: subprocess.Popen) -> None:
    sql.execute("UPDATE parameters SET learning_rate = 0.0007 WHERE run_id = ?", (run_id,))
    wait_for("the change after recovery", lambda: sql.one(
        "SELECT count(*) FROM statistics WHERE run_id = ? AND learning_rate = 0.0007",
        (run_id,))[0] >= 2, timeout=60)
    sql.execute("UPDATE parameters SET stop_train = TRUE WHERE run_id = ?", (run_id,))
    assert proc.wait(timeout=90) == 0


def test_postgresql_restart_mid_run(tmp_path: Path, postgres_server: ServerLock,
                                    postgres_url: str) -> None:
    postgres_server.own()  # the other tests wait while the server is down
    with trainer(tmp_path, postgres_url, *SMALL, "--buffer-rows", BUFFER_ROWS) as proc:
        sql = wait_for("the database", lambda: SqlClient(postgres_url), timeout=30)
        run_id = wait_for("a run", lambda: sql.one("SELECT run_id FROM runs"))[0]
        wait_for("some logs", lambda: max_step(sql, run_id) >= 20)
        before = max_step(sql, run_id)
        sql.close()
        try:
            cluster("stop")
            # Not a fixed wait: the outage lasts until the trainer has spilled rows past
            # --buffer-rows (it noticed, and kept training), then a little longer. Every
            # other PostgreSQL test of the suite waits while the server is down.
            wait_for("past --buffer-rows the rows go to disk",
                     lambda: spilled(tmp_path, run_id), timeout=OUTAGE_SECONDS)
            time.sleep(AFTER_REACTION_SECONDS)
            assert proc.poll() is None, "training must go on while the database is down"
            assert spilled(tmp_path, run_id), "past --buffer-rows the rows go to disk"
        finally:
            cluster("start")
        sql = wait_for("the database again", lambda: SqlClient(postgres_url), timeout=60)
        wait_for("the rows logged during the outage", lambda: max_step(sql, run_id) > before + 50,
                 timeout=60)
        recover_and_steer(sql, run_id, proc)
    assert_no_row_lost(sql, run_id, 5)
    assert not spilled(tmp_path, run_id)
    assert sql.one("SELECT status FROM runs WHERE run_id = ?", (run_id,))[0] == "stopped"
    sql.close()


def test_sqlite_locked_by_another_writer(tmp_path: Path, sqlite_url: str) -> None:
    with trainer(tmp_path, sqlite_url, *SMALL) as proc:
        sql = wait_for("the database", lambda: SqlClient(sqlite_url), timeout=30)
        run_id = wait_for("a run", lambda: sql.one("SELECT run_id FROM runs"))[0]
        wait_for("some logs", lambda: max_step(sql, run_id) >= 20)
        locker = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        before = max_step(sql, run_id)
        # Held until a write has waited out the trainer's busy timeout and failed (its
        # warning is in the log), then a little longer: not a fixed wait.
        log, failed = tmp_path / "train.log", "database write failed"
        earlier = log.read_text().count(failed)
        wait_for("a write to fail on the lock", lambda: log.read_text().count(failed) > earlier,
                 timeout=OUTAGE_SECONDS)
        time.sleep(AFTER_REACTION_SECONDS)
        assert max_step(sql, run_id) == before  # nothing could be written...
        locker.execute("COMMIT")
        locker.close()
        assert proc.poll() is None  # ...and training went on
        wait_for("the buffered rows", lambda: max_step(sql, run_id) > before + 20, timeout=60)
        recover_and_steer(sql, run_id, proc)
    assert_no_row_lost(sql, run_id, 5)
    sql.close()
