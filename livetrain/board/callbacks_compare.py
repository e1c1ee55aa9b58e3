"""Compare runs: loss and accuracy of the chosen runs overlaid, and a table of their figures.

Nothing here runs while nothing is compared: the comparison is built when the
selection changes, and refreshed on the slow (5 s) tick only while one of the
compared runs is live; a clientside callback drops every other tick in the
browser, so an idle comparison sends no request at all. A refresh reads one row
of marks per run (newest step, rollbacks, adopted version, name, tags, status)
and then only what changed: the new rows of the runs that logged some (appended
with extendData, and their final and best figures merged into those the page
holds), the parameter history of a run that adopted a new version. The figures
come from the rows read for the curves, so a refresh costs what its new rows
cost, not what the runs' length would. A new selection, a rename, a
rollback in a compared run, or traces grown past their point budget rebuild
everything, downsampled again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dash import Dash, Input, Output, State, html, no_update

from livetrain.board.context import BoardContext, or_no_update
from livetrain.board.display import NAME_SHOWN, TITLE_MAX, shorten, shown_tags, text_span
from livetrain.board.downsample import MAX_POINTS
from livetrain.board.figures_compare import (
    change_summaries,
    compare_extensions,
    compare_figures,
    run_colors,
    summarize,
)
from livetrain.db.board_queries import COMPARE_MAX
from livetrain.db.contract import LIVE_STATUSES, effective_status
from livetrain.db.store import now as utc_now

REBUILD_POINTS = MAX_POINTS * 5 // 4  # extendData may grow a trace this far, then rebuild
EMPTY_STATE: dict[str, Any] = {"run_ids": [], "live": False, "runs": {}}
TABLE_HEADERS = ("run", "tags", "status", "model", "dataset", "steps", "train loss",
                 "val loss", "val acc", "best val loss", "best val acc", "parameter history")
BODY_CLASS = "compare-body"

# Only a clientside check on each slow tick: a request only while a compared run is live.
TICK_GATE = """function(n, chosen, state) {
    if (!chosen || !chosen.length || !state || !state.live) {
        return window.dash_clientside.no_update;
    }
    return n;
}"""


@dataclass(frozen=True)
class CompareUpdate:
    """Whole figures (a rebuild) or extendData (a refresh), the table rows if they
    changed, and the new state; `shown` says whether the panel's body is visible."""

    state: dict[str, Any]
    shown: bool = True
    loss_figure: dict[str, Any] | None = None
    accuracy_figure: dict[str, Any] | None = None
    loss_extend: list[Any] | None = None
    accuracy_extend: list[Any] | None = None
    rows: list[html.Tr] | None = None


def chosen_ids(value: Any) -> list[int]:
    """The dropdown's value as run ids: integers, each once, in the order chosen, at
    most COMPARE_MAX (a crafted request gets no further)."""
    ids: list[int] = []
    for item in value if isinstance(value, list) else []:
        if isinstance(item, int) and not isinstance(item, bool) and item not in ids:
            ids.append(item)
    return ids[:COMPARE_MAX]


