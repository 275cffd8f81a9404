"""Rolling windows and route budgets in session policies, checked with the hold."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from drip import DripClient, DripConfig, errors
from drip.ledger import open_ledger


@pytest.fixture
async def client(store_url: str) -> AsyncIterator[DripClient]:
    c = DripClient(DripConfig(database_url=store_url))
    await c.provision_user("w", initial_balance="10")
    try:
        yield c
    finally:
        c.close()


def meter(client: DripClient, event: str, cost: str = "0.01"):  # type: ignore[no-untyped-def]
    @client.meter(cost=cost, event=event, session_param="session")
    async def call(session: str) -> str:
        return event

    return call


async def test_calls_per_window_are_capped_then_allowed_again(client: DripClient) -> None:
    session = await client.create_session(
        "w", "default", "5", policy={"windows": [{"per": 2, "max_calls": 3}]}
    )
    call = meter(client, "search")
    for _ in range(3):
        await call(session=session.id)
    with pytest.raises(errors.RateLimited) as info:
        await call(session=session.id)
    assert info.value.status == 429
    assert 1 <= info.value.details["retry_after_s"] <= 2
    assert info.value.details["policy"] == "window_2s"
    await asyncio.sleep(2.1)
    await call(session=session.id)  # the window rolled
    assert client.sync.get_session(session.id)["spent"] == 40_000


async def test_amount_per_window_counts_open_holds_not_voided_ones(client: DripClient) -> None:
    session = await client.create_session(
        "w", "default", "5", policy={"windows": [{"per": "minute", "max_amount": "0.05"}]}
    )
    ok = meter(client, "search", cost="0.02")

    @client.meter(cost="0.02", event="flaky", session_param="session")
    async def flaky(session: str) -> None:
        raise RuntimeError("failed")

    with pytest.raises(RuntimeError):
        await flaky(session=session.id)  # voided: does not count
    await ok(session=session.id)
    await ok(session=session.id)
    with pytest.raises(errors.RateLimited):
        await ok(session=session.id)  # 0.06 > 0.05 in a minute
    assert client.sync.get_session(session.id)["spent"] == 40_000
    # concurrent calls cannot slip past the window together
    results = await asyncio.gather(*(meter(client, "x", "0.004")(session=session.id)
                                     for _ in range(10)), return_exceptions=True)  # fmt: skip
    assert sum(1 for r in results if r == "x") == 2  # 0.04 + 2 * 0.004 <= 0.05
    assert all(isinstance(r, errors.RateLimited) for r in results if r != "x")
    assert client.ledger.check_invariants().ok


async def test_route_budgets_inside_the_session(client: DripClient) -> None:
    session = await client.create_session(
        "w", "default", "1", policy={"routes": {"llm_*": {"budget": "0.03"}}}
    )
    llm = meter(client, "llm_chat")
    search = meter(client, "search")
    for _ in range(3):
        await llm(session=session.id)
    with pytest.raises(errors.SessionBudgetExhausted) as info:
        await llm(session=session.id)
    assert "llm_*" in info.value.message
    for _ in range(5):
        await search(session=session.id)  # other events still have the session's budget
    assert client.sync.get_session(session.id)["spent"] == 80_000
    assert client.ledger.check_invariants().ok


async def test_bad_window_and_route_rules(client: DripClient) -> None:
    bad = [
        {"windows": [{"per": "fortnight", "max_calls": 1}]},
        {"windows": [{"per": 60}]},
        {"windows": [{"per": 60, "max_calls": 0}]},
        {"windows": [{"per": 60, "max_amount": "-1"}]},
        {"windows": "often"},
        {"routes": {"llm_*": {"budget": "0"}}},
        {"routes": {"llm_*": 5}},
        {"routes": ["llm_*"]},
    ]
    for policy in bad:
        with pytest.raises((errors.InvalidRequest, errors.InvalidAmount)):
            await client.create_session("w", "default", "1", policy=policy)
    assert client.ledger.list_accounts("session") == []


def test_windows_survive_restart(store_url: str) -> None:
    """The window is summed from the journal, not from memory: a new client sees it."""
    first = DripClient(DripConfig(database_url=store_url))
    first.sync.provision_user("r", initial_balance="1")
    session = first.sync.create_session(
        "r", "default", "1", policy={"windows": [{"per": "hour", "max_calls": 2}]}
    )

    def call_with(client: DripClient) -> None:
        @client.meter(cost="0.01", event="e", session_param="session")
        def call(session: str) -> None:
            return None

        call(session=session.id)

    call_with(first)
    first.close()
    second = DripClient(DripConfig(database_url=store_url))
    try:
        call_with(second)
        started = time.monotonic()
        with pytest.raises(errors.RateLimited) as info:
            call_with(second)
        assert info.value.details["retry_after_s"] > 3500
        assert time.monotonic() - started < 30
    finally:
        second.close()


async def test_route_budgets_follow_their_patterns_in_any_order(client: DripClient) -> None:
    """Patterns not given in sorted order: each draws on its own budget (the stored policy
    comes back sorted, and so are the route accounts)."""
    session = await client.create_session(
        "w", "default", "1",
        policy={"routes": {"search": {"budget": "0.50"}, "llm_*": {"budget": "0.03"}}},
    )  # fmt: skip
    llm = meter(client, "llm_chat")
    for _ in range(3):
        await llm(session=session.id)
    with pytest.raises(errors.SessionBudgetExhausted) as info:
        await llm(session=session.id)
    assert "'llm_*'" in info.value.message
    search = meter(client, "search", cost="0.10")
    for _ in range(5):
        await search(session=session.id)
    with pytest.raises(errors.SessionBudgetExhausted) as info:
        await search(session=session.id)
    assert "'search'" in info.value.message
    assert client.sync.get_session(session.id)["spent"] == 530_000
    fresh = DripClient(DripConfig(database_url=client.config.database_url))
    try:  # another process reads the policy back from the ledger
        with pytest.raises(errors.SessionBudgetExhausted):
            await meter(fresh, "llm_other")(session=session.id)
    finally:
        fresh.close()


async def test_refusals_no_wait_can_cure_are_not_rate_limits(client: DripClient) -> None:
    """A closed session, an exhausted budget, or a call bigger than a window's amount is
    refused as such, never as a 429 inviting retries that cannot pass."""
    policy = {"windows": [{"per": "hour", "max_calls": 1}, {"per": 60, "max_amount": "0.05"}]}
    session = await client.create_session("w", "default", "0.02", policy=policy)
    call = meter(client, "search")
    await call(session=session.id)
    with pytest.raises(errors.RateLimited):
        await call(session=session.id)  # the hour's one call is used: a wait does cure it
    await client.close_session(session.id)
    with pytest.raises(errors.SessionClosed):
        await call(session=session.id)
    spent = await client.create_session("w", "default", "0.01", policy=policy)
    await call(session=spent.id)
    with pytest.raises(errors.SessionBudgetExhausted):
        await call(session=spent.id)
    big = await client.create_session("w", "default", "1", policy=policy)
    with pytest.raises(errors.PolicyViolation) as info:
        await meter(client, "llm", cost="0.06")(session=big.id)
    assert not isinstance(info.value, errors.RateLimited)
    assert info.value.status == 403 and info.value.details["policy"] == "window_60s"
    assert client.sync.get_session(big.id)["spent"] == 0
    assert client.ledger.check_invariants().ok


async def test_each_session_has_its_own_budget_source(client: DripClient) -> None:
    """No counter shared by every session: budgets near the ledger's largest amount do
    not add up to an overflow that blocks the next session."""
    for _ in range(3):
        await client.create_session("w", "default", "9000000000000")
    session = await client.create_session("w", "default", "0.05")
    await meter(client, "search")(session=session.id)
    assert client.sync.get_session(session.id)["spent"] == 10_000
    assert client.ledger.check_invariants().ok


def test_sessions_opened_before_routes_were_sorted_keep_their_budgets(store_url: str) -> None:
    """Before the fix, route accounts were created in the order the caller wrote the
    patterns while the stored policy reads back sorted: such a session (no own budget
    source) has each pattern matched to the account funded with its budget."""
    import dataclasses

    from drip.ledger import AccountKind
    from drip.metering.sessions import Policy, budget_account_id, session_specs

    client = DripClient(DripConfig(database_url=store_url))
    try:
        client.sync.provision_user("old", initial_balance="10")
        token, info = session_specs("old", "default", "8", None, None)
        policy = Policy.parse({"routes": {"search": {"budget": "1"}, "llm_*": {"budget": "5"}}})
        info = dataclasses.replace(info, policy=policy, source=None)
        led, source = client.ledger.sync, budget_account_id("USDC")
        led.create_account(source, AccountKind.FUNDING)
        led.create_account(info.account_id, AccountKind.SESSION, owner="old",
                           metadata=info.metadata())  # fmt: skip
        led.transfer(f"budget:{info.account_id}", source, info.account_id, info.budget,
                     code="session_budget")  # fmt: skip
        for slot, budget in enumerate((1_000_000, 5_000_000)):  # as written: search, llm_*
            route = f"{info.account_id}:r{slot}"
            led.create_account(route, AccountKind.SESSION, owner="old")
            led.transfer(f"budget:{route}", source, route, budget, code="session_budget")

        @client.meter(cost="2", event="llm_chat", session_param="session")
        def llm(session: str) -> str:
            return "ok"

        @client.meter(cost="1.5", event="search", session_param="session")
        def search(session: str) -> str:
            return "ok"

        assert llm(session=token) == "ok"  # llm_* has 5, not search's 1
        with pytest.raises(errors.SessionBudgetExhausted) as refused:
            search(session=token)
        assert "'search'" in refused.value.message
        assert client.ledger.balance(f"{info.account_id}:r1").posted == 3_000_000
    finally:
        client.close()


async def test_retry_after_is_when_the_refused_call_fits(store_url: str) -> None:
    """Retry-After is the wait until enough of the window's usage has left it for THIS
    call to fit (not until its oldest row leaves), and the longest over every window."""
    now = [1_700_000_000_000_000]
    led = open_ledger(store_url, clock_us=lambda: now[0])
    # a client on a ledger it did not open still books its revenue account
    client = DripClient(DripConfig(database_url=store_url), ledger=led)
    try:
        await client.provision_user("t", initial_balance="10")
        session = await client.create_session(
            "t", "default", "5", policy={"windows": [{"per": "minute", "max_amount": "0.10"}]}
        )
        t0 = now[0]
        await meter(client, "a", "0.01")(session=session.id)
        now[0] = t0 + 30_000_000
        await meter(client, "b", "0.08")(session=session.id)
        now[0] = t0 + 40_000_000
        with pytest.raises(errors.RateLimited) as info:
            await meter(client, "c", "0.05")(session=session.id)
        # 0.01 leaving at t0+60 s is not enough; 0.08 leaving at t0+90 s is
        assert info.value.details["retry_after_s"] == 50
        now[0] = t0 + 89_000_000
        with pytest.raises(errors.RateLimited) as info:
            await meter(client, "c", "0.05")(session=session.id)
        assert info.value.details["retry_after_s"] == 1
        now[0] = t0 + 90_000_000
        await meter(client, "c", "0.05")(session=session.id)

        calls = await client.create_session(
            "t", "default", "5",
            policy={"windows": [{"per": "minute", "max_calls": 1},
                                {"per": "hour", "max_calls": 2}]},
        )  # fmt: skip
        t1 = now[0]
        await meter(client, "d")(session=calls.id)
        now[0] = t1 + 61_000_000
        await meter(client, "d")(session=calls.id)
        now[0] = t1 + 70_000_000
        with pytest.raises(errors.RateLimited) as info:
            await meter(client, "d")(session=calls.id)
        # the minute frees up at t1+121 s, but the hour only at t1+3600 s: that is the wait
        assert info.value.details["retry_after_s"] == 3530
        assert info.value.details["policy"] == "window_3600s"
        now[0] = t1 + 3_600_000_000
        await meter(client, "d")(session=calls.id)
    finally:
        client.close()
        led.close()


async def test_a_route_budget_too_small_is_a_402_even_when_a_window_is_full(
    client: DripClient,
) -> None:
    """No wait cures a route budget the call does not fit: it used to be a 429 "retry
    later" whenever the session's window was full too (the window is checked first)."""
    session = await client.create_session(
        "w", "default", "1",
        policy={"windows": [{"per": "minute", "max_amount": "0.04"}],
                "routes": {"llm_*": {"budget": "0.02"}}},
    )  # fmt: skip
    await meter(client, "search", "0.03")(session=session.id)
    with pytest.raises(errors.SessionBudgetExhausted) as info:
        await meter(client, "llm_x", "0.03")(session=session.id)
    assert info.value.status == 402 and "llm_*" in info.value.message
    with pytest.raises(errors.RateLimited):  # fits its route budget: the window decides
        await meter(client, "llm_y", "0.015")(session=session.id)
    state = client.sync.get_session(session.id)
    assert (state["spent"], state["pending"]) == (30_000, 0)
