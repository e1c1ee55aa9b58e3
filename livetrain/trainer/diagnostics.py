"""Training-health rules: pure functions over logged telemetry (no torch, no SQL, no I/O).

At every logged step the trainer hands a StepRecord to a Diagnostician
(livetrain.trainer.diagnostician), which runs every rule here and groups what they find into
episodes, one `alerts` row per problem; the board offers a finding's `fix` as a one-click
parameter change. Rules that read the loss decide on evidence, not on raw percentages: see
livetrain.trainer.evidence for the tests and their false-alarm rate.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from statistics import fmean, median
from typing import Any

from livetrain.db.contract import DEFAULTS, DROPOUT_MAX, LR_MAX, WEIGHT_DECAY_MAX
from livetrain.trainer.evidence import (
    MAD_TO_STD,
    Estimate,
    Noise,
    noise,
    pooled,
    trend,
    z_above,
    z_threshold,
)

# seed 003: an untrained C-class softmax model should lose -ln(1/C) (2.302 for 10 classes). The
# default init lands within 0.02 of it (2.298-2.313 measured); N(0, 1) weights gave 21835.
INITIAL_LOSS_TOLERANCE = 0.5  # report when |L0 - ln C| > 0.5 ln C (outside 1.15..3.45 for C=10)
# ... and warn when L0 > 3 ln C (6.9): Kaiming init of every layer, the logits' too, starts a
# healthy BatchNorm'd CNN at 4.26 on MNIST (95.8 % at 750 steps, measured): above chance
# by more than the tolerance, which is news (info), not a broken run.
INITIAL_LOSS_FAR = 3.0

# seeds 000-002: update:parameter ratio about 1e-3 (log10 -3); worry outside 1e-4..1e-2.
UPDATE_RATIO_TARGET = 1e-3
UPDATE_RATIO_LOW = 1e-4
UPDATE_RATIO_HIGH = 1e-2

# seeds 000/001: activation std about 0.5..2.0; "far outside" it signals trouble.
ACTIVATION_STD_LOW = 0.5
ACTIVATION_STD_HIGH = 2.0
ACTIVATION_STD_FACTOR = 2.0  # how far outside the band counts as far (see rule_activation_std)
ACTIVATION_STD_MILD = 1.5  # a long stretch out must have its median that much further out

# seed 003: dead ReLUs, units that output zero for every input.
DEAD_RELU_FRACTION = 0.6  # "most units of the layer" (a healthy tiny CNN: 0.53, measured)

# Per-layer rules read one probe batch per log, so a condition must hold at several logs
# in a row: at least MIN_PERSIST_LOGS, and either far out (FAR_DECADES: the orders of
# magnitude beyond the limit, typically over those logs) or for long (PERSIST_LOGS logs spanning
# PERSIST_STEPS steps). One odd batch cannot raise it, nor can the first steps of a healthy
# run, which sit near the limits (Adam's first update ratios: 1.3x the upper one, measured),
# while a broken run is far out at once (Adam at lr 0.05: 17x, 6x, 3x at its first logs).
MIN_PERSIST_LOGS = 3
FAR_DECADES = 0.5  # the stretch's median at least 10^0.5 (3.2x) beyond the limit
PERSIST_LOGS = 5
PERSIST_STEPS = 100
DEAD_FAR_FRACTION = 0.9  # nearly every unit dead counts as far
# Activations and dead units are not judged before step 50: a deep net's activations may
# start far too small and grow within its first steps (AlexNet on digits, default init:
# std 0.01-0.08 at steps 10-26, healthy by step 40, measured on 2 seeds).
WARMUP_STEPS = 50
# An update ratio far out peaks 15x beyond a limit and stays 4x beyond over its last 3
# logs (their median). Adam at lr 0.05: 0.12-0.21 by layer, then 0.057, 0.029. Healthy runs
# peak at 0.053 for a few logs (RMSprop at lr 1e-3), 0.088-0.113 for one odd step (an
# epoch's short last interval at batch 16), measured. A ratio
# mildly out must hold for long, at a median at least 3x beyond (SGD+Nesterov at lr 0.02,
# batch 16: a median of 0.021 over 700 steps, healthy).
UPDATE_RATIO_FAR = 4.0
UPDATE_RATIO_PEAK = 15.0
UPDATE_RATIO_MILD = 3.0

# seeds 000/001: the loss should fall; rising -> lr too high or bad normalization; flat (or
# falling very slowly) -> lr too low or a hard optimization, try another updater.
# Each is a one-sided test at evidence.ALPHA per log (z about 3.7), and a change must also
# be large enough to matter: a certain rise of 2 % is not worth an alert.
RISING_RECENT_LOGS = (2, 4, 12)  # the mean of the last 2, 4 or 12 logs (a jump or a climb) ...
RISING_REFERENCE_LOGS = 24  # ... against the mean of up to 24 before them ...
RISING_REFERENCE_MIN_LOGS = 8  # ... and at least 8
LOSS_RISING_FRACTION = 0.10  # and at least 10 % above it
BLOWN_UP_SPREAD = 5.0  # a log this much noisier than the logs before blew up within itself
FLAT_LOGS = 20  # a plateau is judged on a line through at least 20 logs ...
FLAT_STEPS = 50  # ... spanning at least 50 steps
FLAT_FALL = 0.05  # flat or slow: surely within 5 % of its level across that window
LEARNING_MIN_LOGS = 8  # a trend through fewer logs says nothing of whether a run learns
LOSS_FLAT_FLOOR = 0.1  # times ln C: below this the loss is low enough to level off

# seed 003 (and 001: "watch for unusually large updates"): exploding gradients.
GRADIENT_SPIKE_FACTOR = 10.0  # times the median of the layer's previous logs ...
GRADIENT_SPIKE_Z = 5.0  # ... and that many robust stds of their log10 above it
GRADIENT_BASELINE_LOGS = 10
GRADIENT_BASELINE_MIN_LOGS = 5

# seed 002: early stopping; L2 typically 1e-3..1e-6; dropout 0.5 is common.
OVERFIT_RECENT_LOGS = 12  # the mean of the last 12 validation losses ...
OVERFIT_BLOCK_LOGS = 24  # ... against the best mean of earlier blocks of 24 (12 at least)
OVERFIT_RISE = 0.10  # and at least 10 % above it
OVERFIT_WEIGHT_DECAY_START = 1e-4  # suggested when weight decay is 0
OVERFIT_WEIGHT_DECAY_MAX = 1e-3  # past this, suggest more dropout instead
OVERFIT_DROPOUT_STEP = 20  # percent

# Convergence (issue 21): a run whose training loss reached its floor. 2 % of ln C is 0.046
# for 10 classes, where 98.9-100 % of training samples are right (measured on the
# evaluation half's converged runs: ResNet-18 and tinycnn on digits and MNIST); a
# regression's floor is relative to its own first loss.
CONVERGED_LOSS = 0.02  # times RunFacts.loss_scale
CONVERGED_ACCURACY = 99.5  # percent of the training samples since the previous log
CONVERGED_LOGS = 3  # logs in a row
CONVERGED_ACCURACY_STEPS = 50  # the accuracy held over this many steps at least
CONVERGED_LEAVE = LOSS_FLAT_FLOOR / CONVERGED_LOSS  # converged until the loss is back 5x
CONVERGED_LEAVE_ACCURACY = 98.0  # above that limit, with the accuracy below this
CONVERGED_LAG_POINTS = 5.0  # validation accuracy this far below training: regularise

# Schedules (issue 21): an lr that a scheduler lowers or warms up is intended. A plateau
# while a schedule holds the lr below half of its set value is not a sign of a low lr.
SCHEDULE_LOWERED = 0.5
# Weight decay this far above seed 002's usual L2 range (1e-6..1e-3) is the first
# suspect of a flat loss: it pulls the weights to zero whatever the lr.
FLAT_WEIGHT_DECAY = 1e-2

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
    # False when the recorded forward pass did not run the layer: its NaNs mean "unknown"
    activation_measured: bool = True


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
    # False when no step since the previous log reported a loss: train_loss's NaN is unknown
    train_loss_measured: bool = True
    # The lr the run was set to, which its scheduler scales into learning_rate (None: the
    # same as learning_rate, no schedule). Their ratio is what the run itself asked for.
    base_learning_rate: float | None = None
    train_accuracy: float | None = None  # percent, averaged since the previous log
    validate_accuracy: float | None = None  # percent
    # False at a log that did not measure the layers (livetrain.trainer.cadence): `layers`
    # is empty, and the layer rules neither find nor clear anything at it.
    layers_measured: bool = True

    @property
    def schedule_factor(self) -> float:
        """learning_rate / base_learning_rate: 1 without a schedule, below 1 while a
        schedule anneals or warms up the lr, above 1 at a one-cycle's peak."""
        base, lr = self.base_learning_rate, self.learning_rate
        if base is None or not (base > 0 and math.isfinite(base) and math.isfinite(lr)):
            return 1.0
        return lr / base


