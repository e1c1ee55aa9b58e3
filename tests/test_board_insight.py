"""Issue 4 on the board: layer insight, alerts with one-click fixes, pause, grad clip,
rollback and the abandoned branch, against real SQLite and PostgreSQL databases.

As in test_board_callbacks.py, the Dash decorators wrap plain functions; these
tests write rows the way the trainer does (Store.write_batch) and call them.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import pytest
from test_board_callbacks import INITIAL, log_steps, new_run, text_of

from livetrain.board import callbacks_insight
from livetrain.board.callbacks_alerts import (
    apply_fix,
    clicked_fix,
    fix_id,
    fix_label,
    update_alerts,
)
from livetrain.board.callbacks_controls import (
    apply_status,
    field_errors,
    submit_parameters,
    sync_fields,
)
from livetrain.board.callbacks_curves import update_curves
from livetrain.board.callbacks_insight import (
    DEFAULT_LAYERS,
    WINDOW_STEPS,
    layer_choices,
    update_histograms,
    update_layer_charts,
    update_system,
)
from livetrain.board.callbacks_recovery import (
    recovery_view,
    request_rollback,
    rollback_message,
    toggle_pause,
)
from livetrain.board.context import BoardContext
from livetrain.board.figures import ABANDONED_COLORS
from livetrain.db.store import Batch, Store, now

LAYERS = [f"features.{i}" for i in range(10)] + ["classifier.1"]


@pytest.fixture
def ctx(store: Store) -> BoardContext:
    return BoardContext.for_store(store)


def model_layers(names: list[str]) -> list[dict[str, Any]]:
    """A model table: each monitored layer followed by its ReLU (not monitored)."""
    rows = []
    for name in names:
        rows.append({"layer_name": name, "layer_type": "Conv2d", "output_shape": "64x8x8",
                     "parameters": 1000, "trainable": 1000, "monitored": True})
        rows.append({"layer_name": f"{name}.relu", "layer_type": "ReLU",
                     "output_shape": "64x8x8", "parameters": 0, "trainable": 0,
                     "monitored": False})
    return [r | {"position": i} for i, r in enumerate(rows)]


def layer_rows(steps: list[int] | range, names: list[str]) -> list[dict[str, Any]]:
    """Per-layer statistics as telemetry.LayerProbe writes them; values encode the
    step and the layer so a test can tell them apart."""
    return [
        {"step": step, "layer_name": name, "act_mean": 0.1 * i, "act_std": 1.0 + step / 1000,
         "zero_fraction": 0.4, "dead_fraction": 0.0, "has_nonlinearity": True,
         "grad_norm": 0.5 + i, "update_ratio": 10.0 ** -(3 + i / 10), "weight_norm": 3.0}
        for step in steps for i, name in enumerate(names)
    ]


def seed_run(store: Store, steps: range, names: list[str] = LAYERS) -> int:
    run_id = new_run(store)
    store.write_batch(run_id, Batch(model_layers=model_layers(names)))
    log_steps(store, run_id, steps)
    store.write_batch(run_id, Batch(layer_statistics=layer_rows(steps, names)))
    return run_id


def alert_event(code: str, level: str = "warning", fix: dict | None = None,
                step: int = 10, layer: str | None = "features.3") -> dict[str, Any]:
    return {"level": level, "code": code, "message": f"{code} <b>at</b> {layer}", "step": step,
            "dt": now(), "layer_name": layer, "recommendation": "lower the learning rate",
            "fix": fix}


# -- layer picker and model table ------------------------------------------------------


def test_layer_picker_offers_monitored_layers_and_picks_the_first_eight(
    ctx: BoardContext, store: Store
) -> None:
    run_id = seed_run(store, range(0, 20, 10))
    choice = layer_choices(ctx, run_id, None)
    assert [o["value"] for o in choice.options] == LAYERS  # forward order, no ReLUs
    assert choice.picked == LAYERS[:DEFAULT_LAYERS] and choice.histogram_layer == LAYERS[0]
    assert len(choice.table) == 2 * len(LAYERS) + 1
    total = text_of(choice.table[-1])
    assert "total" in total and "11,000" in total
    assert choice.table[0].className == "monitored" and choice.table[1].className is None
    assert layer_choices(ctx, run_id, choice.state) is None
    assert layer_choices(ctx, None, choice.state).options == []


# -- per-layer charts ----------------------------------------------------------------


def test_layer_charts_build_with_the_seeds_guides_then_extend(
    ctx: BoardContext, store: Store
) -> None:
    names = LAYERS[:3]
    run_id = seed_run(store, range(0, 50, 10), names)
    full = update_layer_charts(ctx, run_id, names, None)
    assert full is not None and full.extensions is None
    ratio = full.figures["update-ratio-graph"]
    assert [t["name"] for t in ratio["data"]] == names
    assert ratio["data"][0]["x"] == [0, 10, 20, 30, 40]
    assert ratio["data"][1]["y"][0] == pytest.approx(-3.1)  # log10 of 10^-3.1
    band, guide = ratio["layout"]["shapes"]
    assert (band["y0"], band["y1"], guide["y0"]) == (-4.0, -2.0, -3.0)
    std_band = full.figures["act-std-graph"]["layout"]["shapes"][0]
    assert (std_band["y0"], std_band["y1"]) == (0.5, 2.0)
    assert full.figures["grad-norm-graph"]["layout"]["yaxis"]["type"] == "log"
    mean = full.figures["act-mean-graph"]["data"]
    assert len(mean) == 3 * len(names)  # lower, upper (filled to lower), mean per layer
    lower, upper, middle = mean[3:6]
    assert upper["fill"] == "tonexty"
    assert middle["y"][0] == pytest.approx(0.1)
    assert lower["y"][0] == pytest.approx(0.1 - 2 * 1.0)
    assert upper["y"][0] == pytest.approx(0.1 + 2 * 1.0)
    lr = full.figures["lr-graph"]["data"][0]
    assert lr["x"] == [0, 10, 20, 30, 40] and lr["y"] == [3e-4] * 5
    assert full.state["last_step"] == 40 == full.state["lr_step"]

    assert update_layer_charts(ctx, run_id, names, full.state) is None  # nothing new

    log_steps(store, run_id, [50])
    store.write_batch(run_id, Batch(layer_statistics=layer_rows([50], names)))
    refresh = update_layer_charts(ctx, run_id, names, full.state)
    assert refresh is not None and refresh.figures is None
    update, traces, max_points = refresh.extensions["update-ratio-graph"]
    assert update["x"] == [[50], [50], [50]] and traces == [0, 1, 2]
    assert max_points == WINDOW_STEPS  # the browser's copy stays inside the window
    assert refresh.extensions["act-mean-graph"][1] == list(range(9))
    assert refresh.extensions["lr-graph"][0]["x"] == [[50]]
    assert refresh.state["last_step"] == 50

    fewer = update_layer_charts(ctx, run_id, names[:1], refresh.state)  # picker changed
    assert fewer.figures is not None and len(fewer.figures["act-std-graph"]["data"]) == 1


def test_layer_charts_keep_a_layers_colour_whatever_is_picked(
    ctx: BoardContext, store: Store
) -> None:
    run_id = seed_run(store, range(0, 20, 10), LAYERS[:4])
    every = update_layer_charts(ctx, run_id, LAYERS[:4], None).figures["act-std-graph"]
    some = update_layer_charts(ctx, run_id, [LAYERS[2]], None).figures["act-std-graph"]
    assert some["data"][0]["line"]["color"] == every["data"][2]["line"]["color"]


def test_layer_charts_read_a_bounded_window_of_a_long_run(
    ctx: BoardContext, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(callbacks_insight, "WINDOW_STEPS", 5)
    names = LAYERS[:2]
    run_id = seed_run(store, range(0, 200, 10), names)
    full = update_layer_charts(ctx, run_id, names, None)
    assert full.figures["grad-norm-graph"]["data"][0]["x"] == [150, 160, 170, 180, 190]
    assert full.figures["lr-graph"]["data"][0]["x"] == [150, 160, 170, 180, 190]


def test_a_refresh_cut_by_its_row_limit_leaves_the_partial_step_for_later(
    ctx: BoardContext, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = LAYERS[:3]
    run_id = seed_run(store, range(0, 20, 10), names)
    state = update_layer_charts(ctx, run_id, names, None).state
    log_steps(store, run_id, [20, 30])
    store.write_batch(run_id, Batch(layer_statistics=layer_rows([20, 30], names)))
    monkeypatch.setattr(callbacks_insight, "REFRESH_ROWS", 4)  # step 20 and part of 30
    first = update_layer_charts(ctx, run_id, names, state)
    assert first.extensions["act-std-graph"][0]["x"] == [[20], [20], [20]]
    second = update_layer_charts(ctx, run_id, names, first.state)
    assert second.extensions["act-std-graph"][0]["x"] == [[30], [30], [30]]


def test_layer_charts_are_rebuilt_after_a_rollback(ctx: BoardContext, store: Store) -> None:
    names = LAYERS[:2]
    run_id = seed_run(store, range(0, 60, 10), names)
    state = update_layer_charts(ctx, run_id, names, None).state
    store.write_batch(run_id, Batch(abandon_after=20))  # the trainer restored step 20
    update = update_layer_charts(ctx, run_id, names, state)
    assert update.figures is not None
    assert update.figures["act-std-graph"]["data"][0]["x"] == [0, 10, 20]


def test_layer_charts_without_rows_say_so(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store)
    empty = update_layer_charts(ctx, run_id, [], None)
    note = empty.figures["update-ratio-graph"]["layout"]["annotations"][0]["text"]
    assert "No layer statistics" in note
    assert update_layer_charts(ctx, None, [], None).figures["lr-graph"]["data"][0]["x"] == []


# -- histograms and system ---------------------------------------------------------------


def test_histograms_show_the_chosen_layer_at_its_newest_step(
    ctx: BoardContext, store: Store
) -> None:
    run_id = new_run(store)

    def histograms(step: int, layer: str) -> list[dict[str, Any]]:
        return [{"step": step, "layer_name": layer, "kind": kind,
                 "bin_edges": [-1.0, 0.0, 1.0], "counts": [step, 1]}
                for kind in ("weight", "update")]

    store.write_batch(run_id, Batch(layer_histograms=histograms(10, "a") + histograms(20, "a")
                                    + histograms(10, "b")))
    update = update_histograms(ctx, run_id, "a", None)
    weight, change = update.figure["data"]
    assert (weight["name"], change["name"]) == ("weight", "update")
    assert weight["y"] == [20, 1] and weight["x"] == [-0.5, 0.5] and change["xaxis"] == "x2"
    assert update.label == "step 20"
    assert update_histograms(ctx, run_id, "a", update.state) is None
    other = update_histograms(ctx, run_id, "b", update.state)
    assert other.label == "step 10" and other.figure["data"][0]["y"] == [10, 1]
    none = update_histograms(ctx, run_id, None, None)
    assert none.figure["data"] == [] and none.label == ""


def test_system_panel_shows_samples_and_where_the_run_trains(
    ctx: BoardContext, store: Store
) -> None:
    run_id = store.create_run("sys", "smallcnn", "mnist5k", {
        "device": "cpu", "host": "box", "torch": "2.4.0", "cuda": None, "python": "3.11.7",
        "parameters_count": 3043018}, INITIAL)
    start = now() - timedelta(seconds=20)

    def samples(first: int, count: int) -> list[dict[str, Any]]:
        return [{"dt": start + timedelta(seconds=5 * i), "step": 10 * i, "cpu_percent": 95.0,
                 "rss_bytes": 2 * 1024**3, "gpu_utilization": None, "gpu_memory_bytes": None,
                 "samples_per_second": 640.0} for i in range(first, first + count)]

    empty = update_system(ctx, run_id, None)
    assert empty.figure is not None and empty.state["last_sample"] == 0
    assert update_system(ctx, run_id, empty.state) is None  # still nothing sampled
    store.write_batch(run_id, Batch(system_metrics=samples(0, 3)))
    full = update_system(ctx, run_id, empty.state)
    cpu, rss, gpu, rate = full.figure["data"]
    assert cpu["y"] == [95.0] * 3 and rss["y"] == [2.0] * 3 and gpu["y"] == [None] * 3
    assert rate["y"] == [640.0] * 3
    assert "no GPU" in text_of(full.figure["layout"]["annotations"][2]["text"])
    info = text_of(full.info)
    for expected in ("box", "cpu", "2.4.0", "3.11.7", "3,043,018", "CUDA —"):
        assert expected in info
    store.write_batch(run_id, Batch(system_metrics=samples(3, 2)))
    refresh = update_system(ctx, run_id, full.state)
    assert refresh.figure is None and refresh.extension[1] == [0, 1, 2, 3]
    assert len(refresh.extension[0]["x"][0]) == 2
    assert update_system(ctx, run_id, refresh.state) is None


# -- alerts and their fixes ------------------------------------------------------------------


def test_warnings_no_episode_stands_for_are_listed_newest_first(
    ctx: BoardContext, store: Store
) -> None:
    """Events of runs without alert episodes (older runs, one-off logs) still show."""
    run_id = new_run(store)
    store.write_batch(run_id, Batch(events=[
        alert_event("update_ratio_high", fix={"learning_rate": 3e-5}),
        alert_event("parameters_applied", level="info", step=11, layer=None),
        alert_event("activation_std_low", step=12),
    ]))
    full = update_alerts(ctx, run_id, None)
    assert full.count == "2 other"
    [group] = full.groups
    assert "Other warnings" in text_of(group.children[0])
    newest, oldest = group.children[1].children
    assert "activation_std_low" in text_of(newest) and "update_ratio_high" in text_of(oldest)
    assert "<b>at</b>" in text_of(oldest)  # a text node, shown verbatim
    assert "lower the learning rate" in text_of(oldest) and "features.3" in text_of(oldest)
    button = oldest.children[-1]
    assert button.children == "Apply: set lr to 3e-05"
    event_id = min(e["event_id"] for e in store.events(run_id))
    assert button.id == fix_id(run_id, "event", event_id, full.state["render"])
    assert "Apply" not in text_of(newest)  # no fix, no button
    assert update_alerts(ctx, run_id, full.state) is None

    store.write_batch(run_id, Batch(events=[alert_event("non_finite", level="error",
                                                        fix={"learning_rate": 0.1})]))
    refresh = update_alerts(ctx, run_id, full.state)
    assert refresh.count == "3 other"
    assert "alert-error" in refresh.groups[0].children[1].children[0].className
    assert refresh.state["render"] > full.state["render"]  # fresh buttons, fresh ids


def test_only_a_new_click_applies_a_fix() -> None:
    assert clicked_fix([(1, 0), (2, None)], None) == (None, {})  # buttons arrived
    event_id, seen = clicked_fix([(1, 0), (2, 1)], None)
    assert (event_id, seen) == (2, {"2": 1})
    assert clicked_fix([(3, 0), (1, 0), (2, 1)], seen) == (None, seen)  # an alert arrived
    assert clicked_fix([(3, 0), (1, 0), (2, 2)], seen)[0] == 2  # clicked again


def test_fix_labels() -> None:
    assert fix_label({"learning_rate": 3e-5}) == "Apply: set lr to 3e-05"
    assert fix_label({"optimizer": "Adam", "learning_rate": 0.001}) == (
        "Apply: set optimizer to Adam and lr to 0.001")
    assert fix_label({"dropout": 30}) == "Apply: set dropout to 30 %"


def test_a_fix_is_one_click_and_the_apply_status_follows_it(
    ctx: BoardContext, store: Store
) -> None:
    run_id = new_run(store)
    store.write_batch(run_id, Batch(events=[alert_event("update_ratio_high",
                                                        fix={"learning_rate": 3e-5})]))
    event_id = ctx.queries.alert_events(run_id)[0]["event_id"]
    submitted = apply_fix(ctx, run_id, "event", event_id)
    assert submitted["version"] == 2 and submitted["kind"] == "fix"
    params = store.get_parameters(run_id)
    assert params.learning_rate == 3e-5 and not params.pause_train
    assert "pending" in apply_status(ctx, run_id, submitted).text
    acknowledge(store, run_id, step=40)
    assert apply_status(ctx, run_id, submitted).text.startswith(
        'Fix "set lr to 3e-05" (version 2) applied at step 40')


def test_a_fix_on_a_paused_run_keeps_it_paused(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store)
    store.write_batch(run_id, Batch(status="paused", events=[
        alert_event("non_finite", level="error", fix={"learning_rate": 0.1})]))
    event_id = ctx.queries.alert_events(run_id)[0]["event_id"]
    apply_fix(ctx, run_id, "event", event_id)
    params = store.get_parameters(run_id)
    assert params.learning_rate == 0.1 and params.pause_train


def test_fixes_that_cannot_be_applied_are_refused(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store)
    store.write_batch(run_id, Batch(events=[alert_event("activation_std_low"),
                                            alert_event("loss_rising",
                                                        fix={"learning_rate": 5.0})]))
    no_fix, bad_fix = sorted(e["event_id"] for e in ctx.queries.alert_events(run_id))
    assert "no fix" in apply_fix(ctx, run_id, "event", no_fix)["refused"]
    assert "learning rate" in apply_fix(ctx, run_id, "event", bad_fix)["refused"]
    other = new_run(store, "other")
    assert apply_fix(ctx, other, "event", bad_fix)["refused"]  # another run's alert
    store.set_status(run_id, "finished", ended=True)
    store.write_batch(run_id, Batch(events=[alert_event("x", fix={"learning_rate": 1e-4})]))
    latest = ctx.queries.alert_events(run_id)[0]["event_id"]
    assert "finished" in apply_fix(ctx, run_id, "event", latest)["refused"]
    assert store.get_parameters(run_id).version == 1


# -- grad clip, pause, rollback ------------------------------------------------------------


def acknowledge(store: Store, run_id: int, step: int, rollback_step: int | None = None) -> None:
    """What train.py's adopt() writes, pause and rollback included."""
    p = store.get_parameters(run_id)
    store.write_batch(run_id, Batch(acknowledgements=[{
        "version": p.version, "optimizer": p.optimizer, "learning_rate": p.learning_rate,
        "weight_decay": p.weight_decay, "dropout": p.dropout, "grad_clip": p.grad_clip,
        "stop_train": p.stop_train, "pause_train": p.pause_train,
        "rollback_step": rollback_step, "dt_updated": p.dt_updated, "applied_step": step,
        "dt_applied": p.dt_updated + timedelta(milliseconds=9),
    }]))


