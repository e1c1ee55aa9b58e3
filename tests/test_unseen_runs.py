"""Healthy runs of the kinds the health rules were not tuned on raise no warning (issue 21):
decaying schedules trained to their end (train.py's cosine, Lightning's OneCycleLR, the
Hugging Face Trainer's default linear decay) and a run that converges.

Each is a real run: train.py and the Lightning and transformers programs as subprocesses,
LiveRun in this process. Each test also checks that the run reached the state an
lr-blind rule fired on (an lr annealed to nearly 0, update ratios below 1e-4, a training
loss near 0), so a pass means the rules read it, not that nothing happened.
"""

from __future__ import annotations

import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812  (PyTorch's own convention)
from torch import nn

from livetrain import LiveRun

ROOT = Path(__file__).resolve().parent.parent


def read(db: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def episodes(db: Path) -> list[tuple[str, str]]:
    """(code, level) of every alert episode of the database's one run."""
    return read(db, "SELECT code, level FROM alerts ORDER BY first_step")


def warnings(db: Path) -> list[tuple[str, str]]:
    return [(code, level) for code, level in episodes(db) if level != "info"]


def run_program(args: list[str], cwd: Path, timeout: float = 240) -> None:
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def final_schedule_factor(db: Path) -> float:
    """The lr in force at the last logged update over the lr the run was set to."""
    lr, base = read(db, "SELECT learning_rate, base_learning_rate FROM statistics "
                        "WHERE step > 0 ORDER BY step DESC LIMIT 1")[0]
    return lr / base


def test_train_py_cosine_schedule_to_its_end_raises_no_warning(tmp_path: Path) -> None:
    """The run that told its user to raise the lr: smallcnn, Adam at 1e-3, cosine to 0."""
    db = tmp_path / "cosine.db"
    run_program([str(ROOT / "train.py"), "--db", f"sqlite:///{db}", "--no-progress",
                 "--checkpoint-dir", str(tmp_path / "ck"), "--dataset", "digits",
                 "--lr-schedule", "cosine", "--lr", "0.001", "--log-every", "10",
                 "--max-steps", "300", "--epochs", "1000", "--val-batches", "2"], tmp_path)
    assert final_schedule_factor(db) < 0.01
    (low,) = read(db, "SELECT count(*) FROM layer_statistics WHERE step > 250 "
                      "AND update_ratio > 0 AND update_ratio < 1e-4")[0]
    assert low > 0  # the annealed updates an lr-blind rule called too small
    assert warnings(db) == []


def test_lightning_onecycle_to_its_end_raises_no_warning(tmp_path: Path) -> None:
    db = tmp_path / "onecycle.db"
    run_program([str(ROOT / "bench" / "insight_cases" / "lightning_onecycle.py"),
                 "--db", f"sqlite:///{db}", "--max-steps", "300", "--log-every", "5"], tmp_path)
    (steps,) = read(db, "SELECT max(step) FROM statistics")[0]
    assert steps == 300
    # OneCycleLR's base lr is max_lr / 25: it ends 1e4 below that
    assert final_schedule_factor(db) < 1e-3
    assert warnings(db) == []


def test_hugging_face_default_schedule_to_its_end_raises_no_warning(tmp_path: Path) -> None:
    db = tmp_path / "hf.db"
    run_program([str(ROOT / "examples" / "hf_text_classification.py"), "--db", f"sqlite:///{db}",
                 "--max-steps", "200", "--log-every", "10",
                 "--output-dir", str(tmp_path / "hf")], tmp_path)
    (steps,) = read(db, "SELECT max(step) FROM statistics")[0]
    assert steps == 200
    assert final_schedule_factor(db) < 0.05  # linear decay to 0
    assert warnings(db) == []


def separable(samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four well-separated Gaussian clusters: a model can get every sample right."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (samples,), generator=generator)
    centres = 4.0 * torch.eye(4, 8)
    return centres[labels] + 0.3 * torch.randn(samples, 8, generator=generator), labels


def test_a_run_trained_to_zero_loss_is_told_it_converged(tmp_path: Path) -> None:
    """An MLP fits four separable clusters to a training loss near 0: one converged info
    episode, and no warning (its update ratios and its flat loss say nothing of the lr)."""
    torch.manual_seed(0)
    x, y = separable(512, seed=0)
    x_val, y_val = separable(256, seed=1)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    @torch.no_grad()
    def validate() -> dict[str, float]:
        logits = model(x_val)
        return {"loss": F.cross_entropy(logits, y_val).item(),
                "accuracy": 100.0 * (logits.argmax(1) == y_val).float().mean().item()}

    db = tmp_path / "converged.db"
    with LiveRun(model, optimizer, db=f"sqlite:///{db}", log_every=5, validate=validate,
                 num_classes=4, checkpoint_dir=tmp_path / "ck", handle_signals=False) as run:
        for step in range(400):
            batch = torch.arange(step * 32, step * 32 + 32) % len(x)
            loss = F.cross_entropy(model(x[batch]), y[batch])
            run.optimizer.zero_grad()
            loss.backward()
            run.optimizer.step()
            run.step(loss=loss, outputs=None, targets=None)
    (last_loss,) = read(db, "SELECT train_loss FROM statistics ORDER BY step DESC LIMIT 1")[0]
    assert last_loss < 0.02 * math.log(4)
    assert episodes(db) == [("converged", "info")]
