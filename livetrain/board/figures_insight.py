"""Layer insight figures as plain dicts: built once per run or layer choice, then extended.

Each per-layer chart has one trace per chosen layer, in the picker's order (the
mean ± 2 std chart three: lower edge, upper edge filled to it, mean), so a refresh
extends trace i with the new steps of layer i. Guides follow the seeds: updates
about 10^-3 of the weights (10^-4 … 10^-2 healthy), activation std 0.5 … 2.0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from livetrain.board.figures import FONT, MODEBAR, json_floats, plotly_text

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04",
           "#db2777", "#475569", "#65a30d")
BAND_FILL = "rgba(34, 197, 94, 0.10)"
GUIDE_COLOR = "#16a34a"
LR_COLOR = "#0f766e"
WEIGHT_COLOR = "#2a9d8f"
UPDATE_COLOR = "#e76f51"
GRAPH_HEIGHT = 260
LEGEND_HEIGHT = 300  # per-layer charts: the legend names the colours above the plot
GIB = 1024**3
SIGMA, MINUS = "\u03c3", "\u2212"  # typographic labels (ruff flags them as literals)

Row = Mapping[str, Any]


def _log10(value: float | None) -> float | None:
    return math.log10(value) if value is not None and value > 0 else None


@dataclass(frozen=True)
class LayerChart:
    """One per-layer chart: its graph id, the value it draws and its guides."""

    graph_id: str
    y_title: str
    value: Callable[[Row], float | None]
    y_format: str
    band: tuple[float, float] | None = None
    guide: float | None = None
    log_y: bool = False


UPDATE_RATIO = LayerChart("update-ratio-graph", "log10(update : parameter)",
                          lambda r: _log10(r["update_ratio"]), ".2f", (-4.0, -2.0), -3.0)
ACT_STD = LayerChart("act-std-graph", "activation std", lambda r: r["act_std"], ".3g",
                     (0.5, 2.0), log_y=True)
GRAD_NORM = LayerChart("grad-norm-graph", "gradient L2 norm", lambda r: r["grad_norm"], ".3g",
                       log_y=True)
LINE_CHARTS = (UPDATE_RATIO, ACT_STD, GRAD_NORM)
ACT_MEAN_GRAPH = "act-mean-graph"
LR_GRAPH = "lr-graph"


def layer_color(layer: str, all_layers: Sequence[str]) -> str:
    """A layer keeps its colour whichever layers are picked."""
    index = all_layers.index(layer) if layer in all_layers else len(all_layers)
    return PALETTE[index % len(PALETTE)]


def _rgba(color: str, alpha: float) -> str:
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r}, {g}, {b}, {alpha})"


def base_layout(y_title: str, uirevision: str, height: int = GRAPH_HEIGHT) -> dict[str, Any]:
    return {
        "height": height,
        "margin": {"l": 56, "r": 12, "t": 10, "b": 36},
        "font": {"family": FONT, "size": 11, "color": "#334155"},
        "paper_bgcolor": "rgba(0,0,0,0)",
        "plot_bgcolor": "#ffffff",
        "hovermode": "x unified",
        "hoverlabel": {"font": {"family": FONT, "size": 11}},
        "showlegend": False,
        "legend": {"orientation": "h", "x": 0, "y": 1.0, "yanchor": "bottom",
                   "font": {"size": 10}, "itemwidth": 30, "traceorder": "normal"},
        "xaxis": {"title": {"text": "step"}, "gridcolor": "#eef1f5", "zeroline": False},
        "yaxis": {"title": {"text": y_title}, "gridcolor": "#eef1f5", "zeroline": False},
        "modebar": MODEBAR,
        "uirevision": uirevision,
    }


def _empty(layout: dict[str, Any], text: str) -> dict[str, Any]:
    layout["annotations"] = [{"text": text, "xref": "paper", "yref": "paper", "x": 0.5,
                              "y": 0.5, "showarrow": False,
                              "font": {"size": 13, "color": "#94a3b8"}}]
    return layout


def by_layer(rows: Sequence[Row], layers: Sequence[str],
             value: Callable[[Row], float | None]) -> tuple[list[list[int]], list[list[Any]]]:
    """x and y per layer, in `layers` order; rows of other layers are ignored."""
    index = {name: i for i, name in enumerate(layers)}
    xs: list[list[int]] = [[] for _ in layers]
    ys: list[list[float | None]] = [[] for _ in layers]
    for row in rows:
        i = index.get(row["layer_name"])
        if i is not None:
            xs[i].append(row["step"])
            ys[i].append(value(row))
    return xs, [json_floats(y) for y in ys]


def _guides(chart: LayerChart) -> list[dict[str, Any]]:
    shapes: list[dict[str, Any]] = []
    if chart.band is not None:
        shapes.append({"type": "rect", "xref": "paper", "x0": 0, "x1": 1, "yref": "y",
                       "y0": chart.band[0], "y1": chart.band[1], "fillcolor": BAND_FILL,
                       "line": {"width": 0}, "layer": "below"})
    if chart.guide is not None:
        shapes.append({"type": "line", "xref": "paper", "x0": 0, "x1": 1, "yref": "y",
                       "y0": chart.guide, "y1": chart.guide,
                       "line": {"color": GUIDE_COLOR, "width": 1.5, "dash": "dash"}})
    return shapes


def line_chart(chart: LayerChart, rows: Sequence[Row], layers: Sequence[str],
               colors: Mapping[str, str], uirevision: str) -> dict[str, Any]:
    xs, ys = by_layer(rows, layers, chart.value)
    data = [{
        "type": "scatter", "mode": "lines", "name": plotly_text(name), "x": x, "y": y,
        "line": {"color": colors[name], "width": 1.6},
        "hovertemplate": f"{plotly_text(name)} %{{y:{chart.y_format}}}<extra></extra>",
    } for name, x, y in zip(layers, xs, ys, strict=True)]
    layout = base_layout(chart.y_title, uirevision, LEGEND_HEIGHT)
    layout["shapes"] = _guides(chart)
    layout["showlegend"] = True
    layout["margin"]["t"] = 40
    if chart.log_y:
        layout["yaxis"] |= {"type": "log", "exponentformat": "power"}
    if not rows:
        _empty(layout, "No layer statistics logged yet")
    return {"data": data, "layout": layout}


def line_extension(chart: LayerChart, rows: Sequence[Row],
                   layers: Sequence[str]) -> dict[str, Any]:
    xs, ys = by_layer(rows, layers, chart.value)
    return {"x": xs, "y": ys}


def _mean_band(rows: Sequence[Row], layers: Sequence[str]) -> tuple[list[list], list[list]]:
    """x and y for (lower, upper, mean) per layer: the mean ± 2 std chart's traces."""
    def value(sign: float) -> Callable[[Row], float | None]:
        def at(r: Row) -> float | None:
            if r["act_mean"] is None or r["act_std"] is None:
                return None
            return r["act_mean"] + sign * 2 * r["act_std"]
        return at

    xs: list[list] = []
    ys: list[list] = []
    parts = [by_layer(rows, layers, value(sign)) for sign in (-1.0, 1.0)]
    parts.append(by_layer(rows, layers, lambda r: r["act_mean"]))
    for i in range(len(layers)):
        for part_x, part_y in parts:
            xs.append(part_x[i])
            ys.append(part_y[i])
    return xs, ys


