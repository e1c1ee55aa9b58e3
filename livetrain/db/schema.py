"""The database contract: every table, column, constraint and trigger.

One MetaData serves PostgreSQL and SQLite. `db/schema.sql` is this module's
PostgreSQL DDL, regenerated with `python -m livetrain.db.schema > db/schema.sql`; a test
proves the file and `create_schema` build the same database.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    DDL,
    JSON,
    Boolean,
    CheckConstraint,
    Column,
    Connection,
    DateTime,
    Double,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    create_mock_engine,
    event,
    false,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.schema import CreateColumn
from sqlalchemy.sql.expression import FunctionElement
from sqlalchemy.types import TypeDecorator

from livetrain.db.contract import (
    DROPOUT_MAX,
    GRAD_CLIP_MAX,
    LR_MAX,
    OPTIMIZERS,
    RUN_STATUSES,
    WEIGHT_DECAY_MAX,
)

EVENT_LEVELS = ("info", "warning", "error")
NOTIFY_CHANNEL = "parameters_changed"  # the PostgreSQL triggers and LISTEN use this name


class UtcNow(FunctionElement):
    """The database's clock with sub-second precision on both back ends."""

    type = DateTime(timezone=True)
    inherit_cache = True


@compiles(UtcNow, "postgresql")
def _utc_now_pg(element: UtcNow, compiler: Any, **kw: Any) -> str:
    return "clock_timestamp()"


@compiles(UtcNow, "sqlite")
def _utc_now_sqlite(element: UtcNow, compiler: Any, **kw: Any) -> str:
    return "(strftime('%Y-%m-%d %H:%M:%f', 'now'))"


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in Python; timestamptz on PostgreSQL, UTC text on SQLite."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware UTC datetime")
        if dialect.name == "sqlite":
            return value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


JSONDocument = JSON().with_variant(postgresql.JSONB(), "postgresql")
FloatList = JSON().with_variant(postgresql.ARRAY(Double()), "postgresql")
IntList = JSON().with_variant(postgresql.ARRAY(Integer()), "postgresql")

metadata = MetaData()


def _timestamp(name: str, nullable: bool = False, **kw: Any) -> Column:
    return Column(name, UTCDateTime(), nullable=nullable, server_default=UtcNow(), **kw)


def _layer_step_key() -> tuple[Column, Column, Column]:
    """The key of the per-layer telemetry tables: one row per run, logged step and layer."""
    return (
        Column("run_id", Integer, ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True),
        Column("step", Integer, primary_key=True),
        Column("layer_name", Text, primary_key=True),
    )


def _run_fk() -> Column:
    return Column(
        "run_id", Integer, ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False
    )


runs = Table(
    "runs",
    metadata,
    Column("run_id", Integer, primary_key=True),
    Column("name", Text, nullable=False),
    Column("model_name", Text, nullable=False),
    Column("dataset", Text, nullable=False),
    Column("status", Text, nullable=False, server_default="running"),
    _timestamp("dt_started"),
    _timestamp("dt_heartbeat"),
    Column("dt_ended", UTCDateTime(), nullable=True),
    Column("config", JSONDocument, nullable=False),
    # Written by the board (or any client), never by the trainer: a JSON list of short
    # labels, and whether the run is left out of the board's run lists.
    Column("tags", JSONDocument, nullable=False, server_default=text("'[]'")),
    Column("hidden", Boolean, nullable=False, server_default=false()),
    CheckConstraint(_in("status", RUN_STATUSES), name="runs_status_check"),
)

_PARAMETER_CHECKS = (
    CheckConstraint(
        f"learning_rate > 0 AND learning_rate <= {LR_MAX!r}", name="learning_rate_range"
    ),
    CheckConstraint(
        f"weight_decay >= 0 AND weight_decay <= {WEIGHT_DECAY_MAX!r}", name="weight_decay_range"
    ),
    CheckConstraint(f"dropout >= 0 AND dropout <= {DROPOUT_MAX}", name="dropout_range"),
    CheckConstraint(f"grad_clip >= 0 AND grad_clip <= {GRAD_CLIP_MAX!r}", name="grad_clip_range"),
    CheckConstraint(_in("optimizer", OPTIMIZERS), name="optimizer_supported"),
)


def _checks(table: str) -> list[CheckConstraint]:
    return [CheckConstraint(c.sqltext, name=f"{table}_{c.name}") for c in _PARAMETER_CHECKS]


