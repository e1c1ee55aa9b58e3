"""Hostile callback requests and names (issue 11): a 4xx or a refusal, never a 500.

Every callback of the real app is called through Flask's test client with each of
its inputs and states replaced in turn by a value a script could send; names and
tags with control or invisible characters are refused by the Store and by the board,
on SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from dash import Dash
from test_board_callbacks import log_steps, new_run, text_of

from livetrain.board.app import create_app
from livetrain.board.auth import READ_BODY_BYTES, Credentials
from livetrain.board.callbacks_run_edit import edit_run
from livetrain.board.callbacks_runs import choose_run, run_header
from livetrain.board.context import BoardContext
from livetrain.board.display import NAME_SHOWN
from livetrain.board.request_checks import MalformedRequestError, check_envelope
from livetrain.db.store import Store

HOSTILE = [[1, 2], 10**30, -(10**30), "abc", {"a": 1}, -1, True, 1.5, None, "\x00", [[[]]]]


def dependencies(specs: list[dict[str, Any]], run_id: int) -> list[Any]:
    """What the page would send for these Input/State specs; a pattern-matching (ALL)
    one becomes a list of one matching component."""
    sent: list[Any] = []
    for spec in specs:
        if spec["id"].startswith("{"):
            pattern = json.loads(spec["id"])
            component = {k: (run_id if v == ["ALL"] and k == "run_id" else
                             1 if v == ["ALL"] and k == "render" else
                             "event" if v == ["ALL"] and k == "kind" else
                             "lr" if v == ["ALL"] else v) for k, v in pattern.items()}
            sent.append([{"id": component, "property": spec["property"], "value": None}])
        else:
            value = run_id if spec["id"] == "run-select" else None
            sent.append({"id": spec["id"], "property": spec["property"], "value": value})
    return sent


def outputs(callback_id: str) -> list[Any]:
    found: list[Any] = []
    for part in callback_id.strip(".").split("..."):
        component, prop = part.split("@", 1)[0].rsplit(".", 1)
        if component.startswith("{"):
            found.append([])  # no matching component on the page: an empty list
        else:
            found.append({"id": component, "property": prop})
    return found if callback_id.startswith("..") else found[0]


def requests(app: Dash, run_id: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each server-side callback with each dependency, in turn, set to each hostile value."""
    for callback_id, entry in app.callback_map.items():
        if "callback" not in entry:
            continue  # clientside
        inputs = dependencies(entry["inputs"], run_id)
        state = dependencies(entry["state"], run_id)
        for group in (inputs, state):
            for i in range(len(group)):
                for value in HOSTILE:
                    crafted = json.loads(json.dumps(group))
                    target = crafted[i][0] if isinstance(crafted[i], list) else crafted[i]
                    target["value"] = value
                    body = {"output": callback_id, "outputs": outputs(callback_id),
                            "inputs": crafted if group is inputs else inputs,
                            "state": crafted if group is state else state,
                            "changedPropIds": [f"{target['id']}.{target['property']}"]
                            if isinstance(target["id"], str) else []}
                    yield f"{callback_id} {target['id']} = {value!r}", body


def test_no_crafted_callback_request_gives_a_500(store: Store) -> None:
    run_id = new_run(store, "fuzzed")
    log_steps(store, run_id, range(0, 200, 10))
    app = create_app(BoardContext.for_store(store))
    client = app.server.test_client()
    statuses: dict[int, int] = {}
    for label, body in requests(app, run_id):
        response = client.post("/_dash-update-component", json=body)
        assert response.status_code < 500, (label, response.get_data(as_text=True)[-800:])
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    assert statuses.get(400, 0) > 100 and statuses.get(200, 0) + statuses.get(204, 0) > 100


MALFORMED = [
    "[" * 1000 + "]" * 1000,  # deeper than Python's recursion limit
    "[" * 100 + "]" * 100,  # parses, deeper than the board allows
    '{"output": 1}', "[]", '{"output": "nope.data"}', '"text"', "{", "",
    '{"output": "submission.data", "inputs": "x"}',
    '{"output": "submission.data", "inputs": [{"id": 1, "property": "value"}]}',
    '{"output": "submission.data", "inputs": [{"id": {"type": true}, "property": "x"}]}',
    '{"output": "submission.data", "changedPropIds": [1]}',
    '{"output": "compare-tick.data"}',  # a clientside callback: no server function
]


@pytest.mark.parametrize("body", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_bodies_are_a_400(store: Store, body: str) -> None:
    client = create_app(BoardContext.for_store(store)).server.test_client()
    response = client.post("/_dash-update-component", data=body,
                           content_type="application/json")
    assert response.status_code == 400, response.get_data(as_text=True)[-500:]


def test_the_wrong_content_type_or_an_oversized_body_is_refused(store: Store) -> None:
    client = create_app(BoardContext.for_store(store)).server.test_client()
    assert client.post("/_dash-update-component", data="{}",
                       content_type="text/plain").status_code == 415
    big = b'{"output": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    assert client.post("/_dash-update-component", data=big,
                       content_type="application/json").status_code == 413


