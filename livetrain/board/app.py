"""The Dash application: layout, callbacks by concern, and the database-down banner."""

from __future__ import annotations

from pathlib import Path

from dash import Dash, set_props
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from livetrain.board import (
    callbacks_activations,
    callbacks_alerts,
    callbacks_changes,
    callbacks_compare,
    callbacks_controls,
    callbacks_curves,
    callbacks_history,
    callbacks_insight,
    callbacks_recovery,
    callbacks_run_edit,
    callbacks_runs,
)
from livetrain.board.auth import Credentials, install_guard
from livetrain.board.context import BoardContext
from livetrain.board.layout import page
from livetrain.board.request_checks import check_dash_request

ASSETS = Path(__file__).resolve().parent / "assets"
UNREACHABLE = (OperationalError, InterfaceError, PoolTimeoutError)


def unreachable_message(ctx: BoardContext, error: Exception) -> str:
    """One line for the banner: which database, and the driver's first line of why."""
    reason = str(getattr(error, "orig", None) or error).strip().splitlines()
    first = reason[0] if reason else type(error).__name__
    return (f"Database unreachable ({ctx.db_label}): {first}. "
            "The board keeps retrying at every refresh.")


def create_app(ctx: BoardContext, credentials: Credentials | None = None) -> Dash:
    """The board; with `credentials`, changing a run needs them (dashboard/auth.py).
    Dash's MCP server stays off whatever DASH_MCP_ENABLED says: it would be a second
    way into every callback."""

    def on_error(error: Exception) -> None:
        """A database outage becomes a banner instead of a traceback; other errors
        are bugs and propagate."""
        if not isinstance(error, UNREACHABLE):
            raise error
        set_props("db-alert", {"children": unreachable_message(ctx, error), "className": "alert"})

    app = Dash(
        __name__,
        title="CNN training board",
        update_title=None,
        assets_folder=str(ASSETS),
        on_error=on_error,
        enable_mcp=False,
    )
    app.layout = page(callbacks_runs.start_command(ctx))
    for concern in (callbacks_runs, callbacks_changes, callbacks_controls, callbacks_curves,
                    callbacks_history, callbacks_activations, callbacks_alerts, callbacks_recovery,
                    callbacks_insight, callbacks_run_edit, callbacks_compare):
        concern.register(app, ctx)
    install_guard(app, credentials, check_dash_request)
    return app
