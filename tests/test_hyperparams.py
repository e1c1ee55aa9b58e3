"""The one validation shared by board, trainer and schema, fuzzed."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, insert, text
from sqlalchemy.exc import IntegrityError

from livetrain.db.contract import DROPOUT_MAX, LR_MAX, OPTIMIZERS, WEIGHT_DECAY_MAX, validate
from livetrain.db.schema import metadata, parameters, runs

anything = st.one_of(
    st.none(), st.booleans(), st.text(max_size=12), st.integers(), st.floats(),
    st.sampled_from(["", "nan", "inf", "-inf", "1e999", "-0.1", "0", "3e-4", "50", "abc"]),
)


@given(optimizer=anything | st.sampled_from(OPTIMIZERS), lr=anything, wd=anything, dp=anything)
def test_validate_never_raises_and_accepts_only_the_contract(optimizer, lr, wd, dp) -> None:
    parsed, errors = validate(optimizer, lr, wd, dp)
    assert (parsed is None) == bool(errors)
    if parsed is not None:
        assert parsed.optimizer in OPTIMIZERS
        assert math.isfinite(parsed.learning_rate) and 0 < parsed.learning_rate <= LR_MAX
        assert 0 <= parsed.weight_decay <= WEIGHT_DECAY_MAX
        assert isinstance(parsed.dropout, int) and 0 <= parsed.dropout <= DROPOUT_MAX


def test_refuses_what_a_user_might_type() -> None:
    for lr in ["", "abc", "1e999", "-0.1", "0", "NaN", "inf", None, True]:
        assert "learning_rate" in validate("Adam", lr, 0, 50)[1], lr
    assert "dropout" in validate("Adam", 1e-3, 0, 150)[1]
    assert "dropout" in validate("Adam", 1e-3, 0, 12.5)[1]
    assert "optimizer" in validate("Adagrad", 1e-3, 0, 50)[1]
    assert validate("SGD+Nesterov", "0.01", "0.5", "20")[0].learning_rate == 0.01


_engine = create_engine("sqlite://")
metadata.create_all(_engine)
with _engine.begin() as _conn:
    _conn.execute(insert(runs).values(run_id=1, name="r", model_name="m", dataset="d", config={}))


@settings(max_examples=300, deadline=None)
@given(
    optimizer=st.sampled_from([*OPTIMIZERS, "Adagrad", "adam"]),
    lr=st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1.0, 1e-9]),
    wd=st.floats(allow_nan=False, allow_infinity=True) | st.sampled_from([0.0, 1.0]),
    dp=st.integers(min_value=-5, max_value=100),
)
def test_python_and_schema_agree(optimizer, lr, wd, dp) -> None:
    """A value the board refuses is one the database refuses, and the reverse."""
    parsed, _ = validate(optimizer, lr, wd, dp)
    try:
        with _engine.begin() as conn:
            conn.execute(insert(parameters).values(
                run_id=1, optimizer=optimizer, learning_rate=lr, weight_decay=wd, dropout=dp))
            conn.execute(text("DELETE FROM parameters"))
        stored = True
    except IntegrityError:
        stored = False
    assert stored == (parsed is not None)
