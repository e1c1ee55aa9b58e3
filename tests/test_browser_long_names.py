"""A 100 KB run name written by SQL, in headless Chromium (issue 11): the page loads in
its normal time, stays responsive, and shows the name cut short with the text on hover,
in the header, the run selector and the comparison (table and legend).

Uses test_browser_board's driver setup (fresh profile, --no-sandbox --disable-gpu
--disable-dev-shm-usage); a failure, not a skip, under CI=true without Chromium.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from selenium.webdriver.remote.webdriver import WebDriver
from test_browser_board import (  # noqa: F401 - browser is a fixture
    ROOT,
    browser,
    free_port,
    spawn,
    text,
    until,
    wait_for_http,
)
from test_browser_compare import BEST, finished_run, overlay, pick, table_row

from livetrain.board.display import NAME_SHOWN, TITLE_MAX
from livetrain.db.store import Store

HUGE = "N" * 100_000  # unbroken: no place for the browser to wrap it
LONG = "W" * 10_000
LOAD_BUDGET = 20.0  # seconds from navigation to the header drawn; a normal load takes ~2
# Installed before the page loads: the size of every callback request the page sends.
RECORD_SIZES = """
window.__bodySizes = [];
const realFetch = window.fetch;
window.fetch = function (url, options) {
  if (String(url).includes('_dash-update-component') && options && options.body) {
    window.__bodySizes.push(options.body.length);
  }
  return realFetch.apply(this, arguments);
};
"""


# SQLite only: the name reaches the board through the same queries on both back ends, and
# PostgreSQL's board in a browser is test_browser_compare and test_browser_board's
# [postgresql] story; a 100 kB name written by SQL is shown truncated on both back ends in
# test_board_inputs' test_a_huge_name_written_by_sql_is_shown_truncated_with_the_full_text_on_hover.
@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_100kb_run_name_does_not_hang_the_board(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, browser: WebDriver  # noqa: F811
) -> None:
    db_url = request.getfixturevalue("postgres_url" if backend == "postgresql" else "sqlite_url")
    store = Store(db_url)
    long_id = finished_run(store, "long", range(0, 300, 10), BEST["baseline"], 0.0)
    huge_id = finished_run(store, "huge", range(0, 300, 10), BEST["lr-high"], 0.1)
    # as any SQL client could: past the Store's limits
    store._update_run(long_id, name=LONG)
    store._update_run(huge_id, name=HUGE, tags=["T" * 10_000, "ok"])
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = tmp_path / "board.log"
    with spawn([sys.executable, str(ROOT / "board.py"), "--db", db_url, "--port", str(port)],
               tmp_path, log) as board:
        wait_for_http(url, board, log)
        browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                                {"source": RECORD_SIZES})
        started = time.monotonic()
        browser.get(url)
        cut = "N" * (NAME_SHOWN - 1) + "…"
        until(browser, lambda d: text(d, ".run-name") == cut, "the header's cut name",
              timeout=LOAD_BUDGET)
        assert time.monotonic() - started < LOAD_BUDGET
        browser.set_script_timeout(5)  # a hung page would not answer a script
        assert browser.execute_async_script("arguments[0](1);") == 1

        title = browser.execute_script(  # one step: the header may re-render meanwhile
            "return document.querySelector('.run-name').title;")
        assert title == "N" * (TITLE_MAX - 1) + "…"
        selector = text(browser, "#run-select")
        assert cut in selector and len(selector) < 4 * NAME_SHOWN
        tags = browser.execute_script(
            "return Array.from(document.querySelectorAll('.run-title .tag'))"
            ".map(t => [t.innerText, t.title]);")
        assert [len(shown) <= 40 for shown, _ in tags] == [True, True]
        assert tags[0][1].startswith("T" * 39)
        # nothing runs off the page's width
        assert browser.execute_script(
            "return document.documentElement.scrollWidth <= "
            "document.documentElement.clientWidth + 1;")

        pick(browser, "compare-select", f"#{huge_id} ", f"#{long_id} ")
        until(browser, lambda d: "W" * (NAME_SHOWN - 1) + "…" in table_row(d, long_id),
              "the comparison's row of the 10,000-character name", timeout=LOAD_BUDGET)
        until(browser, lambda d: cut in table_row(d, huge_id),
              "the comparison's row of the 100 KB name", timeout=LOAD_BUDGET)
        assert len(table_row(browser, huge_id)) < 2000
        legend = [trace["title"] or trace["name"] or "" for trace in
                  overlay(browser, "compare-loss-graph")]
        assert legend and max(map(len, legend)) < 4 * NAME_SHOWN, legend
        assert browser.execute_script("return document.body.innerText.length;") < 20_000
        assert browser.execute_async_script("arguments[0](2);") == 2
        # the page holds names bounded too: no request carries the 100 KB back
        sizes = browser.execute_script("return window.__bodySizes;")
        assert len(sizes) > 10 and max(sizes) < 64 * 1024, max(sizes)
    store.close()
