"""db/schema.sql (what docker-compose loads) and the code build the same database."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    Table,
    Text,
    create_engine,
    inspect,
    make_url,
    text,
)

from livetrain.db.contract import DEFAULTS, Hyperparameters
from livetrain.db.schema import add_missing_columns, metadata, postgresql_ddl
from livetrain.db.store import Store

SCHEMA_SQL = Path(__file__).resolve().parent.parent / "db" / "schema.sql"

SNAPSHOT_QUERIES = {
    "columns": """
        SELECT table_name, column_name, data_type, is_nullable, column_default
        FROM information_schema.columns WHERE table_schema = 'public'
        ORDER BY table_name, column_name""",
    "constraints": """
        SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid)
        FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
        WHERE n.nspname = 'public' ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = 'public' ORDER BY 1, 2""",
    "triggers": """
        SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid)
        FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2""",
    "functions": """
        SELECT p.proname, pg_get_functiondef(p.oid) FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'
        ORDER BY 1""",
}


def snapshot(url: str) -> dict[str, list[tuple]]:
    engine = create_engine(url)
    with engine.connect() as conn:
        shot = {k: [tuple(r) for r in conn.execute(text(q))] for k, q in SNAPSHOT_QUERIES.items()}
    engine.dispose()
    return shot


def load_with_psql(url: str) -> None:
    """Load the file as docker-entrypoint-initdb.d does: psql, stop on the first error."""
    parsed = make_url(url)
    subprocess.run(
        [
            "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
            "-h", parsed.host or "127.0.0.1", "-p", str(parsed.port or 5432),
            "-U", parsed.username or "postgres", "-d", parsed.database, "-f", str(SCHEMA_SQL),
        ],
        check=True,
        capture_output=True,
    )


def load_with_driver(url: str) -> None:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(SCHEMA_SQL.read_text())
    engine.dispose()


def test_schema_sql_is_generated_from_the_code() -> None:
    assert SCHEMA_SQL.read_text() == postgresql_ddl(), "run `make schema` to regenerate it"


def test_schema_sql_equals_what_the_code_creates(postgres_url: str, postgres_admin_url: str):
    code_url = postgres_url
    Store(code_url).close()

    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    file_db = make_url(code_url).database + "_file"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{file_db}"')
    file_url = make_url(code_url).set(database=file_db).render_as_string(hide_password=False)
    try:
        if shutil.which("psql"):
            load_with_psql(file_url)
        else:
            load_with_driver(file_url)
        from_file, from_code = snapshot(file_url), snapshot(code_url)
        tables = {r[0] for r in from_file["columns"]}
        assert tables == set(metadata.tables)
        assert tables >= {
            "runs", "parameters", "parameter_changes", "statistics", "activations", "events"
        }
        for part in SNAPSHOT_QUERIES:
            assert from_file[part] == from_code[part], part
        assert len(from_file["triggers"]) == 2
        # The code leaves an existing database alone (tables and triggers are not re-created).
        Store(file_url).close()
        assert snapshot(file_url) == from_file
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{file_db}" WITH (FORCE)')
        admin.dispose()


def test_sqlite_has_the_same_tables_and_columns(sqlite_url: str, postgres_url: str) -> None:
    def columns(url: str) -> dict[str, list[str]]:
        engine = Store(url).engine
        found = inspect(engine)
        out = {t: sorted(c["name"] for c in found.get_columns(t)) for t in found.get_table_names()}
        engine.dispose()
        return out

    assert columns(sqlite_url) == columns(postgres_url)


def start_together(url: str, processes: int = 4) -> list[BaseException]:
    """Open `processes` stores on `url` at the same moment; the errors they raised."""
    barrier = threading.Barrier(processes)
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            Store(url).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(processes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return errors


def test_processes_starting_together_on_an_empty_database(db_url: str) -> None:
    """A sweep, or the board and a trainer, create the tables at the same moment."""
    assert start_together(db_url) == []
    store = Store(db_url)
    assert store.list_runs() == []
    store.close()


def test_a_new_sqlite_file_opened_at_once_by_several_processes_ends_in_wal(tmp_path: Path) -> None:
    """Switching a new file to WAL needs it to itself, and SQLite refuses at once rather
    than waiting when another connection has it open: about 1 start in 11 failed so
    before the switch was retried. Many fresh files make that race show."""
    for round_ in range(40):
        path = tmp_path / f"training-{round_}.db"
        assert start_together(f"sqlite:///{path}") == [], f"round {round_}"
        engine = create_engine(f"sqlite:///{path}")
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        engine.dispose()

def runs_columns(url: str) -> list[tuple]:
    """The runs table's columns as the database describes them (name order)."""
    engine = create_engine(url)
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            rows = conn.execute(text(
                "SELECT column_name, data_type, is_nullable, column_default "
                "FROM information_schema.columns WHERE table_name = 'runs'"))
        else:
            rows = conn.exec_driver_sql("PRAGMA table_info(runs)")
            rows = [(r[1], r[2], r[3], r[4]) for r in rows]
        found = sorted(tuple(r) for r in rows)
    engine.dispose()
    return found


def test_a_database_made_before_tags_and_hidden_gets_them(db_url: str) -> None:
    """An older runs table (no tags, no hidden) with a run in it: create_schema adds the
    columns under its lock, the old row reads as untagged and shown, and the table ends
    up exactly as a fresh database's."""
    store = Store(db_url)
    fresh = runs_columns(db_url)
    run_id = store.create_run("old", "smallcnn", "mnist5k", {}, Hyperparameters(**DEFAULTS))
    with store.engine.begin() as conn:
        for column in ("tags", "hidden"):
            conn.exec_driver_sql(f"ALTER TABLE runs DROP COLUMN {column}")
    store.close()
    assert {"tags", "hidden"}.isdisjoint(c[0] for c in runs_columns(db_url))

    migrated = Store(db_url)  # what a newer board or trainer does on start
    run = migrated.get_run(run_id)
    assert (run["name"], run["tags"], run["hidden"]) == ("old", [], False)
    assert runs_columns(db_url) == fresh
    with migrated.engine.begin() as conn:
        assert add_missing_columns(conn) == []  # nothing left to add: idempotent
    migrated.set_run_tags(run_id, ["kept"])
    assert migrated.get_run(run_id)["tags"] == ["kept"]
    migrated.close()


def test_a_missing_column_that_needs_a_value_is_refused(db_url: str) -> None:
    """NOT NULL without a default cannot be added to rows that exist: nothing changes."""
    store = Store(db_url)
    newer = MetaData()
    runs = Table("runs", newer, *(Column(c.name, c.type) for c in metadata.tables["runs"].c),
                 Column("needs_a_value", Integer, nullable=False),
                 Column("optional_note", Text))
    before = runs_columns(db_url)
    with pytest.raises(RuntimeError, match=r"runs\.needs_a_value"), \
            store.engine.begin() as conn:
        add_missing_columns(conn, [runs])
    assert runs_columns(db_url) == before
    store.close()
