"""`make bench`: every benchmark in turn, each printing its table, its command line and
its budgets; then every budget once more, with PASS/FAIL, in one closing table."""

from __future__ import annotations

import platform
import subprocess
import sys

import psutil

BENCHMARKS = ("bench.overhead", "bench.frameworks", "bench.control_latency", "bench.ingest",
              "bench.board_refresh", "bench.memory", "bench.seed_design", "bench.step_cost")


def main() -> int:
    verdicts: list[str] = []
    crashed: list[str] = []
    for name in BENCHMARKS:
        print(f"\n== {name}", flush=True)
        own: list[str] = []
        with subprocess.Popen([sys.executable, "-m", name], stdout=subprocess.PIPE,
                              text=True, bufsize=1) as proc:
            for line in proc.stdout or ():
                print(line, end="", flush=True)
                if line.startswith(("[PASS]", "[FAIL]")):
                    own.append(line.rstrip())
        verdicts += own
        if proc.returncode != 0 and not any(v.startswith("[FAIL]") for v in own):
            crashed.append(f"[FAIL] {name} exited with {proc.returncode} before its verdicts")
    memory = psutil.virtual_memory().total / 2**30
    print(f"\n== budgets ({platform.processor() or platform.machine()}, "
          f"{psutil.cpu_count()} cores, {memory:.0f} GiB, Python {platform.python_version()})")
    for line in verdicts + crashed:
        print(line)
    missed = sum(v.startswith("[FAIL]") for v in verdicts)
    print(f"\n{len(verdicts) - missed} of {len(verdicts)} budgets met"
          + (f"; {len(crashed)} benchmark(s) crashed" if crashed else ""))
    return 1 if missed or crashed else 0


if __name__ == "__main__":
    raise SystemExit(main())
