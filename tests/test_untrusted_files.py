"""Checkpoint and spill files are untrusted: loading one never runs code.

Each attack plants a pickle whose unpickling writes a marker file, by one of the
four routes of issue 11: a replaced checkpoint, a planted `checkpoints` row, a
planted spill file, and a rollback onto a replaced checkpoint of a live run. The
first test proves the payload is live (unpickled, it writes the marker); the
others prove the trainer never unpickles it and says why, with the run left as it
was. The trainer is the real `train.py` in a subprocess, steered by plain SQL.
"""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_e2e import SqlClient, max_step, run_status, trainer, wait_for

from livetrain.db.contract import DEFAULTS, OPTIMIZERS, Hyperparameters
from livetrain.db.store import Batch, Store, event_row, now
from livetrain.db.writer import SPILL_FORMAT, BackgroundWriter, SpillFiles
from livetrain.playground.models import build_model
from livetrain.trainer.checkpointing import (
    Checkpoint,
    CheckpointRefusedError,
    CheckpointRing,
    read_checkpoint,
    restorable,
)
from livetrain.trainer.steering import build_optimizer, trainable

ROOT = Path(__file__).resolve().parent.parent
FAST = ("--model", "tinycnn", "--log-every", "5", "--val-batches", "1", "--no-progress")