@pytest.mark.parametrize("value", ["-1", "abc", "1e9", "", "nan"])
def test_grad_clip_is_validated_like_the_other_fields(value: str) -> None:
    assert list(field_errors("Adam", "1e-3", "0", "50", value)) == ["grad_clip"]


def test_grad_clip_is_loaded_and_submitted(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store)
    assert sync_fields(ctx, run_id, None).values.grad_clip == "0"
    assert field_errors("Adam", "1e-3", "0", "50", "0") == {}  # 0 = off
    submit_parameters(ctx, run_id, "Adam", "1e-3", "0", "50", "2.5")
    assert store.get_parameters(run_id).grad_clip == 2.5
    submit_parameters(ctx, run_id, "Adam", "1e-3", "0", "50")  # not given: kept
    assert store.get_parameters(run_id).grad_clip == 2.5
    refused = submit_parameters(ctx, run_id, "Adam", "1e-3", "0", "50", "-1")
    assert refused["refused"] and store.get_parameters(run_id).version == 3


def test_pause_then_resume(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store)
    assert recovery_view(ctx, run_id, None).pause_label == "Pause"
    paused = toggle_pause(ctx, run_id)
    assert paused["kind"] == "pause" and store.get_parameters(run_id).pause_train
    acknowledge(store, run_id, step=30)
    store.write_batch(run_id, Batch(status="paused"))
    assert "Pause (version 2) applied at step 30" in apply_status(ctx, run_id, paused).text
    assert recovery_view(ctx, run_id, None).pause_label == "Resume"
    # A parameters change while paused keeps the run paused.
    submit_parameters(ctx, run_id, "Adam", "1e-3", "0", "50")
    assert store.get_parameters(run_id).pause_train
    resumed = toggle_pause(ctx, run_id)
    assert resumed["kind"] == "resume" and not store.get_parameters(run_id).pause_train


