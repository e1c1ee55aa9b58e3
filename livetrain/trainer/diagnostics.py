"""Training-health rules: pure functions over logged telemetry (no torch, no SQL, no I/O).

At every logged step the trainer hands a StepRecord to a Diagnostician; each Finding that comes
back becomes an `events` row, and the board offers its `fix` as a one-click parameter change.
Each threshold names its source seed (../shared/seeds, see its README). All were checked on
telemetry recorded from real training runs, computed as LayerRecord defines it: the default
(small CNN, Adam, lr 3e-4, mnist5k; 3 seeds, 10-20 epochs) raises nothing, and each broken run
(Adam at lr 0.01 and 0.1, SGD at lr 1e-4, weights drawn from N(0, 1)) raises its finding.

What the rules assume of the records:
- the step-0 record is logged before any update: only validate_loss and the activations mean
  something there, so train_loss, grad_norm and update_ratio are ignored on it;
- update_ratio is NaN when undefined and 0 for a layer that is not trained (frozen): both are
  skipped, not reported;
- a record whose step is not after the previous one follows a rollback (see Diagnostician).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from statistics import fmean, linear_regression, median

from livetrain.db.contract import DEFAULTS, DROPOUT_MAX, LR_MAX, WEIGHT_DECAY_MAX

# seed 003: an untrained C-class softmax model should lose -ln(1/C) (2.302 for 10 classes). The
# default init lands within 0.02 of it (2.298-2.313 measured); N(0, 1) weights gave 21835.
INITIAL_LOSS_TOLERANCE = 0.5  # warn when |L0 - ln C| > 0.5 ln C (L0 outside 1.15..3.45 for C=10)

# seeds 000-002: update:parameter ratio about 1e-3 (log10 -3); worry outside 1e-4..1e-2.
UPDATE_RATIO_TARGET = 1e-3
UPDATE_RATIO_LOW = 1e-4
UPDATE_RATIO_HIGH = 1e-2
UPDATE_RATIO_LOGS = 3  # consecutive logs out of the band, per layer

# seeds 000/001: activation std about 0.5..2.0; "far outside" it signals trouble.
ACTIVATION_STD_LOW = 0.5
ACTIVATION_STD_HIGH = 2.0
ACTIVATION_STD_FACTOR = 2.0  # how far outside the band counts as far (see rule_activation_std)
ACTIVATION_STD_LOGS = 5  # consecutive logs

# seed 003: dead ReLUs, units that output zero for every input.
DEAD_RELU_FRACTION = 0.5  # "most units of the layer"
DEAD_RELU_LOGS = 2

# seeds 000/001: the loss should fall; rising -> lr too high or bad normalization; flat (or
# falling very slowly) -> lr too low or a hard optimization, try another updater.
LOSS_RISING_LOGS = 6  # compares the medians of the window's two halves
LOSS_RISING_FRACTION = 0.10  # rise of the later half over the earlier one
LOSS_FLAT_LOGS = 8
LOSS_FLAT_CHANGE = 0.01  # change of a line fitted through the window, relative to its mean
LOSS_FLAT_FLOOR = 0.1  # times ln C: below this the loss is low enough to level off

# seed 003 (and 001: "watch for unusually large updates"): exploding gradients.
GRADIENT_SPIKE_FACTOR = 10.0  # times the median of the layer's previous logs
GRADIENT_BASELINE_LOGS = 10
GRADIENT_BASELINE_MIN_LOGS = 5

# seed 002: early stopping; L2 typically 1e-3..1e-6; dropout 0.5 is common.
OVERFIT_LOGS = 6  # compares the medians of the window's two halves
OVERFIT_RISE = 0.10  # validation rise of the later half over the earlier one
OVERFIT_WEIGHT_DECAY_START = 1e-4  # suggested when weight decay is 0
OVERFIT_WEIGHT_DECAY_MAX = 1e-3  # past this, suggest more dropout instead
OVERFIT_DROPOUT_STEP = 20  # percent

BLOW_UP_MARGIN = 0.3  # a suggested lr stays below 0.3x the lr the run blew up at
HISTORY_LOGS = 100  # records a Diagnostician keeps; every rule's window fits in it
SGD_FAMILY = ("SGD", "SGD+Nesterov")


@dataclass(frozen=True)
class LayerRecord:
    """One conv/fc layer at one logged step."""

    name: str  # e.g. "features.0"
    act_mean: float  # activation after the nonlinearity, on a validation batch
    act_std: float
    zero_fraction: float  # fraction of exact zeros in that activation (0..1)
    dead_fraction: float  # fraction of units zero for every sample of the batch (0..1)
    grad_norm: float | None  # L2 norm of the weight gradient at the last step; None when
    # not measured (a log that ends a stopped run follows no fresh backward pass)
    update_ratio: float  # mean|dw| / mean|w| over the last optimizer step (NaN if undefined)
    has_nonlinearity: bool  # False for the logits layer: activation rules skip it


@dataclass(frozen=True)
class StepRecord:
    """One logged step, with the parameters in force at it."""

    step: int
    train_loss: float  # averaged since the previous log
    validate_loss: float | None
    learning_rate: float
    optimizer: str
    weight_decay: float
    dropout: int  # percent
    layers: tuple[LayerRecord, ...]
    train_loss_se: float | None = None  # standard error of train_loss (None: not measured)
    validate_loss_se: float | None = None  # standard error of validate_loss


@dataclass(frozen=True)
class Finding:
    """A problem worth an `events` row, with the parameter change that addresses it if any."""

    code: str
    level: str  # "warning" or "error"
    message: str
    recommendation: str
    fix: dict[str, float | str] | None  # keys among optimizer, learning_rate, weight_decay, dropout
    layer: str | None = None


Rule = Callable[[Sequence[StepRecord], int], list[Finding]]


def _g(x: float) -> str:
    """Three significant digits: 0.0323, 2.3, 1.2e-05."""
    return f"{x:.3g}"


def _trained(history: Sequence[StepRecord]) -> list[StepRecord]:
    """Records after the first update: step 0 has no training loss, gradient or update."""
    return [r for r in history if r.step > 0]


def _layer_values(records: Sequence[StepRecord], name: str, field: str) -> list[float]:
    """One layer's field across records, in order (records missing the layer are skipped)."""
    return [getattr(layer, field) for r in records for layer in r.layers if layer.name == name]


