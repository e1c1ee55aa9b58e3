"""Spike-preserving downsampling for the first load of a long run.

A 50,000-step run drawn as 50,000 points is slow to send and to draw, but an
even stride would skip the one step where the loss exploded. Per bucket of
consecutive points this keeps the minimum and the maximum, and the first
NaN/inf if there is one (drawn as a gap), so every spike and every divergence
stays visible at any zoom-out.
"""

from __future__ import annotations

import math

import numpy as np

MAX_POINTS = 2000


def minmax_indices(y: np.ndarray, max_points: int = MAX_POINTS) -> np.ndarray:
    """Sorted indices into `y` to keep: at most `max_points` (8 or more), first and last
    included."""
    n = len(y)
    if n <= max_points:
        return np.arange(n)
    finite = np.isfinite(y)
    has_gaps = not finite.all()
    per_bucket = 3 if has_gaps else 2
    buckets = max(1, (max_points - 2) // per_bucket)
    width = math.ceil(n / buckets)
    buckets = math.ceil(n / width)
    pad = buckets * width - n
    offsets = np.arange(buckets) * width

    valid = np.concatenate([finite, np.zeros(pad, dtype=bool)]).reshape(buckets, width)
    values = np.concatenate([np.where(finite, y, 0.0), np.zeros(pad)]).reshape(buckets, width)
    any_valid = valid.any(axis=1)
    lows = np.where(valid, values, np.inf).argmin(axis=1) + offsets
    highs = np.where(valid, values, -np.inf).argmax(axis=1) + offsets
    keep = [lows[any_valid], highs[any_valid], np.array([0, n - 1])]
    if has_gaps:
        invalid = np.concatenate([~finite, np.zeros(pad, dtype=bool)]).reshape(buckets, width)
        any_invalid = invalid.any(axis=1)
        keep.append(invalid.argmax(axis=1)[any_invalid] + offsets[any_invalid])
    return np.unique(np.concatenate(keep))


def downsample(
    x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) reduced to at most `max_points` points by min/max per bucket."""
    keep = minmax_indices(np.asarray(y, dtype=float), max_points)
    return np.asarray(x)[keep], np.asarray(y, dtype=float)[keep]
