"""The board's callback logic against real SQLite and PostgreSQL databases.

The Dash decorators wrap plain functions; these tests call the functions with a
BoardContext on the `store` fixture, write rows the way the trainer does
(Store.write_batch), and read back what a browser would be sent.
"""

from __future__ import annotations

import math
import threading
from datetime import timedelta
from typing import Any

import pytest
from dash import html

from livetrain.board.callbacks_activations import update_activations
from livetrain.board.callbacks_changes import change_tokens
from livetrain.board.callbacks_controls import (
    apply_status,
    field_errors,
    lr_to_slider,
    request_stop,
    slider_to_lr,
    submit_parameters,
    sync_fields,
)
from livetrain.board.callbacks_curves import update_curves
from livetrain.board.callbacks_history import update_history
from livetrain.board.callbacks_runs import choose_run, refresh_settings, run_header, start_command
from livetrain.board.context import BoardContext
from livetrain.board.downsample import MAX_POINTS
from livetrain.board.figures import change_description, plotly_text
from livetrain.board.smoothing import ema
from livetrain.db.contract import DEFAULTS, Hyperparameters
from livetrain.db.store import Batch, Store, now

INITIAL = Hyperparameters(**DEFAULTS)


@pytest.fixture
def ctx(store: Store) -> BoardContext:
    return BoardContext.for_store(store)


def new_run(store: Store, name: str = "run") -> int:
    return store.create_run(name, "smallcnn", "mnist5k", {"device": "cpu"}, INITIAL)


def log_steps(
    store: Store, run_id: int, steps: range | list[int],
    overrides: dict[int, dict[str, Any]] | None = None,
) -> None:
    """Statistics rows as the trainer's background writer sends them; `overrides`
    replaces columns of some steps."""
    overrides = overrides or {}
    start = now() - timedelta(seconds=len(steps))
    rows = []
    for i, step in enumerate(steps):
        row = {
            "step": step, "epoch": 1 + step // 1000, "dt": start + timedelta(seconds=i * 0.1),
            "optimizer": "Adam", "learning_rate": 3e-4, "weight_decay": 0.0, "dropout": 50,
            "train_loss": 2.0 / (1 + step / 100), "train_accuracy": min(99.0, step / 10),
            "validate_loss": 2.1 / (1 + step / 100), "validate_accuracy": min(98.0, step / 11),
            "samples_per_second": 900.0,
        }
        rows.append(row | overrides.get(step, {}))
    store.write_batch(run_id, Batch(statistics=rows))


def acknowledge(store: Store, run_id: int, step: int, delay_ms: float) -> int:
    """What train.py's adopt() writes when it applies the current parameters row."""
    p = store.get_parameters(run_id)
    store.write_batch(run_id, Batch(acknowledgements=[{
        "version": p.version, "optimizer": p.optimizer, "learning_rate": p.learning_rate,
        "weight_decay": p.weight_decay, "dropout": p.dropout, "stop_train": p.stop_train,
        "dt_updated": p.dt_updated, "applied_step": step,
        "dt_applied": p.dt_updated + timedelta(milliseconds=delay_ms),
    }]))
    return p.version


def text_of(component: Any) -> str:
    """The visible text of a component tree, as the browser would render it."""
    if component is None:
        return ""
    if isinstance(component, str | int | float):
        return str(component)
    if isinstance(component, list | tuple):
        return " ".join(text_of(c) for c in component)
    return text_of(getattr(component, "children", None))


# -- runs ---------------------------------------------------------------------


def test_empty_database_has_no_runs_and_says_how_to_start_one(ctx: BoardContext) -> None:
    choice = choose_run(ctx, None)
    assert choice.options == [] and choice.value is None
    assert start_command(ctx).startswith("python train.py --db ")


def test_runs_are_newest_first_and_the_newest_live_one_is_chosen(
    ctx: BoardContext, store: Store
) -> None:
    first = new_run(store, "first")
    second = new_run(store, "second")
    finished = new_run(store, "finished")
    store.set_status(finished, "finished", ended=True)
    choice = choose_run(ctx, None)
    assert [o["value"] for o in choice.options] == [finished, second, first]
    assert choice.value == second  # the newest run still running
    assert choose_run(ctx, first).value == first  # the user's choice is kept
    assert "finished" in choice.options[0]["label"]