class SQLiteTypeCheck(CheckConstraint):
    """A CHECK only SQLite gets: PostgreSQL's column types already refuse what it refuses.

    SQLite stores any value in any column (an INTEGER column keeps 'x' as text), so
    without these a plain `UPDATE parameters SET rollback_request = 'x'` is accepted.
    """

    inherit_cache = True


@compiles(SQLiteTypeCheck)
def _type_check_elsewhere(element: SQLiteTypeCheck, compiler: Any, **kw: Any) -> None:
    return None  # dropped from CREATE TABLE: the column's type is the check


@compiles(SQLiteTypeCheck, "sqlite")
def _type_check_sqlite(element: SQLiteTypeCheck, compiler: Any, **kw: Any) -> str:
    return compiler.visit_check_constraint(element, **kw)


# What typeof() may answer per column type; a nullable column may also hold NULL.
_SQLITE_TYPES = {Integer: "'integer'", Double: "'integer', 'real'", Text: "'text'",
                 UTCDateTime: "'text'", Boolean: "'integer'"}
# UTCDateTime's text on SQLite: "YYYY-MM-DD HH:MM:SS" and a fraction.
_SQLITE_TIMESTAMP = "'[0-9][0-9][0-9][0-9]-[0-1][0-9]-[0-3][0-9] [0-2][0-9]:[0-5][0-9]:[0-6][0-9]*'"


def _sqlite_type_checks(table: str, columns: list[Column]) -> list[SQLiteTypeCheck]:
    """typeof() checks for `columns` (booleans also 0 or 1, timestamps their text form)."""
    checks = []
    for column in columns:
        name, kind = column.name, type(column.type)
        allowed = _SQLITE_TYPES[kind] + ", 'null'" * bool(column.nullable)
        rule = f"typeof({name}) IN ({allowed})"
        if kind is Boolean:
            rule += f" AND {name} IN (0, 1)"
        elif kind is UTCDateTime:
            rule += f" AND {name} GLOB {_SQLITE_TIMESTAMP}"
        checks.append(SQLiteTypeCheck(rule, name=f"{table}_{name}_type"))
    return checks


_parameter_columns = [
    Column("optimizer", Text, nullable=False),
    Column("learning_rate", Double, nullable=False),
    Column("weight_decay", Double, nullable=False),
    Column("dropout", Integer, nullable=False),
    Column("stop_train", Boolean, nullable=False, server_default=false()),
    Column("pause_train", Boolean, nullable=False, server_default=false()),
    Column("grad_clip", Double, nullable=False, server_default=text("0")),
    # Roll back: set rollback_step and rollback_request = rollback_request + 1; the
    # trainer restores its newest checkpoint at or before rollback_step, once per request.
    Column("rollback_step", Integer),
    Column("rollback_request", Integer, nullable=False, server_default=text("0")),
    Column("version", Integer, nullable=False, server_default=text("1")),
    _timestamp("dt_updated"),
    Column("applied_version", Integer, nullable=False, server_default=text("0")),
    Column("applied_step", Integer, nullable=False, server_default=text("0")),
    _timestamp("dt_applied"),
]
parameters = Table(
    "parameters",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True),
    *_parameter_columns,
    *_checks("parameters"),
    CheckConstraint("rollback_step >= 0", name="parameters_rollback_step_range"),
    CheckConstraint("rollback_request >= 0", name="parameters_rollback_request_range"),
    *_sqlite_type_checks("parameters", _parameter_columns),
)

parameter_changes = Table(
    "parameter_changes",
    metadata,
    Column("change_id", Integer, primary_key=True),
    _run_fk(),
    Column("version", Integer, nullable=False),
    Column("optimizer", Text, nullable=False),
    Column("learning_rate", Double, nullable=False),
    Column("weight_decay", Double, nullable=False),
    Column("dropout", Integer, nullable=False),
    Column("stop_train", Boolean, nullable=False),
    Column("pause_train", Boolean, nullable=False, server_default=false()),
    Column("grad_clip", Double, nullable=False, server_default=text("0")),
    Column("rollback_step", Integer),  # the step restored by this version, if any
    Column("dt_updated", UTCDateTime(), nullable=False),
    Column("applied_step", Integer, nullable=False),
    Column("dt_applied", UTCDateTime(), nullable=False),
    UniqueConstraint("run_id", "version", name="parameter_changes_run_version"),
)

