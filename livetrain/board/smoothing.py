"""TensorBoard's smoothing: a debiased exponential moving average.

The state (last average, points averaged) travels in the page's dcc.Store, so a
refresh smooths only the new points and still matches smoothing the whole run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

SMOOTHING_DEFAULT = 0.6  # TensorBoard's default weight
SMOOTHING_MAX = 0.99


def ema(
    values: Iterable[float | None], weight: float, state: tuple[float, int] = (0.0, 0)
) -> tuple[list[float], tuple[float, int]]:
    """Smoothed values and the state to continue from.

    Non-finite values pass through unchanged and do not poison the average, so
    a NaN loss shows as a gap in the smoothed curve too, as in TensorBoard.
    """
    last, count = state
    out: list[float] = []
    for value in values:
        v = math.nan if value is None else float(value)
        if not math.isfinite(v):
            out.append(v)
            continue
        last = last * weight + (1 - weight) * v
        count += 1
        debias = 1 - weight**count if weight > 0 else 1.0
        out.append(last / debias)
    return out, (last, count)
