"""The page, built from small component functions; styles live in assets/board.css.

Component ids the callbacks and the browser tests rely on are the string ids
below; the per-field wrappers and error messages use pattern-matching ids
({"type": "field", "name": ...}) so one callback validates every field.
"""

from __future__ import annotations

from typing import Any

from dash import dcc, html

from livetrain.board.figures_insight import MINUS
from livetrain.board.smoothing import SMOOTHING_DEFAULT, SMOOTHING_MAX
from livetrain.db.contract import DROPOUT_MAX, GRAD_CLIP_MAX, LR_MAX, OPTIMIZERS

FIELDS = ("optimizer", "learning_rate", "weight_decay", "dropout", "grad_clip")  # validate()'s
LR_SLIDER_MIN = -6  # log10 of the smallest learning rate on the slider
REFRESH_CHOICES = ((0, "off"), (1000, "1 s"), (5000, "5 s"))
REFRESH_DEFAULT_MS = 1000
SLOW_REFRESH_MS = 5000  # panels whose data changes at most every few seconds
LAYERS_POLL_MS = 2000  # until a new run's model table arrives (see callbacks_insight)
GRAPH_CONFIG = {"displaylogo": False, "displayModeBar": "hover",
                "modeBarButtonsToRemove": ["lasso2d", "select2d"]}


def field_id(name: str) -> dict[str, str]:
    return {"type": "field", "name": name}


def field_error_id(name: str) -> dict[str, str]:
    return {"type": "field-error", "name": name}


def card(title: str, *children: Any, tools: Any = None, class_name: str = "") -> html.Section:
    """A titled panel; `tools` sit at the right of the title bar."""
    header = [html.H2(title, className="card-title")]
    if tools is not None:
        header.append(html.Div(tools, className="card-tools"))
    return html.Section(
        [html.Header(header, className="card-header"), html.Div(children, className="card-body")],
        className=f"card {class_name}".strip(),
    )


def field(name: str, label: str, control: Any, hint: str = "") -> html.Div:
    """A labelled control with its validation message underneath."""
    return html.Div(
        [
            html.Label(label, className="field-label"),
            control,
            html.Div(hint, className="field-hint") if hint else None,
            html.Div(id=field_error_id(name), className="field-error", role="alert"),
        ],
        id=field_id(name),
        className="field",
    )


def text_input(component_id: str, placeholder: str) -> dcc.Input:
    """A text box, not type=number: the browser would blank "abc", "NaN" or "1e999" silently
    instead of letting validate() say what is wrong with them."""
    return dcc.Input(
        id=component_id, type="text", placeholder=placeholder, autoComplete="off",
        className="text-input", spellCheck=False,
    )


def top_bar() -> html.Header:
    return html.Header(
        [
            html.Div(
                [html.Span("◧", className="brand-mark"), html.Span("CNN training board")],
                className="brand",
            ),
            html.Div(
                dcc.Dropdown(
                    id="run-select", options=[], value=None, clearable=False,
                    placeholder="No runs yet", className="run-select", maxHeight=420,
                ),
                className="run-select-wrap",
            ),
            dcc.Checklist(
                id="show-hidden", options=[{"label": "show hidden", "value": "show"}],
                value=[], className="toggle show-hidden",
            ),
            html.Div(
                [
                    html.Span("Refresh", className="refresh-label"),
                    dcc.RadioItems(
                        id="refresh-select",
                        options=[{"label": label, "value": ms} for ms, label in REFRESH_CHOICES],
                        value=REFRESH_DEFAULT_MS, inline=True, className="segmented",
                    ),
                ],
                className="refresh",
            ),
        ],
        className="topbar",
    )


def empty_state(start_command: str) -> html.Div:
    return html.Div(
        [
            html.H2("No training runs in this database yet"),
            html.P("Start one and it appears here within a second:"),
            html.Pre(start_command, className="command"),
        ],
        id="empty-state",
        className="empty-state hidden",
    )


def inline_field(label: str, control: Any, button: html.Button) -> html.Div:
    """A labelled text box with its button on the same line."""
    return html.Div(
        [html.Label(label, className="field-label"),
         html.Div([control, button], className="inline-row")],
        className="field",
    )


