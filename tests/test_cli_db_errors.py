"""A --db that cannot be used: one line naming the URL (password masked) and the cause,
exit 1, within the connect timeout, before train.py loads any data.

Every train.py here is given a dataset that does not exist: had it loaded data before
opening the database, it would fail on the dataset instead.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_browser_board import free_port, wait_for_http

from livetrain.db.store import CONNECT_SECONDS, UnusableDatabaseError, open_store

ROOT = Path(__file__).resolve().parent.parent
NO_DATASET = ["--dataset", "/no/such/dataset/folder", "--no-progress"]
STARTUP_SECONDS = 30  # a Python that imports torch, on a busy machine


def run(script: str, *args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd,
                            capture_output=True, text=True, timeout=120)
    return result, time.monotonic() - started


def assert_one_line(result: subprocess.CompletedProcess, shown_url: str, cause: str) -> None:
    assert result.returncode == 1, result.stderr
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: database {shown_url}: "), result.stderr
    assert cause in result.stderr
    assert "secret" not in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


CASES = {
    "unknown dialect": ("nosuchdialect://u:secret@h/x", "nosuchdialect://u:***@h/x",
                        "unknown kind of database 'nosuchdialect'"),
    "unparseable": ("postgresql://u:secret@h:port/x", "postgresql+psycopg://u:***@h:port/x",
                    "not a database URL"),
    "no driver": ("mysql://u:secret@127.0.0.1/x", "mysql://u:***@127.0.0.1/x",
                  "its driver is not installed (No module named 'MySQLdb')"),
    "refused, psycopg": ("postgresql://postgres:secret@127.0.0.1:1/x",
                         "postgresql+psycopg://postgres:***@127.0.0.1:1/x", "Connection refused"),
    "refused, psycopg2": ("postgresql+psycopg2://postgres:secret@127.0.0.1:1/x",
                          "postgresql+psycopg2://postgres:***@127.0.0.1:1/x",
                          "Connection refused"),
}


@pytest.mark.parametrize("case", CASES)
def test_train_with_a_bad_db_says_so_in_one_line(tmp_path: Path, case: str) -> None:
    url, shown, cause = CASES[case]
    result, seconds = run("train.py", "--db", url, *NO_DATASET, cwd=tmp_path)
    assert_one_line(result, shown, cause)
    assert seconds < STARTUP_SECONDS


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_train_with_a_missing_database_says_so(tmp_path: Path, postgres_url: str,
                                                driver: str) -> None:
    """The server answers, the database it names does not exist."""
    rest = postgres_url.split("://", 1)[1].rsplit("/", 1)[0]
    url = f"postgresql+{driver}://{rest}/clt_no_such_database"
    result, _ = run("train.py", "--db", url, *NO_DATASET, cwd=tmp_path)
    assert_one_line(result, url, 'database "clt_no_such_database" does not exist')


def test_train_with_an_sqlite_file_that_cannot_be_opened(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/no/such/folder/training.db"
    result, _ = run("train.py", "--db", url, *NO_DATASET, cwd=tmp_path)
    assert_one_line(result, url, "unable to open database file")


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers: a server that hangs, or a
    firewall that swallows the handshake. Only the connect timeout ends the wait."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_train_gives_up_on_a_silent_server_within_the_connect_timeout(
    tmp_path: Path, silent_server: int, driver: str,
) -> None:
    url = f"postgresql+{driver}://postgres:secret@127.0.0.1:{silent_server}/x"
    shown = url.replace(":secret@", ":***@")
    result, seconds = run("train.py", "--db", url, *NO_DATASET, cwd=tmp_path)
    assert_one_line(result, shown, "timeout")
    assert CONNECT_SECONDS <= seconds < CONNECT_SECONDS + STARTUP_SECONDS


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
@pytest.mark.parametrize(("query", "timeout"), [("", CONNECT_SECONDS),
                                                ("?connect_timeout=2", 2)])
def test_the_connect_timeout_is_the_urls_own_if_it_sets_one(
    silent_server: int, driver: str, query: str, timeout: int,
) -> None:
    url = f"postgresql+{driver}://postgres@127.0.0.1:{silent_server}/x{query}"
    started = time.monotonic()
    with pytest.raises(UnusableDatabaseError, match="timeout"):
        open_store(url)
    assert timeout <= time.monotonic() - started < timeout + 2


def test_a_sweep_with_a_bad_db_starts_no_run(tmp_path: Path) -> None:
    result, _ = run("train.py", "--db", "nosuchdialect://u:secret@h/x", "--sweep",
                    "lr=1e-3,1e-2", *NO_DATASET, cwd=tmp_path)
    assert_one_line(result, "nosuchdialect://u:***@h/x", "unknown kind of database")


@pytest.mark.parametrize("case", ["unknown dialect", "unparseable", "no driver"])
def test_board_with_a_db_that_can_never_work_says_so_in_one_line(
    tmp_path: Path, case: str,
) -> None:
    url, shown, cause = CASES[case]
    result, _ = run("board.py", "--db", url, "--port", str(free_port()), cwd=tmp_path)
    assert_one_line(result, shown, cause)


def test_board_with_an_unreachable_database_starts_and_says_so(tmp_path: Path) -> None:
    """A server that is down may come back: the board starts and serves its page."""
    port = free_port()
    log = (tmp_path / "board.log").open("w")
    board = subprocess.Popen(
        [sys.executable, str(ROOT / "board.py"), "--port", str(port),
         "--db", "postgresql+psycopg2://postgres:secret@127.0.0.1:1/x"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", board, tmp_path / "board.log")
    finally:
        board.terminate()
        board.wait(timeout=30)
        log.close()
    output = (tmp_path / "board.log").read_text()
    assert "warning: database unreachable for now" in output and "Connection refused" in output
    assert "secret" not in output and "Traceback" not in output
