"""The training-health rules on synthetic telemetry, through the Diagnostician: each fires on
its pathology, stays silent on healthy (and noisy but healthy) series, and one problem is one
alert (an episode, opened once).

Two kinds of tests. Scenarios start from a healthy run (loss falling from ln 10 to 0.3, ratios
around 1e-3, activation stds 0.6-1.5, dead fractions below 0.2, gradient norms within +-30 %)
and break one thing, so any other alert would be a false alarm. The noise tests (issue 13,
at the end) feed the loss rules many seeded random series at several noise levels: healthy
noise stays within the documented false-alarm rate, and a real rise of 3x the noise fires.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cache
from itertools import pairwise

import pytest

from livetrain.trainer import diagnostics, evidence
from livetrain.trainer.diagnostician import Diagnostician
from livetrain.trainer.diagnostics import (
    ACTIVATION_STD_FACTOR,
    ACTIVATION_STD_HIGH,
    ACTIVATION_STD_LOW,
    ACTIVATION_STD_MILD,
    BLOWN_UP_SPREAD,
    DEAD_FAR_FRACTION,
    DEAD_RELU_FRACTION,
    FAR_DECADES,
    FLAT_FALL,
    FLAT_LOGS,
    FLAT_STEPS,
    GRADIENT_BASELINE_LOGS,
    GRADIENT_BASELINE_MIN_LOGS,
    GRADIENT_SPIKE_FACTOR,
    GRADIENT_SPIKE_Z,
    HISTORY_LOGS,
    INITIAL_LOSS_TOLERANCE,
    LOSS_RISING_FRACTION,
    MIN_PERSIST_LOGS,
    OVERFIT_RECENT_LOGS,
    OVERFIT_RISE,
    PERSIST_LOGS,
    PERSIST_STEPS,
    RISING_RECENT_LOGS,
    RISING_REFERENCE_MIN_LOGS,
    UPDATE_RATIO_FAR,
    UPDATE_RATIO_HIGH,
    UPDATE_RATIO_LOW,
    UPDATE_RATIO_MILD,
    UPDATE_RATIO_PEAK,
    WARMUP_STEPS,
    Finding,
    LayerRecord,
    StepRecord,
)
from livetrain.trainer.episodes import RESOLVE_AFTER_LOGS, AlertChange
from livetrain.trainer.evidence import ALPHA

LN10 = math.log(10)
LR = 3e-4
EVERY = 50  # steps between logs
NAMES = ("features.0", "features.4", "classifier.1", "classifier.4")  # the small CNN's
LOGITS = "classifier.4"
GRAD_SCALE = {"features.0": 0.4, "features.4": 1.2, "classifier.1": 3.0, "classifier.4": 1.5}


def healthy_layers(rng: random.Random, step: int) -> tuple[LayerRecord, ...]:
    layers = []
    for name in NAMES:
        relu = name != LOGITS
        layers.append(
            LayerRecord(
                name=name,
                act_mean=rng.uniform(0.3, 1.0),
                act_std=rng.uniform(0.6, 1.5),
                zero_fraction=rng.uniform(0.3, 0.6) if relu else 0.0,
                dead_fraction=rng.uniform(0.0, 0.2) if relu else 0.0,
                grad_norm=math.nan if step == 0 else GRAD_SCALE[name] * rng.uniform(0.7, 1.3),
                update_ratio=math.nan if step == 0 else 10 ** rng.uniform(-3.5, -2.5),
                has_nonlinearity=relu,
            )
        )
    return tuple(layers)


def healthy_run(
    logs: int = 60, seed: int = 0, noise: float = 0.02, every: int = EVERY
) -> list[StepRecord]:
    """A step-0 record then logs-1 trained ones, the loss falling smoothly from ln 10 to 0.3,
    with uniform relative noise and no measured standard errors (the rules use the scatter)."""
    rng = random.Random(seed)
    records = [
        StepRecord(
            0, math.nan, LN10 * rng.uniform(0.99, 1.01), LR, "Adam", 0.0, 50, healthy_layers(rng, 0)
        )
    ]
    for i in range(1, logs):
        loss = LN10 * (0.3 / LN10) ** (i / (logs - 1))
        records.append(
            StepRecord(
                step=i * every,
                train_loss=loss * (1 + rng.uniform(-noise, noise)),
                validate_loss=0.9 * loss * (1 + rng.uniform(-noise, noise)),
                learning_rate=LR,
                optimizer="Adam",
                weight_decay=0.0,
                dropout=50,
                layers=healthy_layers(rng, i * every),
            )
        )
    return records


def with_layer(record: StepRecord, name: str, **changes: float | None) -> StepRecord:
    layers = tuple(
        dataclasses.replace(layer, **changes) if layer.name == name else layer
        for layer in record.layers
    )
    return dataclasses.replace(record, layers=layers)


def set_layer(
    run: list[StepRecord], name: str, field: str, values: Sequence[float | None]
) -> None:
    """Give `name` these values of `field` on the last len(values) records."""
    start = len(run) - len(values)
    for i, value in enumerate(values, start):
        run[i] = with_layer(run[i], name, **{field: value})


def set_records(run: list[StepRecord], **columns: Sequence[float | int | str | None]) -> None:
    """Give the last records these values, e.g. train_loss=[...], dropout=[...]."""
    for field, values in columns.items():
        start = len(run) - len(values)
        for i, value in enumerate(values, start):
            run[i] = dataclasses.replace(run[i], **{field: value})


def alert_changes(
    run: Sequence[StepRecord], num_classes: int = 10, doctor: Diagnostician | None = None
) -> list[tuple[int, AlertChange]]:
    """Every change to the alerts while the run is logged, with the step it came at."""
    doctor = doctor or Diagnostician(num_classes)
    return [(record.step, change) for record in run for change in doctor.observe(record)]


def opened(run: Sequence[StepRecord], code: str | None = None,
           num_classes: int = 10) -> list[Finding]:
    """The findings that opened an alert (a new problem), of `code` if given."""
    return [c.episode.finding for _, c in alert_changes(run, num_classes)
            if c.kind == "opened" and code in (None, c.code)]


def only(run: Sequence[StepRecord], code: str, num_classes: int = 10) -> Finding:
    """The one alert the run opened, which must have this code."""
    findings = opened(run, num_classes=num_classes)
    assert [f.code for f in findings] == [code], findings
    return findings[0]


# --- the healthy baseline ------------------------------------------------------------------


def test_healthy_run_raises_nothing() -> None:
    assert alert_changes(healthy_run(60)) == []


@pytest.mark.parametrize("noise", [0.0, 0.01, 0.03])
@pytest.mark.parametrize("logs", [12, 60, 120])
def test_noisy_healthy_runs_raise_nothing(logs: int, noise: float) -> None:
    for seed in range(3):
        assert opened(healthy_run(logs, seed, noise)) == [], seed


def test_records_are_frozen() -> None:
    record = healthy_run(2)[1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.step = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.layers[0].grad_norm = 0.0  # type: ignore[misc]


# --- initial loss (seed 003) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss", "words", "higher_is_worse", "level"),
    [(5.0, "confidently wrong", True, "info"), (8.0, "confidently wrong", True, "warning"),
     (0.5, "beats chance", False, "warning")],
)
def test_initial_loss_far_from_ln_c_fires(loss: float, words: str, higher_is_worse: bool,
                                          level: str) -> None:
    """Above chance by up to 3 ln C (6.9) is news: a healthy Kaiming-initialised CNN starts
    at 4.26; beyond it, or below chance by half, a warning."""
    run = healthy_run(5)
    run[0] = dataclasses.replace(run[0], validate_loss=loss)
    finding = only(run, "initial_loss")
    assert (finding.level, finding.layer, finding.fix) == (level, None, None)
    assert f"{loss:g}" in finding.message
    assert "2.3" in finding.message
    assert words in finding.recommendation
    assert (finding.value, finding.higher_is_worse) == (loss, higher_is_worse)


@pytest.mark.parametrize(
    ("loss", "fires"),
    [
        (LN10 * (1 + INITIAL_LOSS_TOLERANCE) * 0.99, False),
        (LN10 * (1 + INITIAL_LOSS_TOLERANCE) * 1.01, True),
        (LN10 * (1 - INITIAL_LOSS_TOLERANCE) * 1.01, False),
        (LN10 * (1 - INITIAL_LOSS_TOLERANCE) * 0.99, True),
    ],
)
def test_initial_loss_tolerance_edges(loss: float, fires: bool) -> None:
    run = healthy_run(2)
    run[0] = dataclasses.replace(run[0], validate_loss=loss)
    assert len(opened(run, "initial_loss")) == fires


def test_initial_loss_depends_on_the_number_of_classes() -> None:
    run = healthy_run(2)
    run[0] = dataclasses.replace(run[0], validate_loss=0.75)  # ln 2 = 0.69
    assert opened(run, "initial_loss", num_classes=2) == []
    assert len(opened(run, "initial_loss", num_classes=10)) == 1


def test_initial_loss_only_judges_the_step_0_record() -> None:
    run = healthy_run(5)[1:]  # no step-0 record: a high first loss is not the initial loss
    run[0] = dataclasses.replace(run[0], validate_loss=5.0)
    assert opened(run, "initial_loss") == []


# --- per-layer rules: persistence ----------------------------------------------------------

# Each per-layer rule has two ways to persist: far out for MIN_PERSIST_LOGS logs, or mildly
# out for PERSIST_LOGS logs spanning PERSIST_STEPS steps. These values sit 1.2x inside or
# beyond each rule's boundaries, so they test the definitions, not the floating point.
RATIO_MILD = UPDATE_RATIO_HIGH * UPDATE_RATIO_MILD * 1.2  # 0.036: mildly out, never far
RATIO_FAR = UPDATE_RATIO_HIGH * UPDATE_RATIO_PEAK * 1.2  # 0.18: far out (a peak, and well out)
RATIO_OUT = UPDATE_RATIO_HIGH * UPDATE_RATIO_FAR * 1.2  # 0.048: still well out after a peak
RATIO_FAR_LOW = UPDATE_RATIO_LOW / (UPDATE_RATIO_PEAK * 1.2)  # 5.6e-06: far out below
STD_LOW = ACTIVATION_STD_LOW / ACTIVATION_STD_FACTOR  # 0.25
STD_HIGH = ACTIVATION_STD_HIGH * ACTIVATION_STD_FACTOR  # 4.0
STD_MILD = STD_LOW / (ACTIVATION_STD_MILD * 1.2)  # 0.14: mildly out, never far
STD_FAR = STD_LOW / 10 ** (FAR_DECADES * 1.2)  # 0.063: far out


def test_persistence_constants_make_sense() -> None:
    """The tests below assume a mild stretch is not far, and that PERSIST_LOGS logs at the
    default spacing span PERSIST_STEPS steps, all of them after the warm-up."""
    assert MIN_PERSIST_LOGS < PERSIST_LOGS
    assert (PERSIST_LOGS - 1) * EVERY >= PERSIST_STEPS
    assert RATIO_MILD < UPDATE_RATIO_HIGH * UPDATE_RATIO_PEAK
    assert math.log10(STD_LOW / STD_MILD) < FAR_DECADES <= math.log10(STD_LOW / STD_FAR)
    assert EVERY >= WARMUP_STEPS  # the first trained log is judged by every rule


# --- update:parameter ratio (seeds 000-002) ------------------------------------------------


def test_update_ratio_high_fires_with_lr_fix() -> None:
    run = healthy_run(10)
    # the shape of Adam at lr 0.05: a peak no healthy step reaches, then still well out
    set_layer(run, "features.4", "update_ratio", [RATIO_FAR, 0.06, 0.05])
    finding = only(run, "update_ratio_high")
    assert (finding.level, finding.layer) == ("warning", "features.4")
    assert "layer features.4" in finding.message
    assert "10^-1.3" in finding.message  # the latest ratio, 0.05
    assert "0.05" in finding.message
    assert "last 3 logs (steps 350-450)" in finding.message
    # 3e-4 * 1e-3 / 0.06 (median) = 5e-06, one significant digit
    assert finding.fix == {"learning_rate": 5e-06}
    assert "5e-06" in finding.recommendation
    assert (finding.measure, finding.value, finding.higher_is_worse) == (
        "update:parameter ratio", 0.05, True)


@pytest.mark.parametrize("side", ["high", "low"])
def test_update_ratio_far_out_peaks_and_stays_well_out(side: str) -> None:
    """Healthy runs reach 5.3x the upper limit for a few logs (RMSprop at lr 1e-3) and 11x
    for one odd step (measured): silent. Far out is a peak UPDATE_RATIO_PEAK beyond with the
    last MIN_PERSIST_LOGS logs' median UPDATE_RATIO_FAR beyond."""
    limit, out = (UPDATE_RATIO_HIGH, 1.0) if side == "high" else (UPDATE_RATIO_LOW, -1.0)

    def times(factor: float) -> float:
        return limit * factor**out

    well = times(UPDATE_RATIO_FAR * 1.01)
    for ratios, fires in [([times(5.3)] * 3, False),  # RMSprop's first logs
                          ([times(1.3), times(11), times(1.3)], False),  # one odd step
                          ([times(UPDATE_RATIO_PEAK / 1.01), well, well], False),
                          ([times(UPDATE_RATIO_PEAK * 1.01), well, well], True),
                          ([times(UPDATE_RATIO_PEAK * 1.01), well, times(2.0)], True),
                          ([times(UPDATE_RATIO_PEAK * 1.01), times(UPDATE_RATIO_FAR / 1.01),
                            times(2.0)], False)]:
        run = healthy_run(10)
        set_layer(run, "features.4", "update_ratio", ratios)
        changes = [(s, c.code) for s, c in alert_changes(run) if c.kind == "opened"]
        assert changes == ([(run[-1].step, f"update_ratio_{side}")] if fires else []), ratios


