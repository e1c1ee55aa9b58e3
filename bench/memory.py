"""Memory over long runs: does the trainer or the board grow as a run goes on?

- trainer: train.py as a subprocess for --steps steps of the tiny CNN on the digits
  dataset, with its defaults (telemetry every 50 steps, checkpoints, listener, writer).
  Its RSS is read from outside (psutil) twice a second, next to the newest logged
  step; the budget compares the RSS at the end with the RSS at step 1,000.
- board: board.py as a subprocess over a 5,000-step run; --refreshes times, one new
  logged step is written and every callback the 1 s interval fires is posted, as
  the browser would. The budget compares the RSS after the last refresh with the
  RSS after the first load and a short warm-up.

    python -m bench.memory [--steps 100000] [--refreshes 3600] [--backend sqlite]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench import budget
from bench.board_refresh import (
    LOG_EVERY,
    DashPage,
    activation_rows,
    board,
    database,
    fill,
    stats_row,
)
from livetrain.db.store import Batch, Store, now

ROOT = Path(__file__).resolve().parent.parent
BASELINE_STEP = 1_000
WARM_UP_REFRESHES = 20


def trainer_rss(url: str, steps: int, workdir: Path) -> list[tuple[int, float]]:
    """(logged step, RSS in MB) pairs, sampled while train.py runs."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "--db", url, "--model", "tinycnn",
         "--dataset", "digits", "--batch-size", "16", "--epochs", "1000000",
         "--max-steps", str(steps), "--no-progress",
         "--checkpoint-dir", str(workdir / "checkpoints")],
        cwd=workdir, env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    process = psutil.Process(proc.pid)
    samples: list[tuple[int, float]] = []
    store = Store(url)
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            runs = store.list_runs(1)
            step = store.last_logged_step(runs[0]["run_id"]) if runs else None
            try:
                if process.status() == psutil.STATUS_ZOMBIE:
                    break  # exited: what it holds now is not its memory
                rss = process.memory_info().rss / 2**20
            except psutil.NoSuchProcess:
                break
            if step is not None:
                samples.append((step, rss))
        if proc.wait() != 0:
            raise RuntimeError(f"train.py exited with {proc.returncode}: {proc.stderr.read()}")
    finally:
        store.close()
        if proc.poll() is None:
            proc.kill()
    return samples


def board_rss(url: str, refreshes: int) -> list[tuple[int, float]]:
    """(refreshes done, board RSS in MB) every 100 refreshes."""
    store = Store(url)
    run_id, last = fill(store, 5_000)
    samples: list[tuple[int, float]] = []
    try:
        with board(url) as (port, pid):
            process = psutil.Process(pid)
            page = DashPage(port, run_id)
            page.fire_all(("run-select", "value"))
            start = now()
            for i in range(1, refreshes + 1):
                last += LOG_EVERY
                store.write_batch(run_id, Batch(statistics=[stats_row(last, start)],
                                                activations=activation_rows(last),
                                                heartbeat=now()))
                page.props[("refresh-interval", "n_intervals")] = i
                page.fire_all(("refresh-interval", "n_intervals"))
                if i in (1, WARM_UP_REFRESHES) or i % 100 == 0 or i == refreshes:
                    samples.append((i, process.memory_info().rss / 2**20))
    finally:
        store.close()
    return samples


def at_or_after(samples: list[tuple[int, float]], point: int) -> tuple[int, float]:
    return next((s for s in samples if s[0] >= point), samples[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--refreshes", type=int, default=3_600)
    p.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp, database(args.backend) as url:
        trainer = trainer_rss(url, args.steps, Path(tmp))
    with database(args.backend) as url:
        boards = board_rss(url, args.refreshes)

    t0, t1 = at_or_after(trainer, BASELINE_STEP), trainer[-1]
    b0, b1 = at_or_after(boards, WARM_UP_REFRESHES), boards[-1]
    peak_trainer = max(rss for _, rss in trainer)
    print(f"\nmemory on {args.backend}: train.py (tinycnn, digits, defaults) for "
          f"{args.steps:,} steps; board.py for {args.refreshes:,} refreshes")
    print(f"{'process':<8} {'baseline':>22} {'end':>24} {'peak MB':>8} {'change':>7}")
    print(f"{'trainer':<8} {f'step {t0[0]:,}: {t0[1]:.1f} MB':>22} "
          f"{f'step {t1[0]:,}: {t1[1]:.1f} MB':>24} {peak_trainer:>8.1f} "
          f"{(t1[1] - t0[1]) / t0[1]:>+7.1%}")
    print(f"{'board':<8} {f'refresh {b0[0]:,}: {b0[1]:.1f} MB':>22} "
          f"{f'refresh {b1[0]:,}: {b1[1]:.1f} MB':>24} {max(r for _, r in boards):>8.1f} "
          f"{(b1[1] - b0[1]) / b0[1]:>+7.1%}")
    print("board RSS every 500 refreshes (MB): "
          + ", ".join(f"{rss:.1f}" for i, rss in boards if i % 500 == 0))
    print(f"reproduce: python -m bench.memory --steps {args.steps} --refreshes {args.refreshes} "
          f"--backend {args.backend}")
    return budget.report([
        budget.Verdict(f"trainer RSS change, step {t0[0]:,} -> {t1[0]:,}",
                       100 * abs(t1[1] - t0[1]) / t0[1], 100 * budget.RSS_DRIFT, "%"),
        budget.Verdict(f"board RSS change over {b1[0] - b0[0]:,} refreshes",
                       100 * abs(b1[1] - b0[1]) / b0[1], 100 * budget.RSS_DRIFT, "%"),
    ])


if __name__ == "__main__":
    raise SystemExit(main())
