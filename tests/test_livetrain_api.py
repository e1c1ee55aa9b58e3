"""`from livetrain import LiveRun` around a user's own loop: issue 12's "Done when".

- A fresh venv, `pip install -e` of this repository, a user script in a directory
  outside it: it trains, and nothing but `livetrain` is importable.
- A plain SQL client steers the user's loop: three lr changes, each acknowledged at a
  named step and seen in the statistics after it; pause (the steps stand still, the
  heartbeat goes on), resume, stop; an optimizer switch under the unchanged loop.
- In process: param groups keep their ratios, a scheduler takes a change as its new
  base, an exception marks the run failed and still propagates.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import DBAPIError
from torch import nn

from livetrain import LiveRun
from livetrain.db.store import Store

ROOT = Path(__file__).resolve().parents[1]
USER_LOOP = Path(__file__).with_name("user_loop.py")


class SqlClient:
    """A third-party client: SQLAlchemy text() statements, none of livetrain's code."""

    def __init__(self, url: str) -> None:
        sqlite = make_url(url).get_backend_name() == "sqlite"
        self.engine = create_engine(url, connect_args={"timeout": 30} if sqlite else {})

    def execute(self, sql: str, **params: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(text(sql), params)

    def rows(self, sql: str, **params: Any) -> list[tuple]:
        with self.engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql), params)]

    def one(self, sql: str, **params: Any) -> Any:
        rows = self.rows(sql, **params)
        return rows[0] if rows else None

    def close(self) -> None:
        self.engine.dispose()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll `check` until it returns something true; before the trainer has created
    its tables, a query fails, which counts as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except DBAPIError:
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def user_script(folder: Path) -> Path:
    """The user's script, copied where the repository is not: it finds livetrain only
    as an installed package, as a user's own project would."""
    folder.mkdir(parents=True, exist_ok=True)
    assert not folder.resolve().is_relative_to(ROOT)
    return Path(shutil.copy(USER_LOOP, folder / "train_mlp.py"))


@contextmanager
def user_run(tmp_path: Path, url: str, *args: str) -> Iterator[subprocess.Popen]:
    """The user's script running against `url`, killed if the test leaves it running."""
    script = user_script(tmp_path / "user")
    log = (tmp_path / "user.log").open("w")
    proc = subprocess.Popen([sys.executable, str(script), "--db", url, *args],
                            cwd=script.parent, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        if proc.returncode != 0:
            print((tmp_path / "user.log").read_text()[-4000:])


def output(tmp_path: Path) -> str:
    return (tmp_path / "user.log").read_text()


# -- a: a fresh venv, installed from this repository -----------------------------------


def venv_python(venv: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=180)
    return venv / "bin" / "python"


def share_dependencies(python: Path) -> Path:
    """A .pth in the new venv naming this interpreter's site-packages: torch and the rest
    are importable without downloading them again. A plain path line runs none of the
    .pth files there, so the old venv's editable `livetrain` finder stays off."""
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()
    shared = sysconfig.get_paths()["purelib"]
    (Path(site) / "livetrain_test_dependencies.pth").write_text(shared + "\n")
    return Path(shared)


def test_fresh_venv_pip_install_runs_a_user_script_outside_the_repo(tmp_path: Path) -> None:
    python = venv_python(tmp_path / "venv")
    shared = share_dependencies(python)
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "-e", str(ROOT)],
        capture_output=True, text=True, timeout=600,  # setuptools may come from the index
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert list(shared.glob("livetrain-*.dist-info")), "pip touched the shared venv"

    outside = tmp_path / "project"
    script = user_script(outside)
    db = outside / "runs.db"
    result = subprocess.run(
        [str(python), str(script), "--db", f"sqlite:///{db}", "--epochs", "2"],
        cwd=outside, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    installed = Path(result.stdout.split("livetrain=")[1].split()[0]).resolve()
    assert installed.is_relative_to(ROOT)
    assert "optimizer=Adam " in result.stdout and "status=finished steps=32" in result.stdout

    sql = SqlClient(f"sqlite:///{db}")
    assert sql.one("SELECT name, status FROM runs") == ("user-mlp", "finished")
    assert sql.one("SELECT count(*) FROM statistics WHERE train_loss IS NOT NULL")[0] >= 6
    sql.close()
    assert_only_livetrain_is_importable(python, outside)


def assert_only_livetrain_is_importable(python: Path, cwd: Path) -> None:
    """`import db`, `import dashboard`, `import models` fail outside the repository, and
    no other top-level script or folder of the repository is importable from there.
    (Another package's module of the same name, such as the `examples` folder that
    dash-bootstrap-components puts into site-packages, is not ours.)"""
    strict = {"db", "dashboard", "models"}
    names = strict | {p.stem for p in ROOT.glob("*.py")} | {
        p.name for p in ROOT.iterdir()
        if p.is_dir() and p.name.isidentifier() and p.name != "livetrain"
    }
    probe = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        module = importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        continue\n"
        "    print(name, getattr(module, '__file__', None) or list(module.__path__)[0])\n"
    )
    found = subprocess.run([str(python), "-c", probe, *sorted(names)], cwd=cwd,
                           capture_output=True, text=True, timeout=120, check=True)
    importable = dict(line.split(" ", 1) for line in found.stdout.splitlines())
    leaks = {name: where for name, where in importable.items()
             if name in strict or (Path(where).resolve().is_relative_to(ROOT)
                                   and "site-packages" not in Path(where).parts)}
    assert leaks == {}, f"importable besides livetrain: {leaks}"