def run_panel() -> html.Section:
    """The shown run's bookkeeping: its name, its tags, whether run lists show it."""
    return card(
        "Run",
        inline_field("Name", text_input("run-name-input", "a name for this run"),
                     html.Button("Rename", id="rename-button", className="btn btn-secondary",
                                 n_clicks=0)),
        inline_field("Tags", text_input("run-tags-input", "comma-separated, e.g. lr-sweep"),
                     html.Button("Save tags", id="tags-button", className="btn btn-secondary",
                                 n_clicks=0)),
        html.Div(
            [html.Button("Hide run", id="hide-button", className="btn btn-secondary",
                         n_clicks=0),
             html.Span("hidden runs leave the run lists, not the database",
                       className="field-hint")],
            className="inline-row",
        ),
        html.Div(id="run-edit-message", className="run-edit-message", role="status"),
        class_name="run-card",
    )


def compare_section() -> html.Section:
    """Several runs overlaid, one colour each, and a table of their figures."""
    headers = ("run", "tags", "status", "model", "dataset", "steps", "final train loss",
               "final val loss", "final val acc", "best val loss", "best val acc",
               "parameter history")
    picker = dcc.Dropdown(id="compare-select", options=[], value=[], multi=True,
                          placeholder="Runs to compare (the run you watch is listed first)",
                          className="compare-select", maxHeight=420)
    table = card(
        "Runs compared",
        html.Div(
            html.Table(
                [html.Thead(html.Tr([html.Th(h) for h in headers])),
                 html.Tbody(id="compare-table-rows")],
                id="compare-table",
                className="history-table compare-table",
            ),
            className="table-scroll",
        ),
        class_name="compare-table-card",
    )
    return html.Section(
        [
            html.Header(
                [
                    html.H2("Compare runs", className="section-title"),
                    html.Span("one colour per run; training solid, validation dashed",
                              className="section-hint"),
                    html.Div(picker, className="compare-select-wrap"),
                ],
                className="section-header",
            ),
            html.Div(
                [
                    html.Div(
                        [card("Loss", graph("compare-loss-graph")),
                         card("Accuracy", graph("compare-accuracy-graph"))],
                        className="compare-grid",
                    ),
                    table,
                ],
                id="compare-body",
                className="compare-body hidden",  # shown while runs are compared
            ),
        ],
        id="compare",
        className="compare",
    )


def control_panel() -> html.Section:
    optimizer = dcc.Dropdown(
        id="optimizer-select", options=list(OPTIMIZERS), value=None, clearable=False,
        searchable=False, className="optimizer-select",
    )
    lr = html.Div(
        [
            text_input("lr-input", "e.g. 3e-4"),
            dcc.Slider(
                id="lr-slider", min=LR_SLIDER_MIN, max=0, step=0.01, value=None,
                marks={e: f"1e{e}" if e else "1" for e in range(LR_SLIDER_MIN, 1, 2)},
                allow_direct_input=False, className="lr-slider",
            ),
        ],
        className="lr-row",
    )
    return card(
        "Control",
        field("optimizer", "Optimizer", optimizer),
        field("learning_rate", "Learning rate", lr, f"0 < lr ≤ {LR_MAX:g}; slider is log-scale"),
        html.Div(
            [
                field("weight_decay", "Weight decay", text_input("wd-input", "0"), "0 … 1"),
                field("dropout", "Dropout %", text_input("dropout-input", "50"),
                      f"whole percent, 0 … {DROPOUT_MAX}"),
            ],
            className="field-pair",
        ),
        html.Div(
            [
                field("grad_clip", "Gradient clipping", text_input("grad-clip-input", "0"),
                      f"max L2 norm, 0 = off, ≤ {GRAD_CLIP_MAX:g}"),
                html.Div(
                    [
                        html.Label("Training", className="field-label"),
                        html.Button("Pause", id="pause-button", className="btn btn-secondary",
                                    n_clicks=0),
                    ],
                    className="field",
                ),
            ],
            className="field-pair",
        ),
        html.Div(
            [
                html.Button("Submit parameters", id="submit-params", className="btn btn-primary",
                            n_clicks=0),
                dcc.ConfirmDialogProvider(
                    html.Button("Stop training", id="stop-button", className="btn btn-danger"),
                    id="stop-confirm",
                    message="Stop this training run? The trainer finishes its step, runs a "
                            "final validation, saves a checkpoint and exits.",
                ),
            ],
            className="button-row",
        ),
        html.Div(id="apply-status", className="apply-status", role="status"),
        class_name="control-card",
    )


