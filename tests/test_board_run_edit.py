"""Renaming, tagging and hiding runs (issue 7), and each run's own parameters row, on real
SQLite and PostgreSQL databases through the `store` fixture."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select
from test_board_callbacks import new_run, text_of

from livetrain.board.callbacks_controls import submit_parameters
from livetrain.board.callbacks_run_edit import edit_run, parse_tags, sync_run_fields
from livetrain.board.callbacks_runs import choose_run, run_header
from livetrain.board.context import BoardContext
from livetrain.db import schema as s
from livetrain.db.board_queries import RUN_LIST_LIMIT
from livetrain.db.store import RUN_NAME_MAX, TAG_MAX, TAGS_MAX, Store


@pytest.fixture
def ctx(store: Store) -> BoardContext:
    return BoardContext.for_store(store)


def rows(store: Store, table: Any) -> list[dict[str, Any]]:
    """Every row of a table, by run: what a write must leave alone."""
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(table).order_by(table.c.run_id))]


# -- the Store's rules --------------------------------------------------------------------


def test_rename_strips_and_refuses_empty_or_long_names(store: Store) -> None:
    run_id = new_run(store, "first")
    assert store.rename_run(run_id, "  lr 1e-3, no dropout \n") == "lr 1e-3, no dropout"
    assert store.get_run(run_id)["name"] == "lr 1e-3, no dropout"
    assert store.rename_run(run_id, "x" * RUN_NAME_MAX) == "x" * RUN_NAME_MAX
    for bad in ("", "   \t", "y" * (RUN_NAME_MAX + 1), None, 12):
        with pytest.raises(ValueError):
            store.rename_run(run_id, bad)
    assert store.get_run(run_id)["name"] == "x" * RUN_NAME_MAX  # nothing was written
    with pytest.raises(KeyError):
        store.rename_run(run_id + 100, "ghost")


def test_tags_are_stripped_deduplicated_and_bounded(store: Store) -> None:
    run_id = new_run(store)
    assert store.set_run_tags(run_id, [" lr-sweep ", "baseline", "lr-sweep"]) == [
        "lr-sweep", "baseline"]
    assert store.get_run(run_id)["tags"] == ["lr-sweep", "baseline"]
    assert store.set_run_tags(run_id, ["t"] * 50) == ["t"]  # 50 given, one after dedupe
    assert store.set_run_tags(run_id, [f"t{i}" for i in range(TAGS_MAX)])[-1] == "t19"
    for bad in (["ok", ""], ["  "], ["z" * (TAG_MAX + 1)], [f"t{i}" for i in range(TAGS_MAX + 1)],
                ["a,b"], "not-a-list", [1]):
        with pytest.raises(ValueError):
            store.set_run_tags(run_id, bad)
    assert len(store.get_run(run_id)["tags"]) == TAGS_MAX  # unchanged
    assert store.set_run_tags(run_id, []) == []


def test_hide_and_show(store: Store) -> None:
    run_id = new_run(store)
    assert store.get_run(run_id)["hidden"] is False
    store.set_run_hidden(run_id, True)
    assert store.get_run(run_id)["hidden"] is True
    with pytest.raises(ValueError):
        store.set_run_hidden(run_id, "yes")
    store.set_run_hidden(run_id, False)
    assert store.get_run(run_id)["hidden"] is False


def test_bookkeeping_touches_only_its_own_runs_row(store: Store) -> None:
    edited, other = new_run(store, "edited"), new_run(store, "other")
    parameters = rows(store, s.parameters)
    other_run = store.get_run(other)
    store.rename_run(edited, "renamed")
    store.set_run_tags(edited, ["a"])
    store.set_run_hidden(edited, True)
    assert rows(store, s.parameters) == parameters  # no parameters row moved, not even a version
    assert store.get_run(other) == other_run
    run = store.get_run(edited)
    assert (run["name"], run["tags"], run["hidden"]) == ("renamed", ["a"], True)


def test_a_submit_never_touches_another_runs_parameters(ctx: BoardContext, store: Store) -> None:
    steered, other = new_run(store, "steered"), new_run(store, "other")
    before = store.get_parameters(other)
    result = submit_parameters(ctx, steered, "SGD", "0.01", "0.0005", "20")
    assert result["version"] == 2
    assert store.get_parameters(other) == before  # every column, dt_updated included
    p = store.get_parameters(steered)
    assert (p.optimizer, p.learning_rate, p.version) == ("SGD", 0.01, 2)
    assert [c["version"] for c in store.parameter_changes(other)] == [1]


# -- the board's callbacks ---------------------------------------------------------------------


def test_rename_tag_and_hide_from_the_board(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store, "before")
    renamed = edit_run(ctx, run_id, "rename", "  after  ")
    assert renamed["ok"] and renamed["message"] == "Renamed to “after”."
    assert store.get_run(run_id)["name"] == "after"

    tagged = edit_run(ctx, run_id, "tags", tags="lr-sweep, baseline, lr-sweep,")
    assert tagged["ok"] and store.get_run(run_id)["tags"] == ["lr-sweep", "baseline"]
    assert edit_run(ctx, run_id, "tags", tags="  ")["message"] == "Tags cleared."

    hidden = edit_run(ctx, run_id, "hide")
    assert hidden["ok"] and store.get_run(run_id)["hidden"]
    shown = edit_run(ctx, run_id, "hide")
    assert shown["ok"] and not store.get_run(run_id)["hidden"]


@pytest.mark.parametrize(("action", "name", "tags", "reason"), [
    ("rename", "", None, "cannot be empty"),
    ("rename", "   ", None, "cannot be empty"),
    ("rename", "n" * 201, None, "at most 200 characters"),
    ("tags", None, "ok, " + "t" * 41, "at most 40 characters"),
    ("tags", None, ", ".join(f"t{i}" for i in range(21)), "at most 20 tags"),
    ("drop", "x", None, "Unknown action"),
])
def test_invalid_input_is_explained_and_nothing_is_written(
    ctx: BoardContext, store: Store, action: str, name: Any, tags: Any, reason: str
) -> None:
    run_id = new_run(store, "kept")
    store.set_run_tags(run_id, ["kept"])
    before = store.get_run(run_id)
    result = edit_run(ctx, run_id, action, name, tags)
    assert not result["ok"] and reason in result["message"]
    assert store.get_run(run_id) == before


def test_a_run_that_is_gone_is_refused(ctx: BoardContext, store: Store) -> None:
    assert edit_run(ctx, None, "rename", "x")["message"] == "No run selected."
    assert not edit_run(ctx, 99, "hide")["ok"]


def test_parse_tags() -> None:
    assert parse_tags(" a , b,,c, ") == ["a", "b", "c"]
    assert parse_tags("") == [] and parse_tags(None) == []


def test_the_fields_load_the_run_and_leave_typing_alone(ctx: BoardContext,
                                                        store: Store) -> None:
    run_id = new_run(store, "named")
    store.set_run_tags(run_id, ["a", "b"])
    first = sync_run_fields(ctx, run_id, None)
    assert (first.name, first.tags, first.hide_label, first.disabled) == (
        "named", "a, b", "Hide run", False)
    assert sync_run_fields(ctx, run_id, first.state).name is None  # typing is left alone
    store.rename_run(run_id, "from psql")  # another tab or a SQL client
    store.set_run_hidden(run_id, True)
    again = sync_run_fields(ctx, run_id, first.state)
    assert (again.name, again.hide_label) == ("from psql", "Unhide run")
    assert sync_run_fields(ctx, None, None).disabled


def test_hidden_runs_leave_the_lists_unless_asked_for(ctx: BoardContext, store: Store) -> None:
    first, second, third = (new_run(store, n) for n in ("first", "second", "third"))
    store.set_run_tags(second, ["lr-sweep", "baseline"])
    labels = {o["value"]: o["label"] for o in choose_run(ctx, first).options}
    assert labels[second] == f"#{second}  second  [lr-sweep, baseline]  ·  running"

    store.set_run_hidden(second, True)
    choice = choose_run(ctx, first)
    assert [o["value"] for o in choice.options] == [third, first]
    assert [o["value"] for o in choice.compare_options] == [first, third]  # watched first
    assert choice.compare_options[0]["label"].endswith("·  watching")

    shown = choose_run(ctx, first, show_hidden=True)
    assert [o["value"] for o in shown.options] == [third, second, first]
    assert "(hidden)" in shown.options[1]["label"]

    # The run being watched stays selectable while hidden; compared runs stay comparable.
    kept = choose_run(ctx, second)
    assert kept.value == second and second in [o["value"] for o in kept.options]
    compared = choose_run(ctx, first, compared=[second])
    assert second not in [o["value"] for o in compared.options]
    assert second in [o["value"] for o in compared.compare_options]


def test_a_database_of_hidden_runs_still_shows_one(ctx: BoardContext, store: Store) -> None:
    only = new_run(store, "only")
    store.set_run_hidden(only, True)
    choice = choose_run(ctx, None)
    assert choice.value == only and [o["value"] for o in choice.options] == [only]


def test_the_header_shows_tags_and_hidden(ctx: BoardContext, store: Store) -> None:
    run_id = new_run(store, "tagged")
    store.set_run_tags(run_id, ["<i>x</i>"])
    store.set_run_hidden(run_id, True)
    title = run_header(ctx, run_id)[0]
    spans = [c.children for c in title.children if getattr(c, "className", "") == "tag"]
    assert spans == ["<i>x</i>"]  # a text node, never HTML
    assert "hidden" in text_of(title)


def test_runs_in_view_stay_listed_beyond_the_lists_length(ctx: BoardContext,
                                                          store: Store) -> None:
    """The run watched and the runs compared stay selectable when newer runs push them
    past the list's length (the dropdowns would otherwise drop them from their value)."""
    old, compared = new_run(store, "old"), new_run(store, "compared")
    for i in range(RUN_LIST_LIMIT):
        new_run(store, f"newer {i}")
    assert old not in [o["value"] for o in choose_run(ctx, None).options]
    choice = choose_run(ctx, old, compared=[compared])
    assert choice.value == old
    assert [o["value"] for o in choice.options][-1:] == [old]
    listed = [o["value"] for o in choice.compare_options]
    assert listed[0] == old and listed[-1] == compared  # the watched run first
    assert compared not in [o["value"] for o in choice.options]
