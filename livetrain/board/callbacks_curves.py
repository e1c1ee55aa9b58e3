"""Loss and accuracy curves: built whole once per run, then extended a refresh at a time.

The page's `curve-state` Store remembers what the figures were built from (run,
smoothing, log-y, how many rollbacks had cut the run), the last step they hold,
the smoothing state and the last parameter version marked. A refresh reads only
`step > last_step` and sends extendData; a different run, a new smoothing or
log-y choice, or a rollback (the live path changed behind the page) rebuilds,
drawing the branches rollbacks cut off in grey.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dash import Dash, Input, Output, State, no_update

from livetrain.board.context import BoardContext, or_no_update
from livetrain.board.figures import change_lines, curve_extensions, curve_figures
from livetrain.board.smoothing import SMOOTHING_MAX
from livetrain.db.board_queries import CURVE_ROWS_LIMIT, HISTORY_LIMIT, REFRESH_ROWS

CHANGE_FIELDS = ("version", "applied_step", "optimizer", "learning_rate", "weight_decay",
                 "dropout", "grad_clip", "stop_train", "pause_train", "rollback_step")


@dataclass(frozen=True)
class CurveUpdate:
    """Either whole figures (a rebuild) or extendData (a refresh), and the new state."""

    state: dict[str, Any]
    loss_figure: dict[str, Any] | None = None
    accuracy_figure: dict[str, Any] | None = None
    loss_extend: list[Any] | None = None
    accuracy_extend: list[Any] | None = None


def _change_summary(change: Mapping[str, Any]) -> dict[str, Any]:
    """What the next change is compared with, small enough for the page's Store."""
    return {name: change.get(name) for name in CHANGE_FIELDS}


def update_curves(
    ctx: BoardContext, run_id: int | None, weight: float | None, log_y: bool,
    state: Mapping[str, Any] | None,
) -> CurveUpdate | None:
    """A rebuild when the page holds another run or display choice, else the new rows
    only; None when nothing new was logged."""
    weight = min(max(float(weight or 0.0), 0.0), SMOOTHING_MAX)
    built_for = {"run_id": run_id, "weight": weight, "log_y": log_y}
    if not state or any(state.get(k) != v for k, v in built_for.items()):
        return _rebuild(ctx, run_id, weight, log_y, built_for)
    if run_id is None:
        return None
    if ctx.queries.rollbacks(run_id) != state["rollbacks"]:  # the curve was cut: redraw
        return _rebuild(ctx, run_id, weight, log_y, built_for)
    rows = ctx.queries.curve_points(run_id, state["last_step"], REFRESH_ROWS)
    changes = ctx.queries.parameter_changes(run_id, state["change_version"])[::-1]
    if not rows and not changes:
        return None
    if state["last_step"] < 0:  # the first rows replace the "nothing logged yet" figure
        return _rebuild(ctx, run_id, weight, log_y, built_for)
    lines = change_lines(changes, state["change_prev"])
    loss, accuracy, smoothing = curve_extensions(rows, weight, state["ema"], lines)
    new_state = dict(state) | {
        "last_step": rows[-1][0] if rows else state["last_step"],
        "ema": smoothing,
    }
    if changes:
        new_state |= {"change_version": changes[-1]["version"],
                      "change_prev": _change_summary(changes[-1])}
    return CurveUpdate(new_state, loss_extend=loss, accuracy_extend=accuracy)


def _rebuild(
    ctx: BoardContext, run_id: int | None, weight: float, log_y: bool,
    built_for: dict[str, Any],
) -> CurveUpdate:
    rows: list[tuple[Any, ...]] = []
    changes: list[dict[str, Any]] = []
    abandoned: list[tuple[Any, ...]] = []
    rollbacks = 0
    if run_id is not None:
        rollbacks = ctx.queries.rollbacks(run_id)  # counted first: a later cut is seen next time
        rows = ctx.queries.curve_points(run_id, -1, CURVE_ROWS_LIMIT)
        changes = ctx.queries.parameter_changes(run_id, 0, HISTORY_LIMIT)[::-1]
        if rollbacks:
            abandoned = ctx.queries.abandoned_points(run_id)
    # A user's zoom survives a new smoothing, not another run or another y scale.
    loss, accuracy, smoothing = curve_figures(rows, weight, changes, log_y,
                                              uirevision=f"run {run_id} log {log_y}",
                                              abandoned=abandoned)
    state = built_for | {
        "rollbacks": rollbacks,
        "last_step": rows[-1][0] if rows else -1,
        "ema": smoothing,
        "change_version": changes[-1]["version"] if changes else 0,
        "change_prev": _change_summary(changes[-1]) if changes else None,
    }
    return CurveUpdate(state, loss_figure=loss, accuracy_figure=accuracy)


def register(app: Dash, ctx: BoardContext) -> None:
    @app.callback(
        Output("loss-graph", "figure"),
        Output("accuracy-graph", "figure"),
        Output("loss-graph", "extendData"),
        Output("accuracy-graph", "extendData"),
        Output("curve-state", "data"),
        Output("smoothing-value", "children"),
        Input("step-token", "data"),
        Input("smoothing-slider", "value"),
        Input("log-y", "value"),
        State("run-select", "value"),
        State("curve-state", "data"),
    )
    def _curves(
        _token: dict | None, weight: float | None, log_y: list[str] | None,
        run_id: int | None, state: dict | None,
    ) -> tuple:
        update = update_curves(ctx, run_id, weight, "log" in (log_y or []), state)
        if update is None:
            return (no_update,) * 6
        return (
            or_no_update(update.loss_figure),
            or_no_update(update.accuracy_figure),
            or_no_update(update.loss_extend),
            or_no_update(update.accuracy_extend),
            update.state,
            f"{update.state['weight']:.2f}",
        )