def rollback_panel() -> html.Section:
    """Checkpoints the run can return to; the confirmation names the step."""
    return card(
        "Roll back",
        html.Div(
            [
                dcc.Dropdown(id="checkpoint-select", options=[], value=None, clearable=False,
                             searchable=False, placeholder="No checkpoints yet",
                             className="checkpoint-select"),
                dcc.ConfirmDialogProvider(
                    html.Button("Roll back", id="rollback-button", className="btn btn-warn"),
                    id="rollback-confirm", message="",
                ),
            ],
            className="rollback-row",
        ),
        html.Div("Restores the model and optimizer of that step and continues from it with "
                 "the parameters above; the steps after it stay on the curves in grey.",
                 className="field-hint"),
        class_name="rollback-card",
    )


def alerts_panel() -> html.Section:
    return card(
        "Alerts",
        html.Div(id="alerts-list", className="alerts-list"),
        tools=html.Span(id="alerts-count", className="tool-value"),
        class_name="alerts-card",
    )


def chart(title: str, graph_id: str, hint: str = "", tools: Any = None) -> html.Section:
    """A small insight chart: title, an optional one-line guide, the graph."""
    return card(title, html.Div(hint, className="chart-hint") if hint else None,
                graph(graph_id, "insight-graph"), tools=tools, class_name="chart-card")


def insight_section() -> html.Section:
    """The Layers view: per-layer health over time, histograms, lr, model and system."""
    picker = dcc.Dropdown(id="layer-picker", options=[], value=[], multi=True,
                          placeholder="Layers to chart", className="layer-picker")
    histogram_tools = html.Div(
        [
            dcc.Dropdown(id="histogram-layer", options=[], value=None, clearable=False,
                         className="histogram-layer"),
            html.Span(id="histograms-step", className="tool-value"),
        ],
        className="histogram-tools",
    )
    model = card(
        "Model",
        html.Div(
            html.Table(
                [
                    html.Thead(html.Tr([html.Th(h) for h in (
                        "layer", "type", "output shape", "params", "trainable")])),
                    html.Tbody(id="model-table-rows"),
                ],
                id="model-table",
                className="history-table model-table",
            ),
            className="table-scroll",
        ),
        class_name="model-card",
    )
    system = card(
        "System",
        html.Dl(id="system-info", className="system-info"),
        graph("system-graph", "insight-graph"),
        class_name="system-card",
    )
    return html.Section(
        [
            html.Header(
                [
                    html.H2("Layers", className="section-title"),
                    html.Span("update : parameter ratio, activations and gradients per "
                              "conv/fc layer", className="section-hint"),
                    html.Div(picker, className="layer-picker-wrap"),
                ],
                className="section-header",
            ),
            html.Div(
                [
                    chart("Update : parameter ratio", "update-ratio-graph",
                          f"log10 of mean |Δw| / mean |w|; healthy band {MINUS}4 … "
                          f"{MINUS}2, aim near {MINUS}3"),
                    chart("Activation std", "act-std-graph",
                          "after the nonlinearity; healthy band 0.5 … 2"),
                    chart("Activation mean ± 2 std", "act-mean-graph",
                          "the spread of each layer's output over time"),
                    chart("Gradient norm", "grad-norm-graph",
                          "L2 norm of each layer's weight gradient (log scale)"),
                    chart("Weights and updates", "histograms-graph",
                          "histograms of the chosen layer at its newest logged step",
                          tools=histogram_tools),
                    chart("Learning rate", "lr-graph", "in force at each logged step"),
                ],
                className="insight-grid",
            ),
            html.Div([model, system], className="insight-grid insight-bottom"),
        ],
        id="insight",
        className="insight",
    )


