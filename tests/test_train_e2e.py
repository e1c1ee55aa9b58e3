"""train.py as a real subprocess, steered by plain SQL as a third-party client would."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import torch
from sqlalchemy import make_url

from livetrain.db.contract import effective_status
from livetrain.db.store import Store, now

ROOT = Path(__file__).resolve().parent.parent
# For a trainer whose model and data do not matter to the test: the smallest model on the
# smallest dataset steps several times faster than the defaults (smallcnn on mnist5k),
# which test_browser_board, test_pathologies and test_examples train end to end.
SMALL = ("--model", "tinycnn", "--dataset", "digits")


class SqlClient:
    """Talks to the database with the plain driver, not with this project's code."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.kind = parsed.get_backend_name()
        if self.kind == "sqlite":
            self.conn: Any = sqlite3.connect(parsed.database, timeout=10, isolation_level=None)
        else:
            plain = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
            self.conn = psycopg.connect(plain, autocommit=True)

    def execute(self, sql: str, params: tuple = ()) -> None:
        if self.kind == "postgresql":
            sql = sql.replace("?", "%s")
        self.conn.execute(sql, params)

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        if self.kind == "postgresql":
            sql = sql.replace("?", "%s")
        return list(self.conn.execute(sql, params).fetchall())

    def one(self, sql: str, params: tuple = ()) -> Any:
        rows = self.rows(sql, params)
        return rows[0] if rows else None

    def close(self) -> None:
        self.conn.close()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except (sqlite3.OperationalError, psycopg.errors.UndefinedTable):
            value = None  # the trainer has not created the tables yet
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@contextmanager
def trainer(tmp_path: Path, url: str, *extra: str) -> Iterator[subprocess.Popen]:
    log = (tmp_path / "train.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable, str(ROOT / "train.py"), "--db", url, "--epochs", "1000",
            "--log-every", "5", "--val-batches", "1", "--no-progress",
            "--checkpoint-dir", str(tmp_path / "checkpoints"), *extra,
        ],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        if proc.returncode not in (0, None):
            print((tmp_path / "train.log").read_text()[-3000:])


def statistics(sql: SqlClient, run_id: int) -> list[tuple[int, float]]:
    return sql.rows(
        "SELECT step, learning_rate FROM statistics WHERE run_id = ? ORDER BY step", (run_id,)
    )


