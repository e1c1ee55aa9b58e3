"""The two-click recovery in a real browser: a run blows up, the board says why, the user
lowers the learning rate from the alert and rolls back to a checkpoint.

AlexNet with He (kaiming) weights and SGD+Nesterov at lr 0.05 reaches a NaN loss
within 4 to 7 steps (on every seed and thread count tried: its weights grow by a
steady factor each step, where at lr 1.0 from PyTorch's default init the outcome
depends on the CPU's rounding); the trainer pauses itself before the update with
a `non_finite` error event. The board shows the alert and its fix ("Apply: set lr
to 0.005"), the user clicks it (the run stays paused), picks the checkpoint before
the NaN and rolls back: the
run goes back to `running`, the loss curve shows the abandoned branch in grey
and the live path continues past the restored step. SQLite keeps it fast; the
same Chromium requirements as test_browser_board.py (a failure under CI=true).
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from test_browser_board import (  # noqa: F401 - browser is a fixture
    TRAINER_ENV,
    WAIT,
    browser,
    free_port,
    screenshot_path,
    spawn,
    tail,
    text,
    until,
    wait_for_http,
)

from livetrain.db.store import Store

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = "insight.png"  # in docs/ under `make screenshots`, see screenshot_path
BLOW_UP_WAIT = 90  # seconds for the run to start and reach NaN on two busy cores
ROLLBACK_TO = 0  # the initial checkpoint: the NaN comes before any periodic one
FIXED_LR = 0.005  # the non_finite alert's fix: a tenth of the lr that blew up
BLOW_UP = ("--init", "kaiming", "--optimizer", "SGD+Nesterov", "--lr", "0.05")


def traces(driver: WebDriver, graph_id: str) -> list[dict]:
    """Name, colour, dash and x of every trace Plotly draws now."""
    return driver.execute_script(
        "const gd = document.querySelector(`#${arguments[0]} .js-plotly-plot`);"
        "if (!gd || !gd.data) return [];"
        "return gd.data.map(t => ({name: t.name, x: Array.from(t.x || []),"
        "  color: (t.line || {}).color, dash: (t.line || {}).dash}));",
        graph_id,
    )


def points(driver: WebDriver, graph_id: str) -> int:
    """Points in the graph's shortest trace (0 without traces)."""
    return min((len(t["x"]) for t in traces(driver, graph_id)), default=0)


def save_section_screenshot(driver: WebDriver, css: str, path: Path) -> None:
    """One element of the page, however far down: the window grows to the whole page first
    (capturing beyond the viewport instead would reflow the page under the clip)."""
    size = driver.get_window_size()
    height = driver.execute_script("return document.documentElement.scrollHeight;")
    driver.set_window_size(size["width"], height + 200)
    try:
        box = until(driver, lambda d: d.execute_script(
            "const r = document.querySelector(arguments[0]).getBoundingClientRect();"
            "return window.innerHeight >= document.documentElement.scrollHeight &&"
            "  {x: r.left, y: r.top, width: r.width, height: r.height};", css),
            "the window to show the whole page", timeout=10)
        margin = 12
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": False,
            "clip": {"x": max(box["x"] - margin, 0), "y": max(box["y"] - margin, 0),
                     "width": box["width"] + 2 * margin, "height": box["height"] + 2 * margin,
                     "scale": 1},
        })
    finally:
        driver.set_window_size(size["width"], size["height"])
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


def choose_option(driver: WebDriver, dropdown_id: str, label_start: str) -> None:
    driver.find_element(By.ID, dropdown_id).click()
    option = until(driver, lambda d: next(
        (o for o in d.find_elements(By.CSS_SELECTOR, ".dash-dropdown-option")
         if o.text.startswith(label_start)), None), f"the option {label_start!r}", timeout=10)
    option.click()