@dataclass(frozen=True)
class Finding:
    """A problem worth an `events` row, with the parameter change that addresses it if any."""

    code: str
    level: str  # "warning" or "error"
    message: str
    recommendation: str
    fix: dict[str, float | str] | None  # keys among optimizer, learning_rate, weight_decay, dropout
    layer: str | None = None
    measure: str | None = None  # what `value` is, e.g. "update:parameter ratio"
    value: float | None = None  # the measure at this log, kept at its worst by an episode
    higher_is_worse: bool = True


@dataclass(frozen=True)
class RunFacts:
    """What the rules know of the run beyond its recent logs (the Diagnostician's
    history holds the last HISTORY_LOGS only)."""

    num_classes: int = 0  # 0: not a classifier, or its classes are unknown
    start_loss: float | None = None  # the training loss of the run's first trained log

    @property
    def loss_scale(self) -> float | None:
        """The loss that learning starts from: chance level, ln C, for a classifier (seed
        003), else the run's first training loss; None while unknown."""
        if self.num_classes >= 2:
            return math.log(self.num_classes)
        if self.start_loss is not None and math.isfinite(self.start_loss) \
                and self.start_loss > 0:
            return self.start_loss
        return None


Rule = Callable[[Sequence[StepRecord], RunFacts], list[Finding]]


def sig(x: float) -> str:
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
    """Recommendation and fix for lr * factor; no fix when that leaves the lr unchanged.
    The lr scaled is the one the run was set to: under a schedule, the board's lr is the
    schedule's base, and scaling it scales the lr in force alike."""
    now = record.base_learning_rate or record.learning_rate
    lr = _scaled_lr(now, factor)
    if lr == now:
        return f"{cause}; the learning rate is already {sig(lr)}, the limit", None
    return f"{cause}: set lr to {lr:g} (now {sig(now)})", {"learning_rate": lr}


def rule_initial_loss(history: Sequence[StepRecord], run: RunFacts) -> list[Finding]:
    """Seed 003: the untrained model's loss should be near -ln(1/C), chance for C classes.

    Evaluated on the step-0 record's validation loss only. Off by more than half of ln C:
    a warning below chance (a leak or wrong labels) or above 3 ln C (a broken init); an
    info between 1.5 and 3 ln C (INITIAL_LOSS_FAR).
    """
    record = history[-1]
    loss = record.validate_loss
    num_classes = run.num_classes
    if record.step != 0 or loss is None or not math.isfinite(loss) or num_classes < 2:
        return []  # not a classifier, or one whose classes are unknown: no chance level
    expected = math.log(num_classes)
    if abs(loss - expected) <= INITIAL_LOSS_TOLERANCE * expected:
        return []
    level = "warning"
    if loss > expected:
        advice = (
            "the untrained model is confidently wrong: check the weight initialisation (the "
            "output layer's weights should be small) and that the inputs are normalised"
        )
        if loss <= INITIAL_LOSS_FAR * expected:
            level = "info"
            advice += "; the first steps will undo a mild excess, which costs only time"
    else:
        advice = (
            "the untrained model already beats chance: check that the loss uses the right "
            "labels and that no label information leaks into the inputs"
        )
    message = (
        f"initial validation loss {sig(loss)} is far from -ln(1/{num_classes}) = {sig(expected)}, "
        f"the loss of an untrained {num_classes}-class model"
    )
    return [Finding("initial_loss", level, message, advice, None, None,
                    "initial validation loss", loss, loss > expected)]


