"""A real anvil devnet (npm @foundry-rs/anvil) with TestUSDC deployed, per test module.

Without anvil (``make node_modules``) these tests skip on a laptop; with
``DRIP_REQUIRE_ALL=1`` (CI) a missing anvil is a failure.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from drip import errors
from drip.chain import devnet
from drip.ledger import open_store
from drip.x402.facilitator import build, create_app


@pytest.fixture(scope="module")
def chain() -> Iterator[devnet.Devnet]:
    try:
        devnet.anvil_binary()
    except errors.ConfigError as exc:
        if os.environ.get("DRIP_REQUIRE_ALL") == "1":
            pytest.fail(f"DRIP_REQUIRE_ALL=1 but {exc.message}")
        pytest.skip(f"{exc.message} (DRIP_REQUIRE_ALL=1 fails)")
    net = devnet.start()
    try:
        yield net
    finally:
        net.stop()


def serve(app: object) -> tuple[str, uvicorn.Server, threading.Thread]:
    """Run an ASGI app under uvicorn on a free 127.0.0.1 port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    return f"http://127.0.0.1:{port}", server, thread


@pytest.fixture
def facilitator_url(chain: devnet.Devnet, sqlite_url: str) -> Iterator[str]:
    """`drip facilitator` for the devnet (settling with the deployer's key)."""
    store = open_store(sqlite_url)
    app = create_app(build(chain.rpc_url, chain.accounts[0][1], ["eip155:31337"]), store)
    url, server, thread = serve(app)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(20)
        store.close()


@pytest.fixture
def run_app() -> Iterator[object]:
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
