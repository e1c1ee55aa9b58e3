"""bench.gpu_check on CPU, as CI runs it: exit 0, its table, and the CUDA parts it skipped
named as such."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_on_cpu_names_what_it_skipped(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--quick", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path),
             "PYTHONPATH": str(ROOT)})
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert "| check | result |" in out and "|---|---|" in out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| check ")}
    for check in ("sync: no host-device sync in a non-logging step",
                  "fp16 GradScaler run: telemetry finite",
                  "memory: peak GPU memory, bare vs LiveRun"):
        assert rows[check].endswith("| skipped: needs CUDA |"), rows.get(check)
    assert "skipped on cpu, as they need CUDA: sync" in out
    assert rows["bf16 autocast run: telemetry finite"].split(" | ")[1].startswith(
        ("PASS", "FAIL")), rows
    assert not any("ERROR" in row for row in rows.values()), rows