def _halves(values: Sequence[float]) -> tuple[float, float]:
    """Medians of the earlier and later half: a trend that one noisy log cannot fake."""
    half = len(values) // 2
    return median(values[:half]), median(values[half:])


def _scaled_lr(lr: float, factor: float) -> float:
    """lr * factor at one significant digit (3e-05, not 3.1416e-05), at most LR_MAX."""
    return min(LR_MAX, float(f"{lr * factor:.0e}"))


def _lr_advice(
    record: StepRecord, factor: float, cause: str
) -> tuple[str, dict[str, float | str] | None]:
    """Recommendation and fix for lr * factor; no fix when that leaves the lr unchanged."""
    lr = _scaled_lr(record.learning_rate, factor)
    if lr == record.learning_rate:
        return f"{cause}; the learning rate is already {_g(lr)}, the limit", None
    return f"{cause}: set lr to {lr:g} (now {_g(record.learning_rate)})", {"learning_rate": lr}


def rule_initial_loss(history: Sequence[StepRecord], num_classes: int) -> list[Finding]:
    """Seed 003: the untrained model's loss should be near -ln(1/C), chance for C classes.

    Evaluated on the step-0 record's validation loss only.
    """
    record = history[-1]
    loss = record.validate_loss
    if record.step != 0 or loss is None or not math.isfinite(loss) or num_classes < 2:
        return []  # not a classifier, or one whose classes are unknown: no chance level
    expected = math.log(num_classes)
    if abs(loss - expected) <= INITIAL_LOSS_TOLERANCE * expected:
        return []
    if loss > expected:
        advice = (
            "the untrained model is confidently wrong: check the weight initialisation (the "
            "output layer's weights should be small) and that the inputs are normalised"
        )
    else:
        advice = (
            "the untrained model already beats chance: check that the loss uses the right "
            "labels and that no label information leaks into the inputs"
        )
    message = (
        f"initial validation loss {_g(loss)} is far from -ln(1/{num_classes}) = {_g(expected)}, "
        f"the loss of an untrained {num_classes}-class model"
    )
    return [Finding("initial_loss", "warning", message, advice, None)]


