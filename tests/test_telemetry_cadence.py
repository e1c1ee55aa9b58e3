"""Per-layer telemetry's own cadence (livetrain.trainer.cadence): which logs measure the
layers, that every log still writes its statistics row, and that the layer rules hold
what they found across the logs that did not measure them. On a real LiveRun writing
to SQLite."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch
from torch import nn

from livetrain import LiveRun
from livetrain.trainer.cadence import WARMUP_LOGS, TelemetryCadence
from livetrain.trainer.diagnostics import Finding
from livetrain.trainer.episodes import RESOLVE_AFTER_LOGS, EpisodeBook


def train(tmp_path: Path, log_every: int, max_steps: int, **options: object) -> LiveRun:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(16, 20), torch.randint(0, 4, (16,))
    with LiveRun(model, optimizer, db=f"sqlite:///{tmp_path / 'run.db'}", log_every=log_every,
                 max_steps=max_steps, checkpoint_dir=tmp_path / "ck", handle_signals=False,
                 **options) as run:
        while not run.should_stop:
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            run.optimizer.zero_grad()
            loss.backward()
            run.optimizer.step()
            run.step(loss, outputs=out, targets=y)
    return run


def steps(tmp_path: Path, table: str) -> list[int]:
    with sqlite3.connect(tmp_path / "run.db") as conn:
        return [r[0] for r in conn.execute(f"SELECT DISTINCT step FROM {table} ORDER BY step")]


def test_by_default_every_log_measures_the_layers(tmp_path: Path) -> None:
    run = train(tmp_path, log_every=2, max_steps=40)
    assert steps(tmp_path, "layer_statistics") == steps(tmp_path, "statistics") \
        == list(range(2, 41, 2))
    assert run.cadence.skipped == 0


def test_every_third_log_measures_the_layers_and_every_log_writes_its_row(
    tmp_path: Path,
) -> None:
    train(tmp_path, log_every=2, max_steps=20, telemetry_every=3)
    assert steps(tmp_path, "statistics") == list(range(2, 21, 2))
    # logs 0, 3, 6 and 9 (steps 2, 8, 14, 20), and the last one is full anyway
    assert steps(tmp_path, "layer_statistics") == [2, 8, 14, 20]
    assert steps(tmp_path, "activations") == [2, 8, 14, 20]
    with sqlite3.connect(tmp_path / "run.db") as conn:
        ratios = conn.execute("SELECT update_ratio, grad_norm FROM layer_statistics").fetchall()
    assert ratios and all(r is not None and r > 0 for row in ratios for r in row)


def test_auto_measures_every_one_of_a_short_runs_logs(tmp_path: Path) -> None:
    run = train(tmp_path, log_every=3, max_steps=3 * WARMUP_LOGS, telemetry_every="auto")
    assert steps(tmp_path, "layer_statistics") == steps(tmp_path, "statistics") \
        == list(range(3, 3 * WARMUP_LOGS + 1, 3))
    assert run.cadence.skipped == 0


def test_auto_skips_the_layers_when_their_cost_is_not_earned_yet() -> None:
    cadence = TelemetryCadence("auto")
    for _ in range(WARMUP_LOGS):
        assert cadence.due(full=False)
        cadence.logged(True, cost=3600.0)  # an hour a measurement: never earned back
    assert not cadence.due(full=False)
    assert cadence.due(full=True)  # an epoch's end, or the last log
    cadence.logged(False, cost=0.0)
    cadence.logged(True, cost=0.0)  # free: every log again
    assert cadence.due(full=False)
    assert cadence.skipped == 1


@pytest.mark.parametrize("every", [0, -1, "sometimes", 1.5, True])
def test_a_bad_telemetry_every_is_refused_with_what_it_takes(tmp_path: Path,
                                                             every: object) -> None:
    with pytest.raises(ValueError, match="telemetry_every must be 'auto' or a number"):
        train(tmp_path, log_every=2, max_steps=4, telemetry_every=every)


def test_an_episode_the_log_could_not_judge_is_held_not_resolved() -> None:
    book = EpisodeBook()
    dead = Finding("dead_relu", "warning", "layer 0: dead", "lower the lr", None, "0")
    (opened,) = book.update(10, [dead])
    assert opened.kind == "opened"
    for step in range(20, 20 + 10 * (RESOLVE_AFTER_LOGS + 2), 10):
        assert book.update(step, [], held={("dead_relu", "0")}) == []
    assert [e.code for e in book.open] == ["dead_relu"]
    changes = [c for s in range(500, 500 + RESOLVE_AFTER_LOGS) for c in book.update(s, [])]
    assert [c.kind for c in changes] == ["resolved"]
