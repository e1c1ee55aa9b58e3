"""Which run the page shows: the selector, the run header and the refresh rate."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dash import Dash, Input, Output, Patch, State, html, no_update

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


@dataclass(frozen=True)
class Header:
    """What the run header shows: `fixed` changes only with the run, `live` every tick."""

    fixed: dict[str, Any]
    live: dict[str, str]


LIVE_TILES = ("Epoch", "Step", "Steps/s", "Elapsed")  # tiles 3..6, after the fixed three


def header_values(ctx: BoardContext, run_id: int, now: datetime | None = None) -> Header | None:
    now = now or utc_now()
    run = ctx.queries.run(run_id)
    if run is None:
        return None
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
    return Header(
        fixed={"run_id": run_id, "name": run["name"], "model": run["model_name"],
               "dataset": run["dataset"], "device": str(config.get("device", "—"))},
        live={"status": status, "beat": beat_text, "Epoch": str(epoch), "Step": f"{step:,}",
              "Steps/s": rate, "Elapsed": format_duration(elapsed)},
    )


def run_header(ctx: BoardContext, run_id: int | None, now: datetime | None = None) -> list[Any]:
    """Name, status and the numbers that say how the run is going."""
    if run_id is None:
        return []
    return header_children(run_id, header_values(ctx, run_id, now))


def header_children(run_id: int, header: Header | None) -> list[Any]:
    if header is None:
        return [html.Div(f"Run {run_id} no longer exists.", className="muted")]
    fixed, live = header.fixed, header.live
    return [
        html.Div(
            [
                html.Span(f"#{run_id}", className="run-id"),
                html.H1(fixed["name"], className="run-name"),
                html.Span(live["status"], className=f"badge status-{live['status']}",
                          id="run-status"),
                html.Span(live["beat"], className="run-beat"),
            ],
            className="run-title",
        ),
        html.Div(
            [
                _tile("Model", fixed["model"]),
                _tile("Dataset", fixed["dataset"]),
                _tile("Device", fixed["device"]),
                *(_tile(label, live[label], "tile-step" if label == "Step" else "")
                  for label in LIVE_TILES),
            ],
            className="tiles",
        ),
    ]


def header_patch(live: dict[str, str]) -> Patch:
    """The live values only, into the header run_header built for the same run."""
    patch = Patch()
    title = patch[0]["props"]["children"]
    title[2]["props"].update({"children": live["status"],
                              "className": f"badge status-{live['status']}"})
    title[3]["props"]["children"] = live["beat"]
    tiles = patch[1]["props"]["children"]
    for i, label in enumerate(LIVE_TILES, start=3):
        tiles[i]["props"]["children"][1]["props"]["children"] = live[label]
    return patch


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
        Output("header-state", "data"),
        Input("refresh-interval", "n_intervals"),
        Input("run-select", "value"),
        State("header-state", "data"),
    )
    def _header(_n: int | None, run_id: int | None, shown: dict | None) -> tuple:
        """A whole header when the run (or its name) changed, else only its live values."""
        header = header_values(ctx, run_id) if run_id is not None else None
        if header is not None and header.fixed == shown:
            return header_patch(header.live), no_update
        if run_id is None:
            return [], None
        return header_children(run_id, header), header.fixed if header else None

    @app.callback(
        Output("refresh-interval", "disabled"),
        Output("refresh-interval", "interval"),
        Output("slow-refresh", "disabled"),
        Input("refresh-select", "value"),
    )
    def _refresh(interval_ms: int | None) -> tuple[bool, int, bool]:
        disabled, interval = refresh_settings(interval_ms)
        return disabled, interval, disabled