def test_update_ratio_low_fires_per_layer_with_a_shared_fix() -> None:
    run = healthy_run(10)
    set_layer(run, "features.0", "update_ratio", [2e-5, RATIO_FAR_LOW, 2e-5])
    set_layer(run, "classifier.1", "update_ratio", [2.4e-5, RATIO_FAR_LOW, 2.4e-5])
    findings = opened(run, "update_ratio_low")
    assert sorted(f.layer or "" for f in findings) == ["classifier.1", "features.0"]
    # median of the layers' median ratios 2.2e-5: 3e-4 * 1e-3 / 2.2e-5 = 1e-02 (1 digit)
    assert all(f.fix == {"learning_rate": 0.01} for f in findings)
    by_layer = {f.layer: f for f in findings}
    assert "2e-05" in by_layer["features.0"].message
    assert "10^-4.7" in by_layer["features.0"].message
    assert not by_layer["features.0"].higher_is_worse


def test_update_ratio_fix_is_clamped_to_the_largest_lr() -> None:
    run = healthy_run(10)
    set_records(run, learning_rate=[0.5] * 9)
    set_layer(run, "features.4", "update_ratio", [1e-5, RATIO_FAR_LOW, 1e-5])
    assert only(run, "update_ratio_low").fix == {"learning_rate": 1.0}
    set_records(run, learning_rate=[1.0] * 9)
    finding = only(run, "update_ratio_low")
    assert finding.fix is None
    assert "already 1" in finding.recommendation


def test_update_ratio_skips_nan_ratios() -> None:
    run = healthy_run(10)
    set_layer(run, "features.4", "update_ratio", [0.05, math.nan, RATIO_FAR, math.nan, 0.05])
    assert only(run, "update_ratio_high").layer == "features.4"


@pytest.mark.parametrize(
    "ratios",
    [
        [RATIO_FAR],  # one odd probe log
        [0.5, 0.5],  # 2 logs, however far out
        [RATIO_FAR, RATIO_FAR, 0.005],  # back in the band
        [0.03, 0.001, 0.03, 0.001, 0.03, 0.001],  # noisy: never 3 in a row
        [RATIO_FAR, 2e-5, RATIO_FAR],  # out on both sides, not one side 3 times
        [RATIO_MILD] * (PERSIST_LOGS - 1),  # mildly out, not long enough
        [UPDATE_RATIO_HIGH * UPDATE_RATIO_MILD / 1.2] * 9,  # long, but its median below 2x
        [UPDATE_RATIO_LOW / UPDATE_RATIO_MILD * 1.2] * 9,  # the same below
    ],
)
def test_update_ratio_not_persistent_is_silent(ratios: list[float]) -> None:
    run = healthy_run(10)
    set_layer(run, "features.4", "update_ratio", ratios)
    assert alert_changes(run) == []


def test_update_ratio_far_out_fires_at_the_third_log() -> None:
    run = healthy_run(12)
    set_layer(run, "features.4", "update_ratio", [RATIO_FAR] * 5)
    steps = [step for step, c in alert_changes(run) if c.kind == "opened"]
    assert steps == [run[-5 + MIN_PERSIST_LOGS - 1].step]


def test_update_ratio_mildly_out_needs_persist_logs_over_persist_steps() -> None:
    """At the default spacing PERSIST_LOGS logs span enough steps: it fires at the last of
    them. Logged more often, it waits until the stretch spans PERSIST_STEPS steps."""
    run = healthy_run(12)
    set_layer(run, "features.4", "update_ratio", [RATIO_MILD] * PERSIST_LOGS)
    assert [s for s, c in alert_changes(run) if c.kind == "opened"] == [run[-1].step]

    every = 10
    logs = PERSIST_STEPS // every + 1  # the logs that first span PERSIST_STEPS steps
    assert logs > PERSIST_LOGS
    run = healthy_run(logs + 5, every=every)
    set_layer(run, "features.4", "update_ratio", [RATIO_MILD] * logs)
    changes = [(s, c.code) for s, c in alert_changes(run) if c.kind == "opened"]
    assert changes == [(run[-1].step, "update_ratio_high")]
    assert run[-1].step - run[-logs].step == PERSIST_STEPS