BAD_NAMES = ["a\x00b", "\x00", "tab\there", "bell\x07", "del\x7f", "\u200b\u200c\u200d",
             "\ufeff", "\u2060 \u2060", "\u00a0\u3000", "\u202e", "lone \ud800 surrogate",
             "ne\x85l"]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=range(len(BAD_NAMES)))
def test_names_and_tags_with_control_or_only_invisible_characters_are_refused(
    store: Store, bad: str
) -> None:
    run_id = new_run(store, "kept")
    with pytest.raises(ValueError, match=r"control character|empty"):
        store.rename_run(run_id, bad)
    with pytest.raises(ValueError, match=r"control character|empty"):
        store.set_run_tags(run_id, ["fine", bad])
    ctx = BoardContext.for_store(store)
    refused = edit_run(ctx, run_id, "rename", name=bad)
    assert not refused["ok"] and refused["message"].startswith("Not renamed: ")
    edit_run(ctx, run_id, "tags", tags=f"fine, {bad}")  # refused, or a blank piece dropped
    assert store.get_run(run_id)["name"] == "kept"
    assert store.get_run(run_id)["tags"] in (None, [], ["fine"])


def test_visible_unicode_names_are_kept(store: Store) -> None:
    run_id = new_run(store)
    for name in ("pässwörd-run", "学習 率", "emoji 🚀", "a\u200bb", "رَن"):
        assert store.rename_run(run_id, name) == name
        assert store.get_run(run_id)["name"] == name
    assert store.set_run_tags(run_id, ["ünï", "🚀"]) == ["ünï", "🚀"]


def test_a_huge_name_written_by_sql_is_shown_truncated_with_the_full_text_on_hover(
    store: Store
) -> None:
    run_id = new_run(store)
    huge = "N" * 100_000
    store._update_run(run_id, name=huge, tags=["T" * 5_000, "ok"])  # as a SQL client could
    ctx = BoardContext.for_store(store)
    choice = choose_run(ctx, run_id)
    label = choice.options[0]["label"]
    assert len(label) < NAME_SHOWN * 3 and "N" * (NAME_SHOWN - 1) + "…" in label
    header = run_header(ctx, run_id)
    shown = text_of(header)
    assert huge not in shown and "N" * (NAME_SHOWN - 1) + "…" in shown
    assert f'"title": "{"N" * 1000}' in json.dumps(header, default=lambda c: c.to_plotly_json())


def test_what_the_page_sends_passes_the_checks() -> None:
    """The values the page's own components hold (the browser tests send the rest)."""
    callbacks = {"x.data": {"callback": object()}}
    page = [("run-select", "value", 3), ("compare-select", "value", [1, 2]),
            ("checkpoint-select", "value", 0), ("compare-tick", "data", 7),
            ("refresh-select", "value", 2000), ("lr-slider", "value", -3.5),
            ("smoothing-slider", "value", 0.6), ("show-hidden", "value", ["show"]),
            ("lr-input", "value", "3e-4"), ("dropout-input", "value", 50),
            ("submit-params", "n_clicks", 2), ("curve-state", "data", {"run_id": 3}),
            ("histogram-layer", "value", "conv1"), ("layer-picker", "value", ["conv1"])]
    for component, prop, value in page:
        check_envelope({"output": "x.data", "outputs": {"id": "x", "property": "data"},
                        "inputs": [{"id": component, "property": prop, "value": value}],
                        "state": [], "changedPropIds": [f"{component}.{prop}"]}, callbacks)
    with pytest.raises(MalformedRequestError, match="compare-tick"):
        check_envelope({"output": "x.data", "outputs": {"id": "x", "property": "data"},
                        "inputs": [
            {"id": "compare-tick", "property": "data", "value": "7"}]}, callbacks)


def test_an_anonymous_body_is_capped_lower_than_an_authorized_one(store: Store) -> None:
    """A viewer's refresh is a few KB: without credentials a body over 1 MB is refused
    unread; with them the cap is 4 MB."""
    credentials = Credentials("coach", "pässwörd")
    client = create_app(BoardContext.for_store(store), credentials).server.test_client()
    good = "Basic " + base64.b64encode("coach:pässwörd".encode()).decode()
    body = b'{"output": "' + b"x" * (READ_BODY_BYTES + 10) + b'"}'
    sent = {"data": body, "content_type": "application/json"}
    assert client.post("/_dash-update-component", **sent).status_code == 413
    assert client.post("/_dash-update-component", **sent,
                       headers={"Authorization": good}).status_code == 400  # read: not ours
