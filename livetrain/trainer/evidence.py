"""How sure a change in a logged series is: the statistics the health rules decide with.

Every logged loss is a mean, of the interval's per-step losses or of the validation
batches, and comes with its standard error (StepRecord.*_se). A rule asks whether a
rise or a trend stands out from that noise, at a false-alarm rate it states: one-sided
tests at ALPHA per rule and per log, the normal approximation of means of several logs.

The measured standard error can understate the log-to-log noise (the same validation
batches every time, a trajectory that wanders between logs) or be missing (one step
per log, a validation that did not say). So each log's noise is the larger of its
measured standard error and the series' own scatter: the spread of the differences
between successive logs, taken robustly (a median), so that one jump, which may be the
very change under test, does not count as noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from statistics import NormalDist, median

ALPHA = 1e-4  # false alarms per rule per log, under the noise model
MAD_TO_STD = 1.4826  # a normal sample's std over its median absolute deviation
MIN_SCATTER_LOGS = 5  # successive differences needed to estimate a series' own scatter
NOISELESS = 1e-9  # the relative noise given to values that have none


def z_threshold(alpha: float = ALPHA, comparisons: int = 1) -> float:
    """The one-sided z a test must reach; Bonferroni over `comparisons` candidates."""
    return NormalDist().inv_cdf(1.0 - alpha / max(comparisons, 1))


def scatter(values: Sequence[float]) -> float | None:
    """The noise of one value of a series, from its successive differences (None with
    too few): MAD of the differences about their median (a steady trend is not noise),
    over sqrt(2) as a difference holds two values' noise."""
    if len(values) < MIN_SCATTER_LOGS + 1:
        return None
    steps = [b - a for a, b in pairwise(values)]
    centre = median(steps)
    return MAD_TO_STD * median(abs(d - centre) for d in steps) / math.sqrt(2)


def noise(values: Sequence[float], errors: Sequence[float | None]) -> list[float] | None:
    """Each value's noise: the larger of its standard error and the series' scatter.

    None when neither is known for some value: a rule then cannot judge and stays silent.
    A noiseless series still gets a tiny noise, relative to its values, so that a test of
    it divides by something.
    """
    spread = scatter(values)
    sigmas = []
    for value, error in zip(values, errors, strict=True):
        known = [s for s in (error, spread) if s is not None and math.isfinite(s)]
        if not known:
            return None
        sigmas.append(max(*known, NOISELESS * max(1.0, abs(value))))
    return sigmas


@dataclass(frozen=True)
class Estimate:
    """A mean of several logs and its standard error."""

    mean: float
    se: float


def pooled(values: Sequence[float], sigmas: Sequence[float]) -> Estimate:
    """The plain mean of `values` and its standard error given each value's noise."""
    n = len(values)
    return Estimate(sum(values) / n, math.sqrt(sum(s * s for s in sigmas)) / n)


def z_above(later: Estimate, earlier: Estimate) -> float:
    """How many standard errors `later` stands above `earlier` (inf when both exact)."""
    spread = math.hypot(later.se, earlier.se)
    difference = later.mean - earlier.mean
    if spread == 0:
        return math.copysign(math.inf, difference) if difference else 0.0
    return difference / spread


@dataclass(frozen=True)
class Trend:
    """A weighted least-squares line through a series, with the slope's standard error."""

    slope: float
    se: float
    level: float  # the weighted mean of the values


def trend(x: Sequence[float], y: Sequence[float], sigmas: Sequence[float]) -> Trend:
    """Fit y = a + b x weighting each point by 1/sigma^2.

    The slope's standard error is scaled up by the fit's own residual scatter when that
    is larger than the stated noise (chi^2 per degree of freedom > 1): a curve that is
    not a line is less certain than its noise alone says.
    """
    w = [1.0 / (s * s) for s in sigmas]
    total = sum(w)
    x_bar = sum(wi * xi for wi, xi in zip(w, x, strict=True)) / total
    y_bar = sum(wi * yi for wi, yi in zip(w, y, strict=True)) / total
    sxx = sum(wi * (xi - x_bar) ** 2 for wi, xi in zip(w, x, strict=True))
    sxy = sum(wi * (xi - x_bar) * (yi - y_bar) for wi, xi, yi in zip(w, x, y, strict=True))
    slope = sxy / sxx
    residual = sum(wi * (yi - y_bar - slope * (xi - x_bar)) ** 2
                   for wi, xi, yi in zip(w, x, y, strict=True))
    excess = max(1.0, residual / (len(x) - 2)) if len(x) > 2 else 1.0
    return Trend(slope, math.sqrt(excess / sxx), y_bar)
