"""The small formatting rules shared by the board's panels (statuses: livetrain.db.contract)."""

from __future__ import annotations


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
