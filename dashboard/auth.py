"""Who may steer a run: reading is open, writing needs the board's credentials.

Every callback that writes to the database outputs to the `submission` store (or,
for a run's name, tags and hidden flag, to `run-edit`), so the guard can tell a
write from a read by the Dash request alone, whatever page or script sent it.
Credentials come only from the environment (or a file it names), never from the
repository.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, Response, request

WRITE_OUTPUTS = frozenset({"submission", "run-edit"})
REALM = "CNN training board"


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str

    @classmethod
    def from_environment(cls) -> Credentials | None:
        """BOARD_PASSWORD, or BOARD_PASSWORD_FILE naming a file that holds it;
        BOARD_USER defaults to 'admin'."""
        password = os.environ.get("BOARD_PASSWORD")
        if not password and (path := os.environ.get("BOARD_PASSWORD_FILE")):
            password = Path(path).read_text().strip()
        if not password:
            return None
        return cls(os.environ.get("BOARD_USER", "admin"), password)

    def accepts(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return hmac.compare_digest(user, self.user) & hmac.compare_digest(
            password, self.password
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def output_ids(payload: Any) -> set[str]:
    """The component ids a Dash update request writes, as Dash itself reads them."""
    if not isinstance(payload, dict):
        return set()
    ids = set()
    for part in str(payload.get("output", "")).strip(".").split("..."):
        ids.add(part.split("@", 1)[0].rsplit(".", 1)[0])
    outputs = payload.get("outputs")
    for item in outputs if isinstance(outputs, list) else [outputs]:
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            ids.add(item["id"])
    return ids


def guard_writes(server: Flask, credentials: Credentials) -> None:
    """Answer 401 to any write without the credentials (the browser then asks for them)."""

    @server.before_request
    def _check() -> Response | None:
        if request.method != "POST" or not request.path.endswith("_dash-update-component"):
            return None
        if not output_ids(request.get_json(silent=True)) & WRITE_OUTPUTS:
            return None
        if credentials.accepts(request.headers.get("Authorization")):
            return None
        return Response(
            "Changing a run needs the board's credentials.", 401,
            {"WWW-Authenticate": f'Basic realm="{REALM}"'},
        )
