"""Issue 11: a bad parameters row is rejected with an event, never fatal.

Every column the trainer reads is written with a wrong type, NULL, an out-of-range
value or a lowered version: at the database (SQLite's type checks, PostgreSQL's
types), at the store, at the listener and against a real `train.py` subprocess.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import psycopg
import pytest
from test_train_e2e import SMALL, SqlClient, max_step, run_status, statistics, trainer, wait_for

from livetrain.db.contract import Hyperparameters
from livetrain.db.listener import ParameterListener
from livetrain.db.store import Store

START = Hyperparameters("Adam", 3e-4, 0.0, 50)

# The value each control column is put back to before the next bad one is written.
GOOD = {"optimizer": "'Adam'", "learning_rate": "0.0003", "weight_decay": "0",
        "dropout": "50", "grad_clip": "0", "stop_train": "FALSE", "pause_train": "FALSE",
        "rollback_step": "NULL"}

# (column, SQL value, how the trainer's event quotes it). A rollback_step is written
# with a new rollback request, else it would not be a request at all.
BAD_SQLITE = [
    ("optimizer", "X'4164616d'", "optimizer=b'Adam'"),  # a blob, not the text 'Adam'
    ("learning_rate", "'abc'", "learning_rate='abc'"),
    ("weight_decay", "2.5", "weight_decay=2.5"),
    ("dropout", "1.5", "dropout=1.5"),
    ("grad_clip", "'x'", "grad_clip='x'"),
    ("stop_train", "'x'", "stop_train='x'"),
    ("pause_train", "2", "pause_train=2"),
    ("rollback_step", "'abc'", "rollback_step='abc'"),
    ("rollback_step", "9223372036854775808", "rollback_step=9.223372036854776e+18"),  # > 64 bits
    ("rollback_request", "'x'", "rollback_request='x'"),
    ("rollback_request", "-1", "rollback_request=-1"),
]
BAD_POSTGRESQL = [
    ("optimizer", "NULL", "optimizer=None"),
    ("learning_rate", "5", "learning_rate=5.0"),
    ("weight_decay", "NULL", "weight_decay=None"),
    ("dropout", "-10", "dropout=-10"),
    ("grad_clip", "'NaN'", "grad_clip=nan"),
    ("stop_train", "NULL", "stop_train=None"),
    ("pause_train", "NULL", "pause_train=None"),
    ("rollback_step", "-5", "rollback_step=-5"),
    ("rollback_request", "NULL", "rollback_request=None"),
    ("rollback_request", "-1", "rollback_request=-1"),
]
NULLABLE_ON_POSTGRESQL = ("optimizer", "learning_rate", "weight_decay", "dropout", "grad_clip",
                          "stop_train", "pause_train", "rollback_request")


def bad_values(kind: str) -> list[tuple[str, str, str]]:
    return BAD_SQLITE if kind == "sqlite" else BAD_POSTGRESQL


def force_past_constraints(sql: SqlClient) -> None:
    """What an admin could do: SQLite ignores CHECKs on this connection; PostgreSQL loses
    the parameters table's CHECKs and NOT NULLs (its triggers stay: versions go up)."""
    if sql.kind == "sqlite":
        sql.execute("PRAGMA ignore_check_constraints = ON")
        return
    checks = sql.rows("SELECT conname FROM pg_constraint "
                      "WHERE conrelid = 'parameters'::regclass AND contype = 'c'")
    assert checks, "the parameters table has CHECK constraints to drop"
    for (name,) in checks:
        sql.execute(f'ALTER TABLE parameters DROP CONSTRAINT "{name}"')
    for column in NULLABLE_ON_POSTGRESQL:
        sql.execute(f"ALTER TABLE parameters ALTER COLUMN {column} DROP NOT NULL")


def update_parameters(sql: SqlClient, run_id: int, values: dict[str, str]) -> None:
    """A plain UPDATE of the run's parameters row, as a third-party client writes it."""
    assignments = ", ".join(f"{column} = {value}" for column, value in values.items())
    sql.execute(f"UPDATE parameters SET {assignments} WHERE run_id = ?", (run_id,))


def one(sql: SqlClient, query: str, *params: object) -> object:
    return sql.one(query, params)[0]


