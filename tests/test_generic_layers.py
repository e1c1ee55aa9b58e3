"""Telemetry is generic: recurrent and attention layers are watched like conv and linear ones."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch
from torch import nn

from livetrain import LiveRun
from livetrain.trainer.layers import monitored_layers


class Tagger(nn.Module):
    """An embedding, an LSTM, self-attention and a linear head: no conv, no `features`."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.rnn = nn.LSTM(16, 16, batch_first=True)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x, _ = self.rnn(self.embed(tokens))
        x, _ = self.attn(x, x, x)
        return self.head(self.drop(torch.relu(x)).mean(dim=1))


def test_lstm_attention_and_linear_layers_are_watched_not_attention_internals() -> None:
    layers = monitored_layers(Tagger())
    assert [(layer.name, layer.layer_type) for layer in layers] == [
        ("rnn", "fc"), ("attn", "fc"), ("head", "fc")]  # attn.out_proj runs inside attn
    assert [layer.weight.shape[1] for layer in layers] == [16, 16, 16]


def test_named_layers_only_and_a_wrong_name_is_refused() -> None:
    assert [layer.name for layer in monitored_layers(Tagger(), ["head"])] == ["head"]
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        monitored_layers(Tagger(), ["nope"])


def test_a_sequence_model_logs_every_layer_through_liverun(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tokens = torch.randint(0, 20, (256, 12))
    labels = tokens[:, 0] % 3
    model = Tagger()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    db = tmp_path / "seq.db"
    with LiveRun(model, optimizer, db=f"sqlite:///{db}", log_every=8, max_steps=24,
                 checkpoint_dir=tmp_path / "ck", handle_signals=False) as run:
        while not run.should_stop:
            for i in range(0, 256, 32):
                out = model(tokens[i:i + 32])
                loss = nn.functional.cross_entropy(out, labels[i:i + 32])
                run.optimizer.zero_grad()
                loss.backward()
                run.optimizer.step()
                run.step(loss=loss, outputs=out, targets=labels[i:i + 32])
                if run.should_stop:
                    break
    con = sqlite3.connect(db)
    stats = con.execute("SELECT layer_name, act_std, grad_norm, update_ratio FROM "
                        "layer_statistics WHERE step = 24 ORDER BY layer_name").fetchall()
    assert [row[0] for row in stats] == ["attn", "head", "rnn"]
    assert all(v is not None and v > 0 for row in stats for v in row[1:]), stats
    steps = [r[0] for r in con.execute("SELECT step FROM statistics ORDER BY step")]
    assert steps == [8, 16, 24]  # no validate: no step-0 log
    accuracy = con.execute("SELECT train_accuracy FROM statistics WHERE step = 24").fetchone()
    assert accuracy[0] is not None and 0 <= accuracy[0] <= 100
    assert con.execute("SELECT optimizer, dropout FROM parameters").fetchone() == ("AdamW", 10)
    assert run.status == "finished"


def test_regression_outputs_record_the_loss_only(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    x = torch.randn(64, 4)
    y = x.sum(dim=1, keepdim=True)
    db = tmp_path / "reg.db"
    with LiveRun(model, optimizer, db=f"sqlite:///{db}", log_every=5, max_steps=10,
                 checkpoint_dir=tmp_path / "ck", handle_signals=False) as run:
        while not run.should_stop:
            out = model(x)
            loss = nn.functional.mse_loss(out, y)
            run.optimizer.zero_grad()
            loss.backward()
            run.optimizer.step()
            run.step(loss=loss, outputs=out, targets=y)
    rows = sqlite3.connect(db).execute(
        "SELECT step, train_loss, train_accuracy FROM statistics ORDER BY step").fetchall()
    assert [r[0] for r in rows] == [5, 10]
    assert all(r[1] is not None and r[2] is None for r in rows)
    optimizer_name = sqlite3.connect(db).execute("SELECT optimizer FROM parameters").fetchone()
    assert optimizer_name == ("SGD+Nesterov",)


def test_an_optimizer_the_board_cannot_name_is_refused_before_any_run(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="Adagrad is not one of them"):
        LiveRun(model, torch.optim.Adagrad(model.parameters()), db=f"sqlite:///{tmp_path}/a.db",
                handle_signals=False)
    assert not (tmp_path / "a.db").exists()  # refused before the database is opened
