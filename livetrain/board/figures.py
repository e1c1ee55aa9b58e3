"""Plotly figures as plain dicts: the full curves on a run change, extendData on refresh.

Both curve graphs share one trace layout so a refresh can extend them by index:
0 train (raw, faint), 1 train (smoothed), 2 validation (raw, faint),
3 validation (smoothed), 4 applied parameter changes (vertical lines on a
hidden 0..1 axis, hover text says what changed); the loss graph then has the
noise band of each raw loss (5 and 6 train upper and lower, 7 and 8 validation);
then the branches rollbacks cut off (grey, thin, dashed; never extended: a
rollback rebuilds). Every trace carries a `text` array because Plotly's
extendTraces extends the same attributes on every trace it touches.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from dash import Patch

from livetrain.board.downsample import MAX_POINTS, downsample, minmax_indices
from livetrain.board.smoothing import ema

TRAIN_COLOR = "#d62728"  # the seed's red
VALIDATION_COLOR = "#1f77b4"  # the seed's blue
CHANGE_COLOR = "#8a94a6"
ABANDONED_COLORS = {"train": "#9ca3af", "validation": "#c4cad3"}  # greys: not the live path
CONV_COLOR = "#2a9d8f"
FC_COLOR = "#7b61ff"
FONT = "Inter, system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"
MODEBAR = {"bgcolor": "rgba(255,255,255,0.85)", "color": "#94a3b8", "activecolor": "#2563eb"}
CHANGE_LINE_POINTS = 11  # hover anywhere along a change line, not only at its ends
CURVE_TRACES = (0, 1, 2, 3, 4)
BAND_TRACES = (5, 6, 7, 8)  # the loss graph's only
BAND_SE = 2.0  # the band's half-width in standard errors: about a 95 % interval
BAND_OPACITY = 0.15
# A band is light: on a long run's first load it keeps an eighth of its curve's points
# (chosen by the same min/max buckets) at 4 significant digits, which keeps the first
# load of a 50,000-step run within its byte budget (bench/budget.py). Refreshes extend
# it at every logged step, like the curves.
BAND_POINT_SHARE, BAND_DIGITS = 8, 4


@dataclass(frozen=True)
class CurveGraph:
    """One curves graph: which statistics columns it draws and how its y axis reads."""

    train: str
    validation: str
    y_title: str
    y_format: str


LOSS = CurveGraph("train_loss", "validate_loss", "loss", ".4f")
ACCURACY = CurveGraph("train_accuracy", "validate_accuracy", "accuracy (%)", ".2f")
SERIES = ("train_loss", "validate_loss", "train_accuracy", "validate_accuracy")
# curve_points' row: the step, SERIES, then each loss's spread (std, count).
SPREAD = {"train_loss": (5, 6), "validate_loss": (7, 8)}


def plotly_text(value: Any) -> str:
    """Text from the database, shown verbatim: Plotly would render its HTML-like tags."""
    return html.escape(str(value), quote=False)


def json_floats(values: Iterable[float | None]) -> list[float | None]:
    """Floats for JSON: NaN and inf become null, which Plotly draws as a gap."""
    out: list[float | None] = []
    for v in values:
        out.append(float(v) if v is not None and math.isfinite(v) else None)
    return out


def _base_layout(y_title: str, height: int, uirevision: str) -> dict[str, Any]:
    return {
        "height": height,
        "margin": {"l": 56, "r": 16, "t": 36, "b": 40},
        "font": {"family": FONT, "size": 12, "color": "#334155"},
        "paper_bgcolor": "rgba(0,0,0,0)",
        "plot_bgcolor": "#ffffff",
        "hovermode": "x unified",
        "hoverlabel": {"font": {"family": FONT, "size": 12}},
        "legend": {"orientation": "h", "x": 0, "y": 1.02, "yanchor": "bottom",
                   "font": {"size": 12}},
        "xaxis": {"title": {"text": "step"}, "gridcolor": "#eef1f5", "zeroline": False,
                  "showspikes": True, "spikethickness": 1, "spikecolor": "#94a3b8",
                  "spikedash": "dot", "spikemode": "across"},
        "yaxis": {"title": {"text": y_title}, "gridcolor": "#eef1f5", "zeroline": False},
        "yaxis2": {"overlaying": "y", "range": [0, 1], "visible": False, "fixedrange": True},
        "modebar": MODEBAR,
        "uirevision": uirevision,  # zoom survives rebuilds with the same value
    }


HYPERPARAMETERS = ("optimizer", "learning_rate", "weight_decay", "dropout", "grad_clip")


def change_description(change: Mapping[str, Any], previous: Mapping[str, Any] | None) -> str:
    """What an adopted version changed, e.g. "v3 at step 1200: learning_rate 0.0003 → 0.001"."""
    head = f"v{change['version']} at step {change['applied_step']}"
    if change.get("stop_train"):
        return f"{head}: stop requested"
    names = [n for n in HYPERPARAMETERS if change.get(n) is not None]
    if previous is None:
        diffs = [f"{n} {_fmt(change[n])}" for n in names]
    else:
        diffs = [
            f"{n} {_fmt(previous.get(n))} → {_fmt(change[n])}"
            for n in names
            if previous.get(n) != change[n]
        ]
    if change.get("rollback_step") is not None:
        diffs.insert(0, f"rolled back to step {change['rollback_step']}")
    if bool(change.get("pause_train")) != bool(previous and previous.get("pause_train")):
        diffs.insert(0, "paused" if change.get("pause_train") else "resumed")
    return f"{head}: {', '.join(diffs) or 'no value changed'}"


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def change_lines(
    changes: Sequence[Mapping[str, Any]], previous: Mapping[str, Any] | None
) -> tuple[list[int | None], list[float | None], list[str]]:
    """x, y, text of vertical lines for adopted versions (oldest first) after the initial
    one; `previous` is the version adopted before the first, to tell what it changed."""
    xs: list[int | None] = []
    ys: list[float | None] = []
    texts: list[str] = []
    heights = np.linspace(0.0, 1.0, CHANGE_LINE_POINTS).tolist()
    for change in changes:
        label = plotly_text(change_description(change, previous))
        previous = change
        if change["version"] == 1:
            continue
        xs += [change["applied_step"]] * CHANGE_LINE_POINTS + [None]
        ys += [*heights, None]
        texts += [label] * CHANGE_LINE_POINTS + [""]
    return xs, ys, texts


_CURVE_LOOKS = {"train_loss": ("train", TRAIN_COLOR), "validate_loss": ("validation",
                                                                      VALIDATION_COLOR)}


def _curve_traces(
    graph: CurveGraph,
    series: Mapping[str, tuple[tuple[list[int], list[int]], list[float | None],
                                list[float | None]]],
    changes: tuple[list[int | None], list[float | None], list[str]],
) -> list[dict[str, Any]]:
    traces = []
    for column, name, color in (
        (graph.train, "train", TRAIN_COLOR),
        (graph.validation, "validation", VALIDATION_COLOR),
    ):
        x, raw, smooth = series[column]  # x is (raw x, smoothed x): each is downsampled
        common = {"type": "scatter", "mode": "lines", "legendgroup": name, "text": [],
                  "line": {"color": color}}
        traces.append(common | {
            "name": f"{name} (raw)", "x": x[0], "y": raw, "showlegend": False,
            "opacity": 0.25, "line": {"color": color, "width": 1}, "hoverinfo": "skip",
        })
        traces.append(common | {
            "name": name, "x": x[1], "y": smooth, "line": {"color": color, "width": 2},
            "hovertemplate": f"{name} %{{y:{graph.y_format}}}<extra></extra>",
        })
    xs, ys, texts = changes
    traces.append({
        "type": "scatter", "mode": "lines", "name": "parameter change", "x": xs, "y": ys,
        "text": texts, "yaxis": "y2", "hovertemplate": "%{text}<extra></extra>",
        "line": {"color": CHANGE_COLOR, "width": 1.5, "dash": "dash"},
        "showlegend": True,
    })
    return traces


def _column(rows: Sequence[Sequence[Any]], i: int) -> np.ndarray:
    """Column `i` of `rows` as floats, NULL as NaN."""
    return np.array([math.nan if r[i] is None else r[i] for r in rows], dtype=float)


def band_bounds(rows: Sequence[Sequence[Any]], column: str) -> tuple[np.ndarray, np.ndarray]:
    """The upper and lower edge of a raw loss's noise band, mean ± BAND_SE standard errors
    (std / sqrt(count)): how far the logged mean may sit from the true one by chance alone.

    A row without a spread (a single step or batch, an older run) has no band: both edges
    are its mean, pinching the band to the curve there. A gap left in one would not do:
    Plotly's fill between two traces draws a wrong polygon across gaps. A missing loss is
    a gap in both edges, which the band bridges (connectgaps) as the fill needs.
    """
    std_at, count_at = SPREAD[column]
    mean = _column(rows, 1 + SERIES.index(column))
    std, count = _column(rows, std_at), _column(rows, count_at)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = np.where(count >= 1, BAND_SE * std / np.sqrt(count), 0.0)
    half[~np.isfinite(half)] = 0.0
    return mean + half, mean - half


def band_floats(edge: Iterable[float]) -> list[float | None]:
    """A band edge for JSON at BAND_DIGITS significant digits; NaN and inf as null."""
    return [float(f"{v:.{BAND_DIGITS}g}") if math.isfinite(v) else None for v in edge]


def _loss_bands(
    rows: Sequence[Sequence[Any]], steps: np.ndarray, max_points: int
) -> list[dict[str, Any]]:
    """The loss graph's band traces for a whole run, train's then validation's, each on
    the min/max points of its raw curve at a BAND_POINT_SHARE of `max_points`."""
    traces = []
    for column, (name, color) in _CURVE_LOOKS.items():
        upper, lower = band_bounds(rows, column)
        keep = minmax_indices(_column(rows, 1 + SERIES.index(column)),
                              max(max_points // BAND_POINT_SHARE, 8))
        traces += band_traces(name, color, steps[keep].tolist(), band_floats(upper[keep]),
                              band_floats(lower[keep]))
    return traces


def _rgba(color: str, alpha: float) -> str:
    red, green, blue = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({red},{green},{blue},{alpha})"


def band_traces(
    name: str, color: str, x: list[int], upper: list[float | None], lower: list[float | None]
) -> list[dict[str, Any]]:
    """A loss's noise band as two traces, its upper then its lower edge, the lower filled
    up to the upper (tonexty): edges without width, no hover, out of the legend but in its
    curve's group, so hiding the curve hides its band. The uids name them for scripts."""
    common = {"type": "scatter", "mode": "lines", "name": f"{name} ±{BAND_SE:g} s.e.",
              "legendgroup": name, "showlegend": False, "hoverinfo": "skip", "x": x,
              "text": [], "connectgaps": True, "line": {"color": color, "width": 0}}
    return [
        common | {"uid": f"{name}-loss-band-upper", "y": upper},
        common | {"uid": f"{name}-loss-band-lower", "y": lower, "fill": "tonexty",
                  "fillcolor": _rgba(color, BAND_OPACITY)},
    ]