def test_sql_client_steers_a_running_trainer(tmp_path: Path, db_url: str) -> None:
    with trainer(tmp_path, db_url, *SMALL) as proc:
        sql = wait_for("the database", lambda: SqlClient(db_url), timeout=30)
        run_id = wait_for("a run", lambda: sql.one("SELECT run_id FROM runs"))[0]
        wait_for("3 logged steps", lambda: len(statistics(sql, run_id)) >= 3)

        # 1. A valid change, written with plain SQL as the contract describes.
        sql.execute(
            "UPDATE parameters SET learning_rate = 0.001, version = version + 1, "
            "dt_updated = CURRENT_TIMESTAMP WHERE run_id = ?", (run_id,),
        )
        version = sql.one("SELECT version FROM parameters WHERE run_id = ?", (run_id,))[0]
        applied = wait_for(
            "the acknowledgement",
            lambda: sql.one(
                "SELECT applied_step FROM parameters WHERE run_id = ? AND applied_version = ?",
                (run_id, version),
            ),
            timeout=30,
        )
        applied_step = applied[0]
        wait_for(
            "3 logged steps after the change",
            lambda: sum(s > applied_step for s, _ in statistics(sql, run_id)) >= 3,
        )

        # 2. A row forced past the constraints (as an admin could): ignored with a warning.
        if sql.kind == "sqlite":
            sql.execute("PRAGMA ignore_check_constraints = ON")
        else:
            sql.execute("ALTER TABLE parameters DROP CONSTRAINT parameters_learning_rate_range")
        sql.execute("UPDATE parameters SET learning_rate = 5 WHERE run_id = ?", (run_id,))
        bad_version = sql.one("SELECT version FROM parameters WHERE run_id = ?", (run_id,))[0]
        assert bad_version == version + 1  # the trigger versioned the forgetful writer
        wait_for(
            "the rejection event",
            lambda: sql.one(
                "SELECT message FROM events WHERE run_id = ? AND code = 'parameters_rejected' "
                "AND level = 'warning' AND version = ?", (run_id, bad_version),
            ),
        )
        logged = len(statistics(sql, run_id))
        wait_for("training to go on", lambda: len(statistics(sql, run_id)) >= logged + 2)

        # 3. Stop.
        sql.execute("UPDATE parameters SET stop_train = TRUE WHERE run_id = ?", (run_id,))
        assert proc.wait(timeout=60) == 0

    status, ended = sql.one("SELECT status, dt_ended FROM runs WHERE run_id = ?", (run_id,))
    assert status == "stopped" and ended is not None
    rows = statistics(sql, run_id)
    assert all(lr == 0.001 for step, lr in rows if step > applied_step)
    assert all(lr == 3e-4 for step, lr in rows if step <= applied_step)
    assert any(step <= applied_step for step, _ in rows)
    versions = [v for (v,) in sql.rows(
        "SELECT version FROM parameter_changes WHERE run_id = ? ORDER BY version", (run_id,)
    )]
    assert versions == [1, version, bad_version + 1]  # start, the lr change, the stop
    lr_in_force = sql.one(
        "SELECT learning_rate FROM parameter_changes WHERE run_id = ? AND version = ?",
        (run_id, bad_version + 1),
    )[0]
    assert lr_in_force == 0.001

    # Adam's state survived the change: its step count covers the whole run, not
    # only the steps since the change.
    (path,) = sql.one(
        "SELECT path FROM checkpoints WHERE run_id = ? AND reason = 'final'", (run_id,)
    )
    checkpoint = torch.load(tmp_path / path, weights_only=True)
    final_step = checkpoint["step"]
    assert final_step > applied_step > 0
    adam_steps = {float(s["step"]) for s in checkpoint["optimizer"]["state"].values()}
    assert adam_steps == {float(final_step)}
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == 0.001

    codes = [c for (c,) in sql.rows("SELECT code FROM events WHERE run_id = ?", (run_id,))]
    assert {"run_started", "parameters_applied", "parameters_rejected", "run_stopped"} <= set(
        codes
    )
    sql.close()


def test_ctrl_c_stops_gracefully(tmp_path: Path, sqlite_url: str) -> None:
    with trainer(tmp_path, sqlite_url) as proc:
        sql = wait_for("the database", lambda: SqlClient(sqlite_url), timeout=30)
        run_id = wait_for("a run", lambda: sql.one("SELECT run_id FROM runs"))[0]
        wait_for("a logged step", lambda: statistics(sql, run_id))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    assert sql.one("SELECT status FROM runs")[0] == "stopped"
    # The final log, off the --log-every schedule, is no reason for an error event.
    assert sql.rows("SELECT code, message FROM events WHERE level = 'error'") == []
    (path,) = sql.one("SELECT path FROM checkpoints ORDER BY step DESC LIMIT 1")
    assert (tmp_path / path).exists()
    sql.close()


def test_max_steps_finishes(tmp_path: Path, sqlite_url: str) -> None:
    with trainer(tmp_path, sqlite_url, "--max-steps", "12") as proc:
        assert proc.wait(timeout=120) == 0
    sql = SqlClient(sqlite_url)
    assert sql.one("SELECT status FROM runs")[0] == "finished"
    steps = [s for s, _ in statistics(sql, 1)]
    assert steps == [0, 5, 10, 12]  # the untrained model, every --log-every, the last step
    layers = sql.rows("SELECT DISTINCT layer_name FROM activations WHERE step = 12")
    assert len(layers) >= 3
    telemetry = sql.rows(
        "SELECT layer_name, grad_norm, update_ratio FROM layer_statistics WHERE step = 10"
    )
    assert len(telemetry) == len(layers)
    assert all(g > 0 and 0 < r < 1 for _, g, r in telemetry)
    kinds = sql.rows("SELECT DISTINCT kind FROM layer_histograms WHERE step = 10 ORDER BY kind")
    assert kinds == [("update",), ("weight",)]
    assert sql.one("SELECT count(*) FROM model_layers WHERE monitored")[0] == len(layers)
    sql.close()