@dataclass(frozen=True)
class Stretch:
    """The trailing logs at which one layer's value was out of bounds, in order."""

    steps: list[int]
    values: list[float]

    def persists(self, far: bool) -> bool:
        """Held long enough to report: MIN_PERSIST_LOGS logs when far out, else
        PERSIST_LOGS logs spanning PERSIST_STEPS steps."""
        n = len(self.steps)
        return n >= MIN_PERSIST_LOGS and (far or (
            n >= PERSIST_LOGS and self.steps[-1] - self.steps[0] >= PERSIST_STEPS))

    def describe(self) -> str:
        return (f"at each of the last {len(self.steps)} logs "
                f"(steps {self.steps[0]}-{self.steps[-1]})")


Measure = Callable[[StepRecord, LayerRecord], float | None]


def _field(name: str) -> Measure:
    """A layer's field as it was logged, None where it is not finite."""
    def measure(record: StepRecord, layer: LayerRecord) -> float | None:
        value = getattr(layer, name)
        return value if value is not None and math.isfinite(value) else None
    return measure


def _stretch(records: Sequence[StepRecord], name: str, measure: Measure,
             out: Callable[[float], bool]) -> Stretch:
    """The trailing stretch of `records` at which layer `name`'s `measure` is out by `out`
    (True: out; False: in, the stretch ends). A log where the measure is None (undefined
    there) is skipped."""
    steps: list[int] = []
    values: list[float] = []
    for record in reversed(records):
        for layer in record.layers:
            if layer.name != name:
                continue
            value = measure(record, layer)
            if value is None:
                continue
            if not out(value):
                return Stretch(steps[::-1], values[::-1])
            steps.append(record.step)
            values.append(value)
    return Stretch(steps[::-1], values[::-1])


def _decades_beyond(values: Sequence[float], limit: float, above: bool) -> float:
    """How many orders of magnitude beyond `limit` the values typically are (their median;
    inf for a zero below): a long stretch just past a limit is not far out."""
    beyond = [math.inf if v <= 0 else math.log10(v / limit) if above else math.log10(limit / v)
              for v in values]
    return median(beyond) if beyond else 0.0


def _judged_ratio(side: str) -> Measure:
    """A layer's update ratio as the rule on `side` judges it; None where it says nothing:
    NaN or zero (undefined, or a frozen layer) and, on the low side, a zero gradient (no
    gradient reaches a dead or frozen layer, and a higher lr would not change that).

    On the low side the ratio is judged against the lr in force: an update scales with
    the lr, so a schedule that anneals or warms up the lr (schedule factor f < 1) lowers
    the ratio by f by design; the ratio / f is what the set lr gives, the one to judge.
    (Adam's update is exactly proportional to the lr; momentum SGD's lags it, which only
    makes the judged ratio larger, never a false "too low".) The high side is judged as
    it is: a ratio that high harms whether the schedule meant the lr or not."""
    def measure(record: StepRecord, layer: LayerRecord) -> float | None:
        r = layer.update_ratio
        if not math.isfinite(r) or r <= 0 or (side == "low" and layer.grad_norm == 0):
            return None
        return r if side == "high" else r / min(1.0, record.schedule_factor)
    return measure


def _ratio_out(side: str) -> Callable[[float], bool]:
    return (lambda r: r > UPDATE_RATIO_HIGH) if side == "high" \
        else (lambda r: r < UPDATE_RATIO_LOW)


def rule_update_ratio(history: Sequence[StepRecord], run: RunFacts) -> list[Finding]:
    """Seeds 000-002: a layer's update:parameter ratio out of 1e-4..1e-2, persistently:
    for 3 logs in a row peaking 15x beyond a limit with the last 3's median 4x beyond it,
    else for 5 logs over 100
    steps with a median 3x beyond (UPDATE_RATIO_FAR, UPDATE_RATIO_MILD).

    Measured: Adam at lr 0.1 killed the net and its ratios fell to 1e-13 with zero
    gradients; raising the lr would be the wrong advice, hence zero gradients are skipped
    on the low side, and so is a network with a mostly dead layer (RMSprop at lr 0.01:
    the loss 189 at the first log, a layer dead, the weights so grown that the next
    layer's updates are 2e-5 of them; dead_relu reports it, with a lower lr). The low side
    is silent, too, once the run has converged (converged_at). The fix scales lr by 1e-3 /
    (median ratio of the offending layers).
    """
    record = history[-1]
    trained = _trained(history)
    collapsed = any(layer.dead_fraction > DEAD_RELU_FRACTION for layer in record.layers)
    sides = (("high", UPDATE_RATIO_HIGH),) if collapsed or converged_at(history, run) \
        is not None else (("high", UPDATE_RATIO_HIGH), ("low", UPDATE_RATIO_LOW))
    offending: dict[str, dict[str, Stretch]] = {"high": {}, "low": {}}
    for layer in record.layers:
        for side, limit in sides:
            stretch = _stretch(trained, layer.name, _judged_ratio(side), _ratio_out(side))
            if not stretch.values:
                continue
            # far: a peak no healthy step reaches, and the last 3 logs still well out (one
            # step's ratio can jump 5-11x on an odd batch: 0.05-0.11 at epoch ends between
            # logs of 0.013, measured)
            flip = 1.0 if side == "high" else -1.0
            peak = max(v**flip for v in stretch.values)
            recent = median(stretch.values[-MIN_PERSIST_LOGS:]) ** flip
            typical = median(stretch.values) ** flip
            scale = limit**flip
            far = peak >= UPDATE_RATIO_PEAK * scale and recent >= UPDATE_RATIO_FAR * scale
            if (far and stretch.persists(far=True)) or (
                    typical >= UPDATE_RATIO_MILD * scale and stretch.persists(far=False)):
                offending[side][layer.name] = stretch
    findings = []
    for side, stretches in offending.items():
        if not stretches:
            continue
        recommendation, fix = _lr_advice(
            record,
            UPDATE_RATIO_TARGET / median(median(s.values) for s in stretches.values()),
            f"the learning rate is too {side} (seeds 000-002: aim for a ratio near 1e-3)",
        )
        where = "above" if side == "high" else "below"
        factor = record.schedule_factor
        scaled = f" at the set lr (the schedule has it at {sig(factor)}x)" \
            if side == "low" and factor < 1 else ""
        for name, stretch in stretches.items():
            ratio = stretch.values[-1]
            message = (
                f"layer {name}: updates are 10^{math.log10(ratio):.1f} of its weights "
                f"(update:parameter ratio {sig(ratio)}{scaled}), {where} the healthy "
                f"10^{math.log10(UPDATE_RATIO_LOW):g} to 10^{math.log10(UPDATE_RATIO_HIGH):g} "
                f"{stretch.describe()}"
            )
            findings.append(Finding(
                f"update_ratio_{side}", "warning", message, recommendation, fix, name,
                "update:parameter ratio", ratio, side == "high"))
    return findings


