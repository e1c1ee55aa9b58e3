"""What a callback request may hold: a malformed one is a 400 with a message, not a 500.

The page only ever sends what Dash builds, but a script can send anything. These
checks run after the credential check (dashboard/auth.py) and before Dash dispatches:
the envelope must have Dash's shape; no value may nest deeper than MAX_DEPTH, hold an
integer a database column cannot (|n| >= 2**63) or text with NUL or a lone surrogate;
the fields that name rows (the run, the compared runs, the checkpoint step, an alert's
run and key) and the page's other inputs must have the types the page sends. Client-held
stores (*-state, tokens) must be objects or empty; the callbacks treat their contents
as hints and re-read the database.
"""

from __future__ import annotations

import math
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


def _kind(what: str, allowed: str, test: Callable[[Any], bool]) -> Callable[[Any], None]:
    """A rule: the value is null or passes `test`; `allowed` says what in the message."""
    def check(value: Any) -> None:
        if value is not None and not test(value):
            raise MalformedRequestError(f"{what} must be {allowed} or null")
    return check


def is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def is_texts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def is_count(value: Any) -> bool:
    return is_int(value) and value >= 0


STORES = ("curve-state", "history-state", "activations-state", "fields-state", "submission",
          "alerts-state", "fix-clicks", "layers-state", "insight-state", "histograms-state",
          "system-state", "step-token", "control-token", "events-token", "header-state",
          "run-edit", "run-fields-state", "compare-state")
FIELD_RULES: dict[tuple[str, str], Callable[[Any], None]] = {
    ("run-select", "value"): _row_id("run-select.value", 1),
    ("compare-select", "value"): _run_ids,
    ("checkpoint-select", "value"): _row_id("checkpoint-select.value", 0),
    ("show-hidden", "value"): _kind("show-hidden.value", "a list of strings", is_texts),
    ("log-y", "value"): _kind("log-y.value", "a list of strings", is_texts),
    ("layer-picker", "value"): _kind("layer-picker.value", "a list of strings", is_texts),
    ("histogram-layer", "value"): _kind("histogram-layer.value", "a string",
                                        lambda v: isinstance(v, str)),
    ("optimizer-select", "value"): _kind("optimizer-select.value", "a string",
                                         lambda v: isinstance(v, str)),
    ("refresh-select", "value"): _kind("refresh-select.value", "an integer", is_count),
    ("compare-tick", "data"): _kind("compare-tick.data", "a count", is_count),  # n_intervals
    ("lr-slider", "value"): _kind("lr-slider.value", "a number", is_number),
    ("smoothing-slider", "value"): _kind("smoothing-slider.value", "a number", is_number),
    **{(field, "value"): _kind(f"{field}.value", "a string or a number",
                               lambda v: isinstance(v, str) or is_number(v))
       for field in ("lr-input", "wd-input", "dropout-input", "grad-clip-input")},
    **{(store, "data"): _object(f"{store}.data") for store in STORES},
}
# Click and tick counters, whatever component holds them.
PROPERTY_RULES: dict[str, Callable[[Any], None]] = {
    prop: _kind(prop, "a count", is_count)
    for prop in ("n_clicks", "n_submit", "submit_n_clicks", "n_intervals")
}
# The fields of a pattern-matching id (an alert's fix button, see callbacks_alerts.fix_id).
ID_RULES: dict[str, Callable[[Any], None]] = {
    "run_id": _row_id("an alert's run_id", 1),
    "kind": _kind("an alert's kind", '"alert" or "event"', lambda v: v in ("alert", "event")),
    "key": _kind("an alert's key", "a string", lambda v: isinstance(v, str)),
    "render": _kind("an alert's render", "a count", is_count),
}


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
    if not isinstance(body.get("output"), str) or "callback" not in callbacks.get(
            body["output"], {}):
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
    rule = FIELD_RULES.get((component, item["property"])) if isinstance(component, str) else None
    if with_value and (rule := rule or PROPERTY_RULES.get(item["property"])):
        rule(item.get("value"))


def check_text(text: str) -> None:
    """No NUL (PostgreSQL refuses it in any text) and no lone surrogate (not UTF-8)."""
    if "\x00" in text:
        raise MalformedRequestError("text cannot contain NUL")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise MalformedRequestError("text must be valid Unicode (a lone surrogate)") from error


def check_bounds(value: Any) -> None:
    """MalformedRequestError if `value` nests deeper than MAX_DEPTH, holds an integer beyond
    64 bits (no database column takes it) or text no database takes (check_text).
    Iterative: no recursion to exhaust."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise MalformedRequestError(f"values nest at most {MAX_DEPTH} levels deep")
        if is_int(item) and not -INT64 <= item < INT64:
            raise MalformedRequestError("an integer is out of the 64-bit range")
        if isinstance(item, str):
            check_text(item)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