class Payload:
    """Unpickled, it creates `marker`: the stand-in for any code an attacker runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def plant_checkpoint(path: Path, marker: Path) -> None:
    """Replace a checkpoint with the same checkpoint plus a payload, as an attacker
    with write access to the directory (or a path of their choice) would."""
    state = torch.load(path, weights_only=True) if path.exists() else {}
    torch.save(state | {"payload": Payload(marker)}, path)


def train(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--db", url, *FAST,
         "--checkpoint-dir", str(tmp_path / "checkpoints"), *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )


def finished_run(tmp_path: Path, url: str) -> tuple[SqlClient, int]:
    """A run that trained 10 steps and finished: what --resume is tried on."""
    first = train(tmp_path, url, "--max-steps", "10")
    assert first.returncode == 0, first.stderr[-2000:]
    sql = SqlClient(url)
    (run_id,) = sql.one("SELECT run_id FROM runs")
    assert run_status(sql, run_id) == "finished"
    return sql, run_id


def events(sql: SqlClient, run_id: int, code: str) -> list[str]:
    return [m for (m,) in sql.rows(
        "SELECT message FROM events WHERE run_id = ? AND code = ? ORDER BY event_id",
        (run_id, code))]


def assert_refused_resume(result: subprocess.CompletedProcess, sql: SqlClient, run_id: int,
                          marker: Path, why: str) -> None:
    """No code ran, one clear line, an event, and the finished run is still finished."""
    assert not marker.exists()
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"cannot resume run {run_id}" in errors[0], result.stderr
    assert why in errors[0], \
        result.stderr
    assert run_status(sql, run_id) == "finished"
    assert sql.one("SELECT dt_ended FROM runs WHERE run_id = ?", (run_id,))[0] is not None
    (message,) = events(sql, run_id, "resume_refused")
    assert why in message
    assert events(sql, run_id, "run_resumed") == []


# -- the payload is live -----------------------------------------------------


def test_the_planted_payload_runs_code_when_unpickled(tmp_path: Path) -> None:
    """Without this, the tests below could pass with a dud: loading the files the
    unsafe way (as before issue 11) does write the marker."""
    marker = tmp_path / "pwned"
    plant_checkpoint(tmp_path / "step.pt", marker)
    torch.load(tmp_path / "step.pt", weights_only=False)  # what checkpointing.py did
    assert marker.exists()
    marker.unlink()
    pickle.loads(pickle.dumps(Payload(marker)))  # noqa: S301 - what db/writer.py did
    assert marker.exists()


# -- checkpoints: the format, and what is refused ----------------------------


def small_model() -> torch.nn.Module:
    return build_model("tinycnn", 10, 1, 28, dropout=0.5)


def trained(optimizer_name: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = small_model()
    optimizer = build_optimizer(optimizer_name, trainable(model), 1e-3, 1e-4)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 1, 28, 28)).sum().backward()
        optimizer.step()
    return model, optimizer


def save(ring: CheckpointRing, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         name: str, run_id: int = 7) -> Checkpoint:
    parameters = Hyperparameters(name, 1e-3, 1e-4, 30, 2.0)
    return ring.save(2, 1, model, optimizer, {"run_id": run_id, "parameters": vars(parameters)},
                     "periodic", wait=True)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_round_trips_under_weights_only(tmp_path: Path, name: str) -> None:
    model, optimizer = trained(name)
    ring = CheckpointRing(tmp_path / "run_7")
    found = save(ring, model, optimizer, name)
    state = torch.load(found.path, weights_only=True)  # plain tensors and values only
    assert state["optimizer_class"] == type(optimizer).__name__

    fresh = small_model()
    loaded = restorable(read_checkpoint(ring.directory, found, 7), fresh, found)
    assert loaded.parameters == Hyperparameters(name, 1e-3, 1e-4, 30, 2.0)
    fresh.load_state_dict(loaded.model_state)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    before, after = optimizer.state_dict(), loaded.optimizer.state_dict()
    assert before["param_groups"] == after["param_groups"]
    assert before["state"].keys() == after["state"].keys()
    for index, buffers in before["state"].items():
        for key, value in buffers.items():
            assert torch.equal(value, after["state"][index][key]), (index, key)
    # The restored optimizer takes a step (its state fits the model).
    fresh(torch.randn(4, 1, 28, 28)).sum().backward()
    loaded.optimizer.step()


def refusal(ring: CheckpointRing, found: Checkpoint, run_id: int = 7) -> str:
    with pytest.raises(CheckpointRefusedError) as refused:
        restorable(read_checkpoint(ring.directory, found, run_id), small_model(), found)
    return str(refused.value)


def test_checkpoints_outside_the_run_or_not_its_own_are_refused(tmp_path: Path) -> None:
    model, optimizer = trained("Adam")
    ring = CheckpointRing(tmp_path / "run_7")
    found = save(ring, model, optimizer, "Adam")
    elsewhere = tmp_path / "elsewhere.pt"
    elsewhere.write_bytes(found.path.read_bytes())  # a valid checkpoint, but not in the run

    def at(path: Path | str) -> Checkpoint:
        return Checkpoint(found.step, found.epoch, Path(path), found.reason)

    assert "not inside the run's checkpoint directory" in refusal(ring, at(elsewhere))
    traversal = ring.directory / ".." / "elsewhere.pt"
    assert "not inside the run's checkpoint directory" in refusal(ring, at(traversal))
    link = ring.directory / "step_000000003.pt"
    link.symlink_to(elsewhere)  # a symlink planted in the run's directory
    assert "not inside the run's checkpoint directory" in refusal(ring, at(link))
    assert "unusable" in refusal(ring, at(str(ring.directory / "a\0b.pt")))
    assert "missing" in refusal(ring, at(ring.directory / "step_000000009.pt"))
    assert "belongs to run 7, not to run 8" in refusal(ring, found, run_id=8)
    assert "holds step 2" in refusal(ring, Checkpoint(5, 1, found.path, "periodic"))

    other = CheckpointRing(tmp_path / "run_9")  # a checkpoint of a different model
    wide = torch.nn.Sequential(torch.nn.Linear(3, 3))
    wrong = save(other, wide, build_optimizer("Adam", wide.parameters(), 1e-3, 0), "Adam", 9)
    assert "weights do not fit this model" in refusal(other, wrong, run_id=9)

    (ring.directory / "step_000000004.pt").write_bytes(b"not a checkpoint at all")
    assert "not a checkpoint of tensors" in refusal(ring, at(ring.directory / "step_000000004.pt"))
    restorable(read_checkpoint(ring.directory, found, 7), small_model(), found)  # the real one


def test_a_bad_optimizer_state_is_refused_before_anything_changes(tmp_path: Path) -> None:
    model, optimizer = trained("Adam")
    ring = CheckpointRing(tmp_path / "run_7")
    found = save(ring, model, optimizer, "Adam")
    state = torch.load(found.path, weights_only=True)
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(2, 2)  # the wrong shape
    torch.save(state, found.path)
    assert "exp_avg has shape (2, 2)" in refusal(ring, found)
    state["optimizer"]["param_groups"] = []
    torch.save(state, found.path)
    assert "optimizer state does not fit" in refusal(ring, found)
    state["parameters"]["learning_rate"] = 50.0
    torch.save(state, found.path)
    assert "parameters are invalid" in refusal(ring, found)


def test_seed_refuses_rows_that_point_outside_the_run(tmp_path: Path) -> None:
    ring = CheckpointRing(tmp_path / "run_7")
    ring.directory.mkdir()
    (ring.directory / "step_000000005.pt").write_bytes(b"x")
    (tmp_path / "evil.pt").write_bytes(b"x")
    row = {"epoch": 1, "reason": "periodic", "bytes": 1, "dt": now()}
    refused = ring.seed([
        row | {"step": 5, "path": str(ring.directory / "step_000000005.pt")},
        row | {"step": 8, "path": str(tmp_path / "evil.pt")},
        row | {"step": "9", "path": str(ring.directory / "step_000000005.pt")},
        row | {"step": 10, "path": str(ring.directory / "gone.pt")},  # deleted: skipped
    ])
    assert len(refused) == 2
    assert "not inside the run's checkpoint directory" in refused[0]
    assert "malformed" in refused[1]
    assert ring.newest_at_or_before(100).step == 5


# -- spill files -------------------------------------------------------------


def test_spill_files_are_json_lines_that_round_trip(tmp_path: Path) -> None:
    moment = now()
    batch = Batch(
        statistics=[{"step": 3, "epoch": 1, "dt": moment, "optimizer": "Adam",
                     "learning_rate": 3e-4, "weight_decay": 0.0, "dropout": 50,
                     "train_loss": math.nan, "validate_loss": None}],
        events=[event_row("warning", "x", "naïve ✓", step=3, fix={"learning_rate": 0.1})],
        removed_checkpoints=[2], abandon_after=1, heartbeat=moment, status="running",
    )
    spill = SpillFiles(tmp_path)
    assert spill.push(batch)
    (path,) = spill.files()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["format"] == SPILL_FORMAT and len(lines) == 3
    back = spill.load(path)
    assert back.statistics[0]["dt"] == moment and back.heartbeat == moment
    assert math.isnan(back.statistics[0]["train_loss"])
    assert back.events == batch.events and back.removed_checkpoints == [2]
    assert (back.abandon_after, back.status, back.ended) == (1, "running", None)


HOSTILE_SPILLS = {
    "not JSON": "\x80 not json {",
    "no header": json.dumps({"table": "statistics", "row": {}}),
    "deep": "[" * 100_000,
    "another run's rows": "\n".join([
        json.dumps({"format": SPILL_FORMAT, "removed_checkpoints": []}),
        json.dumps({"table": "events", "row": {"run_id": 999, "level": "info", "code": "x",
                                               "message": "planted"}}),
    ]),
    "a bad datetime": json.dumps({"format": SPILL_FORMAT, "removed_checkpoints": [],
                                  "heartbeat": "yesterday"}),
}


def test_a_writer_refuses_planted_spill_files_and_writes_its_own(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A real writer on a real database, started on a spill directory that holds an
    old pickle, hostile JSON and one good file of a dead writer: it writes the good
    one and sets the others aside, each with an event, and never unpickles."""
    marker = tmp_path / "pwned"
    store = Store(sqlite_url)
    run_id = store.create_run("spill", "tinycnn", "mnist5k", {}, Hyperparameters(**DEFAULTS))
    spill = tmp_path / "unwritten"
    SpillFiles(spill).push(Batch(events=[event_row("info", "left_over", "from a dead writer")]))
    (spill / "batch-000000000.pickle").write_bytes(pickle.dumps(Payload(marker)))
    for i, text in enumerate(HOSTILE_SPILLS.values(), start=2):
        (spill / f"batch-{i:09d}.jsonl").write_text(text, encoding="latin-1")
    writer = BackgroundWriter(store, run_id, spill_dir=spill)
    assert writer.close()
    assert not marker.exists()
    codes = [e["code"] for e in store.events(run_id)]
    assert codes.count("left_over") == 1
    assert codes.count("spill_refused") == 1 + len(HOSTILE_SPILLS)
    sql = SqlClient(sqlite_url)
    assert sql.one("SELECT count(*) FROM events WHERE message = 'planted'")[0] == 0
    sql.close()
    left = sorted(p.name for p in spill.iterdir())
    assert left == ["batch-000000000.pickle.refused", *(
        f"batch-{i:09d}.jsonl.refused" for i in range(2, 2 + len(HOSTILE_SPILLS)))]
    store.close()


