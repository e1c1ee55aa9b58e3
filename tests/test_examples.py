"""The examples as a user runs them: real subprocesses, from a directory that is not the
repository, against SQLite and PostgreSQL; each run must end `finished` with its rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_livetrain_api import SqlClient

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ("plain_pytorch.py", "custom_cnn.py", "lightning_mnist.py")
# Default name and steps: epochs x batches (1437 training digits / 32 = 45 batches;
# 4000 training images of the MNIST sample / 64 = 63 batches).
DEFAULT_RUNS = {"plain_pytorch.py": ("digits-mlp", 5 * 45),
                "custom_cnn.py": ("mnist-small-cnn", 2 * 63),
                "lightning_mnist.py": ("mnist-lightning-cnn", 2 * 63)}


def run_example(example: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / example), *args],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def check_finished_run(url: str, name: str, last_step: int) -> None:
    """One finished run of that name: rows with training and validation values, up to
    the last step."""
    sql = SqlClient(url)
    run_id, status = sql.one("SELECT run_id, status FROM runs WHERE name = :n", n=name)
    assert status == "finished"
    rows = sql.rows("SELECT step, train_loss, train_accuracy, validate_loss, validate_accuracy "
                    "FROM statistics WHERE run_id = :r ORDER BY step", r=run_id)
    assert len(rows) >= 3 and rows[-1][0] == last_step
    assert all(loss is not None and 0 <= acc <= 100 for step, loss, acc, _, _ in rows if step)
    assert any(v_loss is not None and 0 <= v_acc <= 100 for *_, v_loss, v_acc in rows)
    sql.close()


# PostgreSQL only: every example also runs to its end on SQLite in
# test_example_defaults_finish below (the same code path, the default --db).
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("example", EXAMPLES)
def test_example_with_max_steps(tmp_path: Path, db_url: str, example: str) -> None:
    name = f"test-{Path(example).stem}"
    result = run_example(example, tmp_path, "--db", db_url, "--name", name,
                         "--max-steps", "30", "--log-every", "10")
    assert "finished after 30 steps" in result.stdout
    check_finished_run(db_url, name, last_step=30)
    sql = SqlClient(db_url)
    config = sql.one("SELECT config FROM runs WHERE name = :n", n=name)[0]
    config = json.loads(config) if isinstance(config, str) else config  # SQLite: JSON text
    assert (config["name"], config["max_steps"], config["log_every"]) == (name, 30, 10)
    sql.close()


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_defaults_finish(tmp_path: Path, example: str) -> None:
    """No option at all: the SQLite file in the working directory, the default epochs
    (short enough to watch: 10-20 s each on an idle 2-core machine)."""
    result = run_example(example, tmp_path)
    assert (tmp_path / "training.db").exists()
    name, steps = DEFAULT_RUNS[example]
    assert f"finished after {steps} steps" in result.stdout
    check_finished_run(f"sqlite:///{tmp_path / 'training.db'}", name, last_step=steps)


def test_hf_example_trains_a_tiny_bert(tmp_path: Path) -> None:
    """The transformers example: a real Trainer with the callback, a few logs and two
    evaluations, on SQLite; every row has a training loss, the evaluations are there."""
    db = f"sqlite:///{tmp_path / 'hf.db'}"
    result = run_example("hf_text_classification.py", tmp_path, "--db", db,
                         "--name", "hf-test", "--max-steps", "40", "--log-every", "10")
    assert "finished after 40 steps" in result.stdout
    sql = SqlClient(db)
    run_id, status = sql.one("SELECT run_id, status FROM runs WHERE name = 'hf-test'")
    assert status == "finished"
    rows = sql.rows("SELECT step, train_loss, validate_loss, validate_accuracy FROM statistics "
                    "WHERE run_id = :r ORDER BY step", r=run_id)
    assert [row[0] for row in rows] == [10, 20, 30, 40]
    assert all(loss is not None and loss > 0 for _, loss, _, _ in rows)
    validated = [(step, acc) for step, _, v_loss, acc in rows if v_loss is not None]
    assert [step for step, _ in validated] == [20, 40]
    assert all(0 <= acc <= 100 for _, acc in validated)
    assert sql.one("SELECT count(*) FROM layer_statistics WHERE run_id = :r AND layer_name "
                   "LIKE '%attention.self.query%'", r=run_id)[0] > 0
    sql.close()
