"""A run's status as the board shows it, and the small formatting rules shared by panels."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

LIVE_STATUSES = ("running", "paused")
LOST_AFTER_SECONDS = 6.0  # three missed 2 s heartbeats


def effective_status(run: Mapping[str, Any], now: datetime) -> str:
    """The stored status, or "lost" when a live run's trainer stopped sending heartbeats."""
    status = run["status"]
    if status in LIVE_STATUSES and heartbeat_age(run, now) > LOST_AFTER_SECONDS:
        return "lost"
    return status


def heartbeat_age(run: Mapping[str, Any], now: datetime) -> float:
    return (now - run["dt_heartbeat"]).total_seconds()


def is_live(status: str) -> bool:
    """True while a trainer still reads the parameters row (a lost one may come back)."""
    return status in (*LIVE_STATUSES, "lost")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def format_number(value: float) -> str:
    """Learning rates and decays as a person would type them: 0.0003, 1e-05, 0."""
    return f"{value:g}"
