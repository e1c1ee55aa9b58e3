"""The per-layer figures a log writes: what the activation, gradient and update charts show."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from livetrain.trainer.telemetry import (
    HISTOGRAM_SAMPLE,
    LayerProbe,
    activation_summary,
    bin_counts,
    evaluate,
    histograms,
)


def test_activation_summary_counts_dead_units_and_zeros() -> None:
    torch.manual_seed(0)
    x = torch.relu(torch.randn(8, 4, 5, 5)) + 0.1  # no zeros
    x[:, 1] = 0.0  # channel 1: zero for every sample and position -- dead
    x[:, 2] = 0.0
    x[3, 2, 4, 4] = 2.0  # channel 2: one live value in one sample -- not dead
    mean, std, zeros, dead = activation_summary(x).tolist()
    assert mean == pytest.approx(x.mean().item())
    assert std == pytest.approx(x.std(unbiased=False).item())
    assert dead == pytest.approx(1 / 4)
    assert zeros == pytest.approx((x == 0).float().mean().item(), abs=1e-6)  # small: all counted


def test_activation_summary_zero_fraction_of_a_large_tensor_is_close() -> None:
    torch.manual_seed(1)
    x = torch.relu(torch.randn(64, 32, 28, 28))  # 1.6 M values, about half zero
    assert x.numel() > 10 * HISTOGRAM_SAMPLE
    _, _, zeros, dead = activation_summary(x).tolist()
    assert zeros == pytest.approx((x == 0).float().mean().item(), abs=0.005)
    assert dead == 0.0


def test_activation_summary_of_features() -> None:
    x = torch.tensor([[0.0, 1.0, 0.0], [0.0, 3.0, 0.0]])  # (batch, features)
    mean, _, zeros, dead = activation_summary(x).tolist()
    assert mean == pytest.approx(4 / 6)
    assert zeros == pytest.approx(4 / 6)
    assert dead == pytest.approx(2 / 3)


def test_histograms_span_the_range_and_count_every_sampled_value() -> None:
    x = torch.arange(1000, dtype=torch.float32)
    [(edges, counts)] = histograms([x], bins=10)
    assert edges[0] == 0.0 and edges[-1] == pytest.approx(999.0) and len(edges) == 11
    assert sum(counts) == 1000 and counts == [100] * 10
    big = torch.randn(10 * HISTOGRAM_SAMPLE)
    big[123] = 50.0  # an outlier still widens the range, though it may not be sampled
    [(edges, counts)] = histograms([big], bins=20)
    assert edges[-1] == pytest.approx(50.0)
    assert sum(counts) == len(big[:: len(big) // HISTOGRAM_SAMPLE])


def test_histograms_of_a_constant_and_of_a_blown_up_tensor() -> None:
    [(edges, counts)] = histograms([torch.full((10,), 3.0)], bins=4)
    assert edges[0] < 3.0 < edges[-1] and sum(counts) == 10
    x = torch.tensor([1.0, 2.0, math.inf, math.nan, 3.0])
    [(edges, counts)] = histograms([x], bins=2)
    assert edges[0] == 1.0 and edges[-1] == 3.0 and sum(counts) == 3  # the finite values


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).flatten(1))


def test_probe_rows_of_a_logged_step() -> None:
    torch.manual_seed(0)
    model = Tiny()
    probe = LayerProbe(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(6, 1, 4, 4), torch.randint(0, 5, (6,))
    nn.functional.cross_entropy(model(x), y).backward()
    probe.before_update()
    weights_before = model.conv.weight.detach().clone()
    optimizer.step()
    probe.after_update()
    loader = [(x, y)]
    evaluate(model, loader, torch.device("cpu"), probe=probe)

    rows = probe.rows(step=7)
    stats = {r["layer_name"]: r for r in rows["layer_statistics"]}
    assert set(stats) == {"conv", "fc"}
    conv, fc = stats["conv"], stats["fc"]
    # The conv layer's activation is taken after the ReLU that follows it; the logits have none.
    assert conv["has_nonlinearity"] is True and fc["has_nonlinearity"] is False
    after_relu = torch.relu(model.conv(x))
    assert conv["act_mean"] == pytest.approx(after_relu.mean().item(), rel=1e-5)
    assert conv["zero_fraction"] == pytest.approx((after_relu == 0).float().mean().item())
    assert conv["grad_norm"] > 0 and conv["weight_norm"] == pytest.approx(
        model.conv.weight.norm().item())
    update = model.conv.weight.detach() - weights_before
    assert conv["update_ratio"] == pytest.approx(
        (update.abs().mean() / weights_before.abs().mean()).item(), rel=1e-5)
    kinds = sorted((r["layer_name"], r["kind"]) for r in rows["layer_histograms"])
    assert kinds == [("conv", "update"), ("conv", "weight"), ("fc", "update"), ("fc", "weight")]
    assert {r["step"] for r in rows["activations"]} == {7}
    assert [r["layer_name"] for r in rows["activations"]] == ["conv", "fc"]
    assert sum(rows["activations"][0]["counts"]) == after_relu.numel()

    # The probe starts afresh: a log without a training step since has no gradients.
    evaluate(model, loader, torch.device("cpu"), probe=probe)
    again = {r["layer_name"]: r for r in probe.rows(step=8)["layer_statistics"]}
    assert again["conv"]["grad_norm"] is None and again["conv"]["update_ratio"] is None


def test_cpu_bin_counts_agree_with_histc() -> None:
    """The CPU's bincount path bins as histc does (a value on a bin edge may land one
    bin over, from rounding): every value counted, the last edge in the last bin."""
    generator = torch.Generator().manual_seed(0)
    for x in (torch.randn(50_000, generator=generator), torch.rand(9999, generator=generator),
              torch.tensor([0.0, 1.0, 1.0, 2.0]).repeat(1000)):  # values on bin edges
        lo, hi = x.min().item(), x.max().item()
        ours, theirs = bin_counts(x, 40, lo, hi, True), torch.histc(x, 40, lo, hi)
        assert ours.sum() == theirs.sum() == x.numel()
        assert (ours - theirs).abs().sum() <= 0.001 * x.numel() + 2
        assert ours[-1] >= 1 and ours[0] >= 1  # the max and the min are counted
