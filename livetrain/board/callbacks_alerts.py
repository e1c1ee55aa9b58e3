"""Alerts: the trainer's diagnostic episodes, open apart from ended, with one-click fixes.

An episode (a row of `alerts`) is one problem followed while it holds: the trainer
upserts it at every log, so a row the page shows can change. The panel is drawn
whole, and drawn again only when the run's alert marks change (the episodes'
newest dt_last, logs and open count, and the newest event; a refresh that changed
none of them costs one small query). Warning and error events no episode stands
for (a failed run, a refused change, an older run's diagnostics) follow as "Other".

A fix (a parameters change) gets a button whose pattern-matching id names the run
and the episode (or event); the click reads the fix back from that row (never from
the page) and submits it through Store.submit_parameters, so the apply status
follows it like any other submission. Every drawing numbers its buttons afresh
(`render`), so a redrawn button's click count starting again at 0 is never
mistaken for, or hidden by, an earlier click.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dash import ALL, Dash, Input, Output, State, callback_context, html, no_update

from livetrain.board.callbacks_changes import alert_mark
from livetrain.board.callbacks_controls import refusal, steerable_status
from livetrain.board.context import BoardContext
from livetrain.board.status import format_number
from livetrain.db.store import HYPERPARAMETER_FIELDS
from livetrain.db.store import now as utc_now

FIX_LABELS = {"optimizer": "optimizer", "learning_rate": "lr", "weight_decay": "weight decay",
              "dropout": "dropout", "grad_clip": "grad clip"}
ENDED = {"resolved": "resolved", "rolled_back": "rolled back"}  # status → words
WITH_FIX = ("open", "rolled_back")  # a resolved problem needs no change; a rolled-back one may


def fix_id(run_id: int, kind: str, key: str | int, render: int) -> dict[str, Any]:
    """A fix button's id: the run, "alert" (key: alert_id) or "event" (key: event_id)."""
    return {"type": "alert-fix", "run_id": run_id, "kind": kind, "key": str(key),
            "render": render}


def fix_label(fix: Mapping[str, Any]) -> str:
    """e.g. "Apply: set lr to 3e-05" (several changes joined with "and")."""
    parts = []
    for name, value in fix.items():
        shown = format_number(value) if isinstance(value, float) else str(value)
        parts.append(f"{FIX_LABELS.get(name, name)} to {shown}{' %' * (name == 'dropout')}")
    return "Apply: set " + " and ".join(parts)


def _meta(row: Mapping[str, Any], extra: list[Any]) -> html.Div:
    meta = [html.Span(row["level"], className=f"badge level-{row['level']}"),
            html.Span(row["code"], className="event-code")]
    if row.get("layer_name"):
        meta.append(html.Span(row["layer_name"], className="alert-layer"))
    return html.Div(meta + extra, className="alert-meta")


def _advice(row: Mapping[str, Any], button_id: dict[str, Any] | None) -> list[Any]:
    """The message and what to do, as text nodes (never HTML), and the fix's button."""
    body: list[Any] = [html.Div(row["message"], className="alert-message")]
    if row.get("recommendation"):
        body.append(html.Div(row["recommendation"], className="alert-recommendation"))
    if button_id is not None and isinstance(row.get("fix"), dict) and row["fix"]:
        body.append(html.Button(fix_label(row["fix"]), id=button_id, className="btn btn-fix",
                                n_clicks=0))
    return body


def episode_span(alert: Mapping[str, Any]) -> list[html.Span]:
    """Where the episode stands: "step 120 → 340", "held for 12 logs", its worst value,
    and for an ended one "resolved at step 360" or "rolled back at step 100"."""
    logs = alert["logs"]
    spans = [html.Span(f"step {alert['first_step']:,} → {alert['last_step']:,}",
                       className="alert-steps"),
             html.Span(f"held for {logs:,} log{'s' * (logs != 1)}", className="alert-logs")]
    if alert.get("worst_value") is not None:
        measure = alert.get("measure") or "value"
        spans.append(html.Span(f"worst {measure} {format_number(alert['worst_value'])}",
                               className="alert-worst"))
    if alert["status"] in ENDED:
        at = alert.get("resolved_step")
        where = f" at step {at:,}" if at is not None else ""
        spans.append(html.Span(f"{ENDED[alert['status']]}{where}",
                               className=f"alert-ended ended-{alert['status']}"))
    return spans


def episode_item(alert: Mapping[str, Any], render: int) -> html.Li:
    """One episode: what is wrong, over which logs, how bad it got, what to do."""
    button = fix_id(alert["run_id"], "alert", alert["alert_id"], render) \
        if alert["status"] in WITH_FIX else None
    ended = " alert-ended-item" if alert["status"] in ENDED else ""
    return html.Li(
        [_meta(alert, []), html.Div(episode_span(alert), className="alert-span"),
         *_advice(alert, button)],
        className=f"alert-item alert-{alert['level']}{ended}",
    )


def event_item(event: Mapping[str, Any], render: int) -> html.Li:
    """A one-off warning or error event, as the panel showed every alert before episodes."""
    step = [html.Span(f"step {event['step']:,}", className="event-step")] \
        if event["step"] is not None else []
    button = fix_id(event["run_id"], "event", event["event_id"], render)
    return html.Li([_meta(event, step), *_advice(event, button)],
                   className=f"alert-item alert-{event['level']}")


def _group(title: str, name: str, items: list[html.Li]) -> html.Section:
    return html.Section(
        [html.H4([title, html.Span(str(len(items)), className="alert-group-count")],
                 className="alert-group-title"),
         html.Ul(items, className="alert-group-items")],
        className=f"alert-group alert-group-{name}",
    )


