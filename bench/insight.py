"""Insight evaluation (issue 13): do the health rules stay quiet on healthy runs and
speak up, in time, on broken ones?

Two matrices of real `train.py` runs, each a subprocess with its own SQLite file and
torch on one thread, `--jobs` (default 2) at a time:
  healthy    15 sane configurations (models, datasets, optimizers at sane learning
             rates, batch sizes 16..256, logging every 5, 10 or 50 steps, 2 or 10
             validation batches, dropout 0 or 50 %), each with seeds 0 and 1, long
             enough for 30+ logs and short enough that no real overfitting is
             expected: every diagnostic they raise is a false alarm;
  pathology  the README's "Break it on purpose" commands, bounded by --max-steps,
             each with the codes it must raise and a step budget by which each must
             be flagged; plus loss_rising, steered into from outside as any SQL client
             would (`UPDATE parameters SET optimizer = 'SGD', learning_rate = 1.0`)
             once the run has logged a few steps, its budget counted from the step
             the change was applied at (`parameter_changes.applied_step`).
A run that pauses itself (non_finite) is stopped with `stop_train`, as a user would.

What a run raised is read from the database as any client reads it: its `alerts`
rows (one per diagnostic episode, at its first_step). Logs are the run's `statistics`
rows.

Prints, for the healthy matrix, per rule code the alarms, the alarms per 100 logs and
the runs raising it, then every run's alarms and duration; for the pathology matrix,
per case and expected code the first step flagged against its budget. Exits 1 when a
healthy run raised anything, a pathology was not flagged within budget, or a run failed.

`--replay DIR` reads the databases a `--keep DIR` evaluation left, rebuilds each
logged step's StepRecord and feeds them to a fresh Diagnostician: the same tables from
today's rules, without training anything (for tuning rules offline).

Healthy configurations run longest first, then the pathologies, so that the two
workers finish close together.

    python -m bench.insight [--only healthy|pathology] [--jobs 2] [--keep DIR]
    python -m bench.insight --replay DIR [--only healthy|pathology]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# The codes the health rules raise (livetrain/trainer/diagnostics.py), in the table's order.
DIAGNOSTIC_CODES = (
    "non_finite", "initial_loss", "update_ratio_high", "update_ratio_low",
    "activation_std_low", "activation_std_high", "dead_relu", "loss_rising", "loss_flat",
    "loss_slow", "exploding_gradients", "overfitting",
)
SEEDS = (0, 1)
RUN_TIMEOUT_S = 1200.0  # a run past this is killed and counted as failed
POLL_S = 0.2  # how often the harness looks at a running run's database
DB_SUFFIX = ".sqlite"


@dataclass(frozen=True)
class Healthy:
    """A sane configuration: whatever the rules say about it is a false alarm."""

    name: str
    args: tuple[str, ...]  # train.py options, --max-steps included


def healthy(model: str, dataset: str, optimizer: str, lr: float, batch: int, log_every: int,
            val_batches: int, dropout: int, steps: int) -> Healthy:
    """A healthy configuration named after what it varies."""
    name = (f"{model}-{dataset}-{optimizer}-{lr:g}-b{batch}-log{log_every}-val{val_batches}"
            f"-do{dropout}")
    return Healthy(name, (
        "--model", model, "--dataset", dataset, "--optimizer", optimizer, "--lr", f"{lr:g}",
        "--batch-size", str(batch), "--log-every", str(log_every),
        "--val-batches", str(val_batches), "--dropout", str(dropout),
        "--max-steps", str(steps), "--epochs", "1000"))


# Longest first. Steps give 30+ logs (plus the epoch-end logs) without real overfitting
# (the full validation at each epoch's end stays within its noise of its best) and with
# the loss falling from the start. Left out as not healthy, measured: tinycnn with dropout
# at lr 3e-4 (barely learns), AlexNet with SGD+Nesterov at lr 0.01 on digits (stuck at ln 10),
# smallcnn with SGD+Nesterov at lr 0.05 on digits (stuck at batch 64; one seed in two at 256).
HEALTHY = (
    healthy("smallcnn", "mnist5k", "Adam", 3e-4, 256, 10, 2, 50, 300),
    healthy("smallcnn", "mnist5k", "SGD+Nesterov", 0.02, 128, 10, 10, 50, 300),
    healthy("smallcnn", "mnist5k", "RMSprop", 3e-4, 32, 50, 10, 50, 1500),
    healthy("alexnet", "digits", "Adam", 3e-4, 64, 10, 2, 50, 250),
    healthy("resnet18", "digits", "Adam", 3e-4, 32, 5, 10, 0, 150),
    healthy("smallcnn", "mnist5k", "Adam", 3e-4, 64, 5, 10, 50, 200),
    healthy("smallcnn", "mnist5k", "SGD+Nesterov", 0.01, 64, 5, 2, 0, 200),
    healthy("smallcnn", "digits", "SGD+Nesterov", 0.02, 256, 5, 2, 50, 120),
    healthy("smallcnn", "mnist5k", "Adam", 3e-4, 16, 10, 2, 0, 400),
    healthy("tinycnn", "mnist5k", "Adam", 1e-3, 64, 50, 2, 0, 1500),
    healthy("tinycnn", "mnist5k", "RMSprop", 1e-3, 256, 10, 2, 0, 300),
    healthy("tinycnn", "mnist5k", "Adam", 3e-3, 128, 5, 10, 0, 150),
    healthy("smallcnn", "digits", "Adam", 3e-4, 32, 10, 10, 0, 300),
    healthy("tinycnn", "digits", "SGD+Nesterov", 0.02, 16, 50, 10, 50, 1500),
    healthy("tinycnn", "digits", "RMSprop", 1e-3, 16, 5, 2, 0, 200),
)


@dataclass(frozen=True)
class Steer:
    """A change written from outside, as any SQL client would, once the run has logged
    `after_step`; the pathology's budgets count from the step it was applied at."""

    after_step: int
    optimizer: str
    learning_rate: float


