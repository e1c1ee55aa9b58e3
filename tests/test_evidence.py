"""The statistics the health rules decide with (livetrain.trainer.evidence): the scatter of a
series, each log's noise, the z a test must reach, pooled means and weighted trends.

Seeded random series throughout (random.Random(seed)): the tests are deterministic.
"""

from __future__ import annotations

import math
import random
import statistics
from itertools import pairwise

import pytest

from livetrain.trainer.evidence import (
    ALPHA,
    MAD_EFFICIENCY,
    MIN_DOF,
    MIN_SCATTER_LOGS,
    NOISELESS,
    Estimate,
    noise,
    pooled,
    scatter,
    trend,
    z_above,
    z_threshold,
)

SEEDS = range(200)


def gaussian(seed: int, n: int, sigma: float = 0.3) -> list[float]:
    rng = random.Random(seed)
    return [rng.gauss(0, sigma) for _ in range(n)]


# --- scatter ---------------------------------------------------------------------------------


def test_scatter_of_gaussian_noise_estimates_sigma() -> None:
    """n = 100: within 15 % of sigma for most seeds, not all (a median-based estimate is
    not sharp: its own spread is about 13 % here, seed 0 gives 1.43 sigma), and unbiased:
    the mean over seeds within 3 %."""
    sigma = 0.3
    ratios = [scatter(gaussian(seed, 100, sigma)) / sigma for seed in SEEDS]
    assert statistics.fmean(ratios) == pytest.approx(1.0, abs=0.03)
    assert sum(abs(r - 1) <= 0.15 for r in ratios) >= 2 / 3 * len(ratios)
    assert statistics.stdev(ratios) < 0.15


def test_scatter_ignores_a_linear_trend() -> None:
    """A steady trend is not noise: every difference moves by the same amount, and the
    differences are taken about their median."""
    for seed in range(20):
        noise_only = gaussian(seed, 60)
        trended = [x - 0.05 * i for i, x in enumerate(noise_only)]
        assert scatter(trended) == pytest.approx(scatter(noise_only), rel=1e-9)


def test_scatter_ignores_one_jump() -> None:
    """One jump, which may be the very change a rule tests, is one difference among many:
    however big, it moves the scatter no more than any one difference can (here < 15 %),
    where a standard deviation of the differences grows with it."""
    for seed in SEEDS:
        values = gaussian(seed, 100, 1.0)
        jumped = [x + (10 if i >= 50 else 0) for i, x in enumerate(values)]
        huge = [x + (1000 if i >= 50 else 0) for i, x in enumerate(values)]
        assert scatter(jumped) == pytest.approx(scatter(values), rel=0.15)
        assert scatter(huge) == pytest.approx(scatter(jumped), rel=1e-9)
        plain = statistics.stdev(b - a for a, b in pairwise(huge))
        assert plain > 10 * scatter(huge)


def test_scatter_needs_enough_logs() -> None:
    values = gaussian(0, MIN_SCATTER_LOGS + 1)
    assert scatter(values[:-1]) is None
    assert scatter(values) is not None
    assert scatter([1.0] * 20) == 0.0


# --- noise -----------------------------------------------------------------------------------


def test_noise_is_the_larger_of_the_se_and_the_scatter() -> None:
    values = gaussian(1, 30, 0.3)
    spread = scatter(values)
    assert spread is not None and 0.2 < spread < 0.4
    told = noise(values, [0.1] * 5 + [1.0] * 9 + [None] * 16)
    # fewer than half have a standard error: those without one rest on the scatter alone,
    # and its degrees of freedom go with it
    assert told is not None and told.sigmas == [spread] * 5 + [1.0] * 9 + [spread] * 16
    assert told.dof == pytest.approx(MAD_EFFICIENCY * 29)
    most = noise(values, [0.1] * 10 + [1.0] * 10 + [None] * 10)
    # most have one: the others take the largest of theirs (an epoch's one-step interval)
    assert most is not None and most.sigmas == [spread] * 10 + [1.0] * 20 and most.dof is None
    measured = noise(values, [0.1] * 30)
    assert measured is not None and measured.dof is None


def test_noise_takes_the_scatter_over_the_background() -> None:
    window, background = gaussian(1, 10, 0.3), gaussian(2, 80, 0.1)
    told = noise(window, [None] * 10, background)
    assert told is not None
    assert told.sigmas == [scatter(background)] * 10
    assert told.dof == pytest.approx(MAD_EFFICIENCY * 79)


def test_noise_without_se_or_scatter_is_unknown() -> None:
    values = [1.0, 1.1, 0.9]  # too few logs for a scatter
    assert noise(values, [None, None, None]) is None
    assert noise(values, [None, None, 0.1]) is None  # most cannot be judged: none can
    filled = noise(values, [0.1, None, 0.1])  # one without, among most with: their largest
    assert filled is not None and filled.sigmas == [0.1, 0.1, 0.1] and filled.dof is None
    assert noise(values, [math.nan, 0.2, math.nan]) is None  # not finite: not known
    told = noise(values, [0.1, 0.2, 0.1])
    assert told is not None and told.sigmas == [0.1, 0.2, 0.1] and told.dof is None


def test_a_noiseless_series_gets_a_tiny_relative_noise() -> None:
    assert noise([5.0] * 10, [None] * 10).sigmas == [NOISELESS * 5.0] * 10
    assert noise([0.2] * 10, [0.0] * 10).sigmas == [NOISELESS] * 10  # relative to at least 1


# --- z threshold -----------------------------------------------------------------------------


def test_z_threshold_at_the_documented_rate() -> None:
    assert ALPHA == 1e-4
    assert z_threshold() == z_threshold(ALPHA)
    assert z_threshold(1e-4) == pytest.approx(3.719, abs=1e-3)
    assert z_threshold(0.025) == pytest.approx(1.960, abs=1e-3)


