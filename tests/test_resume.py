"""`train.py --resume` right after a crash, and `--resume --wait` when the trainer may live.

A run whose trainer ran on this host and is gone (killed, its pid dead or reused) is
resumed at once; one whose trainer may still live (another host, or no proof it died)
only once its heartbeat is old enough for it to count as lost.
"""

from __future__ import annotations

import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy import update
from test_train_e2e import ROOT, SMALL, SqlClient, max_step, run_status, trainer, wait_for
from test_untrusted_files import finished_run, train

from livetrain.db import schema as s
from livetrain.db.contract import LOST_AFTER_SECONDS, heartbeat_age
from livetrain.db.store import Store, now
from livetrain.trainer.ownership import trainer_gone, trainer_identity


def started_run(tmp_path: Path, url: str, proc: subprocess.Popen) -> tuple[SqlClient, int]:
    """The run of a trainer just started, once it has a checkpoint past step 10 and has
    logged beyond it (so the resume has steps to abandon)."""
    sql = wait_for("the database", lambda: SqlClient(url), timeout=30)
    run_id = wait_for("a run", lambda: sql.one("SELECT run_id FROM runs"))[0]
    wait_for("a checkpoint past step 10", lambda: (sql.one(
        "SELECT max(step) FROM checkpoints WHERE run_id = ?", (run_id,))[0] or 0) >= 10,
        timeout=90)
    assert proc.poll() is None
    return sql, run_id


def last_checkpoint(sql: SqlClient, run_id: int) -> int:
    return sql.one("SELECT max(step) FROM checkpoints WHERE run_id = ?", (run_id,))[0]


def resume_command(url: str, tmp_path: Path, run_id: int, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--db", url, "--resume", str(run_id),
            "--checkpoint-dir", str(tmp_path / "checkpoints"), *extra]


# PostgreSQL only: the decision rests on the recorded pid and host, read the same way from
# either back end (trainer_gone is tested without a database below); SQLite's kill -9 and
# resume are test_train_e2e's test_resume_after_kill_9_continues_the_same_run.
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_resume_at_once_after_kill_9(tmp_path: Path, db_url: str) -> None:
    """kill -9, then --resume at once: the heartbeat is still fresh (the run shows as
    running), but the recorded pid on this host is dead, so the run goes on."""
    with trainer(tmp_path, db_url, *SMALL, "--checkpoint-every", "10") as proc:
        sql, run_id = started_run(tmp_path, db_url, proc)
        proc.kill()
        proc.wait()
    store = Store(db_url)
    run = store.get_run(run_id)
    assert run["config"]["pid"] == proc.pid and run["config"]["host"] == platform.node()
    assert run["status"] == "running" and heartbeat_age(run, now()) < LOST_AFTER_SECONDS
    # Starting a trainer takes seconds (torch's import alone), long enough for a heartbeat
    # up to 2 s old to reach the 6 s that make the run lost. One a minute ahead keeps the
    # run running throughout, so the resume must rest on the dead pid, not on the clock.
    with store.engine.begin() as conn:
        conn.execute(update(s.runs).where(s.runs.c.run_id == run_id).values(
            dt_heartbeat=now() + timedelta(seconds=60)))
    checkpoint_step = last_checkpoint(sql, run_id)

    with trainer(tmp_path, db_url, "--resume", str(run_id)) as second:
        wait_for("logs after the resume", lambda: sql.one(
            "SELECT count(*) FROM events WHERE run_id = ? AND code = 'run_resumed'",
            (run_id,))[0] == 1 and max_step(sql, run_id) > checkpoint_step + 5, timeout=90)
        assert run_status(sql, run_id) == "running"
        sql.execute("UPDATE parameters SET stop_train = TRUE WHERE run_id = ?", (run_id,))
        assert second.wait(timeout=60) == 0
    output = (tmp_path / "train.log").read_text()
    assert f"run {run_id} is running but its trainer on this host is gone: resuming at " \
           "once" in output
    assert "Traceback" not in output
    assert sql.one("SELECT count(*) FROM runs")[0] == 1
    assert run_status(sql, run_id) == "stopped"
    config = store.get_run(run_id)["config"]  # the new trainer is the one on record now
    assert config["pid"] == second.pid and config["pid"] != proc.pid
    store.close()
    sql.close()