def test_the_first_steps_of_a_healthy_run_are_silent() -> None:
    """Adam's first update ratios sit just above the band (1.3x measured at step 5) and come
    back into it: near the limit and brief, that is no alert. A broken run (Adam at lr 0.05:
    17x, 6x, 3x the limit at its first logs, measured) is far out at once."""
    run = healthy_run(12, every=5)
    set_layer(run, "features.4", "update_ratio", [0.013, 0.009, *[1e-3] * 9])
    set_layer(run, "features.0", "update_ratio", [0.013, 0.012, 0.011, 0.0095, *[1e-3] * 7])
    # the highest peak measured on a healthy run (RMSprop, Adam at lr 1e-3..3e-3, SGD+Nesterov
    # at lr 0.02): 0.02-0.035 within the first 50 steps
    set_layer(run, "classifier.1", "update_ratio",
              [0.02, 0.035, 0.03, 0.025, 0.02, 0.015, 0.012, *[1e-3] * 4])
    assert alert_changes(run) == []
    broken = healthy_run(12, every=5)
    set_layer(broken, "features.4", "update_ratio", [0.17, 0.06, 0.03, *[0.02] * 8])
    assert [(s, c.layer) for s, c in alert_changes(broken) if c.kind == "opened"] == [
        (15, "features.4")]


def test_update_ratio_low_ignores_layers_without_gradient() -> None:
    frozen, dead = healthy_run(10), healthy_run(10)
    set_layer(frozen, "features.0", "update_ratio", [0.0] * 5)  # transfer learning
    set_layer(frozen, "features.0", "grad_norm", [0.0] * 5)
    set_layer(dead, "features.0", "update_ratio", [1e-6, 1e-9, 1e-13])  # Adam's momentum decaying
    set_layer(dead, "features.0", "grad_norm", [0.0] * 3)
    assert alert_changes(frozen) == []
    assert alert_changes(dead) == []


# --- activation std (seeds 000/001) --------------------------------------------------------

def test_activation_std_low_fires() -> None:
    run = healthy_run(10)
    set_layer(run, "features.4", "act_std", [0.05, 0.06, 0.05, 0.04, 0.05])
    finding = only(run, "activation_std_low")  # far out: opened at the third log
    assert (finding.level, finding.layer, finding.fix) == ("warning", "features.4", None)
    assert "layer features.4" in finding.message
    assert "activation std 0.05, below 0.25 at each of the last 3 logs" in finding.message
    assert "initialisation" in finding.recommendation
    assert (finding.value, finding.higher_is_worse) == (0.05, False)


def test_activation_std_high_fires() -> None:
    run = healthy_run(10)
    set_layer(run, "classifier.1", "act_std", [26.0, 21.0, 18.0, 15.0, 14.0])  # N(0, 1) init
    finding = only(run, "activation_std_high")
    assert (finding.level, finding.layer, finding.fix) == ("warning", "classifier.1", None)
    assert "layer classifier.1" in finding.message
    assert "activation std 18, above 4 at each of the last 3 logs" in finding.message
    assert "normalise" in finding.recommendation


@pytest.mark.parametrize(("limit", "code", "out"), [
    (STD_LOW, "activation_std_low", -1.0), (STD_HIGH, "activation_std_high", 1.0)])
def test_activation_std_limits_are_the_band_times_the_factor(limit: float, code: str,
                                                             out: float) -> None:
    """A log is out beyond the band times ACTIVATION_STD_FACTOR; a long stretch out fires
    when its median is ACTIVATION_STD_MILD further out, a short one when FAR_DECADES out."""
    mild = limit * (ACTIVATION_STD_MILD * 1.2) ** out  # its median: never far
    for first, fires in [(limit * 1.01**out, True), (limit / 1.01**out, False)]:
        run = healthy_run(10)  # the stretch is PERSIST_LOGS long only if `first` is out
        set_layer(run, "features.4", "act_std", [first] + [mild] * (PERSIST_LOGS - 1))
        assert [f.code for f in opened(run)] == ([code] if fires else []), first
    for typical, fires in [(limit * (ACTIVATION_STD_MILD * 1.01) ** out, True),
                           (limit * (ACTIVATION_STD_MILD / 1.01) ** out, False)]:
        run = healthy_run(10)
        set_layer(run, "features.4", "act_std", [typical] * 9)
        assert [f.code for f in opened(run)] == ([code] if fires else []), typical
    for typical, fires in [(limit * 10 ** (1.01 * FAR_DECADES * out), True),
                           (limit * 10 ** (FAR_DECADES * out / 1.01), False)]:
        run = healthy_run(10)
        set_layer(run, "features.4", "act_std", [typical] * MIN_PERSIST_LOGS)
        assert [f.code for f in opened(run)] == ([code] if fires else []), typical


def test_activation_std_of_a_real_default_run_is_silent() -> None:
    """Measured on the default small CNN: BN'd post-ReLU convs at 0.55-0.6, the fc layer
    growing from 1.2 to 2.6 over 20 epochs while validation loss kept falling."""
    run = healthy_run(30)
    set_layer(run, "features.0", "act_std", [0.55] * 29)
    set_layer(run, "classifier.1", "act_std", [1.2 + 1.4 * i / 28 for i in range(29)])
    assert alert_changes(run) == []


@pytest.mark.parametrize(
    ("name", "stds"),
    [
        ("features.4", [0.01]),  # one odd probe batch
        ("features.4", [0.01, 0.01]),  # two, however far out
        ("features.4", [STD_MILD] * (PERSIST_LOGS - 1)),  # mildly out, not long enough
        ("features.4", [STD_FAR, STD_FAR, 0.8, STD_FAR, STD_FAR]),  # a healthy log breaks it
        ("features.4", [0.1, 10.0, 0.1, 10.0, 0.1]),  # both sides, neither persistent
        (LOGITS, [0.05] * 9),  # logits: no nonlinearity, any spread is fine
    ],
)
def test_activation_std_not_persistent_is_silent(name: str, stds: list[float]) -> None:
    run = healthy_run(10)
    set_layer(run, name, "act_std", stds)
    assert alert_changes(run) == []


def test_activation_std_mildly_out_fires_after_persist_logs() -> None:
    run = healthy_run(10)
    set_layer(run, "features.4", "act_std", [STD_MILD] * PERSIST_LOGS)
    steps = [s for s, c in alert_changes(run) if c.kind == "opened"]
    assert steps == [run[-1].step]


def test_activation_std_ignores_the_step_0_record() -> None:
    """At step 0 eval-mode BatchNorm still has its initial running statistics (and step 0
    is within the warm-up, below)."""
    run = healthy_run(MIN_PERSIST_LOGS)  # step 0 and MIN_PERSIST_LOGS - 1 trained logs
    set_layer(run, "features.4", "act_std", [0.01] * MIN_PERSIST_LOGS)
    assert alert_changes(run) == []
    run = healthy_run(MIN_PERSIST_LOGS + 1)
    set_layer(run, "features.4", "act_std", [0.01] * (MIN_PERSIST_LOGS + 1))
    assert only(run, "activation_std_low").layer == "features.4"


def bad_between(run: list[StepRecord], start: int, stop: int, bad: float,
                good: float) -> list[float]:
    """For each trained record of `run`: `bad` at steps start..stop-1, else `good`."""
    return [bad if start <= r.step < stop else good for r in run[1:]]


@pytest.mark.parametrize(("field", "bad", "good", "code"), [
    ("act_std", 0.01, 1.0, "activation_std_low"), ("dead_fraction", 1.0, 0.1, "dead_relu")])
def test_activations_and_dead_units_are_not_judged_in_the_warm_up(
        field: str, bad: float, good: float, code: str) -> None:
    """A deep net's activations may start far too small and grow within its first steps
    (AlexNet on digits, default init: std 0.01-0.08 at steps 10-26, healthy by step 40):
    before WARMUP_STEPS nothing is judged; from it, the same is far out at once."""
    every = 10
    early = WARMUP_STEPS // every - 1  # the trained logs before the warm-up ends: 10-40
    assert early >= MIN_PERSIST_LOGS
    run = healthy_run(12, every=every)
    set_layer(run, "features.4", field, bad_between(run, every, WARMUP_STEPS, bad, good))
    assert alert_changes(run) == []
    # the same stretch, from the warm-up's end: far out at its third log
    late = WARMUP_STEPS + early * every
    set_layer(run, "features.4", field, bad_between(run, WARMUP_STEPS, late, bad, good))
    assert [(s, c.code) for s, c in alert_changes(run) if c.kind == "opened"] == [
        (WARMUP_STEPS + (MIN_PERSIST_LOGS - 1) * every, code)]
    # a stretch through the warm-up counts from its end
    for stop, fires in [(WARMUP_STEPS + (MIN_PERSIST_LOGS - 1) * every, False),
                        (WARMUP_STEPS + MIN_PERSIST_LOGS * every, True)]:
        set_layer(run, "features.4", field, bad_between(run, every, stop, bad, good))
        assert [c.code for _, c in alert_changes(run) if c.kind == "opened"] == (
            [code] if fires else []), stop


