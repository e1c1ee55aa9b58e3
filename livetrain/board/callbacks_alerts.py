"""Alerts: the trainer's warning and error diagnostics, newest first, with one-click fixes.

Events are append-only, so like the events list a refresh prepends only rows
newer than the page's newest (Patch). A diagnostic whose `fix` is a parameters
change gets a button with a pattern-matching id carrying the event id; the
click reads the fix back from the database (never from the page) and submits
it through Store.submit_parameters, so the apply status follows it like any
other submission.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dash import ALL, Dash, Input, Output, Patch, State, callback_context, html, no_update

from livetrain.board.callbacks_controls import refusal, steerable_status
from livetrain.board.context import BoardContext
from livetrain.board.status import format_number
from livetrain.db.store import HYPERPARAMETER_FIELDS
from livetrain.db.store import now as utc_now

FIX_LABELS = {"optimizer": "optimizer", "learning_rate": "lr", "weight_decay": "weight decay",
              "dropout": "dropout", "grad_clip": "grad clip"}


def fix_id(event_id: int) -> dict[str, Any]:
    return {"type": "alert-fix", "event_id": event_id}


def fix_label(fix: Mapping[str, Any]) -> str:
    """e.g. "Apply: set lr to 3e-05" (several changes joined with "and")."""
    parts = []
    for name, value in fix.items():
        shown = format_number(value) if isinstance(value, float) else str(value)
        parts.append(f"{FIX_LABELS.get(name, name)} to {shown}{' %' * (name == 'dropout')}")
    return "Apply: set " + " and ".join(parts)


def alert_item(event: Mapping[str, Any]) -> html.Li:
    """One diagnostic: what is wrong (verbatim text nodes, never HTML) and what to do."""
    meta = [
        html.Span(event["level"], className=f"badge level-{event['level']}"),
        html.Span(event["code"], className="event-code"),
    ]
    if event.get("layer_name"):
        meta.append(html.Span(event["layer_name"], className="alert-layer"))
    if event["step"] is not None:
        meta.append(html.Span(f"step {event['step']:,}", className="event-step"))
    body: list[Any] = [html.Div(meta, className="alert-meta"),
                       html.Div(event["message"], className="alert-message")]
    if event.get("recommendation"):
        body.append(html.Div(event["recommendation"], className="alert-recommendation"))
    if event.get("fix"):
        body.append(html.Button(fix_label(event["fix"]), id=fix_id(event["event_id"]),
                                className="btn btn-fix", n_clicks=0))
    return html.Li(body, className=f"alert-item alert-{event['level']}")


@dataclass(frozen=True)
class AlertsUpdate:
    """New alerts, newest first; `replace` means they are the whole list (another run)."""

    items: list[html.Li] | None
    replace: bool
    count: str
    state: dict[str, Any]


def update_alerts(
    ctx: BoardContext, run_id: int | None, state: Mapping[str, Any] | None
) -> AlertsUpdate | None:
    replace = not state or state.get("run_id") != run_id
    if run_id is None:
        return AlertsUpdate([], True, "", {"run_id": None, "event_id": 0, "count": 0}) \
            if replace else None
    after = 0 if replace else state["event_id"]
    alerts = ctx.queries.alerts(run_id, after)
    if not replace and not alerts:
        return None
    count = (0 if replace else state["count"]) + len(alerts)
    new_state = {"run_id": run_id, "event_id": alerts[0]["event_id"] if alerts else after,
                 "count": count}
    label = f"{count} alert{'s' * (count != 1)}" if count else ""
    return AlertsUpdate([alert_item(a) for a in alerts], replace, label, new_state)


def apply_fix(
    ctx: BoardContext, run_id: int | None, event_id: int, now: datetime | None = None
) -> dict[str, Any]:
    """Submit a diagnostic's fix. A paused run stays paused (the fix is in force once
    it resumes or rolls back), so "set lr, then roll back" is two clicks, not a race
    with the NaN that paused it."""
    if run_id is None:
        return refusal(None, "fix", "no run selected")
    event = ctx.queries.event(run_id, event_id)
    if event is None or not event.get("fix"):
        return refusal(run_id, "fix", f"alert {event_id} offers no fix for this run")
    status, reason = steerable_status(ctx, run_id, now or utc_now())
    if reason:
        return refusal(run_id, "fix", reason)
    values = {k: v for k, v in event["fix"].items() if k in HYPERPARAMETER_FIELDS}
    try:
        version = ctx.store.submit_parameters(
            run_id, **values, pause_train=True if status == "paused" else None)
    except ValueError as exc:
        return refusal(run_id, "fix", str(exc))
    return {"run_id": run_id, "kind": "fix", "version": version, "refused": None,
            "what": f'"{fix_label(values).removeprefix("Apply: ")}"'}


def clicked_fix(
    buttons: list[tuple[int, int | None]], seen: Mapping[str, int] | None
) -> tuple[int | None, dict[str, int]]:
    """The event whose fix button was clicked since the last look, and the click counts
    to remember. Buttons arriving (a refresh prepends alerts) fire the callback too;
    comparing counts tells a click from an arrival or a replay of an old click."""
    seen = dict(seen or {})
    clicked = None
    for event_id, clicks in buttons:
        if clicks and clicks > seen.get(str(event_id), 0):
            clicked = event_id
            seen[str(event_id)] = clicks
    return clicked, seen


def _prepend(items: list[html.Li]) -> Patch:
    patch = Patch()
    for item in reversed(items):
        patch.prepend(item)
    return patch


def register(app: Dash, ctx: BoardContext) -> None:
    @app.callback(
        Output("alerts-list", "children"),
        Output("alerts-count", "children"),
        Output("alerts-state", "data"),
        Input("events-token", "data"),
        State("run-select", "value"),
        State("alerts-state", "data"),
    )
    def _alerts(_token: dict | None, run_id: int | None, state: dict | None) -> tuple:
        update = update_alerts(ctx, run_id, state)
        if update is None:
            return no_update, no_update, no_update
        items = update.items if update.replace else _prepend(update.items or [])
        return items, update.count, update.state

    @app.callback(
        Output("submission", "data", allow_duplicate=True),
        Output("fix-clicks", "data"),
        Input({"type": "alert-fix", "event_id": ALL}, "n_clicks"),
        State("run-select", "value"),
        State("fix-clicks", "data"),
        prevent_initial_call=True,
    )
    def _fix(clicks: list[int | None], run_id: int | None, seen: dict | None) -> tuple:
        ids = [item["id"]["event_id"] for item in callback_context.inputs_list[0]]
        event_id, seen = clicked_fix(list(zip(ids, clicks, strict=True)), seen)
        if event_id is None:
            return no_update, no_update
        return apply_fix(ctx, run_id, event_id), seen
