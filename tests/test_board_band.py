"""Issue 13 on the board: the loss curves' noise band, mean ± 2 standard errors, against
real SQLite and PostgreSQL databases: in the first figure, in each refresh's extendData,
after a rollback, on a downsampled long run, and through the Dash endpoint.

As in test_board_callbacks.py, rows are written the way the trainer writes them
(Store.write_batch) and the callbacks' functions are called as Dash would; the
expected edges are computed here from the stored rows, not by the board's code.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from test_board_callbacks import log_steps, new_run

from livetrain.board.app import create_app
from livetrain.board.callbacks_curves import update_curves
from livetrain.board.context import BoardContext
from livetrain.board.downsample import MAX_POINTS
from livetrain.db.store import Batch, Store

BANDS = {"train": "train_loss", "validation": "validate_loss"}
UIDS = [f"{name}-loss-band-{edge}" for name in BANDS for edge in ("upper", "lower")]


@pytest.fixture
def ctx(store: Store) -> BoardContext:
    return BoardContext.for_store(store)


def spread(step: int, shift: float = 0.0) -> dict[str, Any]:
    """Spread columns as train.py writes them; values differ by step so that a point
    taken from the wrong row shows."""
    return {"train_loss_count": 10, "train_loss_std": 0.05 + step / 10_000 + shift,
            "validate_loss_count": 4, "validate_loss_std": 0.2 + step / 5_000 + shift}


def expected_edges(store: Store, run_id: int, column: str) -> dict[int, tuple[float, float]]:
    """{step: (upper, lower)}: mean ± 2 std / sqrt(count), or the mean itself without a
    spread (the band pinches to its curve there)."""
    edges = {}
    for row in store.statistics(run_id):
        mean, std = row[column], row[f"{column}_std"]
        count = row[f"{column}_count"]
        half = 2 * std / math.sqrt(count) if std is not None and count else 0.0
        edges[row["step"]] = (mean + half, mean - half)
    return edges


def band(figure: dict[str, Any], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    by_uid = {t.get("uid"): t for t in figure["data"]}
    return by_uid[f"{name}-loss-band-upper"], by_uid[f"{name}-loss-band-lower"]


def assert_band_matches(figure: dict[str, Any], store: Store, run_id: int) -> None:
    """Both bands hold, at each of their steps, the edges the stored rows give."""
    for name, column in BANDS.items():
        upper, lower = band(figure, name)
        assert upper["x"] == lower["x"] and upper["x"]
        edges = expected_edges(store, run_id, column)
        assert upper["y"] == pytest.approx([edges[x][0] for x in upper["x"]], rel=1e-3)
        assert lower["y"] == pytest.approx([edges[x][1] for x in lower["x"]], rel=1e-3)


def test_the_band_is_two_standard_errors_around_each_raw_loss(
    ctx: BoardContext, store: Store
) -> None:
    run_id = new_run(store)
    steps = range(10, 110, 10)
    overrides = {s: spread(s) for s in steps}
    overrides[10] = {"train_loss_count": 1}  # one step: no std, so no band there
    overrides[50] = {"validate_loss_std": None, "validate_loss_count": None}  # an older log
    log_steps(store, run_id, steps, overrides)
    full = update_curves(ctx, run_id, 0.6, False, None)
    loss = full.loss_figure
    assert_band_matches(loss, store, run_id)
    upper, lower = band(loss, "train")
    raw = loss["data"][0]
    assert upper["x"] == raw["x"] == list(steps)  # a short run keeps every point
    assert upper["y"][0] == lower["y"][0] == pytest.approx(raw["y"][0], rel=1e-3)  # pinched
    assert upper["y"][1] > raw["y"][1] > lower["y"][1]
    v_upper, v_lower = band(loss, "validation")
    assert v_upper["y"][4] == v_lower["y"][4]  # step 50 has no validation spread

    # Drawn as a light fill in its curve's colour: hidden edges, no hover, no legend entry,
    # toggled with its curve, the lower edge filling up to the upper one just before it.
    uids = [t.get("uid") for t in loss["data"]]
    assert uids[5:9] == UIDS
    for name, color in (("train", "214,39,40"), ("validation", "31,119,180")):
        upper, lower = band(loss, name)
        assert lower["fill"] == "tonexty" and "fill" not in upper
        assert lower["fillcolor"].startswith(f"rgba({color},")
        for edge in (upper, lower):
            assert edge["hoverinfo"] == "skip" and edge["showlegend"] is False
            assert edge["legendgroup"] == name and edge["line"]["width"] == 0
    assert not any(t.get("uid") for t in full.accuracy_figure["data"])  # losses only


def test_the_band_follows_refreshes_and_rollbacks(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store)
    log_steps(store, run_id, range(10, 110, 10), {s: spread(s) for s in range(10, 110, 10)})
    full = update_curves(ctx, run_id, 0.6, False, None)

    log_steps(store, run_id, [110, 120], {110: spread(110), 120: spread(120)})
    refresh = update_curves(ctx, run_id, 0.6, False, full.state)
    update, traces = refresh.loss_extend
    assert [full.loss_figure["data"][i].get("uid") for i in traces[5:]] == UIDS
    edges = {name: expected_edges(store, run_id, column) for name, column in BANDS.items()}
    for position, uid in enumerate(UIDS, start=5):
        name, side = uid.split("-loss-band-")
        assert update["x"][position] == [110, 120]
        wanted = [edges[name][s][0 if side == "upper" else 1] for s in (110, 120)]
        assert update["y"][position] == pytest.approx(wanted, rel=1e-3)

    # A rollback to step 60: the new branch logs steps 70 and 80 again, with another
    # spread; the figure is rebuilt and its band is the new branch's.
    store.write_batch(run_id, Batch(abandon_after=60))
    log_steps(store, run_id, [70, 80], {70: spread(70, 0.5), 80: spread(80, 0.5)})
    rebuilt = update_curves(ctx, run_id, 0.6, False, refresh.state)
    assert rebuilt.loss_figure is not None
    assert band(rebuilt.loss_figure, "train")[0]["x"] == [10, 20, 30, 40, 50, 60, 70, 80]
    assert_band_matches(rebuilt.loss_figure, store, run_id)
    assert update_curves(ctx, run_id, 0.6, False, rebuilt.state) is None


def test_a_long_runs_band_is_downsampled_like_its_curve(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store)
    steps = list(range(1, 20_001))
    spike = {"train_loss": 50.0} | spread(12_345)
    log_steps(store, run_id, steps, {s: spread(s) for s in steps} | {12_345: spike})
    loss = update_curves(ctx, run_id, 0.6, False, None).loss_figure
    for name in BANDS:
        for edge in band(loss, name):
            assert 8 <= len(edge["x"]) <= MAX_POINTS // 4  # lighter than its curve
            assert edge["x"][0] == 1 and edge["x"][-1] == 20_000
    upper, lower = band(loss, "train")
    at = upper["x"].index(12_345)  # the min/max buckets keep the spike, band and all
    assert lower["y"][at] < 50.0 < upper["y"][at]
    assert_band_matches(loss, store, run_id)


def curves_request(app: Any, run_id: int, state: dict | None) -> dict[str, Any]:
    """The curves callback as the page calls it on a new step token."""
    output = next(k for k in app.callback_map if "loss-graph.extendData" in k)
    outputs = [{"id": part.rsplit(".", 1)[0], "property": part.rsplit(".", 1)[1]}
               for part in output.strip(".").split("...")]
    return {
        "output": output, "outputs": outputs,
        "inputs": [{"id": "step-token", "property": "data", "value": {"run_id": run_id}},
                   {"id": "smoothing-slider", "property": "value", "value": 0.6},
                   {"id": "log-y", "property": "value", "value": []}],
        "state": [{"id": "run-select", "property": "value", "value": run_id},
                  {"id": "curve-state", "property": "data", "value": state}],
        "changedPropIds": ["step-token.data"],
    }


def test_the_endpoint_sends_the_band_then_extends_it(store: Store) -> None:
    run_id = new_run(store)
    log_steps(store, run_id, range(10, 60, 10), {s: spread(s) for s in range(10, 60, 10)})
    app = create_app(BoardContext.for_store(store))
    client = app.server.test_client()
    first = client.post("/_dash-update-component", json=curves_request(app, run_id, None))
    assert first.status_code == 200
    response = first.get_json()["response"]
    assert_band_matches(response["loss-graph"]["figure"], store, run_id)

    log_steps(store, run_id, [60], {60: spread(60)})
    state = response["curve-state"]["data"]
    second = client.post("/_dash-update-component", json=curves_request(app, run_id, state))
    update, traces = second.get_json()["response"]["loss-graph"]["extendData"]
    figure = response["loss-graph"]["figure"]
    for k, i in enumerate(traces):  # what Plotly's extendTraces appends
        figure["data"][i]["x"] += update["x"][k]
        figure["data"][i]["y"] += update["y"][k]
    assert band(figure, "train")[0]["x"][-1] == 60
    assert_band_matches(figure, store, run_id)
