"""Every query the trainer and the board make, on PostgreSQL or SQLite alike."""

from __future__ import annotations

import os
import re
import select as socket_select
import sqlite3
import time
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Insert,
    create_engine,
    delete,
    event,
    func,
    insert,
    literal,
    make_url,
    select,
    type_coerce,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.types import NullType

from livetrain.db import schema as s
from livetrain.db.contract import Hyperparameters, validate

DEFAULT_SQLITE_FILE = "training.db"
HYPERPARAMETER_FIELDS = ("optimizer", "learning_rate", "weight_decay", "dropout", "grad_clip")
RUN_NAME_MAX = 200  # characters, after stripping
TAG_MAX = 40  # characters per tag, after stripping
TAGS_MAX = 20  # tags per run


def resolve_url(cli_value: str | None = None) -> str:
    """--db, else $DATABASE_URL, else an SQLite file in the working directory.

    A plain postgresql:// means psycopg 3; an explicit driver, such as the
    postgresql+psycopg2:// of psycopg2-binary, is kept as written."""
    url = cli_value or os.environ.get("DATABASE_URL") or f"sqlite:///{DEFAULT_SQLITE_FILE}"
    if url.startswith("postgres://"):  # Heroku-style alias
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):  # plain scheme: psycopg 3 on every SQLAlchemy 2.x
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


# user:password@ in a URL that make_url cannot parse: masked all the same.
_PASSWORD_IN_URL = re.compile(r"(://[^:/@]*:).*@")


