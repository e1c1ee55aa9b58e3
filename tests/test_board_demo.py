"""`make demo`: one command starts the board and a run on the embedded SQLite default,
prints the URL, and Ctrl-C ends both cleanly."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from livetrain.db.store import Store

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_starts_board_and_run_and_ctrl_c_stops_both(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"} | {"OMP_NUM_THREADS": "1"}
    demo = subprocess.Popen(
        [sys.executable, str(ROOT / "demo.py"), "--port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in demo.stdout], daemon=True).start()
    output: list[str] = []
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 90
        while not any("Board:" in line and url in line for line in output):
            assert time.monotonic() < deadline, "".join(output)
            try:
                output.append(lines.get(timeout=1))
            except queue.Empty:
                assert demo.poll() is None, "".join(output)
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200

        store = Store(f"sqlite:///{tmp_path / 'training.db'}")  # the embedded default
        try:
            while not [r for r in store.list_runs() if r["status"] == "running"]:
                assert time.monotonic() < deadline, "".join(output)
                time.sleep(0.5)
            demo.send_signal(signal.SIGINT)  # what Ctrl-C sends
            try:  # the trainer has 60 s (demo.py's TRAINER_STOP_SECONDS), the board 10 s
                code = demo.wait(90)
            except subprocess.TimeoutExpired:
                code = None  # the output below says where it stood
            time.sleep(0.5)  # let the reader thread take the last lines
            while not lines.empty():
                output.append(lines.get())
            assert code == 0, "".join(output)
            assert store.list_runs()[0]["status"] == "stopped"
        finally:
            store.close()
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0  # the board is gone too
    finally:
        if demo.poll() is None:
            demo.terminate()  # the demo stops its children on SIGTERM as well
            try:
                demo.wait(90)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait()
