"""The training-health rules on synthetic telemetry: each fires on its pathology, stays silent
on healthy (and noisy but healthy) series, and the Diagnostician reports a condition once.

Scenarios start from a healthy run (loss falling from ln 10 to 0.3, ratios around 1e-3,
activation stds 0.6-1.5, dead fractions below 0.2, gradient norms within +-30 %) and break one
thing, so any other finding would be a false alarm.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livetrain.trainer.diagnostics import (
    ACTIVATION_STD_FACTOR,
    ACTIVATION_STD_HIGH,
    ACTIVATION_STD_LOW,
    HISTORY_LOGS,
    INITIAL_LOSS_TOLERANCE,
    Diagnostician,
    Finding,
    LayerRecord,
    StepRecord,
)

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


def healthy_run(logs: int = 60, seed: int = 0, noise: float = 0.02) -> list[StepRecord]:
    """A step-0 record then logs-1 trained ones, the loss falling smoothly from ln 10 to 0.3."""
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
                step=i * EVERY,
                train_loss=loss * (1 + rng.uniform(-noise, noise)),
                validate_loss=0.9 * loss * (1 + rng.uniform(-noise, noise)),
                learning_rate=LR,
                optimizer="Adam",
                weight_decay=0.0,
                dropout=50,
                layers=healthy_layers(rng, i * EVERY),
            )
        )
    return records


def with_layer(record: StepRecord, name: str, **changes: float) -> StepRecord:
    layers = tuple(
        dataclasses.replace(layer, **changes) if layer.name == name else layer
        for layer in record.layers
    )
    return dataclasses.replace(record, layers=layers)


def set_layer(run: list[StepRecord], name: str, field: str, values: Sequence[float]) -> None:
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


def diagnose(run: Sequence[StepRecord], num_classes: int = 10) -> list[tuple[int, Finding]]:
    """Every finding a Diagnostician reports while the run is logged, with its step."""
    doctor = Diagnostician(num_classes)
    return [(record.step, f) for record in run for f in doctor.observe(record)]


def found(run: Sequence[StepRecord], code: str, num_classes: int = 10) -> list[Finding]:
    return [f for _, f in diagnose(run, num_classes) if f.code == code]


def only(run: Sequence[StepRecord], code: str, num_classes: int = 10) -> Finding:
    """The one finding of the run, which must have this code."""
    findings = [f for _, f in diagnose(run, num_classes)]
    assert [f.code for f in findings] == [code], findings
    return findings[0]


# --- the healthy baseline ------------------------------------------------------------------


def test_healthy_run_raises_nothing() -> None:
    assert diagnose(healthy_run(60)) == []


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    logs=st.integers(12, 120),
    noise=st.floats(0.0, 0.03),
)
def test_noisy_healthy_runs_raise_nothing(seed: int, logs: int, noise: float) -> None:
    assert diagnose(healthy_run(logs, seed, noise)) == []


def test_records_are_frozen() -> None:
    record = healthy_run(2)[1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.step = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.layers[0].grad_norm = 0.0  # type: ignore[misc]


# --- initial loss (seed 003) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss", "words"),
    [(5.0, "confidently wrong"), (0.5, "beats chance")],
)
def test_initial_loss_far_from_ln_c_fires(loss: float, words: str) -> None:
    run = healthy_run(5)
    run[0] = dataclasses.replace(run[0], validate_loss=loss)
    finding = only(run, "initial_loss")
    assert (finding.level, finding.layer, finding.fix) == ("warning", None, None)
    assert f"{loss:g}" in finding.message
    assert "2.3" in finding.message
    assert words in finding.recommendation


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
    assert len(found(run, "initial_loss")) == fires


def test_initial_loss_depends_on_the_number_of_classes() -> None:
    run = healthy_run(2)
    run[0] = dataclasses.replace(run[0], validate_loss=0.75)  # ln 2 = 0.69
    assert found(run, "initial_loss", num_classes=2) == []
    assert len(found(run, "initial_loss", num_classes=10)) == 1


def test_initial_loss_only_judges_the_step_0_record() -> None:
    run = healthy_run(5)[1:]  # no step-0 record: a high first loss is not the initial loss
    run[0] = dataclasses.replace(run[0], validate_loss=5.0)
    assert found(run, "initial_loss") == []


# --- update:parameter ratio (seeds 000-002) ------------------------------------------------


def test_update_ratio_high_fires_with_lr_fix() -> None:
    run = healthy_run(10)
    set_layer(run, "features.4", "update_ratio", [0.032, 0.030, 0.035])
    finding = only(run, "update_ratio_high")
    assert (finding.level, finding.layer) == ("warning", "features.4")
    assert "layer features.4" in finding.message
    assert "10^-1.5" in finding.message
    assert "0.032" in finding.message
    # 3e-4 * 1e-3 / 0.032 = 9.4e-06, one significant digit
    assert finding.fix == {"learning_rate": 9e-06}
    assert "9e-06" in finding.recommendation


def test_update_ratio_low_fires_per_layer_with_a_shared_fix() -> None:
    run = healthy_run(10)
    set_layer(run, "features.0", "update_ratio", [2e-5, 2e-5, 2e-5])
    set_layer(run, "classifier.1", "update_ratio", [5e-5, 5e-5, 5e-5])
    findings = found(run, "update_ratio_low")
    assert sorted(f.layer or "" for f in findings) == ["classifier.1", "features.0"]
    # median of the layers' ratios 3.5e-5: 3e-4 * 1e-3 / 3.5e-5 = 8.6e-03
    assert all(f.fix == {"learning_rate": 0.009} for f in findings)
    by_layer = {f.layer: f for f in findings}
    assert "2e-05" in by_layer["features.0"].message
    assert "10^-4.7" in by_layer["features.0"].message


def test_update_ratio_fix_is_clamped_to_the_largest_lr() -> None:
    run = healthy_run(10)
    set_records(run, learning_rate=[0.5] * 9)
    set_layer(run, "features.4", "update_ratio", [1e-5, 1e-5, 1e-5])
    assert only(run, "update_ratio_low").fix == {"learning_rate": 1.0}
    set_records(run, learning_rate=[1.0] * 9)
    finding = only(run, "update_ratio_low")
    assert finding.fix is None
    assert "already 1" in finding.recommendation


def test_update_ratio_skips_nan_ratios() -> None:
    run = healthy_run(10)
    set_layer(run, "features.4", "update_ratio", [0.05, math.nan, 0.05, math.nan, 0.05])
    assert only(run, "update_ratio_high").layer == "features.4"


@pytest.mark.parametrize(
    "ratios",
    [
        [0.05, 0.05],  # not yet 3 logs
        [0.05, 0.05, 0.005],  # back in the band
        [0.03, 0.001, 0.03, 0.001, 0.03, 0.001],  # noisy: never 3 in a row
        [0.05, 2e-5, 0.05],  # out on both sides, not one side 3 times
    ],
)
def test_update_ratio_not_persistent_is_silent(ratios: list[float]) -> None:
    run = healthy_run(10)
    set_layer(run, "features.4", "update_ratio", ratios)
    assert diagnose(run) == []


def test_update_ratio_low_ignores_layers_without_gradient() -> None:
    frozen, dead = healthy_run(10), healthy_run(10)
    set_layer(frozen, "features.0", "update_ratio", [0.0] * 5)  # transfer learning
    set_layer(frozen, "features.0", "grad_norm", [0.0] * 5)
    set_layer(dead, "features.0", "update_ratio", [1e-6, 1e-9, 1e-13])  # Adam's momentum decaying
    set_layer(dead, "features.0", "grad_norm", [0.0] * 3)
    assert diagnose(frozen) == []
    assert diagnose(dead) == []


# --- activation std (seeds 000/001) --------------------------------------------------------


def test_activation_std_low_fires() -> None:
    run = healthy_run(10)
    set_layer(run, "features.4", "act_std", [0.1, 0.12, 0.1, 0.09, 0.1])
    finding = only(run, "activation_std_low")
    assert (finding.level, finding.layer, finding.fix) == ("warning", "features.4", None)
    assert "layer features.4" in finding.message
    assert "0.1 " in finding.message
    assert "0.25" in finding.message
    assert "initialisation" in finding.recommendation


def test_activation_std_high_fires() -> None:
    run = healthy_run(10)
    set_layer(run, "classifier.1", "act_std", [26.0, 21.0, 18.0, 15.0, 14.0])  # N(0, 1) init
    finding = only(run, "activation_std_high")
    assert (finding.level, finding.layer, finding.fix) == ("warning", "classifier.1", None)
    assert "layer classifier.1" in finding.message
    assert "18 " in finding.message
    assert "normalise" in finding.recommendation


def test_activation_std_limits_are_the_band_times_the_factor() -> None:
    low, high = (
        ACTIVATION_STD_LOW / ACTIVATION_STD_FACTOR,
        ACTIVATION_STD_HIGH * ACTIVATION_STD_FACTOR,
    )
    for value, code in [(0.99 * low, "activation_std_low"), (1.01 * high, "activation_std_high")]:
        run = healthy_run(10)
        set_layer(run, "features.4", "act_std", [value] * 5)
        assert only(run, code).layer == "features.4"
    for value in (1.01 * low, 0.99 * high):
        run = healthy_run(10)
        set_layer(run, "features.4", "act_std", [value] * 5)
        assert diagnose(run) == []


def test_activation_std_of_a_real_default_run_is_silent() -> None:
    """Measured on the default small CNN: BN'd post-ReLU convs at 0.55-0.6, the fc layer
    growing from 1.2 to 2.6 over 20 epochs while validation loss kept falling."""
    run = healthy_run(30)
    set_layer(run, "features.0", "act_std", [0.55] * 29)
    set_layer(run, "classifier.1", "act_std", [1.2 + 1.4 * i / 28 for i in range(29)])
    assert diagnose(run) == []


@pytest.mark.parametrize(
    ("name", "stds"),
    [
        ("features.4", [0.1, 0.1, 0.1, 0.1]),  # 4 logs, not 5
        ("features.4", [0.1, 0.1, 0.8, 0.1, 0.1]),  # one healthy log breaks the run
        ("features.4", [0.1, 10.0, 0.1, 10.0, 0.1]),  # both sides, neither persistent
        (LOGITS, [0.05] * 9),  # logits: no nonlinearity, any spread is fine
    ],
)
def test_activation_std_not_persistent_is_silent(name: str, stds: list[float]) -> None:
    run = healthy_run(10)
    set_layer(run, name, "act_std", stds)
    assert diagnose(run) == []


def test_activation_std_ignores_the_step_0_record() -> None:
    """At step 0 eval-mode BatchNorm still has its initial running statistics."""
    run = healthy_run(5)
    set_layer(run, "features.4", "act_std", [0.1] * 5)
    assert diagnose(run) == []
    run = healthy_run(6)
    set_layer(run, "features.4", "act_std", [0.1] * 5)
    assert only(run, "activation_std_low").layer == "features.4"


# --- dead ReLUs (seed 003) -----------------------------------------------------------------


def test_dead_relu_fires_with_lr_fix() -> None:
    run = healthy_run(10)
    set_layer(run, "classifier.1", "dead_fraction", [0.9, 0.9])
    finding = only(run, "dead_relu")
    assert (finding.level, finding.layer) == ("warning", "classifier.1")
    assert "layer classifier.1" in finding.message
    assert "90 %" in finding.message
    assert finding.fix == {"learning_rate": 3e-05}
    assert "leaky ReLU" in finding.recommendation


@pytest.mark.parametrize(
    ("name", "fractions"),
    [
        ("classifier.1", [0.9]),  # one log
        ("classifier.1", [0.9, 0.1, 0.9, 0.1]),  # flickering
        ("classifier.1", [0.5, 0.5, 0.5]),  # half is not most
        (LOGITS, [1.0, 1.0, 1.0]),  # no ReLU after the logits
    ],
)
def test_dead_relu_not_persistent_is_silent(name: str, fractions: list[float]) -> None:
    run = healthy_run(10)
    set_layer(run, name, "dead_fraction", fractions)
    assert diagnose(run) == []


# --- loss rising / flat (seeds 000/001) ----------------------------------------------------


def test_loss_rising_fires_with_lr_fix() -> None:
    run = healthy_run(7)  # the window is the whole run
    set_records(run, train_loss=[0.50, 0.52, 0.51, 0.60, 0.62, 0.65])
    finding = only(run, "loss_rising")
    assert (finding.level, finding.layer) == ("warning", None)
    assert "21.6 %" in finding.message  # medians 0.51 -> 0.62
    assert "0.51" in finding.message
    assert "0.62" in finding.message
    assert finding.fix == {"learning_rate": 3e-05}
    assert "normalised" in finding.recommendation


def test_loss_rising_catches_a_single_jump() -> None:
    run = healthy_run(10)
    set_records(run, train_loss=[0.3, 0.3, 0.3, 2.3, 2.3, 2.3])
    assert "667 %" in only(run, "loss_rising").message


@pytest.mark.parametrize(
    "losses",
    [
        [0.50, 0.50, 0.50, 0.90, 0.50, 0.50],  # one noisy log
        [0.50, 0.53, 0.49, 0.54, 0.50, 0.52],  # noisy plateau
        [0.50, 0.51, 0.52, 0.53, 0.54, 0.55],  # creeping up 2 % a log: below 10 %
    ],
)
def test_loss_rising_ignores_noise(losses: list[float]) -> None:
    run = healthy_run(10)
    set_records(run, train_loss=losses)
    assert found(run, "loss_rising") == []


@pytest.mark.parametrize(
    "change", [{"dropout": [50, 50, 50, 70, 70, 70]}, {"weight_decay": [0, 0, 0, 1e-4, 1e-4, 1e-4]}]
)
def test_loss_rising_after_more_regularisation_is_silent(change: dict[str, list[float]]) -> None:
    run = healthy_run(10)
    set_records(run, train_loss=[0.50, 0.52, 0.51, 0.60, 0.62, 0.65], **change)
    assert found(run, "loss_rising") == []


FLAT = [1.500, 1.503, 1.497, 1.501, 1.499, 1.502, 1.498, 1.500]


def test_loss_flat_fires_with_lr_fix() -> None:
    run = healthy_run(9)
    set_records(run, train_loss=FLAT)
    finding = only(run, "loss_flat")
    assert (finding.level, finding.layer) == ("warning", None)
    assert "1.5 " in finding.message
    assert finding.fix == {"learning_rate": 0.003}


@pytest.mark.parametrize("optimizer", ["SGD", "SGD+Nesterov"])
def test_loss_flat_with_sgd_suggests_adam(optimizer: str) -> None:
    run = healthy_run(9)
    set_records(run, train_loss=FLAT, optimizer=[optimizer] * 8, learning_rate=[0.01] * 8)
    finding = only(run, "loss_flat")
    assert finding.fix == {"optimizer": "Adam", "learning_rate": 3e-4}
    assert optimizer in finding.recommendation


def test_loss_flat_floor_scales_with_classes() -> None:
    run = healthy_run(9)
    set_records(run, train_loss=[0.2 * x / 1.5 for x in FLAT])  # below 0.1 ln 10 = 0.23
    assert found(run, "loss_flat") == []
    assert len(found(run, "loss_flat", num_classes=2)) == 1  # above 0.1 ln 2 = 0.07


def test_loss_flat_after_a_collapse_is_left_to_dead_relu() -> None:
    """Adam at lr 0.1 on the small CNN: the loss sat at ln 10, gradients 0, layers all dead."""
    run = healthy_run(9)
    set_records(run, train_loss=[2.31] * 8)
    set_layer(run, "classifier.1", "dead_fraction", [1.0] * 8)
    set_layer(run, "features.4", "update_ratio", [1e-6, 1e-8, 1e-10, 1e-12, 1e-13, 1e-13, 1e-13])
    set_layer(run, "features.4", "grad_norm", [0.0] * 7)
    codes = [f.code for _, f in diagnose(run)]
    assert codes == ["dead_relu"]


def test_loss_flat_after_a_setback_is_silent() -> None:
    run = healthy_run(13)
    set_records(run, train_loss=[0.5] * 4 + [2.3] * 8)
    assert found(run, "loss_flat") == []
    assert len(found(run, "loss_rising")) == 1


def test_loss_flat_slow_but_falling_is_silent() -> None:
    run = healthy_run(9)
    set_records(run, train_loss=[1.5 * 0.98**i for i in range(8)])
    assert diagnose(run) == []


# --- exploding gradients (seed 003) --------------------------------------------------------

STEADY = [0.7, 1.3, 0.8, 1.2, 1.0, 0.7, 1.3, 0.9, 1.1, 1.0]  # median 1.0, +-30 %


def test_exploding_gradients_fires_with_lr_fix() -> None:
    run = healthy_run(12)
    set_layer(run, "features.4", "grad_norm", [*STEADY, 20.0])
    finding = only(run, "exploding_gradients")
    assert (finding.level, finding.layer) == ("warning", "features.4")
    assert "layer features.4" in finding.message
    assert "gradient norm 20 is 20x its median 1 " in finding.message
    assert finding.fix == {"learning_rate": 3e-05}
    assert "clipping" in finding.recommendation


def test_exploding_gradients_threshold_is_10x() -> None:
    below, above = healthy_run(12), healthy_run(12)
    set_layer(below, "features.4", "grad_norm", [*STEADY, 9.9])
    set_layer(above, "features.4", "grad_norm", [*STEADY, 10.1])
    assert diagnose(below) == []
    assert only(above, "exploding_gradients").layer == "features.4"


def test_exploding_gradients_needs_5_previous_logs() -> None:
    four, five = healthy_run(6), healthy_run(7)
    set_layer(four, "features.4", "grad_norm", [1.0] * 4 + [50.0])
    set_layer(five, "features.4", "grad_norm", [1.0] * 5 + [50.0])
    assert diagnose(four) == []
    assert only(five, "exploding_gradients").layer == "features.4"


def test_exploding_gradients_ignores_a_layer_without_gradient() -> None:
    run = healthy_run(12)  # a frozen layer unfrozen: from 0 to anything is no spike
    set_layer(run, "features.0", "grad_norm", [0.0] * 10 + [1.0])
    assert diagnose(run) == []


# --- overfitting (seed 002) ----------------------------------------------------------------

TRAIN_FALLING = [0.50, 0.45, 0.42, 0.40, 0.37, 0.35]
VAL_RISING = [0.30, 0.31, 0.32, 0.36, 0.38, 0.40]


def test_overfitting_fires_with_weight_decay_fix() -> None:
    run = healthy_run(7)  # the window is the whole run
    set_records(run, train_loss=TRAIN_FALLING, validate_loss=VAL_RISING)
    finding = only(run, "overfitting")
    assert (finding.level, finding.layer) == ("warning", None)
    assert "26.7 %" in finding.message  # best 0.30 -> median of the last three 0.38
    assert "(0.3 at step 50 -> 0.38)" in finding.message
    assert "from 0.5 to 0.37" in finding.message
    assert finding.fix == {"weight_decay": 1e-4}
    assert "early stopping" in finding.recommendation
    assert "step 50" in finding.recommendation  # the best validation loss, 0.30


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
    run = healthy_run(8)
    set_records(run, train_loss=TRAIN_FALLING, validate_loss=VAL_RISING)
    run = [dataclasses.replace(r, weight_decay=weight_decay, dropout=dropout) for r in run]
    assert only(run, "overfitting").fix == fix


def test_overfitting_skips_logs_without_validation() -> None:
    run = healthy_run(12)
    set_records(
        run,
        train_loss=[0.50, 0.47, 0.45, 0.43, 0.42, 0.41, 0.40, 0.38, 0.37, 0.36, 0.35],
        validate_loss=[0.30, None, 0.31, None, 0.32, None, 0.36, None, 0.38, None, 0.40],
    )
    assert only(run, "overfitting").fix == {"weight_decay": 1e-4}


@pytest.mark.parametrize(
    ("train", "val"),
    [
        (TRAIN_FALLING, [0.30, 0.31, 0.29, 0.30, 0.31, 0.30]),  # noisy flat validation
        (TRAIN_FALLING, [0.30, 0.30, 0.30, 0.50, 0.30, 0.30]),  # one outlier
        ([0.35, 0.37, 0.40, 0.42, 0.45, 0.50], VAL_RISING),  # both rising: not overfitting
    ],
)
def test_overfitting_needs_a_real_divergence(train: list[float], val: list[float]) -> None:
    """Also: a slow climb is caught (see test_overfitting_catches_a_slow_climb)."""
    run = healthy_run(8)
    set_records(run, train_loss=train, validate_loss=val)
    assert found(run, "overfitting") == []


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
    assert diagnose(run) == []


def test_a_gradient_not_measured_is_not_non_finite() -> None:
    """The log that ends a stopped run follows no fresh backward pass: its gradient norms
    are None, and that is no error (a soak found the final log of every stopped run
    reported as non-finite)."""
    run = healthy_run(12)
    set_layer(run, "features.4", "grad_norm", [None])
    assert found(run, "non_finite") == [] and found(run, "exploding_gradients") == []
    set_layer(run, "features.4", "grad_norm", [math.nan])  # measured, and NaN: an error
    assert "gradient norm nan" in only(run, "non_finite").message


# --- the Diagnostician ---------------------------------------------------------------------


def test_a_persisting_condition_is_reported_once_and_again_after_clearing() -> None:
    run = healthy_run(20)
    high, ok = 0.05, 1e-3
    # logs 1-19: in band x2, high x6, in band x3, high x4, in band x4
    set_layer(
        run, "features.4", "update_ratio", [ok] * 2 + [high] * 6 + [ok] * 3 + [high] * 4 + [ok] * 4
    )
    reported = [(step, f.code, f.layer) for step, f in diagnose(run)]
    assert reported == [
        (5 * EVERY, "update_ratio_high", "features.4"),  # 3rd high log
        (14 * EVERY, "update_ratio_high", "features.4"),  # 3rd high log after clearing
    ]


def test_conditions_on_different_layers_are_reported_separately() -> None:
    run = healthy_run(10)
    set_layer(run, "features.4", "update_ratio", [0.05] * 5)
    set_layer(run, "features.0", "update_ratio", [0.05] * 3)
    reported = [(step, f.layer) for step, f in diagnose(run) if f.code == "update_ratio_high"]
    assert reported == [(7 * EVERY, "features.4"), (9 * EVERY, "features.0")]


def test_a_rollback_forgets_the_abandoned_branch() -> None:
    run = healthy_run(11)
    set_layer(run, "features.4", "update_ratio", [0.05] * 7)  # high from step 200
    doctor = Diagnostician(10)
    reported = [(r.step, f.code) for r in run for f in doctor.observe(r)]
    assert reported == [(300, "update_ratio_high")]
    # roll back to the checkpoint at step 350; the next log is at 400, still too high
    again = doctor.observe(dataclasses.replace(run[8], step=400))
    assert [(f.code, f.layer) for f in again] == [("update_ratio_high", "features.4")]
    assert [r.step for r in doctor.history] == [0, 50, 100, 150, 200, 250, 300, 350, 400]


def test_history_is_bounded() -> None:
    doctor = Diagnostician(10)
    for record in healthy_run(HISTORY_LOGS + 20):
        doctor.observe(record)
    assert len(doctor.history) == HISTORY_LOGS


def test_needs_two_classes() -> None:
    with pytest.raises(ValueError, match="2 classes"):
        Diagnostician(1)


def test_overfitting_catches_a_slow_climb() -> None:
    """Measured on mnist5k with --overfit-batches 1: +1-3 % a log, never 10 % in 6 logs."""
    val = [1.6, 1.19, 0.954, 1.09, 1.009, 0.96, 0.992, 1.022, 1.043, 1.059, 1.069, 1.075]
    train = [2.7, 0.67, 0.18, 0.056, 0.014, 0.0036, 0.0023, 0.0018, 0.0011, 8e-4, 6e-4, 5e-4]
    run = healthy_run(len(val) + 1)
    set_records(run, train_loss=train, validate_loss=val)
    assert only(run, "overfitting").fix == {"weight_decay": 1e-4}
    set_records(run, train_loss=train, validate_loss=[*val[:9], 1.0, 1.0, 1.0])
    assert found(run, "overfitting") == []


def test_no_fix_leads_back_to_an_lr_that_blew_up() -> None:
    """After recovering at 0.1 from a blow-up at 1.0, 'raise lr to 1' is not offered."""
    doctor = Diagnostician(10)
    doctor.note_blow_up(1.0)
    run = healthy_run(10)
    set_records(run, learning_rate=[0.1] * 9)
    set_layer(run, "features.4", "update_ratio", [1e-5, 1e-5, 1e-5])
    findings = [f for record in run for f in doctor.observe(record)]
    [finding] = [f for f in findings if f.code == "update_ratio_low"]
    assert finding.fix == {"learning_rate": 0.3}
    assert "made this run blow up" in finding.recommendation
    # without the blow-up the same run is told to go to 1
    assert only(run, "update_ratio_low").fix == {"learning_rate": 1.0}
