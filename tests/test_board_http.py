"""The board's Dash endpoints, called as the browser calls them (Flask's test client)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from board import open_store
from livetrain.board.app import create_app
from livetrain.board.context import BoardContext
from livetrain.db.contract import DEFAULTS, Hyperparameters
from livetrain.db.store import Store

RUNS_OUTPUT = ("..run-select.options...run-select.value...compare-select.options..."
               "empty-state.className...board-body.className...db-alert.className..")
REQUIRED_IDS = (
    "run-select", "run-header", "optimizer-select", "lr-input", "lr-slider", "wd-input",
    "dropout-input", "submit-params", "stop-button", "apply-status", "loss-graph",
    "accuracy-graph", "param-history", "activations-graph", "events-list", "refresh-select",
    "smoothing-slider", "log-y", "db-alert", "empty-state",
    # issue 7
    "compare-select", "compare-loss-graph", "compare-accuracy-graph", "compare-table",
    "run-name-input", "rename-button", "run-tags-input", "tags-button", "hide-button",
    "show-hidden",
)


def post_runs_refresh(client: Any) -> Any:
    """The request the page sends every refresh for the run selector."""
    outputs = [
        {"id": part.rsplit(".", 1)[0], "property": part.rsplit(".", 1)[1]}
        for part in RUNS_OUTPUT.strip(".").split("...")
    ]
    return client.post("/_dash-update-component", json={
        "output": RUNS_OUTPUT,
        "outputs": outputs,
        "inputs": [{"id": "refresh-interval", "property": "n_intervals", "value": 3},
                   {"id": "show-hidden", "property": "value", "value": []},
                   {"id": "run-edit", "property": "data", "value": None},
                   {"id": "run-select", "property": "value", "value": None}],
        "changedPropIds": ["refresh-interval.n_intervals"],
        "state": [{"id": "run-select", "property": "options", "value": []},
                  {"id": "compare-select", "property": "value", "value": []},
                  {"id": "compare-select", "property": "options", "value": []}],
    })


@pytest.mark.parametrize(
    "dead_url",
    ["sqlite:////nonexistent-directory/training.db",
     "postgresql://postgres@127.0.0.1:1/nothing_listens_here"],
)
def test_a_database_that_is_down_shows_a_banner_not_a_traceback(dead_url: str) -> None:
    store = open_store(dead_url)  # the board starts anyway
    app = create_app(BoardContext.for_store(store))
    response = post_runs_refresh(app.server.test_client())
    assert response.status_code == 200
    body = response.get_data(as_text=True)
    assert "Traceback" not in body
    banner = response.get_json()["sideUpdate"]["db-alert"]
    assert banner["className"] == "alert"
    assert banner["children"].startswith("Database unreachable (")
    store.close()


def test_the_banner_clears_when_the_database_answers(store: Store) -> None:
    store.create_run("<script>alert(1)</script>", "smallcnn", "mnist5k", {},
                     Hyperparameters(**DEFAULTS))
    app = create_app(BoardContext.for_store(store))
    response = post_runs_refresh(app.server.test_client())
    result = response.get_json()["response"]
    assert result["db-alert"]["className"] == "alert hidden"
    assert result["run-select"]["value"] == 1
    assert "<script>alert(1)</script>" in result["run-select"]["options"][0]["label"]


def test_the_layout_has_every_component_the_issue_names(store: Store) -> None:
    app = create_app(BoardContext.for_store(store))
    client = app.server.test_client()
    assert client.get("/").status_code == 200
    layout = json.dumps(client.get("/_dash-layout").get_json())
    for component_id in REQUIRED_IDS:
        assert f'"id": "{component_id}"' in layout
    assert client.get("/assets/board.css").status_code == 200
