"""Several runs overlaid: one colour per run, training solid and validation dashed.

Each compared run owns two traces in both graphs, in the order the runs were
chosen: 2·i training, 2·i + 1 validation, grouped in the legend under the run's
name so a click hides or shows the run. A run's colour comes from a fixed
qualitative palette by its run_id, so it keeps its colour whatever else is
compared (two runs whose ids collide take the next free colour). Curves are
downsampled like the single-run view's (min/max per bucket, ≤ MAX_POINTS per
trace); a refresh appends new rows with extendData.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from livetrain.board.display import NAME_SHOWN, shorten
from livetrain.board.downsample import MAX_POINTS, downsample
from livetrain.board.figures import ACCURACY, LOSS, SERIES, CurveGraph, json_floats, plotly_text
from livetrain.board.figures import _base_layout as base_layout
from livetrain.board.figures import _empty_note as empty_note

# Tableau 10: distinct to most eyes, and none of them the single-run view's red/blue pair.
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#edc948", "#76b7b2", "#ff9da7",
           "#9c755f", "#e15759", "#17becf")
COMPARE_HEIGHT = 360
DASHES = {"train": "solid", "validation": "dash"}


def run_colors(run_ids: Iterable[int]) -> dict[int, int]:
    """Palette index per run: run_id modulo the palette, the next free one on a clash
    (assigned in run_id order, so the same set always gets the same colours)."""
    taken: set[int] = set()
    colors: dict[int, int] = {}
    for run_id in sorted(set(run_ids)):
        index = run_id % len(PALETTE)
        for shift in range(len(PALETTE)):
            if (index + shift) % len(PALETTE) not in taken:
                index = (index + shift) % len(PALETTE)
                break
        taken.add(index)
        colors[run_id] = index
    return colors


def run_title(run: Mapping[str, Any]) -> str:
    """'#12 name', as plain text (escape it for Plotly with plotly_text)."""
    return f"#{run['run_id']} {shorten(run['name'], NAME_SHOWN)}"


def _series(rows: Sequence[Sequence[Any]], column: str,
            max_points: int) -> tuple[list[int], list[float | None]]:
    """x and y of one statistics column; rows are (step, *SERIES) oldest first."""
    i = 1 + SERIES.index(column)
    steps = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    values = np.array([math.nan if r[i] is None else r[i] for r in rows], dtype=float)
    x, y = downsample(steps, values, max_points)
    return x.tolist(), json_floats(y)


def _traces(graph: CurveGraph, run: Mapping[str, Any], color: str,
            rows: Sequence[Sequence[Any]], max_points: int) -> list[dict[str, Any]]:
    title = plotly_text(run_title(run))
    traces = []
    for column, kind in ((graph.train, "train"), (graph.validation, "validation")):
        x, y = _series(rows, column, max_points)
        traces.append({
            "type": "scatter", "mode": "lines", "name": kind, "x": x, "y": y,
            "legendgroup": f"run-{run['run_id']}", "legendgrouptitle": {"text": title},
            "line": {"color": color, "width": 2, "dash": DASHES[kind]},
            "hovertemplate": f"{title} {kind} %{{y:{graph.y_format}}}<extra></extra>",
            "meta": run["run_id"],
        })
    return traces


def compare_figures(
    runs: Sequence[Mapping[str, Any]],
    points: Mapping[int, Sequence[Sequence[Any]]],
    uirevision: str = "",
    max_points: int = MAX_POINTS,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Loss and accuracy overlays of `runs` (dicts with run_id and name, in the order
    drawn); `points[run_id]` are (step, train_loss, validate_loss, train_accuracy,
    validate_accuracy) rows, oldest first."""
    colors = run_colors(r["run_id"] for r in runs)
    figures = []
    for graph in (LOSS, ACCURACY):
        layout = base_layout(graph.y_title, COMPARE_HEIGHT, uirevision)
        layout["legend"] = {"orientation": "v", "x": 1.02, "y": 1, "xanchor": "left",
                            "yanchor": "top", "groupclick": "togglegroup",
                            "tracegroupgap": 6, "font": {"size": 12}}
        layout["margin"] = layout["margin"] | {"r": 8}
        if not any(points.get(r["run_id"]) for r in runs):
            layout["annotations"] = [empty_note("No statistics logged yet")]
        data = [trace for run in runs
                for trace in _traces(graph, run, PALETTE[colors[run["run_id"]]],
                                     points.get(run["run_id"], ()), max_points)]
        figures.append({"data": data, "layout": layout})
    return figures[0], figures[1]


