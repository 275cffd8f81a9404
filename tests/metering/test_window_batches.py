"""Rolling windows see what the same batch released: a void, or a capture for less than
the hold, frees room for a call batched with it (the journal still shows the hold open
at its full amount until the batch commits)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from drip import DripClient, DripConfig, errors


def _client(store_url: str, window: dict[str, Any]) -> tuple[DripClient, str]:
    client = DripClient(DripConfig(database_url=store_url))
    client.sync.provision_user("u", initial_balance="10")
    session = client.sync.create_session("u", "default", "5", policy={"windows": [window]})
    return client, session.id


async def _held(
    client: DripClient, token: str, hold_id: str, amount: int, timeout_s: int = 60
) -> Any:
    wallet, caps, _ = await client.payer_async(user_id=None, session=token, event="e",
                                               amount=amount)  # fmt: skip
    return await client.ledger.hold(hold_id, wallet, client.revenue_account, amount, code="e",
                                    timeout_s=timeout_s, caps=caps), wallet, caps  # fmt: skip


async def test_a_void_frees_its_call_for_a_hold_in_the_same_batch(store_url: str) -> None:
    client, token = _client(store_url, {"per": "minute", "max_calls": 1})
    try:
        h1, wallet, caps = await _held(client, token, "h1", 10_000)
        led = client.ledger
        results = await asyncio.gather(
            led.void(h1, caps=caps),
            led.hold("h2", wallet, client.revenue_account, 10_000, code="e", timeout_s=60,
                     caps=caps),
            return_exceptions=True,
        )  # fmt: skip
        assert not any(isinstance(r, Exception) for r in results), results
        # and the window is full again: h2 counts
        try:
            await led.hold("h3", wallet, client.revenue_account, 10_000, code="e",
                           timeout_s=60, caps=caps)  # fmt: skip
        except errors.RateLimited:
            pass
        else:
            raise AssertionError("a third call fit a window of one call")
        assert led.check_invariants().ok
    finally:
        client.close()


async def test_a_partial_capture_frees_the_rest_for_the_same_batch(store_url: str) -> None:
    client, token = _client(store_url, {"per": "minute", "max_amount": "0.05"})
    try:
        h1, wallet, caps = await _held(client, token, "h1", 50_000)
        led = client.ledger
        results = await asyncio.gather(
            led.post(h1, 10_000, caps=caps),  # the call cost 0.01 of its 0.05
            led.hold("h2", wallet, client.revenue_account, 40_000, code="e", timeout_s=60,
                     caps=caps),
            return_exceptions=True,
        )  # fmt: skip
        assert not any(isinstance(r, Exception) for r in results), results
        try:  # 0.01 + 0.04 used: nothing more fits
            await led.hold("h3", wallet, client.revenue_account, 1, code="e", timeout_s=60,
                           caps=caps)  # fmt: skip
        except errors.RateLimited:
            pass
        else:
            raise AssertionError("the window took more than its max_amount")
    finally:
        client.close()


def test_a_window_too_small_for_the_call_speaks_usdc(store_url: str) -> None:
    """The engine counts atomic units; a session's refusal names amounts in USDC, as
    every other message does."""
    client, token = _client(store_url, {"per": "minute", "max_amount": "0.05"})
    try:
        wallet, caps, refusals = client.payer(user_id=None, session=token, event="e",
                                              amount=100_000)  # fmt: skip
        try:
            with refusals:
                client.ledger.sync.hold("big", wallet, client.revenue_account, 100_000,
                                        code="e", timeout_s=60, caps=caps)  # fmt: skip
        except errors.PolicyViolation as exc:
            assert "0.1 USDC" in exc.message and "(0.05 USDC)" in exc.message, exc.message
            assert "100000" not in exc.message
        else:
            raise AssertionError("a call above the window's max_amount was held")
    finally:
        client.close()


def _clocked(store_url: str, window: dict[str, Any]) -> tuple[DripClient, str, list[int]]:
    from drip.ledger import open_ledger

    now = [1_800_000_000_000_000]
    led = open_ledger(store_url, clock_us=lambda: now[0])
    client = DripClient(DripConfig(database_url=store_url), ledger=led)
    client.sync.provision_user("u", initial_balance="10")
    session = client.sync.create_session("u", "default", "5", policy={"windows": [window]})
    return client, session.id, now


async def test_a_call_outliving_its_hold_still_counts_in_the_window(store_url: str) -> None:
    """A call admitted by a window and still running when its hold expires keeps its
    place in the window: another call is not let in beside it, and its late charge is
    not counted a second time."""
    from drip.metering.meter import capture_async

    client, token, now = _clocked(store_url, {"per": "minute", "max_amount": "0.05"})
    led = client.ledger
    try:
        slow, _wallet, caps = await _held(client, token, "slow", 50_000, timeout_s=5)
        now[0] += 6_000_000  # the hold expired while the call ran
        assert led.expire_holds() >= 1
        with pytest.raises(errors.RateLimited):  # the slow call still fills the window
            await _held(client, token, "fast", 50_000)
        charge = await capture_async(led, slow, 50_000, caps)  # charged late, admitted
        assert charge is not None and charge.amount == 50_000
        with pytest.raises(errors.RateLimited):  # and counted once, not twice
            await _held(client, token, "fast-2", 1)
        now[0] += 61_000_000  # a minute on, the window is free again
        await _held(client, token, "later", 50_000)
        assert led.check_invariants().ok
    finally:
        client.close()
        led.close()


async def test_a_late_charge_settles_on_a_session_closed_meanwhile(store_url: str) -> None:
    """A session closed while a call ran: the call still settles, its hold expired or
    not (a late charge is not refused because the session is closed)."""
    from drip.metering.meter import capture_async

    client, token, now = _clocked(store_url, {"per": "day", "max_calls": 100})
    led = client.ledger
    try:
        slow, _wallet, caps = await _held(client, token, "slow", 50_000, timeout_s=5)
        await client.close_session(token)
        now[0] += 6_000_000
        led.expire_holds()
        charge = await capture_async(led, slow, 30_000, caps)
        assert charge is not None and charge.amount == 30_000
        assert client.sync.get_session(token)["spent"] == 30_000
        with pytest.raises(errors.DripError):  # a new call on the closed session: refused
            await _held(client, token, "new", 1)
        assert led.check_invariants().ok
    finally:
        client.close()
        led.close()