def abandoned_traces(
    graph: CurveGraph, abandoned: Sequence[Sequence[Any]], max_points: int = MAX_POINTS
) -> list[dict[str, Any]]:
    """One grey dashed trace per cut-off branch and series, raw values: what the run did
    before a rollback, kept visible but apart from the path training continued on.

    `abandoned` rows are (branch, step, train_loss, validate_loss, train_accuracy,
    validate_accuracy), by branch then step.
    """
    traces: list[dict[str, Any]] = []
    branches: dict[int, list[Sequence[Any]]] = {}
    for row in abandoned:
        branches.setdefault(row[0], []).append(row)
    for branch, rows in branches.items():
        steps = np.array([r[1] for r in rows], dtype=np.int64)
        for column, name in ((graph.train, "train"), (graph.validation, "validation")):
            i = 2 + SERIES.index(column)
            x, y = downsample(steps, np.array([math.nan if r[i] is None else r[i]
                                               for r in rows], dtype=float), max_points)
            traces.append({
                "type": "scatter", "mode": "lines", "name": "abandoned branch",
                "legendgroup": "abandoned", "showlegend": not traces,
                "x": x.tolist(), "y": json_floats(y), "text": [],
                "line": {"color": ABANDONED_COLORS[name], "width": 1, "dash": "dash"},
                "hovertemplate": f"abandoned branch {branch}, {name} "
                                 f"%{{y:{graph.y_format}}}<extra></extra>",
            })
    return traces


