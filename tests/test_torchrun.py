"""One run trained by two torchrun processes (DDP over gloo), steered through PostgreSQL.

Rank 0 owns the run in the database; each rank prints the step at which it
applied a parameters version, and its final weight fingerprint. The test steers
with plain SQL, as any client may: an lr change, a pause, a resume, a stop.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from test_train_e2e import ROOT, SqlClient, wait_for

pytestmark = pytest.mark.postgres

APPLIED = re.compile(r"^rank (\d): version (\d+) applied at step (\d+): (.*)$", re.M)
ENDED = re.compile(r"^rank (\d): (stopped|finished) at step (\d+), weights (\S+)$", re.M)


@contextmanager
def torchrun(tmp_path: Path, url: str, *extra: str) -> Iterator[subprocess.Popen]:
    log_path = tmp_path / "torchrun.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node=2", str(ROOT / "train.py"), "--db", url,
             "--dataset", "digits", "--model", "tinycnn", "--epochs", "1000",
             "--log-every", "5", "--val-batches", "1", "--no-progress",
             "--checkpoint-dir", str(tmp_path / "checkpoints"), *extra],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            start_new_session=True,  # so a failed test kills the ranks with their launcher
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                kill_job(proc)
            if proc.returncode != 0:
                print(log_path.read_text()[-4000:])


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and its ranks: torchrun starts each rank in a session of its
    own, so killing the launcher's process group alone leaves them training."""
    ranks = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for rank in ranks:
        with contextlib.suppress(psutil.NoSuchProcess):
            rank.kill()
    proc.wait()
    psutil.wait_procs(ranks, timeout=10)


def applied(log: str, version: int) -> dict[int, int]:
    """{rank: step} for the ranks that reported applying `version`."""
    return {int(r): int(s) for r, v, s, _ in APPLIED.findall(log) if int(v) == version}


def last_step(sql: SqlClient, run_id: int) -> int:
    row = sql.one("SELECT max(step) FROM statistics WHERE run_id = ?", (run_id,))
    return row[0] if row and row[0] is not None else -1


def submit(sql: SqlClient, run_id: int, assignments: str) -> int:
    sql.execute(f"UPDATE parameters SET {assignments}, version = version + 1, "
                "dt_updated = CURRENT_TIMESTAMP WHERE run_id = ?", (run_id,))
    return sql.one("SELECT version FROM parameters WHERE run_id = ?", (run_id,))[0]


def acknowledged(sql: SqlClient, run_id: int, version: int) -> int:
    """The step rank 0 wrote for `version` (once)."""
    return wait_for(
        f"version {version} acknowledged",
        lambda: sql.one("SELECT applied_step FROM parameters WHERE run_id = ? "
                        "AND applied_version = ?", (run_id, version)),
        timeout=60,
    )[0]


