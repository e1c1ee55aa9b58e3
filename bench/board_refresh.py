"""How long the board takes to load a long run and to refresh it, over real HTTP.

    python -m bench.board_refresh                    # 20 runs x 50,000 steps, both back ends
    python -m bench.board_refresh --runs 1 --steps 200000 --backends postgresql

For each back end: a fresh database with `--runs` runs of `--steps` logged statistics
rows each (plus per-layer telemetry, events, parameter changes), board.py started as a
subprocess (waitress), and the requests the browser sends to
/_dash-update-component built from /_dash-dependencies, as dash-renderer does.

- first load: every callback that choosing the run sets off, and those their
  outputs set off in turn (the curves callback reads and downsamples the whole run);
- steady refresh: one new logged step (statistics and activations), then every
  callback the 1 s interval sets off -- the change tokens (dashboard.callbacks_changes),
  then the panels they wake -- with the page state carried over from the previous
  responses, each wave sent at once over six connections as dash-renderer does; its
  latency is the time until the last answer, its bytes the sum of the answers;
- comparison: the newest `COMPARED` runs chosen in compare-select (every curve of each
  read and downsampled), then a slow tick after one of them logged a new step.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, make_url

from bench import budget
from livetrain.board.downsample import MAX_POINTS
from livetrain.db.contract import DEFAULTS, Hyperparameters
from livetrain.db.store import Batch, Store, now, resolve_url

ROOT = Path(__file__).resolve().parent.parent

PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
LOG_EVERY = 10
LAYERS = 8
RUNS = 20
# Per-layer telemetry on every 50th logged step: 1,000 steps of 8 layers per run, 64,000
# telemetry rows. A trainer writes it on every log; a fiftieth as many keeps seeding the
# 20-run database to a few minutes, and the board reads these tables by index either way.
TELEMETRY_EVERY = 50
COMPARED = 3  # runs overlaid in the comparison benchmark
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
        # the spreads train.py logs (issue 13), which the loss chart draws as noise bands
        "train_loss_count": LOG_EVERY, "train_loss_std": 0.2 * loss,
        "validate_loss_count": 4, "validate_loss_std": 0.3 * loss,
    }


def fill(store: Store, steps: int, telemetry_every: int = TELEMETRY_EVERY) -> tuple[int, int]:
    """One run with `steps` logged rows, and per-layer telemetry on every
    `telemetry_every`-th of them; returns (run_id, last step)."""
    run_id = store.create_run("bench", "smallcnn", "mnist5k", {"device": "cpu"},
                              Hyperparameters(**DEFAULTS))
    start = now() - timedelta(seconds=steps * LOG_EVERY / 100)
    last = steps * LOG_EVERY
    chunk = 5000
    for first in range(0, steps, chunk):
        logged = [(i + 1) * LOG_EVERY for i in range(first, min(steps, first + chunk))]
        batch = Batch(statistics=[stats_row(step, start) for step in logged])
        for step in logged[telemetry_every - 1::telemetry_every]:
            if step == last:
                continue  # the last step's telemetry is written below
            batch.activations += activation_rows(step)
            batch.layer_statistics += layer_statistics_rows(step)
            batch.layer_histograms += layer_histogram_rows(step)
        store.write_batch(run_id, batch)
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
        layer_statistics=layer_statistics_rows(last),
        layer_histograms=layer_histogram_rows(last),
        events=[{"level": "info", "code": "run_started", "message": "bench run", "step": 0,
                 "dt": start, "version": None}],
    ))
    return run_id, last


HISTOGRAM = {
    "bin_edges": [-2 + 4 * b / BINS for b in range(BINS + 1)],
    "counts": [int(1000 * math.exp(-((b - BINS / 2) ** 2) / 50)) for b in range(BINS)],
}


def activation_rows(step: int) -> list[dict[str, Any]]:
    return [
        {"step": step, "layer_name": f"features.{i}", "nn_part": "features",
         "layer_type": "conv" if i < LAYERS - 2 else "fc", "number": i,
         "mean": 0.0, "std": 1.0, **HISTOGRAM}
        for i in range(LAYERS)
    ]


def layer_statistics_rows(step: int) -> list[dict[str, Any]]:
    return [
        {"step": step, "layer_name": f"features.{i}", "act_mean": 0.3, "act_std": 0.5,
         "zero_fraction": 0.4, "dead_fraction": 0.0, "has_nonlinearity": True,
         "grad_norm": 0.1, "update_ratio": 1e-3, "weight_norm": 4.0}
        for i in range(LAYERS)
    ]


def layer_histogram_rows(step: int) -> list[dict[str, Any]]:
    return [{"step": step, "layer_name": f"features.{i}", "kind": kind, **HISTOGRAM}
            for i in range(LAYERS) for kind in ("weight", "update")]


# -- a client that speaks dash-renderer's protocol ------------------------------------


class DashPage:
    """The props a page holds, and the callback requests a browser would send."""

    BROWSER_CONNECTIONS = 6  # what a browser opens to one host

    def __init__(self, port: int, run_id: int, *more_ports: int) -> None:
        """With more ports, the requests go to each in turn: boards behind a balancer."""
        self.ports = itertools.cycle((port, *more_ports))
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None
        self.callbacks = self.get_json("/_dash-dependencies")
        self.props: dict[Prop, Any] = {
            ("refresh-interval", "n_intervals"): 0, ("run-select", "value"): run_id,
            ("run-select", "options"): [], ("smoothing-slider", "value"): 0.6,
            ("log-y", "value"): [], ("refresh-select", "value"): 1000,
        }

    @property
    def conn(self) -> http.client.HTTPConnection:
        """This thread's keep-alive connection to the next port in turn."""
        port = next(self.ports)
        if not hasattr(self._local, "conns"):
            self._local.conns = {}
        if port not in self._local.conns:
            self._local.conns[port] = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        return self._local.conns[port]

    def get_json(self, path: str) -> Any:
        conn = self.conn
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())

    def fire(self, callback: dict[str, Any],
             triggers: list[Prop]) -> tuple[float, int, list[Prop]]:
        """POST one callback; returns (seconds, response bytes, the props it changed) and
        keeps its outputs."""
        outputs = []
        for part in callback["output"].strip(".").split("..."):
            component, prop = part.rsplit(".", 1)
            outputs.append({"id": component, "property": prop})
        def values(deps: list[dict[str, str]]) -> list[dict[str, Any]]:
            return [d | {"value": self.props.get((d["id"], d["property"]))} for d in deps]
        body = json.dumps({
            "output": callback["output"], "outputs": outputs if len(outputs) > 1 else outputs[0],
            "inputs": values(callback["inputs"]), "state": values(callback["state"]),
            "changedPropIds": [".".join(t) for t in triggers],
        })
        started = time.perf_counter()
        conn = self.conn
        conn.request("POST", "/_dash-update-component", body,
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = response.read()
        seconds = time.perf_counter() - started
        changed: list[Prop] = []
        if response.status == 200:
            for component, props in json.loads(payload)["response"].items():
                for prop, value in props.items():
                    key = (component, prop.split("@")[0])
                    changed.append(key)
                    if not (isinstance(value, dict) and "__dash_patch_update" in value):
                        self.props[key] = value
        elif response.status != 204:  # 204: nothing to update
            raise RuntimeError(f"{callback['output']}: HTTP {response.status} {payload[:300]!r}")
        return seconds, len(payload), changed

    def fire_all(self, trigger: Prop) -> dict[str, tuple[float, int]]:
        """Every callback the trigger sets off, one after another."""
        return self._cascade(trigger, together=False)[1]

    def fire_together(self, trigger: Prop) -> tuple[float, dict[str, tuple[float, int]]]:
        """Every callback the trigger sets off, as dash-renderer sends them: all that a
        change fires at once over a browser's connections, then those their outputs fire;
        (seconds until the last answer, each callback's seconds and bytes)."""
        return self._cascade(trigger, together=True)

    def _cascade(self, trigger: Prop,
                 together: bool) -> tuple[float, dict[str, tuple[float, int]]]:
        if together and self._pool is None:
            self._pool = ThreadPoolExecutor(self.BROWSER_CONNECTIONS)
        answers: dict[str, tuple[float, int]] = {}
        changed = [trigger]
        started = time.perf_counter()
        while changed:
            # Pattern-matching callbacks (the fields' validation messages, with dict ids)
            # are left out: a refresh does not fire them, only typing or a fields sync.
            wave = [(cb, [(i["id"], i["property"]) for i in cb["inputs"]
                          if (i["id"], i["property"]) in changed])
                    for cb in self.callbacks
                    if cb["output"] not in answers and "{" not in cb["output"]]
            wave = [(cb, triggers) for cb, triggers in wave if triggers]
            results = (self._pool.map(lambda w: self.fire(*w), wave) if together and self._pool
                       else [self.fire(*w) for w in wave])
            changed = []
            for (cb, _), (seconds, size, props) in zip(wave, results, strict=True):
                answers[cb["output"]] = (seconds, size)
                changed += props
        return time.perf_counter() - started, answers


# -- the measurement ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def board(url: str) -> Iterator[tuple[int, int]]:
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
        yield port, proc.pid
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


def points_per_trace(figure: dict[str, Any] | None) -> int:
    return max((len(trace.get("x") or []) for trace in (figure or {}).get("data", [])), default=0)


def bench(backend: str, steps: int, runs: int, loads: int,
          refreshes: int) -> tuple[list[tuple[str, ...]], list[budget.Verdict]]:
    rows: list[tuple[str, ...]] = []
    with database(backend) as url:
        store = Store(url)
        started = time.perf_counter()
        for _ in range(runs):
            run_id, last = fill(store, steps)
        print(f"{backend}: {runs} runs x {steps:,} statistics rows (+ telemetry) written in "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
        with board(url) as (port, _pid):
            first_curves, first_all, points = [], [], 0
            for _ in range(loads):
                page = DashPage(port, run_id)
                wall, first_fired = page.fire_together(("run-select", "value"))
                first_curves.append(next(v for k, v in first_fired.items()
                                         if "loss-graph.figure" in k))
                first_all.append((wall, sum(b for _, b in first_fired.values())))
                points = max(points, points_per_trace(page.props.get(("loss-graph", "figure"))))
            refresh_curves, refresh_runs, refresh_all = [], [], []
            start = now()
            for i in range(refreshes):
                last += LOG_EVERY
                store.write_batch(run_id, Batch(statistics=[stats_row(last, start)],
                                                activations=activation_rows(last),
                                                heartbeat=now()))
                page.props[("refresh-interval", "n_intervals")] = i + 1
                wall, fired = page.fire_together(("refresh-interval", "n_intervals"))
                refresh_curves.append(next(v for k, v in fired.items() if "loss-graph" in k))
                refresh_runs.append(next(v for k, v in fired.items()
                                         if "run-select.options" in k))
                refresh_all.append((wall, sum(b for _, b in fired.values())))
            count = len(fired)  # what one refresh set off, the token-driven ones included
            first_count = len(first_fired)
            compared = list(range(run_id, run_id - min(COMPARED, runs), -1))
            compare_builds, compare_refreshes = [], []
            for _ in range(loads):  # each a new page choosing the runs to compare
                page = DashPage(port, run_id)
                page.props[("compare-select", "value")] = compared
                wall, fired = page.fire_together(("compare-select", "value"))
                compare_builds.append((wall, sum(b for _, b in fired.values())))
            for i in range(refreshes):  # the slow tick the browser lets through (a live run)
                last += LOG_EVERY
                store.write_batch(run_id, Batch(statistics=[stats_row(last, start)],
                                                heartbeat=now()))
                page.props[("compare-tick", "data")] = i + 1
                wall, fired = page.fire_together(("compare-tick", "data"))
                compare_refreshes.append((wall, sum(b for _, b in fired.values())))
        store.close()
    for label, samples in (
        ("first load: curves callback", first_curves),
        (f"first load: all {first_count} callbacks", first_all),
        ("refresh: curves callback (1 new row)", refresh_curves),
        (f"refresh: run list ({runs} runs)", refresh_runs),
        (f"refresh: all {count} callbacks", refresh_all),
        (f"compare {len(compared)} runs: build", compare_builds),
        (f"compare {len(compared)} runs: refresh (1 new row)", compare_refreshes),
    ):
        p50, p95, size = summarize(samples)
        rows.append((backend, label, f"{len(samples)}", f"{p50:.1f}", f"{p95:.1f}", f"{size:,}"))
    _, first_p95, _ = summarize(first_all)
    _, refresh_p95, _ = summarize(refresh_all)
    _, build_p95, _ = summarize(compare_builds)
    _, compare_p95, _ = summarize(compare_refreshes)
    verdicts = [
        budget.Verdict(f"board {backend} refresh p95, all {count} callbacks", refresh_p95,
                       budget.REFRESH_P95_MS, "ms"),
        budget.Verdict(f"board {backend} refresh bytes (largest)",
                       max(b for _, b in refresh_all), budget.REFRESH_BYTES, "B"),
        budget.Verdict(f"board {backend} first load of a {steps:,}-step run, p95",
                       first_p95, budget.FIRST_LOAD_MS, "ms"),
        budget.Verdict(f"board {backend} first load bytes (largest)",
                       max(b for _, b in first_all), budget.FIRST_LOAD_BYTES, "B"),
        budget.Verdict(f"board {backend} points per curve trace", points, MAX_POINTS, "points"),
        budget.Verdict(f"board {backend} comparison of {len(compared)} runs x {steps:,} steps, "
                       "build p95", build_p95, budget.FIRST_LOAD_MS, "ms"),
        budget.Verdict(f"board {backend} comparison refresh p95", compare_p95,
                       budget.REFRESH_P95_MS, "ms"),
    ]
    return rows, verdicts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50_000, help="logged statistics rows per run")
    p.add_argument("--runs", type=int, default=RUNS)
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--loads", type=int, default=5, help="first loads to time")
    p.add_argument("--refreshes", type=int, default=40, help="steady refreshes to time")
    args = p.parse_args(argv)
    table = [("backend", "request", "n", "p50 ms", "p95 ms", "bytes")]
    verdicts: list[budget.Verdict] = []
    for backend in args.backends.split(","):
        rows, checked = bench(backend, args.steps, args.runs, args.loads, args.refreshes)
        table += rows
        verdicts += checked
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for n, row in enumerate(table):
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\nreproduce: python -m bench.board_refresh --runs {args.runs} --steps {args.steps} "
          f"--backends {args.backends} --loads {args.loads} --refreshes {args.refreshes}")
    return budget.report(verdicts)


if __name__ == "__main__":
    sys.exit(main())