# --- dead ReLUs (seed 003) -----------------------------------------------------------------


def test_dead_relu_fires_with_lr_fix() -> None:
    run = healthy_run(10)
    set_layer(run, "classifier.1", "dead_fraction", [0.9] * MIN_PERSIST_LOGS)
    finding = only(run, "dead_relu")
    assert (finding.level, finding.layer) == ("warning", "classifier.1")
    assert "layer classifier.1" in finding.message
    assert "90 %" in finding.message
    assert finding.fix == {"learning_rate": 3e-05}
    assert "leaky ReLU" in finding.recommendation


def test_dead_relu_mostly_dead_needs_persist_logs() -> None:
    mostly = (DEAD_RELU_FRACTION + DEAD_FAR_FRACTION) / 2  # 0.75: not "nearly all"
    run = healthy_run(10)
    set_layer(run, "classifier.1", "dead_fraction", [mostly] * (PERSIST_LOGS - 1))
    assert alert_changes(run) == []
    set_layer(run, "classifier.1", "dead_fraction", [mostly] * PERSIST_LOGS)
    assert [s for s, c in alert_changes(run) if c.kind == "opened"] == [run[-1].step]


@pytest.mark.parametrize(
    ("name", "fractions"),
    [
        ("classifier.1", [1.0]),  # one log
        ("classifier.1", [1.0, 1.0]),  # two logs
        ("classifier.1", [0.9, 0.1, 0.9, 0.1]),  # flickering
        ("classifier.1", [0.5] * 9),  # half is not most
        ("classifier.1", [DEAD_RELU_FRACTION] * 9),  # nor is the threshold (healthy: 0.53)
        (LOGITS, [1.0] * 9),  # no ReLU after the logits
    ],
)
def test_dead_relu_not_persistent_is_silent(name: str, fractions: list[float]) -> None:
    run = healthy_run(10)
    set_layer(run, name, "dead_fraction", fractions)
    assert alert_changes(run) == []


# --- loss rising (seeds 000/001) -----------------------------------------------------------

PLATEAU = [0.50] * 16  # a reference window before the recent logs
assert len(PLATEAU) >= RISING_REFERENCE_MIN_LOGS + max(RISING_RECENT_LOGS) // 2


def loss_run(train: Sequence[float], train_se: float | None = 0.01, **columns: list) -> list:
    """A healthy run whose trained records all carry these training losses (and se), and
    validation losses of the same shape (0.9x, as healthy_run's): a flat training loss
    with a validation loss that still falls would be a run that learns."""
    run = healthy_run(len(train) + 1)
    columns.setdefault("validate_loss", [0.9 * x for x in train])
    set_records(run, train_loss=train, train_loss_se=[train_se] * len(train), **columns)
    return run


def test_loss_rising_fires_at_once_with_lr_fix() -> None:
    run = loss_run([*PLATEAU, 0.62, 0.64])
    changes = [(s, c.kind, c.code) for s, c in alert_changes(run)]
    assert changes[0] == (run[-2].step, "opened", "loss_rising")  # at the first high log
    finding = only(run, "loss_rising")
    assert (finding.level, finding.layer) == ("warning", None)
    assert "rose 12 % (mean of the last 2 logs 0.56 against 0.5 before them" in finding.message
    assert finding.fix == {"learning_rate": 3e-05}
    assert "normalised" in finding.recommendation
    assert (finding.measure, finding.higher_is_worse) == ("rise, %", True)


def test_loss_rising_catches_a_single_jump_and_keeps_its_worst() -> None:
    run = loss_run([0.3] * 16 + [2.3] * 3)
    changes = [c for _, c in alert_changes(run) if c.code == "loss_rising"]
    assert "333 %" in changes[0].episode.finding.message  # (0.3 + 2.3) / 2 against 0.3
    assert [c.kind for c in changes] == ["opened", "held", "held"]
    assert "667 %" in changes[1].episode.finding.message
    assert changes[-1].episode.worst_value == pytest.approx(100 * (2.3 / 0.3 - 1))


@pytest.mark.parametrize(
    ("losses", "errors"),
    [
        # one noisy log that says so, within BLOWN_UP_SPREAD of the noise before it
        ([0.50, 0.90, 0.50, 0.50], [0.01, 0.01 * BLOWN_UP_SPREAD / 1.1, 0.01, 0.01]),
        ([0.50, 0.53, 0.49, 0.54, 0.50, 0.52], [0.02] * 6),  # noisy plateau
        ([0.505, 0.51, 0.515, 0.52, 0.525, 0.53], [0.01] * 6),  # creeping up: below 10 %
    ],
)
def test_loss_rising_ignores_noise(losses: list[float], errors: list[float]) -> None:
    run = loss_run([*PLATEAU, *losses])
    set_records(run, train_loss_se=[0.01] * 16 + errors)
    assert opened(run, "loss_rising") == []


def test_a_log_that_blew_up_within_itself_is_judged_by_the_noise_before_it() -> None:
    """Measured: the loss went from 0.7 to 975 within one 5-step interval, whose per-step
    losses then spread by the rise itself (se 841). A log more than BLOWN_UP_SPREAD times
    noisier than the logs before it is judged by their noise: the rise shows at once. Within
    that spread a noisy log is judged by its own se (test_loss_rising_ignores_noise)."""
    se_before, se_blown = 0.05, 841.0
    assert se_blown > BLOWN_UP_SPREAD * se_before
    rng = random.Random(5)
    before = [1.0 + se_before * rng.gauss(0, 1) for _ in range(16)]
    run = loss_run([*before, 975.0], train_se=se_before)
    set_records(run, train_loss_se=[se_blown])
    [(step, change)] = [(s, c) for s, c in alert_changes(run) if c.kind == "opened"]
    assert (step, change.code) == (run[-1].step, "loss_rising")
    assert "mean of the last 2 logs" in change.episode.finding.message


def test_a_short_epoch_end_interval_is_no_rise() -> None:
    """An epoch's last interval may be a few steps long (its log comes at an odd step): its
    mean is as noisy as its se says, with no rise behind it."""
    fires, seeds = 0, 200
    for seed in range(seeds):
        rng = random.Random(seed)
        steps = [*range(EVERY, 21 * EVERY, EVERY), 20 * EVERY + 2]  # 20 intervals of 50, one of 2
        records = []
        for start, stop in pairwise([0, *steps]):
            losses = [1.0 + 0.3 * rng.gauss(0, 1) for _ in range(stop - start)]
            se = statistics.stdev(losses) / math.sqrt(len(losses))
            records.append(StepRecord(stop, statistics.fmean(losses), None, LR, "Adam", 0.0, 50,
                                      (), se))
        fires += bool(diagnostics.rule_loss_rising(records, diagnostics.RunFacts(10)))
    assert fires <= allowed_false_alarms(seeds)


@pytest.mark.xfail(strict=True, reason="without a measured se, a one-log spike (+80 %, "
                   "33 scatters) opens loss_rising, still held 3 logs later with the loss back")
def test_loss_rising_ignores_one_spike_without_a_measured_se() -> None:
    """The old rule (medians) ignored one noisy log. With se None (one step per log) the noise
    is the robust scatter, which by design ignores the spike: the spike then counts as a
    +40 % rise of the last 2 logs, then +20 % of the last 4, though the loss is back."""
    rng = random.Random(3)
    run = loss_run([0.5 * (1 + 0.02 * rng.gauss(0, 1)) for _ in range(16)]
                   + [0.9, 0.5, 0.5, 0.5], train_se=None)
    assert opened(run, "loss_rising") == []


@pytest.mark.parametrize(
    "change", [{"dropout": [50] * 16 + [70] * 2}, {"weight_decay": [0] * 16 + [1e-4] * 2}]
)
def test_loss_rising_after_more_regularisation_is_silent(change: dict[str, list[float]]) -> None:
    run = loss_run([*PLATEAU, 0.62, 0.64], **change)
    assert opened(run, "loss_rising") == []


# --- loss flat / slow (seeds 000/001) ------------------------------------------------------

WOBBLE = (1.500, 1.503, 1.497, 1.501, 1.499, 1.502, 1.498, 1.500, 1.502, 1.498, 1.501, 1.499)
FLAT = [WOBBLE[i % len(WOBBLE)] for i in range(FLAT_LOGS)]  # +-0.2 % around 1.5


def test_flat_window_is_flat_logs_spanning_flat_steps() -> None:
    assert len(FLAT) == FLAT_LOGS and (FLAT_LOGS - 1) * EVERY >= FLAT_STEPS
    short = loss_run(FLAT[1:], train_se=None)
    assert alert_changes(short) == []


