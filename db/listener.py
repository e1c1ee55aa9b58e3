"""The background listener: hands new parameter versions to the training loop.

It waits on the store's change signal (LISTEN/NOTIFY on PostgreSQL, where the
table's trigger NOTIFYs on every update from any client; a commit counter on
SQLite), reads the row when woken, and re-reads it every few seconds anyway as a
safety net. The training loop only tests `changed.is_set()` once per step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from db.store import ParameterState, Store

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

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=self.poll_seconds + 5)

    def _check(self) -> None:
        state = self.store.get_parameters(self.run_id)
        if state is None or state.version <= self._seen_version:
            return
        with self._lock:
            self._seen_version = state.version
            self._latest = state
            self.changed.set()

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
                log.warning("parameter listener lost the database, retrying: %s", exc)
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