@dataclass(frozen=True)
class Pathology:
    """A broken run: each code of `budgets` must be flagged within its budget of steps."""

    name: str
    args: tuple[str, ...]  # train.py options, --max-steps included
    budgets: Mapping[str, int] = field(hash=False)  # code -> steps after the reference step
    steer: Steer | None = None


DIGITS = ("--dataset", "digits", "--log-every", "5")
# The README's "Break it on purpose" commands, with --max-steps added; budgets are what a
# user watching the board could fairly expect (20 to 40 logs at --log-every 5), and the
# runs go on past them so that a late flag shows how late.
PATHOLOGIES = (
    Pathology("init-normal1", (*DIGITS, "--init", "normal:1", "--max-steps", "10"),
              {"initial_loss": 0}),
    Pathology("adam-lr0.05", (*DIGITS, "--lr", "0.05", "--max-steps", "200"),
              {"update_ratio_high": 100, "dead_relu": 150}),
    Pathology("sgd-lr1e-5", (*DIGITS, "--optimizer", "SGD", "--lr", "1e-5", "--max-steps", "300"),
              {"update_ratio_low": 100, "loss_flat": 200}),
    Pathology("sgd-lr1e-5-init-normal0.001",
              (*DIGITS, "--optimizer", "SGD", "--lr", "1e-5", "--init", "normal:0.001",
               "--max-steps", "200"),
              {"activation_std_low": 100}),
    Pathology("sgd-lr1e-5-init-normal1",
              (*DIGITS, "--optimizer", "SGD", "--lr", "1e-5", "--init", "normal:1",
               "--max-steps", "200"),
              {"activation_std_high": 100}),
    Pathology("sgd-lr0.7", (*DIGITS, "--optimizer", "SGD", "--lr", "0.7", "--max-steps", "200"),
              {"dead_relu": 150}),
    Pathology("overfit-1-batch",
              (*DIGITS, "--overfit-batches", "1", "--dropout", "0", "--lr", "1e-2",
               "--epochs", "1000", "--max-steps", "300"),
              {"overfitting": 200}),
    Pathology("alexnet-kaiming-nesterov-lr0.05",
              ("--model", "alexnet", "--init", "kaiming", "--optimizer", "SGD+Nesterov",
               "--lr", "0.05", "--max-steps", "300"),
              {"non_finite": 50}),
    Pathology("steered-sgd-lr1", (*DIGITS, "--max-steps", "200"),
              {"loss_rising": 50, "exploding_gradients": 50},
              Steer(after_step=40, optimizer="SGD", learning_rate=1.0)),
)


