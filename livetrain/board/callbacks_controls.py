"""Steering: the parameter fields, their validation, submit, stop, and the apply status.

Every value goes through hyperparams.validate() before anything is written, the
same rules the database's CHECK constraints and the trainer enforce. While a run
is paused (by the user or by itself on a NaN) a submit keeps it paused: the new
values take effect when it resumes or rolls back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dash import ALL, Dash, Input, Output, State, callback_context, no_update

from livetrain.board.context import BoardContext, or_no_update
from livetrain.board.layout import FIELDS, LR_SLIDER_MIN
from livetrain.board.status import format_duration, format_number
from livetrain.db.contract import effective_status, is_live, validate
from livetrain.db.store import now as utc_now


@dataclass(frozen=True)
class FieldValues:
    optimizer: str | None
    learning_rate: str | None
    weight_decay: str | None
    dropout: str | None
    grad_clip: str | None


NO_VALUES = FieldValues(None, None, None, None, None)


@dataclass(frozen=True)
class FieldSync:
    """What the fields should show; `values` is None when they should stay as typed."""

    values: FieldValues | None
    state: dict[str, Any] | None
    disabled: bool


def sync_fields(
    ctx: BoardContext, run_id: int | None, loaded: Mapping[str, Any] | None,
    now: datetime | None = None,
) -> FieldSync:
    """Load the run's current parameters when the run changes or someone (another tab, a
    SQL client) wrote a new version; otherwise leave what the user is typing alone."""
    if run_id is None:
        return FieldSync(NO_VALUES, None, True)
    run = ctx.queries.run(run_id)
    params = ctx.store.get_parameters(run_id)
    if run is None or params is None:
        return FieldSync(NO_VALUES, None, True)
    disabled = not is_live(effective_status(run, now or utc_now()))
    state = {"run_id": run_id, "version": params.version}
    if loaded == state:
        return FieldSync(None, state, disabled)
    values = FieldValues(
        params.optimizer,
        format_number(params.learning_rate),
        format_number(params.weight_decay),
        str(params.dropout),
        format_number(params.grad_clip),
    )
    return FieldSync(values, state, disabled)


def field_errors(
    optimizer: Any, lr: Any, wd: Any, dropout: Any, grad_clip: Any = None
) -> dict[str, str]:
    """validate()'s message per bad field; fields not loaded yet (None) are not judged."""
    _, errors = validate(optimizer, lr, wd, dropout, grad_clip)
    given = dict(zip(FIELDS, (optimizer, lr, wd, dropout, grad_clip), strict=True))
    return {name: message for name, message in errors.items() if given.get(name) is not None}


def lr_to_slider(text: Any) -> float | None:
    """The slider position (log10) for a typed learning rate, None if it is not one."""
    try:
        lr = float(text)
    except (TypeError, ValueError, OverflowError):
        return None
    if not math.isfinite(lr) or lr <= 0:
        return None
    return round(min(max(math.log10(lr), LR_SLIDER_MIN), 0.0), 2)


def slider_to_lr(position: float, typed: Any) -> str | None:
    """The learning rate text for a slider position; None when the typed value already
    sits there (the slider moved only because the text moved it)."""
    if lr_to_slider(typed) == round(position, 2):
        return None
    return f"{10 ** position:.3g}"


def refusal(run_id: int | None, kind: str, reason: str) -> dict[str, Any]:
    """A submission that wrote nothing, and why (the apply status shows it)."""
    return {"run_id": run_id, "kind": kind, "version": None, "refused": reason}


def steerable_status(
    ctx: BoardContext, run_id: int, now: datetime
) -> tuple[str | None, str | None]:
    """(the run's effective status, why it cannot be steered or None)."""
    run = ctx.queries.run(run_id)
    if run is None:
        return None, f"run {run_id} no longer exists"
    status = effective_status(run, now)
    if not is_live(status):
        return status, f"run {run_id} is {status}; no trainer reads its parameters any more"
    return status, None


