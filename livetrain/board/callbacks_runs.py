"""Which run the page shows: the selector, the run header and the refresh rate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dash import Dash, Input, Output, Patch, State, html, no_update

from livetrain.board.context import BoardContext
from livetrain.board.display import NAME_SHOWN, TITLE_MAX, shorten, shown_tags
from livetrain.board.status import format_duration
from livetrain.db.contract import LIVE_STATUSES, effective_status, heartbeat_age, is_live
from livetrain.db.store import now as utc_now


@dataclass(frozen=True)
class RunChoice:
    options: list[dict[str, Any]]
    value: int | None
    compare_options: list[dict[str, Any]] = field(default_factory=list)


def run_label(run: Mapping[str, Any], status: str) -> str:
    """Plain text (the dropdown renders it verbatim, never as HTML), e.g.
    "#12  name  [lr-sweep, baseline]  ·  running"."""
    parts = [f"#{run['run_id']}", shorten(run["name"], NAME_SHOWN)]
    if tags := shown_tags(run.get("tags")):
        parts.append(f"[{', '.join(tags)}]")
    if run.get("hidden"):
        parts.append("(hidden)")
    return "  ".join(parts) + f"  ·  {status}"


def choose_run(
    ctx: BoardContext, current: int | None, now: datetime | None = None,
    show_hidden: bool = False, compared: Sequence[int] = (),
) -> RunChoice:
    """Runs newest first; keeps the current choice, else picks the newest live run
    (else the newest run). Hidden runs are listed only with `show_hidden`, except the
    current one (in both lists) and the compared ones (in the comparison's list). The
    comparison's list has the chosen run first, marked as the one watched."""
    now = now or utc_now()
    keep = [run_id for run_id in (current, *compared) if run_id is not None]
    runs = ctx.queries.runs(show_hidden=show_hidden, keep=keep)
    if not runs and not show_hidden:  # every run is hidden: still show one
        runs = ctx.queries.runs(limit=1)
    newest = {r["run_id"] for r in runs if show_hidden or not r["hidden"]}
    if missing := set(keep) - {r["run_id"] for r in runs}:  # older than the list's newest
        runs = sorted(runs + ctx.queries.runs(only=missing), key=lambda r: -r["run_id"])
    statuses = {r["run_id"]: effective_status(r, now) for r in runs}
    value = current if current in statuses else None
    if value is None:
        pool = [r for r in runs if r["run_id"] in newest] or runs
        live = [r["run_id"] for r in pool if statuses[r["run_id"]] in LIVE_STATUSES]
        value = live[0] if live else (pool[0]["run_id"] if pool else None)
    listed = [r for r in runs if r["run_id"] in newest or r["run_id"] == value]
    options = [{"label": run_label(r, statuses[r["run_id"]]), "value": r["run_id"]}
               for r in listed]
    ordered = sorted(runs, key=lambda r: r["run_id"] != value)  # stable: newest first after
    compare_options = [
        {"label": run_label(r, statuses[r["run_id"]])
         + ("  ·  watching" if r["run_id"] == value else ""), "value": r["run_id"]}
        for r in ordered
    ]
    return RunChoice(options, value, compare_options)


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
        fixed={"run_id": run_id, "name": shorten(run["name"], TITLE_MAX),
               "model": run["model_name"],
               "dataset": run["dataset"], "device": str(config.get("device", "—")),
               "tags": shown_tags(run["tags"]), "hidden": bool(run["hidden"])},
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
                html.H1(shorten(fixed["name"], NAME_SHOWN), className="run-name",
                        title=shorten(fixed["name"], TITLE_MAX)),
                html.Span(live["status"], className=f"badge status-{live['status']}",
                          id="run-status"),
                html.Span(live["beat"], className="run-beat"),
                # After the patched children (2, 3): header_patch leaves these alone.
                *(html.Span(tag, className="tag", title=tag) for tag in fixed.get("tags", [])),
                *([html.Span("hidden", className="badge hidden-badge")]
                  if fixed.get("hidden") else []),
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
        Output("compare-select", "options"),
        Output("empty-state", "className"),
        Output("board-body", "className"),
        Output("db-alert", "className"),
        Input("refresh-interval", "n_intervals"),
        Input("show-hidden", "value"),
        Input("run-edit", "data"),
        Input("run-select", "value"),
        State("run-select", "options"),
        State("compare-select", "value"),
        State("compare-select", "options"),
    )
    def _runs(_n: int | None, show_hidden: list[str] | None, _edit: Any,
              current: int | None, shown: list[dict] | None, compared: list[int] | None,
              compare_shown: list[dict] | None) -> tuple:
        choice = choose_run(ctx, current, show_hidden="show" in (show_hidden or []),
                            compared=[c for c in compared or [] if isinstance(c, int)])
        empty = not choice.options
        return (
            choice.options if choice.options != shown else no_update,
            choice.value if choice.value != current else no_update,
            choice.compare_options if choice.compare_options != compare_shown else no_update,
            "empty-state" if empty else "empty-state hidden",
            "board hidden" if empty else "board",
            "alert hidden",  # the database answered
        )

    @app.callback(
        Output("run-header", "children"),
        Output("header-state", "data"),
        Input("refresh-interval", "n_intervals"),
        Input("run-select", "value"),
        Input("run-edit", "data"),
        State("header-state", "data"),
    )
    def _header(_n: int | None, run_id: int | None, _edit: Any, shown: dict | None) -> tuple:
        """A whole header when the run (or its name or tags) changed, else only its live
        values."""
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