# -- b: a plain SQL client steers the user's loop ---------------------------------------


def max_step(sql: SqlClient, run_id: int) -> int:
    return sql.one("SELECT max(step) FROM statistics WHERE run_id = :r", r=run_id)[0] or 0


def applied(sql: SqlClient, run_id: int, version: int) -> tuple:
    """Wait for the trainer to adopt `version`; its parameter_changes row."""
    wait_for(f"version {version} applied", lambda: sql.one(
        "SELECT applied_version FROM parameters WHERE run_id = :r", r=run_id)[0] >= version,
        timeout=30)
    return sql.one("SELECT applied_step, learning_rate, optimizer FROM parameter_changes "
                   "WHERE run_id = :r AND version = :v", r=run_id, v=version)


def logged_after(sql: SqlClient, run_id: int, step: int, rows: int = 3) -> list[tuple]:
    """Wait for `rows` statistics rows after `step`; (step, learning_rate, optimizer)."""
    query = ("SELECT step, learning_rate, optimizer FROM statistics "
             "WHERE run_id = :r AND step > :s ORDER BY step")
    return wait_for(f"{rows} rows after step {step}", lambda: (
        found if len(found := sql.rows(query, r=run_id, s=step)) >= rows else None))


def started(url: str) -> tuple[SqlClient, int]:
    sql = SqlClient(url)
    run_id = wait_for("a run", lambda: sql.one("SELECT run_id FROM runs"), timeout=60)[0]
    wait_for("3 logged steps", lambda: max_step(sql, run_id) >= 10)
    return sql, run_id


def change_lr_three_times(sql: SqlClient, run_id: int) -> list[tuple[int, float]]:
    """Each change: acknowledged at a step, and every row logged after it shows it."""
    changes = []
    for lr in (1e-3, 5e-4, 2e-3):
        sql.execute("UPDATE parameters SET learning_rate = :lr WHERE run_id = :r",
                    lr=lr, r=run_id)  # the trigger bumps the version
        version = sql.one("SELECT version FROM parameters WHERE run_id = :r", r=run_id)[0]
        step, row_lr, _ = applied(sql, run_id, version)
        assert step is not None and row_lr == lr
        assert {row[1] for row in logged_after(sql, run_id, step)} == {lr}
        changes.append((step, lr))
    return changes


def pause_and_resume(sql: SqlClient, run_id: int, proc: subprocess.Popen) -> None:
    """Paused: no step for ~3 s while the heartbeat goes on; resumed: steps again."""
    sql.execute("UPDATE parameters SET pause_train = TRUE WHERE run_id = :r", r=run_id)
    wait_for("the pause", lambda: sql.one(
        "SELECT status FROM runs WHERE run_id = :r", r=run_id)[0] == "paused", timeout=30)
    paused_at = max_step(sql, run_id)
    beat = sql.one("SELECT dt_heartbeat FROM runs WHERE run_id = :r", r=run_id)[0]
    time.sleep(3.0)
    wait_for("a heartbeat while paused", lambda: sql.one(
        "SELECT dt_heartbeat FROM runs WHERE run_id = :r", r=run_id)[0] != beat, timeout=5)
    assert max_step(sql, run_id) == paused_at and proc.poll() is None
    assert sql.one("SELECT status FROM runs WHERE run_id = :r", r=run_id)[0] == "paused"

    sql.execute("UPDATE parameters SET pause_train = FALSE WHERE run_id = :r", r=run_id)
    wait_for("steps after the pause", lambda: max_step(sql, run_id) > paused_at + 5)
    assert sql.one("SELECT status FROM runs WHERE run_id = :r", r=run_id)[0] == "running"


