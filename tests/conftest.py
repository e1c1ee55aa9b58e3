"""Shared fixtures: every database test runs on SQLite and on a real PostgreSQL.

PostgreSQL comes from $TEST_POSTGRES_URL (default: the local server, trust auth).
Each test gets its own freshly created database, dropped afterwards. When the
server is unreachable the PostgreSQL cases are skipped, except under CI=true,
where a skipped PostgreSQL test is a failure.

The suite runs three tests at a time (`pytest -n 3`, pytest-xdist), and one of them,
test_outage, stops this machine's server for real. Every test on PostgreSQL therefore
holds a shared lock on the server for its whole run, and that one takes it exclusively
(`postgres_server.own()`), so no other test meets the outage it inflicts.

Every torch process of the suite, this one and the trainers it starts, uses one thread:
the test processes already share this machine's cores, and a torch process that spreads
its ops over all of them spin-waits while another holds them (a Hugging Face run took
70 s of CPU beside the suite, 14 s alone).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: see above
os.environ.setdefault("MKL_NUM_THREADS", "1")

from livetrain.db.store import Store, resolve_url  # after the thread count is set

ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
IN_CI = os.environ.get("CI", "").lower() == "true"
SERVER_LOCK = Path(tempfile.gettempdir()) / "livetrain-tests-postgres.lock"


class ServerLock:
    """A test's hold on the PostgreSQL server: shared by default, exclusive once `own()`
    is called (by a test that stops the server). flock's lock goes with the open file, so
    it is released when the test ends, or when its process dies."""

    def __init__(self) -> None:
        self.file = SERVER_LOCK.open("a")
        fcntl.flock(self.file, fcntl.LOCK_SH)

    def own(self) -> None:
        """Wait until no other test is on the server, then keep them off it."""
        fcntl.flock(self.file, fcntl.LOCK_EX)

    def release(self) -> None:
        self.file.close()


def _postgres_unavailable() -> str | None:
    lock = ServerLock()
    try:
        engine = create_engine(resolve_url(ADMIN_URL))
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        return f"PostgreSQL at {ADMIN_URL} is unreachable: {exc}"
    finally:
        lock.release()
    return None


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    reason = _postgres_unavailable()
    if reason:
        if IN_CI:
            pytest.fail(f"{reason} (CI=true: PostgreSQL tests may not be skipped)")
        pytest.skip(reason)
    return resolve_url(ADMIN_URL)


@pytest.fixture
def postgres_server(postgres_admin_url: str) -> Iterator[ServerLock]:
    """This test's (shared) hold on the server, for the whole test."""
    lock = ServerLock()
    yield lock
    lock.release()


@pytest.fixture
def postgres_url(postgres_server: ServerLock, postgres_admin_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database for this test."""
    name = f"clt_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = make_url(postgres_admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'training.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """The same test on both back ends."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    st = Store(db_url)
    yield st
    st.close()