def rule_update_ratio(history: Sequence[StepRecord], num_classes: int) -> list[Finding]:
    """Seeds 000-002: a layer's update:parameter ratio out of 1e-4..1e-2 for 3 logs in a row.

    NaN and zero ratios are skipped (undefined, or a frozen layer). On the low side, logs where
    the layer's gradient is exactly 0 are skipped too: no gradient reaches a dead or frozen layer,
    and a higher learning rate would not change that (measured: Adam at lr 0.1 killed the net
    and its ratios fell to 1e-13; raising the lr would be the wrong advice). The fix scales lr
    by 1e-3 / (median ratio of the offending layers).
    """
    record = history[-1]
    trained = _trained(history)
    offending: dict[str, dict[str, float]] = {"high": {}, "low": {}}
    for layer in record.layers:
        pairs = zip(
            _layer_values(trained, layer.name, "update_ratio"),
            _layer_values(trained, layer.name, "grad_norm"),
            strict=True,
        )
        defined = [(r, g) for r, g in pairs if math.isfinite(r) and r > 0]
        high = [r for r, _ in defined][-UPDATE_RATIO_LOGS:]
        low = [r for r, g in defined if g != 0][-UPDATE_RATIO_LOGS:]
        if len(high) == UPDATE_RATIO_LOGS and all(r > UPDATE_RATIO_HIGH for r in high):
            offending["high"][layer.name] = median(high)
        elif len(low) == UPDATE_RATIO_LOGS and all(r < UPDATE_RATIO_LOW for r in low):
            offending["low"][layer.name] = median(low)
    findings = []
    for side, ratios in offending.items():
        if not ratios:
            continue
        recommendation, fix = _lr_advice(
            record,
            UPDATE_RATIO_TARGET / median(ratios.values()),
            f"the learning rate is too {side} (seeds 000-002: aim for a ratio near 1e-3)",
        )
        where = "above" if side == "high" else "below"
        for name, ratio in ratios.items():
            message = (
                f"layer {name}: updates are 10^{math.log10(ratio):.1f} of its weights "
                f"(update:parameter ratio {_g(ratio)}) for {UPDATE_RATIO_LOGS} logs in a row, "
                f"{where} the healthy 10^{math.log10(UPDATE_RATIO_LOW):g} to "
                f"10^{math.log10(UPDATE_RATIO_HIGH):g}"
            )
            findings.append(
                Finding(f"update_ratio_{side}", "warning", message, recommendation, fix, name)
            )
    return findings