def test_loss_flat_fires_with_lr_fix() -> None:
    run = loss_run(FLAT, train_se=None)
    finding = only(run, "loss_flat")
    assert (finding.level, finding.layer) == ("warning", None)
    assert (f"stayed near 1.5 over the last {FLAT_LOGS} logs (steps {EVERY}-{FLAT_LOGS * EVERY}"
            in finding.message)
    assert finding.fix == {"learning_rate": 0.003}
    assert not finding.higher_is_worse  # the smaller the fall, the worse


@pytest.mark.parametrize("optimizer", ["SGD", "SGD+Nesterov"])
def test_loss_flat_with_sgd_suggests_adam(optimizer: str) -> None:
    n = len(FLAT)
    run = loss_run(FLAT, train_se=None, optimizer=[optimizer] * n, learning_rate=[0.01] * n)
    finding = only(run, "loss_flat")
    assert finding.fix == {"optimizer": "Adam", "learning_rate": 3e-4}
    assert optimizer in finding.recommendation


def test_loss_flat_floor_scales_with_classes() -> None:
    run = loss_run([0.2 * x / 1.5 for x in FLAT], train_se=None)  # below 0.1 ln 10 = 0.23
    assert opened(run, "loss_flat") == []
    assert len(opened(run, "loss_flat", num_classes=2)) == 1  # above 0.1 ln 2 = 0.07


def test_loss_flat_after_a_collapse_is_left_to_dead_relu() -> None:
    """Adam at lr 0.1 on the small CNN: the loss sat at ln 10, gradients 0, layers all dead.
    Without the dead layer the same loss is flat."""
    n = FLAT_LOGS + 2
    assert [f.code for f in opened(loss_run([2.31] * n, train_se=None))] == ["loss_flat"]
    run = loss_run([2.31] * n, train_se=None)
    set_layer(run, "classifier.1", "dead_fraction", [1.0] * n)
    set_layer(run, "features.4", "update_ratio", [1e-6, 1e-8, 1e-10, 1e-12] + [1e-13] * (n - 4))
    set_layer(run, "features.4", "grad_norm", [0.0] * n)
    assert [f.code for f in opened(run)] == ["dead_relu"]


def test_loss_flat_after_a_setback_is_silent() -> None:
    run = loss_run([0.5] * 10 + [2.3] * (FLAT_LOGS + 4), train_se=None)  # flat at 2.3
    assert opened(run, "loss_flat") == []
    assert len(opened(run, "loss_rising")) == 1


def test_loss_falling_2_percent_a_log_is_silent() -> None:
    run = loss_run([1.5 * 0.98**i for i in range(2 * FLAT_LOGS)], train_se=None)
    assert alert_changes(run) == []


# --- exploding gradients (seed 003) --------------------------------------------------------

STEADY = [0.7, 1.3, 0.8, 1.2, 1.0, 0.7, 1.3, 0.9, 1.1, 1.0]  # median 1.0, +-30 %
assert len(STEADY) == GRADIENT_BASELINE_LOGS
MOST = NAMES[:3]  # an explosion reaches most of the network
HALF = ("features.4", "classifier.1")


def spike_in(run: list[StepRecord], spiking: Sequence[str], value: float,
             baseline: Sequence[float] = STEADY) -> None:
    """Every layer's gradient norms on the last logs: `baseline`, then `value` in the layers
    `spiking` and the baseline's median in the others."""
    for name in NAMES:
        last = value if name in spiking else statistics.median(baseline)
        set_layer(run, name, "grad_norm", [*baseline, last])


def test_exploding_gradients_fires_with_lr_fix() -> None:
    run = healthy_run(12)
    spike_in(run, HALF, 20.0)
    findings = opened(run)
    assert [(f.code, f.layer) for f in findings] == [
        ("exploding_gradients", "features.4"), ("exploding_gradients", "classifier.1")]
    finding = findings[0]
    assert finding.level == "warning"
    assert "layer features.4" in finding.message
    assert "gradient norm 20 is 20x its median 1 " in finding.message
    assert finding.fix == {"learning_rate": 3e-05}
    assert "clipping" in finding.recommendation


@pytest.mark.parametrize("spiking", range(1, len(NAMES) + 1))
def test_exploding_gradients_needs_half_the_layers(spiking: int) -> None:
    """A small batch's gradients are heavy-tailed: one layer alone 20x its median is an
    odd batch (a healthy tiny CNN at batch 16: 12x, measured); in at least half the layers
    at the same log it is an explosion."""
    run = healthy_run(12)
    spike_in(run, NAMES[:spiking], 20.0)
    fires = 2 * spiking >= len(NAMES)
    assert [f.layer for f in opened(run)] == (list(NAMES[:spiking]) if fires else [])


def test_exploding_gradients_threshold_is_10x() -> None:
    below, above = healthy_run(12), healthy_run(12)
    spike_in(below, MOST, GRADIENT_SPIKE_FACTOR / 1.01)
    spike_in(above, MOST, GRADIENT_SPIKE_FACTOR * 1.01)
    assert alert_changes(below) == []
    assert [f.layer for f in opened(above, "exploding_gradients")] == list(MOST)


def test_exploding_gradients_threshold_grows_with_the_spread() -> None:
    """Against a baseline whose log10 norms spread widely, a spike must also stand
    GRADIENT_SPIKE_Z robust standard deviations above their median: here more than 10x."""
    wide = [10 ** (0.2 * (-1) ** i) for i in range(GRADIENT_BASELINE_LOGS)]  # 0.63 and 1.6
    logs = [math.log10(g) for g in wide]
    centre = statistics.median(logs)
    spread = evidence.MAD_TO_STD * statistics.median(abs(v - centre) for v in logs)
    decades = GRADIENT_SPIKE_Z * spread
    assert decades > math.log10(GRADIENT_SPIKE_FACTOR)  # 1.48 decades: 30x
    for value, fires in [(10 ** (centre + decades / 1.01), False),
                         (10 ** (centre + decades * 1.01), True)]:
        run = healthy_run(12)
        spike_in(run, MOST, value, wide)
        assert len(opened(run, "exploding_gradients")) == (len(MOST) if fires else 0), value


@pytest.mark.parametrize("shared", [
    False,
    pytest.param(True, marks=pytest.mark.xfail(strict=True, reason=(
        "5 robust stds of only 10 logs is no 5-sigma test: the MAD of 10 values is often "
        "half the true spread. Each layer's norm beyond it at 0.4 % of logs (sigma 0.7; "
        "0.3 % at 0.47, the ResNet-18 measurement's); needing half the layers brings "
        "independent layers to 1.5e-4 per log, but not a spread they share: 0.43 % of "
        "logs, measured over 1e5")))])
def test_healthy_heavy_tailed_gradients_never_fire(shared: bool) -> None:
    """Gradient norms of small batches are heavy-tailed (a healthy ResNet-18 at batch 32
    spans 40x in 14 logs): log-normal, log10 norms with sd 0.7 (a factor 5), each layer on
    its own (shared: the same factor in every layer, as one hard batch would give). No alert
    at all over 4 runs of 150 logs."""
    for seed in range(4):
        rng = random.Random(seed)
        run = healthy_run(150, seed)
        shared_draws = [rng.gauss(0, 0.7) for _ in run[1:]]
        for name in NAMES:
            draws = shared_draws if shared else [rng.gauss(0, 0.7) for _ in run[1:]]
            set_layer(run, name, "grad_norm", [GRAD_SCALE[name] * 10**d for d in draws])
        assert alert_changes(run) == [], seed


def test_exploding_gradients_needs_5_previous_logs() -> None:
    few, enough = (healthy_run(n + 2) for n in (GRADIENT_BASELINE_MIN_LOGS - 1,
                                                 GRADIENT_BASELINE_MIN_LOGS))
    for run, n in [(few, GRADIENT_BASELINE_MIN_LOGS - 1), (enough, GRADIENT_BASELINE_MIN_LOGS)]:
        spike_in(run, MOST, 50.0, [1.0] * n)
    assert alert_changes(few) == []
    assert [f.layer for f in opened(enough, "exploding_gradients")] == list(MOST)


def test_exploding_gradients_ignores_a_layer_without_gradient() -> None:
    """A frozen layer unfrozen: from 0 to anything is no spike, so one other layer spiking is
    one of three judged, not two of four."""
    run = healthy_run(12)
    set_layer(run, "features.0", "grad_norm", [0.0] * 10 + [1.0])
    set_layer(run, "features.4", "grad_norm", [*STEADY, 20.0])
    assert alert_changes(run) == []


# --- overfitting (seed 002) ----------------------------------------------------------------

TRAIN_FALLING = [0.50 - 0.005 * i for i in range(24)]
VAL_RISING = [0.30] * 16 + [0.36, 0.37, 0.38, 0.39, 0.40, 0.40, 0.40, 0.40]


