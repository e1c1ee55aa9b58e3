"""Two boards and a SQL client steer the same running trainer at once.

Everything is real: train.py and two board.py processes on one database, three
threads writing a few hundred parameter changes through the boards' Dash endpoint
and through plain SQL. Every write must get its own version, none may be lost,
and the trainer must end on the last one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from test_board_auth import free_port, submit_payload
from test_train_e2e import ROOT, SqlClient, trainer, wait_for

WRITES_PER_WRITER = 100


@contextmanager
def board_process(url: str, tmp_path: Path,
                  *extra: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """board.py in its own process, without credentials, on a free loopback port."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOARD_")}
    log = (tmp_path / f"board-{port}.log").open("w")  # read by a failing test
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "board.py"), "--db", url, "--port", str(port), *extra],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=log,
    )
    address = f"http://127.0.0.1:{port}"
    try:
        def answers() -> bool:
            try:
                urllib.request.urlopen(address, timeout=2).close()
            except OSError:
                return False
            return True

        wait_for(f"board.py on port {port}", answers, timeout=60)
        yield address, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        log.close()


def submit(address: str, run_id: int, lr: str) -> dict:
    """Press Submit parameters, as the page does; the board's answer (with its version)."""
    request = urllib.request.Request(  # noqa: S310 - our own board on loopback
        address + "/_dash-update-component", data=json.dumps(submit_payload(run_id, lr)).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
        return json.loads(response.read())["response"]["submission"]["data"]


def test_two_boards_and_a_sql_client_at_once(tmp_path: Path, db_url: str) -> None:
    with trainer(tmp_path, db_url, "--model", "tinycnn", "--dataset", "digits") as proc, \
            board_process(db_url, tmp_path) as (first, _), \
            board_process(db_url, tmp_path) as (second, _):
        sql = wait_for("the database", lambda: SqlClient(db_url), timeout=30)
        run_id = wait_for("a run", lambda: sql.one("SELECT run_id FROM runs"))[0]
        wait_for("training", lambda: sql.one(
            "SELECT max(step) FROM statistics WHERE run_id = ?", (run_id,))[0])
        start_version = sql.one("SELECT version FROM parameters WHERE run_id = ?", (run_id,))[0]

        # Learning rates unique to each write, so the last one can be recognised.
        board_versions: list[int] = []
        errors: list[BaseException] = []

        def through_board(address: str, offset: int) -> None:
            try:
                for i in range(WRITES_PER_WRITER):
                    answer = submit(address, run_id, f"{(offset + i + 1) * 1e-6:.6g}")
                    assert answer["refused"] is None, answer
                    board_versions.append(answer["version"])
            except BaseException as exc:
                errors.append(exc)

        def through_sql() -> None:
            client = SqlClient(db_url)
            try:
                for i in range(WRITES_PER_WRITER):
                    client.execute(
                        "UPDATE parameters SET learning_rate = ?, version = version + 1 "
                        "WHERE run_id = ?", ((2 * WRITES_PER_WRITER + i + 1) * 1e-6, run_id))
            except BaseException as exc:
                errors.append(exc)
            finally:
                client.close()

        writers = [
            threading.Thread(target=through_board, args=(first, 0)),
            threading.Thread(target=through_board, args=(second, WRITES_PER_WRITER)),
            threading.Thread(target=through_sql),
        ]
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join(timeout=300)
        assert not errors, errors

        total = 3 * WRITES_PER_WRITER
        assert len(set(board_versions)) == len(board_versions) == 2 * WRITES_PER_WRITER
        final_version, final_lr = sql.one(
            "SELECT version, learning_rate FROM parameters WHERE run_id = ?", (run_id,))
        assert final_version == start_version + total  # no write lost, none counted twice

        # The trainer settles on the last version and trains with its learning rate.
        wait_for("the last version applied", lambda: sql.one(
            "SELECT applied_version FROM parameters WHERE run_id = ?",
            (run_id,))[0] == final_version, timeout=60)
        wait_for("a step logged with the last learning rate", lambda: sql.one(
            "SELECT count(*) FROM statistics WHERE run_id = ? AND learning_rate = ?",
            (run_id, final_lr))[0] > 0, timeout=60)
        sql.execute("UPDATE parameters SET stop_train = TRUE WHERE run_id = ?", (run_id,))
        assert proc.wait(timeout=90) == 0

    duplicates = sql.rows(
        "SELECT version FROM parameter_changes WHERE run_id = ? GROUP BY version "
        "HAVING count(*) > 1", (run_id,))
    assert duplicates == []
    last_applied = sql.one(
        "SELECT max(version) FROM parameter_changes WHERE run_id = ?", (run_id,))[0]
    assert last_applied == final_version + 1  # the stop, after the last learning rate
    assert sql.one("SELECT learning_rate FROM statistics WHERE run_id = ? ORDER BY step DESC",
                   (run_id,))[0] == final_lr
    sql.close()