def submit_parameters(
    ctx: BoardContext, run_id: int | None, optimizer: Any, lr: Any, wd: Any, dropout: Any,
    grad_clip: Any = None, now: datetime | None = None,
) -> dict[str, Any]:
    """Validate, then write the new desired state (version + 1); nothing is written if
    a value is refused. `grad_clip` None keeps the current one. Returns what the apply
    status follows."""
    if run_id is None:
        return refusal(None, "parameters", "no run selected")
    parsed, errors = validate(optimizer, lr, wd, dropout, 0.0 if grad_clip is None else grad_clip)
    if errors or parsed is None:
        return refusal(run_id, "parameters", "; ".join(errors.values()))
    status, reason = steerable_status(ctx, run_id, now or utc_now())
    if reason:
        return refusal(run_id, "parameters", reason)
    version = ctx.store.submit_parameters(
        run_id, optimizer=parsed.optimizer, learning_rate=parsed.learning_rate,
        weight_decay=parsed.weight_decay, dropout=parsed.dropout,
        grad_clip=None if grad_clip is None else parsed.grad_clip,
        pause_train=True if status == "paused" else None,
    )
    return {"run_id": run_id, "kind": "parameters", "version": version, "refused": None}


def request_stop(ctx: BoardContext, run_id: int | None, now: datetime | None = None) -> dict:
    if run_id is None:
        return refusal(None, "stop", "no run selected")
    _, reason = steerable_status(ctx, run_id, now or utc_now())
    if reason:
        return refusal(run_id, "stop", reason)
    version = ctx.store.request_stop(run_id)
    return {"run_id": run_id, "kind": "stop", "version": version, "refused": None}


SUBMISSION_NAMES = {"parameters": "Parameters", "stop": "Stop request", "fix": "Fix",
                    "pause": "Pause", "resume": "Resume", "rollback": "Rollback"}


@dataclass(frozen=True)
class ApplyStatus:
    text: str
    tone: str  # muted | pending | ok | error

    @property
    def class_name(self) -> str:
        return f"apply-status tone-{self.tone}"


def apply_status(
    ctx: BoardContext, run_id: int | None, submission: Mapping[str, Any] | None,
    now: datetime | None = None,
) -> ApplyStatus:
    """Pending until the trainer acknowledges the submitted version, then where and how
    fast it was applied; rejected or not-live runs say so instead of waiting forever."""
    if run_id is None:
        return ApplyStatus("", "muted")
    now = now or utc_now()
    if not submission or submission.get("run_id") != run_id:
        return _current_state(ctx, run_id)
    what = SUBMISSION_NAMES.get(submission["kind"], "Parameters")
    if submission.get("what"):
        what = f"{what} {submission['what']}"
    if submission.get("refused"):
        return ApplyStatus(f"{what} not sent: {submission['refused']}.", "error")
    version = int(submission["version"])
    adopted = ctx.queries.first_adoption_from(run_id, version)
    if adopted is not None:
        latency = (adopted["dt_applied"] - adopted["dt_updated"]).total_seconds() * 1000
        if adopted["version"] == version:
            return ApplyStatus(
                f"{what} (version {version}) applied at step {adopted['applied_step']}, "
                f"{latency:.0f} ms after submit.", "ok")
        return ApplyStatus(
            f"{what} (version {version}) superseded by version {adopted['version']}, "
            f"applied at step {adopted['applied_step']}, {latency:.0f} ms after submit.", "ok")
    rejected = ctx.queries.rejection(run_id, version)
    if rejected is not None:
        return ApplyStatus(
            f"{what} (version {version}) rejected by the trainer: {rejected['message']}", "error")
    run = ctx.queries.run(run_id)
    status = effective_status(run, now) if run else "gone"
    if status == "lost":
        silent = format_duration((now - run["dt_heartbeat"]).total_seconds())
        return ApplyStatus(
            f"{what} (version {version}) pending: the trainer has sent no heartbeat for "
            f"{silent} (lost); it applies when the trainer comes back.", "error")
    if not is_live(status):
        return ApplyStatus(
            f"{what} (version {version}) will not be applied: the run is {status}.", "error")
    return ApplyStatus(f"{what} (version {version}) pending: waiting for the trainer…",
                       "pending")