def val_run(train: Sequence[float], val: Sequence[float | None], val_se: float = 0.01,
            **columns: list) -> list[StepRecord]:
    """A healthy run whose trained records all carry these losses (se 0.01 for each)."""
    run = loss_run(train, **columns)
    set_records(run, validate_loss=val,
                validate_loss_se=[None if v is None else val_se for v in val])
    return run


def test_overfitting_fires_with_weight_decay_fix() -> None:
    run = val_run(TRAIN_FALLING, VAL_RISING)
    [(step, finding)] = [(s, c.episode.finding) for s, c in alert_changes(run)
                         if c.kind == "opened"]
    # the 24th log: the last 12 average (4 x 0.30 + 0.36..0.40 x 8) / 12 = 0.358, 19.4 % up
    assert (step, finding.code) == (24 * EVERY, "overfitting")
    assert (finding.level, finding.layer) == ("warning", None)
    assert "rose 19.4 % above its best (mean 0.3 over steps 50-600 -> 0.358" in finding.message
    # training loss: the best block's mean (logs 1-12) against the last 12's (logs 13-24)
    train_before, train_after = statistics.fmean(TRAIN_FALLING[:12]), statistics.fmean(
        TRAIN_FALLING[12:24])
    assert f"training loss fell from {train_before:.3g} to {train_after:.3g}" in finding.message
    assert finding.fix == {"weight_decay": 1e-4}
    assert "early stopping" in finding.recommendation
    assert "steps 50-600" in finding.recommendation


@pytest.mark.parametrize(
    ("weight_decay", "dropout", "fix"),
    [
        (1e-4, 50, {"weight_decay": 1e-3}),
        (1e-3, 50, {"dropout": 70}),
        (1e-3, 80, {"dropout": 90}),
        (1e-3, 90, None),
    ],
)
def test_overfitting_fix_raises_weight_decay_then_dropout(
    weight_decay: float, dropout: int, fix: dict[str, float] | None
) -> None:
    run = val_run(TRAIN_FALLING, VAL_RISING)
    run = [dataclasses.replace(r, weight_decay=weight_decay, dropout=dropout) for r in run]
    assert only(run, "overfitting").fix == fix


def test_overfitting_skips_logs_without_validation() -> None:
    train = [0.50 - 0.0025 * i for i in range(48)]
    val = [v for x in VAL_RISING for v in (None, x)]
    assert only(val_run(train, val), "overfitting").fix == {"weight_decay": 1e-4}


@pytest.mark.parametrize(
    ("train", "val"),
    [
        (TRAIN_FALLING, [0.30, 0.31, 0.29, 0.30, 0.31, 0.30] * 4),  # noisy flat validation
        (TRAIN_FALLING, [0.30] * 20 + [0.50, 0.30, 0.30, 0.30]),  # one outlier: +5.6 % of 12
        (TRAIN_FALLING[::-1], VAL_RISING),  # both rising: not overfitting
    ],
)
def test_overfitting_needs_a_real_divergence(train: list[float], val: list[float]) -> None:
    assert opened(val_run(train, val), "overfitting") == []


def test_overfitting_catches_a_slow_climb() -> None:
    """Shaped like mnist5k with --overfit-batches 1: validation climbing 1.5 % a log, which
    never adds up to 10 % over a few logs, but does against the best block."""
    val = [1.0] * 16 + [1.0 + 0.015 * k for k in range(1, 21)]
    train = [0.5 * 0.9**i for i in range(len(val))]
    run = val_run(train, val)
    changes = [(s, c.code) for s, c in alert_changes(run)
               if c.kind == "opened" and c.level != "info"]  # the training loss converges
    # the recent 12 (climb logs 2-13, mean +11.25 %) against the best block (flat, 1.0)
    assert changes == [((16 + 13) * EVERY, "overfitting")]
    level = val_run(train, [1.0] * 16 + [1.0 + 0.015 * min(k, 6) for k in range(1, 21)])
    assert opened(level, "overfitting") == []  # a 9 % rise that levels off: below 10 %


# --- non-finite values (seed 002) ----------------------------------------------------------


def test_non_finite_loss_is_an_error_with_lr_fix() -> None:
    run = healthy_run(5)
    set_records(run, train_loss=[math.nan])
    finding = only(run, "non_finite")
    assert (finding.level, finding.layer) == ("error", None)
    assert "step 200" in finding.message
    assert "training loss (nan)" in finding.message
    assert finding.recommendation.startswith("training paused before the next update")
    assert finding.fix == {"learning_rate": 3e-05}


def test_non_finite_names_every_place_and_the_first_layer() -> None:
    run = healthy_run(5)
    set_layer(run, "features.4", "grad_norm", [math.inf])
    set_layer(run, "classifier.1", "act_std", [math.nan])
    set_layer(run, "classifier.4", "update_ratio", [math.inf])
    finding = only(run, "non_finite")
    assert finding.layer == "features.4"
    assert "layer features.4 (gradient norm inf)" in finding.message
    assert "layer classifier.1 (activation std nan)" in finding.message
    assert "layer classifier.4 (update:parameter ratio inf)" in finding.message


def test_non_finite_validation_loss_at_step_0_is_an_error() -> None:
    run = healthy_run(1)
    run[0] = dataclasses.replace(run[0], validate_loss=math.inf)
    assert "validation loss (inf)" in only(run, "non_finite").message


def test_undefined_values_are_not_non_finite() -> None:
    run = healthy_run(5)
    set_layer(run, "features.4", "update_ratio", [math.nan] * 4)  # undefined ratio
    assert math.isnan(run[0].train_loss) and math.isnan(run[0].layers[0].grad_norm)  # step 0
    assert alert_changes(run) == []


def test_a_gradient_not_measured_is_not_non_finite() -> None:
    """The log that ends a stopped run follows no fresh backward pass: its gradient norms
    are None, and that is no error (a soak found the final log of every stopped run
    reported as non-finite)."""
    run = healthy_run(12)
    set_layer(run, "features.4", "grad_norm", [None])
    assert opened(run, "non_finite") == [] and opened(run, "exploding_gradients") == []
    set_layer(run, "features.4", "grad_norm", [math.nan])  # measured, and NaN: an error
    assert "gradient norm nan" in only(run, "non_finite").message


# --- the Diagnostician ---------------------------------------------------------------------


def test_a_persisting_condition_is_one_alert_and_a_new_one_after_it_resolves() -> None:
    run = healthy_run(20)
    high, ok = RATIO_FAR, 1e-3
    # logs 1-19: in band x2, high x6, in band x3, high x4, in band x4
    set_layer(
        run, "features.4", "update_ratio", [ok] * 2 + [high] * 6 + [ok] * 3 + [high] * 4 + [ok] * 4
    )
    assert RESOLVE_AFTER_LOGS == 3  # the in-band stretches below are that long, or longer
    changes = alert_changes(run)
    assert [(step, c.kind, c.layer) for step, c in changes] == [
        (5 * EVERY, "opened", "features.4"),  # 3rd high log
        *[(s * EVERY, "held", "features.4") for s in (6, 7, 8)],
        (11 * EVERY, "resolved", "features.4"),  # 3rd in-band log
        (14 * EVERY, "opened", "features.4"),  # 3rd high log after resolving
        (15 * EVERY, "held", "features.4"),
        (18 * EVERY, "resolved", "features.4"),
    ]
    first, second = changes[4][1].episode, changes[-1][1].episode
    assert (first.first_step, first.last_step, first.logs, first.resolved_step) == (
        5 * EVERY, 8 * EVERY, 4, 9 * EVERY)
    assert (second.first_step, second.resolved_step) == (14 * EVERY, 16 * EVERY)
    assert first.alert_id != second.alert_id


def test_conditions_on_different_layers_are_reported_separately() -> None:
    run = healthy_run(10)
    set_layer(run, "features.4", "update_ratio", [RATIO_FAR] * 5)
    set_layer(run, "features.0", "update_ratio", [RATIO_FAR] * 3)
    reported = [(step, c.layer) for step, c in alert_changes(run) if c.kind == "opened"]
    assert reported == [(7 * EVERY, "features.4"), (9 * EVERY, "features.0")]


def test_a_rollback_forgets_the_abandoned_branch() -> None:
    run = healthy_run(11)
    set_layer(run, "features.4", "update_ratio", [RATIO_FAR] * 7)  # high from step 200
    doctor = Diagnostician(10)
    reported = [(s, c.kind, c.code) for s, c in alert_changes(run, doctor=doctor)
                if c.kind != "held"]
    assert reported == [(300, "opened", "update_ratio_high")]
    # roll back to the checkpoint at step 350; the next log is at 400, still too high
    again = doctor.observe(dataclasses.replace(run[8], step=400))
    assert [(c.kind, c.code, c.layer) for c in again] == [
        ("rolled_back", "update_ratio_high", "features.4"),
        ("opened", "update_ratio_high", "features.4"),
    ]
    assert again[0].episode.resolved_step == 400
    assert again[0].episode.alert_id != again[1].episode.alert_id
    assert [r.step for r in doctor.history] == [0, 50, 100, 150, 200, 250, 300, 350, 400]


