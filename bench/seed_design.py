"""The seed's design (article 004), measured here the same way, for comparison.

The seed's trainer opens a fresh database connection and runs a pandas query for
the parameters row on every training step, and its board rereads the whole run
on every refresh. This times both on a run of --steps logged rows, per back end:
  - per-step poll: connect, pandas.read_sql of the parameters row, close;
  - full reread: connect, pandas.read_sql of every statistics row of the run, close.
Against them: this project's step does no database work at all (bench.overhead),
and its refresh reads only what is new (bench.board_refresh).

    python -m bench.seed_design [--steps 50000] [--repeats 50]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import pandas as pd
import psycopg
from sqlalchemy import make_url

from bench.board_refresh import database, fill
from livetrain.db.store import Store

SQL = {  # the drivers' own placeholders
    "sqlite": ("SELECT * FROM parameters WHERE run_id = ?",
               "SELECT * FROM statistics WHERE run_id = ?"),
    "postgresql": ("SELECT * FROM parameters WHERE run_id = %s",
                   "SELECT * FROM statistics WHERE run_id = %s"),
}


def plain_connect(url: str) -> Callable[[], Any]:
    """A fresh connection with the plain driver, as the seed's code makes one."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return lambda: sqlite3.connect(parsed.database)
    plain = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    return lambda: psycopg.connect(plain)


def timed(work: Callable[[], Any], repeats: int) -> float:
    """Median milliseconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def measure(backend: str, steps: int, repeats: int) -> tuple[float, float, int]:
    with database(backend) as url:
        store = Store(url)
        run_id, _ = fill(store, steps)
        store.close()
        connect = plain_connect(url)
        poll_sql, reread_sql = SQL[backend]

        def read(sql: str) -> pd.DataFrame:
            conn = connect()
            try:
                with warnings.catch_warnings():  # pandas prefers SQLAlchemy; the seed did not
                    warnings.simplefilter("ignore", UserWarning)
                    return pd.read_sql(sql, conn, params=(run_id,))
            finally:
                conn.close()

        poll = timed(lambda: read(poll_sql), repeats)
        rows = len(read(reread_sql))
        reread = timed(lambda: read(reread_sql), max(5, repeats // 10))
    return poll, reread, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50_000)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--backends", default="sqlite,postgresql")
    args = p.parse_args(argv)
    results = {b: measure(b, args.steps, args.repeats) for b in args.backends.split(",")}
    print(f"\nthe seed's design on a run of {args.steps:,} logged steps (medians)")
    print(f"{'back end':<11} {'per-step poll ms':>17} {'full reread per refresh ms':>27}")
    for backend, (poll, reread, rows) in results.items():
        print(f"{backend:<11} {poll:>17.2f} {reread:>18.1f} ({rows:,} rows)")
    print(f"reproduce: python -m bench.seed_design --steps {args.steps} --repeats {args.repeats}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