@contextmanager
def trainer_elsewhere(url: str, run_id: int) -> Iterator[None]:
    """While open, the run looks driven by a live trainer on another machine: its host
    in the config, a heartbeat every half second. Afterwards the heartbeat ages."""
    store = Store(url)
    config = store.get_run(run_id)["config"] | {"host": "another-machine"}
    done = threading.Event()

    def beat() -> None:
        while True:
            with store.engine.begin() as conn:
                conn.execute(update(s.runs).where(s.runs.c.run_id == run_id).values(
                    status="running", config=config, dt_heartbeat=now()))
            if done.wait(0.5):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        store.close()


class Stderr:
    """A child's stderr, read line by line in a thread so the child never blocks on it."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def first(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while not self.lines:
            assert time.monotonic() < deadline, f"no stderr line within {timeout:.0f} s"
            time.sleep(0.05)
        return self.lines[0]

    def text(self) -> str:
        """Everything, once the child has ended."""
        self._thread.join(timeout=30)
        return "\n".join(self.lines)


def test_resume_wait_waits_for_a_trainer_elsewhere(tmp_path: Path, sqlite_url: str) -> None:
    """A trainer on another host cannot be checked for life: --resume is refused while
    its heartbeat is fresh, and --resume --wait waits until the run counts as lost
    (Ctrl-C ends that wait and changes nothing)."""
    with trainer(tmp_path, sqlite_url, *SMALL, "--checkpoint-every", "10") as proc:
        sql, run_id = started_run(tmp_path, sqlite_url, proc)
        proc.kill()
        proc.wait()
    command = resume_command(sqlite_url, tmp_path, run_id)

    with trainer_elsewhere(sqlite_url, run_id):
        refused = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True,
                                 timeout=120)
        assert refused.returncode == 1
        assert f"run {run_id} is running: its trainer (pid {proc.pid} on another-machine)" \
            in refused.stderr
        assert "add --wait" in refused.stderr and "Traceback" not in refused.stderr

        waiting = subprocess.Popen([*command, "--wait"], cwd=tmp_path, stderr=subprocess.PIPE,
                                   text=True)
        try:
            stderr = Stderr(waiting)
            assert stderr.first().startswith(
                f"waiting for run {run_id} to count as lost: its trainer (pid {proc.pid} on "
                "another-machine)")
            waiting.send_signal(signal.SIGINT)
            assert waiting.wait(timeout=30) == 130
        finally:
            if waiting.poll() is None:
                waiting.kill()
                waiting.wait()
        rest = stderr.text()
        assert f"stopped waiting for run {run_id}; it is left as it was" in rest
        assert "Traceback" not in rest
        assert sql.one("SELECT count(*) FROM events WHERE code = 'run_resumed'")[0] == 0
        assert sql.one("SELECT json_extract(config, '$.host') FROM runs")[0] == "another-machine"

        resumed = subprocess.Popen([*command, "--wait", "--no-progress"], cwd=tmp_path,
                                   stderr=subprocess.PIPE, text=True)
        resumed_stderr = Stderr(resumed)
        try:
            assert resumed_stderr.first().startswith(f"waiting for run {run_id} to count")
            time.sleep(1)  # still waiting while the heartbeats go on
            assert resumed.poll() is None
            assert sql.one("SELECT count(*) FROM events WHERE code = 'run_resumed'")[0] == 0
        except BaseException:
            resumed.kill()
            resumed.wait()
            raise
    silent = time.monotonic()  # the other machine's trainer has stopped beating
    try:
        wait_for("the resume", lambda: sql.one(
            "SELECT count(*) FROM events WHERE code = 'run_resumed'")[0] == 1, timeout=90)
        waited = time.monotonic() - silent
        sql.execute("UPDATE parameters SET stop_train = TRUE WHERE run_id = ?", (run_id,))
        assert resumed.wait(timeout=60) == 0
    finally:
        if resumed.poll() is None:
            resumed.kill()
            resumed.wait()
    assert waited >= LOST_AFTER_SECONDS - 0.5  # the last beat may be up to 0.5 s older
    assert "Traceback" not in resumed_stderr.text()
    assert run_status(sql, run_id) == "stopped"
    sql.close()


def test_a_live_trainer_on_this_host_is_not_gone() -> None:
    assert not trainer_gone(trainer_identity())


def test_a_reused_pid_is_gone() -> None:
    """This pid lives, but it was started long after the recorded trainer: pid reuse."""
    assert trainer_gone(trainer_identity() | {"pid_started": time.time() - 86_400})


def test_a_dead_or_zombie_pid_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:  # exited, not reaped
        assert time.monotonic() < deadline
        time.sleep(0.05)
    zombie = trainer_identity() | {"pid": child.pid}
    assert trainer_gone(zombie)
    child.wait()
    assert trainer_gone(zombie)  # reaped: no such process


@pytest.mark.parametrize("change", [
    {"host": "another-machine"},  # cannot look at another host's processes
    {"host": None}, {"host": 7},
    {"pid": None}, {"pid": "1"}, {"pid": -1}, {"pid": 0}, {"pid": 2**63}, {"pid": 1.0},
    {"pid": True},
])
def test_untrusted_identity_keeps_the_heartbeat_rule(change: dict[str, Any]) -> None:
    """Values that cannot prove the trainer dead leave the decision to the heartbeat,
    even when the start time recorded says "another process"."""
    reused = trainer_identity() | {"pid_started": time.time() - 86_400}
    assert trainer_gone(reused)  # the same values, untouched, prove it gone
    assert not trainer_gone(reused | change)


@pytest.mark.parametrize("started", [None, "yesterday", float("nan"), float("inf"), True])
def test_a_live_pid_without_a_usable_start_time_may_be_the_trainer(started: Any) -> None:
    assert not trainer_gone(trainer_identity() | {"pid_started": started})


@pytest.mark.parametrize("config", [None, [], "pid 1", 3])
def test_a_config_that_is_not_an_object_is_not_proof(config: Any) -> None:
    assert not trainer_gone(config)


# -- what a resume takes from the database ------------------------------------------


@pytest.fixture(scope="module")
def finished_sqlite_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """One finished run (its folder and its SQLite URL) for the forged-config cases: each
    resume is refused before it changes anything, and each case puts the config back."""
    folder = tmp_path_factory.mktemp("finished")
    url = f"sqlite:///{folder / 'training.db'}"
    sql, _ = finished_run(folder, url)
    sql.close()
    yield folder, url


@pytest.mark.parametrize("forged", [
    {"lr": "abc"}, {"model": "../../elsewhere"}, {"epochs": -5}, {"batch_size": 1e9},
    {"optimizer": "Adam; DROP TABLE runs"}, {"init": "normal:-1"}, {"dropout": True},
])
def test_a_resume_refuses_options_forged_in_the_runs_config(
    finished_sqlite_run: tuple[Path, str], forged: dict[str, Any]
) -> None:
    """runs.config is written by the trainer, but any SQL client can rewrite it: a resume
    checks every option it takes from there as the command line would."""
    folder, sqlite_url = finished_sqlite_run
    sql = SqlClient(sqlite_url)
    (run_id,) = sql.one("SELECT run_id FROM runs")
    store = Store(sqlite_url)
    original = store.get_run(run_id)["config"]
    assert not set(forged) & {k for k, v in original.items() if v == forged.get(k)}
    with store.engine.begin() as conn:
        conn.execute(update(s.runs).where(s.runs.c.run_id == run_id)
                     .values(config=original | forged))
    try:
        result = train(folder, sqlite_url, "--resume", str(run_id))
        assert result.returncode == 1, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
        assert f"run {run_id}" in line and next(iter(forged)) in line, line
        assert run_status(sql, run_id) == "finished"
        assert sql.one("SELECT count(*) FROM events WHERE code = 'run_resumed'")[0] == 0
    finally:  # the next case starts from the run as the trainer left it
        with store.engine.begin() as conn:
            conn.execute(update(s.runs).where(s.runs.c.run_id == run_id)
                         .values(config=original))
        store.close()
        sql.close()


def test_resuming_twice_records_each_version_once_and_refuses_no_row(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A resumed trainer adopts the parameters row as it stands, whose version the first
    trainer already recorded: no second history row, no row refused by the database."""
    sql, run_id = finished_run(tmp_path, sqlite_url)
    for more in ("20", "30"):
        result = train(tmp_path, sqlite_url, "--resume", str(run_id), "--max-steps", more)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "refused a row" not in result.stderr, result.stderr[-2000:]
    versions = [v for (v,) in sql.rows(
        "SELECT version FROM parameter_changes WHERE run_id = ? ORDER BY version", (run_id,))]
    assert versions == sorted(set(versions)) and versions
    assert max_step(sql, run_id) == 30
    sql.close()


@pytest.mark.parametrize("name", ["\u200b\u200d\ufeff", "bell\x07", "   "])
def test_a_run_name_the_board_would_refuse_is_refused_on_the_command_line(
    tmp_path: Path, sqlite_url: str, name: str
) -> None:
    result = train(tmp_path, sqlite_url, "--run-name", name, "--max-steps", "1")
    assert result.returncode == 2
    assert "--run-name" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "training.db").exists() or SqlClient(sqlite_url).one(
        "SELECT count(*) FROM runs")[0] == 0
