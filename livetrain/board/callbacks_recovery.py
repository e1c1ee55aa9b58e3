"""Pause / resume and roll back: undoing the damage of a bad change from the board.

Pause writes pause_train; the trainer's status then says `paused`. The trainer
also pauses itself on a NaN without touching pause_train, so the button reads
the run's status, not the column. Roll back writes rollback_step (a one-shot
request) and clears the pause: the run continues from the checkpoint, with the
parameters in the control panel in force.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dash import Dash, Input, Output, State, no_update

from livetrain.board.callbacks_controls import refusal, steerable_status
from livetrain.board.context import BoardContext
from livetrain.db.contract import effective_status, is_live
from livetrain.db.store import ParameterState
from livetrain.db.store import now as utc_now


@dataclass(frozen=True)
class RecoveryView:
    """The pause button and the checkpoint choice as the run's state says."""

    pause_label: str
    pause_disabled: bool
    options: list[dict[str, Any]]
    value: int | None
    rollback_disabled: bool


def _paused(status: str | None, params: ParameterState | None) -> bool:
    """Paused, or asked to pause and not there yet: the button offers Resume."""
    return status == "paused" or bool(params and params.pause_train)


def checkpoint_label(checkpoint: Mapping[str, Any]) -> str:
    return f"step {checkpoint['step']:,} · epoch {checkpoint['epoch']} · {checkpoint['reason']}"


def recovery_view(
    ctx: BoardContext, run_id: int | None, chosen: int | None, now: datetime | None = None
) -> RecoveryView:
    """Resume while the run is paused (by anyone), else Pause; the run's checkpoints
    newest first, keeping the user's choice while it still exists."""
    if run_id is None or (run := ctx.queries.run(run_id)) is None:
        return RecoveryView("Pause", True, [], None, True)
    status = effective_status(run, now or utc_now())
    paused = _paused(status, ctx.store.get_parameters(run_id))
    checkpoints = ctx.queries.checkpoints(run_id)
    steps = [c["step"] for c in checkpoints]
    value = chosen if chosen in steps else (steps[0] if steps else None)
    live = is_live(status)
    return RecoveryView(
        "Resume" if paused else "Pause",
        not live,
        [{"label": checkpoint_label(c), "value": c["step"]} for c in checkpoints],
        value,
        not live or value is None,
    )


def toggle_pause(ctx: BoardContext, run_id: int | None, now: datetime | None = None) -> dict:
    """Pause a running run, resume a paused one."""
    if run_id is None:
        return refusal(None, "pause", "no run selected")
    status, reason = steerable_status(ctx, run_id, now or utc_now())
    resume = _paused(status, ctx.store.get_parameters(run_id))
    kind = "resume" if resume else "pause"
    if reason:
        return refusal(run_id, kind, reason)
    version = ctx.store.submit_parameters(run_id, pause_train=not resume)
    return {"run_id": run_id, "kind": kind, "version": version, "refused": None}


def request_rollback(
    ctx: BoardContext, run_id: int | None, step: Any, now: datetime | None = None
) -> dict:
    """Ask the trainer to restore its newest checkpoint at or before `step` and go on."""
    if run_id is None:
        return refusal(None, "rollback", "no run selected")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return refusal(run_id, "rollback", "choose a checkpoint to roll back to")
    _, reason = steerable_status(ctx, run_id, now or utc_now())
    if reason:
        return refusal(run_id, "rollback", reason)
    version = ctx.store.submit_parameters(run_id, rollback_step=step, pause_train=False)
    return {"run_id": run_id, "kind": "rollback", "version": version, "refused": None,
            "what": f"to step {step:,}"}


def rollback_message(step: int | None) -> str:
    if step is None:
        return ""
    return (f"Roll back to step {step:,}? The trainer restores that checkpoint (model and "
            "optimizer), discards the steps after it (they stay on the curves in grey) and "
            "continues with the parameters now set.")


def register(app: Dash, ctx: BoardContext) -> None:
    @app.callback(
        Output("pause-button", "children"),
        Output("pause-button", "disabled"),
        Output("checkpoint-select", "options"),
        Output("checkpoint-select", "value"),
        Output("rollback-button", "disabled"),
        Input("control-token", "data"),
        State("run-select", "value"),
        State("checkpoint-select", "value"),
        State("checkpoint-select", "options"),
    )
    def _view(_token: dict | None, run_id: int | None, chosen: int | None,
              shown: list[dict] | None) -> tuple:
        view = recovery_view(ctx, run_id, chosen)
        return (
            view.pause_label, view.pause_disabled,
            view.options if view.options != shown else no_update,
            view.value if view.value != chosen else no_update,
            view.rollback_disabled,
        )

    @app.callback(
        Output("rollback-confirm", "message"),
        Input("checkpoint-select", "value"),
    )
    def _message(step: int | None) -> str:
        return rollback_message(step)

    @app.callback(
        Output("submission", "data", allow_duplicate=True),
        Input("pause-button", "n_clicks"),
        State("run-select", "value"),
        prevent_initial_call=True,
    )
    def _pause(clicks: int | None, run_id: int | None) -> Any:
        return toggle_pause(ctx, run_id) if clicks else no_update

    @app.callback(
        Output("submission", "data", allow_duplicate=True),
        Input("rollback-confirm", "submit_n_clicks"),
        State("run-select", "value"),
        State("checkpoint-select", "value"),
        prevent_initial_call=True,
    )
    def _rollback(clicks: int | None, run_id: int | None, step: int | None) -> Any:
        return request_rollback(ctx, run_id, step) if clicks else no_update
