"""Issue 21, "Any model a user brings": lazy layers, no parameters, frozen ones, tied
weights, sparse gradients and no dropout, through `train.py --model FILE.py:Class` (a
real subprocess) and through `LiveRun` (a real loop, steered through the database).

What cannot apply to such a model is refused with a clear event or one error line, and
the rest of the run (and of the same change) goes on: never a traceback.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from livetrain import LiveRun
from livetrain.db.contract import Hyperparameters
from livetrain.db.store import Batch, Store
from livetrain.db.writer import BackgroundWriter, SpillFiles

ROOT = Path(__file__).resolve().parents[1]
LAZY_MLP = ROOT / "bench" / "insight_cases" / "lazy_model.py"

MODELS = '''
import torch
from torch import nn


class Free(nn.Module):
    """No parameters at all: the mean of each eighth of the pixels is a class score."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.AdaptiveAvgPool1d(10))

    def forward(self, x):
        return self.body(x)


class Frozen(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))
        for p in self.parameters():
            p.requires_grad = False

    def forward(self, x):
        return self.net(x)


class Tied(nn.Module):
    """Two hidden layers sharing one weight matrix."""

    def __init__(self, num_classes):
        super().__init__()
        self.flat = nn.Flatten()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)
        self.b.weight = self.a.weight
        self.out = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(self.flat(x))))))


class Sparse(nn.Module):
    """Each pixel's position and grey level (of 17) looks up an embedding."""

    def __init__(self, num_classes):
        super().__init__()
        self.emb = nn.Embedding(64 * 17, 16, sparse=True)
        self.out = nn.Linear(16, num_classes)
        self.register_buffer("offsets", torch.arange(64) * 17)

    def forward(self, x):
        flat = x.flatten(1)
        levels = (flat - flat.min()).div(flat.max() - flat.min() + 1e-9).mul(16).round()
        return self.out(self.emb(levels.long() + self.offsets).mean(1))


class WrongInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 10)

    def forward(self, x):
        return self.fc(x)


class WrongOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        return self.fc(x.flatten(1))
'''


# -- train.py --model FILE.py:Class, a real subprocess ------------------------------------


def train_py(tmp_path: Path, model: str, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--db", f"sqlite:///{tmp_path / 'u.db'}",
         "--dataset", "digits", "--no-progress", "--checkpoint-dir", str(tmp_path / "ck"),
         "--log-every", "10", "--model", model, *options],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )


def user_model(tmp_path: Path, name: str) -> str:
    (tmp_path / "models.py").write_text(MODELS)
    return f"{tmp_path / 'models.py'}:{name}"


def rows(tmp_path: Path, sql: str, *args: Any) -> list[tuple]:
    con = sqlite3.connect(tmp_path / "u.db")
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def test_a_lazy_model_trains_and_resumes_through_train_py(tmp_path: Path) -> None:
    spec = f"{LAZY_MLP}:LazyMLP"
    done = train_py(tmp_path, spec, "--max-steps", "20", "--init", "kaiming")  # --init needs shapes
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    (status, count), = rows(tmp_path, "SELECT status, json_extract(config, '$.parameters_count') "
                                      "FROM runs")
    assert status == "finished" and count == 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    layers = rows(tmp_path, "SELECT layer_name, count(weight_norm) FROM layer_statistics "
                            "GROUP BY layer_name")
    assert {name for name, norms in layers if norms} == {"body.1", "body.4", "body.6"}
    assert ("initial",) in rows(tmp_path, "SELECT reason FROM checkpoints WHERE step = 0")
    resumed = train_py(tmp_path, spec, "--resume", "1", "--max-steps", "30")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert rows(tmp_path, "SELECT max(step) FROM statistics") == [(30,)]


@pytest.mark.parametrize("name", ["Free", "Frozen"])
def test_a_model_with_nothing_to_train_runs_through_train_py(tmp_path: Path, name: str) -> None:
    done = train_py(tmp_path, user_model(tmp_path, name), "--max-steps", "20")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert rows(tmp_path, "SELECT status FROM runs") == [("finished",)]
    codes = {code for (code,) in rows(tmp_path, "SELECT code FROM events")}
    assert "nothing_to_train" in codes and "run_failed" not in codes
    losses = rows(tmp_path, "SELECT train_loss FROM statistics WHERE step > 0")
    assert losses and all(loss is not None and loss > 0 for (loss,) in losses)


def test_tied_weights_train_through_train_py(tmp_path: Path) -> None:
    done = train_py(tmp_path, user_model(tmp_path, "Tied"), "--max-steps", "20")
    assert done.returncode == 0, done.stderr[-2000:]
    (count,), = rows(tmp_path, "SELECT json_extract(config, '$.parameters_count') FROM runs")
    assert count == 64 * 64 + 64 + 64 + 64 * 10 + 10  # the shared matrix counts once
    norms = dict(rows(tmp_path, "SELECT layer_name || ':' || step, weight_norm "
                                "FROM layer_statistics"))
    steps = {key.split(":")[1] for key in norms}
    assert len(steps) >= 2 and all(norms[f"a:{s}"] == norms[f"b:{s}"] for s in steps)
    losses = [loss for (loss,) in rows(tmp_path, "SELECT train_loss FROM statistics "
                                                 "WHERE step > 0 ORDER BY step")]
    assert losses[-1] < 2.5


def test_sparse_gradients_train_through_train_py_with_sgd(tmp_path: Path) -> None:
    done = train_py(tmp_path, user_model(tmp_path, "Sparse"), "--max-steps", "20",
                    "--optimizer", "SGD", "--lr", "0.1", "--grad-clip", "5")
    assert done.returncode == 0, done.stderr[-2000:]
    assert rows(tmp_path, "SELECT status FROM runs") == [("finished",)]
    losses = rows(tmp_path, "SELECT train_loss FROM statistics WHERE step > 0")
    assert len(losses) == 2 and all(0 < loss < 10 for (loss,) in losses)


def test_sparse_gradients_with_adam_are_one_error_line(tmp_path: Path) -> None:
    done = train_py(tmp_path, user_model(tmp_path, "Sparse"), "--max-steps", "5")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "Adam cannot update the sparse gradients of emb" in done.stderr
    assert "SGD" in done.stderr


@pytest.mark.parametrize(("name", "words"), [
    ("WrongInput", "fails on a batch of shape (64, 1, 8, 8): RuntimeError"),
    ("WrongOutput", "returned a tensor of shape (64, 5)"),
])
def test_a_model_that_does_not_fit_the_data_is_one_error_line(
    tmp_path: Path, name: str, words: str
) -> None:
    done = train_py(tmp_path, user_model(tmp_path, name), "--max-steps", "5")
    assert done.returncode == 1, done.stderr[-2000:]
    assert words in done.stderr and "Traceback" not in done.stderr


# -- LiveRun around a loop of the user's own ------------------------------------------------


def batch(inputs: str = "dense") -> tuple[torch.Tensor, torch.Tensor]:
    if inputs == "tokens":
        return torch.randint(0, 20, (16, 4)), torch.randint(0, 3, (16,))
    return torch.randn(16, 2, 3), torch.randint(0, 3, (16,))


def train(run: LiveRun, model: nn.Module, steps: int, inputs: str = "dense") -> None:
    """The user's loop; a loss that needs no gradient (nothing can learn) has no backward."""
    for _ in range(steps):
        x, y = batch(inputs)
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        run.optimizer.zero_grad()
        if loss.requires_grad:
            loss.backward()
        run.optimizer.step()
        run.step(loss=loss, outputs=out, targets=y)


def steer(run: LiveRun, model: nn.Module, store: Store, inputs: str = "dense",
          **values: Any) -> int:
    """Write a change as the board does; the run takes it at its next step boundary."""
    version = store.submit_parameters(run.run_id, **values)
    wait_for("the listener", run.listener.changed.is_set)
    train(run, model, 1, inputs)
    return version


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def live_run(model: nn.Module, optimizer: torch.optim.Optimizer, url: str, tmp_path: Path,
             **options: Any) -> LiveRun:
    return LiveRun(model, optimizer, db=url, log_every=5, checkpoint_dir=tmp_path / "ck",
                   handle_signals=False, **options)


def events(store: Store, run_id: int, code: str) -> list[dict[str, Any]]:
    return [e for e in store.events(run_id) if e["code"] == code]


def lazy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(16), nn.ReLU(), nn.Dropout(0.2),
                         nn.LazyLinear(3))


def test_a_lazy_model_trains_through_live_run(tmp_path: Path, sqlite_url: str) -> None:
    model = lazy_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)  # before the shapes exist
    store = Store(sqlite_url)
    with live_run(model, optimizer, sqlite_url, tmp_path, config={"mine": 1},
                  checkpoint_every=5) as run:
        train(run, model, 10)
        steer(run, model, store, rollback_step=0)
        assert run.global_step == 0  # the initial checkpoint holds the shaped model
        train(run, model, 5)
    config = store.get_run(run.run_id)["config"]
    assert config["parameters_count"] == 6 * 16 + 16 + 16 * 3 + 3
    assert config["mine"] == 1 and config["device"] == "cpu"  # merged, not replaced
    (shaped,) = events(store, run.run_id, "model_shaped")
    assert shaped["step"] == 0 and "163 parameters" in shaped["message"]
    assert events(store, run.run_id, "rolled_back")
    with store.engine.connect() as conn:
        layers = conn.exec_driver_sql(
            "SELECT DISTINCT layer_name FROM layer_statistics WHERE weight_norm > 0").fetchall()
    assert {name for (name,) in layers} == {"1", "4"}
    store.close()


def test_a_lazy_model_resumes_through_live_run(tmp_path: Path, sqlite_url: str) -> None:
    model = lazy_model()
    with live_run(model, torch.optim.Adam(model.parameters()), sqlite_url, tmp_path) as run:
        train(run, model, 7)
        run.request_stop()
        train(run, model, 1)
    again = lazy_model()  # a new process: its lazy layers take the checkpoint's shapes
    with live_run(again, torch.optim.Adam(again.parameters()), sqlite_url, tmp_path,
                  resume=run.run_id) as resumed:
        assert resumed.global_step == 8
        assert torch.equal(again[1].weight, model[1].weight)
        train(resumed, again, 4)
    assert resumed.status == "finished" and resumed.global_step == 12


def test_a_change_on_a_model_without_dropout_applies_all_but_the_dropout(
    tmp_path: Path, sqlite_url: str
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    store = Store(sqlite_url)
    with live_run(model, torch.optim.Adam(model.parameters(), lr=1e-3), sqlite_url,
                  tmp_path) as run:
        train(run, model, 3)
        both = steer(run, model, store, learning_rate=2e-3, dropout=30)
        assert run.parameters == Hyperparameters("Adam", 2e-3, 0.0, 0)
        assert run.optimizer.param_groups[0]["lr"] == 2e-3
        alone = steer(run, model, store, dropout=40)
        train(run, model, 3)
    changes = {c["version"]: c for c in store.parameter_changes(run.run_id)}
    assert (changes[both]["learning_rate"], changes[both]["dropout"]) == (2e-3, 0)
    assert alone not in changes  # nothing of it could apply: refused, not acknowledged
    rejected = {e["version"]: e["message"] for e in events(store, run.run_id,
                                                           "parameters_rejected")}
    assert "dropout=30: the model has no dropout layer" in rejected[both]
    assert "learning_rate" not in rejected[both].split("; training")[0]
    assert "dropout=40" in rejected[alone]
    (applied,) = events(store, run.run_id, "parameters_applied")
    assert "learning_rate 0.001 -> 0.002" in applied["message"]
    assert "dropout" not in applied["message"]
    store.close()


class Bag(nn.Module):
    """An embedding bag with sparse gradients and a dense head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8, sparse=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(x).mean(1))


def test_sparse_gradients_refuse_adam_and_weight_decay_alone(
    tmp_path: Path, sqlite_url: str
) -> None:
    model, store = Bag(), Store(sqlite_url)
    with live_run(model, torch.optim.SGD(model.parameters(), lr=0.1), sqlite_url,
                  tmp_path) as run:
        train(run, model, 3, "tokens")
        refused = steer(run, model, store, "tokens", optimizer="Adam", weight_decay=0.01,
                        learning_rate=0.05)
        assert run.parameters == Hyperparameters("SGD", 0.05, 0.0, 0)
        train(run, model, 3, "tokens")  # Adam's step would raise on sparse gradients
        decay = steer(run, model, store, "tokens", optimizer="SGD+Nesterov", weight_decay=0.01)
        assert run.parameters == Hyperparameters("SGD+Nesterov", 0.05, 0.0, 0)
        assert run.optimizer.param_groups[0]["nesterov"]
        steer(run, model, store, "tokens", grad_clip=0.5)
        train(run, model, 5, "tokens")
    assert run.status == "finished"
    rejected = {e["version"]: e["message"] for e in events(store, run.run_id,
                                                           "parameters_rejected")}
    assert "optimizer=Adam: it cannot update the sparse gradients of emb" in rejected[refused]
    assert "weight_decay=0.01: torch cannot apply weight decay" in rejected[refused]
    assert "optimizer" not in rejected[decay].split("; training")[0]
    changes = {c["version"]: c for c in store.parameter_changes(run.run_id)}
    assert changes[decay]["optimizer"] == "SGD+Nesterov" and changes[decay]["weight_decay"] == 0
    store.close()


def test_live_run_refuses_an_optimizer_that_cannot_update_sparse_gradients(
    tmp_path: Path, sqlite_url: str
) -> None:
    model = Bag()
    with pytest.raises(ValueError, match="Adam cannot update the sparse gradients of emb"):
        live_run(model, torch.optim.Adam(model.parameters()), sqlite_url, tmp_path)
    with pytest.raises(ValueError, match="weight decay"):
        live_run(model, torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1),
                 sqlite_url, tmp_path)


def test_a_parameter_free_model_runs_through_live_run(tmp_path: Path, sqlite_url: str) -> None:
    model = nn.Sequential(nn.Flatten(), nn.AdaptiveAvgPool1d(3))
    optimizer = torch.optim.SGD([{"params": []}], lr=0.1)  # torch refuses an empty list
    store = Store(sqlite_url)
    with live_run(model, optimizer, sqlite_url, tmp_path) as run:
        train(run, model, 4)
        steer(run, model, store, learning_rate=0.2, optimizer="Adam")
        train(run, model, 5)
    assert run.status == "finished" and isinstance(run.optimizer, torch.optim.Adam)
    (warning,) = events(store, run.run_id, "nothing_to_train")
    assert warning["level"] == "warning" and "no update changes the model" in warning["message"]
    assert store.get_run(run.run_id)["config"]["parameters_count"] == 0
    logged = [r["train_loss"] for r in store.statistics(run.run_id)]
    assert len(logged) == 2 and all(loss > 0 for loss in logged)
    store.close()


def test_frozen_layers_are_watched_without_gradients(tmp_path: Path, sqlite_url: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    for p in model[1].parameters():
        p.requires_grad = False
    trainable = [p for p in model.parameters() if p.requires_grad]
    store = Store(sqlite_url)
    with live_run(model, torch.optim.Adam(trainable, lr=1e-2), sqlite_url, tmp_path) as run:
        train(run, model, 10)
    with store.engine.connect() as conn:
        stats = conn.exec_driver_sql("SELECT layer_name, grad_norm, update_ratio, weight_norm "
                                     "FROM layer_statistics WHERE step = 10").fetchall()
    by_layer = {name: values for name, *values in stats}
    assert by_layer["1"][:2] == [None, None] and by_layer["1"][2] > 0
    assert all(v is not None and v > 0 for v in by_layer["3"])
    assert not events(store, run.run_id, "nothing_to_train")
    store.close()


class TiedPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.flat, self.a, self.b = nn.Flatten(), nn.Linear(6, 6), nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.b(torch.relu(self.a(self.flat(x))))))


def test_tied_weights_stay_tied_through_a_rollback(tmp_path: Path, sqlite_url: str) -> None:
    model, store = TiedPair(), Store(sqlite_url)
    with live_run(model, torch.optim.Adam(model.parameters(), lr=1e-2), sqlite_url, tmp_path,
                  checkpoint_every=5) as run:
        train(run, model, 5)
        at_five = model.a.weight.detach().clone()
        train(run, model, 5)
        assert not torch.equal(model.a.weight, at_five)
        steer(run, model, store, rollback_step=5)
        assert run.global_step == 5 and torch.equal(model.a.weight, at_five)
        assert model.b.weight is model.a.weight
        train(run, model, 3)
    assert store.get_run(run.run_id)["config"]["parameters_count"] == 6 * 6 + 6 + 6 + 6 * 3 + 3
    store.close()


class LockedOptimizer(LiveRun):
    """A run whose framework holds its optimizer (as transformers' Trainer does)."""

    def switch_refusal(self) -> str | None:
        return "the framework holds its optimizer"


def test_a_switch_the_framework_refuses_leaves_the_other_values(
    tmp_path: Path, sqlite_url: str
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3), nn.Dropout(0.1))
    store = Store(sqlite_url)
    with LockedOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-3), db=sqlite_url,
                         log_every=5, checkpoint_dir=tmp_path / "ck",
                         handle_signals=False) as run:
        train(run, model, 2)
        version = steer(run, model, store, optimizer="SGD", learning_rate=5e-3, dropout=20)
        train(run, model, 2)
    assert run.parameters == Hyperparameters("Adam", 5e-3, 0.0, 20)
    assert isinstance(run.optimizer, torch.optim.Adam) and model[2].p == 0.2
    (rejected,) = events(store, run.run_id, "parameters_rejected")
    assert rejected["version"] == version
    assert "optimizer=SGD: the framework holds its optimizer" in rejected["message"]
    store.close()


def test_config_keys_learnt_later_are_merged_also_through_a_spill(
    tmp_path: Path, db_url: str
) -> None:
    store = Store(db_url)
    run_id = store.create_run("r", "m", "d", {"lr": 0.1, "device": "cpu"},
                              Hyperparameters("Adam", 1e-3, 0.0, 0))
    writer = BackgroundWriter(store, run_id)
    writer.config({"parameters_count": 7})
    writer.config({"note": "later"})
    assert writer.close()
    assert store.get_run(run_id)["config"] == {"lr": 0.1, "device": "cpu",
                                               "parameters_count": 7, "note": "later"}
    spill = SpillFiles(tmp_path / "unwritten")
    assert spill.push(Batch(config={"parameters_count": 8}))
    (path,) = spill.files()
    assert spill.load(path).config == {"parameters_count": 8}
    store.close()