def test_two_click_recovery_from_a_nan(
    sqlite_url: str, tmp_path: Path, browser: WebDriver  # noqa: F811 - the fixture
) -> None:
    store = Store(sqlite_url)
    port = free_port()
    board_url = f"http://127.0.0.1:{port}/"
    train_log, board_log = tmp_path / "train.log", tmp_path / "board.log"
    trainer_args = [
        sys.executable, str(ROOT / "train.py"), "--db", sqlite_url, "--model", "alexnet",
        *BLOW_UP, "--checkpoint-every", "10", "--log-every", "1", "--val-batches", "2",
        "--no-progress", "--run-name", "alexnet-blowup",
        "--checkpoint-dir", str(tmp_path / "checkpoints"),
    ]
    board_args = [sys.executable, str(ROOT / "board.py"), "--db", sqlite_url,
                  "--port", str(port)]
    try:
        with spawn(trainer_args, tmp_path, train_log, TRAINER_ENV) as trainer, \
                spawn(board_args, tmp_path, board_log) as board:
            wait_for_http(board_url, board, board_log)
            browser.get(board_url)
            until(browser, lambda d: "running" in text(d, "#run-status"),
                  f"the run to show as running; trainer log:\n{tail(train_log)}")

            # The run blows up and pauses itself; the alert says so and offers the fix.
            until(browser, lambda d: text(d, "#run-status") == "paused",
                  f"the NaN pause; trainer log:\n{tail(train_log)}", timeout=BLOW_UP_WAIT)
            run_id = store.list_runs()[0]["run_id"]
            nan_event = next(e for e in store.events(run_id) if e["code"] == "non_finite")
            nan_step = nan_event["step"]
            assert nan_step > ROLLBACK_TO
            fix = until(browser, lambda d: next(
                (b for b in d.find_elements(By.CSS_SELECTOR, ".alert-error .btn-fix")), None),
                "the non_finite alert with its fix button")
            assert "non_finite" in text(browser, ".alert-error")
            assert fix.text == f"Apply: set lr to {FIXED_LR:g}"

            # The Layers view shows the explosion (the screenshot for the README).
            until(browser, lambda d: points(d, "grad-norm-graph") >= 5,
                  "the per-layer charts up to the NaN")
            last_logged = store.statistics(run_id)[-1]["step"]
            until(browser, lambda d: text(d, "#histograms-step") == f"step {last_logged}"
                  and points(d, "system-graph") > 0, "the histograms and system panels")
            assert "Conv2d" in text(browser, "#model-table")
            save_section_screenshot(browser, "#insight", screenshot_path(SCREENSHOT, tmp_path))

            # Click 1: the fix. The run stays paused; the new lr waits for the rollback.
            fix.click()
            until(browser, lambda d: "applied at step" in text(d, "#apply-status"),
                  "the fix to be applied")
            assert text(browser, "#apply-status").startswith(f'Fix "set lr to {FIXED_LR:g}"')
            assert text(browser, "#run-status") == "paused"
            assert text(browser, "#pause-button") == "Resume"

            # Click 2: roll back to a checkpoint before the NaN, and confirm.
            choose_option(browser, "checkpoint-select", f"step {ROLLBACK_TO} ·")
            until(browser, lambda d: text(d, "#checkpoint-select").startswith(
                f"step {ROLLBACK_TO} ·"), "the chosen checkpoint")
            browser.find_element(By.ID, "rollback-button").click()
            alert = until(browser, expected_conditions.alert_is_present(), "the confirmation",
                          timeout=10)
            assert f"Roll back to step {ROLLBACK_TO}?" in alert.text
            alert.accept()
            until(browser, lambda d: text(d, "#apply-status").startswith(
                f"Rollback to step {ROLLBACK_TO} ") and "applied at step" in text(
                d, "#apply-status"), "the rollback to be applied")
            until(browser, lambda d: text(d, "#run-status") == "running",
                  "the run to run again")

            # The abandoned branch is grey and dashed; the live path goes on past it.
            until(browser, lambda d: any(t["name"] == "abandoned branch"
                                         for t in traces(d, "loss-graph")),
                  "the abandoned branch on the loss curve")
            grey = [t for t in traces(browser, "loss-graph") if t["name"] == "abandoned branch"]
            assert all(t["dash"] == "dash" and t["color"] in ("#9ca3af", "#c4cad3")
                       for t in grey)
            assert min(grey[0]["x"]) > ROLLBACK_TO and max(grey[0]["x"]) <= nan_step + 1
            until(browser, lambda d: max(traces(d, "loss-graph")[0]["x"], default=0)
                  >= ROLLBACK_TO + 10, "new statistics after the rolled-back step",
                  timeout=BLOW_UP_WAIT)
            params = store.get_parameters(run_id)
            assert params.learning_rate == FIXED_LR and params.rollback_step == ROLLBACK_TO
            live = store.statistics(run_id, ROLLBACK_TO)
            assert live and all(r["learning_rate"] == FIXED_LR for r in live)

            # Stop; the trainer exits cleanly.
            browser.find_element(By.ID, "stop-button").click()
            until(browser, expected_conditions.alert_is_present(), "the stop confirmation",
                  timeout=10).accept()
            assert trainer.wait(WAIT) == 0, tail(train_log)
            until(browser, lambda d: text(d, "#run-status") == "stopped", "stopped")
            errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, errors
    finally:
        store.close()
