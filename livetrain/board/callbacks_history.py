"""The run's logs: parameter history and events, newest first, extended by Patch.

Both tables are append-only in the database (a parameter_changes row or an
event is never updated), so the page keeps the last version and event id it
shows and a refresh prepends only newer rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dash import Dash, Input, Output, Patch, State, html, no_update

from livetrain.board.context import BoardContext
from livetrain.board.status import format_number


def history_row(change: Mapping[str, Any]) -> html.Tr:
    """One adopted version; latency is submitted (dt_updated) → applied (dt_applied)."""
    if change["version"] == 1:
        latency = "initial"
    else:
        ms = (change["dt_applied"] - change["dt_updated"]).total_seconds() * 1000
        latency = f"{ms:,.0f} ms"
    version = f"v{change['version']}" + "".join(
        f" · {note}" for note, flagged in (
            ("stop", change["stop_train"]),
            ("pause", change.get("pause_train")),
            (f"rollback→{change.get('rollback_step')}", change.get("rollback_step") is not None),
        ) if flagged
    )
    return html.Tr(
        [
            html.Td(version, className="num"),
            html.Td(f"{change['applied_step']:,}", className="num"),
            html.Td(change["optimizer"]),
            html.Td(format_number(change["learning_rate"]), className="num"),
            html.Td(format_number(change["weight_decay"]), className="num"),
            html.Td(f"{change['dropout']} %", className="num"),
            html.Td(latency, className="num"),
        ],
        className="stop-row" if change["stop_train"] else None,
    )


def event_item(event: Mapping[str, Any]) -> html.Li:
    """The message is a text node: shown verbatim, never interpreted as HTML."""
    step = f"step {event['step']:,}" if event["step"] is not None else ""
    return html.Li(
        [
            html.Span(event["level"], className=f"badge level-{event['level']}"),
            html.Span(event["code"], className="event-code"),
            html.Span(step, className="event-step"),
            html.Span(f"{event['dt']:%H:%M:%S}", className="event-time"),
            html.Div(event["message"], className="event-message"),
        ],
        className="event",
    )


@dataclass(frozen=True)
class HistoryUpdate:
    """New rows, newest first; `replace` means they are the whole list (another run)."""

    changes: list[html.Tr] | None
    events: list[html.Li] | None
    replace: bool
    state: dict[str, Any]


def update_history(
    ctx: BoardContext, run_id: int | None, state: Mapping[str, Any] | None
) -> HistoryUpdate | None:
    """Everything for a newly shown run, else only what is newer than the page's rows;
    None when nothing is new."""
    replace = not state or state.get("run_id") != run_id
    if run_id is None:
        return HistoryUpdate([], [], True, {"run_id": None}) if replace else None
    after_version = 0 if replace else state["version"]
    after_event = 0 if replace else state["event_id"]
    changes = ctx.queries.parameter_changes(run_id, after_version)
    events = ctx.queries.events(run_id, after_event)
    if not replace and not changes and not events:
        return None
    new_state = {
        "run_id": run_id,
        "version": changes[0]["version"] if changes else after_version,
        "event_id": events[0]["event_id"] if events else after_event,
    }
    return HistoryUpdate(
        [history_row(c) for c in changes] if replace or changes else None,
        [event_item(e) for e in events] if replace or events else None,
        replace,
        new_state,
    )


def _prepend(items: Sequence[Any]) -> Patch:
    patch = Patch()
    for item in reversed(items):  # oldest first, so the newest ends up on top
        patch.prepend(item)
    return patch


def register(app: Dash, ctx: BoardContext) -> None:
    @app.callback(
        Output("param-history-rows", "children"),
        Output("events-list", "children"),
        Output("history-state", "data"),
        Input("events-token", "data"),
        State("run-select", "value"),
        State("history-state", "data"),
    )
    def _history(_token: dict | None, run_id: int | None, state: dict | None) -> tuple:
        update = update_history(ctx, run_id, state)
        if update is None:
            return no_update, no_update, no_update
        if update.replace:
            return update.changes, update.events, update.state
        return (
            _prepend(update.changes) if update.changes else no_update,
            _prepend(update.events) if update.events else no_update,
            update.state,
        )