@dataclass(frozen=True)
class Job:
    """One train.py run of the evaluation."""

    kind: str  # "healthy" or "pathology"
    case: Healthy | Pathology
    seed: int

    @property
    def stem(self) -> str:
        """The run's file name without suffix: replay finds its case again by it."""
        return f"{self.kind}--{self.case.name}--seed{self.seed}"


@dataclass(frozen=True)
class Alarm:
    """An episode a rule opened: its code, the step it was first raised at, its layer."""

    code: str
    step: int
    layer: str | None


@dataclass
class Outcome:
    """What one run logged and raised."""

    job: Job
    logs: int = 0
    alarms: list[Alarm] = field(default_factory=list)
    reference_step: int = 0  # budgets count from here: 0, or a steered change's step
    seconds: float | None = None  # wall time of the run (None: replayed)
    source: str = ""  # "alerts" (a live run's table) or "replay"
    problem: str | None = None  # the run failed, timed out or was never steered


@dataclass
class Evaluation:
    outcomes: list[Outcome]
    seconds: float


def jobs_for(healthy_cases: Iterable[Healthy], pathologies: Iterable[Pathology],
             seeds: Sequence[int] = SEEDS) -> list[Job]:
    """Every healthy case once per seed, then every pathology once (seed 0)."""
    jobs = [Job("healthy", case, seed) for case in healthy_cases for seed in seeds]
    return jobs + [Job("pathology", case, 0) for case in pathologies]


# -- reading a run's database, as any SQL client would --------------------------------

