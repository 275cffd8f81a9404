"""Replays that were not what they said, found by review: a chain that gained a leg
replayed its head and moved money on the new leg; a replay after the fee rate dropped to
0 lost its fee; a late charge on a live hold took the id its capture needed."""

from __future__ import annotations

import asyncio

import pytest

from drip import errors
from drip.ledger import Ledger, TransferFlags, TransferSpec, funding_account_id, open_ledger
from drip.ledger.ledger import Cap

FUND = funding_account_id("USDC")


def _books(url: str, fee_bps: int = 0) -> Ledger:
    led = open_ledger(url, fee_bps=fee_bps)
    s = led.sync
    s.create_account("w", "wallet")
    s.create_account("r", "revenue")
    s.create_account("sess", "session")
    s.create_account("src", "funding")
    s.transfer("top", FUND, "w", 10_000)
    s.transfer("budget", "src", "sess", 1_000)
    return led


def test_a_chain_that_gained_a_leg_is_a_conflict_not_a_replay(store_url: str) -> None:
    led = _books(store_url)
    s = led.sync
    try:
        s.charge("X", "w", "r", 400, code="llm")
        with pytest.raises(errors.IdempotencyConflict):
            s.charge("X", "w", "r", 400, code="llm", caps=[Cap("sess", "src")])
        s.hold("H", "w", "r", 300, code="llm")
        with pytest.raises(errors.IdempotencyConflict):
            s.hold("H", "w", "r", 300, code="llm", caps=[Cap("sess", "src")])
        s.transfer("A", FUND, "w", 5)
        results = s.create_transfers([
            TransferSpec("A", FUND, "w", 5, "transfer", flags=TransferFlags.LINKED),
            TransferSpec("B", FUND, "w", 7, "transfer"),
        ])  # fmt: skip
        assert all(isinstance(r, errors.DripError) for r in results)
        assert s.get_transfer("B") is None
        assert (s.balance("sess").posted, s.balance("sess").pending) == (1_000, 0)
        assert s.balance("w").posted == 10_000 + 5 - 400
        again = s.charge("X", "w", "r", 400, code="llm")  # the same chain: a replay
        assert again.replayed and s.balance("w").posted == 10_000 + 5 - 400
        assert led.check_invariants().ok
    finally:
        led.close()


def test_a_replay_after_the_fee_rate_dropped_answers_with_its_fee(store_url: str) -> None:
    led = _books(store_url, fee_bps=250)
    s = led.sync
    charged = s.charge("X", "w", "r", 400, code="llm")
    hold = s.hold("H", "w", "r", 400, code="llm")
    posted = s.post(hold, 200)
    assert (charged.fee.amount, posted.fee.amount) == (10, 5)
    led.close()
    led = open_ledger(store_url, fee_bps=0)
    try:
        for again in (led.sync.charge("X", "w", "r", 400, code="llm"), led.sync.post(hold, 200),
                      asyncio.run(led.charge("X", "w", "r", 400, code="llm")),
                      asyncio.run(led.post(hold, 200))):  # fmt: skip
            assert again.replayed and again.fee is not None and again.fee.replayed
        assert led.sync.charge("X", "w", "r", 400, code="llm").fee.amount == 10
        assert led.sync.balance("w").posted == 10_000 - 400 - 200
    finally:
        led.close()


def test_a_late_charge_is_only_for_a_hold_that_expired(store_url: str) -> None:
    """On a live hold it charged beside the hold and took ``<hold>~post``: the hold could
    then be captured again under another id, and on SQLite a capture meeting that id in
    a window rolled back other callers' answered holds."""
    led = _books(store_url)
    try:
        hold = led.sync.hold("G", "w", "r", 100, code="llm", timeout_s=60)
        with pytest.raises(errors.InvalidRequest):
            led.sync.charge_after_expiry(hold, 100)
        with pytest.raises(errors.InvalidRequest):
            asyncio.run(led.charge_after_expiry(hold, 100))
        assert led.sync.get_transfer("G~post") is None

        async def callers() -> tuple[int, int]:
            other = await led.hold("K", "w", "r", 50, code="llm", private=True)
            captured = await asyncio.gather(led.post(hold, 100), led.post(other, 50))
            return captured[0].amount, captured[1].amount

        assert asyncio.run(callers()) == (100, 50)
        assert led.sync.balance("w").posted == 10_000 - 150
        assert led.check_invariants().ok
    finally:
        led.close()


def test_a_twin_in_the_same_batch_with_another_leg_is_a_conflict(store_url: str) -> None:
    """The second of two same-id charges in one batch, with a cap the first lacked,
    debited the cap account with no charge to match."""
    led = _books(store_url)
    try:

        async def twins() -> list[object]:
            plain = led.charge("X", "w", "r", 400, code="llm")
            capped = led.charge("X", "w", "r", 400, code="llm", caps=[Cap("sess", "src")])
            return list(await asyncio.gather(plain, capped, return_exceptions=True))

        first, second = asyncio.run(twins())
        assert not isinstance(first, Exception)
        assert isinstance(second, errors.IdempotencyConflict)
        s = led.sync
        assert s.get_transfer("X~cap0") is None and s.balance("sess").posted == 1_000
        assert s.balance("w").posted == 10_000 - 400
    finally:
        led.close()


def test_a_late_session_charge_finds_the_sessions_hold_released(store_url: str) -> None:
    """A capture whose hold expired failed at its first leg; the session's companion hold
    (``~cap0``) went on reserving, so the late charge found the budget taken and the call
    went unbilled (on PostgreSQL)."""
    from drip import DripClient, DripConfig, last_charge

    client = DripClient(DripConfig(database_url=store_url, hold_timeout_s=1, fee_bps=100))
    try:
        client.sync.provision_user("u", initial_balance="10")
        session = client.sync.create_session("u", "default", "0.75")

        @client.meter("0.5", "slow", session_param="session")
        async def slow(session: str) -> int:
            await asyncio.sleep(1.6)  # outlives its 1 s hold
            return 1

        async def run() -> object:
            await slow(session=session.id)
            return last_charge()

        charge = asyncio.run(run())
        assert charge is not None and charge.amount == 500_000
        state = client.sync.get_session(session.id)
        assert (state["spent"], state["pending"]) == (500_000, 0)
        assert client.ledger.check_invariants().ok
    finally:
        client.close()
