"""A real ``drip serve`` app under uvicorn on 127.0.0.1, on each store."""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from drip.config import DripConfig
from drip.server import create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


STRIPE_SECRET = "whsec_test_stripe_secret_for_drip"
STANDARD_SECRET = "whsec_" + base64.b64encode(b"drip standard webhook secret!!").decode()


@dataclass
class Server:
    url: str
    admin: str
    reader: str
    stripe_secret: str = STRIPE_SECRET
    standard_secret: str = STANDARD_SECRET

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture
def server(store_url: str) -> Iterator[Server]:
    app = create_app(
        DripConfig(
            database_url=store_url,
            stripe_webhook_secret=STRIPE_SECRET,
            webhook_secret=STANDARD_SECRET,
        )
    )
    keys = app.state.keys
    admin, _ = keys.create("admin", "tests")
    reader, _ = keys.create("read", "tests")
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield Server(f"http://127.0.0.1:{port}", admin, reader)
    finally:
        uv.should_exit = True
        thread.join(20)
