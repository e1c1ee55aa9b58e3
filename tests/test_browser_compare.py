"""Many runs in a real browser (issue 7): compare, rename, tag and hide, in headless Chromium.

Four runs are written through the Store as a trainer's writer would write them:
two finished runs with crafted statistics, a live one whose "trainer" (a thread
here) keeps logging and heartbeating, and a scratch run to hide. The user picks
two runs in the comparison and sees both overlaid (training solid, validation
dashed, one colour each) with the right best accuracy in the table, adds the
live run and sees its curve grow, renames and tags the run being watched, hides
the scratch run and finds it again with "show hidden". The page's own requests
are recorded: nothing is asked for the comparison while nothing is compared, or
while only finished runs are. Runs on PostgreSQL and
on SQLite; the same Chromium requirements as test_browser_board.py (a failure
under CI=true).
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from test_browser_board import (  # noqa: F401 - browser is a fixture
    WAIT,
    browser,
    free_port,
    screenshot_path,
    spawn,
    tail,
    text,
    type_into,
    until,
    wait_for_http,
)
from test_browser_insight import save_section_screenshot

from livetrain.db.contract import DEFAULTS, Hyperparameters
from livetrain.db.store import Batch, Store, now

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = "compare.png"  # in docs/ under `make screenshots`, see screenshot_path
BEST = {"baseline": (91.5, 200), "lr-high": (88.25, 150)}  # best val accuracy, its step


def statistics(steps: range, best: tuple[float, int] | None = None,
               offset: float = 0.0) -> list[dict[str, Any]]:
    """Rows as the trainer logs them; validation accuracy peaks at `best` = (value, step),
    once (a parabola), or keeps rising without one."""
    start = now() - timedelta(seconds=len(steps))
    rows = []
    for i, step in enumerate(steps):
        accuracy = (60.0 + 30.0 * (1 - math.exp(-step / 100)) if best is None
                    else best[0] - 4e-4 * (step - best[1]) ** 2)
        rows.append({
            "step": step, "epoch": 1, "dt": start + timedelta(seconds=i),
            "optimizer": "Adam", "learning_rate": 3e-4, "weight_decay": 0.0, "dropout": 50,
            "train_loss": 2.0 / (1 + step / 100) + offset,
            "train_accuracy": min(99.0, step / 4),
            "validate_loss": 2.2 / (1 + step / 100) + offset,
            "validate_accuracy": accuracy, "samples_per_second": 500.0,
        })
    return rows


def finished_run(store: Store, name: str, steps: range, best: tuple[float, int] | None,
                 offset: float) -> int:
    run_id = store.create_run(name, "tinycnn", "digits", {"device": "cpu"},
                              Hyperparameters(**DEFAULTS))
    store.write_batch(run_id, Batch(statistics=statistics(steps, best, offset)))
    store.set_status(run_id, "finished", ended=True)
    return run_id


@contextmanager
def live_trainer(store: Store, run_id: int) -> Iterator[None]:
    """A trainer's writes, without torch: a logged step and a heartbeat twice a second."""
    stop = threading.Event()

    def log() -> None:
        step = 0
        while not stop.wait(0.5):
            step += 5
            store.write_batch(run_id, Batch(statistics=statistics(range(step, step + 1)),
                                            heartbeat=now()))

    thread = threading.Thread(target=log, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


# Installed before the page loads: the `output` of every callback request the page sends.
RECORD_REQUESTS = """
window.__dashOutputs = [];
const realFetch = window.fetch;
window.fetch = function (url, options) {
  try {
    if (String(url).includes('_dash-update-component') && options && options.body) {
      window.__dashOutputs.push(JSON.parse(options.body).output);
    }
  } catch (e) { /* not a callback request */ }
  return realFetch.apply(this, arguments);
};
"""
SLOW_TICK = 5.0  # seconds: the slow-refresh interval the comparison follows


def compare_requests(driver: WebDriver) -> int:
    """Callback requests for the comparison the page has sent so far."""
    return driver.execute_script(
        "return window.__dashOutputs.filter(o => o.includes('compare-loss-graph')).length;")


def overlay(driver: WebDriver, graph_id: str) -> list[dict[str, Any]]:
    """What Plotly draws in a comparison graph now: per trace its run, kind, style, x."""
    return driver.execute_script(
        "const gd = document.getElementById(arguments[0]);"
        "const plot = gd && gd.querySelector('.js-plotly-plot');"
        "if (!plot || !plot.data) return [];"
        "return plot.data.map(t => ({run: t.meta, name: t.name, group: t.legendgroup,"
        "  title: (t.legendgrouptitle || {}).text, color: (t.line || {}).color,"
        "  dash: (t.line || {}).dash, x: Array.from(t.x || [])}));",
        graph_id,
    )


def visible_options(driver: WebDriver, dropdown_id: str) -> list[Any]:
    """The option elements of an open dropdown (rendered only while it is open)."""
    return driver.execute_script(
        "const w = document.getElementById(arguments[0]).closest('.dash-dropdown-wrapper');"
        "return Array.from(w.querySelectorAll('.dash-dropdown-option'));", dropdown_id)


def open_options(driver: WebDriver, dropdown_id: str) -> list[Any]:
    """Open a dropdown and return its options. A click that lands while the popover is
    still closing from the last one is lost: click again until it says it is open."""
    def opened(d: WebDriver) -> list[Any] | None:
        trigger = d.find_element(By.ID, dropdown_id)
        if trigger.get_attribute("aria-expanded") != "true":
            trigger.click()
            return None
        return visible_options(d, dropdown_id) or None

    return until(driver, opened, f"the options of {dropdown_id}", timeout=10)


def close_options(driver: WebDriver) -> None:
    ActionChains(driver).send_keys(Keys.ESCAPE).perform()
    until(driver, lambda d: not d.find_elements(By.CSS_SELECTOR, ".dash-dropdown-option"),
          "the dropdown to close", timeout=10)


def option_labels(driver: WebDriver, dropdown_id: str) -> list[str]:
    """The labels as rendered (HTML collapses the labels' double spaces)."""
    labels = [o.text for o in open_options(driver, dropdown_id)]
    close_options(driver)
    return labels


def pick(driver: WebDriver, dropdown_id: str, *label_starts: str) -> None:
    """Click the options whose labels start so (a multi-select stays open after a click)."""
    for start in label_starts:
        open_options(driver, dropdown_id)
        option = until(driver, lambda d, start=start: next(
            (o for o in visible_options(d, dropdown_id) if o.text.startswith(start)), None),
            f"the option {start!r} of {dropdown_id}", timeout=10)
        option.click()
        if driver.find_elements(By.CSS_SELECTOR, ".dash-dropdown-option"):
            close_options(driver)


def table_row(driver: WebDriver, run_id: int) -> str:
    return text(driver, f"#compare-table tr[data-run-id='{run_id}']")


# PostgreSQL only (the README's picture): the board's renames, tags and hides are written
# and read back on both back ends at the callback level (test_board_run_edit,
# test_board_compare), and the board in a browser on SQLite is test_browser_board's
# [sqlite] story and test_browser_long_names.
@pytest.mark.parametrize("backend", ["postgresql"])
def test_compare_rename_tag_and_hide_runs(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, browser: WebDriver  # noqa: F811
) -> None:
    db_url = request.getfixturevalue("postgres_url" if backend == "postgresql" else "sqlite_url")
    store = Store(db_url)
    baseline = finished_run(store, "baseline", range(10, 310, 10), BEST["baseline"], 0.0)
    lr_high = finished_run(store, "lr-high", range(10, 210, 10), BEST["lr-high"], 0.3)
    live = store.create_run("live-one", "tinycnn", "digits", {"device": "cpu"},
                            Hyperparameters(**DEFAULTS))
    scratch = finished_run(store, "scratch", range(10, 40, 10), None, 0.5)
    port = free_port()
    board_url = f"http://127.0.0.1:{port}/"
    board_log = tmp_path / "board.log"
    board_args = [sys.executable, str(ROOT / "board.py"), "--db", db_url, "--port", str(port)]
    try:
        with live_trainer(store, live), spawn(board_args, tmp_path, board_log) as board:
            wait_for_http(board_url, board, board_log)
            browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                                    {"source": RECORD_REQUESTS})
            browser.get(board_url)
            # The board watches the live run; nothing is compared yet, and nothing is
            # asked for the comparison, tick after tick.
            until(browser, lambda d: text(d, ".run-name") == "live-one",
                  f"the live run in the header; board log:\n{tail(board_log)}")
            time.sleep(SLOW_TICK + 1)
            assert overlay(browser, "compare-loss-graph") == []
            assert compare_requests(browser) == 0
            assert browser.execute_script("return window.__dashOutputs.length;") > 5

            # Two runs overlaid: one colour each, training solid, validation dashed.
            assert option_labels(browser, "compare-select")[0].startswith(f"#{live} live-one")
            pick(browser, "compare-select", f"#{baseline} baseline", f"#{lr_high} lr-high")
            until(browser, lambda d: len(overlay(d, "compare-loss-graph")) == 4,
                  "both runs on the loss overlay")
            for graph_id in ("compare-loss-graph", "compare-accuracy-graph"):
                traces = overlay(browser, graph_id)
                assert [t["run"] for t in traces] == [baseline, baseline, lr_high, lr_high]
                assert [(t["name"], t["dash"]) for t in traces] == [
                    ("train", "solid"), ("validation", "dash")] * 2
                assert traces[0]["color"] == traces[1]["color"] != traces[2]["color"]
                assert traces[2]["color"] == traces[3]["color"]
                assert traces[0]["group"] != traces[2]["group"]
                assert traces[0]["title"] == f"#{baseline} baseline"
                assert traces[0]["x"] == list(range(10, 310, 10))
                assert traces[2]["x"] == list(range(10, 210, 10))

            # The table: each run's best validation accuracy at its step.
            until(browser, lambda d: table_row(d, lr_high), "the comparison table")
            for run_id, name in ((baseline, "baseline"), (lr_high, "lr-high")):
                value, step = BEST[name]
                row = table_row(browser, run_id)
                assert name in row and "finished" in row and "tinycnn" in row
                assert f"{value:.2f} %\nstep {step}" in row, row
                assert "start: Adam, lr 3e-4" in row

            # Finished runs do not change: the slow tick asks nothing more about them.
            asked = compare_requests(browser)
            assert asked == 2  # one per choice
            time.sleep(SLOW_TICK + 1)
            assert compare_requests(browser) == asked

            # The live run joins, and its curve grows with the slow refresh.
            pick(browser, "compare-select", f"#{live} live-one")
            until(browser, lambda d: len(overlay(d, "compare-loss-graph")) == 6,
                  "the live run on the overlay")
            drawn = len(overlay(browser, "compare-loss-graph")[4]["x"])
            until(browser, lambda d: len(overlay(d, "compare-loss-graph")[4]["x"]) > drawn,
                  "the live run's curve to grow on the overlay", timeout=30)
            assert compare_requests(browser) > asked + 1  # the choice, then the ticks
            if backend == "postgresql":  # the README's picture
                until(browser, lambda d: table_row(d, live), "the live run in the table")
                save_section_screenshot(browser, "#compare", screenshot_path(SCREENSHOT, tmp_path))

            # Rename the watched run: the selector, the header, the overlay, the database.
            until(browser, lambda d: d.find_element(By.ID, "run-name-input")
                  .get_attribute("value") == "live-one", "the name field")
            type_into(browser, "run-name-input", "  renamed in the browser ")
            browser.find_element(By.ID, "rename-button").click()
            until(browser, lambda d: "Renamed to" in text(d, "#run-edit-message"),
                  "the rename message")
            assert store.get_run(live)["name"] == "renamed in the browser"
            until(browser, lambda d: text(d, ".run-name") == "renamed in the browser",
                  "the new name in the header")
            assert any(label.startswith(f"#{live} renamed in the browser ·")
                       for label in option_labels(browser, "run-select"))
            until(browser, lambda d: overlay(d, "compare-loss-graph")[4]["title"]
                  == f"#{live} renamed in the browser", "the new name in the legend")

            # An empty name is refused with a message; nothing is written.
            type_into(browser, "run-name-input", "   ")
            browser.find_element(By.ID, "rename-button").click()
            until(browser, lambda d: "cannot be empty" in text(d, "#run-edit-message"),
                  "the refusal")
            assert store.get_run(live)["name"] == "renamed in the browser"

            # Tag it: the tags show in the selector's label, the header and the table.
            type_into(browser, "run-tags-input", "lr-sweep, baseline, lr-sweep")
            browser.find_element(By.ID, "tags-button").click()
            until(browser, lambda d: "Tags: lr-sweep, baseline" in text(d, "#run-edit-message"),
                  "the tags message")
            assert store.get_run(live)["tags"] == ["lr-sweep", "baseline"]
            until(browser, lambda d: "[lr-sweep, baseline]" in text(d, "#run-select"),
                  "the tags in the selected run's label")
            until(browser, lambda d: "lr-sweep" in text(d, ".run-title"),
                  "the tags in the header")  # the header redraws on the next refresh
            until(browser, lambda d: "lr-sweep" in table_row(d, live), "the tags in the table")

            # Hide the scratch run: it stays while watched, leaves both lists after.
            pick(browser, "run-select", f"#{scratch} scratch")
            until(browser, lambda d: text(d, ".run-name") == "scratch", "the scratch run")
            until(browser, lambda d: text(d, "#hide-button") == "Hide run", "the hide button")
            browser.find_element(By.ID, "hide-button").click()
            until(browser, lambda d: text(d, "#hide-button") == "Unhide run", "unhide offered")
            assert store.get_run(scratch)["hidden"] is True
            until(browser, lambda d: "(hidden)" in text(d, "#run-select"),
                  "the watched hidden run to stay selected")
            pick(browser, "run-select", f"#{live} renamed")
            until(browser, lambda d: text(d, ".run-name") == "renamed in the browser",
                  "the renamed run watched again")
            until(browser, lambda d: not any(f"#{scratch} " in label for label in
                                             option_labels(d, "run-select")),
                  "the hidden run to leave the run selector")
            assert not any(f"#{scratch} " in label
                           for label in option_labels(browser, "compare-select"))

            # "show hidden" brings it back, marked.
            browser.find_element(By.CSS_SELECTOR, "#show-hidden input").click()
            until(browser, lambda d: any(label.startswith(f"#{scratch} scratch (hidden)")
                                         for label in option_labels(d, "run-select")),
                  "the hidden run listed again")
            assert any(f"#{scratch} scratch" in label
                       for label in option_labels(browser, "compare-select"))

            errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, errors
    finally:
        store.close()