statistics = Table(
    "statistics",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True),
    Column("step", Integer, primary_key=True),
    Column("epoch", Integer, nullable=False),
    Column("dt", UTCDateTime(), nullable=False),
    Column("optimizer", Text, nullable=False),
    Column("learning_rate", Double, nullable=False),  # in force at the step's update
    Column("weight_decay", Double, nullable=False),
    Column("dropout", Integer, nullable=False),
    # The lr the run was set to (at its start or from the board) that its scheduler scaled
    # into learning_rate: their ratio is the schedule's factor, which the health rules
    # read as intended (issue 21). NULL in rows of older versions: no schedule known.
    Column("base_learning_rate", Double),
    Column("train_loss", Double),
    Column("train_accuracy", Double),
    Column("validate_loss", Double),
    Column("validate_accuracy", Double),
    Column("samples_per_second", Double),
    # How far each estimate can be trusted (issue 13): the per-step training losses
    # the interval averaged, and the per-batch validation losses. The standard error
    # of train_loss is train_loss_std / sqrt(train_loss_count); the board draws
    # +-2 standard errors as a band, and the health rules test against it.
    Column("train_loss_count", Integer),  # steps averaged into train_loss
    Column("train_loss_std", Double),  # sample std of those steps' losses
    Column("validate_loss_count", Integer),  # validation batches averaged
    Column("validate_loss_std", Double),  # sample std of their losses
)

activations = Table(
    "activations",
    metadata,
    *_layer_step_key(),
    Column("nn_part", Text, nullable=False),
    Column("layer_type", Text, nullable=False),
    Column("number", Integer, nullable=False),
    Column("bin_edges", FloatList, nullable=False),
    Column("counts", IntList, nullable=False),
    Column("mean", Double),
    Column("std", Double),
    CheckConstraint("layer_type IN ('conv', 'fc')", name="activations_layer_type_check"),
)

# Rows a rollback cut from the run's live path, kept so the board can show the
# abandoned branch apart from the path training continued on.
abandoned_statistics = Table(
    "abandoned_statistics",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False),
    Column("branch", Integer, nullable=False),  # 1 for the run's first rollback, 2, ...
    Column("rolled_back_to", Integer, nullable=False),
    *(Column(c.name, c.type, nullable=c.nullable)
      for c in statistics.columns if c.name != "run_id"),
    PrimaryKeyConstraint("run_id", "branch", "step"),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True),
    Column("step", Integer, primary_key=True),
    Column("epoch", Integer, nullable=False),
    Column("reason", Text, nullable=False),  # periodic, before_change, final
    Column("path", Text, nullable=False),
    Column("bytes", Integer, nullable=False),
    _timestamp("dt"),
)

layer_statistics = Table(
    "layer_statistics",
    metadata,
    *_layer_step_key(),
    # The layer's activation after its nonlinearity, on the first validation batch.
    Column("act_mean", Double),
    Column("act_std", Double),
    Column("zero_fraction", Double),  # exact zeros among all values
    Column("dead_fraction", Double),  # units (channels / features) zero for the whole batch
    Column("has_nonlinearity", Boolean, nullable=False),
    # The weight's gradient and the update of the last optimizer step before the log.
    Column("grad_norm", Double),
    Column("update_ratio", Double),  # mean |dw| / mean |w|: right for Adam as for SGD
    Column("weight_norm", Double),
)

layer_histograms = Table(
    "layer_histograms",
    metadata,
    *_layer_step_key(),
    Column("kind", Text, primary_key=True),
    Column("bin_edges", FloatList, nullable=False),
    Column("counts", IntList, nullable=False),
    CheckConstraint("kind IN ('weight', 'update')", name="layer_histograms_kind_check"),
)

model_layers = Table(
    "model_layers",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer, primary_key=True),  # forward order
    Column("layer_name", Text, nullable=False),
    Column("layer_type", Text, nullable=False),  # the module's class, e.g. Conv2d
    Column("output_shape", Text, nullable=False),  # e.g. "64x32x14x14" for a batch of 64
    Column("parameters", Integer, nullable=False),
    Column("trainable", Integer, nullable=False),  # trainable parameters
    Column("monitored", Boolean, nullable=False),  # a conv/fc layer with telemetry
)

Index("model_layers_run_id_layer_name", model_layers.c.run_id, model_layers.c.layer_name,
      unique=True)