def rule_activation_std(history: Sequence[StepRecord], run: RunFacts) -> list[Finding]:
    """Seeds 000/001: activation std far outside 0.5..2.0, persistently (Stretch.persists),
    from step 50 (WARMUP_STEPS).

    The band is the seeds' and the board draws it, but a layer is out only when it is more
    than ACTIVATION_STD_FACTOR (2x) beyond it: below 0.25 or above 4.0. Why not the bare band:
    post-ReLU activations of healthy nets sit on its edges. BatchNorm'd conv layers give
    ReLU(N(0, 1)), std 0.58 (measured 0.55-0.59, so a slight drop of the BN scale, e.g. from
    weight decay, would cross 0.5); the default run's fc layer grows steadily past 2.0 (2.0-2.2
    at 10 epochs, 2.6 at 20, on 3 seeds) while validation loss still falls. Broken runs are
    far outside: N(0, 1) init gave 14-26, a dead layer 0.00. The seeds themselves say "far
    from" / "significantly outside" the range. Also skipped: the step-0 record (eval-mode
    BatchNorm still has its initial running statistics: 0.12-0.41 measured on healthy nets),
    layers without a nonlinearity (logits) and non-finite values.
    """
    trained = [r for r in _trained(history) if r.step >= WARMUP_STEPS]
    low = ACTIVATION_STD_LOW / ACTIVATION_STD_FACTOR
    high = ACTIVATION_STD_HIGH * ACTIVATION_STD_FACTOR
    advice = {
        "activation_std_low": "activations are vanishing: check the weight initialisation "
        "(Kaiming/ReLU init for ReLU layers, seed 002), that the inputs are normalised, or "
        "add batch norm",
        "activation_std_high": "activations are exploding: normalise the inputs (mean 0, "
        "std 1), check the weight initialisation, or lower the learning rate",
    }
    findings = []
    learns: bool | None = None  # improving(), computed once a layer is out
    for layer in history[-1].layers:
        if not layer.has_nonlinearity:
            continue
        for code, limit, above in (("activation_std_low", low, False),
                                   ("activation_std_high", high, True)):
            stretch = _stretch(trained, layer.name, _field("act_std"),
                               lambda v, lim=limit, up=above: v > lim if up else v < lim)
            far = _decades_beyond(stretch.values, limit, above) >= FAR_DECADES
            typical = median(stretch.values) if stretch.values else limit
            mild = typical > limit * ACTIVATION_STD_MILD if above \
                else typical < limit / ACTIVATION_STD_MILD
            if not stretch.persists(far) or not (far or mild):
                continue
            message = (
                f"layer {layer.name}: activation std {sig(stretch.values[-1])}, "
                f"{'above' if above else 'below'} {sig(limit)} {stretch.describe()}; healthy "
                f"is about {ACTIVATION_STD_LOW:g} to {ACTIVATION_STD_HIGH:g}"
            )
            level, recommendation = "warning", advice[code]
            if learns is None:
                learns = improving(history, run)
            if learns:
                level = "info"
                message += "; the run is learning all the same (its loss falls beyond noise)"
                recommendation = ("nothing to do while the loss keeps falling; if it "
                                  f"stalls, {recommendation}")
            findings.append(Finding(code, level, message, recommendation, None, layer.name,
                                    "activation std", stretch.values[-1], above))
    return findings


def improving(history: Sequence[StepRecord], run: RunFacts) -> bool:
    """Whether what a layer's symptom would warn of does not show: the run is learning
    (learning()) and, for a classifier, its training loss is below chance level (a
    model whose loss falls from 20,000 towards ln C is not learning the task yet)."""
    record = history[-1]
    scale = run.loss_scale if run.num_classes >= 2 else None
    if scale is not None and not _loss_at_most(record, scale):
        return False
    return learning(history)


def rule_dead_relu(history: Sequence[StepRecord], run: RunFacts) -> list[Finding]:
    """Seed 003: most units of a layer output zero for every sample, persistently
    (Stretch.persists; far out is nearly every unit dead at every log), from step 50."""
    record = history[-1]
    trained = [r for r in _trained(history) if r.step >= WARMUP_STEPS]
    findings = []
    for layer in record.layers:
        if not layer.has_nonlinearity:
            continue
        stretch = _stretch(trained, layer.name, _field("dead_fraction"),
                           lambda v: v > DEAD_RELU_FRACTION)
        if not stretch.persists(all(f >= DEAD_FAR_FRACTION for f in stretch.values)):
            continue
        recommendation, fix = _lr_advice(
            record, 0.1, "dead ReLUs usually follow too large updates (seed 003)"
        )
        recommendation += (
            "; if they stay dead, roll back to an earlier checkpoint, check the initialisation "
            "(Kaiming/ReLU init) or use leaky ReLU"
        )
        message = (
            f"layer {layer.name}: {sig(100 * stretch.values[-1])} % of its units output zero "
            f"for every sample of the validation batch, most of them dead {stretch.describe()}"
        )
        findings.append(Finding("dead_relu", "warning", message, recommendation, fix,
                                layer.name, "dead units, %", 100 * stretch.values[-1]))
    return findings


def _losses(records: Sequence[StepRecord], field: str,
            history: Sequence[StepRecord]) -> tuple[list[float], Noise] | None:
    """A loss series and each value's noise (evidence.noise, its scatter taken over the
    finite values of the whole `history`); None when a value is not finite or the noise
    cannot be told."""
    values = [getattr(r, field) for r in records]
    if not all(v is not None and math.isfinite(v) for v in values):
        return None
    background = [v for r in history
                  if (v := getattr(r, field)) is not None and math.isfinite(v)]
    told = noise(values, [getattr(r, f"{field}_se") for r in records], background)
    return None if told is None else (values, told)