@pytest.mark.parametrize(
    "args", [["--lr", "0"], ["--dropout", "150"], ["--optimizer", "Adagrad"], ["--epochs", "0"]]
)
def test_invalid_options_exit_2_before_any_run_exists(tmp_path: Path, args: list[str]) -> None:
    db = tmp_path / "never.db"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--db", f"sqlite:///{db}", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "error:" in result.stderr
    assert not db.exists()


def test_missing_dataset_says_what_to_run(tmp_path: Path) -> None:
    db = tmp_path / "empty.db"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--db", f"sqlite:///{db}",
         "--dataset", "cifar10", "--data-dir", str(tmp_path / "data")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert "get_dataset.py cifar10" in result.stderr
    assert "Traceback" not in result.stderr
    # The database is opened and checked before the data loads, so it exists: without a run.
    assert sqlite3.connect(db).execute("SELECT count(*) FROM runs").fetchone() == (0,)


def test_a_crash_marks_the_run_failed_with_the_error(tmp_path: Path) -> None:
    """A corrupt image in a folder dataset fails the run mid-training, for real."""
    from PIL import Image

    for label in ("cats", "dogs"):
        folder = tmp_path / "images" / label
        folder.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (i * 60, 0, 0)).save(folder / f"{i}.png")
    (tmp_path / "images" / "dogs" / "broken.png").write_bytes(b"not a png")
    db = tmp_path / "crash.db"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--db", f"sqlite:///{db}", "--no-progress",
         "--dataset", str(tmp_path / "images"), "--batch-size", "2", "--epochs", "3",
         "--checkpoint-dir", str(tmp_path / "checkpoints")],
        cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 1
    sql = SqlClient(f"sqlite:///{db}")
    status, ended = sql.one("SELECT status, dt_ended FROM runs")
    assert status == "failed" and ended is not None
    level, message = sql.one("SELECT level, message FROM events WHERE code = 'run_failed'")
    assert level == "error" and "UnidentifiedImageError" in message
    sql.close()


def max_step(sql: SqlClient, run_id: int) -> int:
    return sql.one("SELECT max(step) FROM statistics WHERE run_id = ?", (run_id,))[0] or 0


def run_status(sql: SqlClient, run_id: int) -> str:
    return sql.one("SELECT status FROM runs WHERE run_id = ?", (run_id,))[0]


