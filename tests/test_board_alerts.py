"""Issue 13 on the board: the Alerts panel lists the trainer's episodes (the `alerts`
table), open apart from ended, redraws them as the trainer upserts them, and applies an
episode's fix as its row holds it; against real SQLite and PostgreSQL databases, through
the callbacks' functions and through the Dash endpoint.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from dash import html
from test_board_callbacks import new_run, text_of

from livetrain.board.app import create_app
from livetrain.board.callbacks_alerts import apply_fix, clicked_fix, fix_id, update_alerts
from livetrain.board.callbacks_changes import change_tokens
from livetrain.board.context import BoardContext
from livetrain.db.store import Batch, Store, now


@pytest.fixture
def ctx(store: Store) -> BoardContext:
    return BoardContext.for_store(store)


def episode(alert_id: str, code: str, **columns: Any) -> dict[str, Any]:
    """An alerts row as the trainer upserts it (dt_last moves with every upsert)."""
    return {"alert_id": alert_id, "code": code, "level": "warning", "layer_name": None,
            "status": "open", "first_step": 10, "last_step": 40, "logs": 4,
            "resolved_step": None, "measure": None, "worst_value": None,
            "message": f"{code} holds", "recommendation": None, "fix": None,
            "dt_first": now(), "dt_last": now()} | columns


def opening(code: str, step: int = 10, level: str = "warning") -> dict[str, Any]:
    """The events row the trainer writes when an episode opens (or a one-off log)."""
    return {"level": level, "code": code, "message": f"{code} logged", "step": step,
            "dt": now()}


def groups(update: Any) -> dict[str, list[html.Li]]:
    """{"open" | "resolved" | "other": the group's items}, from the panel's sections."""
    found = {}
    for section in update.groups:
        name = section.className.split("alert-group-")[-1]
        found[name] = section.children[1].children
    return found


def buttons(item: html.Li) -> list[html.Button]:
    return [c for c in item.children if isinstance(c, html.Button)]


def seed(store: Store) -> int:
    run_id = new_run(store)
    store.write_batch(run_id, Batch(
        alerts=[
            episode("ratio:features.3", "update_ratio_high", layer_name="features.3",
                    measure="update:parameter ratio", worst_value=0.05,
                    message="ratio <b>0.05</b> at features.3", recommendation="lower the lr",
                    fix={"learning_rate": 3e-5}),
            episode("rising:1", "loss_rising", first_step=30, last_step=80, logs=6,
                    status="resolved", resolved_step=90, fix={"learning_rate": 1e-4}),
            episode("nan:1", "non_finite", level="error", first_step=60, last_step=60, logs=1,
                    status="rolled_back", resolved_step=20, fix={"learning_rate": 0.01}),
        ],
        events=[opening("update_ratio_high"), opening("loss_rising", 30),
                opening("non_finite", 60, "error"), opening("run_failed", 95, "error"),
                opening("parameters_applied", 50, "info")],
    ))
    return run_id


def test_open_episodes_are_listed_apart_from_ended_ones(ctx: BoardContext, store: Store) -> None:
    run_id = seed(store)
    update = update_alerts(ctx, run_id, None)
    assert update.count == "1 open · 2 resolved · 1 other"
    listed = groups(update)
    assert [text_of(s.children[0]).split()[0] for s in update.groups] == [
        "Open", "Resolved", "Other"]
    [opened] = listed["open"]
    shown = text_of(opened)
    for words in ("update_ratio_high", "features.3", "step 10 → 40", "held for 4 logs",
                  "worst update:parameter ratio 0.05", "lower the lr"):
        assert words in shown
    assert "ratio <b>0.05</b> at features.3" in shown  # a text node, never HTML
    [button] = buttons(opened)
    assert button.children == "Apply: set lr to 3e-05"
    assert button.id == fix_id(run_id, "alert", "ratio:features.3", update.state["render"])

    rising, nan = listed["resolved"]  # the latest log first
    assert "resolved at step 90" in text_of(rising) and "held for 6 logs" in text_of(rising)
    assert not buttons(rising)  # the problem ended by itself: nothing to apply
    assert "rolled back at step 20" in text_of(nan) and "held for 1 log" in text_of(nan)
    assert "1 logs" not in text_of(nan)
    assert "alert-error" in nan.className and buttons(nan)  # the cause may still need it
    assert "alert-ended-item" in rising.className

    # Events an episode stands for are not listed twice; a one-off error still shows.
    [other] = listed["other"]
    assert "run_failed" in text_of(other) and "step 95" in text_of(other)
    assert update_alerts(ctx, run_id, update.state) is None  # nothing changed


def test_an_upserted_episode_is_redrawn(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store)
    first = episode("flat:1", "loss_flat", last_step=10, logs=1, worst_value=2.3,
                    measure="loss")
    store.write_batch(run_id, Batch(alerts=[first], events=[opening("loss_flat")]))
    token = change_tokens(ctx, run_id)[2]
    # The page's copy (JSON) equals a fresh one: an idle tick sends nothing.
    assert json.loads(json.dumps(token)) == change_tokens(ctx, run_id)[2]
    shown = update_alerts(ctx, run_id, None)
    assert "held for 1 log" in text_of(shown.groups)
    assert update_alerts(ctx, run_id, shown.state) is None

    # The trainer's next log finds the condition again: the same row, upserted.
    second = first | {"last_step": 20, "logs": 2, "worst_value": 2.4,
                      "message": "still flat", "dt_last": now()}
    store.write_batch(run_id, Batch(alerts=[second]))
    assert change_tokens(ctx, run_id)[2] != token  # the page is told
    again = update_alerts(ctx, run_id, shown.state)
    assert again is not None and again.state["render"] > shown.state["render"]
    assert [len(items) for items in groups(again).values()] == [1]  # redrawn, not added
    shown_text = text_of(again.groups)
    assert "held for 2 logs" in shown_text and "step 10 → 20" in shown_text
    assert "worst loss 2.4" in shown_text and "still flat" in shown_text

    # Resolved, even by an upsert that left dt_last as it was: it moves to Resolved.
    store.write_batch(run_id, Batch(alerts=[second | {"status": "resolved",
                                                      "resolved_step": 30}]))
    ended = update_alerts(ctx, run_id, again.state)
    assert ended.count == "1 resolved" and "resolved at step 30" in text_of(ended.groups)
    assert update_alerts(ctx, run_id, ended.state) is None

    # Another run is drawn whole; no run, an empty panel.
    other = update_alerts(ctx, new_run(store, "other"), ended.state)
    assert other.groups == [] and other.count == ""
    assert update_alerts(ctx, None, other.state).groups == []


def test_a_fix_is_read_from_the_episode_row(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store)
    row = episode("ratio:fc", "update_ratio_high", fix={"learning_rate": 3e-5})
    store.write_batch(run_id, Batch(alerts=[row]))
    assert "3e-05" in text_of(update_alerts(ctx, run_id, None).groups)
    # The trainer updates the recommendation after the page drew it: the click applies
    # the row's fix as it is now, not the button's words.
    store.write_batch(run_id, Batch(alerts=[row | {"fix": {"learning_rate": 1e-5},
                                                   "logs": 5, "dt_last": now()}]))
    submitted = apply_fix(ctx, run_id, "alert", "ratio:fc")
    assert submitted["refused"] is None and submitted["what"] == '"set lr to 1e-05"'
    assert store.get_parameters(run_id).learning_rate == 1e-5

    other = new_run(store, "other")  # the same alert id in another run, without a fix
    store.write_batch(other, Batch(alerts=[episode("ratio:fc", "update_ratio_high")]))
    assert "no fix" in apply_fix(ctx, other, "alert", "ratio:fc")["refused"]
    assert "no fix" in apply_fix(ctx, run_id, "alert", "missing")["refused"]
    assert "no fix" in apply_fix(ctx, run_id, "event", "not a number")["refused"]
    assert store.get_parameters(other).version == 1
    assert store.get_parameters(run_id).version == 2


def callback_request(app: Any, output_part: str, inputs: list, state: list) -> dict[str, Any]:
    """A request for the callback whose outputs include `output_part`, as the page sends it."""
    output = next(k for k in app.callback_map if output_part in k)
    outputs = [{"id": part.rsplit(".", 1)[0], "property": part.rsplit(".", 1)[1].split("@")[0]}
               for part in output.strip(".").split("...")]
    return {"output": output, "outputs": outputs, "inputs": inputs, "state": state,
            "changedPropIds": []}


def test_the_endpoints_draw_the_panel_and_apply_a_fix(store: Store) -> None:
    run_id = seed(store)
    app = create_app(BoardContext.for_store(store))
    client = app.server.test_client()
    drawn = client.post("/_dash-update-component", json=callback_request(
        app, "alerts-list.children",
        [{"id": "events-token", "property": "data", "value": {"run_id": run_id}}],
        [{"id": "run-select", "property": "value", "value": run_id},
         {"id": "alerts-state", "property": "data", "value": None}]))
    assert drawn.status_code == 200
    response = drawn.get_json()["response"]
    assert response["alerts-count"]["children"] == "1 open · 2 resolved · 1 other"
    body = json.dumps(response["alerts-list"])
    assert "ratio <b>0.05</b> at features.3" in body and "dangerouslySetInnerHTML" not in body
    render = response["alerts-state"]["data"]["render"]

    def click(button_run: int, key: str, seen: dict | None) -> Any:
        button = fix_id(button_run, "alert", key, render)
        return client.post("/_dash-update-component", json=callback_request(
            app, "fix-clicks.data",
            [[{"id": button, "property": "n_clicks", "value": 1}]],
            [{"id": "run-select", "property": "value", "value": run_id},
             {"id": "fix-clicks", "property": "data", "value": seen}]))

    stale = click(run_id + 1, "ratio:features.3", None).get_json()["response"]
    assert "another run" in stale["submission"]["data"]["refused"]
    applied = click(run_id, "ratio:features.3", None).get_json()["response"]
    assert applied["submission"]["data"]["version"] == 2
    assert store.get_parameters(run_id).learning_rate == 3e-5
    # The same click seen again (a redraw, a replay) applies nothing.
    again = click(run_id, "ratio:features.3", applied["fix-clicks"]["data"])
    assert again.status_code == 200 and "submission" not in again.get_json()["response"]
    assert store.get_parameters(run_id).version == 2


def test_page_state_it_did_not_write_is_only_a_hint(ctx: BoardContext, store: Store) -> None:
    """Client-held stores can be crafted: odd contents redraw, they never break."""
    run_id = seed(store)
    for state in ({"run_id": run_id, "render": "x", "mark": 5},
                  {"run_id": run_id, "render": 2**62, "mark": None}, {"render": True}):
        update = update_alerts(ctx, run_id, state)
        assert update.count == "1 open · 2 resolved · 1 other"
        assert update.state["render"] == 1
    assert clicked_fix([("a", 1)], {"a": "many"}) == ("a", {"a": 1})