def test_a_run_without_heartbeat_is_lost(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store)
    later = now() + timedelta(seconds=30)
    choice = choose_run(ctx, None, now=later)
    assert choice.options[0]["label"].endswith("lost")
    header = run_header(ctx, run_id, now=later)
    assert "lost" in text_of(header)


def test_run_names_stay_plain_text(ctx: BoardContext, store: Store) -> None:
    name = "<img src=x onerror=alert(1)> & <b>bold</b>"
    run_id = new_run(store, name)
    label = choose_run(ctx, None).options[0]["label"]
    assert isinstance(label, str) and name in label
    title = run_header(ctx, run_id)[0]
    assert any(isinstance(c, html.H1) and c.children == name for c in title.children)
    assert plotly_text("<b>x</b> & y") == "&lt;b&gt;x&lt;/b&gt; &amp; y"


def test_run_header_shows_progress(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store)
    log_steps(store, run_id, [10, 20])  # 10 steps in 0.1 s
    text = text_of(run_header(ctx, run_id))
    for expected in ("smallcnn", "mnist5k", "cpu", "running", "20", "100.0"):
        assert expected in text


def test_refresh_choices() -> None:
    assert refresh_settings(0) == (True, 60_000)
    assert refresh_settings(1000) == (False, 1000)
    assert refresh_settings(5000) == (False, 5000)


# -- controls -------------------------------------------------------------------


def test_fields_load_the_current_parameters_and_follow_new_versions(
    ctx: BoardContext, store: Store
) -> None:
    run_id = new_run(store)
    first = sync_fields(ctx, run_id, None)
    assert first.values is not None and not first.disabled
    assert (first.values.optimizer, first.values.learning_rate, first.values.dropout) == (
        "Adam", "0.0003", "50")
    assert sync_fields(ctx, run_id, first.state).values is None  # typing is left alone
    store.submit_parameters(run_id, learning_rate=1e-3)  # another tab or a SQL client
    again = sync_fields(ctx, run_id, first.state)
    assert again.values is not None and again.values.learning_rate == "0.001"
    store.set_status(run_id, "finished", ended=True)
    assert sync_fields(ctx, run_id, again.state).disabled


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("learning_rate", ""), ("learning_rate", "abc"), ("learning_rate", "NaN"),
        ("learning_rate", "inf"), ("learning_rate", "1e999"), ("learning_rate", "0"),
        ("learning_rate", "-1e-3"), ("learning_rate", "1.5"), ("weight_decay", "-0.1"),
        ("weight_decay", "2"), ("dropout", "50.5"), ("dropout", "95"), ("dropout", "x"),
        ("optimizer", "Adagrad"),
    ],
)
def test_invalid_values_are_refused_and_nothing_is_written(
    ctx: BoardContext, store: Store, field: str, value: str
) -> None:
    run_id = new_run(store)
    values = {"optimizer": "Adam", "learning_rate": "1e-3", "weight_decay": "0",
              "dropout": "40"} | {field: value}
    errors = field_errors(*values.values())
    assert list(errors) == [field]
    result = submit_parameters(ctx, run_id, *values.values())
    assert result["version"] is None and result["refused"]
    assert store.get_parameters(run_id).version == 1
    assert "not sent" in apply_status(ctx, run_id, result).text


def test_fields_not_loaded_yet_are_not_judged() -> None:
    assert field_errors(None, None, None, None) == {}


def test_submit_writes_a_new_version(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store)
    result = submit_parameters(ctx, run_id, "SGD", "0.01", "0.0005", "20")
    assert result == {"run_id": run_id, "kind": "parameters", "version": 2, "refused": None}
    p = store.get_parameters(run_id)
    assert (p.optimizer, p.learning_rate, p.weight_decay, p.dropout, p.version) == (
        "SGD", 0.01, 0.0005, 20, 2)


def test_two_submits_at_once_land_as_successive_versions(
    ctx: BoardContext, store: Store
) -> None:
    run_id = new_run(store)
    results: list[dict] = []
    barrier = threading.Barrier(2)

    def submit(lr: str) -> None:
        barrier.wait()
        results.append(submit_parameters(ctx, run_id, "Adam", lr, "0", "50"))

    threads = [threading.Thread(target=submit, args=(lr,)) for lr in ("0.001", "0.002")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["version"] for r in results) == [2, 3]
    last = max(results, key=lambda r: r["version"])
    assert store.get_parameters(run_id).version == 3 == last["version"]


