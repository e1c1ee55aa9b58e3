"""Ctrl-C: the first asks for a graceful stop; a deliberate second one interrupts."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from livetrain.trainer.signals import StopSignal


@pytest.fixture
def stop() -> Iterator[StopSignal]:
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        yield StopSignal()
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])


def test_the_first_signal_asks_for_a_graceful_stop(stop: StopSignal) -> None:
    assert not stop.requested.is_set()
    stop._handle(signal.SIGTERM, None)
    assert stop.requested.is_set()


def test_a_forwarded_copy_is_the_same_request(stop: StopSignal) -> None:
    """torchrun forwards the terminal's Ctrl-C to ranks that already had it."""
    stop._handle(signal.SIGINT, None)
    stop._handle(signal.SIGINT, None)  # within a second: not an interrupt
    assert stop.requested.is_set()


def test_a_second_ctrl_c_later_interrupts(stop: StopSignal) -> None:
    stop._handle(signal.SIGINT, None)
    stop._first -= StopSignal.SAME_REQUEST_SECONDS + 0.1  # as if pressed a while ago
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)
