"""The background writer: the training thread only enqueues, this thread writes.

Each wake-up drains whatever has queued and writes it in one transaction, so
the batch grows by itself when the database is slow. Plain rows (statistics,
telemetry, events) are written at most every `rows_seconds`: a run that logs every
30 ms would otherwise pay a transaction per log, and this thread's Python holds the
GIL that the training thread waits for (a write is about a millisecond of it). An
acknowledgement, a status, a rollback or the heartbeat goes out at once, with the
rows held so far, so that the board's changes are answered without that wait.

A write that fails is kept and retried, so a database hiccup costs no rows. Past
`spill_after_rows` unwritten rows, the batch goes to a file in `spill_dir` and
memory is freed; spilled batches are written first, oldest first, once the database
answers again (also by a later writer for the same run and directory, as
`train.py --resume` makes).

A spill file is data, never code (see SpillFiles): one that is not a spill file of
this version is set aside with a message, and pickled ones of earlier versions are
never loaded.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import re
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Table
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from livetrain.db import schema as s
from livetrain.db.contract import HEARTBEAT_SECONDS
from livetrain.db.store import ROW_TABLES, Batch, Store, event_row, now

log = logging.getLogger(__name__)

SPILL_AFTER_ROWS = 20_000  # unwritten rows held in memory before they go to a file
ROWS_SECONDS = 0.25  # plain rows wait this long at most (a board refreshes every second)
# Errors that mean "not now" (server down, connection lost, SQLite locked, pool
# exhausted): the batch is kept and retried. Anything else is a row the database
# refuses; it is isolated and dropped so that it cannot block the rest.
UNREACHABLE = (OperationalError, InterfaceError, PoolTimeout)


class BackgroundWriter:
    def __init__(
        self,
        store: Store,
        run_id: int,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        close_seconds: float = 30.0,
        spill_dir: Path | None = None,
        spill_after_rows: int = SPILL_AFTER_ROWS,
        rows_seconds: float = ROWS_SECONDS,
    ) -> None:
        self.store = store
        self.rows_seconds = rows_seconds
        self.close_seconds = close_seconds
        self.run_id = run_id
        self.heartbeat_seconds = heartbeat_seconds
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._closing = threading.Event()
        self._pending = Batch()
        self._held: tuple[str, Any] | None = None
        self.spill = SpillFiles(spill_dir) if spill_dir is not None else None
        self.spill_after_rows = spill_after_rows
        if self.spill is not None and (refused := self.spill.refuse_pickled()):
            log.warning("%s", refused)
            self.event("warning", "spill_refused", refused)
        self.rows_written = 0
        self.rows_dropped = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="db-writer", daemon=True)
        self._thread.start()

    # -- called from the training thread: enqueue only -----------------------

    def statistics(self, row: dict[str, Any]) -> None:
        self._queue.put(("statistics", [row]))

    def rows(self, table: str, rows: list[dict[str, Any]]) -> None:
        """Rows for one of the plain-insert tables (db.store.ROW_TABLES)."""
        if table not in ROW_TABLES:
            raise ValueError(f"not a row table: {table}")
        self._queue.put((table, rows))

    def event(self, level: str, code: str, message: str, **details: Any) -> None:
        """details: step, version, layer_name, recommendation, fix (see the events table)."""
        self._queue.put(("events", [event_row(level, code, message, **details)]))

    def acknowledge(self, change: dict[str, Any]) -> None:
        """A parameters version was adopted: history row plus applied_* on the parameters row."""
        self._queue.put(("ack", change))

    def checkpoint_removed(self, step: int) -> None:
        self._queue.put(("removed_checkpoint", step))

    def config(self, values: dict[str, Any]) -> None:
        """Keys to set in runs.config, the others kept (e.g. a parameter count known
        only once a lazy model has seen its first batch)."""
        self._queue.put(("config", dict(values)))

    def rollback(self, step: int) -> None:
        """The run went back to `step`: rows queued before this call belong to the
        abandoned branch, rows queued after it to the live path."""
        self._queue.put(("abandon", step))

    def status(self, status: str, ended: bool = False) -> None:
        self._queue.put(("status", (status, now() if ended else None)))

    def close(self) -> bool:
        """Flush what is queued and stop; False if rows could not be written in time."""
        self._closing.set()
        self._queue.put(("wake", None))
        self._thread.join(self.close_seconds + 5)
        return not self._thread.is_alive() and not self._unwritten()

    def _unwritten(self) -> bool:
        return bool(len(self._pending)) or (self.spill is not None and bool(self.spill.files()))

    # -- the writer thread ----------------------------------------------------

    def _take(self, kind: str, item: Any) -> bool:
        """Add an item to the pending batch; False if the batch must be flushed first."""
        batch = self._pending
        if kind == "abandon":
            if len(batch):
                return False
            batch.abandon_after = item
        elif kind == "removed_checkpoint":
            batch.removed_checkpoints.append(item)
        elif kind in ROW_TABLES:
            getattr(batch, kind).extend(item)
        elif kind == "ack":
            batch.acknowledgements.append(item)
        elif kind == "config":
            batch.config.update(item)
        elif kind == "status":
            batch.status, ended = item
            batch.ended = ended or batch.ended
        return True

    def _drain(self, block_seconds: float) -> None:
        try:
            item = self._held or self._queue.get(timeout=block_seconds)
            self._held = None
            while self._take(*item):
                item = self._queue.get_nowait()
            self._held = item  # a rollback waits for the rows before it to be written
        except queue.Empty:
            pass

    def _urgent(self) -> bool:
        """Whether the pending batch holds what must not wait for `rows_seconds`: what
        the board waits on (an acknowledgement, a status), a rollback held back, the
        heartbeat, a change to the run's config or checkpoints."""
        batch = self._pending
        return bool(self._held or batch.acknowledgements or batch.status or batch.heartbeat
                    or batch.config or batch.removed_checkpoints
                    or batch.abandon_after is not None)

    def _run(self) -> None:
        next_beat = 0.0
        retry_at = 0.0
        backoff = 0.0
        rows_due = 0.0  # plain rows wait until then (rows_seconds after the last write)
        deadline: float | None = None
        while True:
            if self._closing.is_set() and deadline is None:
                deadline = time.monotonic() + self.close_seconds
            clock = time.monotonic()
            wait = 0.0 if deadline or self._held else max(
                0.0, retry_at - clock, min(self.heartbeat_seconds / 2,
                                           rows_due - clock if len(self._pending) else math.inf))
            self._drain(wait)
            clock = time.monotonic()
            if clock >= next_beat:
                self._pending.heartbeat = now()
            held_back = clock < rows_due and not deadline and not self._urgent()
            if self._unwritten() and clock >= retry_at and not held_back:
                rows_due = clock + self.rows_seconds
                beat = self._pending.heartbeat is not None
                if self._flush():
                    backoff = 0.0
                    next_beat = clock + self.heartbeat_seconds if beat else next_beat
                else:
                    backoff = min(max(backoff * 2, 0.1), 5.0)
                    retry_at = clock + backoff
                    if (self.spill is not None and self._pending.rows() >= self.spill_after_rows
                            and self.spill.push(self._pending)):
                        self._pending = Batch()
            if deadline is not None:
                if not self._unwritten() and self._held is None and self._queue.empty():
                    return
                if time.monotonic() > deadline:
                    return
                time.sleep(max(0.0, min(retry_at - time.monotonic(), 0.5)))

    def _flush(self) -> bool:
        """Spilled batches first, oldest first, then the pending one; False when the
        database cannot be reached (what is left stays where it was)."""
        for path in self.spill.files() if self.spill is not None else []:
            try:
                batch = self.spill.load(path)
            except SpillRefusedError as exc:
                self._refuse(path, exc)
                continue
            left = self._write(batch)
            if len(left):
                self.spill.replace(path, left)
                return False
            self.spill.remove(path)
        self._pending = self._write(self._pending)
        return not len(self._pending)

    def _refuse(self, path: Path, reason: SpillRefusedError) -> None:
        """A spill file that is not one of ours: moved aside, said, and not written."""
        aside = self.spill.set_aside(path)
        message = f"spill file {path} refused: {reason}; its rows are not written"
        message += f" (moved to {aside.name})" if aside else ""
        log.error("%s", message)
        self._pending.events.append(event_row("warning", "spill_refused", message))

    def _write(self, batch: Batch) -> Batch:
        """Write a batch; returns what is left unwritten (empty unless unreachable)."""
        try:
            self.store.write_batch(self.run_id, batch)
        except UNREACHABLE as exc:  # down, restarting or locked: keep the rows, retry
            self.failures += 1
            log.warning("database write failed (%s rows kept for retry): %s", len(batch), exc)
            return batch
        except Exception:  # the database refused something in the batch
            return self._write_one_by_one(batch)
        self.rows_written += len(batch)
        return Batch()

    def _write_one_by_one(self, batch: Batch) -> Batch:
        """Isolate the rows the database refuses so that one cannot block the rest."""
        singles = [Batch(abandon_after=batch.abandon_after)]
        singles += [Batch(**{name: [r]}) for name in ROW_TABLES for r in getattr(batch, name)]
        singles += [Batch(removed_checkpoints=[s]) for s in batch.removed_checkpoints]
        singles += [Batch(acknowledgements=[r]) for r in batch.acknowledgements]
        singles.append(Batch(config=batch.config, heartbeat=batch.heartbeat,
                             status=batch.status, ended=batch.ended))
        singles = [single for single in singles if len(single)]
        for i, single in enumerate(singles):
            try:
                self.store.write_batch(self.run_id, single)
                self.rows_written += len(single)
            except UNREACHABLE as exc:  # lost the database halfway: keep the rest
                self.failures += 1
                log.warning("database write failed, rows kept for retry: %s", exc)
                return _merge(singles[i:])
            except Exception as exc:
                self.rows_dropped += len(single)
                log.error("the database refused a row, dropped: %s", exc)
        return Batch()


