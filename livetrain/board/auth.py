"""Who may do what on the board: reading is open, changing a run needs the credentials.

The doors, decided before a single byte of a request body is read:

1. Without credentials the board serves loopback only, so a request whose `Host` (or,
   for a write, whose `Origin`) names anything but 127.0.0.0/8, `localhost` or `[::1]`
   is refused (403): a DNS-rebinding page cannot reach it under its own name.
2. With credentials, the `Authorization` header alone says whether a request may
   write (`g.may_write`). Every request that is not GET/HEAD/OPTIONS, on any route
   (Dash's, an extension's, MCP's), is refused with 401 without them, with one
   exception: POST `_dash-update-component`, Dash's callback endpoint, which viewers
   need for reading. That one goes on to Dash anonymously, and an anonymous request may
   run only read callbacks: every callback that writes outputs to a write store
   (`submission` or `run-edit`, see WRITE_OUTPUTS) is wrapped so that it answers 401
   before it runs when `g.may_write` is not set. The wrapper sits on the callback Dash
   itself dispatches to (Dash picks the function by the request's `output`), so a
   crafted request cannot reach a write callback under a read's name. The browser shows
   its login prompt on that 401 and sends the credentials from then on.
   So no body is parsed before the credential check: the check reads headers only, and
   an anonymous body is parsed only as a read, the same as any viewer's refresh.
3. Every body is capped at MAX_BODY_BYTES, an anonymous one at READ_BODY_BYTES (413
   from its Content-Length, before reading; waitress refuses bodies over the cap before
   buffering them). So an anonymous request costs at most what a viewer's refresh may,
   whatever it holds: JSON too deeply nested is a 400, and malformed fields are a 400
   (dashboard/request_checks.py). Dash's MCP server is off whatever DASH_MCP_ENABLED
   says (dashboard/app.py), so no route but Dash's callback endpoint runs a callback.

Credentials come only from the environment (or a file it names), never from the
repository, and are compared as UTF-8 bytes so any password works.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dash import Dash
from flask import Flask, Response, abort, g, request
from flask.json.provider import DefaultJSONProvider

WRITE_OUTPUTS = frozenset({"submission", "run-edit"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_BODY_BYTES = 4 * 1024 * 1024  # a refresh is a few KB; the compare view's under 100 KB
READ_BODY_BYTES = 1024 * 1024  # without credentials: parsed JSON takes ~20x its size
REALM = "CNN training board"


class CredentialsError(ValueError):
    """The environment names credentials that cannot be used: the board must not start."""


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str

    @classmethod
    def from_environment(cls) -> Credentials | None:
        """BOARD_PASSWORD, or BOARD_PASSWORD_FILE naming a file that holds it; BOARD_USER
        defaults to 'admin'. None when neither is set; CredentialsError (one line) when
        one is set but unusable, since silently serving without a login would be worse."""
        password = os.environ.get("BOARD_PASSWORD")
        path = os.environ.get("BOARD_PASSWORD_FILE")
        if password is None and path is None:
            return None
        if password is None:
            password = read_password_file(path or "")
        if not password:
            raise CredentialsError("BOARD_PASSWORD is set but empty")
        user = os.environ.get("BOARD_USER", "admin")
        if not user or ":" in user:
            raise CredentialsError("BOARD_USER must be non-empty and without ':'")
        return cls(user, password)

    def accepts(self, header: str | None) -> bool:
        """True for `Basic base64(user:password)` with these credentials, compared as
        UTF-8 bytes in constant time; anything malformed is simply not accepted."""
        if not header or not header.startswith("Basic "):
            return False
        try:
            token = base64.b64decode(header[6:].strip(), validate=True)
        except (ValueError, binascii.Error):
            return False
        user, _, password = token.partition(b":")
        return hmac.compare_digest(user, self.user.encode()) & hmac.compare_digest(
            password, self.password.encode()
        )


def read_password_file(path: str) -> str:
    """The password in BOARD_PASSWORD_FILE (one trailing newline or blank stripped)."""
    if not path:
        raise CredentialsError("BOARD_PASSWORD_FILE is set but empty")
    try:
        password = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or type(error).__name__
        raise CredentialsError(f"BOARD_PASSWORD_FILE {path}: {reason}") from error
    if not password:
        raise CredentialsError(f"BOARD_PASSWORD_FILE {path} is empty")
    return password


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def host_name(authority: str) -> str:
    """The host of a `Host` header ("127.0.0.1:8050", "[::1]:8050", "localhost")."""
    try:
        return urlsplit(f"//{authority}").hostname or ""
    except ValueError:
        return ""


def output_ids(callback_id: str) -> set[str]:
    """The component ids a Dash callback writes, from its id in app.callback_map
    ("submission.data@hash", "..run-edit.data...run-edit-message.children..")."""
    return {part.split("@", 1)[0].rsplit(".", 1)[0]
            for part in callback_id.strip(".").split("...")}


def challenge() -> Response:
    return Response(
        "Changing a run needs the board's credentials.", 401,
        {"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
    )


class SafeJSONProvider(DefaultJSONProvider):
    """Flask's JSON, but JSON nested past Python's recursion limit is a ValueError
    (so a 400 from request.get_json) instead of a RecursionError (a 500)."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            return super().loads(s, **kwargs)
        except RecursionError as error:
            raise ValueError("JSON nested too deeply") from error


def install_guard(app: Dash, credentials: Credentials | None,
                  check_request: Callable[[Dash], None]) -> None:
    """The doors described above, on `app`'s Flask server; `check_request` validates a
    callback request after the credential check (dashboard/request_checks.py)."""
    server: Flask = app.server
    server.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    server.json = SafeJSONProvider(server)
    dispatch = app.config.routes_pathname_prefix + "_dash-update-component"

    def _door() -> Response | None:
        if credentials is None and (refusal := foreign_host()):
            return refusal
        g.may_write = credentials is None or credentials.accepts(
            request.headers.get("Authorization"))
        if request.method in SAFE_METHODS:
            return None
        if not g.may_write and not (request.method == "POST" and request.path == dispatch):
            return challenge()
        limit = MAX_BODY_BYTES if g.may_write else READ_BODY_BYTES
        if (request.content_length or 0) > limit:
            return Response(f"Request bodies are limited to {limit} bytes.", 413)
        request.max_content_length = limit  # also bounds a body sent without a length
        if request.path == dispatch:
            check_request(app)
        return None

    server.before_request_funcs.setdefault(None, []).insert(0, _door)
    protect_write_callbacks(app)


def foreign_host() -> Response | None:
    """403 when a board without credentials is asked under a name that is not loopback
    (DNS rebinding), or written to from a page of another origin."""
    if not is_loopback(host_name(request.host)):
        return Response("This board has no password, so it answers only as 127.0.0.1, "
                        "localhost or [::1]; set BOARD_PASSWORD to serve other names.", 403)
    origin = request.headers.get("Origin")
    if request.method not in SAFE_METHODS and origin and not is_loopback(
            host_name(origin.partition("://")[2])):
        return Response("Writes from another site's page are refused.", 403)
    return None


def protect_write_callbacks(app: Dash) -> None:
    """Wrap every callback that writes (see the module docstring) with the credential
    check; call after every callback is registered."""
    for callback_id, entry in app.callback_map.items():
        if output_ids(callback_id) & WRITE_OUTPUTS and "callback" in entry:
            entry["callback"] = _needs_credentials(entry["callback"])


def _needs_credentials(func: Callable[..., Any]) -> Callable[..., Any]:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if not g.get("may_write", False):
            abort(challenge())
        return func(*args, **kwargs)

    return guarded
