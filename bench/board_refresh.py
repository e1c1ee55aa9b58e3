"""How long the board takes to load a long run and to refresh it, over real HTTP.

    .venv/bin/python bench/board_refresh.py                      # 50,000 steps, both back ends
    .venv/bin/python bench/board_refresh.py --steps 200000 --backends postgresql

For each back end: a fresh database with one run of `--steps` logged statistics
rows (plus activations, events, parameter changes), board.py started as a
subprocess (waitress), and the requests the browser sends to
/_dash-update-component built from /_dash-dependencies, as dash-renderer does.

- first load: every callback that fires when the run is selected, from an empty
  page (the curves callback reads and downsamples the whole run);
- steady refresh: one new statistics row, then every callback the 1 s interval
  fires, with the page state carried over from the previous responses.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, make_url  # noqa: E402

from db.store import Batch, Store, now, resolve_url  # noqa: E402
from hyperparams import DEFAULTS, Hyperparameters  # noqa: E402

PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
LOG_EVERY = 10
LAYERS = 8
BINS = 40
Prop = tuple[str, str]


# -- a database holding one long run ---------------------------------------------


@contextmanager
def database(backend: str) -> Iterator[str]:
    """A fresh, empty database URL; removed afterwards."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="board-bench-") as tmp:
            yield f"sqlite:///{tmp}/training.db"
        return
    admin_url = resolve_url(PG_ADMIN_URL)
    name = f"board_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def stats_row(step: int, start: Any) -> dict[str, Any]:
    loss = 2.0 / math.sqrt(1 + step / 50) + 0.05 * math.sin(step / 37)
    return {
        "step": step, "epoch": 1 + step // 700, "dt": start + timedelta(seconds=step / 100),
        "optimizer": "Adam", "learning_rate": 3e-4, "weight_decay": 0.0, "dropout": 50,
        "train_loss": loss, "train_accuracy": 100 - 30 * loss,
        "validate_loss": loss * 1.05, "validate_accuracy": 99 - 30 * loss,
        "samples_per_second": 6400.0,
    }