def _marks(mark: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """What the page holds per compared run, to tell what a refresh must redraw."""
    return {
        "step": -1 if mark["step"] is None else int(mark["step"]),
        "rollbacks": int(mark["rollbacks"] or 0),
        "version": int(mark["version"] or 0),
        "name": shorten(mark["name"], TITLE_MAX),
        "tags": shown_tags(mark["tags"]),
        "status": effective_status(mark, now),
    }


def _live(runs: Mapping[str, Mapping[str, Any]]) -> bool:
    return any(run["status"] in LIVE_STATUSES for run in runs.values())


def update_comparison(
    ctx: BoardContext, chosen: Any, state: Mapping[str, Any] | None,
    now: datetime | None = None,
) -> CompareUpdate | None:
    """The comparison for the chosen runs; None when the page already shows it all."""
    ids = chosen_ids(chosen)
    if not ids:
        if not state or not state.get("run_ids"):
            return None  # nothing compared, nothing shown: no query at all
        loss, accuracy = compare_figures([], {})
        return CompareUpdate(dict(EMPTY_STATE), False, loss, accuracy, rows=[])
    now = now or utc_now()
    found = {m["run_id"]: m for m in ctx.queries.compare_marks(ids)}
    order = [run_id for run_id in ids if run_id in found]
    runs = {str(run_id): _marks(found[run_id], now) for run_id in order}
    held = state if state and state.get("run_ids") == order else None
    if held is None or _needs_rebuild(runs, held["runs"]):
        return _rebuild(ctx, order, found, runs)

    behind = {run_id: held["runs"][str(run_id)]["step"] for run_id in order
              if runs[str(run_id)]["step"] != held["runs"][str(run_id)]["step"]}
    moved = any(runs[key][k] != held["runs"][key][k]
                for key in runs for k in ("version", "tags", "status"))
    if not behind and not moved:
        live = _live(runs)
        return None if live == held["live"] else CompareUpdate(dict(held) | {"live": live})

    new_rows: dict[int, list[tuple[Any, ...]]] = {}
    for row in ctx.queries.compare_points_after(behind) if behind else []:
        new_rows.setdefault(row[0], []).append(row[1:])
    for key, run in runs.items():
        rows = new_rows.get(int(key), [])
        was = held["runs"][key]
        # A cut at the query's limit: the next refresh reads on from the last row drawn.
        run["step"] = rows[-1][0] if rows else was["step"]
        run["points"] = was["points"] + len(rows)
        run["summary"], run["history"] = was["summary"], was["history"]
    for run_id, rows in new_rows.items():  # the new rows' figures, merged into those held
        run = runs[str(run_id)]
        run["summary"] = merge_summary(decode(run["summary"]), summarize(rows))
    adopted = [run_id for run_id in order
               if runs[str(run_id)]["version"] != held["runs"][str(run_id)]["version"]]
    if adopted:
        _load_histories(ctx, adopted, runs)
    loss, accuracy = compare_extensions(order, new_rows) if new_rows else (None, None)
    new_state = {"run_ids": order, "live": _live(runs), "runs": runs}
    return CompareUpdate(new_state, loss_extend=loss, accuracy_extend=accuracy,
                         rows=table_rows(order, found, runs))


def _needs_rebuild(runs: Mapping[str, Mapping[str, Any]],
                   held: Mapping[str, Mapping[str, Any]]) -> bool:
    """A rollback cut a compared run, a name changed (legend titles), a trace would grow
    past its point budget, or the first rows arrive (the "nothing logged" note goes)."""
    if all(h["step"] < 0 for h in held.values()) and any(r["step"] >= 0 for r in runs.values()):
        return True
    return any(
        runs[key]["rollbacks"] != h["rollbacks"] or runs[key]["name"] != h["name"]
        or (runs[key]["step"] != h["step"] and h["points"] >= REBUILD_POINTS)
        for key, h in held.items()
    )


def _rebuild(ctx: BoardContext, order: list[int], found: Mapping[int, Mapping[str, Any]],
             runs: dict[str, dict[str, Any]]) -> CompareUpdate:
    points: dict[int, list[tuple[Any, ...]]] = {}
    for row in ctx.queries.compare_points(order) if order else []:
        points.setdefault(row[0], []).append(row[1:])
    for key, run in runs.items():
        rows = points.get(int(key), [])
        # What the page draws (≤ MAX_POINTS after downsampling) and the step it has.
        run["points"] = min(len(rows), MAX_POINTS)
        run["step"] = rows[-1][0] if rows else -1
        run["summary"] = merge_summary(None, summarize(rows))
    if order:
        _load_histories(ctx, order, runs)
    drawn = [found[run_id] for run_id in order]
    loss, accuracy = compare_figures(drawn, points,
                                     uirevision="compare " + ",".join(map(str, order)))
    state = {"run_ids": order, "live": _live(runs), "runs": runs}
    return CompareUpdate(state, True, loss, accuracy,
                         rows=table_rows(order, found, runs))


def _load_histories(ctx: BoardContext, run_ids: list[int],
                    runs: dict[str, dict[str, Any]]) -> None:
    """Each run's parameter history as the table's lines: one query for all of them."""
    changes: dict[int, list[dict[str, Any]]] = {run_id: [] for run_id in run_ids}
    for change in ctx.queries.compare_changes(run_ids):
        changes[change["run_id"]].append(change)
    for run_id, adopted in changes.items():
        runs[str(run_id)]["history"] = change_summaries(adopted)


# -- the table's figures, held by the page between refreshes ------------------------------

SUMMARY_KEYS = ("step", "train_loss", "validate_loss", "validate_accuracy", "best_loss",
                "best_loss_step", "best_accuracy", "best_accuracy_step")
FINAL_KEYS = ("step", "train_loss", "validate_loss", "validate_accuracy")


def merge_summary(held: Mapping[str, Any] | None,
                  new: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of a run's rows so far (`held`) and of its rows after them (`new`):
    the final ones are the newest; a best is replaced only by a strictly better one, so
    it keeps the step where it was first reached."""
    out = {key: (held or {}).get(key) for key in SUMMARY_KEYS}
    if new.get("step") is not None:
        out |= {key: new.get(key) for key in FINAL_KEYS}
    for value, step, better in (("best_loss", "best_loss_step", float.__lt__),
                                ("best_accuracy", "best_accuracy_step", float.__gt__)):
        if new.get(value) is not None and (
                out[value] is None or better(float(new[value]), float(out[value]))):
            out[value], out[step] = new[value], new[step]
    return encode(out)


def encode(figures: Mapping[str, Any]) -> dict[str, Any]:
    """JSON for the page's Store: a NaN or infinite final value as text ("nan", "inf"),
    which strict JSON would turn into null."""
    return {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in figures.items()}


def decode(figures: Mapping[str, Any]) -> dict[str, Any]:
    return {k: float(v) if isinstance(v, str) else v for k, v in figures.items()}


# -- the table ----------------------------------------------------------------------------


def _loss(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.4f}" if math.isfinite(value) else str(value).replace("nan", "NaN")


def _accuracy(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f} %" if math.isfinite(value) else str(value).replace("nan", "NaN")


def _best(text: str, step: int | None) -> list[Any]:
    return [html.Span(text), html.Span(f"step {step:,}" if step is not None else "",
                                       className="at-step")]


def table_rows(order: Sequence[int], found: Mapping[int, Mapping[str, Any]],
               runs: Mapping[str, Mapping[str, Any]]) -> list[html.Tr]:
    """One row per compared run, in the order chosen, from what the state holds."""
    colors = run_colors(order)
    return [compare_row(found[run_id], runs[str(run_id)]["status"],
                        decode(runs[str(run_id)]["summary"]), runs[str(run_id)]["history"],
                        colors[run_id])
            for run_id in order]


def compare_row(run: Mapping[str, Any], status: str, figures: Mapping[str, Any],
                history: Sequence[str], color: int) -> html.Tr:
    """Names, tags and history are text nodes: shown verbatim, never as HTML."""
    step = figures.get("step")
    return html.Tr(
        [
            html.Td(html.Div([html.Span(className=f"run-swatch run-color-{color}"),
                              html.Span(f"#{run['run_id']}", className="run-id-cell"),
                              text_span(run["name"], NAME_SHOWN, className="compare-name")],
                             className="compare-run")),
            html.Td([html.Span(tag, className="tag", title=tag)
                     for tag in shown_tags(run["tags"])]),
            html.Td(html.Span(status, className=f"badge status-{status}")),
            html.Td(run["model_name"]),
            html.Td(run["dataset"]),
            html.Td(f"{step:,}" if step is not None else "—", className="num"),
            html.Td(_loss(figures.get("train_loss")), className="num"),
            html.Td(_loss(figures.get("validate_loss")), className="num"),
            html.Td(_accuracy(figures.get("validate_accuracy")), className="num"),
            html.Td(_best(_loss(figures.get("best_loss")), figures.get("best_loss_step")),
                    className="num best-loss"),
            html.Td(_best(_accuracy(figures.get("best_accuracy")),
                          figures.get("best_accuracy_step")), className="num best-accuracy"),
            html.Td([html.Div(line) for line in history], className="compare-history"),
        ],
        **{"data-run-id": str(run["run_id"])},
    )


def register(app: Dash, ctx: BoardContext) -> None:
    app.clientside_callback(
        TICK_GATE,
        Output("compare-tick", "data"),
        Input("slow-refresh", "n_intervals"),
        State("compare-select", "value"),
        State("compare-state", "data"),
        prevent_initial_call=True,
    )

    @app.callback(
        Output("compare-loss-graph", "figure"),
        Output("compare-accuracy-graph", "figure"),
        Output("compare-loss-graph", "extendData"),
        Output("compare-accuracy-graph", "extendData"),
        Output("compare-table-rows", "children"),
        Output("compare-body", "className"),
        Output("compare-state", "data"),
        Input("compare-select", "value"),
        Input("compare-tick", "data"),
        Input("run-edit", "data"),
        State("compare-state", "data"),
        prevent_initial_call=True,
    )
    def _compare(chosen: Any, _tick: Any, _edit: Any, state: dict | None) -> tuple:
        update = update_comparison(ctx, chosen, state)
        if update is None:
            return (no_update,) * 7
        return (
            or_no_update(update.loss_figure),
            or_no_update(update.accuracy_figure),
            or_no_update(update.loss_extend),
            or_no_update(update.accuracy_extend),
            or_no_update(update.rows),
            BODY_CLASS if update.shown else f"{BODY_CLASS} hidden",
            update.state,
        )