def _z_words(z: float) -> str:
    """z for a message: "4.2 standard errors", or "over 100" past any meaning."""
    return f"{z:.1f} standard errors" if z < 100 else "over 100 standard errors"


def _rise(values: Sequence[float], told: Noise,
          lengths: Sequence[int]) -> tuple[int, Estimate, Estimate, float] | None:
    """The shortest recent window (RISING_RECENT_LOGS) whose mean stands above the up to
    RISING_REFERENCE_LOGS logs before it, beyond noise and by LOSS_RISING_FRACTION:
    (its length, the earlier and the recent mean, z). Bonferroni over the window lengths.
    `lengths`: each log's interval in steps, which its noise scales with."""
    sigmas = told.sigmas
    per_step = [s * math.sqrt(n) for s, n in zip(sigmas, lengths, strict=True)]
    threshold = z_threshold(comparisons=len(RISING_RECENT_LOGS), dof=told.dof)
    for recent in RISING_RECENT_LOGS:
        split = len(values) - recent
        start = max(0, split - RISING_REFERENCE_LOGS)
        if split - start < RISING_REFERENCE_MIN_LOGS:
            return None
        # Each log's noise is at least what the earlier logs' typical noise per step gives
        # for its length: a few steps' spread (an epoch's short last interval) says little.
        # And a loss that blows up within an interval has a huge spread of its own, made
        # by the very rise under test: such a log is judged by that typical noise alone.
        null = median(per_step[start:split])
        floors = [null / math.sqrt(n) for n in lengths]
        judged = [max(s, f) for s, f in zip(sigmas, floors, strict=True)]
        blown = [f if p > BLOWN_UP_SPREAD * null else s
                 for s, f, p in zip(judged, floors, per_step, strict=True)]
        before = pooled(values[start:split], judged[start:split])
        after = pooled(values[split:], blown[split:])
        z = z_above(after, before)
        if z >= threshold and after.mean > before.mean * (1 + LOSS_RISING_FRACTION):
            return recent, before, after, z
    return None


def rule_loss_rising(history: Sequence[StepRecord], run: RunFacts) -> list[Finding]:
    """Seeds 000/001: the training loss keeps rising -> lr too high or bad normalization.

    Fires when the mean training loss of the last 2, 4 or 12 logs (a jump is seen at once, a
    climb once it adds up) stands above the mean of the up to 24 logs before them (8 at
    least) by more than z_threshold() standard errors (one-sided, false-alarm rate
    evidence.ALPHA per log, split over the three windows) and by at least 10 %. A log's
    noise is at least the earlier logs' typical noise per step for its length (a spread of
    2 steps, at an epoch's end, says little). A recent log whose noise per step is more
    than 5x that typical one is judged by the latter, what the test assumes under "no
    rise": a loss that blows up within an interval (0.7 to 975 in 5 steps) spreads its
    per-step losses by the rise itself, which must not hide it. Silent when
    dropout or weight decay was raised inside the window: more regularisation raises the
    training loss by design (and is what the overfitting fix suggests). Silent, too, while
    the run is converged (converged_at): at its floor a loss that goes from 0.002 to 0.01
    rises beyond noise and means nothing (a ResNet-18 at 99.4 % on digits, measured); a
    loss that really climbs leaves the floor, ends the converged episode and is judged.
    """
    if converged_at(history, run) is not None:
        return []
    trained = _trained(history)
    window = trained[-(max(RISING_RECENT_LOGS) + RISING_REFERENCE_LOGS):]
    if any(b.dropout > a.dropout or b.weight_decay > a.weight_decay for a, b in pairwise(window)):
        return []
    steps = [0] + [r.step for r in trained]
    lengths = [max(1, b - a) for a, b in pairwise(steps)][-len(window):]
    series = _losses(window, "train_loss", trained)
    found = None if series is None else _rise(*series, lengths)
    if found is None:
        return []
    recent, before, after, z = found
    recommendation, fix = _lr_advice(
        window[-1],
        0.1,
        "the learning rate is probably too high, or the inputs are badly normalised "
        "(seeds 000/001)",
    )
    rise = 100 * (after.mean / before.mean - 1)
    message = (
        f"training loss rose {sig(rise)} % (mean of the last {recent} logs {sig(after.mean)} "
        f"against {sig(before.mean)} before them; {_z_words(z)}, beyond noise)"
    )
    return [Finding("loss_rising", "warning", message, recommendation, fix, None,
                    "rise, %", rise)]


def _loss_at_most(record: StepRecord, limit: float | None) -> bool:
    return limit is not None and record.train_loss_measured \
        and math.isfinite(record.train_loss) and record.train_loss <= limit


def _at_floor(trained: Sequence[StepRecord], end: int, loss: float | None,
              accuracy: float) -> bool:
    """Whether the logs up to trained[end - 1] are at the floor: the mean training loss of
    their last CONVERGED_LOGS at most `loss`, or the training accuracy at least `accuracy`
    at each of the last logs that span CONVERGED_ACCURACY_STEPS steps (CONVERGED_LOGS at
    least: an accuracy of 16 samples is 100 % by chance at times)."""
    recent = trained[max(0, end - CONVERGED_LOGS):end]
    if len(recent) < CONVERGED_LOGS:
        return False
    losses = [r.train_loss for r in recent if _loss_at_most(r, math.inf)]
    if loss is not None and len(losses) == len(recent) and fmean(losses) <= loss:
        return True
    start = end - CONVERGED_LOGS
    while start > 0 and trained[end - 1].step - trained[start - 1].step < CONVERGED_ACCURACY_STEPS:
        start -= 1
    covered = trained[end - 1].step - (trained[start - 1].step if start > 0 else 0)
    return covered >= CONVERGED_ACCURACY_STEPS and all(
        r.train_accuracy is not None and r.train_accuracy >= accuracy
        for r in trained[start:end])