def describe_url(url: str | URL) -> str:
    """The URL with any password masked, for logs, errors and the board; also for a
    URL too malformed to parse, which is exactly when an error names it."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return _PASSWORD_IN_URL.sub(r"\1***@", str(url))


class UnusableDatabaseError(Exception):
    """The database a URL names cannot be used; the message is one line that names the
    URL (password masked) and the cause, fit to print as it is."""


def _one_line(exc: BaseException) -> str:
    """A driver's error as one line: its lines joined, SQLAlchemy's pointer dropped."""
    text = str(getattr(exc, "orig", None) or exc)
    return "; ".join(line.strip() for line in text.splitlines()
                     if line.strip() and not line.startswith("(Background on this error"))


def _unusable(url: str, cause: str) -> UnusableDatabaseError:
    return UnusableDatabaseError(f"database {describe_url(url)}: {cause}")


def open_store(url: str | None = None, pre_ping: bool = True) -> Store:
    """A Store whose database has answered and holds the tables, for a command line
    tool that should say at once, in one line, that its --db cannot be used.

    UnusableDatabaseError for a malformed URL, a missing driver, a server that does not
    answer within the connect timeout, a missing database or one that refuses us."""
    url = resolve_url(url)
    try:
        return Store(url, pre_ping=pre_ping)
    except (SQLAlchemyError, sqlite3.Error) as exc:  # sqlite3's own: from our PRAGMAs
        raise _unusable(url, _one_line(exc)) from None


SQLITE_BUSY_SECONDS = 10.0
CONNECT_SECONDS = 5  # PostgreSQL's connect timeout, unless the URL sets one
SQLITE_WAKE_SECONDS = 0.05  # how often a waiting listener looks for a commit


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # busy_timeout waits out the other process's short write transactions instead
    # of failing; WAL lets the board read while the trainer writes.
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_SECONDS * 1000)}")
    _enter_wal(cursor)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _enter_wal(cursor: Any) -> None:
    """WAL is a property of the file: once set it stays. Setting it needs the file to
    itself, and SQLite answers "database is locked" at once, without the busy handler,
    when another connection opens the new file at the same moment (a sweep, or the
    board and a trainer starting together): so retry for as long as busy_timeout."""
    deadline = time.monotonic() + SQLITE_BUSY_SECONDS
    delay = 0.005
    while True:
        try:  # answers the mode now in force: "memory" for an in-memory database
            if cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() in ("wal", "memory"):
                return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
        if time.monotonic() >= deadline:
            raise sqlite3.OperationalError("database is locked: could not switch it to WAL")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def make_engine(url: str, pre_ping: bool = True) -> Engine:
    """pre_ping: test a pooled PostgreSQL connection before each use (a round trip).
    Without it a connection the server dropped fails once, and the pool is renewed.

    UnusableDatabaseError when the URL cannot be parsed, names an unknown kind of
    database or a driver that is not installed: nothing has connected yet."""
    url = resolve_url(url)
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_SECONDS})
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        # connect_timeout: a host that drops packets fails in seconds, not minutes,
        # unless the URL asks for another wait (?connect_timeout=N).
        timeout = {} if "connect_timeout" in parsed.query else {"connect_timeout": CONNECT_SECONDS}
        return create_engine(
            parsed, pool_pre_ping=pre_ping, pool_size=5, max_overflow=5, connect_args=timeout,
        )
    except NoSuchModuleError:
        raise _unusable(url, f"unknown kind of database {url.partition(':')[0]!r} (use "
                        "sqlite:///FILE or postgresql://USER@HOST/DATABASE)") from None
    except (ArgumentError, ValueError) as exc:
        raise _unusable(url, f"not a database URL ({exc})") from None
    except ImportError as exc:
        raise _unusable(url, f"its driver is not installed ({exc})") from None


def now() -> datetime:
    return datetime.now(UTC)


INVISIBLE_CATEGORIES = frozenset({"Cf", "Zs", "Zl", "Zp"})  # format chars and spaces


def clean_text(text: Any, what: str) -> str:
    """`text` stripped, or ValueError: the one rule for every name and tag, whether the
    board or a script calls the Store. Control characters (NUL among them: PostgreSQL
    refuses it in text) and lone surrogates (not encodable) are refused; so is text
    made only of invisible characters (zero-width spaces, U+FEFF, other format
    characters and spaces), which would show as an empty label."""
    if not isinstance(text, str):
        raise ValueError(f"{what} is text")
    text = text.strip()
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise ValueError(f"{what} cannot contain the control character U+{ord(char):04X}")
    if all(unicodedata.category(char) in INVISIBLE_CATEGORIES for char in text):
        raise ValueError(f"{what} cannot be empty (or only invisible characters)")
    return text


def clean_run_name(name: Any) -> str:
    """The name as stored: stripped, 1 to RUN_NAME_MAX characters; ValueError says why not."""
    name = clean_text(name, "a run name")
    if len(name) > RUN_NAME_MAX:
        raise ValueError(f"a run name has at most {RUN_NAME_MAX} characters ({len(name)} given)")
    return name


def clean_tags(tags: Any) -> list[str]:
    """Tags as stored: each stripped, 1 to TAG_MAX characters and without a comma (the
    board edits them as comma-separated text), duplicates dropped in order, at most
    TAGS_MAX; ValueError says what is wrong."""
    if isinstance(tags, str) or not isinstance(tags, list | tuple):
        raise ValueError("tags are a list of texts")
    cleaned: list[str] = []
    for tag in tags:
        tag = clean_text(tag, "a tag")
        if len(tag) > TAG_MAX:
            raise ValueError(f"a tag has at most {TAG_MAX} characters ({tag[:TAG_MAX]}…)")
        if "," in tag:
            raise ValueError(f"a tag cannot contain a comma ({tag})")
        if tag not in cleaned:
            cleaned.append(tag)
    if len(cleaned) > TAGS_MAX:
        raise ValueError(f"a run has at most {TAGS_MAX} tags ({len(cleaned)} given)")
    return cleaned


def event_row(
    level: str,
    code: str,
    message: str,
    step: int | None = None,
    version: int | None = None,
    **details: Any,
) -> dict[str, Any]:
    """An `events` row; details: layer_name, recommendation, fix."""
    return {"level": level, "code": code, "message": message, "step": step, "dt": now(),
            "version": version, **details}


SHOWN_MAX = 60  # characters of a bad value quoted in an event


def shown(value: Any) -> str:
    """A value as an event quotes it: its repr, cut short (a client may write 100 KB)."""
    text_ = repr(value)
    return text_ if len(text_) <= SHOWN_MAX else text_[: SHOWN_MAX - 1] + "…"


def is_integer(value: Any) -> bool:
    """An int as the database stores one: not a bool, not a float, within 64 bits."""
    return type(value) is int and -(2**63) <= value < 2**63


def _flag(value: Any) -> Any:
    """A boolean column's value as a bool when it is one (SQLite stores 0/1); anything
    else unchanged, for `ParameterState.rejected()` to name."""
    if type(value) is bool or (type(value) is int and value in (0, 1)):
        return bool(value)
    return value


def _moment(value: Any) -> datetime | None:
    """A timestamp column's value as an aware datetime; None if it is not one (a
    client wrote text that is no time), so that reading the row never fails."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# Columns read without SQLAlchemy's conversions, which would turn SQLite's 'x' or 2