class SpillRefusedError(ValueError):
    """A spill file that is not a spill file of this version; the message says why."""


SPILL_FORMAT = "unwritten-batch/1"  # the first line of every spill file names it
_SPILL_NAME = re.compile(r"batch-(\d+)\.jsonl")


def _columns(table: Table) -> tuple[frozenset[str], frozenset[str]]:
    """The columns a spilled row may hold (not run_id: the writer sets it; not a
    generated id), and those of them that hold datetimes."""
    generated = {c.name for c in table.primary_key.columns} if len(table.primary_key) == 1 \
        else set()
    names = frozenset(c.name for c in table.columns) - generated - {"run_id"}
    return names, frozenset(c.name for c in table.columns
                            if c.name in names and isinstance(c.type, s.UTCDateTime))


# The Batch fields that hold rows, each with its table's columns.
_SPILLED_ROWS = {name: _columns(table) for name, table in ROW_TABLES.items()} | {
    "acknowledgements": _columns(s.parameter_changes)}


class SpillFiles:
    """Batches the database could not take yet, one file each, named in write order.

    JSON lines: the first line holds the batch's own fields (heartbeat, status, ...),
    each further line one row, as {"table": ..., "row": {...}}. Datetimes are ISO
    text, read back as datetimes by their column's type; floats keep NaN.
    Earlier versions pickled batches (batch-*.pickle); unpickling runs whatever code
    a planted file holds, so those are never loaded, only renamed and reported.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._count = 0

    def files(self) -> list[Path]:
        """The spill files to write, oldest first."""
        if not self.directory.is_dir():
            return []
        found = {p: _SPILL_NAME.fullmatch(p.name) for p in self.directory.glob("batch-*.jsonl")}
        return sorted((p for p, m in found.items() if m), key=lambda p: int(found[p][1]))

    def push(self, batch: Batch) -> bool:
        """Spill a batch to a new file; False (and the batch stays in memory) if it
        cannot be written."""
        newest = self.files()
        self._count = max(self._count, int(_SPILL_NAME.fullmatch(newest[-1].name)[1])
                          if newest else 0) + 1
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.replace(self.directory / f"batch-{self._count:09d}.jsonl", batch)
        except (OSError, TypeError, ValueError) as exc:  # disk full, a value JSON cannot hold
            log.error("could not spill %s rows to %s (%s): they stay in memory",
                      batch.rows(), self.directory, exc)
            return False
        log.warning("database unreachable: %s rows spilled to %s", batch.rows(), self.directory)
        return True

    def replace(self, path: Path, batch: Batch) -> None:
        partial = path.with_suffix(".partial")
        partial.write_text(_encode(batch), encoding="utf-8")
        partial.replace(path)  # a crash mid-write never leaves half a batch

    @staticmethod
    def load(path: Path) -> Batch:
        """The batch in a spill file; SpillRefusedError if it is not one of ours."""
        try:
            if path.is_symlink() or not path.is_file():
                raise ValueError("it is not a regular file")
            return _decode(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:  # JSON, UTF-8 and our checks
            raise SpillRefusedError(str(exc)) from None

    @staticmethod
    def remove(path: Path) -> None:
        path.unlink(missing_ok=True)

    @staticmethod
    def set_aside(path: Path) -> Path | None:
        """Rename a refused file so that it is neither retried nor lost; its new path."""
        aside = path.with_name(path.name + ".refused")
        try:
            path.replace(aside)
        except OSError:
            return None
        return aside

    def refuse_pickled(self) -> str | None:
        """Set aside the pickled spill files of earlier versions, unread; what to say."""
        pickled = sorted(self.directory.glob("batch-*.pickle")) if self.directory.is_dir() \
            else []
        if not pickled:
            return None
        for path in pickled:
            self.set_aside(path)
        return (f"{len(pickled)} spill file(s) of an earlier version in {self.directory} "
                f"(batch-*.pickle) were not loaded: unpickling a file can run any code it "
                f"holds. Renamed to *.pickle.refused; their rows are not written (convert "
                f"them yourself only if you trust them)")


def _encode(batch: Batch) -> str:
    head = {"format": SPILL_FORMAT, "abandon_after": batch.abandon_after,
            "heartbeat": batch.heartbeat, "status": batch.status, "ended": batch.ended,
            "removed_checkpoints": batch.removed_checkpoints, "config": batch.config}
    lines = [json.dumps(head, default=_iso)]
    lines += [json.dumps({"table": name, "row": row}, default=_iso)
              for name in _SPILLED_ROWS for row in getattr(batch, name)]
    return "\n".join(lines) + "\n"


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"a {type(value).__name__} cannot be spilled")


def _decode(text: str) -> Batch:
    """A spill file's batch, checked field by field; ValueError says where it is wrong."""
    lines = text.splitlines()
    head = json.loads(lines[0]) if lines else None
    if not isinstance(head, dict) or head.get("format") != SPILL_FORMAT:
        raise ValueError(f"its first line does not say {SPILL_FORMAT!r}")
    steps = head.get("removed_checkpoints")
    if not isinstance(steps, list) or not all(_integer(v) for v in steps):
        raise ValueError("removed_checkpoints is not a list of steps")
    if not (head.get("abandon_after") is None or _integer(head["abandon_after"])) or not (
            head.get("status") is None or head["status"] in s.RUN_STATUSES):
        raise ValueError("abandon_after or status is not valid")
    config = head.get("config", {})  # spill files of earlier versions have none
    if not isinstance(config, dict):
        raise ValueError("config is not a mapping")
    batch = Batch(removed_checkpoints=steps, abandon_after=head.get("abandon_after"),
                  config=config,
                  heartbeat=_moment(head.get("heartbeat")), status=head.get("status"),
                  ended=_moment(head.get("ended")))
    for number, line in enumerate(lines[1:], start=2):
        item = json.loads(line)
        if not isinstance(item, dict) or item.get("table") not in _SPILLED_ROWS \
                or not isinstance(item.get("row"), dict):
            raise ValueError(f"line {number} is not a row of a known table")
        getattr(batch, item["table"]).append(_row(item["table"], item["row"], number))
    return batch


