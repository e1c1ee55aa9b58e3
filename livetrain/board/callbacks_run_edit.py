"""Run bookkeeping: rename the run shown, tag it, hide it from the run lists.

These write only the run's own `runs` row (name, tags, hidden), never a
`parameters` row, so they work on finished runs too. The Store validates every
value (Store.rename_run, set_run_tags); a refused one is explained next to the
buttons and nothing is written. Every write outputs to the `run-edit` Store,
which the board's access guard counts as a write (dashboard/auth.py), and which
the run lists, the header and the comparison listen to.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dash import Dash, Input, Output, State, callback_context

from livetrain.board.context import BoardContext, or_no_update
from livetrain.board.display import TITLE_MAX, shorten, shown_tags
from livetrain.db.store import now as utc_now

ACTIONS = ("rename", "tags", "hide")
TRIGGERS = {"rename-button": "rename", "run-name-input": "rename", "tags-button": "tags",
            "run-tags-input": "tags", "hide-button": "hide"}


def format_tags(tags: Any) -> str:
    return ", ".join(tags or [])


def parse_tags(text: Any) -> list[str]:
    """Comma-separated text as a list; blank pieces (a trailing comma) are dropped. The
    Store judges what is left."""
    if text is None:
        return []
    return [piece.strip() for piece in str(text).split(",") if piece.strip()]


@dataclass(frozen=True)
class RunFields:
    """What the run fields show; name/tags None when they should stay as typed."""

    name: str | None
    tags: str | None
    hide_label: str
    disabled: bool
    state: dict[str, Any] | None


def sync_run_fields(ctx: BoardContext, run_id: int | None,
                    loaded: Mapping[str, Any] | None) -> RunFields:
    """Load the run's name and tags when the run changes or someone changed them (another
    tab, a SQL client); otherwise leave what the user is typing alone."""
    run = ctx.queries.run(run_id) if run_id is not None else None
    if run is None:
        return RunFields("", "", "Hide run", True, None)
    label = "Unhide run" if run["hidden"] else "Hide run"
    # bounded like everything the page holds: a name written by SQL can be any size
    state = {"run_id": run_id, "name": shorten(run["name"], TITLE_MAX),
             "tags": shown_tags(run["tags"])}
    if loaded == state:
        return RunFields(None, None, label, False, state)
    return RunFields(state["name"], format_tags(state["tags"]), label, False, state)


def edit_run(ctx: BoardContext, run_id: int | None, action: str, name: Any = None,
             tags: Any = None) -> dict[str, Any]:
    """Do one action on the run's row; returns what the page shows (and what the run
    lists, the header and the comparison redraw on). Nothing is written when refused."""
    result: dict[str, Any] = {"run_id": run_id, "action": action, "ok": False,
                              "at": utc_now().isoformat()}
    if action not in ACTIONS:
        return result | {"message": "Unknown action."}
    if run_id is None or (run := ctx.queries.run(run_id)) is None:
        return result | {"message": "No run selected."}
    try:
        if action == "rename":
            stored = ctx.store.rename_run(run_id, name)
            message = f"Renamed to “{stored}”."
        elif action == "tags":
            stored_tags = ctx.store.set_run_tags(run_id, parse_tags(tags))
            message = f"Tags: {format_tags(stored_tags)}." if stored_tags else "Tags cleared."
        else:
            hide = not run["hidden"]
            ctx.store.set_run_hidden(run_id, hide)
            message = ("Hidden from the run lists (tick “show hidden” to list it)."
                       if hide else "Listed again.")
    except (ValueError, KeyError) as error:
        verb = {"rename": "Not renamed", "tags": "Tags not saved", "hide": "Not changed"}
        return result | {"message": f"{verb[action]}: {str(error).strip(chr(39))}."}
    return result | {"ok": True, "message": message}


def register(app: Dash, ctx: BoardContext) -> None:
    @app.callback(
        Output("run-name-input", "value"),
        Output("run-tags-input", "value"),
        Output("hide-button", "children"),
        Output("rename-button", "disabled"),
        Output("tags-button", "disabled"),
        Output("hide-button", "disabled"),
        Output("run-fields-state", "data"),
        Input("control-token", "data"),
        Input("run-edit", "data"),
        State("run-select", "value"),
        State("run-fields-state", "data"),
    )
    def _sync(_token: Any, _edit: Any, run_id: int | None, loaded: dict | None) -> tuple:
        fields = sync_run_fields(ctx, run_id, loaded)
        return (
            or_no_update(fields.name),
            or_no_update(fields.tags),
            fields.hide_label, fields.disabled, fields.disabled, fields.disabled,
            fields.state,
        )

    @app.callback(
        Output("run-edit", "data"),
        Output("run-edit-message", "children"),
        Output("run-edit-message", "className"),
        Input("rename-button", "n_clicks"),
        Input("run-name-input", "n_submit"),
        Input("tags-button", "n_clicks"),
        Input("run-tags-input", "n_submit"),
        Input("hide-button", "n_clicks"),
        State("run-select", "value"),
        State("run-name-input", "value"),
        State("run-tags-input", "value"),
        prevent_initial_call=True,
    )
    def _edit(*args: Any) -> tuple:
        run_id, name, tags = args[-3:]
        action = TRIGGERS.get(str(callback_context.triggered_id), "")
        result = edit_run(ctx, run_id, action, name, tags)
        tone = "ok" if result["ok"] else "error"
        return result, result["message"], f"run-edit-message tone-{tone}"
