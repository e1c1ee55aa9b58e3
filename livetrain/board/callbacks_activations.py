"""Activation distributions: small multiples for the latest logged step.

A refresh asks the primary key for the newest step (an index-only MAX) and
reads the histograms only when that step is newer than the one on the page;
when the page already draws the same layers, only their bars and titles are sent
(a Patch), not the whole figure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dash import Dash, Input, Output, Patch, State, no_update

from livetrain.board.context import BoardContext
from livetrain.board.figures import activations_figure, activations_patch


@dataclass(frozen=True)
class ActivationsUpdate:
    figure: dict[str, Any] | Patch
    label: str
    state: dict[str, Any]


def update_activations(
    ctx: BoardContext, run_id: int | None, state: Mapping[str, Any] | None
) -> ActivationsUpdate | None:
    """The latest step's histograms, or None when the page already shows that step."""
    step = ctx.queries.latest_activation_step(run_id) if run_id is not None else None
    state = state or {}
    if state.get("run_id") == run_id and state.get("step") == step:
        return None
    rows = ctx.queries.activations_at(run_id, step) if step is not None else []
    label = f"step {step:,} · {len(rows)} layers" if rows else ""
    layers = [row["layer_name"] for row in rows]
    new_state = {"run_id": run_id, "step": step, "layers": layers}
    if rows and state.get("run_id") == run_id and state.get("layers") == layers:
        return ActivationsUpdate(activations_patch(rows), label, new_state)
    return ActivationsUpdate(activations_figure(rows), label, new_state)


def register(app: Dash, ctx: BoardContext) -> None:
    @app.callback(
        Output("activations-graph", "figure"),
        Output("activations-step", "children"),
        Output("activations-state", "data"),
        Input("step-token", "data"),
        State("run-select", "value"),
        State("activations-state", "data"),
    )
    def _activations(_token: dict | None, run_id: int | None, state: dict | None) -> tuple:
        update = update_activations(ctx, run_id, state)
        if update is None:
            return no_update, no_update, no_update
        return update.figure, update.label, update.state