def rule_activation_std(history: Sequence[StepRecord], num_classes: int) -> list[Finding]:
    """Seeds 000/001: activation std far outside 0.5..2.0 on 5 consecutive logs.

    The band is the seeds' and the board draws it, but a layer is flagged only when every one
    of its last 5 trained logs is more than ACTIVATION_STD_FACTOR (2x) beyond it: below 0.25 or
    above 4.0. Why not the bare band: post-ReLU activations of healthy nets sit on its edges.
    BatchNorm'd conv layers give ReLU(N(0, 1)), std 0.58 (measured 0.55-0.59, so a slight drop
    of the BN scale, e.g. from weight decay, would cross 0.5); the default run's fc layer grows
    steadily past 2.0 (2.0-2.2 at 10 epochs, 2.6 at 20, on 3 seeds) while validation loss still
    falls. Broken runs are far outside: N(0, 1) init gave 14-26, a dead layer 0.00. The seeds
    themselves say "far from" / "significantly outside" the range. Also skipped: the step-0
    record (eval-mode BatchNorm still has its initial running statistics: 0.12-0.41 measured on
    healthy nets), layers without a nonlinearity (logits) and non-finite values.
    """
    trained = _trained(history)
    low = ACTIVATION_STD_LOW / ACTIVATION_STD_FACTOR
    high = ACTIVATION_STD_HIGH * ACTIVATION_STD_FACTOR
    findings = []
    for layer in history[-1].layers:
        if not layer.has_nonlinearity:
            continue
        stds = [s for s in _layer_values(trained, layer.name, "act_std") if math.isfinite(s)]
        stds = stds[-ACTIVATION_STD_LOGS:]
        if len(stds) < ACTIVATION_STD_LOGS:
            continue
        if all(s < low for s in stds):
            code, limit, advice = (
                "activation_std_low",
                f"below {_g(low)}",
                "activations are vanishing: check the weight initialisation (Kaiming/ReLU init "
                "for ReLU layers, seed 002), that the inputs are normalised, or add batch norm",
            )
        elif all(s > high for s in stds):
            code, limit, advice = (
                "activation_std_high",
                f"above {_g(high)}",
                "activations are exploding: normalise the inputs (mean 0, std 1), check the "
                "weight initialisation, or lower the learning rate",
            )
        else:
            continue
        message = (
            f"layer {layer.name}: activation std {_g(median(stds))} (median of the last "
            f"{ACTIVATION_STD_LOGS} logs, all {limit}; healthy is about "
            f"{ACTIVATION_STD_LOW:g} to {ACTIVATION_STD_HIGH:g})"
        )
        findings.append(Finding(code, "warning", message, advice, None, layer.name))
    return findings


def rule_dead_relu(history: Sequence[StepRecord], num_classes: int) -> list[Finding]:
    """Seed 003: most units of a layer output zero for every sample, 2 logs in a row."""
    recent = history[-DEAD_RELU_LOGS:]
    record = history[-1]
    findings = []
    for layer in record.layers:
        if not layer.has_nonlinearity:
            continue
        fractions = _layer_values(recent, layer.name, "dead_fraction")
        if len(fractions) < DEAD_RELU_LOGS or not all(f > DEAD_RELU_FRACTION for f in fractions):
            continue
        recommendation, fix = _lr_advice(
            record, 0.1, "dead ReLUs usually follow too large updates (seed 003)"
        )
        recommendation += (
            "; if they stay dead, roll back to an earlier checkpoint, check the initialisation "
            "(Kaiming/ReLU init) or use leaky ReLU"
        )
        message = (
            f"layer {layer.name}: {_g(100 * layer.dead_fraction)} % of its units output zero for "
            f"every sample of the validation batch ({DEAD_RELU_LOGS} logs in a row)"
        )
        findings.append(Finding("dead_relu", "warning", message, recommendation, fix, layer.name))
    return findings


def rule_loss_rising(history: Sequence[StepRecord], num_classes: int) -> list[Finding]:
    """Seeds 000/001: the training loss keeps rising -> lr too high or bad normalization.

    Fires when the median of the last 3 logs' training loss is > 10 % above the median of the 3
    before. Medians of halves, not "N increases in a row": a blow-up is often one jump that the
    latter misses, and noise alone gives 4 rises in a row once in 120 logs. Silent when dropout
    or weight decay was raised inside the window: more regularisation raises the training loss
    by design (and is what the overfitting fix suggests).
    """
    window = _trained(history)[-LOSS_RISING_LOGS:]
    losses = [r.train_loss for r in window]
    if len(window) < LOSS_RISING_LOGS or not all(math.isfinite(x) for x in losses):
        return []
    if any(b.dropout > a.dropout or b.weight_decay > a.weight_decay for a, b in pairwise(window)):
        return []
    before, after = _halves(losses)
    if after <= before * (1 + LOSS_RISING_FRACTION):
        return []
    recommendation, fix = _lr_advice(
        window[-1],
        0.1,
        "the learning rate is probably too high, or the inputs are badly normalised "
        "(seeds 000/001)",
    )
    message = (
        f"training loss rose {_g(100 * (after / before - 1))} % over the last "
        f"{LOSS_RISING_LOGS} logs (median {_g(before)} -> {_g(after)})"
    )
    return [Finding("loss_rising", "warning", message, recommendation, fix)]


