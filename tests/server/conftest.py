"""A real ``drip serve`` app under uvicorn on 127.0.0.1 (the root ``run_app``), on each
store."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from drip.config import DripConfig
from drip.server import create_app

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
def server(store_url: str, run_app: Callable[[object], str]) -> Iterator[Server]:
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
    yield Server(run_app(app), admin, reader)