def history_table() -> html.Section:
    headers = ["ver", "step", "optimizer", "lr", "wd", "dropout", "latency"]
    return card(
        "Parameter history",
        html.Div(
            html.Table(
                [
                    html.Thead(html.Tr([html.Th(h) for h in headers])),
                    html.Tbody(id="param-history-rows"),
                ],
                id="param-history",
                className="history-table",
            ),
            className="table-scroll",
        ),
        class_name="history-card",
    )


def display_tools() -> html.Div:
    return html.Div(
        [
            html.Span("Smoothing", className="tool-label"),
            dcc.Slider(
                id="smoothing-slider", min=0, max=SMOOTHING_MAX, step=0.01,
                value=SMOOTHING_DEFAULT, marks=None, allow_direct_input=False,
                tooltip={"placement": "bottom", "always_visible": False},
                className="smoothing-slider",
            ),
            html.Span(id="smoothing-value", className="tool-value"),
            dcc.Checklist(
                id="log-y", options=[{"label": "log-scale loss", "value": "log"}], value=[],
                className="toggle",
            ),
        ],
        className="display-tools",
    )


def graph(component_id: str, class_name: str = "", tools: bool = True) -> dcc.Graph:
    """A Plotly graph; `tools` shows the zoom/pan/download bar on hover."""
    config = GRAPH_CONFIG if tools else {"displayModeBar": False}
    return dcc.Graph(
        id=component_id, config=config, className=f"graph {class_name}".strip(),
        figure={"data": [], "layout": {"height": 330}},
    )


def stores() -> list[dcc.Store]:
    """What the page already holds, so a refresh asks only for newer rows."""
    return [
        dcc.Store(id="curve-state"),
        dcc.Store(id="history-state"),
        dcc.Store(id="activations-state"),
        dcc.Store(id="fields-state"),
        dcc.Store(id="submission"),
        dcc.Store(id="alerts-state"),
        dcc.Store(id="fix-clicks"),
        dcc.Store(id="layers-state"),
        dcc.Store(id="insight-state"),
        dcc.Store(id="histograms-state"),
        dcc.Store(id="system-state"),
        # What changed at the last refresh (dashboard.callbacks_changes).
        dcc.Store(id="step-token"),
        dcc.Store(id="control-token"),
        dcc.Store(id="events-token"),
        dcc.Store(id="header-state"),
        # Run bookkeeping (a write: see dashboard.auth) and the comparison.
        dcc.Store(id="run-edit"),
        dcc.Store(id="run-fields-state"),
        dcc.Store(id="compare-state"),
        dcc.Store(id="compare-tick"),
    ]


def page(start_command: str) -> html.Div:
    return html.Div(
        [
            top_bar(),
            html.Div(id="db-alert", className="alert hidden", role="alert"),
            empty_state(start_command),
            html.Main(
                [
                    html.Div(id="run-header", className="run-header"),
                    html.Div(
                        [
                            html.Aside(
                                [control_panel(), rollback_panel(), run_panel(),
                                 history_table(),
                                 card("Events", html.Ul(id="events-list",
                                                        className="events-list"))],
                                className="sidebar",
                            ),
                            html.Div(
                                [
                                    alerts_panel(),
                                    card("Loss", graph("loss-graph"), tools=display_tools()),
                                    card("Accuracy", graph("accuracy-graph")),
                                    card("Activation distributions",
                                         graph("activations-graph", "activations", tools=False),
                                         tools=html.Span(id="activations-step",
                                                         className="tool-value")),
                                ],
                                className="content",
                            ),
                        ],
                        className="board-grid",
                    ),
                    compare_section(),
                    insight_section(),
                ],
                id="board-body",
                className="board hidden",  # shown once the database has answered
            ),
            dcc.Interval(id="refresh-interval", interval=REFRESH_DEFAULT_MS),
            dcc.Interval(id="layers-poll", interval=LAYERS_POLL_MS),
            dcc.Interval(id="slow-refresh", interval=SLOW_REFRESH_MS),
            *stores(),
        ],
        className="page",
    )