def test_a_run_that_paused_itself_offers_resume(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store)
    store.write_batch(run_id, Batch(status="paused"))  # the NaN guard; pause_train unset
    assert recovery_view(ctx, run_id, None).pause_label == "Resume"
    assert toggle_pause(ctx, run_id)["kind"] == "resume"


def test_rollback_offers_the_runs_checkpoints_and_writes_a_one_shot_request(
    ctx: BoardContext, store: Store
) -> None:
    run_id = new_run(store)
    assert recovery_view(ctx, run_id, None).rollback_disabled  # nothing to roll back to
    store.write_batch(run_id, Batch(checkpoints=[
        {"step": step, "epoch": 1, "reason": reason, "path": f"/ck/{step}.pt", "bytes": 10}
        for step, reason in ((0, "initial"), (10, "periodic"), (20, "before_change"))
    ], status="paused"))
    view = recovery_view(ctx, run_id, None)
    assert [o["value"] for o in view.options] == [20, 10, 0] and view.value == 20
    assert view.options[0]["label"] == "step 20 · epoch 1 · before_change"
    assert recovery_view(ctx, run_id, 10).value == 10  # the user's choice is kept
    store.write_batch(run_id, Batch(removed_checkpoints=[10]))  # pruned by the trainer
    assert recovery_view(ctx, run_id, 10).value == 20
    assert "step 10" in rollback_message(10) and rollback_message(None) == ""

    submitted = request_rollback(ctx, run_id, 10)
    p = store.get_parameters(run_id)
    assert (p.rollback_step, p.rollback_request, p.pause_train) == (10, 1, False)
    request_rollback(ctx, run_id, 0)
    assert store.get_parameters(run_id).rollback_request == 2  # every click is a request
    acknowledge(store, run_id, step=0, rollback_step=0)
    assert "superseded by version 3" in apply_status(ctx, run_id, submitted).text
    assert request_rollback(ctx, run_id, None)["refused"]
    store.set_status(run_id, "stopped", ended=True)
    assert "stopped" in request_rollback(ctx, run_id, 0)["refused"]
    view = recovery_view(ctx, run_id, None)
    assert view.pause_disabled and view.rollback_disabled