def converged_at(history: Sequence[StepRecord], run: RunFacts) -> StepRecord | None:
    """The log at which the run last reached its floor, if it is still there; else None.

    Reached (_at_floor): the mean training loss of CONVERGED_LOGS logs in a row at most
    CONVERGED_LOSS of the loss scale (RunFacts.loss_scale), or a training accuracy of at
    least CONVERGED_ACCURACY over CONVERGED_ACCURACY_STEPS steps. Still there: at the floor
    since by the looser CONVERGED_LEAVE times that loss (the level below which loss_flat
    lets a loss level off) or a CONVERGED_LEAVE_ACCURACY. The margin keeps the noise of a
    loss near 0 from ending and reopening the episode (a healthy ResNet-18 on digits: logs
    between 0.002 and 0.15, measured)."""
    if _converged_memo and _converged_memo[0] is history and _converged_memo[1] == run:
        return _converged_memo[2]  # several rules ask about the same log
    trained = _trained(history)
    scale = run.loss_scale
    limit = None if scale is None else CONVERGED_LOSS * scale
    leave = None if limit is None else CONVERGED_LEAVE * limit
    # Held means at the looser floor at every later log, the latest among them: a run
    # that is not there now has not converged, whatever it reached before.
    held = _at_floor(trained, len(trained), leave, CONVERGED_LEAVE_ACCURACY)
    found = _reached(trained, limit, leave) if held else None
    _converged_memo[:] = [history, run, found]
    return found


# The last answer of converged_at, with the history tuple it was for (kept, so that its
# identity cannot be reused) and the run's facts: the rules of one log share both.
_converged_memo: list[Any] = []


def _reached(trained: Sequence[StepRecord], limit: float | None,
             leave: float | None) -> StepRecord | None:
    """The latest log at the floor, from which every later one stayed at the looser one."""
    for end in range(len(trained), CONVERGED_LOGS - 1, -1):
        if _at_floor(trained, end, limit, CONVERGED_ACCURACY):
            held = all(_at_floor(trained, later, leave, CONVERGED_LEAVE_ACCURACY)
                       for later in range(end + 1, len(trained) + 1))
            return trained[end - 1] if held else None
    return None


def rule_converged(history: Sequence[StepRecord], run: RunFacts) -> list[Finding]:
    """Seed 002 (early stopping) and 003 (a model should be able to fit its training
    data): the training loss has reached its floor, near zero (converged_at). That is
    news, not a problem: an info, and the update-ratio-low and flat-loss rules stay
    silent (a model with nothing left to learn has no use for a higher lr). The advice:
    stop (or early-stop); where validation lags the training figures by
    CONVERGED_LAG_POINTS of accuracy, regularise more, with overfitting's fix."""
    reached = converged_at(history, run)
    if reached is None:
        return []
    record = history[-1]
    figures = [f"training loss {sig(record.train_loss)}"]
    if record.train_accuracy is not None:
        figures.append(f"{sig(record.train_accuracy)} % of training samples right")
    message = (f"the model has fit its training data since step {reached.step} "
               f"({', '.join(figures)} at step {record.step})")
    recommendation = ("nothing much is left to learn from the training data: stop here, "
                      "or let early stopping end the run")
    fix = None
    train_acc, val_acc = record.train_accuracy, record.validate_accuracy
    if train_acc is not None and val_acc is not None \
            and train_acc - val_acc >= CONVERGED_LAG_POINTS:
        fix, change = _regularisation(record)
        recommendation += (f"; validation lags ({sig(val_acc)} % against {sig(train_acc)} %): "
                           f"regularise more: {change}")
    return [Finding("converged", "info", message, recommendation, fix, None,
                    "training loss", record.train_loss)]


def _flat_window(trained: Sequence[StepRecord]) -> Sequence[StepRecord] | None:
    """The shortest suffix of at least FLAT_LOGS logs spanning FLAT_STEPS steps."""
    for start in range(len(trained) - FLAT_LOGS, -1, -1):
        if trained[-1].step - trained[start].step >= FLAT_STEPS:
            return trained[start:]
    return None


def _since_last_change(trained: Sequence[StepRecord]) -> Sequence[StepRecord]:
    """The trailing records that ran with the same set parameters (a change from the
    board starts a new stretch: what came before says nothing of the new lr)."""
    start = len(trained) - 1
    while start > 0 and _same_settings(trained[start - 1], trained[-1]):
        start -= 1
    return trained[start:]


def _same_settings(a: StepRecord, b: StepRecord) -> bool:
    return (a.optimizer, a.base_learning_rate or a.learning_rate, a.weight_decay,
            a.dropout) == (b.optimizer, b.base_learning_rate or b.learning_rate,
                           b.weight_decay, b.dropout)


def _falls(records: Sequence[StepRecord], field: str, history: Sequence[StepRecord]) -> bool:
    """Whether `field` (a loss) has a significantly downward trend across `records`: its
    fitted fall beyond z_threshold() standard errors, a one-sided test at ALPHA."""
    if len(records) < LEARNING_MIN_LOGS:
        return False
    series = _losses(records, field, history)
    if series is None:
        return False
    values, told = series
    line = trend([r.step for r in records], values, told.sigmas)
    return -line.slope >= z_threshold(dof=told.dof) * line.se


def learning(history: Sequence[StepRecord]) -> bool:
    """Whether the run is visibly learning: since the last change of its settings, the
    training or the validation loss falls beyond noise (_falls)."""
    stretch = _since_last_change(_trained(history))
    validated = [r for r in stretch if r.validate_loss is not None]
    return _falls(stretch, "train_loss", history) or \
        _falls(validated, "validate_loss", validated)