def test_history_is_bounded() -> None:
    doctor = Diagnostician(10)
    for record in healthy_run(HISTORY_LOGS + 20):
        doctor.observe(record)
    assert len(doctor.history) == HISTORY_LOGS


def test_needs_two_classes() -> None:
    with pytest.raises(ValueError, match="2 classes"):
        Diagnostician(1)


def test_no_fix_leads_back_to_an_lr_that_blew_up() -> None:
    """After recovering at 0.1 from a blow-up at 1.0, 'raise lr to 1' is not offered."""
    doctor = Diagnostician(10)
    doctor.note_blow_up(1.0)
    run = healthy_run(10)
    set_records(run, learning_rate=[0.1] * 9)
    set_layer(run, "features.4", "update_ratio", [1e-5, RATIO_FAR_LOW, 1e-5])
    [finding] = [c.episode.finding for _, c in alert_changes(run, doctor=doctor)
                 if c.kind == "opened"]
    assert finding.fix == {"learning_rate": 0.3}
    assert "made this run blow up" in finding.recommendation
    # without the blow-up the same run is told to go to 1
    assert only(run, "update_ratio_low").fix == {"learning_rate": 1.0}


def test_a_non_finite_log_sets_the_ceiling_itself() -> None:
    run = healthy_run(14)
    set_records(run, learning_rate=[1.0] + [0.1] * 9)
    set_records(run, train_loss=[math.inf] + [1.0] * 9)  # blew up at lr 1, went on at 0.1
    set_layer(run, "features.4", "update_ratio", [1e-5, RATIO_FAR_LOW, 1e-5])
    [finding] = opened(run, "update_ratio_low")
    assert finding.fix == {"learning_rate": 0.3}



# --- the loss rules on noise (issue 13) -----------------------------------------------------
#
# "Unit tests feed each rule synthetic series at several noise levels. At the documented
# false-alarm rate, healthy noise never fires and a real rise of 3x the noise always does."
# A series is LOGS logs of a level with Gaussian noise of sigma = rel x level; the record's
# se is sigma ("se") or None ("no_se": the rules then judge by the series' own scatter).
# Where a rule falls short, the case is a strict xfail whose reason names the shortfall.

NOISE_LEVELS = (0.02, 0.05, 0.1, 0.2)  # sigma / level
# A rise must also be 10 % or more to be reported (LOSS_RISING_FRACTION, OVERFIT_RISE): "3 sigma
# always fires" is asked where 3 sigma >= 15 %, clear of that floor. At 2 % noise a 3 sigma
# rise (6 %) is by design never reported (test_a_rise_below_the_size_floor_is_never_reported).
assert OVERFIT_RISE == LOSS_RISING_FRACTION
DETECTABLE = tuple(r for r in NOISE_LEVELS if 3 * r >= 1.5 * LOSS_RISING_FRACTION)
TRAIN_NOISE = NOISE_LEVELS[0]  # the training loss's, where the validation loss is under test
LOGS = 60  # logs per series
OBSERVED_SERIES = 100  # series per level for the sweeps through the Diagnostician (all rules)
RULE_SERIES = 200  # series per level for the sweeps of one rule
CHANGE_AT = 30  # a rise starts after this many logs
RISE_WITHIN = 2 * max(max(RISING_RECENT_LOGS), OVERFIT_RECENT_LOGS)  # logs to see it in

SCATTER_RUNS_HIGH = pytest.mark.xfail(strict=True, reason=(
    "noise = max(se, scatter): the series' scatter runs high at times and a 3 sigma step "
    "then falls short of z. With a measured se, loss_rising misses 1 series in 200 (seed "
    "188: its scatter over 50 logs is 1.7 sigma). Without one, the threshold is Student-t "
    "on the scatter's few degrees of freedom (about 6 instead of 4): a 3 sigma step is "
    "missed by loss_rising and overfitting on a few series in 100"))


def noise_cases(failing: dict[tuple[float, bool], pytest.MarkDecorator],
                levels: Sequence[float] = NOISE_LEVELS) -> list:
    """(rel, measured) for every level, with and without a measured se; known shortfalls
    marked."""
    return [pytest.param(rel, measured, id=f"{'se' if measured else 'no_se'}-{rel}",
                         marks=[failing[(rel, measured)]] if (rel, measured) in failing else [])
            for measured in (True, False) for rel in levels]


Shape = Callable[[int], float]


def flat(i: int) -> float:
    return 1.0


def falling(i: int) -> float:
    """Halves over the run: 12 % across loss_flat's window, so neither flat nor slow."""
    return 2.0 * 0.5 ** (i / LOGS)


def no_bump(i: int) -> float:
    return 0.0


def draw(rng: random.Random, base: Shape, rel: float, measured: bool,
         bump: Shape = no_bump) -> list[tuple[float, float | None]]:
    """(value, se) of logs 1..LOGS: base(i) + bump(i), noise rel x base(i)."""
    series = []
    for i in range(1, LOGS + 1):
        sigma = rel * base(i)
        series.append((base(i) + bump(i) + sigma * rng.gauss(0, 1), sigma if measured else None))
    return series


def loss_record(i: int, train: tuple[float, float | None],
                val: tuple[float, float | None] | None = None) -> StepRecord:
    """Log i: losses and their se only (no layers: this is about the loss rules)."""
    value, se = val if val is not None else (None, None)
    return StepRecord(i * EVERY, train[0], value, LR, "Adam", 0.0, 50, (), train[1], se)


def alerts_opened(trains: Sequence[tuple[float, float | None]],
                  vals: Sequence[tuple[float, float | None] | None]) -> list[str]:
    """The codes of the alerts a Diagnostician opens on these losses, logged in order."""
    doctor = Diagnostician(10)
    return [c.code for i, (t, v) in enumerate(zip(trains, vals, strict=True), 1)
            for c in doctor.observe(loss_record(i, t, v)) if c.kind == "opened"]


def allowed_false_alarms(logs: int) -> int:
    """The most alerts a rule at the documented rate may open over `logs` logs: ALPHA per
    log, so a Poisson count of mean ALPHA x logs; this is its 1 - 1e-3 quantile.

    "Never" cannot be asked of a rule judged at a stated rate, on the series where that rate
    is met (noise around a flat level): over 10,000 logs it is expected to fire about once.
    """
    mean = ALPHA * logs
    k, term = 0, math.exp(-mean)
    cdf = term
    while 1 - cdf >= 1e-3:
        k += 1
        term *= mean / k
        cdf += term
    return k


SHAPES = {"flat": flat, "falling": falling}


@cache
def noise_sweep(train: str, val: str | None, rel: float, measured: bool) -> Counter[str]:
    """Alerts opened, by code, over OBSERVED_SERIES seeded runs whose training (and
    validation) loss has this shape and noise."""
    found: Counter[str] = Counter()
    for seed in range(OBSERVED_SERIES):
        rng = random.Random(seed)
        trains = draw(rng, SHAPES[train], rel, measured)
        vals = draw(rng, SHAPES[val], rel, measured) if val else [None] * LOGS
        found.update(alerts_opened(trains, vals))
    return found


@pytest.mark.parametrize(("rel", "measured"), noise_cases({}))
def test_healthy_noise_never_fires(rel: float, measured: bool) -> None:
    """Training loss falling, validation loss flat (where early stopping would stop): no
    training-loss rule fires, and overfitting at most at its documented rate (a plateau is
    exactly the boundary its test is calibrated on)."""
    found = noise_sweep("falling", "flat", rel, measured)
    assert found.keys() <= {"overfitting"}, found
    assert found["overfitting"] <= allowed_false_alarms(OBSERVED_SERIES * LOGS), found


@pytest.mark.parametrize(("rel", "measured"), noise_cases({}))
def test_flat_noise_rises_no_more_than_the_documented_rate(rel: float, measured: bool) -> None:
    """A flat training loss is the boundary loss_rising is calibrated on: it may fire, at
    most at ALPHA per log. (At 2 % noise the 10 % floor keeps it silent anyway; loss_flat
    may rightly fire on these series: the loss is flat.)"""
    found = noise_sweep("flat", None, rel, measured)
    assert found["loss_rising"] <= allowed_false_alarms(OBSERVED_SERIES * LOGS), found


def fall_se(rel: float) -> float:
    """The standard error of loss_flat's fitted fall (a fraction of the level) across its
    shortest window, for noise rel at every log."""
    steps = [i * EVERY for i in range(FLAT_LOGS)]
    line = evidence.trend(steps, [1.0] * FLAT_LOGS, [rel] * FLAT_LOGS)
    return line.se * (steps[-1] - steps[0])


# "Noisy": noise that clearly could hide a FLAT_FALL fall in the window, by loss_flat's own
# criterion with half as much again to spare: near the boundary (2 % noise: 5.5 % against
# 5 %), a series' own scatter may come out low enough to call a truly flat loss flat, which
# is right, not a false alarm.
NOISY = tuple(r for r in NOISE_LEVELS if evidence.z_threshold() * fall_se(r) >= 1.5 * FLAT_FALL)


