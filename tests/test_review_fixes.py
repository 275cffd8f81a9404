"""Regressions for what a review of the first slice found."""

from __future__ import annotations

import asyncio
import base64
import time
from decimal import Decimal

import pytest

from drip import DripClient, DripConfig, errors
from drip.ledger import TransferFlags, TransferSpec, open_ledger


async def test_cancelling_a_call_while_its_hold_is_in_flight_releases_it(store_url: str) -> None:
    client = DripClient(DripConfig(database_url=store_url))
    try:
        await client.provision_user("c", initial_balance="3")

        @client.meter(cost="1", event="slow")
        async def call(user_id: str) -> None:
            await asyncio.sleep(10)

        for _ in range(3):
            task = asyncio.ensure_future(call(user_id="c"))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        # the holds may land after the cancellations; each is voided when it does
        await asyncio.sleep(0.5)
        deadline = time.monotonic() + 10
        while (await client.get_user("c"))["pending_usdc"] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        user = await client.get_user("c")
        assert user["pending_usdc"] == 0 and user["balance_usdc"] == Decimal(3)
    finally:
        client.close()


async def test_a_call_outliving_its_hold_is_still_charged(store_url: str) -> None:
    client = DripClient(DripConfig(database_url=store_url, hold_timeout_s=1))
    try:
        await client.provision_user("l", initial_balance="1")

        @client.meter(cost="0.25", event="long")
        async def long_call(user_id: str) -> str:
            await asyncio.sleep(1.3)
            return "done"

        assert await long_call(user_id="l") == "done"
        user = await client.get_user("l")
        assert user["balance_usdc"] == Decimal("0.75") and user["pending_usdc"] == 0
        assert client.ledger.check_invariants().ok
    finally:
        client.close()


async def test_an_over_long_linked_chain_fails_whole(store_url: str) -> None:
    led = open_ledger(store_url)
    try:
        await led.create_account("user:a", "wallet")
        await led.create_account("rev:p", "revenue")
        await led.transfer("fund", "funding:USDC", "user:a", 1_000, code="topup")
        linked = int(TransferFlags.LINKED)
        specs = [TransferSpec(f"t{i}", "user:a", "rev:p", 1, "x", linked) for i in range(74)]
        specs.append(TransferSpec("last", "user:a", "rev:p", 1, "x"))
        results = await led.create_transfers(specs)
        assert all(isinstance(r, errors.DripError) for r in results)
        assert led.balance("user:a").available == 1_000
    finally:
        led.close()


def test_unbounded_reads_are_refused_not_500(store_url: str) -> None:
    led = open_ledger(store_url)
    try:
        huge = base64.urlsafe_b64encode(b"s9999999999999999999").decode().rstrip("=")
        with pytest.raises(errors.InvalidRequest):
            led.history(cursor=huge)
        for bad in ("\x00", "a b", "x" * 65):
            with pytest.raises(errors.InvalidRequest):
                led.usage(code=bad)
            with pytest.raises(errors.InvalidRequest):
                led.history(code=bad)
    finally:
        led.close()


async def test_written_transfers_carry_their_sequence_number(store_url: str) -> None:
    led = open_ledger(store_url, fee_bps=100)
    try:
        await led.create_account("user:s", "wallet")
        await led.create_account("rev:s", "revenue")
        top = await led.transfer("top-s", "funding:USDC", "user:s", 10_000, code="topup")
        hold = await led.hold("hold-s", "user:s", "rev:s", 500, code="x")
        charge = await led.post(hold, 400)
        many = await asyncio.gather(*(led.charge(f"c{i}", "user:s", "rev:s", 10, code="y")
                                      for i in range(20)))  # fmt: skip
        written = [top, hold, charge.transfer, *(c.transfer for c in many)]
        assert charge.fee is not None
        written.append(charge.fee)
        for transfer in written:
            stored = led.get_transfer(transfer.id)
            assert stored is not None and transfer.seq == stored.seq > 0
        assert len({t.seq for t in written}) == len(written)
        replay = await led.transfer("top-s", "funding:USDC", "user:s", 10_000, code="topup")
        assert replay.seq == top.seq
    finally:
        led.close()
