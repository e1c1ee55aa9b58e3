"""The background listener: hands new parameter versions to the training loop.

It waits on the store's change signal (LISTEN/NOTIFY on PostgreSQL, where the
table's trigger NOTIFYs on every update from any client; a commit counter on
SQLite), reads the row when woken, and re-reads it every few seconds anyway as a
safety net. The training loop only tests `changed.is_set()` once per step.

A version the trainer cannot take (not an integer, or below the last one seen)
is reported once per such row through `notices()`, which the training loop
drains into its events; the listener never writes to the database itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import Any

from livetrain.db.store import ParameterState, Store, is_integer, shown

log = logging.getLogger(__name__)

SAFETY_POLL_SECONDS = 2.0  # the change signal wakes us; this catches anything missed
WAKE_SECONDS = 0.25  # longest a close() waits for the listening thread


class ParameterListener:
    def __init__(
        self,
        store: Store,
        run_id: int,
        seen_version: int,
        poll_seconds: float | None = None,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.changed = threading.Event()
        self.poll_seconds = poll_seconds or SAFETY_POLL_SECONDS
        self.connected = threading.Event()
        self._seen_version = seen_version
        self._latest: ParameterState | None = None
        self._notices: deque[tuple[str, str]] = deque()  # (code, message), oldest first
        self._reported: tuple[str, datetime | None] | None = None  # the last bad version
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="db-listener", daemon=True)
        self._thread.start()

    def take(self) -> ParameterState | None:
        """The newest unseen parameters row, once; None if nothing new."""
        with self._lock:
            state, self._latest = self._latest, None
            self.changed.clear()
        return state

    def notices(self) -> list[tuple[str, str]]:
        """What the listener found wrong since the last call, as (code, message) for
        warning events; a deque's appends and pops are atomic, so no lock and no wait."""
        found = []
        while self._notices:
            found.append(self._notices.popleft())
        return found

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=self.poll_seconds + 5)

    def _check(self) -> None:
        state = self.store.get_parameters(self.run_id)
        if state is None or not self._version_is_new(state.version, state.dt_updated):
            return
        with self._lock:
            self._seen_version = state.version
            self._latest = state
            self.changed.set()

    def _version_is_new(self, version: Any, stamped: datetime | None) -> bool:
        """True for an integer above the last version seen. A non-integer or lower
        one is reported, once per row (its value and dt_updated), not at every poll."""
        if is_integer(version) and version >= self._seen_version:
            return version > self._seen_version
        if (shown(version), stamped) == self._reported:
            return False
        self._reported = (shown(version), stamped)
        then = (f"the row is ignored and run {self.run_id} keeps its parameters; write "
                f"version = {self._seen_version + 1} or more to steer it again")
        if is_integer(version):
            message = f"version went from {self._seen_version} to {version}: {then}"
        else:
            message = f"version {shown(version)} is not an integer: {then}"
        log.warning("%s", message)
        self._notices.append(("parameters_version_invalid", message))
        return False

    def _run(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                with self.store.parameter_notifications(self.run_id) as wait:
                    self.connected.set()
                    backoff = 0.5
                    self._check()  # anything written before LISTEN took effect
                    self._loop(wait)
            except Exception as exc:  # database down: retry until it is back
                self.connected.clear()
                log.warning("parameter listener could not read run %s's parameters, "
                            "retrying: %s", self.run_id, exc)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _loop(self, wait: Callable[[float], bool]) -> None:
        next_poll = time.monotonic() + self.poll_seconds
        while not self._stopping.is_set():
            # Short waits keep close() prompt; a change signal for this run, or the
            # safety-poll deadline, triggers a read.
            if wait(min(WAKE_SECONDS, self.poll_seconds)) or time.monotonic() >= next_poll:
                self._check()
                next_poll = time.monotonic() + self.poll_seconds
