"""The live training board: watch runs and steer them from the browser.

    python board.py                                   # the embedded SQLite default
    python board.py --db postgresql://postgres@127.0.0.1/postgres --port 8050
    python board.py --db postgresql://... --workers 4   # gunicorn, for many viewers

It reads and writes only the database contract (livetrain/db/schema.py), so it works
with a trainer on another machine, with several runs, and after a restart. It
keeps no state between requests (the page holds what it shows, the database the
rest), so any worker may answer any request.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from typing import Any

from dash import Dash
from flask import Flask
from sqlalchemy.exc import DBAPIError

from livetrain.board.app import create_app
from livetrain.board.auth import MAX_BODY_BYTES, Credentials, CredentialsError, is_loopback
from livetrain.board.context import BoardContext
from livetrain.db.store import Store, UnusableDatabaseError, describe_url, make_engine, resolve_url

SERVER_THREADS = 4  # a page fires a handful of small callbacks per refresh


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--db", default=None, help="SQLAlchemy URL (default: $DATABASE_URL, "
                   "else sqlite:///training.db)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind")
    p.add_argument("--port", type=int, default=8050)
    p.add_argument("--workers", type=int, default=1,
                   help="more than 1: serve with gunicorn, this many worker processes")
    p.add_argument("--debug", action="store_true",
                   help="Dash dev server with hot reload and dev tools instead of waitress")
    return p.parse_args(argv)


def open_store(url: str) -> Store:
    """The store, creating missing tables; a database that is down now is not fatal:
    the page says so and recovers when it is back.

    No pre-ping: a refresh runs a dozen short queries, and a ping before each is a
    round trip apiece. After a server restart one refresh shows the banner, and the
    pool renews its connections."""
    try:
        return Store(url, pre_ping=False)
    except DBAPIError as exc:  # down, or refusing us: the page says so until it answers
        reason = str(exc.orig or exc).strip().splitlines()[0]
        print(f"warning: database unreachable for now ({reason})", file=sys.stderr)
        return Store(url, create=False, pre_ping=False)


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        credentials = Credentials.from_environment()
    except CredentialsError as error:
        print(f"error: {error}; the board does not start without a usable password "
              "once one is asked for", file=sys.stderr)
        return 2
    if credentials is None and not is_loopback(args.host):
        print(f"error: --host {args.host} would let anyone on the network stop or change "
              "runs; set BOARD_PASSWORD (or BOARD_PASSWORD_FILE) first, or bind to 127.0.0.1",
              file=sys.stderr)
        return 2
    url = resolve_url(args.db)
    try:  # a URL that cannot work, ever: say so now (a server that is down is not that)
        make_engine(url).dispose()
    except UnusableDatabaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    def make_app() -> Dash:
        """The app with its own store: built in each worker, never shared across a fork."""
        return create_app(BoardContext.for_store(open_store(url)), credentials)

    print(f"board on http://{args.host}:{args.port}/  database {describe_url(url)}",
          file=sys.stderr, flush=True)
    if args.workers > 1:
        serve_with_gunicorn(lambda: make_app().server, args.host, args.port, args.workers)
        return 0
    app = make_app()
    try:
        if args.debug:
            app.run(host=args.host, port=args.port, debug=True)
        else:
            from waitress import serve

            signal.signal(signal.SIGTERM, _stop_on_sigterm)
            serve(app.server, host=args.host, port=args.port, threads=SERVER_THREADS,
                  ident="board", max_request_body_size=MAX_BODY_BYTES)
    except KeyboardInterrupt:
        pass
    return 0


def serve_with_gunicorn(make_server: Callable[[], Flask], host: str, port: int,
                        workers: int) -> None:
    """gunicorn's master and `workers` processes, each building its own app and store."""
    from gunicorn.app.base import BaseApplication

    class Board(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("threads", SERVER_THREADS)
            self.cfg.set("accesslog", None)

        def load(self) -> Flask:
            return make_server()

    Board().run()


if __name__ == "__main__":
    sys.exit(main())
