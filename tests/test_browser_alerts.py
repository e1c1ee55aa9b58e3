"""The Alerts panel's episodes in a real browser (issue 13): open apart from resolved,
redrawn as the trainer upserts them, and a fix clicked after a redraw applies the
row's fix.

board.py runs as a process over a SQLite database; the episodes are written with
Store.write_batch exactly as the trainer upserts them (one row per episode, the
same alert_id at every log). No trainer runs: the run is never steered by one, so
the fix stays pending and the test reads the parameters row it wrote. The same
Chromium requirements as test_browser_board.py (a failure under CI=true).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from test_browser_board import (  # noqa: F401 - browser is a fixture
    browser,
    free_port,
    spawn,
    tail,
    text,
    until,
    wait_for_http,
)

from livetrain.db.contract import DEFAULTS, Hyperparameters
from livetrain.db.store import Batch, Store, now

ROOT = Path(__file__).resolve().parent.parent
OPEN, RESOLVED = ".alert-group-open", ".alert-group-resolved"


def ratio_episode(**columns: Any) -> dict[str, Any]:
    """The open episode, as the trainer upserts it at its first log."""
    return {"alert_id": "ratio:fc", "code": "update_ratio_high", "level": "warning",
            "layer_name": "fc", "status": "open", "first_step": 10, "last_step": 10,
            "logs": 1, "measure": "update:parameter ratio", "worst_value": 0.04,
            "message": "update ratio <b>0.04</b> at fc", "recommendation": "lower the lr",
            "fix": {"learning_rate": 1e-4}, "dt_first": now(), "dt_last": now()} | columns


def test_episodes_are_grouped_redrawn_and_fixed(
    sqlite_url: str, tmp_path: Path, browser: WebDriver  # noqa: F811 - the fixture
) -> None:
    store = Store(sqlite_url)
    run_id = store.create_run("alerts", "smallcnn", "mnist5k", {}, Hyperparameters(**DEFAULTS))
    first = ratio_episode()
    store.write_batch(run_id, Batch(
        alerts=[first, {"alert_id": "rising:1", "code": "loss_rising", "level": "warning",
                        "status": "resolved", "first_step": 0, "last_step": 5, "logs": 2,
                        "resolved_step": 8, "message": "loss rose", "dt_first": now(),
                        "dt_last": now()}],
        events=[{"level": "warning", "code": code, "message": "opened", "step": step,
                 "dt": now()} for code, step in (("loss_rising", 0), ("update_ratio_high", 10))],
    ))
    port = free_port()
    board_url = f"http://127.0.0.1:{port}/"
    board_log = tmp_path / "board.log"
    board_args = [sys.executable, str(ROOT / "board.py"), "--db", sqlite_url,
                  "--port", str(port)]
    try:
        with spawn(board_args, tmp_path, board_log) as board:
            wait_for_http(board_url, board, board_log)
            browser.get(board_url)
            until(browser, lambda d: "held for 1 log" in text(d, OPEN),
                  f"the open episode; board log:\n{tail(board_log)}")
            shown = text(browser, OPEN)
            assert "update ratio <b>0.04</b> at fc" in shown  # text, never HTML
            assert "step 10 → 10" in shown and "worst update:parameter ratio 0.04" in shown
            assert "resolved at step 8" in text(browser, RESOLVED)
            assert not browser.find_elements(By.CSS_SELECTOR, f"{RESOLVED} .btn-fix")
            assert text(browser, "#alerts-count") == "1 open · 1 resolved"

            # The trainer's next log: the same row, upserted with a new fix. The item is
            # redrawn in place (one open item), and its button clicked after the redraw
            # applies the fix the row holds.
            store.write_batch(run_id, Batch(alerts=[first | {
                "last_step": 20, "logs": 2, "worst_value": 0.06,
                "fix": {"learning_rate": 5e-5}, "dt_last": now()}]))
            until(browser, lambda d: "held for 2 logs" in text(d, OPEN), "the upserted episode")
            assert len(browser.find_elements(By.CSS_SELECTOR, f"{OPEN} .alert-item")) == 1
            button = browser.find_element(By.CSS_SELECTOR, f"{OPEN} .btn-fix")
            assert button.text == "Apply: set lr to 5e-05"
            button.click()
            until(browser, lambda d: text(d, "#apply-status").startswith(
                'Fix "set lr to 5e-05" (version 2)'), "the fix to be submitted")
            params = store.get_parameters(run_id)
            assert (params.version, params.learning_rate) == (2, 5e-5)

            # The condition ends: the episode moves to Resolved, without a button.
            store.write_batch(run_id, Batch(alerts=[first | {
                "last_step": 20, "logs": 2, "status": "resolved", "resolved_step": 30,
                "dt_last": now()}]))
            until(browser, lambda d: "resolved at step 30" in text(d, RESOLVED),
                  "the episode to be resolved")
            assert text(browser, OPEN) == "" and text(browser, "#alerts-count") == "2 resolved"
            assert store.get_parameters(run_id).version == 2  # nothing clicked twice
            errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, errors
    finally:
        store.close()