def curve_figures(
    rows: Sequence[Sequence[Any]],
    weight: float,
    changes: Sequence[Mapping[str, Any]],
    log_y: bool,
    uirevision: str = "",
    max_points: int = MAX_POINTS,
    abandoned: Sequence[Sequence[Any]] = (),
) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[float]]]:
    """Loss and accuracy figures for a whole run, and the smoothing state to extend from.

    `rows` are BoardQueries.curve_points' (step, the four SERIES, then each loss's std and
    count), oldest first; `changes` the adopted parameter versions, oldest first;
    `abandoned` the branches rollbacks cut off (see abandoned_traces). Raw and smoothed
    curves are each downsampled to at most `max_points` points, noise bands to fewer.
    """
    steps = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    series: dict[str, Any] = {}
    state: dict[str, list[float]] = {}
    for i, column in enumerate(SERIES, start=1):
        raw = _column(rows, i)
        smooth, (last, count) = ema(raw.tolist(), weight)
        state[column] = [last, count]
        raw_x, raw_y = downsample(steps, raw, max_points)
        smooth_x, smooth_y = downsample(steps, np.array(smooth, dtype=float), max_points)
        series[column] = (
            (raw_x.tolist(), smooth_x.tolist()), json_floats(raw_y), json_floats(smooth_y)
        )
    lines = change_lines(changes, None)
    figures = []
    for graph in (LOSS, ACCURACY):
        layout = _base_layout(graph.y_title, 330, uirevision)
        if graph is LOSS and log_y:
            layout["yaxis"]["type"] = "log"
        if not rows:
            layout["annotations"] = [_empty_note("No statistics logged yet")]
        bands = _loss_bands(rows, steps, max_points) if graph is LOSS else []
        data = _curve_traces(graph, series, lines) + bands \
            + abandoned_traces(graph, abandoned, max_points)
        figures.append({"data": data, "layout": layout})
    return figures[0], figures[1], state


