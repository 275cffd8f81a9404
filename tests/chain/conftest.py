"""A real anvil devnet (npm @foundry-rs/anvil) with TestUSDC deployed, per test module.

Without anvil (``make node_modules``) these tests skip on a laptop; with
``DRIP_REQUIRE_ALL=1`` (CI) a missing anvil is a failure.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

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


@pytest.fixture
def facilitator_url(
    chain: devnet.Devnet, sqlite_url: str, run_app: Callable[[object], str]
) -> Iterator[str]:
    """`drip facilitator` for the devnet (settling with the deployer's key)."""
    store = open_store(sqlite_url)
    try:
        yield run_app(create_app(build(chain.rpc_url, chain.accounts[0][1], ["eip155:31337"]),
                                 store))  # fmt: skip
    finally:
        store.close()