def mean_chart(rows: Sequence[Row], layers: Sequence[str], colors: Mapping[str, str],
               uirevision: str) -> dict[str, Any]:
    xs, ys = _mean_band(rows, layers)
    data: list[dict[str, Any]] = []
    for i, name in enumerate(layers):
        color, label = colors[name], plotly_text(name)
        edge = {"type": "scatter", "mode": "lines", "line": {"width": 0, "color": color},
                "hoverinfo": "skip"}
        edge["showlegend"] = False
        data.append(edge | {"name": f"{label} {MINUS}2{SIGMA}", "x": xs[3 * i], "y": ys[3 * i]})
        data.append(edge | {"name": f"{label} +2{SIGMA}", "x": xs[3 * i + 1], "y": ys[3 * i + 1],
                            "fill": "tonexty", "fillcolor": _rgba(color, 0.12)})
        data.append({"type": "scatter", "mode": "lines", "name": label, "x": xs[3 * i + 2],
                     "y": ys[3 * i + 2], "line": {"color": color, "width": 1.6},
                     "hovertemplate": f"{label} mean %{{y:.3g}}<extra></extra>"})
    layout = base_layout(f"activation mean ± 2{SIGMA}", uirevision, LEGEND_HEIGHT)
    layout["showlegend"] = True
    layout["margin"]["t"] = 40
    if not rows:
        _empty(layout, "No layer statistics logged yet")
    return {"data": data, "layout": layout}


def mean_extension(rows: Sequence[Row], layers: Sequence[str]) -> dict[str, Any]:
    xs, ys = _mean_band(rows, layers)
    return {"x": xs, "y": ys}


