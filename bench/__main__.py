"""`make bench`: every benchmark in turn, each printing its table and its command line."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ("bench.overhead", "bench.control_latency", "bench.ingest", "bench.board_refresh")


def main() -> int:
    failed = 0
    for name in BENCHMARKS:
        print(f"\n== {name}", flush=True)
        failed += subprocess.run([sys.executable, "-m", name], check=False).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