@dataclass(frozen=True)
class AlertsUpdate:
    """The whole panel (its groups), the count beside its title, and the page's state."""

    groups: list[html.Section]
    count: str
    state: dict[str, Any]


def alert_groups(
    episodes: list[Mapping[str, Any]], events: list[Mapping[str, Any]], render: int
) -> tuple[list[html.Section], str]:
    """Open episodes, ended ones, then other warnings and errors (empty groups left out),
    and a count such as "2 open · 1 resolved"."""
    open_items = [episode_item(a, render) for a in episodes if a["status"] == "open"]
    ended_items = [episode_item(a, render) for a in episodes if a["status"] != "open"]
    other_items = [event_item(e, render) for e in events]
    groups, counts = [], []
    for title, name, items in (("Open", "open", open_items),
                               ("Resolved", "resolved", ended_items),
                               ("Other warnings", "other", other_items)):
        if items:
            groups.append(_group(title, name, items))
            counts.append(f"{len(items)} {name}")
    return groups, " · ".join(counts)


def _next_render(state: Mapping[str, Any] | None) -> int:
    """The next drawing's number; a state the page did not write starts again at 1."""
    previous = (state or {}).get("render")
    if isinstance(previous, int) and not isinstance(previous, bool) and 0 <= previous < 2**31:
        return previous + 1
    return 1


def update_alerts(
    ctx: BoardContext, run_id: int | None, state: Mapping[str, Any] | None
) -> AlertsUpdate | None:
    """The panel drawn again when another run is shown or the run's alert marks moved;
    None when the page's drawing is still the database's."""
    render = _next_render(state)
    if run_id is None:
        if state and state.get("run_id") is None:
            return None
        return AlertsUpdate([], "", {"run_id": None, "mark": None, "render": render})
    marks = ctx.queries.alert_marks(run_id)
    mark = [marks["event_id"], *alert_mark(marks)]
    if state and state.get("run_id") == run_id and state.get("mark") == mark:
        return None
    groups, count = alert_groups(ctx.queries.episodes(run_id),
                                 ctx.queries.alert_events(run_id), render)
    return AlertsUpdate(groups, count, {"run_id": run_id, "mark": mark, "render": render})


def _fix_values(
    ctx: BoardContext, run_id: int, kind: str, key: str
) -> dict[str, Any] | None:
    """The fix the database holds for this run's episode or event (None without one)."""
    if kind == "alert":
        row = ctx.queries.episode(run_id, key)
    elif kind == "event" and key.isdecimal() and int(key) < 2**63:
        row = ctx.queries.event(run_id, int(key))
    else:
        row = None
    fix = row and row.get("fix")
    return fix if isinstance(fix, dict) and fix else None


def apply_fix(
    ctx: BoardContext, run_id: int | None, kind: str, key: str | int,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Submit an episode's (kind "alert") or event's fix, read from its row. A paused run
    stays paused (the fix is in force once it resumes or rolls back), so "set lr, then
    roll back" is two clicks, not a race with the NaN that paused it."""
    if run_id is None:
        return refusal(None, "fix", "no run selected")
    fix = _fix_values(ctx, run_id, kind, str(key))
    if fix is None:
        return refusal(run_id, "fix", f"alert {key} offers no fix for this run")
    status, reason = steerable_status(ctx, run_id, now or utc_now())
    if reason:
        return refusal(run_id, "fix", reason)
    values = {k: v for k, v in fix.items() if k in HYPERPARAMETER_FIELDS}
    try:
        version = ctx.store.submit_parameters(
            run_id, **values, pause_train=True if status == "paused" else None)
    except ValueError as exc:
        return refusal(run_id, "fix", str(exc))
    return {"run_id": run_id, "kind": "fix", "version": version, "refused": None,
            "what": f'"{fix_label(values).removeprefix("Apply: ")}"'}


def clicked_fix(
    buttons: list[tuple[Any, int | None]], seen: Mapping[str, int] | None
) -> tuple[Any, dict[str, int]]:
    """The button (its key) clicked since the last look, and the click counts to
    remember. Buttons arriving (a redraw) fire the callback too; comparing counts tells
    a click from an arrival or a replay of an old click."""
    seen = {k: v for k, v in (seen or {}).items() if isinstance(v, int)}
    clicked = None
    for key, clicks in buttons:
        if clicks and clicks > seen.get(str(key), 0):
            clicked = key
            seen[str(key)] = clicks
    return clicked, seen


def button_key(button: Mapping[str, Any]) -> str:
    """A fix button's id as one string, whatever order the browser sends its fields in."""
    return "|".join(str(button.get(k)) for k in ("run_id", "kind", "key", "render"))


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
        return update.groups, update.count, update.state

    @app.callback(
        Output("submission", "data", allow_duplicate=True),
        Output("fix-clicks", "data"),
        Input({"type": "alert-fix", "run_id": ALL, "kind": ALL, "key": ALL, "render": ALL},
              "n_clicks"),
        State("run-select", "value"),
        State("fix-clicks", "data"),
        prevent_initial_call=True,
    )
    def _fix(clicks: list[int | None], run_id: int | None, seen: dict | None) -> tuple:
        buttons = {button_key(item["id"]): item["id"]
                   for item in callback_context.inputs_list[0]}
        key, seen = clicked_fix(list(zip(buttons, clicks, strict=True)), seen)
        if key is None:
            return no_update, no_update
        button = buttons[key]
        if button["run_id"] != run_id:  # drawn for a run the page no longer shows
            return refusal(run_id, "fix", "that alert is another run's"), seen
        return apply_fix(ctx, run_id, button["kind"], button["key"]), seen
