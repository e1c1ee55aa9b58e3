"""Both PostgreSQL drivers: postgresql:// (psycopg 3) and postgresql+psycopg2:// (the
psycopg2-binary the design card names), against the real server.

The two differ where it matters here: psycopg2 delivers LISTEN/NOTIFY through poll()
and a list, psycopg 3 through a blocking generator.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import test_store as contract
from sqlalchemy import make_url

from livetrain.db.contract import DEFAULTS, Hyperparameters
from livetrain.db.store import Store, resolve_url
from tests.test_train_e2e import SqlClient, run_status, trainer, wait_for


def with_driver(url: str, driver: str) -> str:
    return make_url(url).set(drivername=f"postgresql+{driver}").render_as_string(
        hide_password=False)


@pytest.fixture
def psycopg2_store(postgres_url: str) -> Iterator[Store]:
    store = Store(with_driver(postgres_url, "psycopg2"))
    yield store
    store.close()


def test_urls_keep_the_driver_they_name(postgres_url: str) -> None:
    rest = postgres_url.split("://", 1)[1]
    assert resolve_url(f"postgresql+psycopg2://{rest}") == f"postgresql+psycopg2://{rest}"
    for url, driver in ((f"postgresql://{rest}", "psycopg"),
                        (f"postgresql+psycopg2://{rest}", "psycopg2")):
        store = Store(url)
        assert store.engine.dialect.driver == driver
        store.close()


# The store's contract tests that need nothing but a store: run again on psycopg2.
STORE_CONTRACT = [
    test for name, test in inspect.getmembers(contract, inspect.isfunction)
    if name.startswith("test_") and list(inspect.signature(test).parameters) == ["store"]
]


@pytest.mark.parametrize("check", STORE_CONTRACT, ids=lambda test: test.__name__[5:])
def test_the_store_contract_holds_on_psycopg2(psycopg2_store: Store,
                                               check: Callable[[Store], None]) -> None:
    assert psycopg2_store.engine.dialect.driver == "psycopg2"
    check(psycopg2_store)


def test_the_contract_list_is_not_empty() -> None:
    names = {test.__name__ for test in STORE_CONTRACT}
    assert {"test_write_batch_and_acknowledgement",
            "test_listener_hands_over_changes_from_any_client",
            "test_background_writer_writes_everything_and_heartbeats"} <= names


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_a_change_by_any_client_is_notified(postgres_url: str, driver: str) -> None:
    """The wait ends on NOTIFY for this run only, promptly, and not on its own."""
    store = Store(with_driver(postgres_url, driver))
    ours = store.create_run("ours", "smallcnn", "mnist5k", {}, Hyperparameters(**DEFAULTS))
    other = store.create_run("other", "smallcnn", "mnist5k", {}, Hyperparameters(**DEFAULTS))
    client = SqlClient(postgres_url)  # psycopg 3, as any third party
    try:
        with store.parameter_notifications(ours) as wait:
            assert not wait(0.3)
            client.execute("UPDATE parameters SET dropout = 10 WHERE run_id = ?", (other,))
            assert not wait(0.5)  # another run's change
            timer = threading.Timer(0.3, client.execute, (
                "UPDATE parameters SET learning_rate = 0.002 WHERE run_id = ?", (ours,)))
            started = time.monotonic()
            timer.start()
            assert wait(5)
            assert 0.25 <= time.monotonic() - started < 2
            assert not wait(0.3)  # told once
        timer.join()
    finally:
        client.close()
        store.close()


def test_a_trainer_on_a_psycopg2_url_applies_a_change(tmp_path: Path, postgres_url: str) -> None:
    url = with_driver(postgres_url, "psycopg2")
    with trainer(tmp_path, url) as proc:
        sql = wait_for("the database", lambda: SqlClient(postgres_url), timeout=30)
        run_id = wait_for("a logged step", lambda: sql.one(
            "SELECT run_id FROM statistics WHERE step > 0"), timeout=90)[0]
        sql.execute("UPDATE parameters SET learning_rate = 0.002 WHERE run_id = ?", (run_id,))
        wait_for("the change applied", lambda: sql.one(
            "SELECT applied_version FROM parameters WHERE run_id = ?", (run_id,))[0] == 2)
        wait_for("steps with the new learning rate", lambda: sql.one(
            "SELECT count(*) FROM statistics WHERE run_id = ? AND learning_rate = 0.002",
            (run_id,))[0] >= 2)
        sql.execute("UPDATE parameters SET stop_train = TRUE WHERE run_id = ?", (run_id,))
        assert proc.wait(timeout=60) == 0
    output = (tmp_path / "train.log").read_text()
    assert "database postgresql+psycopg2://" in output and "Traceback" not in output
    assert run_status(sql, run_id) == "stopped"
    applied = [m for (m,) in sql.rows(
        "SELECT message FROM events WHERE code = 'parameters_applied' ORDER BY event_id")]
    assert applied[0].startswith("version 2 applied at step ")
    assert "learning_rate 0.0003 -> 0.002" in applied[0]
    sql.close()