def rule_loss_flat(history: Sequence[StepRecord], num_classes: int) -> list[Finding]:
    """Seeds 000/001: the training loss stopped falling while still high.

    Fires when a least-squares line through the last 8 logs' training loss (against the step,
    as epoch-end logs come at odd steps) changes by < 1 % of its mean across them, and that mean
    is above 0.1 ln C (0.23 for 10 classes; a lower loss may level off). A fitted line, not the
    first and last logs: with 3 % noise on a loss falling 1 % a log, it calls 1 window in 20000
    flat, where comparing the medians of the halves called 1 in 60. Silent after a collapse,
    where raising the lr would be the wrong advice: when any layer is mostly dead (measured: Adam
    at lr 0.1 killed the net, which then sat at ln C with zero gradients; dead_relu reports it)
    or when the loss was > 10 % lower before (a setback; loss_rising reported the jump). The fix
    is lr x 10, or for SGD-family optimizers a switch to Adam at the default lr, as seed 001
    suggests another updater.
    """
    trained = _trained(history)
    window = trained[-LOSS_FLAT_LOGS:]
    losses = [r.train_loss for r in window]
    if len(window) < LOSS_FLAT_LOGS or not all(math.isfinite(x) for x in losses):
        return []
    level = fmean(losses)
    if num_classes >= 2 and level <= LOSS_FLAT_FLOOR * math.log(num_classes):
        return []
    steps = [r.step for r in window]
    change = linear_regression(steps, losses).slope * (steps[-1] - steps[0]) / level
    if abs(change) >= LOSS_FLAT_CHANGE:
        return []
    record = window[-1]
    if any(layer.dead_fraction > DEAD_RELU_FRACTION for layer in record.layers):
        return []
    best = min(r.train_loss for r in trained if math.isfinite(r.train_loss))
    if level > best * (1 + LOSS_RISING_FRACTION):
        return []
    message = (
        f"training loss has stayed near {_g(level)} over the last {LOSS_FLAT_LOGS} logs "
        f"(steps {steps[0]}-{steps[-1]}, fitted change {_g(100 * change)} %)"
    )
    if record.optimizer in SGD_FAMILY:
        lr = DEFAULTS["learning_rate"]
        recommendation = (
            f"optimisation is stalling with {record.optimizer} (seed 001: try another updater): "
            f"switch to Adam with lr {lr:g}"
        )
        fix: dict[str, float | str] | None = {"optimizer": "Adam", "learning_rate": lr}
    else:
        recommendation, fix = _lr_advice(
            record, 10.0, "the learning rate is probably too low (seeds 000/001)"
        )
    return [Finding("loss_flat", "warning", message, recommendation, fix)]