def test_a_run_that_is_not_live_refuses_commands(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store)
    store.set_status(run_id, "stopped", ended=True)
    assert "stopped" in submit_parameters(ctx, run_id, "Adam", "0.001", "0", "50")["refused"]
    assert request_stop(ctx, run_id)["refused"]
    assert store.get_parameters(run_id).version == 1


def test_apply_status_from_pending_to_applied(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store)
    assert "Version 1 in force since step 0" in apply_status(ctx, run_id, None).text
    submitted = submit_parameters(ctx, run_id, "Adam", "0.001", "0", "50")
    pending = apply_status(ctx, run_id, submitted)
    assert pending.tone == "pending" and "pending" in pending.text
    acknowledge(store, run_id, step=1230, delay_ms=37)
    applied = apply_status(ctx, run_id, submitted)
    assert applied.tone == "ok"
    assert "applied at step 1230, 37 ms after submit" in applied.text


def test_apply_status_when_the_trainer_skipped_a_version(
    ctx: BoardContext, store: Store
) -> None:
    run_id = new_run(store)
    first = submit_parameters(ctx, run_id, "Adam", "0.001", "0", "50")
    submit_parameters(ctx, run_id, "Adam", "0.002", "0", "50")
    acknowledge(store, run_id, step=40, delay_ms=5)  # the listener handed over only v3
    assert "superseded by version 3, applied at step 40" in apply_status(ctx, run_id, first).text


def test_apply_status_reports_a_rejection(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store)
    submitted = submit_parameters(ctx, run_id, "Adam", "0.001", "0", "50")
    store.add_event(run_id, "warning", "parameters_rejected",
                    "version 2 ignored: the model cannot take it", step=7, version=2)
    status = apply_status(ctx, run_id, submitted)
    assert status.tone == "error" and "rejected" in status.text and "cannot take it" in status.text


def test_apply_status_does_not_wait_for_a_run_that_is_gone(
    ctx: BoardContext, store: Store
) -> None:
    run_id = new_run(store)
    submitted = submit_parameters(ctx, run_id, "Adam", "0.001", "0", "50")
    lost = apply_status(ctx, run_id, submitted, now=now() + timedelta(seconds=60))
    assert "lost" in lost.text
    store.set_status(run_id, "failed", ended=True)
    assert "will not be applied: the run is failed" in apply_status(ctx, run_id, submitted).text


def test_stop_request(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store)
    result = request_stop(ctx, run_id)
    assert result["kind"] == "stop" and result["version"] == 2
    p = store.get_parameters(run_id)
    assert p.stop_train and p.learning_rate == DEFAULTS["learning_rate"]
    acknowledge(store, run_id, step=99, delay_ms=12)
    assert "Stop request (version 2) applied at step 99" in apply_status(ctx, run_id, result).text


def test_lr_slider_is_log_scale() -> None:
    assert lr_to_slider("1e-3") == -3.0
    assert lr_to_slider("3e-4") == -3.52
    assert lr_to_slider("abc") is None and lr_to_slider("0") is None
    assert slider_to_lr(-2.0, "0.0003") == "0.01"
    assert slider_to_lr(-3.52, "3e-4") is None  # the text moved the slider; keep the text


# -- curves ---------------------------------------------------------------------


def test_curves_build_once_then_extend_with_new_rows_only(
    ctx: BoardContext, store: Store
) -> None:
    run_id = new_run(store)
    log_steps(store, run_id, range(10, 310, 10))
    full = update_curves(ctx, run_id, 0.6, False, None)
    assert full is not None and full.loss_figure is not None and full.loss_extend is None
    train = full.loss_figure["data"][0]
    assert train["x"] == list(range(10, 310, 10))
    assert train["line"]["color"] == "#d62728"
    assert full.loss_figure["data"][2]["line"]["color"] == "#1f77b4"
    assert full.state["last_step"] == 300

    assert update_curves(ctx, run_id, 0.6, False, full.state) is None  # nothing new

    log_steps(store, run_id, [310, 320])
    refresh = update_curves(ctx, run_id, 0.6, False, full.state)
    assert refresh is not None and refresh.loss_figure is None
    update, traces = refresh.loss_extend
    assert traces == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # the loss graph's noise bands too
    assert refresh.accuracy_extend[1] == [0, 1, 2, 3, 4]
    assert update["x"][0] == [310, 320] and update["x"][4] == []
    assert refresh.state["last_step"] == 320

    # The smoothing carried across the refresh equals smoothing the whole run.
    rows = ctx.queries.curve_points(run_id, -1, 10_000)
    whole, _ = ema([r[1] for r in rows], 0.6)
    assert update["y"][1] == pytest.approx(whole[-2:])

    rebuilt = update_curves(ctx, run_id, 0.9, False, refresh.state)  # smoothing changed
    assert rebuilt is not None and rebuilt.loss_figure is not None
    log_y = update_curves(ctx, run_id, 0.9, True, rebuilt.state)
    assert log_y is not None and log_y.loss_figure["layout"]["yaxis"]["type"] == "log"


