"""Every door of a real board.py (issue 11): raw HTTP, as an attacker's script sends it.

The board runs as a subprocess with DASH_MCP_ENABLED=true and a non-ASCII password.
Every route it serves, and some it does not, refuses any non-GET request without the
credentials; every write callback refuses an anonymous request while reads stay open;
MCP is off; bodies over the cap are refused without being read (the process's RSS stays
flat under four concurrent 40 MB bodies); deep JSON is a 400; an unusable password file
stops the start with one line; without a password only loopback Host names are served.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from test_board_auth import free_port, rename_payload, submit_payload
from test_board_callbacks import log_steps, new_run

from livetrain.board.app import create_app
from livetrain.board.auth import MAX_BODY_BYTES
from livetrain.board.context import BoardContext
from livetrain.db.store import Store

ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD = "cöach", "pässwörd"
GOOD = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
WRONG = "Basic " + base64.b64encode(f"{USER}:passwörd".encode()).decode()
LATIN1 = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode("latin-1")).decode()


@dataclass
class Board:
    port: int
    proc: subprocess.Popen
    store: Store
    run_id: int

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def callback(self, payload: object, auth: str | None = None) -> int:
        headers = {"Content-Type": "application/json"} | ({"Authorization": auth} if auth else {})
        return self.request("POST", "/_dash-update-component", json.dumps(payload).encode(),
                            headers)[0]


def start_board(db_url: str, tmp_path: Path, env: dict[str, str]) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BOARD_", "DASH_"))}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "board.py"), "--db", db_url, "--port", env.pop("PORT")],
        env=base | env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def wait_up(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "board.py exited early"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("board.py did not start listening within 60 s")


def board_fixture(db_url: str, tmp_path: Path, env: dict[str, str]) -> Iterator[Board]:
    store = Store(db_url)
    run_id = new_run(store, "door")
    log_steps(store, run_id, range(0, 100, 10))
    port = free_port()
    proc = start_board(db_url, tmp_path, env | {"PORT": str(port)})
    try:
        wait_up(port, proc)
        yield Board(port, proc, store, run_id)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        store.close()


@pytest.fixture
def guarded(db_url: str, tmp_path: Path) -> Iterator[Board]:
    """A board with MCP asked for by the environment and a non-ASCII login."""
    yield from board_fixture(db_url, tmp_path, {
        "DASH_MCP_ENABLED": "true", "BOARD_USER": USER, "BOARD_PASSWORD": PASSWORD})


@pytest.fixture
def open_board(sqlite_url: str, tmp_path: Path) -> Iterator[Board]:
    """A board without a password: loopback only."""
    yield from board_fixture(sqlite_url, tmp_path, {"DASH_MCP_ENABLED": "true"})


def routes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every route the board's Flask app has (built here with the same environment as
    the subprocess), path parameters filled in, plus routes it should not have."""
    monkeypatch.setenv("DASH_MCP_ENABLED", "true")
    store = Store(f"sqlite:///{tmp_path / 'routes.db'}")
    app = create_app(BoardContext.for_store(store))
    found = {rule.rule.replace("<path:filename>", "board.css")
             .replace("<string:package_name>", "dash").replace("<path:fingerprinted_path>", "x.js")
             .replace("<path:path>", "anything") for rule in app.server.url_map.iter_rules()}
    store.close()
    return sorted(found | {"/_mcp", "/_mcp/", "/_dash-api/anything", "/_alive_x", "/nowhere"})


MCP_CALL = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
    "name": "anything", "arguments": {}}}).encode()