def stop(sql: SqlClient, run_id: int, proc: subprocess.Popen) -> None:
    sql.execute("UPDATE parameters SET stop_train = TRUE WHERE run_id = :r", r=run_id)
    assert proc.wait(timeout=60) == 0
    status, ended = sql.one("SELECT status, dt_ended FROM runs WHERE run_id = :r", r=run_id)
    assert status == "stopped" and ended is not None


# SQLite only: LiveRun reads PostgreSQL's rows with the same code; on PostgreSQL it is
# steered by test_sql_switches_the_optimizer_under_the_unchanged_loop (a change and a stop),
# and train.py, built on it, is paused, resumed and rolled back in test_train_e2e's
# test_pause_resume_and_rollback_by_sql.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sql_client_steers_lr_pause_resume_and_stop(tmp_path: Path, db_url: str) -> None:
    with user_run(tmp_path, db_url, "--epochs", "100000", "--sleep", "0.01") as proc:
        sql, run_id = started(db_url)
        changes = change_lr_three_times(sql, run_id)
        pause_and_resume(sql, run_id, proc)
        stop(sql, run_id, proc)

    # The whole history: between two acknowledged steps, the earlier change's lr only.
    rows = sql.rows("SELECT step, learning_rate FROM statistics WHERE run_id = :r", r=run_id)
    bounds = [*changes, (max(s for s, _ in rows) + 1, None)]
    for (start, lr), (end, _) in pairwise(bounds):
        between = {row_lr for step, row_lr in rows if start < step < end}
        assert between == {lr}, (start, end)
    assert {row_lr for step, row_lr in rows if step < changes[0][0]} == {3e-4}
    assert "optimizer=Adam " in output(tmp_path) and "status=stopped" in output(tmp_path)
    sql.close()


# PostgreSQL only: the switch is read and applied by the same code on both back ends; the
# steering test above runs on SQLite.
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_sql_switches_the_optimizer_under_the_unchanged_loop(
    tmp_path: Path, db_url: str
) -> None:
    with user_run(tmp_path, db_url, "--epochs", "100000", "--sleep", "0.01") as proc:
        sql, run_id = started(db_url)
        sql.execute("UPDATE parameters SET optimizer = 'SGD+Nesterov', learning_rate = 0.01 "
                    "WHERE run_id = :r", r=run_id)
        version = sql.one("SELECT version FROM parameters WHERE run_id = :r", r=run_id)[0]
        step, lr, optimizer = applied(sql, run_id, version)
        assert (lr, optimizer) == (0.01, "SGD+Nesterov")
        after = logged_after(sql, run_id, step)
        assert {(row[1], row[2]) for row in after} == {(0.01, "SGD+Nesterov")}
        stop(sql, run_id, proc)

    before = sql.rows("SELECT DISTINCT optimizer FROM statistics WHERE run_id = :r "
                      "AND step < :s", r=run_id, s=step)
    assert before == [("Adam",)]
    assert "optimizer=SGD nesterov=True lr=0.01 status=stopped" in output(tmp_path)
    sql.close()


# -- c, d, e: in process ----------------------------------------------------------------


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(16, 8, generator=generator), torch.randint(0, 3, (16,),
                                                                  generator=generator)


def train_step(run: LiveRun, model: nn.Module, seed: int) -> None:
    """One step of the API's loop."""
    x, y = batch(seed)
    out = model(x)
    loss = nn.functional.cross_entropy(out, y)
    run.optimizer.zero_grad()
    loss.backward()
    run.optimizer.step()
    run.step(loss=loss, outputs=out, targets=y)


