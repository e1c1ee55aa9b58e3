"""Which run the page shows: the selector, the run header and the refresh rate."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dash import Dash, Input, Output, State, html, no_update

from dashboard.context import BoardContext
from dashboard.status import (
    LIVE_STATUSES,
    effective_status,
    format_duration,
    heartbeat_age,
    is_live,
)
from db.store import now as utc_now


@dataclass(frozen=True)
class RunChoice:
    options: list[dict[str, Any]]
    value: int | None


def run_label(run: Mapping[str, Any], status: str) -> str:
    """Plain text (the dropdown renders it verbatim, never as HTML)."""
    return f"#{run['run_id']}  {run['name']}  ·  {status}"


def choose_run(ctx: BoardContext, current: int | None, now: datetime | None = None) -> RunChoice:
    """Runs newest first; keeps the current choice, else picks the newest live run
    (else the newest run)."""
    now = now or utc_now()
    runs = ctx.queries.runs()
    statuses = {r["run_id"]: effective_status(r, now) for r in runs}
    options = [{"label": run_label(r, statuses[r["run_id"]]), "value": r["run_id"]} for r in runs]
    if current in statuses:
        return RunChoice(options, current)
    live = [r["run_id"] for r in runs if statuses[r["run_id"]] in LIVE_STATUSES]
    value = live[0] if live else (runs[0]["run_id"] if runs else None)
    return RunChoice(options, value)


def start_command(ctx: BoardContext) -> str:
    """The command that starts a run this board will see."""
    if ctx.store.url == "sqlite:///training.db":
        return "python train.py"
    return f"python train.py --db '{ctx.db_label}'"


def _tile(label: str, value: str, class_name: str = "") -> html.Div:
    return html.Div(
        [html.Div(label, className="tile-label"), html.Div(value, className="tile-value")],
        className=f"tile {class_name}".strip(),
    )


def run_header(ctx: BoardContext, run_id: int | None, now: datetime | None = None) -> list[Any]:
    """Name, status and the numbers that say how the run is going."""
    if run_id is None:
        return []
    now = now or utc_now()
    run = ctx.queries.run(run_id)
    if run is None:
        return [html.Div(f"Run {run_id} no longer exists.", className="muted")]
    status = effective_status(run, now)
    latest = ctx.queries.latest_statistics(run_id, 2)
    step = latest[0]["step"] if latest else 0
    epoch = latest[0]["epoch"] if latest else 1
    rate = "—"
    if len(latest) == 2 and status == "running":
        seconds = (latest[0]["dt"] - latest[1]["dt"]).total_seconds()
        if seconds > 0:
            rate = f"{(latest[0]['step'] - latest[1]['step']) / seconds:.1f}"
    elapsed = ((run["dt_ended"] or now) - run["dt_started"]).total_seconds()
    config = run["config"] or {}
    beat = heartbeat_age(run, now)
    beat_text = f"heartbeat {format_duration(beat)} ago" if is_live(status) else (
        f"ended {run['dt_ended']:%Y-%m-%d %H:%M:%S} UTC" if run["dt_ended"] else ""
    )
    return [
        html.Div(
            [
                html.Span(f"#{run_id}", className="run-id"),
                html.H1(run["name"], className="run-name"),
                html.Span(status, className=f"badge status-{status}", id="run-status"),
                html.Span(beat_text, className="run-beat"),
            ],
            className="run-title",
        ),
        html.Div(
            [
                _tile("Model", run["model_name"]),
                _tile("Dataset", run["dataset"]),
                _tile("Device", str(config.get("device", "—"))),
                _tile("Epoch", str(epoch)),
                _tile("Step", f"{step:,}", "tile-step"),
                _tile("Steps/s", rate),
                _tile("Elapsed", format_duration(elapsed)),
            ],
            className="tiles",
        ),
    ]


def refresh_settings(interval_ms: int | None) -> tuple[bool, int]:
    """(disabled, interval) of the dcc.Interval for the refresh choice; 0 means off."""
    if not interval_ms:
        return True, 60_000
    return False, int(interval_ms)


def register(app: Dash, ctx: BoardContext) -> None:
    @app.callback(
        Output("run-select", "options"),
        Output("run-select", "value"),
        Output("empty-state", "className"),
        Output("board-body", "className"),
        Output("db-alert", "className"),
        Input("refresh-interval", "n_intervals"),
        State("run-select", "value"),
        State("run-select", "options"),
    )
    def _runs(_n: int | None, current: int | None, shown: list[dict] | None) -> tuple:
        choice = choose_run(ctx, current)
        empty = not choice.options
        return (
            choice.options if choice.options != shown else no_update,
            choice.value if choice.value != current else no_update,
            "empty-state" if empty else "empty-state hidden",
            "board hidden" if empty else "board",
            "alert hidden",  # the database answered
        )

    @app.callback(
        Output("run-header", "children"),
        Input("refresh-interval", "n_intervals"),
        Input("run-select", "value"),
    )
    def _header(_n: int | None, run_id: int | None) -> list[Any]:
        return run_header(ctx, run_id)

    @app.callback(
        Output("refresh-interval", "disabled"),
        Output("refresh-interval", "interval"),
        Output("slow-refresh", "disabled"),
        Input("refresh-select", "value"),
    )
    def _refresh(interval_ms: int | None) -> tuple[bool, int, bool]:
        disabled, interval = refresh_settings(interval_ms)
        return disabled, interval, disabled
