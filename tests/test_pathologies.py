"""Each diagnostic, demonstrated: train a tiny model into the pathology and find the event.

Real train.py subprocesses on the small offline datasets; the configurations are
the README's "break it on purpose" recipes. A healthy default run raises nothing.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ["--dataset", "digits", "--log-every", "5"]

# Budgets: per-layer rules on activations and dead units wait for step 50
# (diagnostics.WARMUP_STEPS) and then for 3 logs; a plateau needs 20 logs (FLAT_LOGS);
# overfitting 12 logs above the best block of up to 24 (OVERFIT_*).
#
# Recipes that differ only in how long they train share one run (a train.py start costs
# more than the steps): each code is looked for in the run of its recipe and must be
# raised by its own budget, the step its recipe alone once stopped at. The run's first
# steps are the same whatever --max-steps is (same seed, no schedule).
CASES = {  # code: (recipe, budget)
    "initial_loss": ("init_high", 5),
    "update_ratio_high": ("lr_high", 40),
    "dead_relu": ("lr_high", 70),
    "update_ratio_low": ("lr_low", 40),
    "loss_flat": ("lr_low", 130),
    "activation_std_low": ("init_low", 70),
    "activation_std_high": ("init_high", 70),
    "overfitting": ("overfit", 150),
}
RECIPES = {
    "init_high": [*DIGITS, "--optimizer", "SGD", "--lr", "1e-5", "--init", "normal:1"],
    "lr_high": [*DIGITS, "--lr", "0.05"],
    "lr_low": [*DIGITS, "--optimizer", "SGD", "--lr", "1e-5"],
    "init_low": [*DIGITS, "--optimizer", "SGD", "--lr", "1e-5", "--init", "normal:0.001"],
    "overfit": [*DIGITS, "--overfit-batches", "1", "--dropout", "0", "--lr", "1e-2",
                "--epochs", "1000"],
}


def train(tmp_path: Path, *args: str) -> sqlite3.Connection:
    db = tmp_path / "run.db"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--db", f"sqlite:///{db}", "--no-progress",
         "--checkpoint-dir", str(tmp_path / "checkpoints"), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return sqlite3.connect(db)


def findings(conn: sqlite3.Connection) -> dict[str, tuple]:
    rows = conn.execute(
        "SELECT code, level, step, layer_name, message, recommendation, fix FROM events "
        "WHERE level IN ('warning', 'error') ORDER BY event_id"
    ).fetchall()
    first: dict[str, tuple] = {}
    for row in rows:
        first.setdefault(row[0], row[1:])
    return first


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_pathology_is_found(tmp_path: Path, recipe: str) -> None:
    codes = {code: budget for code, (r, budget) in CASES.items() if r == recipe}
    conn = train(tmp_path, *RECIPES[recipe], "--max-steps", str(max(codes.values())))
    found = findings(conn)
    for code, budget in codes.items():
        assert code in found, f"{code} not raised; got {sorted(found)}"
        level, step, layer, message, recommendation, _fix = found[code]
        assert level == "warning" and message and recommendation
        assert step <= budget, f"{code} raised at step {step}, past its budget {budget}"
        if code.startswith(("update_ratio", "activation_std", "dead_relu", "exploding")):
            assert layer and layer in message  # names the layer


def test_loss_rising_and_exploding_gradients_after_a_bad_change_from_sql(tmp_path: Path) -> None:
    """Steered into it the way a user would: lr 1.0 with plain SGD mid-run. (Started that
    way, a run blows up within its first 5 steps, before any log could be a baseline.)"""
    db = tmp_path / "run.db"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "--db", f"sqlite:///{db}", "--no-progress",
         "--checkpoint-dir", str(tmp_path / "checkpoints"), *DIGITS, "--max-steps", "120"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        conn = None
        while time.monotonic() < deadline:
            try:
                conn = conn or sqlite3.connect(db, timeout=10, isolation_level=None)
                if (conn.execute("SELECT max(step) FROM statistics").fetchone()[0] or 0) >= 40:
                    break
            except sqlite3.OperationalError:
                pass
            time.sleep(0.05)
        conn.execute("UPDATE parameters SET optimizer = 'SGD', learning_rate = 1.0 "
                     "WHERE run_id = 1")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if conn.execute("SELECT count(DISTINCT code) FROM events WHERE code IN "
                            "('loss_rising', 'exploding_gradients')").fetchone()[0] == 2:
                break
            time.sleep(0.1)
        # The blow-up may also go non-finite and pause the run: a stop ends it either way.
        conn.execute("UPDATE parameters SET stop_train = TRUE WHERE run_id = 1")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    found = findings(conn)
    assert "loss_rising" in found, sorted(found)
    _level, step, _layer, _message, recommendation, fix = found["loss_rising"]
    applied = conn.execute(
        "SELECT applied_step FROM parameter_changes WHERE learning_rate = 1.0"
    ).fetchone()[0]
    assert step > applied and "learning rate" in recommendation and "learning_rate" in fix
    assert "exploding_gradients" in found, sorted(found)
    _level, step, layer, message, _recommendation, _fix = found["exploding_gradients"]
    assert step > applied and layer and layer in message


def test_a_healthy_default_run_raises_nothing(tmp_path: Path) -> None:
    conn = train(tmp_path, "--epochs", "3")  # the defaults: small CNN, mnist5k, Adam 3e-4
    assert findings(conn) == {}
    logged = conn.execute("SELECT count(*) FROM statistics").fetchone()[0]
    assert logged >= 7  # step 0, every 50 steps and each epoch end: the rules had data


def test_overfit_batches_reaches_full_training_accuracy(tmp_path: Path) -> None:
    """seed 003's first sanity check: a model that cannot memorise one batch is broken."""
    conn = train(tmp_path, "--overfit-batches", "1", "--dropout", "0", "--lr", "3e-3",
                 "--epochs", "1000", "--max-steps", "60", "--log-every", "10")
    (accuracy,) = conn.execute(
        "SELECT train_accuracy FROM statistics ORDER BY step DESC"
    ).fetchone()
    assert accuracy == 100.0


