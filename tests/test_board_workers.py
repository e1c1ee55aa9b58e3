"""Many viewers: the board keeps no state between requests (the page holds what it shows,
the database everything else), so any process may answer any request."""

from __future__ import annotations

import signal
from pathlib import Path
from urllib.parse import urlsplit

import psutil
from test_concurrent_writers import board_process
from test_train_e2e import wait_for

from bench.board_refresh import LOG_EVERY, DashPage, fill, stats_row
from livetrain.db.store import Batch, Store, now

REFRESH = ("refresh-interval", "n_intervals")


def port_of(address: str) -> int:
    return urlsplit(address).port or 80


def test_a_page_served_alternately_by_two_boards(tmp_path: Path, postgres_url: str) -> None:
    store = Store(postgres_url)
    run_id, last = fill(store, 500)
    with board_process(postgres_url, tmp_path) as (first, _), \
            board_process(postgres_url, tmp_path) as (second, _):
        page = DashPage(port_of(first), run_id, port_of(second))  # every request to the other
        page.fire_all(("run-select", "value"))
        assert page.props[("curve-state", "data")]["last_step"] == last
        start = now()
        for tick in range(1, 11):
            last += LOG_EVERY
            store.write_batch(run_id, Batch(statistics=[stats_row(last, start)],
                                            heartbeat=now()))
            page.props[REFRESH] = tick
            page.fire_all(REFRESH)
            assert page.props[("curve-state", "data")]["last_step"] == last, tick
            assert page.props[("step-token", "data")]["step"] == last
    store.close()


def test_gunicorn_workers_serve_the_board(tmp_path: Path, postgres_url: str) -> None:
    store = Store(postgres_url)
    run_id, last = fill(store, 200)
    with board_process(postgres_url, tmp_path, "--workers", "2") as (address, master):
        # The board answers once one worker has booted; gunicorn forks the other beside it
        # (and would replace one that died), so wait for both rather than race the fork.
        try:
            wait_for("2 gunicorn workers",
                     lambda: len(psutil.Process(master.pid).children()) == 2, timeout=30)
        except AssertionError as exc:
            logs = "\n".join(p.read_text()[-2000:] for p in tmp_path.glob("board-*.log"))
            raise AssertionError(f"{exc}; the board said:\n{logs}") from None
        for _ in range(3):  # a few pages, each on connections of its own
            page = DashPage(port_of(address), run_id)
            page.fire_all(("run-select", "value"))
            assert page.props[("curve-state", "data")]["last_step"] == last
        master.send_signal(signal.SIGTERM)
        assert master.wait(timeout=30) == 0
    store.close()
