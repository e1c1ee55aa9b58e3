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
MAD_EFFICIENCY = 0.37  # a MAD estimate of noise is worth 0.37 of a std's degrees of freedom
MIN_DOF = 5.0  # fewer effective degrees of freedom are counted as this many


def z_threshold(alpha: float = ALPHA, comparisons: int = 1, dof: float | None = None) -> float:
    """The one-sided z a test must reach; Bonferroni over `comparisons` candidates.

    `dof`: the noise was estimated from the series itself with that many degrees of
    freedom, so the test's statistic is Student-t, not normal, and its tail is longer.
    """
    z = NormalDist().inv_cdf(1.0 - alpha / max(comparisons, 1))
    return z if dof is None else student_t_quantile(z, dof)


def student_t_quantile(z: float, dof: float) -> float:
    """The Student-t quantile matching the normal quantile z (Cornish-Fisher expansion,
    Abramowitz & Stegun 26.7.5): within 1.5 % of the exact one from MIN_DOF dof up, at
    the tails the rules use (9.56 for 9.68 at 5 dof, p = 1e-4)."""
    v = max(dof, MIN_DOF)
    terms = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    )
    return z + sum(term / v ** (k + 1) for k, term in enumerate(terms))


def scatter(values: Sequence[float]) -> float | None:
    """The noise of one value of a series, from its successive differences (None with
    too few): MAD of the differences about their median (a steady trend is not noise),
    over sqrt(2) as a difference holds two values' noise."""
    if len(values) < MIN_SCATTER_LOGS + 1:
        return None
    steps = [b - a for a, b in pairwise(values)]
    centre = median(steps)
    return MAD_TO_STD * median(abs(d - centre) for d in steps) / math.sqrt(2)


@dataclass(frozen=True)
class Noise:
    """Each value's noise, and whether some of it is only the series' own scatter."""

    sigmas: list[float]
    dof: float | None  # the scatter's degrees of freedom if any value relies on it, else None


def noise(values: Sequence[float], errors: Sequence[float | None],
          background: Sequence[float] | None = None) -> Noise | None:
    """Each value's noise: the larger of its standard error and the series' scatter.

    The scatter is taken over `background` when given: a longer stretch of the same series
    (the run's recent history) that estimates it better than the window under test alone.
    A value without a standard error, among a majority that have one (an epoch's last
    interval of one step), is given the largest of theirs. None when neither is known for
    some value: a rule then cannot judge and stays silent.
    Where a value has no standard error the scatter alone stands for it, and the scatter
    is itself an estimate: `dof` says how good, for z_threshold. A noiseless series still
    gets a tiny noise, relative to its values, so that a test of it divides by something.
    """
    background = values if background is None else background
    spread = scatter(background)
    known = [e for e in errors if e is not None and math.isfinite(e)]
    if 2 * len(known) >= len(errors):  # a few logs without one (a 1-step epoch end):
        errors = [e if e is not None and math.isfinite(e) else max(known) for e in errors]
    sigmas = []
    for value, error in zip(values, errors, strict=True):
        known = [s for s in (error, spread) if s is not None and math.isfinite(s)]
        if not known:
            return None
        sigmas.append(max(*known, NOISELESS * max(1.0, abs(value))))
    measured = all(e is not None and math.isfinite(e) for e in errors)
    return Noise(sigmas, None if measured else MAD_EFFICIENCY * (len(background) - 1))


@dataclass(frozen=True)
class Estimate:
    """A mean of several logs and its standard error."""

    mean: float
    se: float


def pooled(values: Sequence[float], sigmas: Sequence[float]) -> Estimate:
    """The inverse-variance weighted mean of `values` and its standard error.

    Weighted, not plain: a log whose loss blew up within its interval has a huge spread,
    and says little about the level; a plain mean would let its one wild value decide.
    With equal noise it is the plain mean.
    """
    weights = [1.0 / (s * s) for s in sigmas]
    total = sum(weights)
    return Estimate(sum(w * v for w, v in zip(weights, values, strict=True)) / total,
                    1.0 / math.sqrt(total))


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
