"""One command for a newcomer: the board and a training run, on the embedded SQLite default.

    python demo.py                     # what `make demo` runs
    python demo.py --port 8051 -- --model alexnet --lr 1e-3    # args after -- go to train.py

Prints the board's URL; Ctrl-C stops the run gracefully (the trainer finishes
its step, validates, saves a checkpoint) and then the board.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from livetrain.db.store import UnusableDatabaseError, describe_url, open_store, resolve_url

ROOT = Path(__file__).resolve().parent
DEFAULT_TRAIN_ARGS = ["--epochs", "100", "--log-every", "10"]
BOARD_START_SECONDS = 60
TRAINER_STOP_SECONDS = 60  # a step, a full validation and a checkpoint
BOARD_STOP_SECONDS = 10


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:] if argv is None else argv
    train_args = DEFAULT_TRAIN_ARGS
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", default=None, help="SQLAlchemy URL (default: $DATABASE_URL, "
                   "else sqlite:///training.db)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8050)
    return p.parse_args(argv), train_args


def wait_for_board(url: str, board: subprocess.Popen) -> bool:
    deadline = time.monotonic() + BOARD_START_SECONDS
    while time.monotonic() < deadline and board.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - our board
                return response.status == 200
        except OSError:
            time.sleep(0.25)
    return False


def stop(proc: subprocess.Popen, seconds: float) -> int:
    """SIGTERM (a graceful stop for both train.py and board.py), SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args, train_args = parse_args(argv)
    url = resolve_url(args.db)
    try:
        open_store(url).close()  # create the tables once, before two processes race to
    except UnusableDatabaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    board_url = f"http://{args.host}:{args.port}/"
    common = {"cwd": Path.cwd(), "start_new_session": True}  # our signals, not the terminal's
    # Ctrl-C too, explicitly: a process started where SIGINT is ignored (a background job,
    # a test runner's worker) inherits that, and Python then installs no KeyboardInterrupt.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    board = subprocess.Popen(  # noqa: S603 - our own scripts, no shell
        [sys.executable, str(ROOT / "board.py"), "--db", url, "--host", args.host,
         "--port", str(args.port)], **common)
    trainer: subprocess.Popen | None = None
    interrupted = False
    try:
        if not wait_for_board(board_url, board):
            print(f"error: the board did not start on {board_url}", file=sys.stderr)
            return 1
        trainer = subprocess.Popen(  # noqa: S603
            [sys.executable, str(ROOT / "train.py"), "--db", url, "--no-progress", *train_args],
            **common)
        print(f"\n  Board:    {board_url}\n  Database: {describe_url(url)}\n"
              "  Ctrl-C stops the training run and the board.\n", flush=True)
        while trainer.poll() is None and board.poll() is None:
            time.sleep(0.5)
        if board.poll() is None:
            print(f"training ended (exit {trainer.returncode}); the board stays up until "
                  "Ctrl-C", flush=True)
            board.wait()
    except KeyboardInterrupt:
        interrupted = True
        print("\nstopping: the run saves a checkpoint, then the board closes", flush=True)
    finally:
        trainer_code = stop(trainer, TRAINER_STOP_SECONDS) if trainer is not None else 0
        board_code = stop(board, BOARD_STOP_SECONDS)
    if not interrupted:
        print(f"error: the board stopped (exit {board_code})", file=sys.stderr)
        return 1
    if trainer_code != 0:
        print(f"train.py exited with {trainer_code}", file=sys.stderr)
    return 0 if trainer_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
