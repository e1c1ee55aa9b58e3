"""LiveTrainingCallback under Lightning's DDP strategy: two processes (gloo, on CPU) that
train one model, steered from a plain SQL client.

tests/lightning_run.py runs as a user runs a DDP script: Lightning starts the second
process itself. Rank 0 alone owns the run in the database; a change is agreed by both
ranks at a step boundary, so each rank's optimizer holds the new lr from the same
step on (each rank prints what its optimizer holds), both hold a pause at the step it
was acknowledged at, and a stop from SQL ends both processes at the same step.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_lightning import RunSql
from test_livetrain_api import wait_for

ROOT = Path(__file__).resolve().parent.parent
OLD_LR, NEW_LR = 3e-4, 1e-3
REPORTED = re.compile(r"^rank (\d) step (\d+) lr (\S+)$", re.MULTILINE)
FINISHED = re.compile(r"^rank (\d) status=(\w+) steps=(\d+)$", re.MULTILINE)


def reported(log: Path) -> dict[int, list[tuple[int, float]]]:
    """rank -> the (step, lr) lines it printed."""
    out: dict[int, list[tuple[int, float]]] = {0: [], 1: []}
    for rank, step, lr in REPORTED.findall(log.read_text()):
        out[int(rank)].append((int(step), float(lr)))
    return out


def reached(log: Path, step: int) -> bool:
    return all(lines and lines[-1][0] >= step for lines in reported(log).values())


def last_steps(log: Path, seconds: float) -> set[tuple[int, int]]:
    """Every (rank, last step printed) seen over `seconds`: one per rank while paused."""
    seen: set[tuple[int, int]] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen |= {(rank, lines[-1][0]) for rank, lines in reported(log).items() if lines}
        time.sleep(0.05)
    return seen


# SQLite only: two ranks steered at one step on PostgreSQL is test_torchrun's
# test_two_ranks_apply_a_change_at_the_same_step_and_stop_together; the Lightning callback
# is steered on both back ends in test_lightning.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_ddp_fit_takes_an_lr_change_a_pause_and_a_stop_on_both_ranks_at_one_step(
        tmp_path: Path, db_url: str) -> None:
    log = tmp_path / "fit.log"
    with log.open("w") as out:
        fit = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "lightning_run.py"), "--db", db_url,
             "--root", str(tmp_path), "--devices", "2", "--report-every", "1",
             "--log-every", "10", "--sleep", "0.01"],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        client = RunSql(db_url)
        client.find_run(timeout=120)
        wait_for("step 20 on both ranks", lambda: reached(log, 20), timeout=120)
        applied = client.acknowledged(client.update("learning_rate = :lr", lr=NEW_LR))
        wait_for(f"step {applied + 20} on both ranks", lambda: reached(log, applied + 20))
        paused_at = client.acknowledged(client.update("pause_train = TRUE"))
        held = last_steps(log, seconds=2.0)
        client.acknowledged(client.update("pause_train = FALSE"))
        wait_for(f"step {paused_at + 10} on both ranks", lambda: reached(log, paused_at + 10))
        stopped_at = client.stop()
        fit.wait(timeout=120)
    finally:
        if fit.poll() is None:
            fit.kill()
            fit.wait()
    text = log.read_text()
    assert fit.returncode == 0, text[-3000:]
    # Both ranks held still at one step. The script's report runs after livetrain's hook,
    # which holds the pause at the end of step `paused_at` (or, after a step that logs,
    # at the next step's start), so the last step printed is paused_at - 1 or paused_at.
    assert len(held) == 2 and len({step for _, step in held}) == 1, (paused_at, held)
    assert paused_at - 1 <= min(step for _, step in held) <= paused_at, (paused_at, held)
    for rank, lines in reported(log).items():  # each rank's optimizer, step by step
        before = {lr for step, lr in lines if step < applied}
        after = {lr for step, lr in lines if step >= applied}
        assert (before, after) == ({OLD_LR}, {NEW_LR}), (rank, applied, lines)
    assert sorted(FINISHED.findall(text)) == [
        ("0", "stopped", str(stopped_at)), ("1", "stopped", str(stopped_at))], text[-3000:]

    assert client.status() == "stopped"
    config = client.sql.one("SELECT config FROM runs WHERE run_id = :r", r=client.run_id)[0]
    config = json.loads(config) if isinstance(config, str) else config
    assert (config["world_size"], config["strategy"]) == (2, "DDPStrategy")
    assert client.sql.one("SELECT COUNT(*) FROM runs")[0] == 1  # rank 1 made none of its own
