"""Who may steer a run: raw HTTP against a real board.py, as a script would send it."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from livetrain.board.auth import Credentials, is_loopback, output_ids
from livetrain.db.contract import DEFAULTS, Hyperparameters
from livetrain.db.store import Store

ROOT = Path(__file__).resolve().parent.parent


def test_output_ids_as_dash_keys_its_callbacks() -> None:
    assert output_ids("submission.data") == {"submission"}
    assert output_ids("submission.data@1a2b3c") == {"submission"}
    assert output_ids("..run-select.options...submission.data@9f..") == {
        "run-select", "submission"}
    assert "run-edit" in output_ids("..run-edit.data...run-edit-message.children..")


def test_loopback_addresses() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.1.5", "::", "board.example"]))  # noqa: S104


def test_credentials_come_from_the_environment(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BOARD_PASSWORD", raising=False)
    monkeypatch.delenv("BOARD_PASSWORD_FILE", raising=False)
    assert Credentials.from_environment() is None
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("BOARD_PASSWORD_FILE", str(secret))
    creds = Credentials.from_environment()
    assert creds == Credentials("admin", "s3cret")
    good = "Basic " + base64.b64encode(b"admin:s3cret").decode()
    assert creds.accepts(good)
    assert not creds.accepts("Basic " + base64.b64encode(b"admin:nope").decode())
    assert not creds.accepts("Basic !!!") and not creds.accepts(None)


def test_the_board_refuses_a_network_address_without_credentials(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOARD_")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "board.py"), "--host", "0.0.0.0",  # noqa: S104
         "--db", f"sqlite:///{tmp_path / 'b.db'}"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "BOARD_PASSWORD" in result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def guarded_board(db_url: str, tmp_path: Path) -> Iterator[tuple[str, Store, int]]:
    store = Store(db_url)
    run_id = store.create_run("r", "smallcnn", "mnist5k", {}, Hyperparameters(**DEFAULTS))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "board.py"), "--db", db_url, "--port", str(port)],
        env={**os.environ, "BOARD_USER": "coach", "BOARD_PASSWORD": "s3cret"},
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                time.sleep(0.2)
        yield url, store, run_id
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        store.close()


def post(url: str, payload: dict, user: str | None = None, password: str = "") -> int:
    request = urllib.request.Request(  # noqa: S310 - our own board on loopback
        url + "/_dash-update-component", data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def submit_payload(run_id: int, lr: str) -> dict:
    """What the page sends when Submit parameters is clicked."""
    return {
        "output": "submission.data",
        "outputs": {"id": "submission", "property": "data"},
        "inputs": [{"id": "submit-params", "property": "n_clicks", "value": 1},
                   {"id": "stop-confirm", "property": "submit_n_clicks", "value": None}],
        "changedPropIds": ["submit-params.n_clicks"],
        "state": [{"id": "run-select", "property": "value", "value": run_id},
                  {"id": "optimizer-select", "property": "value", "value": "Adam"},
                  {"id": "lr-input", "property": "value", "value": lr},
                  {"id": "wd-input", "property": "value", "value": "0"},
                  {"id": "dropout-input", "property": "value", "value": "50"},
                  {"id": "grad-clip-input", "property": "value", "value": "0"}],
    }


def test_writes_need_the_credentials_reads_do_not(guarded_board: tuple[str, Store, int]) -> None:
    url, store, run_id = guarded_board
    assert post(url, submit_payload(run_id, "0.001")) == 401
    assert post(url, submit_payload(run_id, "0.001"), "coach", "wrong") == 401
    assert post(url, submit_payload(run_id, "0.001"), "admin", "s3cret") == 401
    assert store.get_parameters(run_id).version == 1  # nothing was written
    with urllib.request.urlopen(url + "/_dash-layout", timeout=10) as response:  # noqa: S310
        assert response.status == 200  # reading stays open
    assert post(url, submit_payload(run_id, "0.001"), "coach", "s3cret") == 200
    state = store.get_parameters(run_id)
    assert (state.version, state.learning_rate) == (2, 0.001)


CRAFTED = [
    ("optimizer-select", "Adagrad"), ("optimizer-select", "'; DROP TABLE runs; --"),
    ("dropout-input", "150"), ("lr-input", "1e999"), ("lr-input", "NaN"), ("wd-input", "-0.1"),
]


def test_a_crafted_request_with_a_bad_value_writes_nothing(
    guarded_board: tuple[str, Store, int]
) -> None:
    """What a script could send past the page's own checks: refused by the callback."""
    url, store, run_id = guarded_board
    for field, value in CRAFTED:
        payload = submit_payload(run_id, "0.001")
        for state in payload["state"]:
            if state["id"] == field:
                state["value"] = value
        assert post(url, payload, "coach", "s3cret") == 200, (field, value)  # a refusal
        assert store.get_parameters(run_id).version == 1, (field, value)


RUN_EDIT_OUTPUT = "..run-edit.data...run-edit-message.children...run-edit-message.className.."


def rename_payload(run_id: int, name: str) -> dict:
    """What the page sends when Rename is clicked."""
    return {
        "output": RUN_EDIT_OUTPUT,
        "outputs": [{"id": "run-edit", "property": "data"},
                    {"id": "run-edit-message", "property": "children"},
                    {"id": "run-edit-message", "property": "className"}],
        "inputs": [{"id": "rename-button", "property": "n_clicks", "value": 1},
                   {"id": "run-name-input", "property": "n_submit", "value": None},
                   {"id": "tags-button", "property": "n_clicks", "value": 0},
                   {"id": "run-tags-input", "property": "n_submit", "value": None},
                   {"id": "hide-button", "property": "n_clicks", "value": 0}],
        "changedPropIds": ["rename-button.n_clicks"],
        "state": [{"id": "run-select", "property": "value", "value": run_id},
                  {"id": "run-name-input", "property": "value", "value": name},
                  {"id": "run-tags-input", "property": "value", "value": ""}],
    }


def test_renaming_tagging_hiding_need_the_credentials_too(
    guarded_board: tuple[str, Store, int]
) -> None:
    url, store, run_id = guarded_board
    assert post(url, rename_payload(run_id, "renamed")) == 401
    assert post(url, rename_payload(run_id, "renamed"), "coach", "wrong") == 401
    assert store.get_run(run_id)["name"] == "r"
    assert post(url, rename_payload(run_id, "x" * 201), "coach", "s3cret") == 200  # refused
    assert store.get_run(run_id)["name"] == "r"
    assert post(url, rename_payload(run_id, "renamed"), "coach", "s3cret") == 200
    assert store.get_run(run_id)["name"] == "renamed"
    assert store.get_parameters(run_id).version == 1  # the parameters row is not touched