def test_applied_changes_become_markers(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store)
    log_steps(store, run_id, range(10, 110, 10))
    state = update_curves(ctx, run_id, 0.0, False, None).state
    store.submit_parameters(run_id, learning_rate=1e-3)
    acknowledge(store, run_id, step=100, delay_ms=20)
    refresh = update_curves(ctx, run_id, 0.0, False, state)
    update, _ = refresh.loss_extend
    assert set(update["x"][4]) == {100, None}
    assert "v2 at step 100: learning_rate 0.0003 → 0.001" in update["text"][4][0]
    full = update_curves(ctx, run_id, 0.0, False, None)
    assert "learning_rate 0.0003 → 0.001" in full.loss_figure["data"][4]["text"][0]


def test_a_long_run_is_downsampled_and_keeps_its_spikes(
    ctx: BoardContext, store: Store
) -> None:
    run_id = new_run(store)
    steps = list(range(1, 20_001))
    log_steps(store, run_id, steps, {12_345: {"train_loss": 1e6},
                                      15_000: {"validate_loss": math.nan}})
    full = update_curves(ctx, run_id, 0.6, False, None)
    for trace in full.loss_figure["data"][:4] + full.accuracy_figure["data"][:4]:
        assert len(trace["x"]) <= MAX_POINTS
    raw_train = full.loss_figure["data"][0]
    assert raw_train["y"][raw_train["x"].index(12_345)] == 1e6
    raw_val = full.loss_figure["data"][2]
    assert None in raw_val["y"]  # the NaN survives as a gap
    assert full.state["last_step"] == 20_000


def test_a_rollback_redraws_the_live_path(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store)
    log_steps(store, run_id, range(10, 310, 10))
    state = update_curves(ctx, run_id, 0.6, False, None).state
    # The trainer restored step 100: later rows move to abandoned_statistics, and the
    # new branch logs steps the page already drew from the old one.
    store.write_batch(run_id, Batch(abandon_after=100))
    log_steps(store, run_id, [110, 120], {110: {"train_loss": 9.0}})
    update = update_curves(ctx, run_id, 0.6, False, state)
    assert update.loss_figure is not None  # rebuilt, not extended past a cut branch
    raw = update.loss_figure["data"][0]
    assert raw["x"] == [*range(10, 110, 10), 110, 120] and raw["y"][-2] == 9.0
    assert update_curves(ctx, run_id, 0.6, False, update.state) is None


def test_change_markers_say_what_changed_besides_the_learning_rate() -> None:
    before = {"version": 2, "applied_step": 10, "optimizer": "Adam", "learning_rate": 1e-3,
              "weight_decay": 0.0, "dropout": 50, "grad_clip": 0.0, "stop_train": False,
              "pause_train": False, "rollback_step": None}
    clip = before | {"version": 3, "applied_step": 20, "grad_clip": 1.0}
    assert change_description(clip, before) == "v3 at step 20: grad_clip 0 → 1"
    paused = clip | {"version": 4, "pause_train": True}
    assert change_description(paused, clip) == "v4 at step 20: paused"
    rolled = clip | {"version": 5, "rollback_step": 5}
    assert change_description(rolled, paused) == "v5 at step 20: resumed, rolled back to step 5"


# -- history and activations --------------------------------------------------------