def rule_loss_flat(history: Sequence[StepRecord], run: RunFacts) -> list[Finding]:
    """Seeds 000/001: the training loss stopped falling (flat) or crawls (slow) while high.

    A weighted line through the training loss of the last 20+ logs spanning 50+ steps
    (evidence.trend, against the step: epoch-end logs come at odd steps) must show, beyond
    noise, that the loss changed by less than 5 % of its level across the window, either way:
    the fitted change's confidence interval (z_threshold() standard errors each side) lies
    within +-5 % (an equivalence test). A series too noisy to tell is never called flat: it
    may be falling; nor is one that bottomed out and turns up (loss_rising's to judge).
    Then "loss_flat" when the fall is not significant (it may be zero) and the run is not
    learning over a longer stretch either (learning(): since its last change, neither the
    training nor the validation loss falls beyond noise), else "loss_slow" (info: the loss
    does fall, slowly; a somewhat higher lr may help).
    Silent where a plateau is no sign of a low lr:
    - the level is at most 0.1 of the loss scale (RunFacts.loss_scale: 0.23 for 10
      classes, else a tenth of the run's first loss): a loss that low may level off;
    - the run has converged (rule_converged);
    - a schedule holds the lr below half its set value somewhere in the window (an
      annealed or warming-up lr is what the run asked for, issue 21);
    - after a collapse, where raising the lr would be the wrong advice: when any layer is
      mostly dead (dead_relu reports it) or when the loss was > 10 % lower before (a
      setback; loss_rising reported the jump).
    The flat fix is lr x 10, or for SGD-family optimizers a switch to Adam at the default lr,
    as seed 001 suggests another updater; with weight decay far above seed 002's range, a
    lower weight decay (it may be what holds the weights, and the loss, in place).
    """
    trained = _trained(history)
    window = _flat_window(trained)
    series = None if window is None else _losses(window, "train_loss", trained)
    if window is None or series is None or converged_at(history, run) is not None \
            or min(r.schedule_factor for r in window) < SCHEDULE_LOWERED:
        return []
    values, told = series
    line = trend([r.step for r in window], values, told.sigmas)
    scale = run.loss_scale
    if line.level <= 0 or (scale is not None and line.level <= LOSS_FLAT_FLOOR * scale):
        return []
    span = window[-1].step - window[0].step
    fall, fall_se = -line.slope * span / line.level, line.se * span / line.level
    threshold = z_threshold(dof=told.dof)
    if abs(fall) + threshold * fall_se >= FLAT_FALL:
        return []  # not surely within 5 % either way: it may be falling, or rising
    record = window[-1]
    best = min(r.train_loss for r in trained if math.isfinite(r.train_loss))
    measured = next((r for r in reversed(history) if r.layers_measured), record)
    if any(layer.dead_fraction > DEAD_RELU_FRACTION for layer in measured.layers) \
            or line.level > best * (1 + LOSS_RISING_FRACTION):
        return []
    if fall >= threshold * fall_se or learning(history):
        return [_slow_finding(record, line.level, fall, window)]
    return [_flat_finding(record, line.level, fall, window)]


def _flat_finding(record: StepRecord, level: float, fall: float,
                  window: Sequence[StepRecord]) -> Finding:
    """loss_flat, with the fix that fits the run's settings."""
    message = (
        f"training loss has stayed near {sig(level)} over the last {len(window)} logs "
        f"(steps {window[0].step}-{record.step}: fitted change {sig(-100 * fall)} %, surely "
        f"within {sig(100 * FLAT_FALL)} %)"
    )
    fix: dict[str, float | str] | None
    if record.weight_decay > FLAT_WEIGHT_DECAY:
        recommendation = (
            f"weight decay {sig(record.weight_decay)} is far above the usual 1e-6 to 1e-3 "
            f"(seed 002) and may hold the weights near zero: set weight decay to "
            f"{OVERFIT_WEIGHT_DECAY_START:g}")
        fix = {"weight_decay": OVERFIT_WEIGHT_DECAY_START}
    elif record.optimizer in SGD_FAMILY:
        lr = DEFAULTS["learning_rate"]
        recommendation = (
            f"optimisation is stalling with {record.optimizer} (seed 001: try another updater): "
            f"switch to Adam with lr {lr:g}"
        )
        fix = {"optimizer": "Adam", "learning_rate": lr}
    else:
        recommendation, fix = _lr_advice(
            record, 10.0, "the learning rate is probably too low (seeds 000/001)"
        )
    return Finding("loss_flat", "warning", message, recommendation, fix, None,
                   "fall across the window, %", 100 * fall, False)


def _slow_finding(record: StepRecord, level: float, fall: float,
                  window: Sequence[StepRecord]) -> Finding:
    """loss_slow: a real but small fall; a modestly higher lr is the advice."""
    recommendation, fix = _lr_advice(
        record, 3.0, "the loss is falling, but slowly: the learning rate may be too low "
        "(seeds 000/001)")
    message = (
        f"training loss is falling slowly: {sig(100 * fall)} % over the last {len(window)} logs "
        f"(steps {window[0].step}-{record.step}) at a level of {sig(level)}"
    )
    return Finding("loss_slow", "info", message, recommendation, fix, None,
                   "fall across the window, %", 100 * fall, False)


def _spike(value: float, previous: Sequence[float]) -> bool:
    """Whether `value` stands out of `previous` by both GRADIENT_SPIKE_FACTOR and
    GRADIENT_SPIKE_Z robust standard deviations, on a log scale (gradient norms of small
    batches are heavy-tailed: a healthy ResNet-18 at batch 32 spans 40x in 14 logs)."""
    if value <= 0 or any(p <= 0 for p in previous):
        return False
    logs = [math.log10(p) for p in previous]
    centre = median(logs)
    spread = MAD_TO_STD * median(abs(v - centre) for v in logs)
    return math.log10(value) - centre > max(math.log10(GRADIENT_SPIKE_FACTOR),
                                            GRADIENT_SPIKE_Z * spread)


def rule_exploding_gradients(history: Sequence[StepRecord], run: RunFacts) -> list[Finding]:
    """Seed 003: a layer's gradient norm > 10x the median of its previous 10 logs (needs 5),
    and beyond their usual spread (_spike), in at least half the layers at once: a small
    batch's gradients are heavy-tailed (a healthy tiny CNN at batch 16: one layer 12x its
    median for one log), an explosion reaches most of the network (lr 1.0 mid-run: 3 of
    4 layers 12-19x at the first log)."""
    record = history[-1]
    if record.step == 0:
        return []
    previous_records = _trained(history)[-GRADIENT_BASELINE_LOGS - 1 : -1]
    judged: dict[str, tuple[list[float], bool]] = {}
    for layer in record.layers:
        previous = [
            g for g in _layer_values(previous_records, layer.name, "grad_norm")
            if g is not None and math.isfinite(g)
        ]
        if (len(previous) >= GRADIENT_BASELINE_MIN_LOGS and layer.grad_norm is not None
                and math.isfinite(layer.grad_norm) and median(previous) > 0):
            judged[layer.name] = previous, _spike(layer.grad_norm, previous)
    spiking = [name for name, (_, spike) in judged.items() if spike]
    if 2 * len(spiking) < len(judged):
        return []  # one layer's odd batch; an explosion reaches most of the network
    findings = []
    for layer in record.layers:
        if layer.name not in spiking:
            continue
        previous = judged[layer.name][0]
        baseline = median(previous)
        recommendation, fix = _lr_advice(
            record,
            0.1,
            "exploding gradients (seed 003): lower the learning rate; input normalisation and "
            "gradient clipping also help",
        )
        message = (
            f"layer {layer.name}: gradient norm {sig(layer.grad_norm)} is "
            f"{sig(layer.grad_norm / baseline)}x its median {sig(baseline)} over the previous "
            f"{len(previous)} logs"
        )
        findings.append(Finding(
            "exploding_gradients", "warning", message, recommendation, fix, layer.name,
            "gradient norm over its median", layer.grad_norm / baseline))
    return findings


