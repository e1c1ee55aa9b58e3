"""Control latency: a parameter write by a third-party SQL client -> the trainer applies it.

Starts train.py as a subprocess on each back end, writes N learning-rate changes
with plain SQL (psycopg / sqlite3, not this project's code), and for each one
measures
  * submit -> dt_applied: the trainer's own timestamp of the step boundary where
    the new values took effect (dt_updated is stamped by the database trigger);
  * submit -> ack seen: when the client, polling every 5 ms, sees applied_version.
Prints p50/p95 next to the trainer's median step time. On PostgreSQL it measures
again with the run trained by `--nproc` torchrun ranks (DDP over gloo), where a
change must also travel from rank 0 to every rank before it applies.

    python -m bench.control_latency [--changes 30] [--postgres URL] [--sqlite-only] [--nproc 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg

from bench import budget

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Client:
    """A plain-driver SQL client; `?` placeholders on both back ends."""

    def __init__(self, kind: str, target: str) -> None:
        self.kind = kind
        if kind == "sqlite":
            self.conn: Any = sqlite3.connect(target, timeout=10, isolation_level=None)
        else:
            self.conn = psycopg.connect(target, autocommit=True)

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        if self.kind == "postgresql":
            sql = sql.replace("?", "%s")
        cursor = self.conn.execute(sql, params)
        return list(cursor.fetchall()) if cursor.description else []


def wait(client: Client, sql: str, params: tuple, timeout: float = 60) -> tuple:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            rows = client.rows(sql, params)
        except (sqlite3.OperationalError, psycopg.errors.UndefinedTable):
            rows = []
        if rows and rows[0][0] is not None:
            return rows[0]
        time.sleep(0.005)
    raise TimeoutError(sql)


def measure(
    kind: str, url: str, client_target: str, changes: int, workdir: Path, nproc: int = 1
) -> dict:
    launcher = [sys.executable]
    if nproc > 1:  # one thread per rank, as torchrun itself sets
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.Popen(
        [*launcher, str(ROOT / "train.py"), "--db", url, "--epochs", "1000",
         "--no-progress", "--checkpoint-dir", str(workdir / "checkpoints")],
        cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"} if nproc > 1 else None,
        start_new_session=True,
    )
    try:
        client = Client(kind, client_target)
        (run_id,) = wait(client, "SELECT max(run_id) FROM runs", ())
        wait(client, "SELECT count(*) FROM statistics WHERE run_id = ? HAVING count(*) >= 2",
             (run_id,))
        applied_ms, seen_ms = [], []
        for i in range(changes):
            lr = 1e-4 * (1 + i % 7)
            t0 = time.perf_counter()
            (version,) = client.rows(
                "UPDATE parameters SET learning_rate = ?, version = version + 1 "
                "WHERE run_id = ? RETURNING version", (lr, run_id))[0]
            wait(client, "SELECT applied_step FROM parameters WHERE run_id = ? "
                 "AND applied_version >= ?", (run_id, version))
            seen_ms.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.3)  # let the background writer land dt_applied before reading it
            submitted, applied = client.rows(
                "SELECT dt_updated, dt_applied FROM parameter_changes "
                "WHERE run_id = ? AND version = ?", (run_id, version))[0]
            if kind == "sqlite":  # stored as UTC text
                submitted, applied = map(datetime.fromisoformat, (submitted, applied))
            applied_ms.append((applied - submitted).total_seconds() * 1000)
            time.sleep(0.2)
        stats = client.rows("SELECT step, dt FROM statistics WHERE run_id = ? ORDER BY step",
                            (run_id,))
        client.rows("UPDATE parameters SET stop_train = TRUE WHERE run_id = ?", (run_id,))
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:  # torchrun starts each rank in a session of its own
            ranks = psutil.Process(proc.pid).children(recursive=True)
            os.killpg(proc.pid, signal.SIGKILL)
            for rank in ranks:
                with contextlib.suppress(psutil.NoSuchProcess):
                    rank.kill()
    step_ms = median_step_ms(kind, stats)
    label = f"{kind}, torchrun x{nproc}" if nproc > 1 else kind
    return {"backend": label, "kind": kind, "changes": changes, "step_ms": step_ms,
            "applied": applied_ms, "seen": seen_ms}


def median_step_ms(kind: str, stats: list[tuple]) -> float:
    times = [datetime.fromisoformat(dt) if kind == "sqlite" else dt for _, dt in stats]
    per_step = [
        (t1 - t0).total_seconds() * 1000 / (s1 - s0)
        for (s0, _), (s1, _), t0, t1 in zip(stats, stats[1:], times, times[1:], strict=False)
        if s1 > s0
    ]
    return statistics.median(per_step)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--changes", type=int, default=30)
    p.add_argument("--postgres", default=DEFAULT_POSTGRES, help="server to create a database on")
    p.add_argument("--sqlite-only", action="store_true")
    p.add_argument("--nproc", type=int, default=2,
                   help="torchrun ranks for the distributed measurement (1: skip it)")
    args = p.parse_args(argv)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        db = workdir / "bench.db"
        results.append(measure("sqlite", f"sqlite:///{db}", str(db), args.changes, workdir))
        for nproc in sorted({1, args.nproc}) if not args.sqlite_only else ():
            name = f"clt_bench_{uuid.uuid4().hex[:8]}"  # a fresh database: run 1 is this one
            with psycopg.connect(args.postgres, autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{name}"')
            target = args.postgres.rsplit("/", 1)[0] + f"/{name}"
            try:
                results.append(measure("postgresql", target, target, args.changes, workdir,
                                       nproc=nproc))
            finally:
                with psycopg.connect(args.postgres, autocommit=True) as admin:
                    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    print(f"\ncontrol latency: {args.changes} lr changes written by plain SQL to a running "
          "train.py (smallcnn, mnist5k, CPU)")
    print(f"{'back end':<22} {'step ms':>8} {'submit->dt_applied p50/p95 ms':>31} "
          f"{'submit->ack seen p50/p95 ms':>29}")
    for r in results:
        a, s = r["applied"], r["seen"]
        print(f"{r['backend']:<22} {r['step_ms']:>8.1f} "
              f"{percentile(a, 50):>15.1f} / {percentile(a, 95):<13.1f} "
              f"{percentile(s, 50):>13.1f} / {percentile(s, 95):<13.1f}")
    print(f"reproduce: python -m bench.control_latency --changes {args.changes}")
    verdicts = []
    for r in results:
        limit = r["step_ms"] + budget.CONTROL_SLACK_MS[r["kind"]]
        for key, what in (("applied", "submit->dt_applied"), ("seen", "submit->ack seen")):
            verdicts.append(budget.Verdict(
                f"control latency {r['backend']} {what} p95 (one step + "
                f"{budget.CONTROL_SLACK_MS[r['kind']]:.0f} ms)",
                percentile(r[key], 95), limit, "ms"))
    return budget.report(verdicts)


if __name__ == "__main__":
    raise SystemExit(main())
