"""`make soak`: a long run with the board watching it, then the health of both.

train.py (tiny CNN on digits, defaults otherwise) runs for --minutes while
board.py serves a page that refreshes every second, as an open browser tab does
(every callback the 1 s interval fires, posted to the Dash endpoint). At the end
the run is stopped by SQL and these are checked:
  - trainer and board RSS at the end within 5 % of their RSS after the first minute;
  - no error events in the run;
  - no lost rows: every logged step is in `statistics` with its per-layer rows, and
    the writer dropped nothing.

    python -m bench.soak [--minutes 20] [--db URL]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import psutil

from bench import budget
from bench.board_refresh import DashPage, board
from livetrain.db.store import Store

ROOT = Path(__file__).resolve().parent.parent
LOG_EVERY = 50  # train.py's default
WARM_UP_SECONDS = 60


def lost_steps(store: Store, run_id: int) -> list[tuple[int, int]]:
    """Gaps between consecutive logged steps longer than a log interval."""
    steps = [row["step"] for row in store.statistics(run_id)]
    return [(a, b) for a, b in pairwise(steps) if b - a > LOG_EVERY]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=20)
    p.add_argument("--db", default=None, help="default: a fresh SQLite file")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        url = args.db or f"sqlite:///{tmp}/soak.db"
        store = Store(url)
        log = (Path(tmp) / "train.log").open("w+")
        trainer = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), "--db", url, "--model", "tinycnn",
             "--dataset", "digits", "--epochs", "1000000", "--no-progress",
             "--checkpoint-dir", str(Path(tmp) / "checkpoints")],
            cwd=tmp, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            while not store.list_runs(1):
                time.sleep(0.5)
            run_id = store.list_runs(1)[0]["run_id"]
            with board(url) as (port, board_pid):
                processes = {"trainer": psutil.Process(trainer.pid),
                             "board": psutil.Process(board_pid)}
                page = DashPage(port, run_id)
                page.fire_all(("run-select", "value"))
                rss: dict[str, list[tuple[float, float]]] = {name: [] for name in processes}
                started = time.monotonic()
                refreshes = 0
                while (elapsed := time.monotonic() - started) < 60 * args.minutes:
                    if trainer.poll() is not None:
                        raise RuntimeError(f"train.py exited with {trainer.returncode}")
                    refreshes += 1
                    page.props[("refresh-interval", "n_intervals")] = refreshes
                    page.fire_all(("refresh-interval", "n_intervals"))
                    if refreshes % 10 == 0:
                        for name, process in processes.items():
                            rss[name].append((elapsed, process.memory_info().rss / 2**20))
                    time.sleep(max(0.0, started + refreshes - time.monotonic()))
            store.request_stop(run_id)
            code = trainer.wait(timeout=120)
        finally:
            if trainer.poll() is None:
                trainer.kill()
        log.seek(0)
        output = log.read()
        log.close()

        steps = store.last_logged_step(run_id)
        errors = [e for e in store.events(run_id) if e["level"] == "error"]
        gaps = lost_steps(store, run_id)
        store.close()

    print(f"\nsoak: {args.minutes:g} min, train.py (tinycnn, digits) to step {steps:,}, "
          f"the board refreshed {refreshes:,} times; train.py exited with {code}")
    verdicts = []
    warm_up = min(WARM_UP_SECONDS, 15 * args.minutes)  # a short try-out gets a quarter
    for name, series in rss.items():
        base = next(r for t, r in series if t >= warm_up)
        end = series[-1][1]
        print(f"{name:<8} RSS after {warm_up:g} s {base:.1f} MB, at the end {end:.1f} MB, "
              f"peak {max(r for _, r in series):.1f} MB")
        verdicts.append(budget.Verdict(f"soak {name} RSS change", 100 * abs(end - base) / base,
                                       100 * budget.RSS_DRIFT, "%"))
    for event in errors:
        print(f"error event at step {event['step']}: {event['message']}")
    verdicts += [
        budget.Verdict("soak error events", len(errors), 0),
        budget.Verdict("soak logged steps missing", len(gaps), 0),
        budget.Verdict("soak rows the writer dropped or could not write",
                       int("could not be written" in output or "dropped" in output), 0),
        budget.Verdict("soak train.py exit code", code, 0),
    ]
    print(f"reproduce: python -m bench.soak --minutes {args.minutes:g}")
    return budget.report(verdicts)


if __name__ == "__main__":
    raise SystemExit(main())
