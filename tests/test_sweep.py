"""`train.py --sweep`: one ordinary run per combination, in separate processes."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from livetrain.db.store import Store
from livetrain.playground import sweep

ROOT = Path(__file__).resolve().parent.parent


def test_axes_and_combinations() -> None:
    axes = [sweep.parse_axis("lr=0.1,0.001"), sweep.parse_axis("--dropout=0,20")]
    assert axes == [("--lr", ["0.1", "0.001"]), ("--dropout", ["0", "20"])]
    assert sweep.combinations(axes) == [
        ["--lr", "0.1", "--dropout", "0"], ["--lr", "0.1", "--dropout", "20"],
        ["--lr", "0.001", "--dropout", "0"], ["--lr", "0.001", "--dropout", "20"],
    ]
    for bad in ("lr", "lr=", "=1,2", "lr=,"):
        with pytest.raises(argparse.ArgumentTypeError):
            sweep.parse_axis(bad)
    assert sweep.without_sweep(
        ["--sweep", "lr=1,2", "--epochs", "3", "--parallel", "2", "--sweep=wd=0,1"]
    ) == ["--epochs", "3"]


def train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--db", f"sqlite:///{tmp_path / 's.db'}",
         "--model", "tinycnn", "--dataset", "digits", "--max-steps", "6", "--log-every", "3",
         "--val-batches", "1", "--no-progress", "--checkpoint-dir",
         str(tmp_path / "checkpoints"), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_a_sweep_runs_every_combination_as_its_own_run(tmp_path: Path) -> None:
    result = train(tmp_path, "--sweep", "lr=0.1,0.001", "--sweep", "dropout=0,20",
                   "--parallel", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    runs = sorted(store.list_runs(), key=lambda r: r["run_id"])
    assert sorted(r["name"] for r in runs) == sorted(
        f"sweep lr={lr} dropout={d}" for lr in ("0.1", "0.001") for d in ("0", "20"))
    for run in runs:
        _, lr, dropout = run["name"].split(" ")
        params = store.get_parameters(run["run_id"])
        assert params.learning_rate == float(lr.split("=")[1])
        assert params.dropout == int(dropout.split("=")[1])
        assert run["status"] == "finished"
        assert store.last_logged_step(run["run_id"]) == 6
    store.close()


def test_a_bad_value_in_a_sweep_fails_before_any_run(tmp_path: Path) -> None:
    result = train(tmp_path, "--sweep", "lr=0.1,-3")
    assert result.returncode == 2 and "--lr" in result.stderr
    assert not (tmp_path / "s.db").exists()