def test_two_ranks_apply_a_change_at_the_same_step_and_stop_together(
    tmp_path: Path, postgres_url: str
) -> None:
    log_path = tmp_path / "torchrun.log"
    with torchrun(tmp_path, postgres_url) as proc:
        sql = wait_for("the database", lambda: SqlClient(postgres_url), timeout=60)
        run_id = wait_for("a run", lambda: sql.one("SELECT run_id FROM runs"), timeout=90)[0]
        assert sql.one("SELECT count(*) FROM runs")[0] == 1  # one run, not one per rank
        wait_for("4 logged steps", lambda: last_step(sql, run_id) >= 15, timeout=60)

        # 1. An lr change: both ranks take it at the step rank 0 acknowledged.
        v_lr = submit(sql, run_id, "learning_rate = 0.002")
        step_lr = acknowledged(sql, run_id, v_lr)
        ranks_lr = wait_for("both ranks' reports", lambda: len(
            found := applied(log_path.read_text(), v_lr)) == 2 and found, timeout=30)
        assert ranks_lr == {0: step_lr, 1: step_lr}
        assert sql.one("SELECT count(*) FROM parameter_changes WHERE run_id = ? AND version = ?",
                       (run_id, v_lr))[0] == 1  # the acknowledgement is written once
        wait_for("3 logs after the change", lambda: last_step(sql, run_id) >= step_lr + 15)
        rows = sql.rows("SELECT step, learning_rate FROM statistics WHERE run_id = ? "
                        "ORDER BY step", (run_id,))
        assert {lr for s, lr in rows if s > step_lr} == {0.002}
        assert {lr for s, lr in rows if 0 < s <= step_lr} == {0.0003}

        # 2. Pause: every rank waits (no step is logged), then resumes at one step.
        v_pause = submit(sql, run_id, "pause_train = true")
        step_pause = acknowledged(sql, run_id, v_pause)
        wait_for("status paused", lambda: sql.one(
            "SELECT 1 FROM runs WHERE run_id = ? AND status = 'paused'", (run_id,)))
        held = last_step(sql, run_id)
        time.sleep(1.5)
        assert last_step(sql, run_id) == held <= step_pause
        assert proc.poll() is None  # alive while paused
        v_resume = submit(sql, run_id, "pause_train = false, learning_rate = 0.001")
        step_resume = acknowledged(sql, run_id, v_resume)
        assert step_resume == step_pause  # nothing trained while paused
        wait_for("both ranks resumed", lambda: len(applied(log_path.read_text(), v_resume)) == 2)
        assert applied(log_path.read_text(), v_resume) == {0: step_resume, 1: step_resume}
        wait_for("training to go on", lambda: last_step(sql, run_id) >= step_resume + 10)

        # 3. Roll back to the checkpoint taken just before the lr change: rank 0 reads
        #    it and every rank continues from it (the weight fingerprints below agree).
        wait_for("the checkpoint before the change", lambda: sql.one(
            "SELECT 1 FROM checkpoints WHERE run_id = ? AND step = ?", (run_id, step_lr)))
        v_back = submit(sql, run_id, f"rollback_step = {step_lr}, "
                        "rollback_request = rollback_request + 1")
        assert acknowledged(sql, run_id, v_back) == step_lr
        wait_for("both ranks rolled back", lambda: len(applied(log_path.read_text(), v_back)) == 2)
        assert applied(log_path.read_text(), v_back) == {0: step_lr, 1: step_lr}
        wait_for("training past the rollback", lambda: sql.one(
            "SELECT 1 FROM statistics WHERE run_id = ? AND step > ?", (run_id, step_lr + 10)))

        # 4. Stop: both ranks end at the same step with the same weights, exit code 0.
        v_stop = submit(sql, run_id, "stop_train = true")
        step_stop = acknowledged(sql, run_id, v_stop)
        assert proc.wait(timeout=90) == 0
        log = log_path.read_text()
        ended = {int(r): (status, int(s), w) for r, status, s, w in ENDED.findall(log)}
        assert set(ended) == {0, 1}, log[-3000:]
        assert ended[0] == ended[1]  # same status, step and weight fingerprint
        assert ended[0][:2] == ("stopped", step_stop)
        status, world_size = sql.one(
            "SELECT status, config->>'world_size' FROM runs WHERE run_id = ?", (run_id,))
        assert (status, world_size) == ("stopped", "2")
        sql.close()


RESUMED = re.compile(r"^rank (\d): resumed run (\d+) at step (\d+)$", re.M)


def test_a_resume_refused_on_rank_0_ends_every_rank(tmp_path: Path, postgres_url: str) -> None:
    with torchrun(tmp_path, postgres_url, "--resume", "42") as proc:
        assert proc.wait(timeout=90) != 0  # no rank waits for rank 0's options forever
    log = (tmp_path / "torchrun.log").read_text()
    assert "error: there is no run 42" in log