def _empty_note(text: str) -> dict[str, Any]:
    return {"text": text, "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5,
            "showarrow": False, "font": {"size": 14, "color": "#94a3b8"}}


def curve_extensions(
    rows: Sequence[Sequence[Any]],
    weight: float,
    state: Mapping[str, Sequence[float]],
    changes: tuple[list[int | None], list[float | None], list[str]],
) -> tuple[list[Any], list[Any], dict[str, list[float]]]:
    """extendData for the loss and accuracy graphs, and the new smoothing state."""
    steps = [r[0] for r in rows]
    ys: dict[str, tuple[list[float | None], list[float | None]]] = {}
    new_state: dict[str, list[float]] = {}
    for i, column in enumerate(SERIES, start=1):
        raw = [r[i] for r in rows]
        last, count = state[column]
        smooth, (last, count) = ema(raw, weight, (last, int(count)))
        new_state[column] = [last, count]
        ys[column] = (json_floats(raw), json_floats(smooth))
    xs, cys, texts = changes
    extensions = []
    for graph in (LOSS, ACCURACY):
        train, validation = ys[graph.train], ys[graph.validation]
        update = {
            "x": [steps, steps, steps, steps, xs],
            "y": [train[0], train[1], validation[0], validation[1], cys],
            "text": [[], [], [], [], texts],
        }
        traces = list(CURVE_TRACES)
        if graph is LOSS:
            for column in SPREAD:  # train then validation, as BAND_TRACES
                update["x"] += [steps, steps]
                update["y"] += [band_floats(edge) for edge in band_bounds(rows, column)]
                update["text"] += [[], []]
            traces += BAND_TRACES
        extensions.append([update, traces])
    return extensions[0], extensions[1], new_state