def test_history_lists_changes_and_events_newest_first_then_prepends(
    ctx: BoardContext, store: Store
) -> None:
    run_id = new_run(store)
    store.add_event(run_id, "info", "run_started", "<b>started</b> & <i>ok</i>", step=0)
    full = update_history(ctx, run_id, None)
    assert full.replace and len(full.changes) == 1 and len(full.events) == 1
    assert "initial" in text_of(full.changes[0])
    message = full.events[0].children[-1]
    assert message.children == "<b>started</b> & <i>ok</i>"  # a text node, never HTML
    assert update_history(ctx, run_id, full.state) is None

    store.submit_parameters(run_id, learning_rate=1e-3, optimizer="SGD")
    acknowledge(store, run_id, step=500, delay_ms=42)
    store.add_event(run_id, "info", "parameters_applied", "version 2 applied", step=500,
                    version=2)
    refresh = update_history(ctx, run_id, full.state)
    assert not refresh.replace and len(refresh.changes) == 1 and len(refresh.events) == 1
    row = text_of(refresh.changes[0])
    for expected in ("v2", "500", "SGD", "0.001", "42 ms"):
        assert expected in row
    assert refresh.state["version"] == 2


def test_activations_show_every_layer_of_the_latest_step(
    ctx: BoardContext, store: Store
) -> None:
    run_id = new_run(store)

    def layers(step: int, count: int) -> list[dict]:
        return [
            {"step": step, "layer_name": f"features.{i}", "nn_part": "features",
             "layer_type": "conv" if i < count - 2 else "fc", "number": i,
             "bin_edges": [0.0, 0.5, 1.0], "counts": [i, step], "mean": 0.5, "std": 0.1}
            for i in range(count)
        ]

    assert update_activations(ctx, run_id, None).figure["data"] == []
    store.write_batch(run_id, Batch(activations=layers(10, 3) + layers(20, 11)))
    update = update_activations(ctx, run_id, None)
    assert len(update.figure["data"]) == 11  # not hard-coded to eight
    assert all(t["y"][1] == 20 for t in update.figure["data"])
    assert update.label == "step 20 · 11 layers"
    assert update_activations(ctx, run_id, update.state) is None


def test_activations_follow_the_models_forward_order(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store)
    names = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "fc"]  # a ResNet's order
    store.write_batch(run_id, Batch(
        model_layers=[
            {"position": i, "layer_name": name, "layer_type": "Linear" if name == "fc"
             else "Conv2d", "output_shape": "1", "parameters": 1, "trainable": 1,
             "monitored": True}
            for i, name in enumerate(names)
        ],
        activations=[
            {"step": 5, "layer_name": name, "nn_part": name.split(".")[0],
             "layer_type": "fc" if name == "fc" else "conv", "number": 0,
             "bin_edges": [0.0, 1.0], "counts": [1], "mean": 0.0, "std": 0.0}
            for name in reversed(names)
        ],
    ))
    figure = update_activations(ctx, run_id, None).figure
    assert [t["name"] for t in figure["data"]] == names


def test_each_change_wakes_only_the_panels_it_concerns(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store)
    row = {"epoch": 1, "optimizer": "Adam", "learning_rate": 3e-4, "weight_decay": 0.0,
           "dropout": 50, "train_loss": 1.0}
    store.write_batch(run_id, Batch(statistics=[{"step": 10, "dt": now(), **row}],
                                    heartbeat=now()))
    step, control, events = change_tokens(ctx, run_id)
    assert change_tokens(ctx, run_id) == (step, control, events)  # nothing new: nothing fires

    store.write_batch(run_id, Batch(statistics=[{"step": 20, "dt": now(), **row}]))
    new = change_tokens(ctx, run_id)
    assert (new[0] != step, new[1] == control, new[2] == events) == (True, True, True)

    store.submit_parameters(run_id, learning_rate=1e-3)
    newer = change_tokens(ctx, run_id)
    assert (newer[0] == new[0], newer[1] != new[1], newer[2] == new[2]) == (True, True, True)

    store.write_batch(run_id, Batch(events=[{"level": "info", "code": "x", "message": "m",
                                             "step": 20, "dt": now()}]))
    latest = change_tokens(ctx, run_id)
    assert (latest[0] == newer[0], latest[1] == newer[1], latest[2] != newer[2]) == (
        True, True, True)

    other = new_run(store, "other")  # another run: every panel redraws once
    assert all(a != b for a, b in zip(change_tokens(ctx, other), latest, strict=True))
    assert change_tokens(ctx, None) == ({"run_id": None},) * 3