def test_early_stopping_finishes_when_validation_stops_improving(tmp_path: Path) -> None:
    conn = train(tmp_path, "--overfit-batches", "1", "--dropout", "0", "--lr", "3e-3",
                 "--epochs", "1000", "--max-steps", "400", "--log-every", "5",
                 "--early-stopping", "3")
    (status,) = conn.execute("SELECT status FROM runs").fetchone()
    (last,) = conn.execute("SELECT max(step) FROM statistics").fetchone()
    (message,) = conn.execute("SELECT message FROM events WHERE code = 'early_stopped'").fetchone()
    assert status == "finished" and last < 400 and "not improved" in message


def test_a_condition_held_for_100_logs_is_one_alert(tmp_path: Path) -> None:
    """One alert per problem: an lr far too low holds update_ratio_low at every log of a
    long run, which gives one `alerts` row and one `events` row per layer, not one a log."""
    conn = train(tmp_path, "--dataset", "digits", "--log-every", "2", "--optimizer", "SGD",
                 "--lr", "1e-5", "--max-steps", "230")
    rows = conn.execute(
        "SELECT layer_name, status, first_step, last_step, logs FROM alerts "
        "WHERE code = 'update_ratio_low'").fetchall()
    held = [r for r in rows if r[4] >= 100]
    assert held, rows
    for layer, status, _first, last, logs in held:
        assert status == "open" and last == 230 and logs >= 100
        (events,) = conn.execute("SELECT count(*) FROM events WHERE code = 'update_ratio_low' "
                                 "AND layer_name = ?", (layer,)).fetchone()
        episodes = sum(1 for r in rows if r[0] == layer)
        assert events == episodes, (layer, events, rows)  # an event opens an episode
    (statistics,) = conn.execute("SELECT count(*) FROM statistics").fetchone()
    assert statistics > 100