system_metrics = Table(
    "system_metrics",
    metadata,
    Column("sample_id", Integer, primary_key=True),
    _run_fk(),
    _timestamp("dt"),
    Column("step", Integer),
    Column("cpu_percent", Double),  # of one core, as top shows it
    Column("rss_bytes", Double),
    Column("gpu_utilization", Double),
    Column("gpu_memory_bytes", Double),
    Column("samples_per_second", Double),
)
Index("system_metrics_run_id_sample_id", system_metrics.c.run_id, system_metrics.c.sample_id)

events = Table(
    "events",
    metadata,
    Column("event_id", Integer, primary_key=True),
    _run_fk(),
    Column("step", Integer),
    _timestamp("dt"),
    Column("level", Text, nullable=False),
    Column("code", Text, nullable=False),
    Column("message", Text, nullable=False),
    Column("version", Integer),  # the parameters version the event is about, if any
    Column("layer_name", Text),  # the layer a diagnostic is about, if any
    Column("recommendation", Text),
    Column("fix", JSONDocument),  # a parameters change that applies the recommendation
    CheckConstraint(_in("level", EVENT_LEVELS), name="events_level_check"),
)
Index("events_run_id_event_id", events.c.run_id, events.c.event_id)

# One row per problem (issue 13): an episode of a diagnostic condition, keyed by the
# trainer. Its first log also writes an `events` row (the log of what happened); this
# row then follows the condition while it holds and says when it ended.
ALERT_STATUSES = ("open", "resolved", "rolled_back")
alerts = Table(
    "alerts",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True),
    Column("alert_id", Text, primary_key=True),  # chosen by the trainer, unique in the run
    Column("code", Text, nullable=False),  # as in events.code, e.g. loss_rising
    Column("level", Text, nullable=False),
    Column("layer_name", Text),  # the layer it is about, if any
    Column("status", Text, nullable=False),
    Column("first_step", Integer, nullable=False),  # the first log it held at
    Column("last_step", Integer, nullable=False),  # the latest log it still held at
    Column("logs", Integer, nullable=False),  # logs it held at
    Column("resolved_step", Integer),  # the first log it no longer held at (or rolled back to)
    Column("measure", Text),  # what worst_value is, e.g. "update:parameter ratio"
    Column("worst_value", Double),  # the measure at its worst over the episode
    Column("message", Text, nullable=False),  # the latest log's wording
    Column("recommendation", Text),
    Column("fix", JSONDocument),  # a parameters change that applies the recommendation
    _timestamp("dt_first"),
    _timestamp("dt_last"),
    CheckConstraint(_in("level", EVENT_LEVELS), name="alerts_level_check"),
    CheckConstraint(_in("status", ALERT_STATUSES), name="alerts_status_check"),
)
Index("runs_dt_started", runs.c.dt_started)

# Any client may steer a run with a plain UPDATE. The triggers make that safe:
# a change to the desired state always gets a new version and a fresh dt_updated
# (even if the client forgot), and on PostgreSQL every update NOTIFYs the trainer
# on the channel `parameters_changed` with the run_id as payload.
_PG_TRIGGERS = (
    DDL(
        """CREATE FUNCTION parameters_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.version = OLD.version AND (
       NEW.optimizer IS DISTINCT FROM OLD.optimizer
    OR NEW.learning_rate IS DISTINCT FROM OLD.learning_rate
    OR NEW.weight_decay IS DISTINCT FROM OLD.weight_decay
    OR NEW.dropout IS DISTINCT FROM OLD.dropout
    OR NEW.stop_train IS DISTINCT FROM OLD.stop_train
    OR NEW.pause_train IS DISTINCT FROM OLD.pause_train
    OR NEW.grad_clip IS DISTINCT FROM OLD.grad_clip
    OR NEW.rollback_request IS DISTINCT FROM OLD.rollback_request) THEN
    NEW.version := OLD.version + 1;
  END IF;
  IF NEW.version <> OLD.version THEN
    NEW.dt_updated := clock_timestamp();
  END IF;
  RETURN NEW;
END $$"""
    ),
    DDL(
        "CREATE TRIGGER parameters_stamp BEFORE UPDATE ON parameters "
        "FOR EACH ROW EXECUTE FUNCTION parameters_stamp()"
    ),
    DDL(
        """CREATE FUNCTION parameters_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('parameters_changed', NEW.run_id::text);
  RETURN NEW;
END $$"""
    ),
    DDL(
        "CREATE TRIGGER parameters_notify AFTER UPDATE ON parameters "
        "FOR EACH ROW EXECUTE FUNCTION parameters_notify()"
    ),
)
_SQLITE_TRIGGERS = (
    DDL(
        """CREATE TRIGGER parameters_version AFTER UPDATE ON parameters
FOR EACH ROW WHEN NEW.version = OLD.version AND (
     NEW.optimizer IS NOT OLD.optimizer
  OR NEW.learning_rate IS NOT OLD.learning_rate
  OR NEW.weight_decay IS NOT OLD.weight_decay
  OR NEW.dropout IS NOT OLD.dropout
  OR NEW.stop_train IS NOT OLD.stop_train
  OR NEW.pause_train IS NOT OLD.pause_train
  OR NEW.grad_clip IS NOT OLD.grad_clip
  OR NEW.rollback_request IS NOT OLD.rollback_request)
BEGIN
  UPDATE parameters SET version = OLD.version + 1 WHERE run_id = NEW.run_id;
END"""
    ),
    DDL(
        """CREATE TRIGGER parameters_stamp AFTER UPDATE OF version ON parameters
FOR EACH ROW WHEN NEW.version <> OLD.version
BEGIN
  UPDATE parameters SET dt_updated = strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now')
  WHERE run_id = NEW.run_id;
END"""
    ),
)
for _ddl in _PG_TRIGGERS:
    event.listen(parameters, "after_create", _ddl.execute_if(dialect="postgresql"))
