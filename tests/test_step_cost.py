"""bench.step_cost --quick, the CI smoke run: it measures, prints its markdown table and
one verdict per budget (PASS or FAIL: the figures are what they are), and the two-rank
torchrun job it starts reports a count rather than a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_step_cost_quick(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.step_cost", "--quick"], cwd=ROOT, capture_output=True,
        text=True, timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path),
             "PYTHONPATH": str(ROOT)})
    out = done.stdout
    assert done.returncode in (0, 1), out[-3000:] + done.stderr[-3000:]
    assert "| step size | steps | bare ms/step (as written: foreach Adam) |" in out
    assert "| MLP 784-64-64-10, batch 32 | 100 |" in out
    assert "reproduce: python -m bench.step_cost --quick" in out
    verdicts = [line for line in out.splitlines() if line.startswith(("[PASS]", "[FAIL]"))]
    assert len(verdicts) == 4, verdicts
    assert "blocking collectives per non-logging step: livetrain" in out, out[-3000:]
    assert (done.returncode == 1) == any(v.startswith("[FAIL]") for v in verdicts)