# into True and fail on a timestamp that is no time; _flag and _moment convert them.
_RAW_FLAGS = ("stop_train", "pause_train")
_RAW_MOMENTS = ("dt_updated", "dt_applied")


@dataclass(frozen=True)
class ParameterState:
    """One `parameters` row: the desired state of a run and what the trainer applied.

    Values are as read from the database and may be invalid if someone forced
    them past the constraints (or wrote them into an SQLite table made before its
    type checks); `hyperparameters()` and `rejected()` say which.
    """

    run_id: int
    optimizer: str
    learning_rate: float
    weight_decay: float
    dropout: int
    stop_train: bool
    pause_train: bool
    grad_clip: float
    rollback_step: int | None
    rollback_request: int
    version: int
    dt_updated: datetime | None
    applied_version: int
    applied_step: int
    dt_applied: datetime | None

    def hyperparameters(self) -> tuple[Hyperparameters | None, dict[str, str]]:
        """The hyperparameters, or None and a message per bad column naming its value."""
        parsed, errors = validate(
            self.optimizer, self.learning_rate, self.weight_decay, self.dropout, self.grad_clip
        )
        return parsed, {name: f"{name}={shown(getattr(self, name))}: {message}"
                        for name, message in errors.items()}

    def rejected(self) -> dict[str, str]:
        """A message per bad run-control column (stop, pause, rollback), naming its value."""
        rules = {
            "stop_train": (type(self.stop_train) is bool, "not true or false (or 1 or 0)"),
            "pause_train": (type(self.pause_train) is bool, "not true or false (or 1 or 0)"),
            "rollback_step": (
                self.rollback_step is None or (is_integer(self.rollback_step)
                                               and self.rollback_step >= 0),
                "not NULL or a whole number of steps >= 0"),
            "rollback_request": (
                is_integer(self.rollback_request) and self.rollback_request >= 0,
                "not a whole number >= 0"),
        }
        return {name: f"{name}={shown(getattr(self, name))}: {message}"
                for name, (good, message) in rules.items() if not good}

    def new_rollback_request(self, handled: int) -> bool:
        """rollback_request is a valid count above `handled`, the last one handled."""
        return is_integer(self.rollback_request) and self.rollback_request > handled

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ParameterState:
        values = dict(row)
        for name in _RAW_FLAGS:
            values[name] = _flag(values[name])
        for name in _RAW_MOMENTS:
            values[name] = _moment(values[name])
        return cls(**values)


@dataclass
class Batch:
    """What the background writer has collected since its last flush."""

    statistics: list[dict[str, Any]] = field(default_factory=list)
    activations: list[dict[str, Any]] = field(default_factory=list)
    layer_statistics: list[dict[str, Any]] = field(default_factory=list)
    layer_histograms: list[dict[str, Any]] = field(default_factory=list)
    model_layers: list[dict[str, Any]] = field(default_factory=list)
    system_metrics: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)  # snapshots: the last one wins
    acknowledgements: list[dict[str, Any]] = field(default_factory=list)
    removed_checkpoints: list[int] = field(default_factory=list)  # their steps
    # Written before anything else in the batch: a rollback to this step moves the
    # live path's later statistics to abandoned_statistics and drops later telemetry.
    abandon_after: int | None = None
    config: dict[str, Any] = field(default_factory=dict)  # keys merged into runs.config
    heartbeat: datetime | None = None
    status: str | None = None
    ended: datetime | None = None

    def rows(self) -> int:
        """Rows to insert or acknowledge: what the writer's memory bound counts."""
        return sum(len(getattr(self, name)) for name in ROW_TABLES) + len(self.acknowledgements)

    def __len__(self) -> int:
        return (
            self.rows()
            + len(self.removed_checkpoints)
            + (self.abandon_after is not None)
            + bool(self.config)
            + (self.heartbeat is not None)
            + (self.status is not None)
        )