def _best_block(values: Sequence[float], sigmas: Sequence[float],
                end: int) -> tuple[slice, Estimate, int] | None:
    """Among consecutive blocks of OVERFIT_BLOCK_LOGS logs ending at `end` and going back
    (the oldest may be shorter, OVERFIT_RECENT_LOGS at least): (its slice, its mean, how
    many blocks there were) of the lowest-mean block; None if there is none."""
    blocks = []
    while end - max(0, end - OVERFIT_BLOCK_LOGS) >= OVERFIT_RECENT_LOGS:
        block = slice(max(0, end - OVERFIT_BLOCK_LOGS), end)
        blocks.append((block, pooled(values[block], sigmas[block])))
        end = block.start
    if not blocks:
        return None
    block, best = min(blocks, key=lambda b: b[1].mean)
    return block, best, len(blocks)


def _regularisation(record: StepRecord) -> tuple[dict[str, float | str] | None, str]:
    """More regularisation, seed 002's way: weight decay first (0 -> 1e-4, else x10, while
    below 1e-3, its usual L2 range), then dropout by 20 points (up to 90 %); the fix and
    its words."""
    if record.weight_decay < OVERFIT_WEIGHT_DECAY_MAX:
        wd = (
            min(WEIGHT_DECAY_MAX, float(f"{record.weight_decay * 10:.3g}"))
            if record.weight_decay > 0
            else OVERFIT_WEIGHT_DECAY_START
        )
        return {"weight_decay": wd}, f"set weight decay to {wd:g}"
    if record.dropout < DROPOUT_MAX:
        dropout = min(DROPOUT_MAX, record.dropout + OVERFIT_DROPOUT_STEP)
        return {"dropout": dropout}, f"set dropout to {dropout} %"
    return None, "regularisation is already at its limits"


def rule_overfitting(history: Sequence[StepRecord], run: RunFacts) -> list[Finding]:
    """Seed 002: validation loss rising while training loss falls -> stop early or regularise.

    Early stopping's own question, asked of evidence: does the mean validation loss of the
    last 12 logs stand above the best mean of the blocks of 24 logs before them by more
    than z_threshold() standard errors (Bonferroni over the blocks: picking the lowest of
    several noisy means is itself a chance to be fooled) and by at least 10 %, while the
    training loss fell (its mean over the same logs is lower)? A slow climb counts as
    much as a sudden one. The fix raises weight decay first (0 -> 1e-4, else x10, while
    below 1e-3: seed 002's usual L2 range), then dropout by 20 points (up to 90 %).
    """
    window = [r for r in _trained(history) if r.validate_loss is not None]
    if len(window) < 2 * OVERFIT_RECENT_LOGS:
        return []
    val, train = _losses(window, "validate_loss", window), [r.train_loss for r in window]
    if val is None or not all(math.isfinite(x) for x in train):
        return []
    values, told = val
    sigmas = told.sigmas
    split = len(window) - OVERFIT_RECENT_LOGS
    found = _best_block(values, sigmas, split)
    if found is None:
        return []
    block, best, blocks = found
    recent = pooled(values[split:], sigmas[split:])
    z = z_above(recent, best)
    if z < z_threshold(comparisons=blocks, dof=told.dof) \
            or recent.mean <= best.mean * (1 + OVERFIT_RISE):
        return []
    train_before, train_after = fmean(train[block]), fmean(train[split:])
    if train_after >= train_before:
        return []
    best_steps = f"steps {window[block.start].step}-{window[block.stop - 1].step}"
    record = window[-1]
    fix, change = _regularisation(record)
    recommendation = (
        f"the model is overfitting (seed 002): stop here (early stopping) and keep the "
        f"checkpoint nearest {best_steps}, or regularise more: {change}"
    )
    rise = 100 * (recent.mean / best.mean - 1)
    message = (
        f"validation loss rose {sig(rise)} % above its best (mean {sig(best.mean)} over "
        f"{best_steps} -> {sig(recent.mean)} over the last {OVERFIT_RECENT_LOGS} logs; "
        f"{_z_words(z)}) while training loss fell from {sig(train_before)} to "
        f"{sig(train_after)}"
    )
    return [Finding("overfitting", "warning", message, recommendation, fix, None,
                    "validation loss rise, %", rise)]


def rule_non_finite(history: Sequence[StepRecord], run: RunFacts) -> list[Finding]:
    """Seed 002: NaN or Inf in a loss, an activation, a gradient or an update is an error.

    NaN update ratios are undefined, not errors (weights gone NaN show in the activations and
    the validation loss); infinite ones are. On the step-0 record, train loss and gradients
    are ignored. `layer` is the first layer, in forward order, with a non-finite value.
    """
    record = history[-1]
    places: list[str] = []
    first_layer = None
    if record.step > 0 and record.train_loss_measured and not math.isfinite(record.train_loss):
        places.append(f"training loss ({record.train_loss})")
    if record.validate_loss is not None and not math.isfinite(record.validate_loss):
        places.append(f"validation loss ({record.validate_loss})")
    for layer in record.layers:
        values = [("activation mean", layer.act_mean), ("activation std", layer.act_std)] \
            if layer.activation_measured else []
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
    rule_loss_flat,  # and loss_slow
    rule_exploding_gradients,
    rule_overfitting,
    rule_converged,
)
# The rules that read the layers' figures: at a log that did not measure them, they are
# not run, and what they found at the last measured log is held.
LAYER_RULES: frozenset[Rule] = frozenset({
    rule_update_ratio, rule_activation_std, rule_dead_relu, rule_exploding_gradients})