def _row(table: str, row: dict[str, Any], number: int) -> dict[str, Any]:
    columns, moments = _SPILLED_ROWS[table]
    if unknown := set(row) - columns:
        raise ValueError(f"line {number}: {table} rows have no column {sorted(unknown)[0]!r}")
    return {k: _moment(v) if k in moments else v for k, v in row.items()}


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _moment(value: Any) -> datetime | None:
    """An aware datetime from ISO text (or None); ValueError otherwise."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a date and time")
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone")
    return moment


def _merge(batches: list[Batch]) -> Batch:
    merged = Batch()
    for b in batches:
        for name in ROW_TABLES:
            getattr(merged, name).extend(getattr(b, name))
        merged.removed_checkpoints.extend(b.removed_checkpoints)
        merged.acknowledgements.extend(b.acknowledgements)
        merged.config.update(b.config)
        merged.abandon_after = b.abandon_after if b.abandon_after is not None else (
            merged.abandon_after)
        merged.heartbeat = b.heartbeat or merged.heartbeat
        merged.status = b.status or merged.status
        merged.ended = b.ended or merged.ended
    return merged


class NullWriter:
    """The writer of a torchrun rank other than 0: rank 0 writes for the whole job."""

    def statistics(self, row: dict[str, Any]) -> None:
        pass

    def rows(self, table: str, rows: list[dict[str, Any]]) -> None:
        pass

    def event(self, level: str, code: str, message: str, **details: Any) -> None:
        pass

    def acknowledge(self, change: dict[str, Any]) -> None:
        pass

    def checkpoint_removed(self, step: int) -> None:
        pass

    def config(self, values: dict[str, Any]) -> None:
        pass

    def rollback(self, step: int) -> None:
        pass

    def status(self, status: str, ended: bool = False) -> None:
        pass

    def close(self) -> bool:
        return True