# -- at the database ---------------------------------------------------------------

REFUSED = [  # (column, value) a plain UPDATE may not write on either back end
    ("rollback_request", "'x'"), ("rollback_request", "NULL"), ("rollback_request", "-1"),
    ("rollback_step", "'abc'"), ("rollback_step", "-1"), ("stop_train", "'x'"),
    ("stop_train", "2"), ("stop_train", "NULL"), ("pause_train", "'x'"),
    ("pause_train", "NULL"), ("learning_rate", "'abc'"), ("weight_decay", "'x'"),
    ("grad_clip", "'x'"), ("dropout", "'x'"), ("optimizer", "NULL"),
    ("optimizer", "X'4164616d'"), ("version", "'abc'"),
    ("version", "NULL"), ("applied_step", "'x'"), ("dt_updated", "'garbage'"),
]


def test_a_plain_update_with_a_wrong_type_is_refused_by_the_database(db_url: str) -> None:
    store = Store(db_url)
    run_id = store.create_run("run", "smallcnn", "mnist5k", {}, START)
    before = store.get_parameters(run_id)
    sql = SqlClient(db_url)
    accepted = []
    for column, value in REFUSED:
        try:
            update_parameters(sql, run_id, {column: value})
            accepted.append((column, value))
        except (sqlite3.IntegrityError, psycopg.Error):  # a CHECK, NOT NULL or the type
            pass
    assert accepted == []
    assert store.get_parameters(run_id) == before  # nothing was written

    # What the checks let through: booleans as TRUE/FALSE (and 1/0, SQLite's own form),
    # whole numbers in REAL columns, NULL for no rollback target; each change is versioned.
    yes, no = ("1", "0") if sql.kind == "sqlite" else ("TRUE", "FALSE")
    for values in ({"stop_train": yes, "pause_train": "TRUE"}, {"learning_rate": "1"},
                   {"rollback_step": "7", "rollback_request": "rollback_request + 1"},
                   {"rollback_step": "NULL", "stop_train": "FALSE", "pause_train": no}):
        update_parameters(sql, run_id, values)
    after = store.get_parameters(run_id)
    assert (after.stop_train, after.pause_train, after.learning_rate) == (False, False, 1.0)
    assert (after.rollback_step, after.rollback_request, after.version) == (None, 1, 5)
    assert after.rejected() == {} and after.hyperparameters()[1] == {}
    sql.close()
    store.close()


# -- at the store --------------------------------------------------------------------

def test_a_forced_row_reads_without_error_and_names_each_bad_value(db_url: str) -> None:
    store = Store(db_url)
    run_id = store.create_run("run", "smallcnn", "mnist5k", {}, START)
    sql = SqlClient(db_url)
    force_past_constraints(sql)
    bad = {column: (value, quoted) for column, value, quoted in bad_values(sql.kind)}
    update_parameters(sql, run_id, {column: value for column, (value, _) in bad.items()})
    if sql.kind == "sqlite":  # written alone, no new version: the stamp trigger keeps it
        update_parameters(sql, run_id, {"dt_applied": "'no time'"})
    state = store.get_parameters(run_id)  # no exception, whatever the row holds
    new, errors = state.hyperparameters()
    messages = errors | state.rejected()
    assert new is None
    assert set(messages) == set(bad)
    for column, (_, quoted) in bad.items():
        assert messages[column].startswith(quoted + ": "), (column, messages[column])
    if sql.kind == "sqlite":
        assert state.dt_applied is None  # a timestamp that is no time reads as unknown
    sql.close()
    store.close()


def test_a_long_bad_value_is_quoted_short(sqlite_url: str) -> None:
    store = Store(sqlite_url)
    run_id = store.create_run("run", "smallcnn", "mnist5k", {}, START)
    sql = SqlClient(sqlite_url)
    force_past_constraints(sql)
    update_parameters(sql, run_id, {"rollback_request": "'" + "x" * 100_000 + "'"})
    message = store.get_parameters(run_id).rejected()["rollback_request"]
    assert len(message) < 200 and message.startswith("rollback_request='xxx")
    sql.close()
    store.close()