def rule_exploding_gradients(history: Sequence[StepRecord], num_classes: int) -> list[Finding]:
    """Seed 003: a layer's gradient norm > 10x the median of its previous 10 logs (needs 5)."""
    record = history[-1]
    if record.step == 0:
        return []
    previous_records = _trained(history)[-GRADIENT_BASELINE_LOGS - 1 : -1]
    findings = []
    for layer in record.layers:
        previous = [
            g for g in _layer_values(previous_records, layer.name, "grad_norm")
            if g is not None and math.isfinite(g)
        ]
        if (len(previous) < GRADIENT_BASELINE_MIN_LOGS or layer.grad_norm is None
                or not math.isfinite(layer.grad_norm)):
            continue
        baseline = median(previous)
        if baseline <= 0 or layer.grad_norm <= GRADIENT_SPIKE_FACTOR * baseline:
            continue
        recommendation, fix = _lr_advice(
            record,
            0.1,
            "exploding gradients (seed 003): lower the learning rate; input normalisation and "
            "gradient clipping also help",
        )
        message = (
            f"layer {layer.name}: gradient norm {_g(layer.grad_norm)} is "
            f"{_g(layer.grad_norm / baseline)}x its median {_g(baseline)} over the previous "
            f"{len(previous)} logs"
        )
        findings.append(
            Finding("exploding_gradients", "warning", message, recommendation, fix, layer.name)
        )
    return findings


def rule_overfitting(history: Sequence[StepRecord], num_classes: int) -> list[Finding]:
    """Seed 002: validation loss rising while training loss falls -> stop early or regularise.

    Early stopping's own test: the validation loss (median of the last 3 logs) is > 10 %
    above its best, reached at least 3 logs ago, while the training loss (median of the
    last 3 logs) fell below its value at that best log. A slow climb counts as much as a
    sudden one. The fix raises weight decay first (0 -> 1e-4, else x10, while below 1e-3:
    seed 002's usual L2 range), then dropout by 20 points (up to 90 %).
    """
    window = [(r, r.validate_loss) for r in _trained(history) if r.validate_loss is not None]
    if len(window) < OVERFIT_LOGS:
        return []
    val = [v for _, v in window]
    train = [r.train_loss for r, _ in window]
    if not all(math.isfinite(x) for x in val[-OVERFIT_LOGS:] + train[-OVERFIT_LOGS:]):
        return []
    best_index = min(range(len(val)), key=lambda i: val[i] if math.isfinite(val[i]) else math.inf)
    if best_index > len(val) - 1 - OVERFIT_LOGS // 2:
        return []
    val_before, val_after = val[best_index], statistics.median(val[-3:])
    train_before, train_after = train[best_index], statistics.median(train[-3:])
    if val_after <= val_before * (1 + OVERFIT_RISE) or train_after >= train_before:
        return []
    best_step, record = window[best_index][0].step, window[-1][0]
    fix: dict[str, float | str] | None
    if record.weight_decay < OVERFIT_WEIGHT_DECAY_MAX:
        wd = (
            min(WEIGHT_DECAY_MAX, float(f"{record.weight_decay * 10:.3g}"))
            if record.weight_decay > 0
            else OVERFIT_WEIGHT_DECAY_START
        )
        fix, change = {"weight_decay": wd}, f"set weight decay to {wd:g}"
    elif record.dropout < DROPOUT_MAX:
        dropout = min(DROPOUT_MAX, record.dropout + OVERFIT_DROPOUT_STEP)
        fix, change = {"dropout": dropout}, f"set dropout to {dropout} %"
    else:
        fix, change = None, "regularisation is already at its limits"
    recommendation = (
        f"the model is overfitting (seed 002): stop here (early stopping) and keep the "
        f"checkpoint nearest step {best_step}, or regularise more: {change}"
    )
    message = (
        f"validation loss rose {_g(100 * (val_after / val_before - 1))} % above its best "
        f"({_g(val_before)} at step {best_step} -> {_g(val_after)}) while training loss fell "
        f"from {_g(train_before)} to {_g(train_after)}"
    )
    return [Finding("overfitting", "warning", message, recommendation, fix)]


