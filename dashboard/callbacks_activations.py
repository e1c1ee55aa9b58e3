"""Activation distributions: small multiples for the latest logged step.

A refresh asks the primary key for the newest step (an index-only MAX) and
reads the histograms only when that step is newer than the one on the page.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dash import Dash, Input, Output, State, no_update

from dashboard.context import BoardContext
from dashboard.figures import activations_figure


@dataclass(frozen=True)
class ActivationsUpdate:
    figure: dict[str, Any]
    label: str
    state: dict[str, Any]


def update_activations(
    ctx: BoardContext, run_id: int | None, state: Mapping[str, Any] | None
) -> ActivationsUpdate | None:
    """The latest step's histograms, or None when the page already shows that step."""
    step = ctx.queries.latest_activation_step(run_id) if run_id is not None else None
    new_state = {"run_id": run_id, "step": step}
    if state == new_state:
        return None
    rows = ctx.queries.activations_at(run_id, step) if step is not None else []
    label = f"step {step:,} · {len(rows)} layers" if rows else ""
    return ActivationsUpdate(activations_figure(rows), label, new_state)


def register(app: Dash, ctx: BoardContext) -> None:
    @app.callback(
        Output("activations-graph", "figure"),
        Output("activations-step", "children"),
        Output("activations-state", "data"),
        Input("refresh-interval", "n_intervals"),
        Input("run-select", "value"),
        State("activations-state", "data"),
    )
    def _activations(_n: int | None, run_id: int | None, state: dict | None) -> tuple:
        update = update_activations(ctx, run_id, state)
        if update is None:
            return no_update, no_update, no_update
        return update.figure, update.label, update.state