def activations_figure(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Small multiples: one histogram per layer, four to a row, for any number of layers."""
    if not rows:
        return {"data": [], "layout": {
            "height": 160, "margin": {"l": 10, "r": 10, "t": 10, "b": 10},
            "xaxis": {"visible": False}, "yaxis": {"visible": False},
            "paper_bgcolor": "rgba(0,0,0,0)", "plot_bgcolor": "rgba(0,0,0,0)",
            "annotations": [_empty_note("No activations logged yet")],
        }}
    cols = min(4, len(rows))
    nrows = math.ceil(len(rows) / cols)
    row_px, gap_px, top_px = 140, 78, 48
    height = top_px + nrows * row_px + (nrows - 1) * gap_px + 30
    h_gap = 0.045
    width = (1 - h_gap * (cols - 1)) / cols
    data: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    layout: dict[str, Any] = {
        "height": height,
        "margin": {"l": 36, "r": 12, "t": top_px, "b": 30},
        "font": {"family": FONT, "size": 11, "color": "#334155"},
        "paper_bgcolor": "rgba(0,0,0,0)",
        "plot_bgcolor": "#ffffff",
        "showlegend": False,
        "bargap": 0.04,
        "hoverlabel": {"font": {"family": FONT, "size": 12}},
    }
    plot_height = height - top_px - 30
    for i, row in enumerate(rows):
        r, c = divmod(i, cols)
        n = i + 1
        suffix = "" if n == 1 else str(n)
        x0 = c * (width + h_gap)
        top = 1 - (r * (row_px + gap_px)) / plot_height
        bottom = top - row_px / plot_height
        color = CONV_COLOR if row["layer_type"] == "conv" else FC_COLOR
        name = plotly_text(row["layer_name"])
        data.append({
            "type": "bar", **{k: v for k, v in histogram_bars(row).items() if v is not None},
            "marker": {"color": color, "line": {"width": 0}},
            "xaxis": f"x{suffix}", "yaxis": f"y{suffix}", "name": name,
            "hovertemplate": f"{name}<br>%{{x:.3g}}: %{{y}} values<extra></extra>",
        })
        layout[f"xaxis{suffix}"] = {"domain": [x0, x0 + width], "anchor": f"y{suffix}",
                                    "showgrid": False, "zeroline": False,
                                    "tickfont": {"size": 10}, "nticks": 5}
        layout[f"yaxis{suffix}"] = {"domain": [max(bottom, 0), top], "anchor": f"x{suffix}",
                                    "gridcolor": "#eef1f5", "showticklabels": False,
                                    "zeroline": False}
        annotations.append({
            "text": _activation_title(row),
            "xref": "paper", "yref": "paper", "x": x0, "y": top, "xanchor": "left",
            "yanchor": "bottom", "showarrow": False, "font": {"size": 11}, "align": "left",
        })
    layout["annotations"] = annotations
    return {"data": data, "layout": layout}


def histogram_bars(row: Mapping[str, Any]) -> dict[str, Any]:
    """A histogram's bars: evenly spaced bins (what the trainer logs) as three numbers
    and the counts, so a refresh sends little more than the counts."""
    edges = np.asarray(row["bin_edges"], dtype=float)
    widths = np.diff(edges)
    counts = [int(c) for c in row["counts"]]
    if len(widths) and np.allclose(widths, widths[0], rtol=1e-6, atol=0):
        step = float(f"{widths[0]:.6g}")
        return {"x": None, "x0": float(f"{edges[0] + widths[0] / 2:.6g}"), "dx": step,
                "width": step, "y": counts}
    return {"x": ((edges[:-1] + edges[1:]) / 2).tolist(), "width": widths.tolist(),
            "y": counts}


def activations_patch(rows: Sequence[Mapping[str, Any]]) -> Patch:
    """The same layers at a newer step: only each histogram's bars and title change."""
    patch = Patch()
    for i, row in enumerate(rows):
        patch["data"][i].update(histogram_bars(row))
        patch["layout"]["annotations"][i]["text"] = _activation_title(row)
    return patch


def _activation_title(row: Mapping[str, Any]) -> str:
    stats = ""
    if row.get("mean") is not None and row.get("std") is not None:
        stats = f"<br><span style='color:#64748b'>mean {row['mean']:.3g} · " \
                f"std {row['std']:.3g}</span>"
    return (f"<b>{plotly_text(row['layer_name'])}</b> "
            f"<span style='color:#64748b'>{row['layer_type']}</span>{stats}")