def rule_non_finite(history: Sequence[StepRecord], num_classes: int) -> list[Finding]:
    """Seed 002: NaN or Inf in a loss, an activation, a gradient or an update is an error.

    NaN update ratios are undefined, not errors (weights gone NaN show in the activations and
    the validation loss); infinite ones are. On the step-0 record, train loss and gradients
    are ignored. `layer` is the first layer, in forward order, with a non-finite value.
    """
    record = history[-1]
    places: list[str] = []
    first_layer = None
    if record.step > 0 and not math.isfinite(record.train_loss):
        places.append(f"training loss ({record.train_loss})")
    if record.validate_loss is not None and not math.isfinite(record.validate_loss):
        places.append(f"validation loss ({record.validate_loss})")
    for layer in record.layers:
        values = [("activation mean", layer.act_mean), ("activation std", layer.act_std)]
        if record.step > 0 and layer.grad_norm is not None:
            values.append(("gradient norm", layer.grad_norm))
        bad = [f"{label} {value}" for label, value in values if not math.isfinite(value)]
        if math.isinf(layer.update_ratio):
            bad.append(f"update:parameter ratio {layer.update_ratio}")
        if bad:
            places.append(f"layer {layer.name} ({', '.join(bad)})")
            first_layer = first_layer or layer.name
    if not places:
        return []
    lr = _scaled_lr(record.learning_rate, 0.1)
    recommendation = (
        "training paused before the next update; roll back to an earlier checkpoint and lower "
        f"the learning rate to {lr:g}"
    )
    message = f"non-finite values at step {record.step}: {'; '.join(places)}"
    fix: dict[str, float | str] = {"learning_rate": lr}
    return [Finding("non_finite", "error", message, recommendation, fix, first_layer)]


RULES: tuple[Rule, ...] = (
    rule_non_finite,
    rule_initial_loss,
    rule_update_ratio,
    rule_activation_std,
    rule_dead_relu,
    rule_loss_rising,
    rule_loss_flat,
    rule_exploding_gradients,
    rule_overfitting,
)


class Diagnostician:
    """Keeps the recent history, runs every rule at each record, reports each condition once.

    A condition is a (code, layer) pair: reported when it appears, again only after it has
    cleared and come back. A record whose step is not after the previous one follows a
    rollback: the abandoned records (steps >= the new one) are dropped and every condition is
    forgotten, so what is still wrong on the new branch is reported afresh.
    """

    def __init__(self, num_classes: int | None) -> None:
        """`num_classes` None: not a classifier (or not yet known); the rules that compare
        with chance level stay silent."""
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"need at least 2 classes, got {num_classes}")
        self.num_classes = num_classes
        self._history: deque[StepRecord] = deque(maxlen=HISTORY_LOGS)
        self._active: set[tuple[str, str | None]] = set()
        self._ceiling = math.inf  # the lowest lr this run has blown up at

    def note_blow_up(self, learning_rate: float) -> None:
        """The run went non-finite at this lr: never suggest going back to it."""
        self._ceiling = min(self._ceiling, learning_rate)

    def _within_ceiling(self, finding: Finding, current_lr: float) -> Finding:
        lr = (finding.fix or {}).get("learning_rate")
        if not isinstance(lr, float | int) or lr < self._ceiling:
            return finding
        safe = float(f"{self._ceiling * BLOW_UP_MARGIN:.1g}")
        note = f" (not above {_g(safe)}: lr {_g(self._ceiling)} made this run blow up)"
        fix = {**finding.fix, "learning_rate": safe} if safe != current_lr else None
        return replace(finding, fix=fix, recommendation=finding.recommendation + note)

    @property
    def history(self) -> tuple[StepRecord, ...]:
        return tuple(self._history)

    def observe(self, record: StepRecord) -> list[Finding]:
        """Add a logged step; the findings that are new since the previous one."""
        if self._history and record.step <= self._history[-1].step:
            while self._history and self._history[-1].step >= record.step:
                self._history.pop()
            self._active.clear()
        self._history.append(record)
        history = tuple(self._history)
        current = [finding for rule in RULES for finding in rule(history, self.num_classes or 0)]
        if any(f.code == "non_finite" for f in current):
            self.note_blow_up(record.learning_rate)
        new = [f for f in current if (f.code, f.layer) not in self._active]
        self._active = {(f.code, f.layer) for f in current}
        return [self._within_ceiling(f, record.learning_rate) for f in new]