def lr_chart(points: Sequence[tuple[int, float]], uirevision: str) -> dict[str, Any]:
    layout = base_layout("learning rate", uirevision)
    layout["yaxis"] |= {"type": "log", "exponentformat": "power", "dtick": 1}
    if not points:
        _empty(layout, "No steps logged yet")
    return {"data": [{
        "type": "scatter", "mode": "lines", "name": "learning rate",
        "x": [p[0] for p in points], "y": json_floats(p[1] for p in points),
        "line": {"color": LR_COLOR, "width": 2, "shape": "hv"},
        "hovertemplate": "lr %{y:.3g}<extra></extra>",
    }], "layout": layout}


def histograms_figure(layer: str | None,
                      rows: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Weights (left) and the last update (right) of one layer, side by side."""
    layout = base_layout("count", f"hist {layer}")
    layout["hovermode"] = "closest"
    layout["xaxis"] = {"domain": [0, 0.47], "title": {"text": "weight"}, "zeroline": False,
                       "showgrid": False, "nticks": 6}
    layout["xaxis2"] = {"domain": [0.53, 1], "title": {"text": "update (Δw)"},
                        "zeroline": False, "showgrid": False, "nticks": 6,
                        "exponentformat": "e", "anchor": "y2"}
    layout["yaxis2"] = {"anchor": "x2", "gridcolor": "#eef1f5", "zeroline": False}
    layout["bargap"] = 0.02
    data: list[dict[str, Any]] = []
    for kind, axis, color in (("weight", "", WEIGHT_COLOR), ("update", "2", UPDATE_COLOR)):
        row = rows.get(kind)
        if row is None:
            continue
        edges = np.asarray(row["bin_edges"], dtype=float)
        data.append({
            "type": "bar", "name": kind, "x": ((edges[:-1] + edges[1:]) / 2).tolist(),
            "y": list(row["counts"]), "width": np.diff(edges).tolist(),
            "xaxis": f"x{axis}", "yaxis": f"y{axis}",
            "marker": {"color": color, "line": {"width": 0}},
            "hovertemplate": f"{kind} %{{x:.3g}}: %{{y}}<extra></extra>",
        })
    if not data:
        _empty(layout, "No weight histograms logged yet" if layer else "No layer chosen")
    return {"data": data, "layout": layout}


SYSTEM_PANELS = (  # (column, subplot title, scale)
    ("cpu_percent", "CPU % (of one core)", 1.0),
    ("rss_bytes", "RSS (GiB)", 1 / GIB),
    ("gpu_utilization", "GPU %", 1.0),
    ("samples_per_second", "samples / s", 1.0),
)


def _when(value: datetime | str) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def system_extension(rows: Sequence[Row]) -> dict[str, Any]:
    x = [_when(r["dt"]) for r in rows]
    return {
        "x": [x for _ in SYSTEM_PANELS],
        "y": [json_floats(None if r[c] is None else r[c] * scale for r in rows)
              for c, _, scale in SYSTEM_PANELS],
    }


def system_figure(rows: Sequence[Row], on_gpu: bool, uirevision: str) -> dict[str, Any]:
    """Four small panels over wall-clock time: CPU, memory, GPU, throughput."""
    ext = system_extension(rows)
    layout = base_layout("", uirevision, height=340)
    layout["margin"] = {"l": 48, "r": 12, "t": 26, "b": 28}
    layout["hovermode"] = "x"
    annotations = []
    data = []
    for i, (column, title, _) in enumerate(SYSTEM_PANELS):
        n = "" if i == 0 else str(i + 1)
        col, row = i % 2, i // 2
        x0 = col * 0.54
        top = 1 - row * 0.56
        layout[f"xaxis{n}"] = {"domain": [x0, x0 + 0.46], "anchor": f"y{n}", "type": "date",
                               "showgrid": False, "tickfont": {"size": 10}, "nticks": 4,
                               "tickformat": "%H:%M:%S"}
        layout[f"yaxis{n}"] = {"domain": [top - 0.36, top - 0.02], "anchor": f"x{n}",
                               "gridcolor": "#eef1f5", "zeroline": False,
                               "tickfont": {"size": 10}, "rangemode": "tozero"}
        label = title if column != "gpu_utilization" or on_gpu else f"{title}: no GPU"
        annotations.append({"text": f"<b>{label}</b>", "xref": "paper", "yref": "paper",
                            "x": x0, "y": top, "yanchor": "bottom", "xanchor": "left",
                            "showarrow": False, "font": {"size": 11, "color": "#475569"}})
        data.append({"type": "scatter", "mode": "lines", "name": title, "x": ext["x"][i],
                     "y": ext["y"][i], "xaxis": f"x{n}", "yaxis": f"y{n}",
                     "line": {"color": PALETTE[i], "width": 1.6},
                     "hovertemplate": f"{title} %{{y:.3g}}<extra></extra>"})
    layout["annotations"] = annotations
    return {"data": data, "layout": layout}
