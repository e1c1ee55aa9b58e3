"""The first load of a long run is downsampled without losing its spikes or its NaNs."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from livetrain.board.downsample import downsample, minmax_indices
from livetrain.board.smoothing import ema

values = st.floats(allow_nan=True, allow_infinity=True, width=64)


@settings(max_examples=200, deadline=None)
@given(
    y=arrays(np.float64, st.integers(0, 6000), elements=values),
    max_points=st.integers(8, 2500),
)
def test_minmax_keeps_extremes_and_gaps_within_budget(y: np.ndarray, max_points: int) -> None:
    keep = minmax_indices(y, max_points)
    assert len(keep) <= max_points
    assert np.all(np.diff(keep) > 0)  # sorted, no duplicates: x stays monotonic
    if len(y) == 0:
        return
    assert keep[0] == 0 and keep[-1] == len(y) - 1
    finite = np.isfinite(y)
    if finite.any():
        kept = y[keep]
        assert np.nanmax(np.where(np.isfinite(kept), kept, np.nan)) == y[finite].max()
        assert np.nanmin(np.where(np.isfinite(kept), kept, np.nan)) == y[finite].min()
    if not finite.all():
        assert not np.isfinite(y[keep]).all()  # a divergence stays visible as a gap


def test_a_single_spike_in_fifty_thousand_steps_survives() -> None:
    steps = np.arange(1, 50_001)
    loss = 1.0 / np.sqrt(steps)
    loss[31_337] = 250.0  # one exploding step
    loss[40_000] = math.nan  # and a NaN later on
    x, y = downsample(steps, loss, 2000)
    assert len(x) <= 2000
    assert 250.0 in y and int(x[np.argmax(np.nan_to_num(y))]) == 31_338
    assert np.isnan(y).any()
    assert x[0] == 1 and x[-1] == 50_000


def test_short_series_are_kept_whole() -> None:
    x, y = downsample(np.arange(5), np.array([1.0, 2.0, math.nan, 4.0, 5.0]), 2000)
    assert x.tolist() == [0, 1, 2, 3, 4]
    assert np.isnan(y[2]) and y[4] == 5.0


@settings(max_examples=100, deadline=None)
@given(
    data=st.lists(st.one_of(st.none(), st.floats(-1e6, 1e6), st.just(math.nan)), max_size=60),
    split=st.integers(0, 60),
    weight=st.floats(0.0, 0.99),
)
def test_smoothing_in_pieces_equals_smoothing_at_once(
    data: list[float | None], split: int, weight: float
) -> None:
    whole, _ = ema(data, weight)
    head, state = ema(data[:split], weight)
    tail, _ = ema(data[split:], weight, state)
    np.testing.assert_allclose(head + tail, whole, equal_nan=True)


def test_smoothing_matches_tensorboard_debiasing() -> None:
    smoothed, _ = ema([1.0, 1.0, 1.0], 0.6)
    assert smoothed == [1.0, 1.0, 1.0]  # debiased: a constant stays constant from the start
    raw, _ = ema([3.0, 1.0], 0.0)
    assert raw == [3.0, 1.0]
