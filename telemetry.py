"""What the trainer measures, computed on the device and synchronised once per log.

Per-step work is a few tensor additions; `.item()`/`.tolist()` happen only on
logged steps, so logging costs nothing between them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from models import monitored_layers

HISTOGRAM_BINS = 40


class IntervalMetrics:
    """Training loss and accuracy averaged over every sample since the last log."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device, dtype=torch.long)
        self.samples = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        n = targets.shape[0]
        self.loss_sum += loss.detach() * n
        self.correct += (logits.detach().argmax(dim=1) == targets).sum()
        self.samples += n

    def summary(self) -> tuple[float, float]:
        """(mean loss, accuracy %) and start a new interval."""
        n = max(self.samples, 1)
        loss, correct = (self.loss_sum / n).item(), self.correct.item()
        self.reset()
        return loss, 100.0 * correct / n


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    max_batches: int | None = None,
    on_first_batch: ActivationRecorder | None = None,
) -> tuple[float, float]:
    """(mean loss, accuracy %) over `max_batches` batches (all when None), in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    samples = 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if on_first_batch is not None and i == 0:
            with on_first_batch.armed():
                logits = model(x)
        else:
            logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(dim=1) == y).sum()
        samples += y.shape[0]
    model.train(was_training)
    n = max(samples, 1)
    return (loss_sum / n).item(), 100.0 * correct.item() / n


class ActivationRecorder:
    """Histograms of every conv/fc layer's output, from hooks registered once.

    The hooks do nothing unless armed, so ordinary steps pay one attribute test.
    """

    def __init__(self, model: nn.Module, bins: int = HISTOGRAM_BINS) -> None:
        self.layers = monitored_layers(model)
        self.bins = bins
        self._armed = False
        self._captured: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            layer.module.register_forward_hook(self._hook(layer.name))

    def _hook(self, name: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
            if self._armed:
                self._captured[name] = output.detach()

        return hook

    @contextmanager
    def armed(self) -> Iterator[None]:
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def rows(self, step: int) -> list[dict]:
        """One `activations` row per layer captured since the last call."""
        captured = [(layer, self._captured.get(layer.name)) for layer in self.layers]
        captured = [(layer, x.float().flatten()) for layer, x in captured if x is not None]
        self._captured.clear()
        if not captured:
            return []
        # Two synchronisations in all: ranges first (histc needs them as numbers), then results.
        ranges = torch.stack([torch.stack(torch.aminmax(x)) for _, x in captured]).tolist()
        results = []
        for (_, x), (lo, hi) in zip(captured, ranges, strict=True):
            if not (math.isfinite(lo) and math.isfinite(hi)):
                lo, hi = 0.0, 1.0  # NaN/Inf activations: the mean and std tell the story
            elif lo == hi:  # a constant output still gets a visible bar
                lo, hi = lo - 0.5, hi + 0.5
            counts = torch.histc(x, bins=self.bins, min=lo, max=hi)
            results.append((lo, hi, counts, x.mean(), x.std(unbiased=False)))
        host = [(lo, hi, c.tolist(), m.item(), s.item()) for lo, hi, c, m, s in results]
        rows = []
        for (layer, _), (lo, hi, counts, mean, std) in zip(captured, host, strict=True):
            step_width = (hi - lo) / self.bins
            rows.append(
                {
                    "step": step,
                    "layer_name": layer.name,
                    "nn_part": layer.nn_part,
                    "layer_type": layer.layer_type,
                    "number": layer.number,
                    "bin_edges": [lo + i * step_width for i in range(self.bins + 1)],
                    "counts": [int(c) for c in counts],
                    "mean": mean,
                    "std": std,
                }
            )
        return rows

