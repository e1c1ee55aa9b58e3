"""Ingest: how fast the background writer lands rows, and what a log call costs the trainer.

Enqueues N statistics rows (and N/10 layer-histogram rows of 40 bins) from the
calling thread as fast as it can, timing every call, then waits until the writer
has written everything. Prints rows/s sustained (first enqueue -> last row
committed) and the enqueue latency percentiles, per back end.

    python -m bench.ingest [--rows 100000] [--postgres URL] [--sqlite-only]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

from bench import budget
from livetrain.db.contract import Hyperparameters
from livetrain.db.store import Store, now
from livetrain.db.writer import BackgroundWriter

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure(url: str, rows: int) -> dict[str, float]:
    store = Store(url)
    run_id = store.create_run("ingest", "bench", "bench", {}, Hyperparameters("Adam", 3e-4, 0, 50))
    writer = BackgroundWriter(store, run_id)
    edges, counts = [i / 40 for i in range(41)], list(range(40))
    stat_ms, hist_ms = [], []
    started = time.perf_counter()
    for step in range(1, rows + 1):
        row = {"step": step, "epoch": 1, "dt": now(), "optimizer": "Adam",
               "learning_rate": 3e-4, "weight_decay": 0.0, "dropout": 50,
               "train_loss": 1.0 / step, "train_accuracy": 50.0, "validate_loss": 1.0,
               "validate_accuracy": 50.0}
        t0 = time.perf_counter()
        writer.statistics(row)
        stat_ms.append((time.perf_counter() - t0) * 1000)
        if step % 10 == 0:
            hist = [{"step": step, "layer_name": "features.0", "kind": "weight",
                     "bin_edges": edges, "counts": counts}]
            t0 = time.perf_counter()
            writer.rows("layer_histograms", hist)
            hist_ms.append((time.perf_counter() - t0) * 1000)
    enqueued = time.perf_counter() - started
    if not writer.close():
        raise RuntimeError("the writer could not land every row")
    total = time.perf_counter() - started
    landed = len(store.statistics(run_id))
    store.close()
    if landed != rows:
        raise RuntimeError(f"{landed} of {rows} rows landed")
    return {
        "stat_rows_s": rows / total, "hist_rows_s": (rows // 10) / total,
        "enqueue_s": enqueued, "p50": percentile(stat_ms, 50), "p99": percentile(stat_ms, 99),
        "hist_p99": percentile(hist_ms, 99),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--postgres", default=DEFAULT_POSTGRES, help="server to create a database on")
    p.add_argument("--sqlite-only", action="store_true")
    args = p.parse_args(argv)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = measure(f"sqlite:///{Path(tmp) / 'ingest.db'}", args.rows)
    if not args.sqlite_only:
        name = f"clt_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(args.postgres, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        try:
            results["postgresql"] = measure(args.postgres.rsplit("/", 1)[0] + f"/{name}",
                                            args.rows)
        finally:
            with psycopg.connect(args.postgres, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    print(f"\ningest: {args.rows:,} statistics rows + {args.rows // 10:,} histogram rows "
          "through the background writer")
    print(f"{'back end':<11} {'stats rows/s':>13} {'hist rows/s':>12} "
          f"{'log call p50 / p99 ms':>22} {'hist call p99 ms':>17}")
    for backend, r in results.items():
        print(f"{backend:<11} {r['stat_rows_s']:>13,.0f} {r['hist_rows_s']:>12,.0f} "
              f"{r['p50']:>10.4f} / {r['p99']:<9.4f} {r['hist_p99']:>17.4f}")
    print(f"reproduce: python -m bench.ingest --rows {args.rows}")
    if "postgresql" not in results:
        return 0
    pg = results["postgresql"]
    return budget.report([
        budget.Verdict("ingest postgresql statistics rows/s", pg["stat_rows_s"],
                       budget.INGEST_STATS_ROWS_S, "rows/s", at_least=True),
        budget.Verdict("ingest postgresql histogram rows/s", pg["hist_rows_s"],
                       budget.INGEST_HIST_ROWS_S, "rows/s", at_least=True),
        *(budget.Verdict(f"log call on the training thread p99 ({backend})", r["p99"],
                         budget.LOG_CALL_P99_MS, "ms") for backend, r in results.items()),
    ])


if __name__ == "__main__":
    raise SystemExit(main())
