"""The insight evaluation harness (bench/insight.py) on a tiny subset: real train.py
subprocesses, the tables it prints, its exit status, and its replay of kept databases."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from bench import insight

TINY = insight.healthy("tinycnn", "digits", "Adam", 3e-4, 32, 5, 2, 0, 20)
INITIAL_LOSS = next(p for p in insight.PATHOLOGIES if p.name == "init-normal1")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[insight.Evaluation, Path]:
    """One tiny healthy run (seed 0) and the README's initial_loss recipe, 2 at a time."""
    workdir = tmp_path_factory.mktemp("insight")
    jobs = insight.jobs_for([TINY], [INITIAL_LOSS], seeds=(0,))
    lines: list[str] = []
    return insight.run_jobs(jobs, workdir, parallel=2, progress=lines.append), workdir


def test_runs_complete_and_are_read_from_their_databases(
        evaluated: tuple[insight.Evaluation, Path]) -> None:
    evaluation, workdir = evaluated
    healthy, sick = evaluation.outcomes
    assert (healthy.job.kind, sick.job.kind) == ("healthy", "pathology")
    for outcome in (healthy, sick):
        assert outcome.problem is None
        assert (workdir / f"{outcome.job.stem}{insight.DB_SUFFIX}").exists()
        assert outcome.source in ("alerts", "events") and outcome.seconds is not None
    assert healthy.logs >= 5  # step 0 and every 5 steps to step 20
    assert sick.logs >= 2
    assert ("initial_loss", 0) in [(a.code, a.step) for a in sick.alarms]
    assert not list(workdir.glob("*-checkpoints"))  # checkpoints are not kept


def test_report_has_both_tables(evaluated: tuple[insight.Evaluation, Path]) -> None:
    evaluation, _ = evaluated
    healthy, sick = evaluation.outcomes
    text = insight.report(evaluation)
    lines = text.splitlines()
    rules = [line.split()[0] for line in lines if line.split()[:1] and
             line.split()[0] in (*insight.DIAGNOSTIC_CODES, "all")]
    # each rule code once in the healthy table, and initial_loss again in the pathology one
    assert rules[: len(insight.DIAGNOSTIC_CODES) + 1] == [*insight.DIAGNOSTIC_CODES, "all"]
    (run_line,) = [line for line in lines if line.startswith(f"{TINY.name} ")]
    assert run_line.split()[1:3] == ["0", str(healthy.logs)]
    (case_line,) = [line for line in lines if line.startswith(f"{INITIAL_LOSS.name} ")]
    assert case_line.split()[1:6] == ["initial_loss", "0", "0", "0", "PASS"]
    assert f"healthy matrix, tuning half: 1 runs, {healthy.logs} logs" in text
    assert "wall time of the evaluation" in text
    assert sick.job.case.budgets == {"initial_loss": 0}


def test_exit_status(evaluated: tuple[insight.Evaluation, Path]) -> None:
    evaluation, _ = evaluated
    healthy, sick = evaluation.outcomes
    assert insight.exit_status(insight.Evaluation([sick], 1.0)) == 0
    # the same recorded run held to a budget it cannot meet: a code it never raised
    impossible = replace(sick.job.case, budgets={"initial_loss": 0, "overfitting": 0})
    strict = replace(sick, job=replace(sick.job, case=impossible))
    assert insight.exit_status(insight.Evaluation([strict], 1.0)) == 1
    (line,) = [x for x in insight.pathology_table([strict]) if " overfitting " in x]
    assert line.split()[1:] == ["never", "0", "0", "FAIL"]
    # a healthy run that raised anything fails the evaluation, one that raised nothing not
    quiet = replace(healthy, alarms=[])
    noisy = replace(healthy, alarms=[insight.Alarm("loss_flat", 10, None)])
    assert insight.exit_status(insight.Evaluation([quiet, sick], 1.0)) == 0
    assert insight.exit_status(insight.Evaluation([noisy, sick], 1.0)) == 1
    # news is no alarm: a healthy run told it converged still passes
    news = replace(healthy, alarms=[insight.Alarm("converged", 10, None, "info")])
    assert not news.false_alarms
    assert insight.exit_status(insight.Evaluation([news, sick], 1.0)) == 0
    assert insight.exit_status(insight.Evaluation([replace(quiet, problem="crashed")], 1.0)) == 1
    assert insight.exit_status(evaluation) == (1 if healthy.alarms else 0)


def test_replay_reproduces_what_the_trainer_raised(
        evaluated: tuple[insight.Evaluation, Path]) -> None:
    """Today's rules fed the records rebuilt from the database open the episodes the
    trainer reported live (neither run here has the loop's own non-finite guard)."""
    evaluation, workdir = evaluated
    replayed = insight.replay(workdir, [o.job for o in evaluation.outcomes])
    assert [o.job for o in replayed.outcomes] == [o.job for o in evaluation.outcomes]
    for live, again in zip(evaluation.outcomes, replayed.outcomes, strict=True):
        assert again.source == "replay" and again.logs == live.logs
        assert sorted(again.alarms, key=repr) == sorted(live.alarms, key=repr)


def test_alarms_are_the_runs_alert_episodes(evaluated: tuple[insight.Evaluation, Path],
                                           tmp_path: Path) -> None:
    """What counts is the `alerts` table, one row per episode, as any SQL client reads it."""
    evaluation, workdir = evaluated
    sick = evaluation.outcomes[1]
    db = tmp_path / "copy.sqlite"
    shutil.copy(workdir / f"{sick.job.stem}{insight.DB_SUFFIX}", db)
    conn = insight.connect(db)
    run_id = insight.only_run(conn)
    assert sick.source == "alerts" and sick.alarms
    assert insight.read_alarms(conn, run_id) == sick.alarms
    conn.execute("DELETE FROM alerts")
    conn.executemany(
        "INSERT INTO alerts (run_id, alert_id, code, level, layer_name, status, first_step, "
        "last_step, logs, message) VALUES (?, ?, ?, 'warning', ?, 'open', ?, ?, 1, 'm')",
        [(run_id, "b", "loss_slow", None, 2, 2), (run_id, "a", "dead_relu", "fc1", 1, 2)])
    assert insight.read_alarms(conn, run_id) == [
        insight.Alarm("dead_relu", 1, "fc1"), insight.Alarm("loss_slow", 2, None)]
    assert insight.read_alarms(conn, run_id + 1) == []  # another run's: none
    conn.close()


def test_replay_counts_only_opened_episodes() -> None:
    """Replay counts what Diagnostician.observe reports as opened, not held or resolved."""
    class Item:
        def __init__(self, kind: str) -> None:
            self.kind = kind

    items = [Item("opened"), Item("held"), Item("resolved"), Item("rolled_back")]
    assert insight.opened(items) == [items[0]]
