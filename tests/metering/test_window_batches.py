"""Rolling windows see what the same batch released: a void, or a capture for less than
the hold, frees room for a call batched with it (the journal still shows the hold open
at its full amount until the batch commits)."""

from __future__ import annotations

import asyncio
from typing import Any

from drip import DripClient, DripConfig, errors


def _client(store_url: str, window: dict[str, Any]) -> tuple[DripClient, str]:
    client = DripClient(DripConfig(database_url=store_url))
    client.sync.provision_user("u", initial_balance="10")
    session = client.sync.create_session("u", "default", "5", policy={"windows": [window]})
    return client, session.id


async def _held(client: DripClient, token: str, hold_id: str, amount: int) -> Any:
    wallet, caps, _ = await client.payer_async(user_id=None, session=token, event="e",
                                               amount=amount)  # fmt: skip
    return await client.ledger.hold(hold_id, wallet, client.revenue_account, amount, code="e",
                                    timeout_s=60, caps=caps), wallet, caps  # fmt: skip


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