def _uniform(run_id: int, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One executemany needs the same keys in every row: absent ones become NULL."""
    keys = set().union(*rows)
    return [{"run_id": run_id} | {k: r.get(k) for k in keys} for r in rows]


def _notification_wait(driver: Any, driver_name: str, payload: str) -> Callable[[float], bool]:
    """wait(timeout) -> True once a NOTIFY with `payload` arrives on this LISTENing
    connection. psycopg 3 has a blocking notifies(); psycopg2 a list that poll() fills
    once select() says the socket has data."""
    if driver_name != "psycopg2":
        def wait(timeout: float) -> bool:
            return any(note.payload == payload
                       for note in driver.notifies(timeout=timeout, stop_after=1))
        return wait

    def wait_psycopg2(timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            driver.poll()
            notes, driver.notifies[:] = list(driver.notifies), []
            if any(note.payload == payload for note in notes):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            socket_select.select([driver], [], [], left)
    return wait_psycopg2


class SqliteCommitWatch:
    """SQLite's change signal: `PRAGMA data_version` on a connection of our own moves
    when any other connection commits, so a waiting listener reads the row only then."""

    def __init__(self, cursor: Any) -> None:
        self.cursor = cursor
        self.seen = self._version()

    def _version(self) -> int:
        return self.cursor.execute("PRAGMA data_version").fetchone()[0]

    def wait(self, timeout: float) -> bool:
        """True once some connection has committed since the last call, within timeout."""
        deadline = time.monotonic() + timeout
        while True:
            version = self._version()
            if version != self.seen:
                self.seen = version
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(SQLITE_WAKE_SECONDS, left))


# Batch fields written as inserts, in an order that respects foreign keys.
ROW_TABLES = {
    t.name: t
    for t in (
        s.statistics, s.activations, s.layer_statistics, s.layer_histograms,
        s.model_layers, s.system_metrics, s.checkpoints, s.events, s.alerts,
    )
}
# Tables whose rows are snapshots of one thing as it changes: a row replaces the one
# with the same key, on PostgreSQL and SQLite alike (INSERT ... ON CONFLICT DO UPDATE).
UPSERT_KEYS = {"alerts": ("run_id", "alert_id")}


def _latest_per_key(rows: list[dict[str, Any]], key: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per key, the last given: one statement may not update a row twice."""
    return list({tuple(r.get(k) for k in key): r for r in rows}.values())


def _insert(conn: Connection, name: str, rows: list[dict[str, Any]]) -> Insert:
    """A plain INSERT, or for a snapshot table an upsert of the given columns."""
    table = ROW_TABLES[name]
    key = UPSERT_KEYS.get(name)
    if key is None:
        return insert(table)
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table)
    changing = set(rows[0]) - set(key) - {"dt_first"}
    return statement.on_conflict_do_update(
        index_elements=list(key), set_={c: statement.excluded[c] for c in sorted(changing)})