def test_the_abandoned_branch_is_drawn_grey_and_dashed(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store)
    log_steps(store, run_id, range(10, 110, 10), {90: {"train_loss": math.inf},
                                                  100: {"train_loss": math.nan}})
    before = update_curves(ctx, run_id, 0.6, False, None)
    assert len(before.loss_figure["data"]) == 9  # no rollback, no grey traces
    store.write_batch(run_id, Batch(abandon_after=40))
    log_steps(store, run_id, [50, 60])
    after = update_curves(ctx, run_id, 0.6, False, before.state)
    assert after.loss_figure is not None
    live = after.loss_figure["data"][0]
    assert live["x"] == [10, 20, 30, 40, 50, 60]
    grey = after.loss_figure["data"][9:]  # after the curves, changes and noise bands
    assert [t["name"] for t in grey] == ["abandoned branch"] * 2
    assert grey[0]["x"] == [50, 60, 70, 80, 90, 100]
    assert grey[0]["y"][-2:] == [None, None]  # inf and NaN as gaps
    assert grey[0]["line"] == {"color": ABANDONED_COLORS["train"], "width": 1, "dash": "dash"}
    assert grey[0]["showlegend"] and not grey[1]["showlegend"]
    assert len(after.accuracy_figure["data"]) == 7
    # Later refreshes extend only the live traces.
    log_steps(store, run_id, [70])
    refresh = update_curves(ctx, run_id, 0.6, False, after.state)
    assert refresh.loss_extend[1] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
