"""The background writer: the training thread only enqueues, this thread writes.

Each wake-up drains whatever has queued and writes it in one transaction, so
the batch grows by itself when the database is slow. A write that fails is kept
and retried, so a database hiccup costs no rows. Past `spill_after_rows` unwritten
rows, the batch goes to a file in `spill_dir` and memory is freed; spilled batches
are written first, oldest first, once the database answers again (also by a later
writer for the same run and directory, as `train.py --resume` makes).
"""

from __future__ import annotations

import logging
import pickle
import queue
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from db.store import ROW_TABLES, Batch, Store, event_row, now

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 2.0
SPILL_AFTER_ROWS = 20_000  # unwritten rows held in memory before they go to a file
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
    ) -> None:
        self.store = store
        self.close_seconds = close_seconds
        self.run_id = run_id
        self.heartbeat_seconds = heartbeat_seconds
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._closing = threading.Event()
        self._pending = Batch()
        self._held: tuple[str, Any] | None = None
        self.spill = SpillFiles(spill_dir) if spill_dir is not None else None
        self.spill_after_rows = spill_after_rows
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

    def _run(self) -> None:
        next_beat = 0.0
        retry_at = 0.0
        backoff = 0.0
        deadline: float | None = None
        while True:
            if self._closing.is_set() and deadline is None:
                deadline = time.monotonic() + self.close_seconds
            wait = (
                0.0 if deadline or self._held
                else max(retry_at - time.monotonic(), self.heartbeat_seconds / 2)
            )
            self._drain(wait)
            clock = time.monotonic()
            if clock >= next_beat:
                self._pending.heartbeat = now()
            if self._unwritten() and clock >= retry_at:
                beat = self._pending.heartbeat is not None
                if self._flush():
                    backoff = 0.0
                    next_beat = clock + self.heartbeat_seconds if beat else next_beat
                else:
                    backoff = min(max(backoff * 2, 0.1), 5.0)
                    retry_at = clock + backoff
                    if self.spill is not None and self._pending.rows() >= self.spill_after_rows:
                        self.spill.push(self._pending)
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
            left = self._write(self.spill.load(path))
            if len(left):
                self.spill.replace(path, left)
                return False
            self.spill.remove(path)
        self._pending = self._write(self._pending)
        return not len(self._pending)

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
        singles.append(Batch(heartbeat=batch.heartbeat, status=batch.status, ended=batch.ended))
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


class SpillFiles:
    """Batches the database could not take yet, one file each, named in write order."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._count = 0

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("batch-*.pickle")) if self.directory.is_dir() else []

    def push(self, batch: Batch) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        newest = self.files()
        self._count = max(self._count, int(newest[-1].stem.split("-")[1]) if newest else 0) + 1
        self.replace(self.directory / f"batch-{self._count:09d}.pickle", batch)
        log.warning("database unreachable: %s rows spilled to %s", batch.rows(), self.directory)

    def replace(self, path: Path, batch: Batch) -> None:
        partial = path.with_suffix(".partial")
        partial.write_bytes(pickle.dumps(batch))
        partial.replace(path)  # a crash mid-write never leaves half a batch

    @staticmethod
    def load(path: Path) -> Batch:
        return pickle.loads(path.read_bytes())  # noqa: S301 - our own file, written above

    @staticmethod
    def remove(path: Path) -> None:
        path.unlink(missing_ok=True)


def _merge(batches: list[Batch]) -> Batch:
    merged = Batch()
    for b in batches:
        for name in ROW_TABLES:
            getattr(merged, name).extend(getattr(b, name))
        merged.removed_checkpoints.extend(b.removed_checkpoints)
        merged.acknowledgements.extend(b.acknowledgements)
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

    def rollback(self, step: int) -> None:
        pass

    def status(self, status: str, ended: bool = False) -> None:
        pass

    def close(self) -> bool:
        return True