def test_a_stop_is_written_even_when_the_row_holds_bad_values(db_url: str) -> None:
    """A resume clears a stop left from before; a row forced past the constraints must
    not make that, or the board's Stop, fail."""
    store = Store(db_url)
    run_id = store.create_run("run", "smallcnn", "mnist5k", {}, START)
    sql = SqlClient(db_url)
    force_past_constraints(sql)
    update_parameters(sql, run_id, {"learning_rate": "-5", "stop_train": "TRUE"})
    version = store.submit_parameters(run_id, stop_train=False, pause_train=False)
    state = store.get_parameters(run_id)
    assert (state.version, state.stop_train, state.learning_rate) == (version, False, -5)
    with pytest.raises(ValueError, match="learning rate"):  # a new value is still checked
        store.submit_parameters(run_id, weight_decay=0.1)
    sql.close()
    store.close()


# -- at the listener -----------------------------------------------------------------

def test_listener_reports_a_bad_version_once_and_keeps_listening(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(db_url)
    run_id = store.create_run("run", "smallcnn", "mnist5k", {}, START)
    sql = SqlClient(db_url)
    force_past_constraints(sql)
    caplog.set_level(logging.WARNING, logger="livetrain.db.listener")
    listener = ParameterListener(store, run_id, seen_version=1, poll_seconds=0.2)
    try:
        assert listener.connected.wait(10)
        update_parameters(sql, run_id, {"version": "12", "learning_rate": "0.002"})
        wait_for("version 12", lambda: listener.changed.is_set())
        assert listener.take().version == 12

        writes = [("3", "version went from 12 to 3: ")]
        if sql.kind == "sqlite":  # PostgreSQL's integer column cannot hold it
            writes.append(("'abc'", "version 'abc' is not an integer: "))
        writes.append(("4", "version went from 12 to 4: "))  # a new bad row: reported too
        found: list[tuple[str, str]] = []
        for written, (value, expected) in enumerate(writes, 1):
            update_parameters(sql, run_id, {"version": value})
            wait_for(f"the notice for version {value}",
                     lambda n=written: collect(listener, found) >= n, timeout=10)
            assert found[-1][1].startswith(expected)
        time.sleep(1.0)  # five safety polls and, on SQLite, every commit: no repeats
        found.extend(listener.notices())
        assert [code for code, _ in found] == ["parameters_version_invalid"] * len(writes)
        assert all("write version = 13 or more" in message for _, message in found)
        assert listener.take() is None and listener.connected.is_set()

        update_parameters(sql, run_id, {"version": "13", "dropout": "20"})
        wait_for("version 13", lambda: listener.changed.is_set())
        state = listener.take()
        assert (state.version, state.dropout) == (13, 20)
    finally:
        listener.close()
    assert not [r for r in caplog.records if "could not read" in r.getMessage()]
    sql.close()
    store.close()


def collect(listener: ParameterListener, found: list[tuple[str, str]]) -> int:
    found.extend(listener.notices())
    return len(found)


# -- against a real trainer ----------------------------------------------------------

def wait_for_rejection(sql: SqlClient, run_id: int, version: int) -> str:
    return wait_for(f"the rejection of version {version}", lambda: sql.one(
        "SELECT message FROM events WHERE run_id = ? AND code = 'parameters_rejected' "
        "AND level = 'warning' AND version = ?", (run_id, version)), timeout=30)[0]


def write_bad_rows(sql: SqlClient, run_id: int) -> tuple[dict[int, str], dict[str, str]]:
    """Each bad value in turn, the previous one put back in the same UPDATE; waits for
    each rejection and for training to go on. Returns {version: quote} and the last
    restore (what the next UPDATE must put back)."""
    rejected: dict[int, str] = {}
    restore: dict[str, str] = {}
    good = dict(GOOD)
    for column, value, quoted in bad_values(sql.kind):
        values = restore | {column: value}
        if column == "rollback_step":
            values["rollback_request"] = "rollback_request + 1"
        logged = max_step(sql, run_id)
        update_parameters(sql, run_id, values)
        version = one(sql, "SELECT version FROM parameters WHERE run_id = ?", run_id)
        assert version not in rejected  # the trigger gave the row a new version
        message = wait_for_rejection(sql, run_id, version)
        assert f"{quoted}: " in message and "training continues" in message, message
        rejected[version] = quoted
        wait_for("training to go on", lambda before=logged: max_step(sql, run_id) > before)
        if column == "rollback_step":  # a request answered by the rejection: handled
            good["rollback_request"] = str(one(
                sql, "SELECT rollback_request FROM parameters WHERE run_id = ?", run_id))
        restore = {column: good[column]}
    return rejected, restore


# SQLite only: its list of bad values is the longer one (a blob, text in numeric columns,
# a 64-bit overflow, a version that is no integer). PostgreSQL's bad rows are read and named
# by the same code, checked on PostgreSQL at the store and the listener above.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_bad_control_rows_are_rejected_and_training_goes_on(tmp_path: Path, db_url: str) -> None:
    with trainer(tmp_path, db_url, *SMALL, "--checkpoint-every", "10") as proc:
        sql = wait_for("the database", lambda: SqlClient(db_url), timeout=30)
        run_id = wait_for("a run", lambda: sql.one("SELECT run_id FROM runs"))[0]
        wait_for("a checkpoint past step 10", lambda: (sql.one(
            "SELECT max(step) FROM checkpoints WHERE run_id = ?", (run_id,))[0] or 0) >= 10)
        force_past_constraints(sql)

        rejected, restore = write_bad_rows(sql, run_id)
        last_seen = max(rejected)

        # Versions the trainer cannot take: one event per row, however often it is read.
        lowered = [("'abc'", "version 'abc' is not an integer")] * (sql.kind == "sqlite")
        lowered.append(("1", f"version went from {last_seen} to 1"))
        for value, expected in lowered:
            update_parameters(sql, run_id, restore | {"version": value})
            restore = {}
            wait_for(expected, lambda pattern=expected + ":%": sql.one(
                "SELECT 1 FROM events WHERE run_id = ? AND code = 'parameters_version_invalid'"
                " AND level = 'warning' AND message LIKE ?", (run_id, pattern)))
        logged = max_step(sql, run_id)
        wait_for("training to go on", lambda: max_step(sql, run_id) > logged + 5)
        time.sleep(2.5)  # more than a safety poll: a bad row is not reported again
        invalid = sql.rows("SELECT message FROM events WHERE run_id = ? "
                           "AND code = 'parameters_version_invalid'", (run_id,))
        assert len(invalid) == len(lowered)
        assert proc.poll() is None and run_status(sql, run_id) == "running"
        assert one(sql, "SELECT applied_version FROM parameters WHERE run_id = ?", run_id) == 1

        # The next good version is applied as usual.
        good = last_seen + 1
        update_parameters(sql, run_id, {"version": str(good), "learning_rate": "0.002"})
        applied_step = wait_for("the good version", lambda: sql.one(
            "SELECT applied_step FROM parameters WHERE run_id = ? AND applied_version = ?",
            (run_id, good)))[0]
        wait_for("3 logs after it", lambda: sum(
            s > applied_step for s, _ in statistics(sql, run_id)) >= 3)
        update_parameters(sql, run_id, {"stop_train": "TRUE", "version": str(good + 1)})
        assert proc.wait(timeout=60) == 0

    assert run_status(sql, run_id) == "stopped"
    rows = statistics(sql, run_id)
    assert all(lr == 0.002 for step, lr in rows if step > applied_step)
    assert all(lr == 3e-4 for step, lr in rows if step <= applied_step)
    events = sql.rows("SELECT version, code FROM events WHERE run_id = ? "
                      "AND code IN ('parameters_rejected', 'rolled_back', 'rollback_unavailable', "
                      "'run_failed')", (run_id,))
    assert sorted(events) == sorted((v, "parameters_rejected") for v in rejected)  # one each
    changes = sql.rows("SELECT version FROM parameter_changes WHERE run_id = ? ORDER BY version",
                       (run_id,))
    assert changes == [(1,), (good,), (good + 1,)]  # no bad row was acknowledged
    assert one(sql, "SELECT count(*) FROM abandoned_statistics WHERE run_id = ?", run_id) == 0
    log = (tmp_path / "train.log").read_text()
    assert "Traceback" not in log and "could not read" not in log and "lost the database" \
        not in log
    sql.close()
