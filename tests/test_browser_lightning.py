"""A Lightning run on the board, in a real browser: watched, steered and stopped.

tests/lightning_run.py trains a small CNN with a Lightning Trainer and livetrain's
`LiveTrainingCallback` as a process, board.py serves the same SQLite database, and
headless Chromium shows the run's loss curve and its Layers view (the module's Conv2d
and Linear layers, charted). An lr typed on the board is applied at a step, and the
optimizer Lightning steps holds it from that step on (the script prints its lr); the
Stop button ends the fit Lightning's way and the script exits 0 with the run stopped.
The same Chromium requirements as test_browser_board.py (a failure under CI=true).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from test_browser_board import (  # noqa: F401 - browser is a fixture
    APPLIED,
    TRAINER_ENV,
    WAIT,
    browser,
    first_history_row,
    free_port,
    spawn,
    tail,
    text,
    trace,
    type_into,
    until,
    wait_for_http,
)

from livetrain.db.store import Store

ROOT = Path(__file__).resolve().parent.parent
RUN_NAME = "lightning-cnn"
NEW_LR = 0.002
REPORTED = re.compile(r"^step (\d+) lr (\S+)$", re.MULTILINE)


def reported_lrs(log: Path) -> list[tuple[int, float]]:
    """(step, lr) as the script printed them from the Trainer's optimizer."""
    return [(int(step), float(lr)) for step, lr in REPORTED.findall(log.read_text())]


def layer_traces(driver: WebDriver, graph_id: str) -> dict[str, int]:
    """Trace name -> points, of what Plotly draws now in a Layers chart."""
    return driver.execute_script(
        "const gd = document.querySelector(`#${arguments[0]} .js-plotly-plot`);"
        "const out = {};"
        "for (const t of (gd && gd.data) || []) out[t.name] = (t.x || []).length;"
        "return out;",
        graph_id,
    )


def watch_the_layers(driver: WebDriver) -> None:
    """The Layers view lists the LightningModule's layers by name and type and charts
    both its Conv2d and its Linear layer."""
    driver.execute_script("document.querySelector('#insight').scrollIntoView();")
    until(driver, lambda d: "Conv2d" in text(d, "#model-table")
          and "Linear" in text(d, "#model-table"), "the model table's Conv2d and Linear")
    rows = text(driver, "#model-table-rows")
    assert re.search(r"^conv\s+Conv2d", rows, re.MULTILINE), rows
    assert re.search(r"^fc\s+Linear", rows, re.MULTILINE), rows
    until(driver, lambda d: all(layer_traces(d, "grad-norm-graph").get(name, 0) >= 2
                                for name in ("conv", "fc")),
          "the conv and fc gradient norms, two logs each")
    assert all(layer_traces(driver, "update-ratio-graph").get(name, 0) >= 1
               for name in ("conv", "fc"))


def change_the_lr(driver: WebDriver, store: Store, run_id: int, train_log: Path) -> int:
    """Type the new lr, apply it; the step the board says it was applied at."""
    until(driver, lambda d: d.find_element(By.ID, "lr-input").get_attribute("value"),
          "the fields to load the run's parameters")
    assert driver.find_element(By.ID, "lr-input").get_attribute("value") == "0.0003"
    assert reported_lrs(train_log)[-1][1] == pytest.approx(3e-4)
    type_into(driver, "lr-input", f"{NEW_LR:g}")
    driver.find_element(By.ID, "submit-params").click()
    status = until(driver, lambda d: APPLIED.search(text(d, "#apply-status")),
                   f"apply-status to report the applied step; trainer log:\n{tail(train_log)}")
    applied_step = int(status.group(1))
    params = store.get_parameters(run_id)
    assert (params.version, params.applied_version, params.applied_step) == (
        2, 2, applied_step)
    until(driver, lambda d: first_history_row(d).startswith("v2"),
          "the new row in param-history")
    row = first_history_row(driver)
    assert f"{applied_step:,}" in row and f"{NEW_LR:g}" in row
    return applied_step


def optimizer_took_it(store: Store, run_id: int, trainer: subprocess.Popen, train_log: Path,
                      applied_step: int) -> None:
    """The Trainer's optimizer holds the new lr from the applied step on, the old one
    before it, and the logged statistics agree."""
    past = applied_step + 10
    deadline = time.monotonic() + WAIT
    while not any(step >= past for step, _ in reported_lrs(train_log)):
        assert trainer.poll() is None, f"the script exited early:\n{tail(train_log)}"
        if time.monotonic() > deadline:
            pytest.fail(f"the script reported no lr past step {past}:\n{tail(train_log)}")
        time.sleep(0.2)
    lrs = reported_lrs(train_log)
    assert all(lr == pytest.approx(3e-4) for step, lr in lrs if step < applied_step), lrs
    assert all(lr == pytest.approx(NEW_LR) for step, lr in lrs if step >= applied_step), lrs
    logged = [r for r in store.statistics(run_id) if r["step"] > applied_step]
    assert logged and all(r["learning_rate"] == pytest.approx(NEW_LR) for r in logged)


def test_a_lightning_run_on_the_board(
    sqlite_url: str, tmp_path: Path, browser: WebDriver  # noqa: F811 - the fixture
) -> None:
    store = Store(sqlite_url)  # the schema exists before either process starts
    port = free_port()
    board_url = f"http://127.0.0.1:{port}/"
    train_log, board_log = tmp_path / "train.log", tmp_path / "board.log"
    trainer_args = [sys.executable, str(ROOT / "tests" / "lightning_run.py"),
                    "--db", sqlite_url, "--root", str(tmp_path), "--name", RUN_NAME,
                    "--log-every", "10", "--report-every", "5"]
    board_args = [sys.executable, str(ROOT / "board.py"), "--db", sqlite_url,
                  "--port", str(port)]
    env = TRAINER_ENV | {"PYTHONPATH": str(ROOT)}
    try:
        with spawn(trainer_args, tmp_path, train_log, env) as trainer, \
                spawn(board_args, tmp_path, board_log) as board:
            wait_for_http(board_url, board, board_log)
            browser.get(board_url)
            until(browser, lambda d: "running" in text(d, "#run-status"),
                  f"the run to show as running; trainer log:\n{tail(train_log)}")
            assert text(browser, ".run-name") == RUN_NAME
            run_id = store.list_runs()[0]["run_id"]
            assert store.get_run(run_id)["config"]["framework"].startswith("lightning ")

            # Its training curve grows, point by logged point.
            until(browser, lambda d: len(trace(d, "loss-graph", 0)["x"]) >= 3,
                  "three logged steps on the loss graph")
            drawn = trace(browser, "loss-graph", 0)
            # a log every 10 steps, and one at each epoch's end (32 batches of 32)
            assert all(step % 10 == 0 or step % 32 == 0 for step in drawn["x"]), drawn["x"]
            assert any(y is not None for y in drawn["y"])

            watch_the_layers(browser)
            applied_step = change_the_lr(browser, store, run_id, train_log)
            optimizer_took_it(store, run_id, trainer, train_log, applied_step)

            # Stop: Lightning ends the fit, the script exits 0, the run is stopped.
            browser.find_element(By.ID, "stop-button").click()
            until(browser, expected_conditions.alert_is_present(), "the confirmation",
                  timeout=10).accept()
            assert trainer.wait(WAIT) == 0, tail(train_log)
            assert "status=stopped" in train_log.read_text(), tail(train_log)
            assert store.get_run(run_id)["status"] == "stopped"
            until(browser, lambda d: text(d, "#run-status") == "stopped",
                  "the run to show as stopped")
            errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, errors
    finally:
        store.close()