def two_layer_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def signal_handlers() -> tuple[Any, Any]:
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def test_param_groups_keep_their_ratio(tmp_path: Path, db_url: str) -> None:
    model = two_layer_model()
    optimizer = torch.optim.Adam([
        {"params": model[0].parameters(), "lr": 1e-5},  # the backbone
        {"params": model[2].parameters(), "lr": 1e-3},  # the head
    ])
    store = Store(db_url)
    handlers = signal_handlers()
    with LiveRun(model, optimizer, db=db_url, name="groups", log_every=5,
                 checkpoint_dir=tmp_path / "checkpoints") as run:
        assert store.get_parameters(run.run_id).learning_rate == 1e-5  # group 0: the base
        version = store.submit_parameters(run.run_id, learning_rate=1e-4)
        deadline = time.monotonic() + 30
        while run.optimizer.param_groups[0]["lr"] == 1e-5 and time.monotonic() < deadline:
            train_step(run, model, run.global_step)
        lrs = [group["lr"] for group in run.optimizer.param_groups]
        assert lrs[0] == 1e-4
        assert lrs[1] / lrs[0] == pytest.approx(100)
        assert run.optimizer is optimizer  # changed in place: Adam's moments kept
        train_step(run, model, run.global_step)

    assert run.status == "finished"
    assert signal_handlers() == handlers
    state = store.get_parameters(run.run_id)
    assert state.applied_version == version
    (change,) = [c for c in store.parameter_changes(run.run_id) if c["version"] == version]
    assert change["learning_rate"] == 1e-4 and 0 < change["applied_step"] <= run.global_step
    store.close()


def lambda_schedule(optimizer: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** (step // 4))


def step_schedule(optimizer: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)


@pytest.mark.parametrize("make_scheduler", [lambda_schedule, step_schedule])
def test_a_board_lr_becomes_the_schedulers_new_base(
    tmp_path: Path, sqlite_url: str, make_scheduler: Callable[..., Any]
) -> None:
    """Both schedules halve the lr every 4 steps; LambdaLR recomputes it from base_lrs
    at every step, so it would undo a change that left base_lrs alone."""
    model = two_layer_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = make_scheduler(optimizer)
    store = Store(sqlite_url)

    def expected(base: float) -> float:
        return base * 0.5 ** (scheduler.last_epoch // 4)

    with LiveRun(model, optimizer, db=sqlite_url, name="schedule", log_every=5,
                 scheduler=scheduler, checkpoint_dir=tmp_path / "checkpoints") as run:
        for seed in range(6):
            train_step(run, model, seed)
            scheduler.step()
            assert run.optimizer.param_groups[0]["lr"] == pytest.approx(expected(0.1))
        version = store.submit_parameters(run.run_id, learning_rate=0.02)
        deadline = time.monotonic() + 30
        while store.get_parameters(run.run_id).applied_version < version:
            assert time.monotonic() < deadline, "the change was not applied"
            train_step(run, model, run.global_step)
            scheduler.step()
        for seed in range(12):  # across three more halvings
            assert run.optimizer.param_groups[0]["lr"] == pytest.approx(expected(0.02))
            train_step(run, model, seed)
            scheduler.step()
        assert scheduler.base_lrs == [pytest.approx(0.02)]
        assert scheduler.last_epoch == run.global_step  # LiveRun did not step it again
    store.close()


def test_an_exception_fails_the_run_and_propagates(tmp_path: Path, db_url: str) -> None:
    model = two_layer_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    handlers = signal_handlers()
    with pytest.raises(RuntimeError, match="boom at step 3"), LiveRun(
        model, optimizer, db=db_url, name="crash", log_every=1,
        checkpoint_dir=tmp_path / "checkpoints",
    ) as run:
        for seed in range(10):
            train_step(run, model, seed)
            if run.global_step == 3:
                raise RuntimeError("boom at step 3")

    assert run.status == "failed"
    assert signal_handlers() == handlers
    sql = SqlClient(db_url)
    status, ended = sql.one("SELECT status, dt_ended FROM runs WHERE run_id = :r",
                            r=run.run_id)
    assert status == "failed" and ended is not None
    level, message = sql.one("SELECT level, message FROM events WHERE run_id = :r "
                             "AND code = 'run_failed'", r=run.run_id)
    assert level == "error" and "boom at step 3" in message
    sql.close()


def hook_counts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Per module: its forward, forward-pre and backward hooks."""
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                   len(m._backward_pre_hooks)) for name, m in model.named_modules()}


def test_the_model_is_given_back_without_hooks(tmp_path: Path, sqlite_url: str) -> None:
    """A run that ends leaves the user's model and optimizer as it found them, so that
    a second run on the same model (a fine-tuning after a pre-training) starts clean."""
    model = two_layer_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = hook_counts(model)
    for name in ("first", "second"):
        with LiveRun(model, optimizer, db=sqlite_url, name=name, log_every=2,
                     checkpoint_dir=tmp_path / "checkpoints") as run:
            for seed in range(4):
                train_step(run, model, seed)
        assert run.status == "finished"
        assert len(optimizer._optimizer_step_pre_hooks) == 0
        assert len(optimizer._optimizer_step_post_hooks) == 0
        assert hook_counts(model) == before, name