def connect(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(db, timeout=10, isolation_level=None)


def read_alarms(conn: sqlite3.Connection, run_id: int) -> list[Alarm]:
    """The run's alarms as any SQL client sees them: its `alerts` rows, one per episode
    (a problem that held for 100 logs is one alarm, not 100)."""
    rows = conn.execute(
        "SELECT code, first_step, layer_name FROM alerts WHERE run_id = ? "
        "ORDER BY first_step, alert_id", (run_id,)).fetchall()
    return [Alarm(*row) for row in rows]


def only_run(conn: sqlite3.Connection) -> int:
    """The run_id of a database that holds one run."""
    rows = conn.execute("SELECT run_id FROM runs ORDER BY run_id").fetchall()
    if len(rows) != 1:
        raise LookupError(f"expected one run in the database, found {len(rows)}")
    return rows[0][0]


def steered_step(conn: sqlite3.Connection, run_id: int, steer: Steer) -> int | None:
    """The step the steered change took effect after, from parameter_changes."""
    (step,) = conn.execute(
        "SELECT min(applied_step) FROM parameter_changes WHERE run_id = ? AND optimizer = ? "
        "AND learning_rate = ?", (run_id, steer.optimizer, steer.learning_rate)).fetchone()
    return step


def read_outcome(db: Path, job: Job, outcome: Outcome) -> None:
    """Fill `outcome` from the run's database: its logs, alarms and reference step."""
    if not db.exists():
        outcome.problem = outcome.problem or "no database was written"
        return
    conn = connect(db)
    try:
        run_id = only_run(conn)
        (outcome.logs,) = conn.execute("SELECT count(*) FROM statistics WHERE run_id = ?",
                                       (run_id,)).fetchone()
        outcome.alarms, outcome.source = read_alarms(conn, run_id), "alerts"
        steer = getattr(job.case, "steer", None)
        if steer is not None:
            step = steered_step(conn, run_id, steer)
            if step is None:
                outcome.problem = outcome.problem or "the steered change was never applied"
            outcome.reference_step = step or 0
    except (sqlite3.Error, LookupError) as exc:
        outcome.problem = outcome.problem or f"unreadable database: {exc}"
    finally:
        conn.close()


# -- running one job -------------------------------------------------------------------

class Watcher:
    """Looks at a running run's database between polls: stops a run that paused itself
    (non_finite pauses before the next update, waiting for a user), and writes a steered
    change once the run has logged far enough."""

    def __init__(self, db: Path, steer: Steer | None) -> None:
        self.db, self.steer = db, steer
        self.conn: sqlite3.Connection | None = None
        self.steered = self.stopped = False

    def poll(self) -> None:
        if self.conn is None:
            if not self.db.exists():  # connecting would create it before the trainer does
                return
            self.conn = connect(self.db)
        with contextlib.suppress(sqlite3.OperationalError):  # no tables yet, or busy
            self._look(self.conn)

    def _look(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT run_id, status FROM runs ORDER BY run_id").fetchone()
        if row is None:
            return
        run_id, status = row
        if status == "paused" and not self.stopped:
            conn.execute("UPDATE parameters SET stop_train = TRUE WHERE run_id = ?", (run_id,))
            self.stopped = True
        if self.steer is not None and not self.steered:
            (last,) = conn.execute("SELECT max(step) FROM statistics WHERE run_id = ?",
                                   (run_id,)).fetchone()
            if last is not None and last >= self.steer.after_step:
                conn.execute("UPDATE parameters SET optimizer = ?, learning_rate = ? "
                             "WHERE run_id = ?",
                             (self.steer.optimizer, self.steer.learning_rate, run_id))
                self.steered = True

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def train_command(job: Job, db: Path, checkpoints: Path) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--db", f"sqlite:///{db}", "--no-progress",
            "--checkpoint-dir", str(checkpoints), "--seed", str(job.seed), *job.case.args]


def run_job(job: Job, workdir: Path, timeout: float = RUN_TIMEOUT_S) -> Outcome:
    """Train one job to its end (stopping it if it pauses), then read what it raised.
    Its database stays in `workdir`; its checkpoints do not."""
    db, log = workdir / f"{job.stem}{DB_SUFFIX}", workdir / f"{job.stem}.log"
    checkpoints = workdir / f"{job.stem}-checkpoints"
    outcome = Outcome(job)
    watcher = Watcher(db, getattr(job.case, "steer", None))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.monotonic()
    with log.open("w") as output:
        proc = subprocess.Popen(train_command(job, db, checkpoints), cwd=workdir, env=env,
                                stdout=output, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                if time.monotonic() - start > timeout:
                    proc.kill()
                    outcome.problem = f"killed after {timeout:.0f} s"
                    break
                watcher.poll()
                time.sleep(POLL_S)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
            watcher.close()
    outcome.seconds = time.monotonic() - start
    if proc.returncode != 0 and outcome.problem is None:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        outcome.problem = f"train.py exited with {proc.returncode}: {tail[0][:200]}"
    shutil.rmtree(checkpoints, ignore_errors=True)
    read_outcome(db, job, outcome)
    return outcome


def run_jobs(jobs: Sequence[Job], workdir: Path, parallel: int = 2,
             progress: Callable[[str], None] = print) -> Evaluation:
    """Every job, `parallel` at a time, in the given order; outcomes in that order."""
    start = time.monotonic()
    outcomes: dict[Job, Outcome] = {}
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {pool.submit(run_job, job, workdir): job for job in jobs}
        for future in as_completed(futures):
            outcome = future.result()
            outcomes[futures[future]] = outcome
            progress(f"[{len(outcomes)}/{len(jobs)}] {describe(outcome)}")
    return Evaluation([outcomes[job] for job in jobs], time.monotonic() - start)


def describe(outcome: Outcome) -> str:
    """One line per finished run, for progress."""
    codes = Counter(a.code for a in outcome.alarms)
    raised = ", ".join(f"{c} x{n}" for c, n in sorted(codes.items())) or "no alarms"
    took = "" if outcome.seconds is None else f"{outcome.seconds:.0f} s, "
    problem = f"; PROBLEM: {outcome.problem}" if outcome.problem else ""
    return f"{outcome.job.stem}: {took}{outcome.logs} logs, {raised}{problem}"


# -- replay: today's rules over recorded telemetry -------------------------------------

def _number(value: float | None) -> float:
    """A NULL measurement as the trainer hands it to the rules: NaN (the trainer's None
    and NaN alike, since SQLite stores a NaN as NULL)."""
    return math.nan if value is None else value


def _standard_error(std: float | None, count: int | None) -> float | None:
    """std / sqrt(count), as the trainer computes it (None when either is unknown)."""
    return None if std is None or not count else std / math.sqrt(count)


def step_records(conn: sqlite3.Connection, run_id: int) -> list[Any]:
    """Every logged step of the run as the StepRecord the trainer built at that log: the
    statistics row, and its layer_statistics rows in the model's forward order."""
    from livetrain.trainer.diagnostics import LayerRecord, StepRecord

    layers: dict[int, list[LayerRecord]] = defaultdict(list)
    for step, name, *values, nonlinear in conn.execute(
        "SELECT ls.step, ls.layer_name, ls.act_mean, ls.act_std, ls.zero_fraction, "
        "ls.dead_fraction, ls.grad_norm, ls.update_ratio, ls.has_nonlinearity "
        "FROM layer_statistics ls LEFT JOIN model_layers ml "
        "ON ml.run_id = ls.run_id AND ml.layer_name = ls.layer_name WHERE ls.run_id = ? "
        "ORDER BY ls.step, ml.position IS NULL, ml.position, ls.rowid", (run_id,)):
        act_mean, act_std, zeros, dead, grad_norm, ratio = values
        layers[step].append(LayerRecord(
            name=name, act_mean=_number(act_mean), act_std=_number(act_std),
            zero_fraction=_number(zeros), dead_fraction=_number(dead), grad_norm=grad_norm,
            update_ratio=_number(ratio), has_nonlinearity=bool(nonlinear)))
    rows = conn.execute(
        "SELECT step, train_loss, validate_loss, learning_rate, optimizer, weight_decay, "
        "dropout, train_loss_std, train_loss_count, validate_loss_std, validate_loss_count "
        "FROM statistics WHERE run_id = ? ORDER BY step", (run_id,)).fetchall()
    # SQLite stores NaN as NULL: in a run that validates, a NULL validation loss was NaN.
    validates = any(row[2] is not None for row in rows)
    records = []
    for (step, train_loss, validate_loss, lr, optimizer, weight_decay, dropout, train_std,
         train_count, val_std, val_count) in rows:
        records.append(StepRecord(
            step=step, train_loss=_number(train_loss),
            validate_loss=_number(validate_loss) if validates else None,
            learning_rate=lr, optimizer=optimizer, weight_decay=weight_decay, dropout=dropout,
            layers=tuple(layers.get(step, ())),
            train_loss_se=_standard_error(train_std, train_count),
            validate_loss_se=_standard_error(val_std, val_count)))
    return records


def opened(returned: Iterable[Any]) -> list[Any]:
    """What Diagnostician.observe returned that opens an episode (AlertChange.kind)."""
    return [item for item in returned if item.kind == "opened"]


def num_classes(conn: sqlite3.Connection, run_id: int) -> int | None:
    """The run's classes, from the options train.py stored in runs.config."""
    (config,) = conn.execute("SELECT config FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    value = json.loads(config or "{}").get("num_classes")
    return value if isinstance(value, int) and value >= 2 else None


def replay_outcome(db: Path, job: Job) -> Outcome:
    """The alarms today's rules raise on a kept run's recorded telemetry."""
    from livetrain.trainer.diagnostician import Diagnostician

    outcome = Outcome(job, source="replay")
    conn = connect(db)
    try:
        run_id = only_run(conn)
        doctor = Diagnostician(num_classes(conn, run_id))
        records = step_records(conn, run_id)
        for record in records:
            outcome.alarms += [Alarm(item.code, record.step, item.layer)
                               for item in opened(doctor.observe(record))]
        outcome.logs = len(records)
        steer = getattr(job.case, "steer", None)
        if steer is not None:
            outcome.reference_step = steered_step(conn, run_id, steer) or 0
    finally:
        conn.close()
    return outcome


def replay(directory: Path, jobs: Sequence[Job] | None = None,
           progress: Callable[[str], None] = print) -> Evaluation:
    """Every kept database of `directory` written by one of `jobs` (default: both
    matrices), found by its file name; in the order of `jobs`."""
    start = time.monotonic()
    known = {job.stem: job for job in jobs_for(HEALTHY, PATHOLOGIES)} if jobs is None \
        else {job.stem: job for job in jobs}
    found = {db.stem: db for db in directory.glob(f"*{DB_SUFFIX}")}
    for stem in sorted(set(found) - set(known)):
        progress(f"skipped {found[stem].name}: not a case of this evaluation")
    outcomes = [replay_outcome(found[stem], job) for stem, job in known.items() if stem in found]
    return Evaluation(outcomes, time.monotonic() - start)


# -- the tables ------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    """One expected code of one pathology against its budget."""

    case: str
    code: str
    first_step: int | None  # the first step it was flagged at (None: never)
    reference_step: int
    budget: int
    problem: str | None

    @property
    def passed(self) -> bool:
        return (self.problem is None and self.first_step is not None
                and self.first_step - self.reference_step <= self.budget)


def checks(outcome: Outcome) -> list[Check]:
    """A pathology run's expected codes, each with the first step it was flagged at. A
    steered run counts alarms after the change only: the steps up to its applied_step
    ran with the old values."""
    case = outcome.job.case
    if not isinstance(case, Pathology):
        return []  # a healthy run has no budgets
    earliest = outcome.reference_step + 1 if case.steer is not None else 0
    found = []
    for code, budget in case.budgets.items():
        steps = [a.step for a in outcome.alarms if a.code == code and a.step >= earliest]
        found.append(Check(case.name, code, min(steps, default=None), outcome.reference_step,
                           budget, outcome.problem))
    return found


def _counts(alarms: Iterable[Alarm]) -> str:
    first: dict[str, int] = {}
    counts: Counter[str] = Counter()
    for alarm in alarms:
        counts[alarm.code] += 1
        first[alarm.code] = min(first.get(alarm.code, alarm.step), alarm.step)
    return ", ".join(f"{code} {n} (@{first[code]})" for code, n in sorted(counts.items()))


def _seconds(outcome: Outcome) -> str:
    return "-" if outcome.seconds is None else f"{outcome.seconds:.0f}"


def healthy_table(outcomes: Sequence[Outcome]) -> list[str]:
    """Per rule code: alarms, alarms per 100 logs, runs raising it; then every run."""
    logs = sum(o.logs for o in outcomes)
    lines = [f"healthy matrix: {len(outcomes)} runs, {logs} logs (statistics rows); every "
             "alarm here is a false alarm",
             f"{'rule code':<22}{'alarms':>8}{'per 100 logs':>14}{'runs':>9}"]
    codes = list(DIAGNOSTIC_CODES) + sorted(
        {a.code for o in outcomes for a in o.alarms} - set(DIAGNOSTIC_CODES))
    for code in [*codes, "all"]:
        hits = [a for o in outcomes for a in o.alarms if code in ("all", a.code)]
        runs = sum(any(code in ("all", a.code) for a in o.alarms) for o in outcomes)
        rate = 100 * len(hits) / logs if logs else math.nan
        lines.append(f"{code:<22}{len(hits):>8}{rate:>14.2f}{f'{runs}/{len(outcomes)}':>9}")
    width = max((len(o.job.case.name) for o in outcomes), default=6)
    lines += ["", f"{'config':<{width}}  {'seed':>4} {'logs':>5} {'s':>5}  alarms (first step)"]
    for o in outcomes:
        alarms = _counts(o.alarms) or "-"
        problem = f"  PROBLEM: {o.problem}" if o.problem else ""
        lines.append(f"{o.job.case.name:<{width}}  {o.job.seed:>4} {o.logs:>5} "
                     f"{_seconds(o):>5}  {alarms}{problem}")
    return lines


def pathology_table(outcomes: Sequence[Outcome]) -> list[str]:
    """Per case and expected code: the first step flagged against the budget."""
    width = max((len(o.job.case.name) for o in outcomes), default=4)
    lines = [f"pathology matrix: {len(outcomes)} runs; budgets in steps after step 0, or "
             "after the step a steered change was applied at",
             f"{'case':<{width}}  {'expected':<20}{'flagged':>9}{'from':>6}{'budget':>8}"
             f"  verdict  {'logs':>4} {'s':>4}  all alarms (first step)"]
    for o in outcomes:
        for i, check in enumerate(checks(o)):
            flagged = "never" if check.first_step is None else str(check.first_step)
            tail = (f"  {o.logs:>4} {_seconds(o):>4}  {_counts(o.alarms) or '-'}"
                    + (f"  PROBLEM: {o.problem}" if o.problem else "")) if i == 0 else ""
            lines.append(f"{o.job.case.name if i == 0 else '':<{width}}  {check.code:<20}"
                         f"{flagged:>9}{check.reference_step:>6}{check.budget:>8}"
                         f"  {'PASS' if check.passed else 'FAIL':<7}{tail}")
    return lines


def verdicts(evaluation: Evaluation) -> list[str]:
    """[PASS]/[FAIL] lines, as every benchmark prints its budgets."""
    healthy_runs = [o for o in evaluation.outcomes if o.job.kind == "healthy"]
    sick = [o for o in evaluation.outcomes if o.job.kind == "pathology"]
    lines = []
    if healthy_runs:
        quiet = sum(not o.alarms for o in healthy_runs)
        lines.append(f"[{'PASS' if quiet == len(healthy_runs) else 'FAIL'}] healthy runs "
                     f"raising no diagnostic: {quiet} of {len(healthy_runs)}")
    if sick:
        all_checks = [c for o in sick for c in checks(o)]
        met = sum(c.passed for c in all_checks)
        lines.append(f"[{'PASS' if met == len(all_checks) else 'FAIL'}] pathology codes "
                     f"flagged within budget: {met} of {len(all_checks)}")
    failed = [o for o in evaluation.outcomes if o.problem]
    if failed:
        lines.append(f"[FAIL] runs that did not complete: {len(failed)} "
                     f"({', '.join(o.job.stem for o in failed)})")
    return lines


def exit_status(evaluation: Evaluation) -> int:
    """1 when a healthy run raised a diagnostic, a pathology missed a budget or a run
    failed; else 0."""
    return 1 if any(line.startswith("[FAIL]") for line in verdicts(evaluation)) else 0


def report(evaluation: Evaluation) -> str:
    """Both tables, the wall time and the verdicts."""
    healthy_runs = [o for o in evaluation.outcomes if o.job.kind == "healthy"]
    sick = [o for o in evaluation.outcomes if o.job.kind == "pathology"]
    lines: list[str] = []
    if healthy_runs:
        lines += ["", *healthy_table(healthy_runs)]
    if sick:
        lines += ["", *pathology_table(sick)]
    trained = sum(o.seconds or 0.0 for o in evaluation.outcomes)
    lines += ["", f"wall time of the evaluation: {evaluation.seconds:.0f} s "
              f"({evaluation.seconds / 60:.1f} min; {trained:.0f} s of runs)", "",
              *verdicts(evaluation)]
    return "\n".join(lines)


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"seeds must be integers >= 0: {text!r}")
    return seeds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("healthy", "pathology"), help="one matrix only")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    p.add_argument("--keep", type=Path, metavar="DIR",
                   help="write the run databases (and train.py's output) here and keep them")
    p.add_argument("--replay", type=Path, metavar="DIR",
                   help="no training: today's rules over the databases a --keep run left")
    p.add_argument("--seeds", type=_seeds, default=SEEDS, metavar="S1,S2",
                   help="the healthy runs' seeds (default 0,1; others are a held-out check "
                        "of rules tuned on those)")
    args = p.parse_args(argv)
    kinds = (args.only,) if args.only else ("healthy", "pathology")
    jobs = jobs_for(HEALTHY if "healthy" in kinds else (),
                    PATHOLOGIES if "pathology" in kinds else (), args.seeds)
    if args.replay:
        evaluation = replay(args.replay, jobs)
    else:
        print(f"{len(jobs)} train.py runs, {args.jobs} at a time", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            workdir = args.keep or Path(tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            evaluation = run_jobs(jobs, workdir.resolve(), args.jobs,
                                  lambda line: print(line, flush=True))
    print(report(evaluation))
    command = " ".join(["python -m bench.insight", *(argv if argv is not None else sys.argv[1:])])
    print(f"reproduce: {command}")
    return exit_status(evaluation)


if __name__ == "__main__":
    raise SystemExit(main())
