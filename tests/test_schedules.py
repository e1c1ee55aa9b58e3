"""train.py's --lr-schedule shapes (livetrain.playground.schedules)."""

from __future__ import annotations

import pytest
import torch

from livetrain.playground.schedules import LR_SCHEDULES, lr_scheduler, schedule_factor

TOTAL = 1000


def test_each_schedule_has_its_shape() -> None:
    f = {kind: [schedule_factor(kind, step, TOTAL) for step in range(TOTAL + 1)]
         for kind in LR_SCHEDULES}
    assert set(f["none"]) == {1.0}
    assert (f["step"][0], f["step"][333], f["step"][666]) == (1.0, 0.1, pytest.approx(0.01))
    assert f["cosine"][0] == 1.0 and f["cosine"][500] == pytest.approx(0.5)
    assert f["cosine"][TOTAL] == pytest.approx(0.0, abs=1e-12)
    assert f["linear"][0] == 1.0 and f["linear"][500] == 0.5 and f["linear"][TOTAL] == 0.0
    assert f["warmup"][0] == pytest.approx(0.01) and f["warmup"][99] == 1.0
    assert set(f["warmup"][100:]) == {1.0}
    onecycle = f["onecycle"]
    assert onecycle[0] == pytest.approx(1 / 25) and max(onecycle) == onecycle[300] == 1.0
    assert onecycle[TOTAL] == pytest.approx(1 / 25 / 1e4)
    for kind in ("cosine", "linear"):
        assert all(b <= a for a, b in zip(f[kind], f[kind][1:], strict=False))


@pytest.mark.parametrize("kind", [k for k in LR_SCHEDULES if k != "none"])
def test_the_scheduler_follows_the_factor(kind: str) -> None:
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = lr_scheduler(kind, optimizer, 50)
    for step in range(1, 50):
        optimizer.step()
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * schedule_factor(
            kind, step, 50))