def compare_extensions(
    order: Sequence[int], new_rows: Mapping[int, Sequence[Sequence[Any]]]
) -> tuple[list[Any], list[Any]]:
    """extendData for the loss and accuracy overlays: the new rows of the runs that have
    some, onto their two traces each (raw: a refresh brings a few rows per run)."""
    extensions = []
    for graph in (LOSS, ACCURACY):
        xs: list[list[int]] = []
        ys: list[list[float | None]] = []
        indices: list[int] = []
        for position, run_id in enumerate(order):
            rows = new_rows.get(run_id)
            if not rows:
                continue
            for offset, column in enumerate((graph.train, graph.validation)):
                i = 1 + SERIES.index(column)
                xs.append([r[0] for r in rows])
                ys.append(json_floats(r[i] for r in rows))
                indices.append(2 * position + offset)
        extensions.append([{"x": xs, "y": ys}, indices])
    return extensions[0], extensions[1]


# -- the table's numbers ----------------------------------------------------------------


def summarize(rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """The figures of statistics rows (step, train_loss, validate_loss, train_accuracy,
    validate_accuracy), oldest first: the last row's step, train loss, validation loss
    and accuracy, and the best validation loss and accuracy with the step each was first
    reached. NaN, infinite and missing values never count as best (None if none is
    finite); {} without rows."""
    if not rows:
        return {}
    last = rows[-1]
    out: dict[str, Any] = {"step": last[0], "train_loss": last[1], "validate_loss": last[2],
                           "validate_accuracy": last[4]}
    for name, i, pick in (("best_loss", 2, np.argmin), ("best_accuracy", 4, np.argmax)):
        values = np.array([math.nan if r[i] is None else r[i] for r in rows], dtype=float)
        finite = np.flatnonzero(np.isfinite(values))
        best = finite[pick(values[finite])] if len(finite) else None  # the first, on ties
        out[name] = None if best is None else float(values[best])
        out[f"{name}_step"] = None if best is None else rows[best][0]
    return out


CHANGE_NAMES = {"optimizer": "opt", "learning_rate": "lr", "weight_decay": "wd",
                "dropout": "dropout", "grad_clip": "clip"}


def short_number(value: Any) -> str:
    """Learning rates and decays as people write them: 3e-4, 1e-3, 0.05, 0, 50."""
    if not isinstance(value, float):
        return str(value)
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    exponent = math.floor(math.log10(abs(value)))
    if -2 <= exponent < 4:
        return f"{value:.4g}"
    mantissa = float(f"{value / 10 ** exponent:.3g}")
    if abs(mantissa) >= 10:  # rounding carried into the next power of ten
        mantissa, exponent = mantissa / 10, exponent + 1
    return f"{mantissa:g}e{exponent}"


def _value(name: str, value: Any) -> str:
    return f"{value} %" if name == "dropout" else short_number(value)


def change_summaries(changes: Sequence[Mapping[str, Any]]) -> list[str]:
    """One short line per adopted version (oldest first): the values a run started with,
    then what each later version changed, e.g. "step 120: lr 3e-4→1e-3"."""
    lines: list[str] = []
    previous: Mapping[str, Any] | None = None
    for change in changes:
        if previous is None:
            values = ", ".join(
                f"{CHANGE_NAMES[n]} {_value(n, change[n])}" if n != "optimizer"
                else str(change[n]) for n in CHANGE_NAMES
                if n != "grad_clip" or change.get(n))
            head = "start" if change["version"] == 1 else f"step {change['applied_step']:,}"
            lines.append(f"{head}: {values}")
        else:
            lines.append(f"step {change['applied_step']:,}: {_what_changed(change, previous)}")
        previous = change
    return lines


def _what_changed(change: Mapping[str, Any], previous: Mapping[str, Any]) -> str:
    if change.get("stop_train"):
        return "stop"
    parts = [f"{CHANGE_NAMES[n]} {_value(n, previous.get(n))}→{_value(n, change[n])}"
             for n in CHANGE_NAMES if change.get(n) is not None and previous.get(n) != change[n]]
    if change.get("rollback_step") is not None:
        parts.insert(0, f"rolled back to step {change['rollback_step']:,}")
    if bool(change.get("pause_train")) != bool(previous.get("pause_train")):
        parts.insert(0, "paused" if change.get("pause_train") else "resumed")
    return ", ".join(parts) or "no value changed"
