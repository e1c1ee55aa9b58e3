"""The board dies mid-run and comes back: training never notices, and the new board
shows the whole history (its curves are read from the database, not from the old
board's memory)."""

from __future__ import annotations

import time
from itertools import pairwise
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from test_concurrent_writers import board_process
from test_train_e2e import SqlClient, max_step, trainer, wait_for

from bench.board_refresh import DashPage

LOG_EVERY = 5  # test_train_e2e.trainer's


def training_curve(address: str, run_id: int) -> list[int]:
    """The steps of the raw training-loss trace a page gets when it opens the run."""
    page = DashPage(urlsplit(address).port or 80, run_id)
    page.fire_all(("run-select", "value"))
    figure = page.props[("loss-graph", "figure")]
    return next(t["x"] for t in figure["data"] if t.get("name") == "train (raw)")


# SQLite only: a board killed while it reads the trainer's own file is the case a server
# cannot clean up after; the board reads PostgreSQL with the same queries, beside a live
# trainer in test_browser_board's and test_concurrent_writers' [postgresql] cases.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_board_restart_mid_run(tmp_path: Path, db_url: str) -> None:
    with trainer(tmp_path, db_url, "--model", "tinycnn", "--dataset", "digits") as proc:
        sql = wait_for("the database", lambda: SqlClient(db_url), timeout=30)
        run_id = wait_for("a run", lambda: sql.one("SELECT run_id FROM runs"))[0]
        with board_process(db_url, tmp_path) as (address, board):
            wait_for("some logs", lambda: max_step(sql, run_id) >= 10 * LOG_EVERY)
            assert training_curve(address, run_id)
            board.kill()  # no goodbye: the board's process is gone
            board.wait()

        before = max_step(sql, run_id)
        time.sleep(3)  # the run without any board
        assert proc.poll() is None and max_step(sql, run_id) > before

        with board_process(db_url, tmp_path) as (address, _):
            shown = training_curve(address, run_id)
        logged = [step for (step,) in sql.rows(
            "SELECT step FROM statistics WHERE run_id = ? AND step <= ? ORDER BY step",
            (run_id, shown[-1]))]
        assert shown == logged and shown[0] == 0 and shown[-1] > before

        sql.execute("UPDATE parameters SET stop_train = TRUE WHERE run_id = ?", (run_id,))
        assert proc.wait(timeout=90) == 0
    steps = [s for (s,) in sql.rows(
        "SELECT step FROM statistics WHERE run_id = ? ORDER BY step", (run_id,))]
    assert [(a, b) for a, b in pairwise(steps) if b - a > LOG_EVERY] == []
    sql.close()