# -- the four attacks, through the real trainer ------------------------------


# SQLite only: the check is on the file, not on the database; the other three attacks
# through the trainer alternate back ends (planted row and live rollback on PostgreSQL).
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_resume_refuses_a_replaced_checkpoint(tmp_path: Path, db_url: str) -> None:
    marker = tmp_path / "pwned"
    sql, run_id = finished_run(tmp_path, db_url)
    (path,) = sql.one("SELECT path FROM checkpoints WHERE run_id = ? ORDER BY step DESC",
                      (run_id,))
    plant_checkpoint(Path(path), marker)
    result = train(tmp_path, db_url, "--resume", str(run_id))
    assert_refused_resume(result, sql, run_id, marker, "could run code")
    sql.close()


# PostgreSQL only: the row is read by the same code on both back ends; the other attacks
# through the trainer run on SQLite (replaced checkpoint, planted spill files).
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_resume_refuses_a_planted_checkpoints_row(tmp_path: Path, db_url: str) -> None:
    """SQL write access alone: a row that names the attacker's own file."""
    marker = tmp_path / "pwned"
    sql, run_id = finished_run(tmp_path, db_url)
    evil = tmp_path / "elsewhere" / "step_000000999.pt"
    evil.parent.mkdir()
    plant_checkpoint(evil, marker)
    sql.execute("INSERT INTO checkpoints (run_id, step, epoch, reason, path, bytes) "
                "VALUES (?, 999, 1, 'periodic', ?, 100)", (run_id, str(evil)))
    result = train(tmp_path, db_url, "--resume", str(run_id))
    assert_refused_resume(result, sql, run_id, marker,
                          "not inside the run's checkpoint directory")
    sql.close()