def test_every_route_refuses_a_write_without_the_credentials(
    guarded: Board, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = routes(tmp_path, monkeypatch)
    assert "/_dash-update-component" in paths and "/_mcp" in paths
    for path in paths:
        if path == "/_dash-update-component":
            continue  # callbacks: below, write by write
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            for auth in (None, WRONG, LATIN1, "Basic !!!", "Bearer x"):
                headers = {"Content-Type": "application/json"} | (
                    {"Authorization": auth} if auth else {})
                status, body = guarded.request(method, path, MCP_CALL, headers)
                assert status == 401, (method, path, auth, status, body[:200])
    # MCP is off even with the right credentials: no route answers it
    status, body = guarded.request("POST", "/_mcp", MCP_CALL, {
        "Content-Type": "application/json", "Authorization": GOOD})
    assert status in (404, 405) and b"jsonrpc" not in body
    assert guarded.store.get_run(guarded.run_id)["name"] == "door"


def write_payloads(run_id: int) -> dict[str, dict]:
    """Each write the page can send: submit, stop, pause, rollback, a fix, rename."""
    stop = submit_payload(run_id, "0.001")
    stop["inputs"][1]["value"], stop["changedPropIds"] = 1, ["stop-confirm.submit_n_clicks"]
    return {
        "submit": submit_payload(run_id, "0.002"),
        "stop": stop,
        "pause": one_output("submission.data@", "pause-button", "n_clicks",
                            [{"id": "run-select", "property": "value", "value": run_id}]),
        "rollback": one_output("submission.data@", "rollback-confirm", "submit_n_clicks",
                               [{"id": "run-select", "property": "value", "value": run_id},
                                {"id": "checkpoint-select", "property": "value", "value": 0}]),
        "rename": rename_payload(run_id, "taken over"),
    }


def one_output(prefix: str, trigger: str, prop: str, state: list[dict]) -> dict:
    """A write callback registered with allow_duplicate: its key has a hash suffix,
    which a script can read from /_dash-dependencies; filled in by the test."""
    return {"output": prefix, "outputs": {"id": "submission", "property": "data"},
            "inputs": [{"id": trigger, "property": prop, "value": 1}],
            "changedPropIds": [f"{trigger}.{prop}"], "state": state}


def dependencies(board: Board) -> list[dict]:
    status, body = board.request("GET", "/_dash-dependencies")
    assert status == 200
    return json.loads(body)


def fill_hashes(payloads: dict[str, dict], deps: list[dict]) -> None:
    for payload in payloads.values():
        if payload["output"].endswith("@"):
            trigger = payload["inputs"][0]["id"]
            payload["output"] = next(d["output"] for d in deps
                                     if d["inputs"][0]["id"] == trigger)


def test_write_callbacks_need_the_credentials_reads_do_not(guarded: Board) -> None:
    deps = dependencies(guarded)
    payloads = write_payloads(guarded.run_id)
    fill_hashes(payloads, deps)
    writers = [d["output"] for d in deps if "submission.data" in d["output"]
               or "run-edit.data" in d["output"]]
    assert len(writers) == 5  # submit/stop, pause, rollback, fix, run edits
    fix = next(o for o in writers if "fix-clicks" in o)
    payloads["fix"] = {"output": fix, "outputs": [{"id": "submission", "property": "data"},
                                                  {"id": "fix-clicks", "property": "data"}],
                       "inputs": [[{"id": {"type": "alert-fix", "run_id": guarded.run_id,
                                           "kind": "event", "key": "1", "render": 1},
                                    "property": "n_clicks", "value": 1}]],
                       "changedPropIds": [f'{{"key":"1","kind":"event","render":1,"run_id":'
                                          f'{guarded.run_id},"type":"alert-fix"}}.n_clicks'],
                       "state": [{"id": "run-select", "property": "value",
                                  "value": guarded.run_id},
                                 {"id": "fix-clicks", "property": "data", "value": None}]}
    for name, payload in payloads.items():
        for auth in (None, WRONG, LATIN1):
            assert guarded.callback(payload, auth) == 401, (name, auth)
    assert guarded.store.get_parameters(guarded.run_id).version == 1
    assert guarded.store.get_run(guarded.run_id)["name"] == "door"
    read = {"output": "rollback-confirm.message", "outputs": {
        "id": "rollback-confirm", "property": "message"},
        "inputs": [{"id": "checkpoint-select", "property": "value", "value": 10}],
        "changedPropIds": ["checkpoint-select.value"]}
    assert guarded.callback(read) == 200  # reading stays open
    # the non-ASCII login works, as UTF-8
    assert guarded.callback(payloads["submit"], GOOD) == 200
    assert guarded.store.get_parameters(guarded.run_id).learning_rate == 0.002
    assert guarded.callback(payloads["rename"], GOOD) == 200
    assert guarded.store.get_run(guarded.run_id)["name"] == "taken over"


def test_deep_or_malformed_json_is_a_400_with_or_without_credentials(guarded: Board) -> None:
    deep = ("[" * 1000 + "]" * 1000).encode()
    for auth in (None, GOOD):
        headers = {"Content-Type": "application/json"} | ({"Authorization": auth} if auth else {})
        for body in (deep, b'{"output": [' * 500 + b"]}" * 500, b"{", b"[]"):
            status, _ = guarded.request("POST", "/_dash-update-component", body, headers)
            assert status == 400, (auth, body[:20], status)
        run_id_list = submit_payload([guarded.run_id, 2], "0.001")  # type: ignore[arg-type]
        assert guarded.callback(run_id_list, auth) == 400
    assert guarded.request("GET", "/")[0] == 200  # still serving


def send_big_body(port: int, size: int, chunked: bool, results: list[str],
                  auth: str = "") -> None:
    """A `size`-byte POST (without credentials unless `auth`), sent as fast as the board
    takes it; appends the status line, or how the connection ended."""
    chunk = b"[" * min(size, 1024 * 1024)
    head = ("POST /_dash-update-component HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/json\r\n" + (f"Authorization: {auth}\r\n" if auth else "")
            + ("Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {size}\r\n")
            + "\r\n").encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(head)
            for _ in range(size // len(chunk)):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
            results.append(sock.recv(200).decode(errors="replace").split("\r\n", 1)[0])
    except OSError as error:  # the board closed the connection: refused mid-body
        results.append(f"closed: {type(error).__name__}")


def test_oversized_bodies_are_refused_without_being_read(guarded: Board) -> None:
    process = psutil.Process(guarded.proc.pid)
    assert guarded.request("GET", "/_dash-layout")[0] == 200  # warm
    before = process.memory_info().rss
    results: list[str] = []
    threads = [threading.Thread(target=send_big_body,
                                args=(guarded.port, 40 * 1024 * 1024, i % 2 == 1, results))
               for i in range(4)]
    peak = before
    started = time.monotonic()
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, process.memory_info().rss)
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert len(results) == 4
    assert all("413" in r or r.startswith("closed") for r in results), results
    assert peak - before < 30 * 1024 * 1024, (before, peak, results)
    assert time.monotonic() - started < 60
    took = time.monotonic()
    assert guarded.request("GET", "/_dash-layout")[0] == 200
    assert time.monotonic() - took < 2
    # an anonymous body over 1 MB is refused, sent with a length or chunked; with the
    # credentials it is read (and is no callback request: 400)
    small: list[str] = []
    for chunked in (False, True):
        send_big_body(guarded.port, 2 * 1024 * 1024, chunked, small)
        send_big_body(guarded.port, 2 * 1024 * 1024, chunked, small, GOOD)
    assert [line.split(" ", 2)[1] for line in small] == ["413", "400", "413", "400"], small
    # the refusal comes from the header alone, with or without the credentials: no body
    # byte needs to be sent
    for auth in (b"", f"Authorization: {GOOD}\r\n".encode()):
        with socket.create_connection(("127.0.0.1", guarded.port), timeout=30) as sock:
            sock.sendall(b"POST /_dash-update-component HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\n%s"
                         b"Content-Length: %d\r\n\r\n" % (auth, MAX_BODY_BYTES + 1))
            assert sock.recv(200).startswith(b"HTTP/1.1 413")


@pytest.mark.parametrize("setting", ["empty file", "missing file", "blank file",
                                     "empty password", "colon user"])
def test_an_unusable_password_setting_stops_the_start_with_one_line(
    sqlite_url: str, tmp_path: Path, setting: str
) -> None:
    empty, blank = tmp_path / "empty", tmp_path / "blank"
    empty.write_text("")
    blank.write_text("  \n\n")
    env = {"empty file": {"BOARD_PASSWORD_FILE": str(empty)},
           "missing file": {"BOARD_PASSWORD_FILE": str(tmp_path / "nope")},
           "blank file": {"BOARD_PASSWORD_FILE": str(blank)},
           "empty password": {"BOARD_PASSWORD": ""},
           "colon user": {"BOARD_PASSWORD": "x", "BOARD_USER": "a:b"}}[setting]
    base = {k: v for k, v in os.environ.items() if not k.startswith("BOARD_")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "board.py"), "--db", sqlite_url, "--port", str(free_port())],
        env=base | env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: BOARD_"), result.stderr
    assert "Traceback" not in result.stderr