# PostgreSQL only: the trainer's pause, resume and rollback do not depend on the back end;
# SQLite's rollback through a real trainer is test_non_finite_loss_pauses_and_a_rollback_recovers
# and its pause and resume are test_livetrain_api's test_sql_client_steers_lr_pause_resume_and_stop.
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_pause_resume_and_rollback_by_sql(tmp_path: Path, db_url: str) -> None:
    with trainer(tmp_path, db_url, *SMALL, "--checkpoint-every", "20") as proc:
        sql = wait_for("the database", lambda: SqlClient(db_url), timeout=30)
        run_id = wait_for("a run", lambda: sql.one("SELECT run_id FROM runs"))[0]
        wait_for("45 steps", lambda: max_step(sql, run_id) >= 45)

        sql.execute("UPDATE parameters SET pause_train = TRUE WHERE run_id = ?", (run_id,))
        wait_for("the pause", lambda: run_status(sql, run_id) == "paused")
        paused_at = max_step(sql, run_id)
        beat = sql.one("SELECT dt_heartbeat FROM runs WHERE run_id = ?", (run_id,))[0]
        wait_for("a heartbeat while paused", lambda: sql.one(
            "SELECT dt_heartbeat FROM runs WHERE run_id = ?", (run_id,))[0] != beat, timeout=10)
        assert max_step(sql, run_id) == paused_at and proc.poll() is None

        sql.execute("UPDATE parameters SET pause_train = FALSE WHERE run_id = ?", (run_id,))
        wait_for("training to resume", lambda: max_step(sql, run_id) > paused_at + 5)
        assert run_status(sql, run_id) == "running"

        # Roll back to step 20 and lower the lr in the same version.
        sql.execute(
            "UPDATE parameters SET rollback_step = 20, rollback_request = rollback_request + 1,"
            " learning_rate = 0.0001 WHERE run_id = ?", (run_id,))
        version = sql.one("SELECT version FROM parameters WHERE run_id = ?", (run_id,))[0]
        wait_for("the rollback", lambda: sql.one(
            "SELECT applied_step FROM parameter_changes WHERE run_id = ? AND version = ? "
            "AND rollback_step = 20", (run_id, version)))
        wait_for("new steps after the rollback", lambda: sql.one(
            "SELECT count(*) FROM statistics WHERE run_id = ? AND step > 20 "
            "AND learning_rate = 0.0001", (run_id,))[0] >= 3)
        sql.execute("UPDATE parameters SET stop_train = TRUE WHERE run_id = ?", (run_id,))
        assert proc.wait(timeout=60) == 0

    abandoned = sql.rows("SELECT DISTINCT branch, rolled_back_to FROM abandoned_statistics "
                         "WHERE run_id = ?", (run_id,))
    assert abandoned == [(1, 20)]
    cut = sql.one("SELECT min(step), max(step) FROM abandoned_statistics WHERE run_id = ?",
                  (run_id,))
    assert cut[0] > 20 and cut[1] >= paused_at
    live = statistics(sql, run_id)
    assert all(lr == 0.0001 for step, lr in live if step > 20)
    assert all(lr == 3e-4 for step, lr in live if step <= 20)
    assert run_status(sql, run_id) == "stopped"
    sql.close()


def test_non_finite_loss_pauses_and_a_rollback_recovers(tmp_path: Path, sqlite_url: str) -> None:
    """seed 004: 'to see the model blow up, raise the learning rate' -- then undo it.

    He-initialised AlexNet at lr 0.05 reaches NaN in 4 to 7 steps whatever the seed or
    thread count; at lr 1.0 from the default init, whether it ever does depends on the CPU.
    """
    with trainer(tmp_path, sqlite_url, "--model", "alexnet", "--init", "kaiming",
                 "--optimizer", "SGD+Nesterov", "--lr", "0.05", "--log-every", "1") as proc:
        sql = wait_for("the database", lambda: SqlClient(sqlite_url), timeout=30)
        event = wait_for("the non-finite event", lambda: sql.one(
            "SELECT step, level, fix FROM events WHERE code = 'non_finite'"), timeout=120)
        step, level, fix = event
        assert level == "error" and '"learning_rate"' in fix
        wait_for("the pause", lambda: run_status(sql, 1) == "paused")
        time.sleep(1.0)
        assert max_step(sql, 1) <= step + 1 and proc.poll() is None

        sql.execute("UPDATE parameters SET rollback_step = 0, rollback_request = 1, "
                    "learning_rate = 0.005 WHERE run_id = 1")  # the initial checkpoint
        wait_for("training to go on from the checkpoint", lambda: sql.one(
            "SELECT count(*) FROM statistics WHERE step > 0 AND learning_rate = 0.005 "
            "AND train_loss < 10")[0] >= 2, timeout=90)
        assert run_status(sql, 1) == "running"
        sql.execute("UPDATE parameters SET stop_train = TRUE WHERE run_id = 1")
        assert proc.wait(timeout=60) == 0
    assert sql.one("SELECT count(*) FROM abandoned_statistics WHERE rolled_back_to = 0")[0] > 0
    sql.close()