def _current_state(ctx: BoardContext, run_id: int) -> ApplyStatus:
    """With nothing submitted from this page: which version the trainer runs."""
    params = ctx.store.get_parameters(run_id)
    if params is None:
        return ApplyStatus("", "muted")
    if params.applied_version >= params.version:
        return ApplyStatus(
            f"Version {params.applied_version} in force since step {params.applied_step}.",
            "muted")
    return ApplyStatus(
        f"Version {params.version} written, version {params.applied_version} in force.",
        "muted")


def register(app: Dash, ctx: BoardContext) -> None:
    """The control form: its fields, then what is sent and what became of it."""
    register_fields(app, ctx)
    register_sending(app, ctx)


def register_fields(app: Dash, ctx: BoardContext) -> None:
    @app.callback(
        Output("optimizer-select", "value"),
        Output("lr-input", "value", allow_duplicate=True),
        Output("wd-input", "value"),
        Output("dropout-input", "value"),
        Output("grad-clip-input", "value"),
        Output("fields-state", "data"),
        Output("submit-params", "disabled"),
        Output("stop-button", "disabled"),
        Input("control-token", "data"),
        State("run-select", "value"),
        State("fields-state", "data"),
        prevent_initial_call="initial_duplicate",
    )
    def _sync(_token: dict | None, run_id: int | None, loaded: dict | None) -> tuple:
        sync = sync_fields(ctx, run_id, loaded)
        if sync.values is None:
            values: tuple = (no_update,) * 5
        else:
            v = sync.values
            values = (v.optimizer, v.learning_rate, v.weight_decay, v.dropout, v.grad_clip)
        return (*values, sync.state, sync.disabled, sync.disabled)

    @app.callback(
        Output("lr-input", "value"),
        Output("lr-slider", "value"),
        Input("lr-input", "value"),
        Input("lr-slider", "value"),
    )
    def _lr_slider(text: Any, position: float | None) -> tuple:
        if callback_context.triggered_id == "lr-slider" and position is not None:
            typed = slider_to_lr(position, text)
            return or_no_update(typed), no_update
        slider = lr_to_slider(text)
        return no_update, or_no_update(slider)

    @app.callback(
        Output({"type": "field", "name": ALL}, "className"),
        Output({"type": "field-error", "name": ALL}, "children"),
        Input("optimizer-select", "value"),
        Input("lr-input", "value"),
        Input("wd-input", "value"),
        Input("dropout-input", "value"),
        Input("grad-clip-input", "value"),
    )
    def _validate(optimizer: Any, lr: Any, wd: Any, dropout: Any,
                  grad_clip: Any) -> tuple[list, list]:
        errors = field_errors(optimizer, lr, wd, dropout, grad_clip)
        names = [o["id"]["name"] for o in callback_context.outputs_list[0]]
        return (
            ["field invalid" if n in errors else "field" for n in names],
            [errors.get(n, "") for n in names],
        )


def register_sending(app: Dash, ctx: BoardContext) -> None:
    @app.callback(
        Output("submission", "data"),
        Input("submit-params", "n_clicks"),
        Input("stop-confirm", "submit_n_clicks"),
        State("run-select", "value"),
        State("optimizer-select", "value"),
        State("lr-input", "value"),
        State("wd-input", "value"),
        State("dropout-input", "value"),
        State("grad-clip-input", "value"),
        prevent_initial_call=True,
    )
    def _send(_submit: int, _stop: int, run_id: int | None, *fields: Any) -> dict[str, Any]:
        if callback_context.triggered_id == "stop-confirm":
            return request_stop(ctx, run_id)
        return submit_parameters(ctx, run_id, *fields)

    @app.callback(
        Output("apply-status", "children"),
        Output("apply-status", "className"),
        Input("control-token", "data"),
        Input("submission", "data"),
        State("run-select", "value"),
    )
    def _status(_token: dict | None, submission: dict | None,
                run_id: int | None) -> tuple[str, str]:
        status = apply_status(ctx, run_id, submission)
        return status.text, status.class_name