def fill(store: Store, steps: int) -> tuple[int, int]:
    """One run with `steps` logged rows; returns (run_id, last step)."""
    run_id = store.create_run("bench", "smallcnn", "mnist5k", {"device": "cpu"},
                              Hyperparameters(**DEFAULTS))
    start = now() - timedelta(seconds=steps * LOG_EVERY / 100)
    chunk = 5000
    for first in range(0, steps, chunk):
        rows = [stats_row((i + 1) * LOG_EVERY, start)
                for i in range(first, min(steps, first + chunk))]
        store.write_batch(run_id, Batch(statistics=rows))
    last = steps * LOG_EVERY
    for version_step in (last // 4, last // 2, 3 * last // 4):
        version = store.submit_parameters(run_id, learning_rate=1e-4 * (1 + version_step % 7))
        p = store.get_parameters(run_id)
        store.write_batch(run_id, Batch(acknowledgements=[{
            "version": version, "optimizer": p.optimizer, "learning_rate": p.learning_rate,
            "weight_decay": p.weight_decay, "dropout": p.dropout, "stop_train": False,
            "dt_updated": p.dt_updated, "applied_step": version_step,
            "dt_applied": p.dt_updated + timedelta(milliseconds=40),
        }]))
    store.write_batch(run_id, Batch(
        activations=activation_rows(last),
        events=[{"level": "info", "code": "run_started", "message": "bench run", "step": 0,
                 "dt": start, "version": None}],
    ))
    return run_id, last


def activation_rows(step: int) -> list[dict[str, Any]]:
    return [
        {"step": step, "layer_name": f"features.{i}", "nn_part": "features",
         "layer_type": "conv" if i < LAYERS - 2 else "fc", "number": i,
         "bin_edges": [-2 + 4 * b / BINS for b in range(BINS + 1)],
         "counts": [int(1000 * math.exp(-((b - BINS / 2) ** 2) / 50)) for b in range(BINS)],
         "mean": 0.0, "std": 1.0}
        for i in range(LAYERS)
    ]


# -- a client that speaks dash-renderer's protocol ------------------------------------


class DashPage:
    """The props a page holds, and the callback requests a browser would send."""

    def __init__(self, port: int, run_id: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.callbacks = self.get_json("/_dash-dependencies")
        self.props: dict[Prop, Any] = {
            ("refresh-interval", "n_intervals"): 0, ("run-select", "value"): run_id,
            ("run-select", "options"): [], ("smoothing-slider", "value"): 0.6,
            ("log-y", "value"): [], ("refresh-select", "value"): 1000,
        }

    def get_json(self, path: str) -> Any:
        self.conn.request("GET", path)
        return json.loads(self.conn.getresponse().read())

    def triggered_by(self, prop: Prop) -> list[dict[str, Any]]:
        return [cb for cb in self.callbacks
                if any((i["id"], i["property"]) == prop for i in cb["inputs"])]

    def fire(self, callback: dict[str, Any], trigger: Prop) -> tuple[float, int]:
        """POST one callback; returns (seconds, response bytes) and keeps its outputs."""
        outputs = []
        for part in callback["output"].strip(".").split("..."):
            component, prop = part.rsplit(".", 1)
            outputs.append({"id": component, "property": prop})
        def values(deps: list[dict[str, str]]) -> list[dict[str, Any]]:
            return [d | {"value": self.props.get((d["id"], d["property"]))} for d in deps]
        body = json.dumps({
            "output": callback["output"], "outputs": outputs if len(outputs) > 1 else outputs[0],
            "inputs": values(callback["inputs"]), "state": values(callback["state"]),
            "changedPropIds": [".".join(trigger)],
        })
        started = time.perf_counter()
        self.conn.request("POST", "/_dash-update-component", body,
                          {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        payload = response.read()
        seconds = time.perf_counter() - started
        if response.status == 200:
            for component, props in json.loads(payload)["response"].items():
                for prop, value in props.items():
                    if not (isinstance(value, dict) and "__dash_patch_update" in value):
                        self.props[(component, prop.split("@")[0])] = value
        elif response.status != 204:  # 204: nothing to update
            raise RuntimeError(f"{callback['output']}: HTTP {response.status} {payload[:300]!r}")
        return seconds, len(payload)

    def fire_all(self, trigger: Prop) -> dict[str, tuple[float, int]]:
        return {cb["output"]: self.fire(cb, trigger) for cb in self.triggered_by(trigger)}


# -- the measurement ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def board(url: str) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "board.py"), "--db", url, "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("board.py did not start") from None
                time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def summarize(samples: list[tuple[float, int]]) -> tuple[float, float, int]:
    """(p50 ms, p95 ms, median bytes)."""
    ms = sorted(s * 1000 for s, _ in samples)
    p95 = ms[min(len(ms) - 1, math.ceil(0.95 * len(ms)) - 1)]
    return statistics.median(ms), p95, int(statistics.median(b for _, b in samples))


def bench(backend: str, steps: int, loads: int, refreshes: int) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    with database(backend) as url:
        store = Store(url)
        started = time.perf_counter()
        run_id, last = fill(store, steps)
        print(f"{backend}: {steps:,} statistics rows written in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
        with board(url) as port:
            first_curves, first_all = [], []
            for _ in range(loads):
                page = DashPage(port, run_id)
                fired = page.fire_all(("run-select", "value"))
                curves = next(v for k, v in fired.items() if "loss-graph.figure" in k)
                first_curves.append(curves)
                first_all.append((sum(s for s, _ in fired.values()),
                                  sum(b for _, b in fired.values())))
            refresh_curves, refresh_all = [], []
            start = now()
            for i in range(refreshes):
                last += LOG_EVERY
                store.write_batch(run_id, Batch(statistics=[stats_row(last, start)],
                                                activations=activation_rows(last),
                                                heartbeat=now()))
                page.props[("refresh-interval", "n_intervals")] = i + 1
                fired = page.fire_all(("refresh-interval", "n_intervals"))
                refresh_curves.append(next(v for k, v in fired.items() if "loss-graph" in k))
                refresh_all.append((sum(s for s, _ in fired.values()),
                                    sum(b for _, b in fired.values())))
            count = len(page.triggered_by(("refresh-interval", "n_intervals")))
            first_count = len(page.triggered_by(("run-select", "value")))
        store.close()
    for label, samples in (
        ("first load: curves callback", first_curves),
        (f"first load: all {first_count} callbacks", first_all),
        ("refresh: curves callback (1 new row)", refresh_curves),
        (f"refresh: all {count} callbacks", refresh_all),
    ):
        p50, p95, size = summarize(samples)
        rows.append((backend, label, f"{len(samples)}", f"{p50:.1f}", f"{p95:.1f}", f"{size:,}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50_000, help="logged statistics rows in the run")
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--loads", type=int, default=5, help="first loads to time")
    p.add_argument("--refreshes", type=int, default=40, help="steady refreshes to time")
    args = p.parse_args(argv)
    table = [("backend", "request", "n", "p50 ms", "p95 ms", "bytes")]
    for backend in args.backends.split(","):
        table += bench(backend, args.steps, args.loads, args.refreshes)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for n, row in enumerate(table):
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\nreproduce: .venv/bin/python bench/board_refresh.py --steps {args.steps} "
          f"--backends {args.backends} --loads {args.loads} --refreshes {args.refreshes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
