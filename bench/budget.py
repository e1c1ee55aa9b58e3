"""The performance budgets of issue #5, and the one line format every benchmark prints them in.

`python -m bench` collects the lines that start with [PASS] or [FAIL] from each
benchmark's output into the closing summary, so a verdict is printed once, where
it was measured, and never retyped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Trainer overhead at the default cadence, as a ratio to a bare PyTorch loop: train.py
# ("ours") and LiveRun in a plain user loop ("api") alike.
OVERHEAD_RATIO = 1.03
# Control latency p95, beyond one training step.
CONTROL_SLACK_MS = {"postgresql": 50.0, "sqlite": 250.0}
# Board: steady refresh (all callbacks the interval fires) and first load of a run.
REFRESH_P95_MS, REFRESH_BYTES = 30.0, 10_000
FIRST_LOAD_MS, FIRST_LOAD_BYTES = 1000.0, 500_000
# Ingest through the background writer into PostgreSQL.
INGEST_STATS_ROWS_S, INGEST_HIST_ROWS_S, LOG_CALL_P99_MS = 20_000.0, 2_000.0, 0.2
# Memory: relative RSS change allowed.
RSS_DRIFT = 0.05


@dataclass(frozen=True)
class Verdict:
    name: str
    measured: float
    limit: float
    unit: str = ""
    at_least: bool = False  # True: the measured figure must reach the limit

    @property
    def passed(self) -> bool:
        if not math.isfinite(self.measured):
            return False
        return self.measured >= self.limit if self.at_least else self.measured <= self.limit

    def __str__(self) -> str:
        sign = ">=" if self.at_least else "<="
        unit = f" {self.unit}" if self.unit else ""
        return (f"[{'PASS' if self.passed else 'FAIL'}] {self.name}: "
                f"{_fmt(self.measured)}{unit} (budget {sign} {_fmt(self.limit)}{unit})")


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


def report(verdicts: list[Verdict]) -> int:
    """Print each verdict; the exit code a benchmark returns (1 when any budget is missed)."""
    print()
    for verdict in verdicts:
        print(verdict, flush=True)
    return 0 if all(v.passed for v in verdicts) else 1