@pytest.mark.parametrize(("rel", "measured"), noise_cases({}, NOISY))
def test_a_noisy_flat_loss_is_never_called_flat(rel: float, measured: bool) -> None:
    """rule_loss_flat: "A series too noisy to tell is never called flat: it may be falling"."""
    found = noise_sweep("flat", None, rel, measured)
    assert found["loss_flat"] == found["loss_slow"] == 0, found


def heavy_draw(rng: random.Random, base: Shape, rel: float,
               kind: str) -> list[tuple[float, float | None]]:
    """Noise with big outliers, each log's se saying how noisy it was.

    mixture: 1 log in 20 has 5x the noise, and an se to match. t4_means: each log is the
    mean of 10 per-step losses with Student-t noise (4 degrees of freedom: chi^2(4) / 4 is
    the mean of two unit exponentials) and its se is measured from them, as the trainer
    measures it.
    """
    series = []
    steps = 10
    for i in range(1, LOGS + 1):
        level, sigma = base(i), rel * base(i)
        if kind == "mixture":
            sigma *= 5 if rng.random() < 0.05 else 1
            series.append((level + sigma * rng.gauss(0, 1), sigma))
            continue
        scale = sigma * math.sqrt(steps / 2)  # t(4) has variance 2: the mean's sd is sigma
        losses = [level + scale * rng.gauss(0, 1) / math.sqrt(
            (rng.expovariate(1) + rng.expovariate(1)) / 2) for _ in range(steps)]
        series.append((statistics.fmean(losses), statistics.stdev(losses) / math.sqrt(steps)))
    return series


@cache
def heavy_sweep(kind: str, rel: float) -> Counter[str]:
    found: Counter[str] = Counter()
    for seed in range(OBSERVED_SERIES):
        rng = random.Random(seed)
        trains = heavy_draw(rng, falling, rel, kind)
        found.update(alerts_opened(trains, heavy_draw(rng, flat, rel, kind)))
    return found


@pytest.mark.parametrize("rel", DETECTABLE[::2])
@pytest.mark.parametrize("kind", ["mixture", "t4_means"])
def test_heavy_tailed_noise_that_says_so_stays_within_the_rate(kind: str, rel: float) -> None:
    """A healthy run (training loss falling, validation flat) whose noise has outliers, with
    an se that reflects them: no more alerts than the documented rate allows, per rule."""
    found = heavy_sweep(kind, rel)
    found.pop("converged", None)  # news, not an alarm: the falling loss ends near 0
    assert found.keys() <= {"loss_rising", "overfitting"}, found
    assert max(found.values(), default=0) <= allowed_false_alarms(OBSERVED_SERIES * LOGS), found


# -- a real rise of 3 sigma --


@cache
def logs_to_alarm(code: str, change: str, rel: float, measured: bool) -> list[int | None]:
    """For each of RULE_SERIES seeded series, how many logs after the change began the rule
    first fired (None: not before the series ended).

    loss_rising: training loss flat at 1, then up 3 sigma. overfitting: validation loss flat
    at 1 then up 3 sigma, the training loss falling (noise TRAIN_NOISE). "step": all at once;
    "climb": by 3 sigma every max(RISING_RECENT_LOGS) logs, on and on.
    """
    window = max(RISING_RECENT_LOGS)

    def bump(i: int) -> float:
        k = i - CHANGE_AT
        return 0.0 if k < 1 else 3 * rel * (1 if change == "step" else k / window)

    delays: list[int | None] = []
    for seed in range(RULE_SERIES):
        rng = random.Random(seed)
        rising = draw(rng, flat, rel, measured, bump)
        if code == "loss_rising":
            records = [loss_record(i, t) for i, t in enumerate(rising, 1)]
        else:
            trains = draw(rng, falling, TRAIN_NOISE, measured)
            records = [loss_record(i, t, v)
                       for i, (t, v) in enumerate(zip(trains, rising, strict=True), 1)]
        rule = getattr(diagnostics, f"rule_{code}")
        delays.append(next((i - CHANGE_AT for i in range(CHANGE_AT + 1, LOGS + 1)
                            if rule(records[:i], diagnostics.RunFacts(10))), None))
    return delays


def missed(delays: list[int | None]) -> list[int]:
    """The seeds whose rise went unreported, or reported later than RISE_WITHIN logs."""
    return [seed for seed, d in enumerate(delays) if d is None or d > RISE_WITHIN]


STEP = [(code, rel, measured) for code in ("loss_rising", "overfitting")
        for measured in (True, False) for rel in DETECTABLE]


@pytest.mark.parametrize(("code", "rel", "measured"), [
    pytest.param(*case, marks=SCATTER_RUNS_HIGH if case[0] == "loss_rising" or not case[2]
                 else ()) for case in STEP])
def test_a_3_sigma_step_always_fires(code: str, rel: float, measured: bool) -> None:
    assert missed(logs_to_alarm(code, "step", rel, measured)) == []


@pytest.mark.parametrize(("code", "rel", "measured"), STEP)
def test_a_3_sigma_step_fires_nearly_always(code: str, rel: float, measured: bool) -> None:
    """Guards the rules' power while "always" falls short (above): at most 1 series in 50
    may miss."""
    assert len(missed(logs_to_alarm(code, "step", rel, measured))) <= RULE_SERIES // 50


@pytest.mark.parametrize(("code", "rel", "measured"), STEP)
def test_a_climb_of_3_sigma_a_window_always_fires(code: str, rel: float, measured: bool) -> None:
    assert missed(logs_to_alarm(code, "climb", rel, measured)) == []


@pytest.mark.parametrize("code", ["loss_rising", "overfitting"])
def test_a_rise_below_the_size_floor_is_never_reported(code: str) -> None:
    """A 6 % step measured to 0.5 %: sure, but below the 10 % floor, never worth an alert."""
    rel, step = 0.005, 0.06
    assert step + 3 * rel < LOSS_RISING_FRACTION
    for seed in range(20):
        rng = random.Random(seed)
        risen = [1.0 + step * (i > CHANGE_AT) + rel * rng.gauss(0, 1) for i in range(1, LOGS)]
        if code == "loss_rising":
            records = [loss_record(i, (v, rel)) for i, v in enumerate(risen, 1)]
        else:
            records = [loss_record(i, (2.0 * 0.98**i, 0.01), (v, rel))
                       for i, v in enumerate(risen, 1)]
        doctor = Diagnostician(10)
        assert [c for r in records for c in doctor.observe(r)
                if c.kind == "opened" and c.code == code] == []


# -- flat or slow --


def flat_or_slow(fall: float, rel: float, seeds: int = 20) -> list[list[Finding]]:
    """For each seed, the alerts opened on a training loss at 1.5 falling by `fall` across
    every FLAT_LOGS-log window, with measured noise rel."""
    per_log = (1 - fall) ** (1 / (FLAT_LOGS - 1))
    runs = []
    for seed in range(seeds):
        rng = random.Random(seed)
        doctor = Diagnostician(10)
        findings = []
        for i in range(1, 2 * FLAT_LOGS):
            level = 1.5 * per_log**i
            record = loss_record(i, (level * (1 + rel * rng.gauss(0, 1)), rel * level))
            findings += [c.episode.finding for c in doctor.observe(record) if c.kind == "opened"]
        runs.append(findings)
    return runs


def test_a_flat_loss_with_small_noise_is_flat() -> None:
    for findings in flat_or_slow(0.0, 0.005):
        assert [(f.code, f.fix) for f in findings] == [("loss_flat", {"learning_rate": 3e-3})]


def test_a_loss_falling_slowly_is_slow() -> None:
    """2 % across the window, very little noise: surely falling, surely by less than 5 %."""
    rel = 0.001
    for findings in flat_or_slow(0.02, rel):
        assert [(f.code, f.level) for f in findings] == [("loss_slow", "info")]
        assert findings[0].fix == {"learning_rate": 9e-4}  # raised 3x
        # the fitted fall, in %, within the rule's own margin of the true 2 %
        margin = 100 * evidence.z_threshold() * fall_se(rel)
        assert findings[0].value == pytest.approx(2.0, abs=margin)
        assert "falling slowly" in findings[0].message


def test_a_climbing_loss_is_never_called_flat() -> None:
    """The loss bottoms out at 1.0 and climbs 1 % a log (noise 0.1 %). At the climb's 8th
    log loss_flat opens: "stayed near 1.04 ... fitted change 3.68 %, surely less than a 5 %
    fall", fix lr 3e-4 -> 3e-3, the wrong way; it holds until loss_rising opens at the 18th
    with the opposite fix (3e-5)."""
    losses = [2.0 * 0.5 ** (i / 30) for i in range(31)] + [1.01**k for k in range(1, 31)]
    codes = alerts_opened([(y, 0.001 * y) for y in losses], [None] * len(losses))
    assert "loss_rising" in codes
    assert "loss_flat" not in codes
