"""The health rules read what the run itself asked for (issue 21): a schedule that anneals
or warms up the lr, a model that has converged, a loss that falls slowly, a layer out of
the band while the run learns. Synthetic series, fed to a Diagnostician as a run logs them.

Each silent case has a twin that differs only in what the rules are meant to read (the
schedule, the floor), and the twin fires: the silence comes from that, not from a rule that
cannot fire.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from livetrain.trainer.diagnostician import Diagnostician
from livetrain.trainer.diagnostics import LayerRecord, StepRecord

LN10 = math.log(10)
BASE_LR = 1e-3
EVERY = 10
LOGS = 80
NAMES = ("features.0", "features.4", "classifier.1")
Factor = Callable[[int], float]


def layers(rng: random.Random, ratio: float, act_std: float = 1.0) -> tuple[LayerRecord, ...]:
    """Healthy layers whose update ratio is `ratio` (give or take 20 %)."""
    return tuple(
        LayerRecord(name, 0.5, act_std * rng.uniform(0.9, 1.1), 0.4, 0.0,
                    1.0 * rng.uniform(0.8, 1.2), ratio * rng.uniform(0.8, 1.2), True)
        for name in NAMES)


def series(loss: Callable[[int], float], factor: Factor, ratio_at_base: float = 1e-3,
           scheduled: bool = True, accuracy: Callable[[float], float] | None = None,
           act_std: float = 1.0, seed: int = 0, noise: float = 0.01) -> list[StepRecord]:
    """A step-0 record and LOGS trained ones every EVERY steps. The lr in force is
    BASE_LR * factor(step), and each layer's update ratio scales with it (as Adam's does).
    `scheduled` False: the same run logged without its base lr (no schedule known)."""
    rng = random.Random(seed)
    records = [StepRecord(0, math.nan, LN10, BASE_LR * factor(0), "Adam", 0.0, 0,
                          layers(rng, math.nan, act_std))]
    for i in range(1, LOGS + 1):
        step = i * EVERY
        value = loss(step) * (1 + rng.gauss(0, noise))
        records.append(StepRecord(
            step=step, train_loss=value, validate_loss=None,
            learning_rate=BASE_LR * factor(step), optimizer="Adam", weight_decay=0.0,
            dropout=0, layers=layers(rng, ratio_at_base * factor(step), act_std),
            train_loss_se=noise * value / 3,
            base_learning_rate=BASE_LR if scheduled else None,
            train_accuracy=None if accuracy is None else accuracy(value)))
    return records


def diagnose(records: list[StepRecord], num_classes: int = 10) -> dict[str, str]:
    """code -> level of every episode the run opened."""
    doctor = Diagnostician(num_classes)
    opened: dict[str, str] = {}
    for record in records:
        for change in doctor.observe(record):
            if change.kind == "opened":
                opened[change.code] = change.level
    return opened


def warnings(found: dict[str, str]) -> set[str]:
    return {code for code, level in found.items() if level != "info"}


TOTAL = LOGS * EVERY


def cosine(step: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / TOTAL))


def warmup(step: int) -> float:
    return min(1.0, step / (0.6 * TOTAL))


def falling_then_flat(step: int) -> float:
    """From ln 10 down to 0.6, where it levels off as the lr anneals."""
    return 0.6 + (LN10 - 0.6) * math.exp(-step / 150)


def test_annealing_to_zero_is_silent() -> None:
    """Cosine to 0: the update ratio falls with the lr to 1e-6 and the loss levels off.
    Both are the schedule's doing; the same series without the schedule's base lr
    (a loop that lowers the lr by hand, unknown to the rules) is "lr too low"."""
    run = series(falling_then_flat, cosine)
    assert run[-1].learning_rate < 1e-5 and run[-1].schedule_factor < 1e-2
    assert warnings(diagnose(run)) == set()
    assert "update_ratio_low" in warnings(diagnose(series(falling_then_flat, cosine,
                                                          scheduled=False)))


def test_warmup_from_zero_is_silent() -> None:
    """The lr ramps up from 0 over 60 % of the run: the first logs' ratios are tiny and the
    loss barely moves until the lr is up."""
    def slow_start(step: int) -> float:
        return LN10 if step < 200 else 0.5 + (LN10 - 0.5) * math.exp(-(step - 200) / 200)
    run = series(slow_start, warmup)
    assert run[1].layers[0].update_ratio < 1e-4
    assert warnings(diagnose(run)) == set()
    assert "loss_flat" in warnings(diagnose(series(slow_start, warmup, scheduled=False)))


def test_a_plateau_at_the_floor_is_converged_news() -> None:
    """The loss falls to 0.005 and stays (100 % of training samples right), its updates
    shrink with its gradients: one converged info episode, and no warning."""
    def to_zero(step: int) -> float:
        return 0.005 + (LN10 - 0.005) * math.exp(-step / 60)

    def shrinking(step: int) -> float:
        return max(0.02, math.exp(-step / 120))

    run = series(to_zero, shrinking, scheduled=False,
                 accuracy=lambda loss: min(100.0, 100 * (1 - loss / 3)))
    found = diagnose(run)
    assert found == {"converged": "info"}, found
    # a classifier's floor: the same series with a loss 20x higher is not converged
    high = series(lambda s: 20 * to_zero(s), shrinking, scheduled=False)
    assert "converged" not in diagnose(high)


def test_converged_is_one_episode_through_noise_around_the_floor() -> None:
    def to_zero(step: int) -> float:
        return 0.03 + (LN10 - 0.03) * math.exp(-step / 60)
    found = []
    doctor = Diagnostician(10)
    for record in series(to_zero, lambda s: 1.0, noise=0.3, seed=4):
        found += [c.code for c in doctor.observe(record) if c.kind == "opened"]
    assert found == ["converged"]


def test_a_loss_that_doubles_at_its_floor_is_not_rising_one_that_climbs_off_it_is() -> None:
    """Converged at 0.004, the loss goes to 0.01 for the last 20 logs: beyond noise and
    far beyond 10 %, and nothing to act on. The same jump to 1.0 leaves the floor."""
    def settle_then(jump: float) -> Callable[[int], float]:
        def loss(step: int) -> float:
            floor = 0.004 + (LN10 - 0.004) * math.exp(-step / 60)
            return jump if step > TOTAL - 200 else floor
        return loss

    found = diagnose(series(settle_then(0.01), lambda s: 1.0))
    assert found == {"converged": "info"}, found
    assert "loss_rising" in warnings(diagnose(series(settle_then(1.0), lambda s: 1.0)))


def test_a_real_lr_too_low_plateau_fires() -> None:
    """lr 1e-3 with no schedule, updates 3e-5 of the weights, the loss stuck near ln 10:
    too low, as seeds 000-002 say."""
    run = series(lambda s: 2.3 - 1e-5 * s, lambda s: 1.0, ratio_at_base=3e-5)
    found = diagnose(run)
    assert {"update_ratio_low", "loss_flat"} <= warnings(found), found
    assert "converged" not in found


def test_a_schedule_does_not_excuse_a_low_set_lr() -> None:
    """Under the same cosine schedule, a set lr too low to learn still fires: its ratio is
    low at the lr the run was set to, before the schedule lowered it."""
    run = series(lambda s: 2.3 - 1e-5 * s, cosine, ratio_at_base=2e-5)
    assert "update_ratio_low" in warnings(diagnose(run))


def test_a_slow_but_real_fall_is_never_flat() -> None:
    """A slow learner as torch initialises it: the loss falls 3 % per 100 steps, too
    little for a 20-log window to tell from noise, but plain over the run."""
    run = series(lambda s: LN10 * (1 - 3e-4 * s), lambda s: 1.0, noise=0.02)
    found = diagnose(run)
    assert "loss_flat" not in found, found
    assert warnings(found) == set()


def test_activations_out_of_band_while_learning_are_info() -> None:
    """A layer's activation std at 0.15 (below 0.25) while the loss falls: noted as info.
    The same layer in a run stuck at chance level is a warning."""
    learning = diagnose(series(falling_then_flat, lambda s: 1.0, act_std=0.15))
    assert learning.get("activation_std_low") == "info", learning
    stuck = diagnose(series(lambda s: 2.31, lambda s: 1.0, act_std=0.15))
    assert stuck.get("activation_std_low") == "warning", stuck
