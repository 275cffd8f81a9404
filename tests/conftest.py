"""Shared fixtures that start real things: a SQLite file, a PostgreSQL schema, ASGI apps
under uvicorn on 127.0.0.1.

PostgreSQL tests use ``DRIP_TEST_POSTGRES_DSN`` (``make test`` starts the server and
sets it). Without it they skip on a laptop; with ``DRIP_REQUIRE_ALL=1`` (CI) a missing
PostgreSQL fails the run instead.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import quote

import pytest
import uvicorn

import drip.chain._libs  # noqa: F401 - first: the chain libraries keep the recursion limit
from drip.ledger import Ledger, open_ledger

POSTGRES_DSN = os.environ.get("DRIP_TEST_POSTGRES_DSN", "")
REQUIRE_ALL = os.environ.get("DRIP_REQUIRE_ALL") == "1"
STORES = ["sqlite", "postgres"]


def need_postgres() -> str:
    """The DSN, or skip (fail under DRIP_REQUIRE_ALL=1) when PostgreSQL is not configured."""
    if not POSTGRES_DSN:
        if REQUIRE_ALL:
            pytest.fail("DRIP_REQUIRE_ALL=1 but DRIP_TEST_POSTGRES_DSN is not set")
        pytest.skip("no PostgreSQL: set DRIP_TEST_POSTGRES_DSN (DRIP_REQUIRE_ALL=1 fails)")
    return POSTGRES_DSN


def _with_search_path(dsn: str, schema: str) -> str:
    sep = "&" if "?" in dsn else "?"
    return f"{dsn}{sep}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A DSN whose search_path is a fresh, empty schema (dropped afterwards)."""
    import psycopg

    dsn = need_postgres()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}".encode())
    try:
        yield _with_search_path(dsn, schema)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE".encode())


@pytest.fixture
def sqlite_url(tmp_path: object) -> str:
    return f"sqlite:///{tmp_path}/drip.db"


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest) -> str:
    """The database URL of each store in turn: the same test runs on both."""
    name = "postgres_url" if request.param == "postgres" else "sqlite_url"
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture
def ledger(store_url: str) -> Iterator[Ledger]:
    led = open_ledger(store_url)
    try:
        yield led
    finally:
        led.close()


def serve(app: object) -> tuple[str, uvicorn.Server, threading.Thread]:
    """Run an ASGI app under uvicorn on a free 127.0.0.1 port; returns once it listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server, thread


@pytest.fixture
def run_app() -> Iterator[Callable[[object], str]]:
    """Start ASGI apps under uvicorn (stopped at teardown); returns each one's base URL."""
    started: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(app: object) -> str:
        url, server, thread = serve(app)
        started.append((server, thread))
        return url

    yield start
    for server, thread in started:
        server.should_exit = True
        thread.join(20)
