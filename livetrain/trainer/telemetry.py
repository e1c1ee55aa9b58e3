"""What the trainer measures, computed on the device and synchronised once per log.

Per-step work is a detached loss kept in a list and, for a classifier, two small
ops; `.item()`/`.tolist()` happen only on logged steps, so telemetry costs nothing
between them.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psutil
import torch
from torch import nn

from livetrain.trainer.inspection import awaits_first_batch
from livetrain.trainer.layers import MonitoredLayer, monitored_layers

HISTOGRAM_BINS = 40
BINCOUNT_FROM = 2048  # values from which a CPU histogram is counted by bincount
HISTOGRAM_SAMPLE = 65_536  # values binned per tensor; the range still comes from all of them
NONLINEARITIES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Tanh, nn.Sigmoid, nn.Softplus,
)


@dataclass(frozen=True)
class IntervalSummary:
    """The training figures of one log interval; None where nothing was measured."""

    loss: float | None  # mean per sample (per step when batch sizes are unknown)
    accuracy: float | None  # percent, for classification
    steps: int  # steps averaged: those with a finite loss
    loss_std: float | None  # sample std of the per-step losses (None below 2 steps)
    non_finite: int = 0  # steps whose loss was not finite, left out of the figures
    first_non_finite: int | None = None  # the first of them, counted from the interval's start


class IntervalMetrics:
    """Training loss (and accuracy, for classification) averaged since the last log,
    with the spread of the per-step losses: how far the average can be trusted.

    A step costs no device work for the loss (its detached tensor is kept) and, for a
    classifier on the steps that count answers, two small ops that mark the right ones
    (summed at the log); every CHUNK steps the kept tensors are folded into one. A log
    brings the interval to the host in one transfer and takes the sums there in
    float64, which MPS devices do not have.
    """

    CHUNK = 256

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.losses: list[torch.Tensor] = []  # this chunk's per-step losses
        self.chunks: list[torch.Tensor] = []  # earlier chunks, stacked
        self.weights: list[int] = []  # per step: its samples when known, else 1
        self.correct: list[torch.Tensor] = []  # per classified step: its right answers
        self.predicted = 0  # targets the accuracy counts (0: not classification)
        self.samples = 0

    def add(self, loss: torch.Tensor, outputs: torch.Tensor | None,
            targets: torch.Tensor | None, answers: bool = True) -> int | None:
        """Count one step (`loss` detached, one value); returns its number of samples
        when the tensors tell it. `answers`: whether this step's right answers are
        counted for the accuracy (see LiveRun's ACCURACY_STEPS)."""
        n = batch_size(outputs, targets)
        self.losses.append(loss)
        self.weights.append(n or 1)
        if len(self.losses) == self.CHUNK:
            self.chunks.append(torch.stack(self.losses).float())
            self.losses = []
        if answers and n and looks_like_classification(outputs, targets):
            self.correct.append(outputs.detach().argmax(dim=1) == targets)  # summed at the log
            if len(self.correct) == self.CHUNK:
                self.correct = [self._right_answers().reshape(1)]
            self.predicted += targets.numel()
        self.samples += n or 0
        return n

    def _right_answers(self) -> torch.Tensor:
        return torch.cat([c.reshape(-1) for c in self.correct]).sum()

    def _packed(self, device: torch.device) -> torch.Tensor:
        """[loss x weight per step..., weight per step..., correct, predicted, steps]."""
        steps = len(self.weights)
        parts = self.chunks + ([torch.stack(self.losses).float()] if self.losses else [])
        values = torch.cat(parts).to(device) if parts else torch.zeros(0, device=device)
        weights = torch.tensor(self.weights, dtype=torch.float32).to(device)
        correct = self._right_answers().float().reshape(1).to(device) \
            if self.correct else torch.zeros(1, device=device)
        counts = torch.tensor([float(self.predicted), float(steps)]).to(device)
        return torch.cat([values * weights, weights, correct, counts])

    def summary(
        self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> IntervalSummary:
        """The interval's figures, and start a new interval.

        `reduce` sums the interval's totals over torchrun ranks (which take the same
        steps): the figures are then the whole job's, not rank 0's shard's. A step whose
        loss is not finite is counted apart and left out of the figures.
        """
        steps = len(self.weights)
        device = self.losses[0].device if self.losses else \
            self.chunks[0].device if self.chunks else self.device
        packed = self._packed(device)
        if reduce is not None:
            packed = reduce(packed)
        host = packed.cpu().double()
        self.reset()
        weighted, weights = host[:steps], host[steps: 2 * steps]
        correct, predicted = host[2 * steps].item(), host[2 * steps + 1].item()
        per_step = weighted / weights
        finite = torch.isfinite(per_step)
        bad = (~finite).nonzero().flatten().tolist()
        kept = int(finite.sum())
        if not kept:
            return IntervalSummary(None, None, 0, None, len(bad), bad[0] if bad else None)
        losses = per_step[finite]
        std = losses.std().item() if kept >= 2 else None
        return IntervalSummary(weighted[finite].sum().item() / weights[finite].sum().item(),
                               100.0 * correct / predicted if predicted else None,
                               kept, std if std is None or math.isfinite(std) else None,
                               len(bad), bad[0] if bad else None)


def batch_size(outputs: Any, targets: Any) -> int | None:
    """The samples in a step, from its targets or outputs (None when neither is a tensor
    with a batch dimension)."""
    for tensor in (targets, outputs):
        if isinstance(tensor, torch.Tensor) and tensor.dim() > 0:
            return int(tensor.shape[0])
    return None


def looks_like_classification(outputs: Any, targets: Any) -> bool:
    """Scores over classes (N, C, ...) against class indices (N, ...): accuracy means
    something. Anything else (regression, one-hot, language-model logits flattened
    differently) records the loss only."""
    if not (isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)):
        return False
    return (outputs.is_floating_point() and not targets.is_floating_point()
            and targets.dtype != torch.bool and outputs.dim() == targets.dim() + 1
            and outputs.dim() >= 2 and outputs.shape[1] >= 2
            and outputs.shape[0] == targets.shape[0] and outputs.shape[2:] == targets.shape[1:])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    max_batches: int | None = None,
    probe: LayerProbe | None = None,
    between_batches: Callable[[], None] | None = None,
) -> dict[str, float | int | None]:
    """Cross-entropy validation over `max_batches` batches (all when None), in eval mode.

    Returns what LiveRun's `validate` returns: "loss" (per sample), "accuracy" (%), and
    the spread of the per-batch losses, "loss_std" (None for one batch) and "batches",
    which tell the board and the health rules how far the loss can be trusted. The probe
    records activations on the first batch: the same images every time, so histograms
    are comparable from one log to the next. `between_batches` lets the trainer take a
    parameter change without waiting for the whole pass.
    """
    was_training = model.training
    model.eval()
    batch_losses: list[torch.Tensor] = []
    correct = torch.zeros((), device=device, dtype=torch.long)
    sizes: list[int] = []
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if probe is not None and i == 0:
            with probe.armed():
                logits = model(x)
        else:
            logits = model(x)
        batch_losses.append(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += (logits.argmax(dim=1) == y).sum()
        sizes.append(y.shape[0])
        if between_batches is not None:
            between_batches()
    model.train(was_training)
    if not sizes:
        return {"loss": 0.0, "accuracy": 0.0, "loss_std": None, "batches": 0}
    sums = torch.stack(batch_losses).cpu().double()  # MPS has no float64
    means = sums / torch.tensor(sizes, dtype=torch.float64)
    samples = sum(sizes)
    return {"loss": sums.sum().item() / samples, "accuracy": 100.0 * correct.item() / samples,
            "loss_std": means.std().item() if len(sizes) > 1 else None, "batches": len(sizes)}


def _finite_range(x: torch.Tensor, lo: float, hi: float) -> tuple[float, float]:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        finite = x[torch.isfinite(x)]  # rare: only when the model has blown up
        if finite.numel() == 0:
            return 0.0, 1.0
        lo, hi = finite.min().item(), finite.max().item()
    if lo == hi:  # a constant still gets a visible bar
        return lo - 0.5, hi + 0.5
    return lo, hi


def histograms(tensors: list[torch.Tensor], bins: int) -> list[tuple[list[float], list[int]]]:
    """(bin edges, counts) for each tensor, with two device synchronisations in all.

    Large tensors are binned from an even stride of HISTOGRAM_SAMPLE values (the
    shape of a distribution needs no more); the edges span the full tensor's range,
    so an outlier still widens the plot.
    """
    if not tensors:
        return []
    flat = [t.detach().float().flatten() for t in tensors]
    ranges = torch.stack([torch.stack(torch.aminmax(x)) for x in flat]).tolist()
    edges, counts = [], []
    for x, (lo, hi) in zip(flat, ranges, strict=True):
        finite = math.isfinite(lo) and math.isfinite(hi)
        lo, hi = _finite_range(x, lo, hi)
        width = (hi - lo) / bins
        edges.append([lo + i * width for i in range(bins + 1)])
        counts.append(bin_counts(even_sample(x), bins, lo, hi, finite))
    return [
        (e, [int(c) for c in row])
        for e, row in zip(edges, torch.stack(counts).tolist(), strict=True)
    ]


def bin_counts(x: torch.Tensor, bins: int, lo: float, hi: float,
               finite: bool) -> torch.Tensor:
    """Counts of `x` in `bins` equal bins over [lo, hi] (float, as histc gives them).

    On the CPU, where every value is finite and within the range (`finite`: lo and hi
    are x's own min and max), by each value's bin index and bincount: 0.22 ms for
    65,536 values against histc's 0.95 ms, measured on one core (below BINCOUNT_FROM
    values histc's one op is the faster). Elsewhere histc: on CUDA, bincount reads its
    largest index back to size its output, a device sync.
    """
    if x.device.type != "cpu" or not finite or x.numel() < BINCOUNT_FROM:
        return torch.histc(x, bins=bins, min=lo, max=hi)
    index = ((x - lo) * (bins / (hi - lo))).long().clamp_(0, bins - 1)
    return torch.bincount(index, minlength=bins).float()


def read_scalars(values: list[torch.Tensor | None]) -> list[float | None]:
    """One-value tensors (None stays None) as floats, in one read where they share a
    device: each `.item()` of a log was a device sync of its own."""
    present = [v for v in values if v is not None]
    if not present:
        return [None] * len(values)
    device = present[0].device
    if all(v.device == device for v in present):
        read = iter(torch.stack([v.float().reshape(()) for v in present]).tolist())
    else:
        read = iter([v.item() for v in present])
    return [None if v is None else next(read) for v in values]


def activation_summary(x: torch.Tensor) -> torch.Tensor:
    """[mean, std, fraction of zeros, fraction of dead units] of one activation.

    A unit (dim 1: a channel or a feature) is dead when it is zero for every sample
    and position; its max and min over the other dims say so without the copy a
    per-unit view would need. The fraction of zeros is counted on the even stride
    of HISTOGRAM_SAMPLE values the histogram uses (its error is under 0.5 %): on the
    whole first conv output it was the largest cost of a log's telemetry.
    """
    dims = [d for d in range(x.ndim) if d != 1]
    dead = (x.amax(dim=dims) == 0) & (x.amin(dim=dims) == 0)
    zeros = (even_sample(x.flatten()) == 0).float().mean()
    std, mean = torch.std_mean(x, unbiased=False)
    return torch.stack([mean, std, zeros, dead.float().mean()])


def even_sample(flat: torch.Tensor) -> torch.Tensor:
    """About HISTOGRAM_SAMPLE values of a flat tensor at an even stride (all, if fewer)."""
    return flat[:: max(1, flat.numel() // HISTOGRAM_SAMPLE)]


class LayerProbe:
    """Per watched layer: activations after the nonlinearity, gradients and updates.

    Forward hooks are registered once and do nothing unless armed. A layer's
    activation is the output of the first nonlinearity that runs after it and
    before the next monitored layer, or its own output when there is none (the
    logits).
    """

    def __init__(self, model: nn.Module, bins: int = HISTOGRAM_BINS,
                 names: list[str] | None = None, eager: bool = False) -> None:
        self.layers = monitored_layers(model, names)
        # A compiled model runs no forward hook inside its graph: a recorded pass runs
        # eagerly instead (torch.compiler's force_eager stance), which leaves the
        # compiled graph, and its guards, as they were. None: nothing to switch.
        self._eager = eager and hasattr(torch.compiler, "set_stance")
        self._stance: Any = None
        self.bins = bins
        self._armed = False
        self._once = False  # armed for the next whole forward pass of the model only
        self._layer_of = {id(layer.module): layer for layer in self.layers}
        self._pending: tuple[MonitoredLayer, torch.Tensor] | None = None
        self._captured: dict[str, tuple[torch.Tensor, bool]] = {}
        self._grad_norms: list[torch.Tensor | None] = []
        self._before: list[torch.Tensor] = []
        self._updates: list[torch.Tensor] = []
        self._update_ratios: list[torch.Tensor | None] = []
        self._model = model
        self.spent = 0.0  # seconds of measuring since take_spent (TelemetryCadence's cost)
        self._nonlinearities = [m for m in model.modules() if isinstance(m, NONLINEARITIES)]
        # Hooks are on the model only while armed: even a hook that does nothing sends
        # each call of its module down torch's slower path, on every step.
        self._handles: list[Any] = []

    def _attach(self) -> None:
        if self._handles:
            return
        self._go_eager()
        self._handles = [layer.module.register_forward_hook(self._on_layer)
                         for layer in self.layers]
        self._handles += [module.register_forward_hook(self._on_nonlinearity)
                          for module in self._nonlinearities]
        self._handles.append(self._model.register_forward_hook(self._on_model))

    def remove(self) -> None:
        """Take the hooks off the model: between recorded passes, and for good when the
        run ends (the model is the user's again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._back_to_compiled()

    def _go_eager(self) -> None:
        if self._eager and self._stance is None:
            self._stance = torch.compiler.set_stance("force_eager")

    def _back_to_compiled(self) -> None:
        if self._stance is not None:
            self._stance.__exit__(None, None, None)  # the stance the user had
            self._stance = None

    def eager_next_forward(self) -> None:
        """Run the next forward pass eagerly, without recording it (the model table's
        first pass, for a compiled model)."""
        self._go_eager()
        self._once = True

    # -- activations ----------------------------------------------------------

    def _on_layer(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self._armed and (tensor := first_tensor(output)) is not None:
            self._settle()
            self._pending = (self._layer_of[id(module)], tensor.detach())

    def _on_nonlinearity(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self._armed and self._pending is not None:
            layer, _ = self._pending
            self._captured[layer.name] = (output.detach(), True)
            self._pending = None

    def _on_model(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.end_forward()

    def end_forward(self) -> None:
        """The armed forward pass is over: the model's own forward returned, or the step
        ended (a LightningModule's training_step calls its layers, not its forward)."""
        if self._once:
            self._settle()
            self._armed = self._once = False
            self.remove()
            self._back_to_compiled()

    def arm_next_forward(self) -> None:
        """Record the activations of the model's next forward pass (a training batch of a
        loop that has no validation to record them on)."""
        self._attach()
        self._armed = self._once = True

    def _settle(self) -> None:
        if self._pending is not None:
            layer, raw = self._pending
            self._captured[layer.name] = (raw, False)
            self._pending = None

    @contextmanager
    def armed(self) -> Iterator[None]:
        self._attach()
        self._armed = True
        try:
            yield
        finally:
            self._settle()
            self._armed = self._once = False
            self.remove()

    # -- gradients and updates, around optimizer.step() on a logged step -------

    def _weights(self) -> list[torch.Tensor]:
        return [layer.weight for layer in self.layers]

    def before_update(self) -> None:
        """Gradient norms, and the even stride of each weight that its update is measured
        on: the ratio of two means and a histogram need no more, and a copy of every
        weight at every log was the largest cost of a log on a wide model."""
        started = time.perf_counter()
        weights = self._weights()
        self._grad_norms = [w.grad.detach().norm() if w.grad is not None else None
                            for w in weights]
        self._before = [even_sample(w.detach().reshape(-1)).clone() for w in weights]
        self.spent += time.perf_counter() - started

    def after_update(self) -> None:
        started = time.perf_counter()
        self._measure_update()
        self.spent += time.perf_counter() - started

    def _measure_update(self) -> None:
        weights = self._weights()
        self._updates = [even_sample(w.detach().reshape(-1)) - b
                         for w, b in zip(weights, self._before, strict=True)]
        # mean |update| / mean |weight| over the same stride: the ratio of their L1 norms,
        # two multi-tensor ops for all layers
        if not weights:
            self._updates, self._update_ratios, self._before = [], [], []
            return
        moved = torch.stack(torch._foreach_norm(self._updates, 1))
        held = torch.stack(torch._foreach_norm(self._before, 1))
        ratios = moved / held.clamp_min(1e-12 * max(b.numel() for b in self._before))
        self._update_ratios = [r if w.requires_grad else None
                               for w, r in zip(weights, ratios, strict=True)]
        self._before = []

    def forget_update(self) -> None:
        """Drop what was measured of an update the guard refused."""
        self._grad_norms, self._update_ratios, self._updates, self._before = [], [], [], []

    def take_spent(self) -> float:
        """The seconds this probe's measurements took since the last call."""
        spent, self.spent = self.spent, 0.0
        return spent

    def rows(self, step: int) -> dict[str, list[dict[str, Any]]]:
        """Rows for activations, layer_statistics and layer_histograms; resets the probe."""
        started = time.perf_counter()
        out = self._rows(step)
        self.spent += time.perf_counter() - started
        return out

    # -- the rows of one log ----------------------------------------------------

    def _rows(self, step: int) -> dict[str, list[dict[str, Any]]]:
        if not self.layers or awaits_first_batch(self._model):  # `layers=[]`, a model
            # without a layer the probe knows, or lazy layers that have no weights yet
            return {"activations": [], "layer_statistics": [], "layer_histograms": []}
        layers = [layer for layer in self.layers if layer.name in self._captured]
        acts = [self._captured[layer.name][0].float() for layer in layers]
        weights = [layer.weight.detach() for layer in self.layers]
        count = len(self.layers)
        summaries = [activation_summary(a) for a in acts]
        scalars = read_scalars([*torch._foreach_norm(weights), *self._grad_norms]
                               + self._update_ratios + [v for a in summaries for v in a.unbind()])
        weight_norms = [scalars.pop(0) for _ in range(count)]
        grad_norms = [scalars.pop(0) for _ in self._grad_norms] or [None] * count
        ratios = [scalars.pop(0) for _ in self._update_ratios] or [None] * count
        per_act = [scalars[4 * i: 4 * i + 4] for i in range(len(acts))]
        hists = histograms(acts + weights + self._updates, self.bins)
        act_hists, weight_hists = hists[: len(acts)], hists[len(acts): len(acts) + count]
        update_hists = hists[len(acts) + count:]

        stats = {name: values for name, values in zip(
            [layer.name for layer in layers], per_act, strict=True)}
        out: dict[str, list[dict[str, Any]]] = {
            "activations": [], "layer_statistics": [], "layer_histograms": []}
        for layer, (edges, counts), (mean, std, _, _) in zip(
            layers, act_hists, per_act, strict=True
        ):
            out["activations"].append({
                "step": step, "layer_name": layer.name, "nn_part": layer.nn_part,
                "layer_type": layer.layer_type, "number": layer.number,
                "bin_edges": edges, "counts": counts, "mean": mean, "std": std,
            })
        for i, layer in enumerate(self.layers):
            mean, std, zeros, dead = stats.get(layer.name, (None,) * 4)
            out["layer_statistics"].append({
                "step": step, "layer_name": layer.name, "act_mean": mean, "act_std": std,
                "zero_fraction": zeros, "dead_fraction": dead,
                "has_nonlinearity": self._captured.get(layer.name, (None, False))[1],
                "grad_norm": grad_norms[i], "update_ratio": ratios[i],
                "weight_norm": weight_norms[i],
            })
            out["layer_histograms"].append({
                "step": step, "layer_name": layer.name, "kind": "weight",
                "bin_edges": weight_hists[i][0], "counts": weight_hists[i][1],
            })
        for layer, (edges, counts) in zip(self.layers, update_hists, strict=False):
            out["layer_histograms"].append({
                "step": step, "layer_name": layer.name, "kind": "update",
                "bin_edges": edges, "counts": counts,
            })
        self._captured.clear()
        self._grad_norms, self._update_ratios, self._updates = [], [], []
        return out


def first_tensor(output: Any) -> torch.Tensor | None:
    """A layer's output tensor: an LSTM or attention layer returns a tuple, output first."""
    while isinstance(output, tuple | list) and output:
        output = output[0]
    return output if isinstance(output, torch.Tensor) else None


class LayerTable:
    """Every leaf module in forward order with its output shape (per sample) and size,
    recorded during the model's first forward pass: whatever its input looks like, the
    model itself shows it. `rows` is None until then."""

    def __init__(self, model: nn.Module, monitored: set[str]) -> None:
        self.rows: list[dict[str, Any]] | None = None
        self._monitored = monitored
        self._names = {id(m): n for n, m in model.named_modules()}
        self._seen: dict[int, dict[str, Any]] = {}
        leaves = [m for m in model.modules() if not list(m.children())] or [model]
        self._handles = [m.register_forward_hook(self._record) for m in leaves]
        self._handles.append(model.register_forward_hook(self._done))

    def _record(self, module: nn.Module, inputs: Any, output: Any) -> None:
        tensor = first_tensor(output)
        if id(module) in self._seen or tensor is None:
            return
        params = list(module.parameters(recurse=False))
        name = self._names[id(module)] or "model"
        self._seen[id(module)] = {
            "position": len(self._seen),
            "layer_name": name,
            "layer_type": type(module).__name__,
            "output_shape": "x".join(str(d) for d in tensor.shape[1:]),
            "parameters": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "monitored": name in self._monitored,
        }

    def _done(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.remove()
        self.rows = sorted(self._seen.values(), key=lambda r: r["position"])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class Progress:
    """Counters the training loop bumps (plain ints) and the system sampler reads."""

    def __init__(self) -> None:
        self.step = 0
        self.samples = 0


class SystemSampler:
    """Process CPU and memory, GPU use and throughput every few seconds, off the loop."""

    def __init__(
        self, sink: Any, progress: Progress, device: torch.device, seconds: float = 5.0
    ) -> None:
        self.sink = sink
        self.progress = progress
        self.device = device
        self.seconds = seconds
        self._process = psutil.Process(os.getpid())
        self._process.cpu_percent(None)  # the first reading is meaningless
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="system-sampler", daemon=True)
        self._thread.start()

    def sample(self, last: tuple[float, int]) -> tuple[dict[str, Any], tuple[float, int]]:
        clock, samples = time.monotonic(), self.progress.samples
        elapsed = clock - last[0]
        row: dict[str, Any] = {
            "step": self.progress.step,
            "cpu_percent": self._process.cpu_percent(None),
            "rss_bytes": float(self._process.memory_info().rss),
            "samples_per_second": (samples - last[1]) / elapsed if elapsed > 0 else None,
            "gpu_utilization": None,
            "gpu_memory_bytes": None,
        }
        if self.device.type == "cuda":
            row["gpu_memory_bytes"] = float(torch.cuda.memory_allocated(self.device))
            with contextlib.suppress(Exception):  # needs pynvml; memory alone still helps
                row["gpu_utilization"] = float(torch.cuda.utilization(self.device))
        return row, (clock, samples)

    def _run(self) -> None:
        last = (time.monotonic(), self.progress.samples)
        while not self._stop.wait(self.seconds):
            row, last = self.sample(last)
            self.sink.rows("system_metrics", [{"dt": datetime.now(UTC), **row}])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.seconds + 1)
