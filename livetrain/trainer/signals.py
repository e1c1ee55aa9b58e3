"""Ctrl-C and SIGTERM as a graceful stop request, the way a stop from the board is one."""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any


class StopSignal:
    """First Ctrl-C (or SIGTERM) asks for a graceful stop; a second one interrupts.

    A signal within a second of the first is the same request: under torchrun a
    Ctrl-C reaches each rank twice, from the terminal and forwarded by torchrun.
    """

    SAME_REQUEST_SECONDS = 1.0

    def __init__(self, install: bool = True) -> None:
        self.requested = threading.Event()
        self._first = 0.0
        self._previous: dict[int, Any] = {}
        if install and threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)

    def close(self) -> None:
        """Give the signals back to whoever handled them before (a second run in the same
        process, or the program around it, must not keep our handler)."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested.is_set():
            if time.monotonic() - self._first < self.SAME_REQUEST_SECONDS:
                return
            raise KeyboardInterrupt
        self._first = time.monotonic()
        self.requested.set()
        print("\nstopping after this step (Ctrl-C again to interrupt)", file=sys.stderr)
