"""`train.py --sweep lr=1e-1,1e-3 --sweep dropout=0,50 --parallel 2`: one ordinary run per
combination, each its own train.py process, at most --parallel at a time.

Each run is a normal run: the board lists it, and its own parameters row steers it.
Ctrl-C (or SIGTERM) is passed on once to every running child, which stops
gracefully; runs not started yet are not started.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import threading
import time
from pathlib import Path

ALIASES = {"lr": "--lr", "wd": "--weight-decay"}


def parse_axis(text: str) -> tuple[str, list[str]]:
    """"lr=1e-1,1e-3" -> ("--lr", ["1e-1", "1e-3"]); any train.py option may be an axis."""
    name, sep, values = text.partition("=")
    options = [v for v in values.split(",") if v]
    if not sep or not name.strip() or not options:
        raise argparse.ArgumentTypeError(
            f"{text!r}: write NAME=V1,V2,... (for example lr=1e-1,1e-3)")
    name = name.strip().removeprefix("--")
    return ALIASES.get(name, "--" + name), options


def combinations(axes: list[tuple[str, list[str]]]) -> list[list[str]]:
    """Every combination as train.py arguments, the first axis varying slowest."""
    return [
        [token for (flag, _), value in zip(axes, values, strict=True) for token in (flag, value)]
        for values in itertools.product(*(options for _, options in axes))
    ]


def without_sweep(argv: list[str]) -> list[str]:
    """The command line minus --sweep/--parallel and their values."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in ("--sweep", "--parallel"):
            skip = True
        elif not token.startswith(("--sweep=", "--parallel=")):
            out.append(token)
    return out


def run_name(base: str | None, combo: list[str]) -> str:
    label = " ".join(f"{flag.removeprefix('--')}={value}"
                     for flag, value in zip(combo[::2], combo[1::2], strict=True))
    return f"{base} {label}" if base else f"sweep {label}"


def run(script: Path, base: list[str], combos: list[list[str]], parallel: int,
        base_name: str | None, stop: threading.Event) -> int:
    """Run every combination of `script` (train.py); 0 when every run ended with 0."""
    waiting = [[sys.executable, str(script), *base, *combo,
                "--run-name", run_name(base_name, combo)]
               for combo in combos]
    running: list[subprocess.Popen] = []
    codes: list[int] = []
    print(f"sweep: {len(waiting)} runs, {parallel} at a time", file=sys.stderr)
    passed_on = False
    try:
        while waiting or running:
            while waiting and len(running) < parallel and not stop.is_set():
                # A session of its own: a terminal's Ctrl-C reaches only us; we pass it on once.
                running.append(subprocess.Popen(waiting.pop(0),  # noqa: S603 - our own script
                                                start_new_session=True))
            if stop.is_set() and not passed_on:
                waiting.clear()
                for proc in running:
                    proc.terminate()  # train.py's graceful stop
                passed_on = True
            for proc in [p for p in running if p.poll() is not None]:
                running.remove(proc)
                codes.append(proc.returncode)
            time.sleep(0.2)
    except KeyboardInterrupt:  # a second Ctrl-C: interrupt every run at once
        for proc in running:
            proc.terminate()
        for proc in running:
            proc.wait()
        return 130
    failed = sum(code != 0 for code in codes)
    print(f"sweep: {len(codes)} runs ended, {failed} with an error", file=sys.stderr)
    return 0 if failed == 0 else 1
