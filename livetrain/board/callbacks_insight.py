"""Layer insight: per-layer charts, weight/update histograms, lr, model table, system panel.

Like the loss curves, each chart is built whole for a run and layer choice (from
a bounded tail of the run: the newest WINDOW_STEPS logged steps) and then
extended a refresh at a time with `step > last_step` only; extendData's
maxPoints keeps the browser's copy inside the same window. A rollback (the
run's layer rows after the restored step are deleted) rebuilds. Histograms and
system samples change at most every few seconds: they follow the slower
`slow-refresh` interval, so each refresh tick sends fewer requests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dash import Dash, Input, Output, State, html, no_update

from livetrain.board.context import BoardContext, or_no_update
from livetrain.board.figures_insight import (
    ACT_MEAN_GRAPH,
    LINE_CHARTS,
    LR_GRAPH,
    histograms_figure,
    layer_color,
    line_chart,
    line_extension,
    lr_chart,
    mean_chart,
    mean_extension,
    system_extension,
    system_figure,
)
from livetrain.db.board_queries import REFRESH_ROWS

WINDOW_STEPS = 500  # logged steps a layer chart holds
SYSTEM_WINDOW = 720  # samples the system panel holds: an hour at one per 5 s
DEFAULT_LAYERS = 8  # picked by default; more makes the charts hard to read
LAYER_GRAPHS = (*(c.graph_id for c in LINE_CHARTS), ACT_MEAN_GRAPH, LR_GRAPH)


# -- layer picker and model table ------------------------------------------------------


@dataclass(frozen=True)
class LayerChoices:
    options: list[dict[str, str]]
    picked: list[str]
    histogram_layer: str | None
    table: list[Any]
    state: dict[str, Any]


def _count(value: int) -> str:
    return f"{value:,}"


def model_table_rows(rows: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Table rows in forward order; monitored layers (the charts' layers) stand out."""
    body = [
        html.Tr(
            [
                html.Td(r["layer_name"], className="mono"),
                html.Td(r["layer_type"]),
                html.Td(r["output_shape"], className="num"),
                html.Td(_count(r["parameters"]), className="num"),
                html.Td(_count(r["trainable"]), className="num"),
            ],
            className="monitored" if r["monitored"] else None,
        )
        for r in rows
    ]
    if rows:
        body.append(html.Tr(
            [html.Td("total", colSpan=3), html.Td(_count(sum(r["parameters"] for r in rows)),
                                                  className="num"),
             html.Td(_count(sum(r["trainable"] for r in rows)), className="num")],
            className="total-row",
        ))
    return body


def layer_choices(
    ctx: BoardContext, run_id: int | None, state: Mapping[str, Any] | None
) -> LayerChoices | None:
    """The run's conv/fc layers for the pickers (the first DEFAULT_LAYERS picked) and
    its model table; None while the page already shows them."""
    names = ctx.queries.monitored_layers(run_id) if run_id is not None else []
    new_state = {"run_id": run_id, "layers": names}
    if state == new_state:
        return None
    table = model_table_rows(ctx.queries.model_table(run_id)) if run_id is not None else []
    return LayerChoices(
        options=[{"label": n, "value": n} for n in names],
        picked=names[:DEFAULT_LAYERS],
        histogram_layer=names[0] if names else None,
        table=table,
        state=new_state,
    )


# -- per-layer charts and the learning rate -------------------------------------------


@dataclass(frozen=True)
class LayerChartsUpdate:
    """Whole figures (a rebuild) or extendData per graph id (a refresh), and the state."""

    state: dict[str, Any]
    figures: dict[str, dict[str, Any]] | None = None
    extensions: dict[str, list[Any]] | None = None


