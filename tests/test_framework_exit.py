"""An error that ends the process inside a framework's loop still ends the run `failed`,
with the error's message and its last rows: transformers gives callbacks no exception
hook, so the callback's run closes itself when the process exits (issue 14)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from livetrain.db.store import Store

CRASH = Path(__file__).with_name("hf_crash_run.py")


# PostgreSQL only: the run closes itself through the same store on both back ends; a run
# failed by an exception on SQLite is test_livetrain_api's
# test_an_exception_fails_the_run_and_propagates.
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_an_uncaught_error_inside_trainer_train_fails_the_run(
    tmp_path: Path, db_url: str
) -> None:
    done = subprocess.run([sys.executable, str(CRASH), db_url, str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode != 0
    assert "sample 300 cannot be read" in done.stderr
    store = Store(db_url)
    try:
        (run,) = store.list_runs()
        events = store.events(run["run_id"])
        logged = store.statistics(run["run_id"])
    finally:
        store.close()
    assert run["status"] == "failed"
    failed = [e for e in events if e["code"] == "run_failed"]
    assert len(failed) == 1
    assert "sample 300 cannot be read" in failed[0]["message"]
    assert logged and logged[-1]["step"] >= 5  # the rows before the error were written
