"""What changed since the last refresh, so that only the panels it concerns redraw.

Each refresh tick runs one query (BoardQueries.change_marks) and writes three small
Stores, each only when its value differs from what the page holds:

- `step-token`: a new logged step, activations, a rollback or an adopted version
  (curves, per-layer charts, activation histograms);
- `control-token`: the parameters row, checkpoints, the run's (effective) status,
  name, tags and hidden flag (fields, apply status, pause/rollback controls, parameter
  history, the run's name and tags fields);
- `events-token`: a new event, or an alert episode upserted (alerts, events list).

A tick on which nothing was logged costs one request and one query; a tick with one
new step redraws the three step panels and nothing else. Every token carries the
run id, so choosing another run redraws everything once.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from dash import Dash, Input, Output, State, no_update

from livetrain.board.context import BoardContext
from livetrain.board.display import TITLE_MAX, shorten, shown_tags
from livetrain.db.contract import effective_status

TOKENS = ("step-token", "control-token", "events-token")


def change_tokens(ctx: BoardContext, run_id: int | None,
                  now: datetime | None = None) -> tuple[dict[str, Any], ...]:
    """The three tokens for this run now (all {"run_id": None} without a run)."""
    marks = ctx.queries.change_marks(run_id) if run_id is not None else None
    if marks is None:
        return tuple({"run_id": run_id} for _ in TOKENS)
    status = effective_status(marks, now or datetime.now(UTC))
    return (
        {"run_id": run_id, "step": marks["step"], "activation_step": marks["activation_step"],
         "rollbacks": marks["rollbacks"], "applied_version": marks["applied_version"]},
        {"run_id": run_id, "version": marks["version"],
         "applied_version": marks["applied_version"], "checkpoints": marks["checkpoints"],
         "checkpoint_step": marks["checkpoint_step"], "status": status,
         "name": shorten(marks["name"], TITLE_MAX), "tags": shown_tags(marks["tags"]),
         "hidden": marks["hidden"]},
        {"run_id": run_id, "event_id": marks["event_id"],
         "applied_version": marks["applied_version"], "alerts": alert_mark(marks)},
    )


def alert_mark(marks: Mapping[str, Any]) -> list[Any]:
    """The episodes' marks as JSON (the page's copy must compare equal to a fresh one)."""
    time = marks["alert_time"]
    return [time.isoformat() if time is not None else None, int(marks["alert_logs"] or 0),
            int(marks["alerts_open"] or 0)]


def changed(new: Mapping[str, Any], held: Mapping[str, Any] | None) -> Any:
    return new if new != held else no_update


def register(app: Dash, ctx: BoardContext) -> None:
    @app.callback(
        *(Output(token, "data") for token in TOKENS),
        Input("refresh-interval", "n_intervals"),
        Input("run-select", "value"),
        *(State(token, "data") for token in TOKENS),
    )
    def _tokens(_n: int | None, run_id: int | None, *held: dict | None) -> tuple:
        return tuple(changed(new, old) for new, old in
                     zip(change_tokens(ctx, run_id), held, strict=True))