def _whole_steps(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """Rows cut at `limit` may end inside a step; leave that step for the next refresh."""
    if len(rows) < limit or not rows:
        return rows
    last = rows[-1]["step"]
    whole = [r for r in rows if r["step"] != last]
    return whole or rows


def update_layer_charts(
    ctx: BoardContext, run_id: int | None, layers: Sequence[str] | None,
    state: Mapping[str, Any] | None,
) -> LayerChartsUpdate | None:
    """A rebuild for another run, layer choice or a rollback, else the new steps only;
    None when nothing new was logged."""
    layers = list(layers or [])
    built_for = {"run_id": run_id, "layers": layers}
    if not state or any(state.get(k) != v for k, v in built_for.items()):
        return _rebuild(ctx, run_id, layers, built_for)
    if run_id is None:
        return None
    if ctx.queries.rollbacks(run_id) != state["rollbacks"]:
        return _rebuild(ctx, run_id, layers, built_for)
    limit = REFRESH_ROWS
    rows = _whole_steps(ctx.queries.layer_points(run_id, layers, state["last_step"], limit),
                        limit) if layers else []
    rates = ctx.queries.learning_rates(run_id, state["lr_step"], REFRESH_ROWS)
    if not rows and not rates:
        return None
    if (state["last_step"] < 0 and rows) or (state["lr_step"] < 0 and rates):
        return _rebuild(ctx, run_id, layers, built_for)  # replace the "nothing yet" notes
    extensions: dict[str, list[Any]] = {}
    if rows:
        for chart in LINE_CHARTS:
            ext = line_extension(chart, rows, layers)
            extensions[chart.graph_id] = [ext, list(range(len(layers))), WINDOW_STEPS]
        extensions[ACT_MEAN_GRAPH] = [mean_extension(rows, layers),
                                      list(range(3 * len(layers))), WINDOW_STEPS]
    if rates:
        extensions[LR_GRAPH] = [{"x": [[r[0] for r in rates]], "y": [[r[1] for r in rates]]},
                                [0], WINDOW_STEPS]
    new_state = dict(state) | {
        "last_step": rows[-1]["step"] if rows else state["last_step"],
        "lr_step": rates[-1][0] if rates else state["lr_step"],
    }
    return LayerChartsUpdate(new_state, extensions=extensions)


def _rebuild(
    ctx: BoardContext, run_id: int | None, layers: list[str], built_for: dict[str, Any]
) -> LayerChartsUpdate:
    rows: list[dict[str, Any]] = []
    rates: list[tuple[int, float]] = []
    rollbacks, all_layers = 0, layers
    if run_id is not None:
        rollbacks = ctx.queries.rollbacks(run_id)
        all_layers = ctx.queries.monitored_layers(run_id)
        start = ctx.queries.step_window_start(run_id, WINDOW_STEPS)
        if layers:
            limit = (WINDOW_STEPS + 1) * len(layers)  # room for a step logged meanwhile
            rows = _whole_steps(ctx.queries.layer_points(run_id, layers, start, limit), limit)
        rates = ctx.queries.learning_rates(run_id, start, WINDOW_STEPS)
    colors = {name: layer_color(name, all_layers) for name in layers}
    revision = f"layers {run_id}"
    figures = {chart.graph_id: line_chart(chart, rows, layers, colors, revision)
               for chart in LINE_CHARTS}
    figures[ACT_MEAN_GRAPH] = mean_chart(rows, layers, colors, revision)
    figures[LR_GRAPH] = lr_chart(rates, revision)
    state = built_for | {
        "rollbacks": rollbacks,
        "last_step": rows[-1]["step"] if rows else -1,
        "lr_step": rates[-1][0] if rates else -1,
    }
    return LayerChartsUpdate(state, figures=figures)


# -- histograms of one layer -----------------------------------------------------------


@dataclass(frozen=True)
class HistogramsUpdate:
    figure: dict[str, Any]
    label: str
    state: dict[str, Any]


def update_histograms(
    ctx: BoardContext, run_id: int | None, layer: str | None, state: Mapping[str, Any] | None
) -> HistogramsUpdate | None:
    """The chosen layer's weight and update histograms at its newest logged step; None
    while the page shows that step already."""
    step = None
    if run_id is not None and layer:
        step = ctx.queries.latest_histogram_step(run_id, layer)
    new_state = {"run_id": run_id, "layer": layer, "step": step}
    if state == new_state:
        return None
    rows = ctx.queries.layer_histograms_at(run_id, layer, step) if step is not None else {}
    label = f"step {step:,}" if step is not None else ""
    return HistogramsUpdate(histograms_figure(layer, rows), label, new_state)


# -- system panel ------------------------------------------------------------------------


@dataclass(frozen=True)
class SystemUpdate:
    state: dict[str, Any]
    figure: dict[str, Any] | None = None
    extension: list[Any] | None = None
    info: list[Any] | None = None


SYSTEM_INFO = (("host", "Host"), ("device", "Device"), ("torch", "torch"), ("cuda", "CUDA"),
               ("python", "Python"), ("parameters_count", "Parameters"))


def system_info(config: Mapping[str, Any]) -> list[Any]:
    """Where the run trains, from runs.config; CUDA is the torch build's version."""
    items = []
    for key, label in SYSTEM_INFO:
        value = config.get(key)
        text = "—" if value is None else (_count(value) if isinstance(value, int) else str(value))
        items.append(html.Div([html.Dt(label), html.Dd(text)], className="info-item"))
    return items


def update_system(
    ctx: BoardContext, run_id: int | None, state: Mapping[str, Any] | None
) -> SystemUpdate | None:
    """The newest SYSTEM_WINDOW samples for a newly shown run, then newer samples only."""
    if not state or state.get("run_id") != run_id or (
        run_id is not None and state["last_sample"] == 0
    ):
        rows: list[dict[str, Any]] = []
        config: Mapping[str, Any] = {}
        if run_id is not None:
            run = ctx.queries.run(run_id)
            config = (run or {}).get("config") or {}
            start = ctx.queries.last_system_sample(run_id, SYSTEM_WINDOW)
            rows = ctx.queries.system_points(run_id, start, SYSTEM_WINDOW)
        if state and state.get("run_id") == run_id and not rows:
            return None  # still nothing sampled
        on_gpu = str(config.get("device", "")).startswith("cuda")
        new_state = {"run_id": run_id,
                     "last_sample": rows[-1]["sample_id"] if rows else 0}
        return SystemUpdate(new_state, figure=system_figure(rows, on_gpu, f"system {run_id}"),
                            info=system_info(config))
    if run_id is None:
        return None
    rows = ctx.queries.system_points(run_id, state["last_sample"], REFRESH_ROWS)
    if not rows:
        return None
    extension = [system_extension(rows), [0, 1, 2, 3], SYSTEM_WINDOW]
    return SystemUpdate({"run_id": run_id, "last_sample": rows[-1]["sample_id"]},
                        extension=extension)


def register(app: Dash, ctx: BoardContext) -> None:
    @app.callback(
        Output("layer-picker", "options"),
        Output("layer-picker", "value"),
        Output("histogram-layer", "options"),
        Output("histogram-layer", "value"),
        Output("model-table-rows", "children"),
        Output("layers-state", "data"),
        Output("layers-poll", "disabled"),
        Input("layers-poll", "n_intervals"),
        Input("run-select", "value"),
        State("layers-state", "data"),
    )
    def _choices(_n: int | None, run_id: int | None, state: dict | None) -> tuple:
        # Not on the page's refresh: charts that wait for this callback's outputs on every
        # tick would land a tick late, and on a busy machine never. It polls on its own
        # interval only until the run's model table is there.
        choice = layer_choices(ctx, run_id, state)
        if choice is None:
            return (no_update,) * 7
        return (choice.options, choice.picked, choice.options, choice.histogram_layer,
                choice.table, choice.state, bool(choice.options) or run_id is None)

    @app.callback(
        *(Output(g, "figure") for g in LAYER_GRAPHS),
        *(Output(g, "extendData") for g in LAYER_GRAPHS),
        Output("insight-state", "data"),
        Input("step-token", "data"),
        Input("layer-picker", "value"),
        State("run-select", "value"),
        State("insight-state", "data"),
    )
    def _layers(_token: dict | None, layers: list[str] | None, run_id: int | None,
                state: dict | None) -> tuple:
        update = update_layer_charts(ctx, run_id, layers, state)
        if update is None:
            return (no_update,) * (2 * len(LAYER_GRAPHS) + 1)
        figures = update.figures or {}
        extensions = update.extensions or {}
        return (
            *(figures.get(g, no_update) for g in LAYER_GRAPHS),
            *(extensions.get(g, no_update) for g in LAYER_GRAPHS),
            update.state,
        )

    @app.callback(
        Output("histograms-graph", "figure"),
        Output("histograms-step", "children"),
        Output("histograms-state", "data"),
        Input("slow-refresh", "n_intervals"),
        Input("run-select", "value"),
        Input("histogram-layer", "value"),
        State("histograms-state", "data"),
    )
    def _histograms(_n: int | None, run_id: int | None, layer: str | None,
                    state: dict | None) -> tuple:
        update = update_histograms(ctx, run_id, layer, state)
        if update is None:
            return no_update, no_update, no_update
        return update.figure, update.label, update.state

    @app.callback(
        Output("system-graph", "figure"),
        Output("system-graph", "extendData"),
        Output("system-info", "children"),
        Output("system-state", "data"),
        Input("slow-refresh", "n_intervals"),
        Input("run-select", "value"),
        State("system-state", "data"),
    )
    def _system(_n: int | None, run_id: int | None, state: dict | None) -> tuple:
        update = update_system(ctx, run_id, state)
        if update is None:
            return no_update, no_update, no_update, no_update
        return (
            or_no_update(update.figure),
            or_no_update(update.extension),
            or_no_update(update.info),
            update.state,
        )