def test_bonferroni_raises_the_threshold() -> None:
    assert z_threshold(comparisons=3) == pytest.approx(z_threshold(ALPHA / 3))
    thresholds = [z_threshold(comparisons=k) for k in range(1, 8)]
    assert thresholds == sorted(thresholds) and len(set(thresholds)) == len(thresholds)
    assert z_threshold(comparisons=0) == z_threshold()


def test_z_threshold_holds_its_rate_on_normal_noise() -> None:
    """Against draws, not the formula: about alpha of N(0, 1) draws exceed z_threshold(alpha)."""
    rng = random.Random(7)
    draws = [rng.gauss(0, 1) for _ in range(200_000)]
    alpha = 0.01
    rate = sum(d > z_threshold(alpha) for d in draws) / len(draws)
    assert rate == pytest.approx(alpha, rel=0.1)


# --- pooled means and z ----------------------------------------------------------------------


def test_pooled_mean_and_its_standard_error() -> None:
    estimate = pooled([1.0, 2.0, 3.0], [0.3, 0.4, 1.2])
    weights = [1 / 0.09, 1 / 0.16, 1 / 1.44]  # inverse variances
    assert estimate.mean == pytest.approx((weights[0] + 2 * weights[1] + 3 * weights[2])
                                          / sum(weights))
    assert estimate.se == pytest.approx(sum(weights) ** -0.5)
    equal = pooled([1.0, 2.0, 3.0], [0.3] * 3)  # equal noise: the plain mean
    assert (equal.mean, equal.se) == (pytest.approx(2.0), pytest.approx(0.3 / 3**0.5))


def test_a_wild_log_barely_moves_a_pooled_mean() -> None:
    """A log whose loss blew up within its interval has a huge spread: it says little."""
    assert pooled([1.0, 1.0, 975.0], [0.1, 0.1, 840.0]).mean == pytest.approx(1.0, abs=1e-3)


def test_student_t_threshold_is_longer_tailed() -> None:
    """Student's t quantiles at p = 1e-4 (scipy.stats.t.ppf): 9.678 at 5 dof, 4.880 at 15,
    4.094 at 40; fewer than MIN_DOF count as MIN_DOF."""
    assert z_threshold(dof=5) == pytest.approx(9.678, rel=0.015)
    assert z_threshold(dof=15) == pytest.approx(4.880, rel=0.01)
    assert z_threshold(dof=40) == pytest.approx(4.094, rel=0.01)
    assert z_threshold(dof=1) == z_threshold(dof=MIN_DOF)
    assert z_threshold(dof=1000) == pytest.approx(z_threshold(), rel=0.01)


def test_z_above() -> None:
    assert z_above(Estimate(1.5, 0.3), Estimate(1.0, 0.4)) == pytest.approx(1.0)
    assert z_above(Estimate(1.0, 0.3), Estimate(1.5, 0.4)) == pytest.approx(-1.0)
    assert z_above(Estimate(2.0, 0.0), Estimate(1.0, 0.0)) == math.inf
    assert z_above(Estimate(1.0, 0.0), Estimate(2.0, 0.0)) == -math.inf
    assert z_above(Estimate(1.0, 0.0), Estimate(1.0, 0.0)) == 0.0


# --- trend -----------------------------------------------------------------------------------


def test_trend_of_an_exact_line() -> None:
    x = list(range(10))
    line = trend(x, [2 + 0.5 * xi for xi in x], [0.1] * 10)
    assert line.slope == pytest.approx(0.5)
    assert line.level == pytest.approx(2 + 0.5 * 4.5)  # the mean, equal weights
    sxx = sum((xi - 4.5) ** 2 for xi in x)  # 82.5
    assert line.se == pytest.approx(0.1 / math.sqrt(sxx))  # the stated noise, no excess


def test_trend_weights_by_the_noise() -> None:
    """A wild point that says it is noisy hardly moves the line."""
    x = list(range(10))
    y = [2 + 0.5 * xi for xi in x]
    y[9] = 100.0
    line = trend(x, y, [0.1] * 9 + [1e3])
    assert line.slope == pytest.approx(0.5, abs=1e-3)


def test_trend_se_covers_the_true_slope() -> None:
    """Noisy lines with their stated noise: the slope within 1.96 se about 95 % of the time
    (a little more: the se only ever grows with excess scatter)."""
    x = [50 * i for i in range(12)]
    covered = []
    for seed in SEEDS:
        rng = random.Random(seed)
        y = [1.0 - 1e-4 * xi + rng.gauss(0, 0.05) for xi in x]
        line = trend(x, y, [0.05] * len(x))
        covered.append(abs(line.slope + 1e-4) <= 1.96 * line.se)
    assert 0.92 <= sum(covered) / len(covered) <= 0.99


def test_trend_se_grows_with_excess_scatter() -> None:
    """A curve with a tiny stated noise: the slope is as uncertain as its residuals say,
    the ordinary least-squares standard error, not the stated noise's."""
    x = [float(i) for i in range(12)]
    y = [(xi - 5.5) ** 2 / 10 + 0.3 * xi for xi in x]
    line = trend(x, y, [1e-3] * len(x))
    fit = statistics.linear_regression(x, y)
    residuals = [yi - fit.intercept - fit.slope * xi for xi, yi in zip(x, y, strict=True)]
    sxx = sum((xi - statistics.fmean(x)) ** 2 for xi in x)
    ols_se = math.sqrt(sum(r * r for r in residuals) / (len(x) - 2) / sxx)
    assert line.slope == pytest.approx(fit.slope)
    assert line.se == pytest.approx(ols_se)
    assert line.se > 10 * 1e-3 / math.sqrt(sxx)