def test_without_a_password_only_loopback_names_are_served(open_board: Board) -> None:
    port = open_board.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost",
                 f"LOCALHOST:{port}"):
        assert open_board.request("GET", "/", headers={"Host": host})[0] == 200, host
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}",
                 f"0.0.0.0:{port}", "[::1"):
        status, body = open_board.request("GET", "/", headers={"Host": host})
        assert 400 <= status < 500, (host, status)
        status, _ = open_board.request("POST", "/_dash-update-component",
                                       json.dumps(rename_payload(open_board.run_id, "x"))
                                       .encode(), {"Host": host,
                                                   "Content-Type": "application/json"})
        assert 400 <= status < 500, (host, status)
    # a page of another site may not write, even through a loopback name
    for origin in ("http://evil.example", "http://[::1", "null", "http://127.0.0.1.evil.example"):
        status, _ = open_board.request(
            "POST", "/_dash-update-component",
            json.dumps(rename_payload(open_board.run_id, "x")).encode(),
            {"Content-Type": "application/json", "Origin": origin})
        assert status == 403, origin
    assert open_board.store.get_run(open_board.run_id)["name"] == "door"
    # MCP is off here too
    status, body = open_board.request("POST", "/_mcp", MCP_CALL,
                                      {"Content-Type": "application/json"})
    assert status in (404, 405) and b"jsonrpc" not in body
    # the page's own write works, from its own origin too
    assert open_board.callback(rename_payload(open_board.run_id, "mine")) == 200
    status, _ = open_board.request(
        "POST", "/_dash-update-component",
        json.dumps(rename_payload(open_board.run_id, "mine")).encode(),
        {"Content-Type": "application/json", "Origin": f"http://localhost:{port}"})
    assert status == 200
    assert open_board.store.get_run(open_board.run_id)["name"] == "mine"


def test_with_a_password_any_host_name_is_served(guarded: Board) -> None:
    assert guarded.request("GET", "/", headers={"Host": "board.example:8050"})[0] == 200