def test_a_killed_torchrun_job_resumes_the_same_run_on_every_rank(
    tmp_path: Path, postgres_url: str
) -> None:
    log_path = tmp_path / "torchrun.log"
    with torchrun(tmp_path, postgres_url, "--checkpoint-every", "10") as proc:
        sql = wait_for("the database", lambda: SqlClient(postgres_url), timeout=60)
        run_id = wait_for("a run", lambda: sql.one("SELECT run_id FROM runs"), timeout=90)[0]
        v_lr = submit(sql, run_id, "learning_rate = 0.002")
        acknowledged(sql, run_id, v_lr)

        def newest_checkpoint() -> int:
            row = sql.one("SELECT max(step) FROM checkpoints WHERE run_id = ?", (run_id,))
            return row[0] or 0

        wait_for("a checkpoint past step 20", lambda: newest_checkpoint() >= 20, timeout=60)
        wait_for("logs after it", lambda: last_step(sql, run_id) > newest_checkpoint() + 5)
        kill_job(proc)  # the launcher and both ranks, no goodbye
    killed_at, checkpoint_step = last_step(sql, run_id), newest_checkpoint()
    v_dropout = submit(sql, run_id, "dropout = 30")  # while nothing runs
    # A resume is refused while the run's heartbeat is fresh (two jobs, one run).
    wait_for("the run to count as lost", lambda: sql.one(
        "SELECT 1 FROM runs WHERE run_id = ? AND dt_heartbeat < now() - interval '6 seconds'",
        (run_id,)), timeout=15)

    with torchrun(tmp_path, postgres_url, "--resume", str(run_id)) as proc:
        resumed = wait_for("both ranks resumed", lambda: len(
            found := {int(r): (int(run), int(s))
                      for r, run, s in RESUMED.findall(log_path.read_text())}) == 2 and found,
            timeout=90)
        assert resumed == {0: (run_id, checkpoint_step), 1: (run_id, checkpoint_step)}
        # The change made while the job was down is taken by both ranks at the first step.
        assert acknowledged(sql, run_id, v_dropout) == checkpoint_step
        wait_for("both ranks' reports", lambda: len(applied(log_path.read_text(), v_dropout)) == 2)
        assert applied(log_path.read_text(), v_dropout) == {0: checkpoint_step,
                                                             1: checkpoint_step}
        wait_for("logs past the old end", lambda: last_step(sql, run_id) > killed_at + 5)
        v_stop = submit(sql, run_id, "stop_train = true")
        step_stop = acknowledged(sql, run_id, v_stop)
        assert proc.wait(timeout=90) == 0

    ended = {int(r): (status, int(s), w)
             for r, status, s, w in ENDED.findall(log_path.read_text())}
    assert set(ended) == {0, 1} and ended[0] == ended[1]
    assert ended[0][:2] == ("stopped", step_stop)
    assert sql.one("SELECT count(*) FROM runs")[0] == 1  # the same run
    assert sql.one("SELECT status FROM runs WHERE run_id = ?", (run_id,))[0] == "stopped"
    rows = sql.rows("SELECT step, learning_rate, dropout FROM statistics WHERE run_id = ? "
                    "ORDER BY step", (run_id,))
    steps = [s for s, _, _ in rows]
    assert steps == sorted(set(steps))  # one row per step: the lost ones became a branch
    assert {(lr, d) for s, lr, d in rows if s > checkpoint_step} == {(0.002, 30)}
    cut = sql.one("SELECT min(step), max(step) FROM abandoned_statistics WHERE run_id = ?",
                  (run_id,))
    if killed_at > checkpoint_step:  # the steps logged after the checkpoint became a branch
        assert cut[0] > checkpoint_step and cut[1] == killed_at
    else:  # the kill came right after a checkpoint at the last logged step: nothing to cut
        assert cut == (None, None)
    sql.close()


STEP_RUN = Path(__file__).with_name("ddp_step_run.py")


def test_a_non_logging_step_runs_no_blocking_collective(tmp_path: Path, sqlite_url: str) -> None:
    """A user's DDP loop on 2 gloo ranks: the steps between logs agree without a barrier
    (the step boundary's flags travel in a collective read a step later), and an lr
    change, a pause and a stop still land at the same step on both ranks."""
    log_path = tmp_path / "ranks.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node=2", str(STEP_RUN), "--db", sqlite_url,
             "--checkpoint-dir", str(tmp_path / "checkpoints")],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
            start_new_session=True)
    try:
        sql = wait_for("the database", lambda: SqlClient(sqlite_url), timeout=60)
        run_id = wait_for("a run", lambda: sql.one("SELECT run_id FROM runs"), timeout=90)[0]
        wait_for("3 logs", lambda: last_step(sql, run_id) >= 15, timeout=60)
        versions = [submit(sql, run_id, "learning_rate = 0.002")]
        acknowledged(sql, run_id, versions[-1])
        versions.append(submit(sql, run_id, "pause_train = true"))
        step_pause = acknowledged(sql, run_id, versions[-1])
        time.sleep(1)
        assert last_step(sql, run_id) <= step_pause  # both ranks wait
        versions.append(submit(sql, run_id, "pause_train = false"))
        assert acknowledged(sql, run_id, versions[-1]) == step_pause
        wait_for("training to go on", lambda: last_step(sql, run_id) >= step_pause + 10)
        versions.append(submit(sql, run_id, "stop_train = true"))
        step_stop = acknowledged(sql, run_id, versions[-1])
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            kill_job(proc)
    log = log_path.read_text()
    for version in versions:  # each landed at one step on both ranks
        found = applied(log, version)
        assert set(found) == {0, 1} and found[0] == found[1], log[-3000:]
    ends = [json.loads(line) for line in log.splitlines() if line.startswith('{"rank"')]
    assert sorted(e["rank"] for e in ends) == [0, 1], log[-3000:]
    assert ends[0]["steps"] == ends[1]["steps"] == step_stop
    logged = set(range(5, step_stop + 1, 5))
    changed = {applied(log, v)[0] for v in versions}
    for end in ends:
        blocking = {int(step) for step in end["blocking"]}
        assert blocking <= logged | changed, (end, sorted(logged | changed))
        assert blocking & logged  # the counter sees the logs' collectives: it counts