# SQLite only: a kill -9 mid-write leaves SQLite's file to recover; PostgreSQL's kill -9 and
# resume are test_resume.py::test_resume_at_once_after_kill_9.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_resume_after_kill_9_continues_the_same_run(tmp_path: Path, db_url: str) -> None:
    with trainer(tmp_path, db_url, *SMALL, "--checkpoint-every", "20") as proc:
        sql = wait_for("the database", lambda: SqlClient(db_url), timeout=30)
        run_id = wait_for("a run", lambda: sql.one("SELECT run_id FROM runs"))[0]
        wait_for("a checkpoint past step 20", lambda: (sql.one(
            "SELECT max(step) FROM checkpoints WHERE run_id = ?", (run_id,))[0] or 0) >= 20)
        sql.execute("UPDATE parameters SET learning_rate = 0.0005 WHERE run_id = ?", (run_id,))
        wait_for("the change", lambda: sql.one(
            "SELECT applied_version FROM parameters WHERE run_id = ?", (run_id,))[0] == 2)
        wait_for("logs after the last checkpoint", lambda: max_step(sql, run_id) > sql.one(
            "SELECT max(step) FROM checkpoints WHERE run_id = ?", (run_id,))[0] + 5)
        proc.kill()  # SIGKILL: no goodbye, status stays 'running' with a stale heartbeat
        proc.wait()
        killed = time.monotonic()
    assert run_status(sql, run_id) == "running"
    board = Store(db_url)  # what the board shows: lost, within 10 s
    wait_for("the board to show the run lost", lambda: effective_status(
        board.get_run(run_id), now()) == "lost", timeout=10)
    assert time.monotonic() - killed <= 10
    board.close()
    killed_at = max_step(sql, run_id)
    (checkpoint_step,) = sql.one("SELECT max(step) FROM checkpoints WHERE run_id = ?", (run_id,))
    sql.execute("UPDATE parameters SET dropout = 30 WHERE run_id = ?", (run_id,))  # meanwhile

    with trainer(tmp_path, db_url, "--resume", str(run_id)) as proc:
        wait_for("logs after the resume", lambda: sql.one(
            "SELECT count(*) FROM statistics WHERE run_id = ? AND step > ? AND dropout = 30",
            (run_id, checkpoint_step))[0] >= 2)
        assert run_status(sql, run_id) == "running"
        sql.execute("UPDATE parameters SET stop_train = TRUE WHERE run_id = ?", (run_id,))
        assert proc.wait(timeout=60) == 0

    assert sql.one("SELECT count(*) FROM runs")[0] == 1  # the same run, not a new one
    assert run_status(sql, run_id) == "stopped"
    steps = [s for s, _ in statistics(sql, run_id)]
    assert steps == sorted(set(steps))  # one row per step
    assert all(lr == 0.0005 for s, lr in statistics(sql, run_id) if s > checkpoint_step)
    cut = sql.one("SELECT min(step), max(step) FROM abandoned_statistics WHERE run_id = ?",
                  (run_id,))
    assert cut[0] > checkpoint_step and cut[1] == killed_at
    codes = [c for (c,) in sql.rows("SELECT code FROM events WHERE run_id = ?", (run_id,))]
    assert "run_resumed" in codes
    sql.close()


def test_resume_of_an_unknown_run_fails_clearly(tmp_path: Path, sqlite_url: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--db", sqlite_url, "--resume", "42"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "no run 42" in result.stderr


def test_resume_of_a_run_whose_trainer_lives_is_refused(tmp_path: Path, sqlite_url: str) -> None:
    """Two trainers on one run would write the same steps twice: the second is refused
    while the first sends heartbeats (it may resume once the run shows as lost)."""
    with trainer(tmp_path, sqlite_url) as proc:
        sql = wait_for("the database", lambda: SqlClient(sqlite_url), timeout=30)
        run_id = wait_for("a checkpoint", lambda: sql.one(
            "SELECT run_id FROM checkpoints"), timeout=60)[0]
        second = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), "--db", sqlite_url, "--resume",
             str(run_id), "--checkpoint-dir", str(tmp_path / "checkpoints")],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )
        assert second.returncode == 1
        assert f"run {run_id} is running" in second.stderr
        assert f"pid {proc.pid}" in second.stderr
        assert proc.poll() is None  # the first trainer goes on
        assert sql.one("SELECT count(*) FROM runs")[0] == 1
        sql.close()