class Store:
    """The database contract as Python calls; one instance per process."""

    def __init__(self, url: str | None = None, create: bool = True,
                 pre_ping: bool = True) -> None:
        self.url = resolve_url(url)
        self.engine = make_engine(self.url, pre_ping)
        if create:
            s.create_schema(self.engine)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    # -- runs ---------------------------------------------------------------

    def create_run(
        self,
        name: str,
        model_name: str,
        dataset: str,
        config: Mapping[str, Any],
        initial: Hyperparameters,
    ) -> int:
        """Insert the run, its parameters row (version 1) and its first history row.

        The name follows the board's rule (clean_run_name): ValueError says why not."""
        started = now()
        with self.engine.begin() as conn:
            run_id = conn.execute(
                insert(s.runs)
                .values(
                    name=clean_run_name(name),
                    model_name=model_name,
                    dataset=dataset,
                    status="running",
                    dt_started=started,
                    dt_heartbeat=started,
                    config=dict(config),
                )
                .returning(s.runs.c.run_id)
            ).scalar_one()
            values = {
                "optimizer": initial.optimizer,
                "learning_rate": initial.learning_rate,
                "weight_decay": initial.weight_decay,
                "dropout": initial.dropout,
                "grad_clip": initial.grad_clip,
                "stop_train": False,
            }
            conn.execute(
                insert(s.parameters).values(
                    run_id=run_id,
                    version=1,
                    dt_updated=started,
                    applied_version=1,
                    applied_step=0,
                    dt_applied=started,
                    **values,
                )
            )
            conn.execute(
                insert(s.parameter_changes).values(
                    run_id=run_id,
                    version=1,
                    dt_updated=started,
                    applied_step=0,
                    dt_applied=started,
                    **values,
                )
            )
        return run_id

    def get_run(self, run_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(s.runs).where(s.runs.c.run_id == run_id)).first()
        return dict(row._mapping) if row else None

    def list_runs(self, limit: int = 200) -> list[dict[str, Any]]:
        """Newest first."""
        query = select(s.runs).order_by(s.runs.c.run_id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def reopen_run(self, run_id: int) -> None:
        """A resumed run is running again."""
        with self.engine.begin() as conn:
            conn.execute(
                update(s.runs)
                .where(s.runs.c.run_id == run_id)
                .values(status="running", dt_heartbeat=now(), dt_ended=None)
            )

    def record_trainer(self, run_id: int, identity: Mapping[str, Any]) -> None:
        """Merge a trainer's identity (host, pid, the pid's start time) into the run's
        config: a resumed run belongs to this process now, and the next `--resume`
        asks whether this one still lives, not the trainer before it."""
        with self.engine.begin() as conn:
            self._merge_config(conn, run_id, identity)

    @staticmethod
    def _merge_config(conn: Connection, run_id: int, values: Mapping[str, Any]) -> None:
        """Set some keys of the run's config, keeping the others: what is learnt about a
        run after it was created (a lazy model's parameter count) must not clobber the
        options it was created with. The row is locked on PostgreSQL, so two merges
        cannot lose each other's keys."""
        runs = s.runs
        config = conn.execute(
            select(runs.c.config).where(runs.c.run_id == run_id).with_for_update()
        ).scalar_one_or_none()
        merged = (config if isinstance(config, dict) else {}) | dict(values)
        conn.execute(update(runs).where(runs.c.run_id == run_id).values(config=merged))

    def checkpoints(self, run_id: int) -> list[dict[str, Any]]:
        """The run's checkpoints on record, oldest first."""
        c = s.checkpoints
        query = select(c).where(c.c.run_id == run_id).order_by(c.c.step)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def latest_checkpoint(self, run_id: int) -> dict[str, Any] | None:
        found = self.checkpoints(run_id)
        return found[-1] if found else None

    def last_logged_step(self, run_id: int) -> int | None:
        st = s.statistics
        with self.engine.connect() as conn:
            return conn.execute(
                select(func.max(st.c.step)).where(st.c.run_id == run_id)
            ).scalar_one()

    # -- the board's bookkeeping of runs: name, tags, hidden --------------------

    def _update_run(self, run_id: int, **values: Any) -> None:
        with self.engine.begin() as conn:
            found = conn.execute(
                update(s.runs).where(s.runs.c.run_id == run_id).values(**values)
            ).rowcount
        if not found:
            raise KeyError(f"run {run_id} does not exist")

    def rename_run(self, run_id: int, name: str) -> str:
        """Store a new name (stripped; see clean_run_name) and return it. Touches only
        this run's `runs` row: never its parameters or another run."""
        name = clean_run_name(name)
        self._update_run(run_id, name=name)
        return name

    def set_run_tags(self, run_id: int, tags: list[str]) -> list[str]:
        """Replace the run's tags (see clean_tags; [] clears them) and return them."""
        tags = clean_tags(tags)
        self._update_run(run_id, tags=tags)
        return tags

    def set_run_hidden(self, run_id: int, hidden: bool) -> None:
        """Hide the run from the board's run lists, or show it again."""
        if not isinstance(hidden, bool):
            raise ValueError("hidden is true or false")
        self._update_run(run_id, hidden=hidden)

    def set_status(self, run_id: int, status: str, ended: bool = False) -> None:
        values: dict[str, Any] = {"status": status, "dt_heartbeat": now()}
        if ended:
            values["dt_ended"] = values["dt_heartbeat"]
        with self.engine.begin() as conn:
            conn.execute(update(s.runs).where(s.runs.c.run_id == run_id).values(**values))

    # -- parameters: the control channel -----------------------------------

    def get_parameters(self, run_id: int) -> ParameterState | None:
        """The run's parameters row; whatever a client wrote into it reads without an
        error (see ParameterState), as the trainer must go on whatever the row holds."""
        p = s.parameters
        columns = [type_coerce(c, NullType()).label(c.name)
                   if c.name in _RAW_FLAGS + _RAW_MOMENTS else c for c in p.columns]
        with self.engine.connect() as conn:
            row = conn.execute(select(*columns).where(p.c.run_id == run_id)).first()
        return ParameterState.from_row(row._mapping) if row else None

    def submit_parameters(
        self,
        run_id: int,
        *,
        optimizer: str | None = None,
        learning_rate: float | None = None,
        weight_decay: float | None = None,
        dropout: int | None = None,
        grad_clip: float | None = None,
        stop_train: bool | None = None,
        pause_train: bool | None = None,
        rollback_step: int | None = None,
    ) -> int:
        """Write a new desired state (version + 1) and return its version.

        Only the given fields change. Invalid values raise ValueError before
        anything is written. A rollback_step is a one-shot request (see schema).
        """
        given = {
            "optimizer": optimizer,
            "learning_rate": learning_rate,
            "weight_decay": weight_decay,
            "dropout": dropout,
            "grad_clip": grad_clip,
        }
        given = {k: v for k, v in given.items() if v is not None}
        current = self.get_parameters(run_id)
        if current is None:
            raise KeyError(f"run {run_id} has no parameters row")
        values: dict[str, Any] = {}
        if given:  # a stop or pause alone is taken even when the row holds bad values
            merged = {k: getattr(current, k) for k in HYPERPARAMETER_FIELDS} | given
            parsed, errors = validate(**merged)
            if errors:
                raise ValueError("; ".join(errors.values()))
            values = {k: getattr(parsed, k) for k in given}
        if rollback_step is not None and rollback_step < 0:
            raise ValueError("rollback step must be 0 or more")
        p = s.parameters
        if stop_train is not None:
            values["stop_train"] = bool(stop_train)
        if pause_train is not None:
            values["pause_train"] = bool(pause_train)
        if rollback_step is not None:
            values["rollback_step"] = rollback_step
            values["rollback_request"] = p.c.rollback_request + 1
        with self.engine.begin() as conn:
            return conn.execute(
                update(p)
                .where(p.c.run_id == run_id)
                .values(version=p.c.version + 1, dt_updated=s.UtcNow(), **values)
                .returning(p.c.version)
            ).scalar_one()

    def request_stop(self, run_id: int) -> int:
        return self.submit_parameters(run_id, stop_train=True)

    def parameter_changes(self, run_id: int) -> list[dict[str, Any]]:
        """Adopted versions, newest first."""
        t = s.parameter_changes
        query = select(t).where(t.c.run_id == run_id).order_by(t.c.version.desc())
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    @contextmanager
    def parameter_notifications(self, run_id: int) -> Iterator[Callable[[float], bool]]:
        """Yields wait(timeout) -> True once `run_id`'s parameters row may have changed
        (within timeout seconds), whoever changed it.

        PostgreSQL: LISTEN; the table's trigger NOTIFYs with the run id. SQLite:
        `PRAGMA data_version` on a connection of our own, every SQLITE_WAKE_SECONDS;
        it moves when any other connection commits, so the row is read only after a
        commit (ours included), not at every poll: reading it 20 times a second
        took 0.4 s of CPU, and of the training loop's GIL, per minute of training.
        """
        with self.engine.connect() as conn:
            if self.dialect == "postgresql":
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                conn.exec_driver_sql("LISTEN parameters_changed")
                notified = _notification_wait(conn.connection.driver_connection,
                                              self.engine.dialect.driver, str(run_id))
                try:
                    yield notified
                finally:
                    conn.exec_driver_sql("UNLISTEN parameters_changed")
                return
            watch = SqliteCommitWatch(conn.connection.driver_connection.cursor())
            try:
                yield watch.wait
            finally:
                watch.cursor.close()

    # -- the background writer's one transaction ----------------------------

    def write_batch(self, run_id: int, batch: Batch) -> None:
        """Write everything collected in one transaction, one statement per table.

        Each insert is an executemany that SQLAlchemy sends as multi-row INSERTs.
        """
        with self.engine.begin() as conn:
            if batch.abandon_after is not None:
                self._abandon_after(conn, run_id, batch.abandon_after)
            if batch.removed_checkpoints:
                c = s.checkpoints
                conn.execute(
                    delete(c).where(c.c.run_id == run_id, c.c.step.in_(batch.removed_checkpoints))
                )
            for name in ROW_TABLES:
                if rows := getattr(batch, name):
                    rows = _uniform(run_id, rows)
                    if name in UPSERT_KEYS:
                        rows = _latest_per_key(rows, UPSERT_KEYS[name])
                    conn.execute(_insert(conn, name, rows), rows)
            if batch.acknowledgements:
                self._insert_changes(conn, run_id, batch.acknowledgements)
                last = max(batch.acknowledgements, key=lambda a: a["version"])
                p = s.parameters
                conn.execute(
                    update(p)
                    .where(p.c.run_id == run_id, p.c.applied_version < last["version"])
                    .values(
                        applied_version=last["version"],
                        applied_step=last["applied_step"],
                        dt_applied=last["dt_applied"],
                    )
                )
            if batch.config:
                self._merge_config(conn, run_id, batch.config)
            run_values: dict[str, Any] = {}
            if batch.heartbeat is not None:
                run_values["dt_heartbeat"] = batch.heartbeat
            if batch.status is not None:
                run_values["status"] = batch.status
            if batch.ended is not None:
                run_values["dt_ended"] = batch.ended
            if run_values:
                conn.execute(update(s.runs).where(s.runs.c.run_id == run_id).values(**run_values))

    @staticmethod
    def _insert_changes(conn: Connection, run_id: int, acks: list[dict[str, Any]]) -> None:
        """History rows for adopted versions, once per version: a resumed trainer adopts
        the row as it stands, whose version its predecessor may already have recorded."""
        pc = s.parameter_changes
        known = set(conn.scalars(select(pc.c.version).where(
            pc.c.run_id == run_id, pc.c.version.in_({a["version"] for a in acks}))))
        if new := [a for a in acks if a["version"] not in known]:
            conn.execute(insert(pc), _uniform(run_id, new))

    @staticmethod
    def _abandon_after(conn: Connection, run_id: int, step: int) -> None:
        st, ab = s.statistics, s.abandoned_statistics
        branch = conn.execute(
            select(func.coalesce(func.max(ab.c.branch), 0) + 1).where(ab.c.run_id == run_id)
        ).scalar_one()
        later = st.c.run_id == run_id, st.c.step > step
        columns = [c.name for c in st.columns]
        conn.execute(
            insert(ab).from_select(
                [*columns, "branch", "rolled_back_to"],
                select(*st.columns, literal(branch), literal(step)).where(*later),
            )
        )
        conn.execute(delete(st).where(*later))
        for table in (s.activations, s.layer_statistics, s.layer_histograms):
            conn.execute(delete(table).where(table.c.run_id == run_id, table.c.step > step))

    def add_event(self, run_id: int, level: str, code: str, message: str, **details: Any) -> None:
        self.write_batch(run_id, Batch(events=[event_row(level, code, message, **details)]))

    # -- reads for the board and tests ---------------------------------------

    def statistics(
        self, run_id: int, after_step: int = -1, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Logged steps after `after_step`, oldest first."""
        t = s.statistics
        query = (
            select(t)
            .where(t.c.run_id == run_id, t.c.step > after_step)
            .order_by(t.c.step)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def latest_activations(self, run_id: int) -> list[dict[str, Any]]:
        """Histograms of the most recent logged step, in layer order."""
        t = s.activations
        latest = select(func.max(t.c.step)).where(t.c.run_id == run_id).scalar_subquery()
        query = (
            select(t)
            .where(t.c.run_id == run_id, t.c.step == latest)
            .order_by(t.c.nn_part, t.c.number)
        )
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def activation_steps(self, run_id: int) -> list[int]:
        t = s.activations
        query = select(t.c.step).where(t.c.run_id == run_id).distinct().order_by(t.c.step)
        with self.engine.connect() as conn:
            return list(conn.execute(query).scalars())

    def events(self, run_id: int, limit: int = 200) -> list[dict[str, Any]]:
        """Newest first."""
        t = s.events
        query = (
            select(t).where(t.c.run_id == run_id).order_by(t.c.event_id.desc()).limit(limit)
        )
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]


    def alerts(self, run_id: int) -> list[dict[str, Any]]:
        """The run's diagnostic episodes, open ones first, then the most recent."""
        t = s.alerts
        query = select(t).where(t.c.run_id == run_id).order_by(
            (t.c.status == "open").desc(), t.c.last_step.desc(), t.c.alert_id)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]
