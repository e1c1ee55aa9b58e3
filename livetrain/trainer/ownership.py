"""Who drives a run: one trainer per run, told apart by host, pid and the pid's start.

Resuming a run while its trainer still lives would have two trainers write the same
steps, so a resume first makes sure the recorded trainer is gone: dead on this host,
or silent for long enough to count as lost (livetrain.db.contract).
"""

from __future__ import annotations

import math
import os
import platform
import sys
import threading
from datetime import datetime
from typing import Any

import psutil

from livetrain.db.contract import LIVE_STATUSES, LOST_AFTER_SECONDS, effective_status, heartbeat_age
from livetrain.db.store import Store, now


def say(line: str) -> None:
    """A line on stderr in one write: torchrun's ranks share the terminal (or log), and
    print() writes the text and its newline separately, so lines could interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


MAX_PID = 2**31 - 1  # anything larger read from the database is not a pid
SAME_PROCESS_SECONDS = 1.0  # start times this close: the same process, not a reused pid
WAIT_POLL_SECONDS = 1.0


def trainer_identity() -> dict[str, Any]:
    """What tells this trainer apart from any other, recorded in the run's config: the
    host, the pid and the pid's start time (a pid is reused once its process is gone)."""
    return {"host": platform.node(), "pid": os.getpid(),
            "pid_started": psutil.Process().create_time()}


def trainer_gone(config: Any) -> bool:
    """True when the run's recorded trainer ran on this host and plainly is no more: its
    pid is not alive, is a zombie, or now belongs to a process started at another time.

    The config comes from the database, so any value may be missing or of any type;
    whatever cannot prove the trainer dead counts as "it may live" (False)."""
    if not isinstance(config, dict) or config.get("host") != platform.node():
        return False
    pid, started = config.get("pid"), config.get("pid_started")
    if type(pid) is not int or not 0 < pid <= MAX_PID:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        created = process.create_time()
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # not ours to inspect: it may be the trainer
        return False
    if type(started) not in (int, float) or not math.isfinite(started):
        return False  # a run recorded before start times were: cannot tell a reused pid
    return abs(created - started) > SAME_PROCESS_SECONDS


def is_this_trainer(config: Any) -> bool:
    """True when the run's recorded trainer is this very process (it claimed the run)."""
    if not isinstance(config, dict):
        return False
    me = trainer_identity()
    return config.get("host") == me["host"] and config.get("pid") == me["pid"] \
        and config.get("pid_started") == me["pid_started"]


def describe_trainer(run: dict[str, Any], moment: datetime) -> str:
    """"its trainer (pid 123 on host) sent a heartbeat 2 s ago", from untrusted values."""
    config = run["config"] if isinstance(run["config"], dict) else {}
    return (f"its trainer (pid {str(config.get('pid'))[:20]} on {str(config.get('host'))[:80]}) "
            f"sent a heartbeat {heartbeat_age(run, moment):.0f} s ago")


def wait_until_lost(store: Store, run_id: int, stop: threading.Event) -> None:
    """Return once the run no longer counts as live (or its trainer is plainly gone).

    LookupError when the run disappears or Ctrl-C ends the wait; nothing is changed."""
    said = False
    while True:
        run, moment = store.get_run(run_id), now()
        if run is None:
            raise LookupError(f"run {run_id} was deleted while waiting for it")
        if effective_status(run, moment) not in LIVE_STATUSES or trainer_gone(run["config"]):
            return
        if not said:
            say(f"waiting for run {run_id} to count as lost: {describe_trainer(run, moment)}; "
                f"a run counts as lost after {LOST_AFTER_SECONDS:.0f} s without one "
                "(Ctrl-C to give up)")
            said = True
        if stop.wait(WAIT_POLL_SECONDS):
            raise LookupError(f"stopped waiting for run {run_id}; it is left as it was")


def claim_run(store: Store, run: dict[str, Any], stop: threading.Event,
              wait: bool = False) -> None:
    """Make sure no other trainer still drives the run, then record this one as its trainer.

    A live run may be resumed at once when its trainer ran on this host and is gone (a
    crash, kill -9); otherwise only once its heartbeat is old enough for it to count as
    lost: refused now, or awaited with --wait."""
    moment, run_id = now(), run["run_id"]
    status = effective_status(run, moment)
    if status in LIVE_STATUSES and not is_this_trainer(run["config"]):  # two trainers, one run
        if trainer_gone(run["config"]):
            say(f"run {run_id} is {status} but its trainer on this host is gone: "
                "resuming at once")
        elif wait:
            wait_until_lost(store, run_id, stop)
        else:
            age = heartbeat_age(run, moment)
            raise LookupError(
                f"run {run_id} is {status}: {describe_trainer(run, moment)}. Stop it "
                f"first; if it is dead, it counts as lost {LOST_AFTER_SECONDS - age:.0f} s "
                "from now (add --wait to resume then)")
    store.record_trainer(run_id, trainer_identity())
