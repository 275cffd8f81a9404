"""Budgeted sessions: one linked hold on session and wallet, policies, close, expiry."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest

from drip import DripClient, DripConfig, errors
from drip.metering.sessions import session_account_id


@pytest.fixture
async def client(store_url: str) -> AsyncIterator[DripClient]:
    c = DripClient(DripConfig(database_url=store_url, provider="api.example.com"))
    await c.provision_user("u", initial_balance="1.00")
    try:
        yield c
    finally:
        c.close()


def metered(client: DripClient, cost: str = "0.01", event: str = "search"):  # type: ignore[no-untyped-def]
    ran: list[str] = []

    @client.meter(cost=cost, event=event, session_param="session")
    async def call(q: str, session: str) -> str:
        ran.append(q)
        return q

    return call, ran


async def test_calls_spend_the_session_and_the_wallet_exactly(client: DripClient) -> None:
    session = await client.create_session("u", "api.example.com", "0.05")
    assert session.id.startswith("ds_") and session.budget == Decimal("0.05")
    call, ran = metered(client)
    for i in range(5):
        await call(str(i), session=session.id)
    with pytest.raises(errors.SessionBudgetExhausted) as info:
        await call("6", session=session.id)
    assert info.value.status == 402
    assert ran == ["0", "1", "2", "3", "4"]  # the refused call never ran
    state = client.sync.get_session(session.id)
    assert (state["spent"], state["pending"], state["remaining"]) == (50_000, 0, 0)
    assert (await client.get_user("u"))["balance_usdc"] == Decimal("0.95")
    assert client.sync.get_session(session.public_id) == state
    assert client.ledger.check_invariants().ok


async def test_a_sessions_facts_are_read_once_per_process_off_the_loop(
    client: DripClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = await client.create_session("u", "api.example.com", "0.05")
    fresh = DripClient(DripConfig(database_url=client.config.database_url,
                                  provider="api.example.com"))  # fmt: skip
    reads: list[object] = []
    real = fresh.ledger.off_loop

    async def off_loop(fn, *args):  # type: ignore[no-untyped-def]
        reads.append(getattr(fn, "__name__", fn))
        return await real(fn, *args)

    monkeypatch.setattr(fresh.ledger, "off_loop", off_loop)
    try:
        call, ran = metered(fresh)
        for q in ("a", "b", "c"):
            await call(q, session=session.id)
        with pytest.raises(errors.SessionNotFound):
            await call("d", session="ds_" + "x" * 43)
    finally:
        fresh.close()
    assert ran == ["a", "b", "c"]
    assert reads == ["session_info", "session_info"]  # once per session, in off_loop


async def test_the_wallet_still_limits_a_generous_session(client: DripClient) -> None:
    session = await client.create_session("u", "api.example.com", "100")
    call, ran = metered(client, cost="0.30")
    for _ in range(3):
        await call("x", session=session.id)
    with pytest.raises(errors.DripInsufficientCredits) as info:
        await call("y", session=session.id)
    assert not isinstance(info.value, errors.SessionBudgetExhausted)
    assert len(ran) == 3
    assert client.sync.get_session(session.id)["spent"] == 900_000
    assert client.ledger.check_invariants().ok


async def test_failures_release_both_holds(client: DripClient) -> None:
    session = await client.create_session("u", "api.example.com", "0.05")

    @client.meter(cost="0.04", event="flaky", session_param="session")
    async def flaky(session: str) -> None:
        raise RuntimeError("upstream failed")

    with pytest.raises(RuntimeError):
        await flaky(session=session.id)
    state = client.sync.get_session(session.id)
    assert (state["spent"], state["pending"], state["remaining"]) == (0, 0, 50_000)
    assert (await client.get_user("u"))["pending_usdc"] == 0


async def test_dynamic_cost_captures_the_same_on_both(client: DripClient) -> None:
    session = await client.create_session("u", "api.example.com", "0.50")

    @client.meter(cost=lambda r: r, max_cost="0.20", event="llm", session_param="session")
    async def llm(session: str) -> str:
        return "0.0123"

    await llm(session=session.id)
    assert client.sync.get_session(session.id)["spent"] == 12_300
    assert (await client.get_user("u"))["posted_usdc"] == Decimal("0.9877")


async def test_concurrent_calls_never_exceed_the_budget(client: DripClient) -> None:
    session = await client.create_session("u", "api.example.com", "0.07")
    call, ran = metered(client)
    results = await asyncio.gather(
        *(call(str(i), session=session.id) for i in range(20)), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, errors.SessionBudgetExhausted)]
    assert len(ran) == 7 and len(refused) == 13
    assert client.sync.get_session(session.id)["spent"] == 70_000
    assert (await client.get_user("u"))["balance_usdc"] == Decimal("0.93")


def test_sync_threads_share_one_session(store_url: str) -> None:
    client = DripClient(DripConfig(database_url=store_url, provider="p"))
    try:
        client.sync.provision_user("t", initial_balance="1")
        session = client.sync.create_session("t", "p", "0.10")
        ok: list[int] = []

        @client.meter(cost="0.003", event="x", session_param="session")
        def call(session: str) -> int:
            return 1

        def worker() -> None:
            for _ in range(10):
                with contextlib.suppress(errors.SessionBudgetExhausted):
                    ok.append(call(session=session.id))

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(ok) == 33  # floor(0.10 / 0.003)
        assert client.sync.get_session(session.id)["spent"] == 99_000
        assert client.ledger.check_invariants().ok
    finally:
        client.close()


async def test_policies_are_named_when_they_refuse(client: DripClient) -> None:
    session = await client.create_session(
        "u", "api.example.com", "1",
        policy={"max_per_call": "0.05", "allow_events": ["search", "llm_*"],
                "deny_events": ["llm_big"]},
    )  # fmt: skip
    search, _ = metered(client, cost="0.01", event="search")
    await search("ok", session=session.id)
    cases = [
        (metered(client, cost="0.06", event="search")[0], "max_per_call"),
        (metered(client, cost="0.01", event="scrape")[0], "allow_events"),
        (metered(client, cost="0.01", event="llm_big")[0], "deny_events"),
    ]
    for call, rule in cases:
        with pytest.raises(errors.PolicyViolation) as info:
            await call("no", session=session.id)
        assert info.value.status == 403 and info.value.details["policy"] == rule
    await metered(client, cost="0.01", event="llm_small")[0]("ok", session=session.id)
    assert client.sync.get_session(session.id)["spent"] == 20_000


async def test_sessions_for_another_provider_are_refused(client: DripClient) -> None:
    session = await client.create_session("u", "someone-else.example", "1")
    call, ran = metered(client)
    with pytest.raises(errors.PolicyViolation) as info:
        await call("x", session=session.id)
    assert info.value.details["policy"] == "provider" and not ran


async def test_closed_and_expired_sessions_refuse_new_calls(client: DripClient) -> None:
    call, ran = metered(client)
    closing = await client.create_session("u", "api.example.com", "1")
    await call("a", session=closing.id)
    state = await client.close_session(closing.id)
    assert state["status"] == "closed" and state["remaining"] == 0
    with pytest.raises(errors.SessionClosed):
        await call("b", session=closing.id)
    expiring = await client.create_session("u", "api.example.com", "1", expires_in=0.05)
    await asyncio.sleep(0.1)
    with pytest.raises(errors.SessionExpired):
        await call("c", session=expiring.id)
    assert client.sync.get_session(expiring.id)["status"] == "expired"
    assert ran == ["a"]
    assert (await client.get_user("u"))["balance_usdc"] == Decimal("0.99")


async def test_bad_sessions_and_arguments(client: DripClient) -> None:
    call, ran = metered(client)
    for token in ("", "nope", "ds_short", "ds_" + "a" * 43):
        with pytest.raises(errors.SessionNotFound):
            await call("x", session=token)
    bad = [
        ({"budget": "-1"}, errors.InvalidAmount),
        ({"budget": "0"}, errors.InvalidAmount),
        ({"budget": "0.0000001"}, errors.InvalidAmount),
        ({"expires_in": -5}, errors.InvalidRequest),
        ({"policy": {"per_minute": "1"}}, errors.InvalidRequest),
        ({"policy": {"max_per_call": "abc"}}, errors.InvalidAmount),
        ({"user_id": "ghost"}, errors.UserNotFound),
        ({"provider": "bad provider"}, errors.InvalidId),
    ]
    for change, error in bad:
        args = {"user_id": "u", "provider": "api.example.com", "budget": "1"} | change
        with pytest.raises(error):
            await client.create_session(**args)  # type: ignore[arg-type]
    assert not ran
    assert client.ledger.list_accounts("session") == []


def test_only_the_token_digest_is_stored(store_url: str) -> None:
    client = DripClient(DripConfig(database_url=store_url))
    try:
        client.sync.provision_user("v", initial_balance="1")
        session = client.sync.create_session("v", "default", "1")
        account = client.ledger.account(session_account_id(session.id))
        assert session.id not in account.id and session.id not in (account.metadata or "")
        assert session.id[3:] not in str(client.ledger.store.query("SELECT * FROM accounts"))
    finally:
        client.close()
