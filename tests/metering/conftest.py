"""The metering tests' client, on each store."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from drip import DripClient, DripConfig


@pytest.fixture
def client(store_url: str) -> Iterator[DripClient]:
    c = DripClient(DripConfig(database_url=store_url))
    try:
        yield c
    finally:
        c.close()
