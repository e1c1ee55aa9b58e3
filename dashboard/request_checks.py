"""What a callback request may hold: a malformed one is a 400 with a message, not a 500.

The page only ever sends what Dash builds, but a script can send anything. These
checks run after the credential check (dashboard/auth.py) and before Dash dispatches:
the envelope must have Dash's shape, no value may nest deeper than MAX_DEPTH or hold an
integer a database column cannot (|n| >= 2**63), and the fields that name rows (the
run, the compared runs, the checkpoint step, an alert's event id) must be what the
page sends. Client-held stores (*-state, tokens) must be objects or empty; the
callbacks treat their contents as hints and re-read the database.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from dash import Dash
from flask import Response, abort, request

MAX_DEPTH = 32  # the deepest legitimate value (the comparison's state) is under 8
INT64 = 2**63


class MalformedRequestError(ValueError):
    """Says what is wrong with a callback request, in words for its sender."""


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _row_id(what: str, minimum: int) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value is not None and not (is_int(value) and value >= minimum):
            raise MalformedRequestError(f"{what} must be an integer >= {minimum} or null")
    return check


def _run_ids(value: Any) -> None:
    if value is not None and not (isinstance(value, list) and all(map(is_int, value))):
        raise MalformedRequestError("compare-select.value must be a list of run ids")


def _object(what: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value is not None and not isinstance(value, dict):
            raise MalformedRequestError(f"{what} must be an object or null")
    return check


STORES = ("curve-state", "history-state", "activations-state", "fields-state", "submission",
          "alerts-state", "fix-clicks", "layers-state", "insight-state", "histograms-state",
          "system-state", "step-token", "control-token", "events-token", "header-state",
          "run-edit", "run-fields-state", "compare-state", "compare-tick")
FIELD_RULES: dict[tuple[str, str], Callable[[Any], None]] = {
    ("run-select", "value"): _row_id("run-select.value", 1),
    ("compare-select", "value"): _run_ids,
    ("checkpoint-select", "value"): _row_id("checkpoint-select.value", 0),
    **{(store, "data"): _object(f"{store}.data") for store in STORES},
}
ID_RULES: dict[str, Callable[[Any], None]] = {"event_id": _row_id("an alert's event_id", 1)}


def check_dash_request(app: Dash) -> None:
    """Abort with 400 (or Flask's 400/415 for a body that is not JSON) unless the
    request is a well-formed call of one of `app`'s callbacks."""
    body = request.get_json()
    try:
        check_envelope(body, app.callback_map)
    except MalformedRequestError as error:
        abort(Response(f"MalformedRequestError callback request: {error}.", 400))


def check_envelope(body: Any, callbacks: Mapping[str, Any]) -> None:
    """MalformedRequestError unless `body` is a Dash callback request for one of `callbacks`."""
    check_bounds(body)
    if not isinstance(body, dict):
        raise MalformedRequestError("the body must be a JSON object")
    if not isinstance(body.get("output"), str) or body["output"] not in callbacks:
        raise MalformedRequestError("output names no callback of this board")
    if not isinstance(body.get("changedPropIds", []), list) or not all(
            isinstance(p, str) for p in body.get("changedPropIds", [])):
        raise MalformedRequestError("changedPropIds must be a list of strings")
    outputs = body.get("outputs")
    for item in _flatten("outputs", outputs if isinstance(outputs, list) else [outputs]):
        _check_dependency(item, with_value=False)
    for key in ("inputs", "state"):
        if not isinstance(body.get(key, []), list):
            raise MalformedRequestError(f"{key} must be a list")
        for item in _flatten(key, body.get(key, [])):
            _check_dependency(item, with_value=True)


def _flatten(key: str, items: list[Any]) -> Iterator[Any]:
    """Dependencies in order; a pattern-matching one (ALL) is a list of them."""
    for item in items:
        if isinstance(item, list):
            yield from item
        elif isinstance(item, dict):
            yield item
        else:
            raise MalformedRequestError(f"each of {key} must be an object or a list of them")


def _check_dependency(item: Any, with_value: bool) -> None:
    if not isinstance(item, dict) or not isinstance(item.get("property"), str):
        raise MalformedRequestError("each dependency needs an id and a property")
    component = item.get("id")
    if isinstance(component, dict):
        for key, value in component.items():
            if not isinstance(value, str | int) or isinstance(value, bool):
                raise MalformedRequestError(f"pattern id field {key} is not a string or integer")
            if rule := ID_RULES.get(key):
                rule(value)
    elif not isinstance(component, str):
        raise MalformedRequestError("a dependency's id must be a string or an object")
    elif with_value and (rule := FIELD_RULES.get((component, item["property"]))):
        rule(item.get("value"))


def check_bounds(value: Any) -> None:
    """MalformedRequestError if `value` nests deeper than MAX_DEPTH or holds an integer beyond
    64 bits (no database column takes it). Iterative: no recursion to exhaust."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise MalformedRequestError(f"values nest at most {MAX_DEPTH} levels deep")
        if is_int(item) and not -INT64 <= item < INT64:
            raise MalformedRequestError("an integer is out of the 64-bit range")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