def test_a_failed_resume_leaves_a_finished_run_finished(tmp_path: Path, sqlite_url: str) -> None:
    """Not an attack, the everyday case: the checkpoint file is gone. The run stays
    `finished` (it used to be rewritten as `failed`)."""
    sql, run_id = finished_run(tmp_path, sqlite_url)
    for (path,) in sql.rows("SELECT path FROM checkpoints WHERE run_id = ?", (run_id,)):
        Path(path).unlink()
    result = train(tmp_path, sqlite_url, "--resume", str(run_id))
    assert_refused_resume(result, sql, run_id, tmp_path / "pwned", "is missing")
    sql.close()


# SQLite only: the spill files are refused before anything reaches the database; the writer's
# own refusal is tested above, and a planted row and a live rollback run on PostgreSQL.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_resume_refuses_planted_spill_files(tmp_path: Path, db_url: str) -> None:
    """The resumed trainer's writer writes what a dead one left in the run's
    `unwritten/`: an old pickle and hostile JSON there are refused, never loaded,
    and the resume itself goes on."""
    marker = tmp_path / "pwned"
    sql, run_id = finished_run(tmp_path, db_url)
    spill = tmp_path / "checkpoints" / f"run_{run_id}" / "unwritten"
    spill.mkdir()
    (spill / "batch-000000001.pickle").write_bytes(pickle.dumps(Payload(marker)))
    (spill / "batch-000000002.jsonl").write_text(HOSTILE_SPILLS["another run's rows"])
    result = train(tmp_path, db_url, "--resume", str(run_id), "--max-steps", "15")
    assert not marker.exists()
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "batch-*.pickle) were not loaded" in result.stderr
    assert "batch-000000002.jsonl refused" in result.stderr
    refused = events(sql, run_id, "spill_refused")
    assert len(refused) == 2 and "can run any code" in refused[0]
    assert sorted(p.name for p in spill.iterdir()) == [
        "batch-000000001.pickle.refused", "batch-000000002.jsonl.refused"]
    assert sql.one("SELECT count(*) FROM events WHERE message = 'planted'")[0] == 0
    assert run_status(sql, run_id) == "finished" and max_step(sql, run_id) == 15
    sql.close()


# PostgreSQL only: the refusal is about the file; the resume attacks run on SQLite too.
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_rollback_onto_a_replaced_checkpoint_is_refused(tmp_path: Path, db_url: str) -> None:
    """A live run: its checkpoint of step 10 is replaced, then a rollback to it is asked
    for through SQL as the board does. The trainer refuses, says why and trains on."""
    marker = tmp_path / "pwned"
    with trainer(tmp_path, db_url, "--model", "tinycnn", "--checkpoint-every", "10") as proc:
        sql = wait_for("the database", lambda: SqlClient(db_url), timeout=30)
        run_id = wait_for("a run", lambda: sql.one("SELECT run_id FROM runs"))[0]
        (path,) = wait_for("the checkpoint of step 10", lambda: sql.one(
            "SELECT path FROM checkpoints WHERE run_id = ? AND step = 10", (run_id,)))
        wait_for("steps past 15", lambda: max_step(sql, run_id) > 15)
        plant_checkpoint(Path(path), marker)
        sql.execute("UPDATE parameters SET rollback_step = 10, "
                    "rollback_request = rollback_request + 1, version = version + 1 "
                    "WHERE run_id = ?", (run_id,))
        (message,) = wait_for("the refusal", lambda: events(sql, run_id, "rollback_failed"))
        assert "no rollback to step 10" in message and "could run code" in message
        refused_at = max_step(sql, run_id)
        wait_for("training to go on", lambda: max_step(sql, run_id) > refused_at + 5)
        assert proc.poll() is None and run_status(sql, run_id) == "running"
        sql.execute("UPDATE parameters SET stop_train = TRUE WHERE run_id = ?", (run_id,))
        assert proc.wait(timeout=60) == 0
    assert not marker.exists()
    assert events(sql, run_id, "rolled_back") == []
    assert sql.one("SELECT count(*) FROM abandoned_statistics WHERE run_id = ?",
                   (run_id,))[0] == 0
    assert run_status(sql, run_id) == "stopped"
    sql.close()