for _ddl in _SQLITE_TRIGGERS:
    event.listen(parameters, "after_create", _ddl.execute_if(dialect="sqlite"))


SCHEMA_LOCK = 7_311_001  # PostgreSQL advisory lock key held while the schema is created


def create_schema(engine: Engine) -> None:
    """Create whatever tables (and their triggers) are missing, and add the columns a
    database made by an older version lacks.

    Processes that start together on an empty database (a sweep, the board and a
    trainer) would race between "is it there?" and CREATE; under a lock one creates
    and the others then find everything in place.
    """
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK)))
        elif engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock, taken before the checks
        metadata.create_all(conn, checkfirst=True)
        add_missing_columns(conn)


def add_missing_columns(conn: Connection, tables: Any = None) -> list[str]:
    """`ALTER TABLE ... ADD COLUMN` for each column of `tables` (default: every table)
    that the database lacks; returns them as "table.column".

    Additive only: a column is added only if rows that exist already can have it, that
    is if it is nullable or has a server default. Anything else is refused before any
    change, as it needs a migration by hand. The tables must exist.
    """
    tables = list(metadata.sorted_tables if tables is None else tables)
    found = inspect(conn).get_multi_columns(filter_names=[t.name for t in tables])
    present = {name: {c["name"] for c in columns} for (_, name), columns in found.items()}
    missing = [(t, c) for t in tables for c in t.columns
               if t.name in present and c.name not in present[t.name]]
    refused = [f"{t.name}.{c.name}" for t, c in missing
               if not c.nullable and c.server_default is None]
    if refused:
        raise RuntimeError(f"the database lacks {', '.join(refused)}, NOT NULL without a "
                           "default: add them by hand")
    preparer = conn.dialect.identifier_preparer
    for table, column in missing:
        spec = str(CreateColumn(column).compile(dialect=conn.dialect))
        conn.execute(DDL(f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN "
                         + spec.replace("%", "%%")))
    return [f"{t.name}.{c.name}" for t, c in missing]


def postgresql_ddl() -> str:
    """The PostgreSQL DDL that `create_schema` runs on an empty database."""
    statements: list[str] = []

    def collect(sql: Any, *args: Any, **kw: Any) -> None:
        text_ = str(sql.compile(dialect=engine.dialect)).strip()
        statements.append("\n".join(line.rstrip() for line in text_.splitlines()))

    engine = create_mock_engine("postgresql+psycopg://", collect)
    metadata.create_all(engine, checkfirst=False)
    header = (
        "-- Generated by `python -m livetrain.db.schema`; edit livetrain/db/schema.py, "
        "not this file.\n"
        "-- docker-compose.yml loads it when the postgres volume is first created.\n"
    )
    return header + "\n\n".join(s + ";" for s in statements) + "\n"


if __name__ == "__main__":
    sys.stdout.write(postgresql_ddl())
