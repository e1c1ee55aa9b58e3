"""Comparing runs (issue 7): the queries, the figures and the callback logic, on real
SQLite and PostgreSQL databases through the `store` fixture."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event
from test_board_callbacks import acknowledge, log_steps, new_run, text_of

from livetrain.board.callbacks_compare import REBUILD_POINTS, chosen_ids, decode, update_comparison
from livetrain.board.context import BoardContext
from livetrain.board.downsample import MAX_POINTS
from livetrain.board.figures_compare import PALETTE, change_summaries, run_colors, short_number
from livetrain.db.board_queries import COMPARE_MAX
from livetrain.db.store import Batch, Store, now


@pytest.fixture
def ctx(store: Store) -> BoardContext:
    return BoardContext.for_store(store)


@contextmanager
def selects(store: Store) -> Iterator[list[str]]:
    """The SELECT statements sent to the database inside the block."""
    seen: list[str] = []

    def capture(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", capture)
    try:
        yield seen
    finally:
        event.remove(store.engine, "before_cursor_execute", capture)


def three_runs(store: Store) -> list[int]:
    ids = [new_run(store, name) for name in ("alpha", "beta", "gamma")]
    for i, run_id in enumerate(ids):
        log_steps(store, run_id, range(10, 110 + 10 * i, 10))
    return ids


def row_of(update: Any, run_id: int) -> str:
    return next(text_of(r) for r in update.rows if r.to_plotly_json()["props"].get(
        "data-run-id") == str(run_id))


# -- one query per concern ------------------------------------------------------------


def test_three_runs_are_compared_with_one_query_per_concern(
    ctx: BoardContext, store: Store
) -> None:
    ids = three_runs(store)
    with selects(store) as seen:
        built = update_comparison(ctx, ids, None)
    # marks, curve points (the table's figures come from them), parameter histories:
    # each one query for the three runs.
    assert len(seen) == 3, seen
    assert all(" IN (" in q or " IN(" in q for q in seen), seen
    assert built is not None and built.loss_figure is not None and built.shown
    assert built.state["run_ids"] == ids and built.state["live"]

    with selects(store) as seen:
        assert update_comparison(ctx, ids, built.state) is None  # nothing new
    assert len(seen) == 1  # the marks only

    log_steps(store, ids[1], [200, 210])
    with selects(store) as seen:
        refresh = update_comparison(ctx, ids, built.state)
    assert len(seen) == 2  # marks and the new rows: their figures are merged in
    assert refresh is not None and refresh.loss_figure is None
    update, traces = refresh.loss_extend
    assert traces == [2, 3]  # beta's train and validation traces only
    assert update["x"] == [[200, 210], [200, 210]]
    assert refresh.state["runs"][str(ids[1])]["step"] == 210
    assert "210" in row_of(refresh, ids[1])

    store.submit_parameters(ids[2], learning_rate=1e-3)  # a new version, no new rows
    acknowledge(store, ids[2], step=120, delay_ms=5)
    with selects(store) as seen:
        adopted = update_comparison(ctx, ids, refresh.state)
    assert len(seen) == 2  # marks and that run's history
    assert adopted.loss_extend is None and "step 120: lr 3e-4→1e-3" in row_of(adopted, ids[2])


def test_nothing_compared_costs_no_query(ctx: BoardContext, store: Store) -> None:
    ids = three_runs(store)
    with selects(store) as seen:
        assert update_comparison(ctx, [], None) is None
        assert update_comparison(ctx, None, {"run_ids": [], "live": False, "runs": {}}) is None
    assert seen == []
    built = update_comparison(ctx, ids[:2], None)
    with selects(store) as seen:
        cleared = update_comparison(ctx, [], built.state)  # the user emptied the selection
    assert seen == []
    assert cleared is not None and not cleared.shown and cleared.rows == []
    assert cleared.loss_figure["data"] == [] and cleared.state["run_ids"] == []


def test_crafted_selections_are_run_ids_only() -> None:
    assert chosen_ids(["1; DROP TABLE runs", 2, True, 2, 3.5, None, 4]) == [2, 4]
    assert chosen_ids("1,2") == [] and chosen_ids(None) == []
    assert chosen_ids(list(range(1, 50))) == list(range(1, COMPARE_MAX + 1))


# -- the figures ----------------------------------------------------------------------


def test_one_colour_per_run_training_solid_validation_dashed(
    ctx: BoardContext, store: Store
) -> None:
    ids = three_runs(store)
    built = update_comparison(ctx, [ids[2], ids[0]], None)  # the order chosen is kept
    for figure in (built.loss_figure, built.accuracy_figure):
        data = figure["data"]
        assert [t["meta"] for t in data] == [ids[2], ids[2], ids[0], ids[0]]
        assert [t["line"]["dash"] for t in data] == ["solid", "dash"] * 2
        assert [t["name"] for t in data] == ["train", "validation"] * 2
        assert data[0]["line"]["color"] == data[1]["line"]["color"]
        assert data[0]["line"]["color"] != data[2]["line"]["color"]
        assert data[0]["legendgroup"] == data[1]["legendgroup"] != data[2]["legendgroup"]
        assert data[0]["legendgrouptitle"]["text"] == f"#{ids[2]} gamma"
    loss = built.loss_figure["data"]
    assert loss[2]["x"] == list(range(10, 110, 10))
    assert loss[2]["y"] == pytest.approx([2.0 / (1 + s / 100) for s in range(10, 110, 10)])
    assert loss[0]["x"][-1] == 120
    # A run keeps its colour whatever else is compared.
    alone = update_comparison(ctx, [ids[0]], None).loss_figure["data"][0]["line"]["color"]
    assert alone == loss[2]["line"]["color"] == PALETTE[ids[0] % len(PALETTE)]


def test_colours_are_stable_per_run_and_distinct_within_a_comparison() -> None:
    assert run_colors([1, 2, 3]) == {1: 1, 2: 2, 3: 3}
    assert run_colors([2]) == {2: 2}
    clash = run_colors([3, 13, 23])
    assert clash[3] == 3 and len(set(clash.values())) == 3


def test_long_runs_are_downsampled_and_keep_their_spikes(
    ctx: BoardContext, store: Store
) -> None:
    long_run, short_run = new_run(store, "long"), new_run(store, "short")
    log_steps(store, long_run, range(1, 20_001), {12_345: {"train_loss": 1e6}})
    log_steps(store, short_run, range(10, 60, 10))
    built = update_comparison(ctx, [long_run, short_run], None)
    for figure in (built.loss_figure, built.accuracy_figure):
        assert all(len(t["x"]) <= MAX_POINTS for t in figure["data"])
    train = built.loss_figure["data"][0]
    assert train["y"][train["x"].index(12_345)] == 1e6
    assert built.loss_figure["data"][2]["x"] == [10, 20, 30, 40, 50]
    assert built.state["runs"][str(long_run)]["points"] == MAX_POINTS

    # Appended rows grow a trace up to its budget; past it the figure is rebuilt, so the
    # page never holds much more than MAX_POINTS per trace.
    log_steps(store, long_run, range(20_001, 20_001 + REBUILD_POINTS - MAX_POINTS))
    extended = update_comparison(ctx, [long_run, short_run], built.state)
    assert extended.loss_figure is None and extended.loss_extend is not None
    assert extended.state["runs"][str(long_run)]["points"] == REBUILD_POINTS
    log_steps(store, long_run, [30_000])
    rebuilt = update_comparison(ctx, [long_run, short_run], extended.state)
    assert rebuilt.loss_figure is not None
    assert all(len(t["x"]) <= MAX_POINTS for t in rebuilt.loss_figure["data"])


def test_a_rollback_or_a_rename_redraws_the_overlay(ctx: BoardContext, store: Store) -> None:
    ids = three_runs(store)
    built = update_comparison(ctx, ids[:2], None)
    store.rename_run(ids[0], "alpha-renamed")
    renamed = update_comparison(ctx, ids[:2], built.state)
    assert renamed.loss_figure["data"][0]["legendgrouptitle"]["text"] == f"#{ids[0]} alpha-renamed"
    store.write_batch(ids[1], Batch(abandon_after=50))
    cut = update_comparison(ctx, ids[:2], renamed.state)
    assert cut.loss_figure is not None and max(cut.loss_figure["data"][2]["x"]) == 50


# -- the table -----------------------------------------------------------------------


def stat(step: int, val_loss: float | None, val_acc: float | None,
         train_loss: float | None = 1.0) -> dict[int, dict[str, Any]]:
    return {step: {"validate_loss": val_loss, "validate_accuracy": val_acc,
                   "train_loss": train_loss}}


def test_final_and_best_figures_for_crafted_statistics(ctx: BoardContext, store: Store) -> None:
    steady, diverged, silent, empty = (new_run(store, n) for n in
                                       ("steady", "diverged", "silent", "empty"))
    # steady: best loss 0.5 at 30 (not the final 0.7); accuracy 90 reached at 20 and
    # again at 40: the first counts; inf is never best.
    log_steps(store, steady, [10, 20, 30, 40, 50], {
        **stat(10, 2.0, 10.0), **stat(20, 1.0, 90.0), **stat(30, 0.5, 80.0),
        **stat(40, 0.6, 90.0), **stat(50, 0.7, 75.0, train_loss=0.25)})
    # diverged: NaN and inf late; the best are the last finite ones, the final is NaN.
    log_steps(store, diverged, [5, 10, 15], {
        **stat(5, 1.5, 40.0), **stat(10, math.inf, math.inf),
        **stat(15, math.nan, math.nan, train_loss=math.nan)})
    # silent: validation never measured.
    log_steps(store, silent, [1, 2], {**stat(1, None, None), **stat(2, None, None, 3.0)})

    ids = [steady, diverged, silent, empty]
    built = update_comparison(ctx, ids, None)
    summary = {run_id: decode(built.state["runs"][str(run_id)]["summary"]) for run_id in ids}
    assert summary[steady] == {
        "step": 50, "train_loss": 0.25, "validate_loss": 0.7, "validate_accuracy": 75.0,
        "best_loss": 0.5, "best_loss_step": 30, "best_accuracy": 90.0,
        "best_accuracy_step": 20}
    d = summary[diverged]
    assert (d["best_loss"], d["best_loss_step"], d["best_accuracy"],
            d["best_accuracy_step"]) == (1.5, 5, 40.0, 5)
    assert d["step"] == 15
    # SQLite keeps no NaN (it stores NULL): the final value is NaN or missing.
    assert d["validate_loss"] is None or math.isnan(d["validate_loss"])
    s = summary[silent]
    assert (s["step"], s["train_loss"], s["best_loss"], s["best_accuracy"]) == (2, 3.0, None,
                                                                                 None)
    assert summary[empty]["step"] is None and summary[empty]["best_loss"] is None

    assert len(built.rows) == 4
    row = row_of(built, steady)
    for expected in ("steady", "running", "smallcnn", "mnist5k", "50", "0.2500", "0.7000",
                     "75.00 %", "0.5000 step 30", "90.00 % step 20", "start: Adam"):
        assert expected in row, (expected, row)
    assert "1.5000 step 5" in row_of(built, diverged)
    assert "NaN" in row_of(built, diverged) or backend_is_sqlite(store)
    assert row_of(built, empty).count("—") >= 6

    # A refresh merges the new rows' figures into those held: a better loss replaces the
    # best, an equal accuracy does not (the first step it was reached stays).
    log_steps(store, steady, [60, 70], {**stat(60, 0.4, 90.0), **stat(70, 0.45, 85.0)})
    refresh = update_comparison(ctx, ids, built.state)
    merged = decode(refresh.state["runs"][str(steady)]["summary"])
    assert (merged["step"], merged["validate_loss"], merged["best_loss"],
            merged["best_loss_step"], merged["best_accuracy_step"]) == (70, 0.45, 0.4, 60, 20)
    assert merged == decode(update_comparison(ctx, ids, None).state["runs"][str(steady)]
                            ["summary"])  # the same as reading the whole run again


def backend_is_sqlite(store: Store) -> bool:
    return store.dialect == "sqlite"


def test_the_table_shows_each_runs_own_parameter_history(
    ctx: BoardContext, store: Store
) -> None:
    ids = three_runs(store)
    store.submit_parameters(ids[0], learning_rate=1e-3)
    acknowledge(store, ids[0], step=120, delay_ms=10)
    store.submit_parameters(ids[0], optimizer="SGD", dropout=20)
    acknowledge(store, ids[0], step=300, delay_ms=10)
    store.set_run_tags(ids[1], ["lr-sweep", "<b>baseline</b>"])
    built = update_comparison(ctx, ids, None)
    first = row_of(built, ids[0])
    assert "start: Adam, lr 3e-4, wd 0, dropout 50 %" in first
    assert "step 120: lr 3e-4→1e-3" in first
    assert "step 300: opt Adam→SGD, dropout 50 %→20 %" in first
    second = row_of(built, ids[1])
    assert "lr-sweep" in second and "<b>baseline</b>" in second  # a text node, verbatim
    assert "step 120" not in second and "→" not in second


def test_a_compared_run_that_ends_stops_the_refresh(ctx: BoardContext, store: Store) -> None:
    ids = three_runs(store)
    built = update_comparison(ctx, ids[:2], None)
    assert built.state["live"]
    for run_id in ids[:2]:
        store.set_status(run_id, "finished", ended=True)
    ended = update_comparison(ctx, ids[:2], built.state)
    assert ended is not None and not ended.state["live"]  # the browser stops ticking
    assert "finished" in row_of(ended, ids[0])
    assert update_comparison(ctx, ids[:2], ended.state) is None
    # A run whose trainer went silent is lost, not live.
    lost = new_run(store, "lost")
    later = now() + timedelta(seconds=60)
    assert not update_comparison(ctx, [lost], None, now=later).state["live"]


def test_short_numbers_and_change_summaries() -> None:
    assert [short_number(v) for v in (3e-4, 1e-3, 0.05, 0.0, 1.0, 1e-5, 9.996e-4, 50)] == [
        "3e-4", "1e-3", "0.05", "0", "1", "1e-5", "1e-3", "50"]
    base = {"version": 1, "applied_step": 0, "optimizer": "Adam", "learning_rate": 3e-4,
            "weight_decay": 0.0, "dropout": 50, "grad_clip": 0.0, "stop_train": False,
            "pause_train": False, "rollback_step": None}
    changes = [base, base | {"version": 2, "applied_step": 120, "learning_rate": 1e-3},
               base | {"version": 3, "applied_step": 130, "learning_rate": 1e-3,
                       "pause_train": True},
               base | {"version": 4, "applied_step": 130, "learning_rate": 1e-3,
                       "rollback_step": 100, "grad_clip": 1.0},
               base | {"version": 5, "applied_step": 150, "stop_train": True}]
    assert change_summaries(changes) == [
        "start: Adam, lr 3e-4, wd 0, dropout 50 %",
        "step 120: lr 3e-4→1e-3",
        "step 130: paused",
        "step 130: resumed, rolled back to step 100, clip 0→1",
        "step 150: stop",
    ]
