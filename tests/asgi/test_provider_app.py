"""The example provider app (examples/provider_app.py) behind real uvicorn, on each store:
the middleware holds before the handler, captures after it, voids on errors."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from drip.metering.http import DripSessionAuth

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from provider_app import PROVIDER, build


class Provider:
    def __init__(self, url: str, client: Any, ran: dict[str, int]) -> None:
        self.url, self.client, self.ran = url, client, ran

    def session(self, budget: str = "1", **kw: Any) -> str:
        return str(self.client.sync.create_session("buyer", PROVIDER, budget, **kw).id)

    def http(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30,
                            auth=DripSessionAuth(token) if token else None)  # fmt: skip


@pytest.fixture
def provider(store_url: str, run_app: Callable[[object], str]) -> Iterator[Provider]:
    app, client, ran = build(store_url, token_delay_s=0.02)
    client.sync.provision_user("buyer", initial_balance="1.00")
    try:
        yield Provider(run_app(app), client, ran)
    finally:
        client.close()


def spent(p: Provider, token: str) -> int:
    return int(p.client.sync.get_session(token)["spent"])


def test_a_paid_call_carries_its_charge(provider: Provider) -> None:
    token = provider.session()
    with provider.http(token) as http:
        r = http.get("/search", params={"q": "agents"})
    assert r.status_code == 200 and r.json()["query"] == "agents"
    assert r.headers["x-drip-charged"] == "0.007"
    assert Decimal(r.headers["x-drip-balance"]) == Decimal("0.993")
    receipt = provider.client.ledger.get_transfer(r.headers["x-drip-receipt"])
    assert receipt is not None and receipt.amount == 7_000 and receipt.code == "search"
    assert spent(provider, token) == 7_000
    assert provider.client.ledger.check_invariants().ok


def test_the_balance_header_is_the_captures_and_reads_nothing_on_the_loop(
    provider: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    led = provider.client.ledger
    reads: list[str] = []
    real = led.balance
    monkeypatch.setattr(led, "balance", lambda account: reads.append(account) or real(account))
    token = provider.session()
    with provider.http(token) as http:
        first = http.get("/search", params={"q": "a"})
        provider.client.sync.topup("buyer", "0.5")  # another writer, between two calls
        second = http.get("/search", params={"q": "b"})
    assert Decimal(first.headers["x-drip-balance"]) == Decimal("0.993")
    assert Decimal(second.headers["x-drip-balance"]) == Decimal("1.486")
    assert reads == []  # from the ledger's memory of its own capture: no blocking read
    # memory that does not know the wallet: the header is read (on PostgreSQL, off the loop)
    monkeypatch.setattr(led, "remembered_balance", lambda account: None)
    with provider.http(token) as http:
        third = http.get("/search", params={"q": "c"})
    assert Decimal(third.headers["x-drip-balance"]) == Decimal("1.479")
    assert reads == ["user:buyer"]


def test_no_session_or_no_money_means_402_and_the_handler_never_runs(
    provider: Provider,
) -> None:
    with provider.http() as http:
        r = http.get("/search", params={"q": "x"})
    assert r.status_code == 402
    assert r.json()["error"]["param"] == "X-Drip-Session"
    token = provider.session(budget="0.01")
    with provider.http(token) as http:
        assert http.get("/search", params={"q": "a"}).status_code == 200
        r = http.get("/search", params={"q": "b"})
    assert r.status_code == 402 and r.json()["error"]["code"] == "session_budget_exhausted"
    with provider.http("ds_" + "z" * 43) as http:
        assert http.get("/search", params={"q": "c"}).json()["error"]["code"] == (
            "session_not_found"
        )
    assert provider.ran["search"] == 1


def test_an_error_status_voids_the_hold(provider: Provider) -> None:
    token = provider.session()
    with provider.http(token) as http:
        r = http.get("/broken")
    assert r.status_code == 503 and r.headers["x-drip-charged"] == "0"
    assert provider.ran["broken"] == 1
    assert spent(provider, token) == 0
    assert provider.client.sync.get_session(token)["pending"] == 0


def test_a_stream_is_charged_per_unit_when_it_ends(provider: Provider) -> None:
    token = provider.session()
    with provider.http(token) as http:
        r = http.get("/generate", params={"n": 12})
    assert r.status_code == 200 and r.text.count("token") == 12
    assert r.headers["x-drip-max-charge"] == "0.1"
    assert spent(provider, token) == 12 * 1_000
    receipt = provider.client.ledger.get_transfer(r.headers["x-drip-receipt"])
    assert receipt is not None and receipt.amount == 12_000


def test_a_client_that_leaves_mid_stream_pays_for_what_was_sent(provider: Provider) -> None:
    token = provider.session()
    with provider.http(token) as http, http.stream("GET", "/generate", params={"n": 80}) as r:
        assert r.status_code == 200
        for chunks, _ in enumerate(r.iter_raw(), start=1):
            if chunks == 5:
                break  # hang up
    deadline = time.monotonic() + 10
    while provider.client.sync.get_session(token)["pending"] and time.monotonic() < deadline:
        time.sleep(0.05)
    charged = spent(provider, token)
    assert provider.client.sync.get_session(token)["pending"] == 0
    assert 5_000 <= charged < 80_000 and charged % 1_000 == 0  # never $0, never the max
    assert provider.client.ledger.check_invariants().ok


def test_policies_and_free_routes(provider: Provider) -> None:
    token = provider.session(policy={"max_per_call": "0.05"})
    with provider.http(token) as http:
        r = http.get("/generate")  # holds up to 0.1
        assert r.status_code == 403 and r.json()["error"]["code"] == "policy_violation"
        free = http.get("/health")
    assert free.status_code == 200 and "x-drip-charged" not in free.headers
    assert provider.ran["generate"] == 0 and spent(provider, token) == 0


def test_a_rolling_window_answers_429_with_retry_after(provider: Provider) -> None:
    token = provider.session(policy={"windows": [{"per": "minute", "max_calls": 2}]})
    with provider.http(token) as http:
        assert http.get("/search", params={"q": "1"}).status_code == 200
        assert http.get("/search", params={"q": "2"}).status_code == 200
        r = http.get("/search", params={"q": "3"})
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert provider.ran["search"] == 2 and spent(provider, token) == 14_000
