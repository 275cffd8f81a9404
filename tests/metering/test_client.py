"""DripClient: provisioning, balances, debits, top-ups, pause and resume, on both stores."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from drip import DripClient, DripInsufficientCredits, errors
from drip.metering.client import wallet_id


async def balance(client: DripClient, user_id: str) -> Decimal:
    value: Decimal = (await client.get_user(user_id))["balance_usdc"]
    return value


def journal(client: DripClient, user_id: str) -> list[Any]:
    """Every transfer that touched the user's wallet (newest first)."""
    return client.ledger.history(wallet_id(user_id), limit=1000).items


# --- provisioning ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("initial", "expected"),
    [
        ("5.00", Decimal("5")),
        (Decimal("1.25"), Decimal("1.25")),
        (5, Decimal("5")),
        (0.5, Decimal("0.5")),
        ("0.000001", Decimal("0.000001")),
    ],
    ids=["str", "decimal", "int-dollars", "float", "one-atomic-unit"],
)
async def test_provision_credits_initial_balance(
    client: DripClient, initial: Any, expected: Decimal
) -> None:
    user = await client.provision_user("alice", email="a@example.com", initial_balance=initial)

    assert user["user_id"] == "alice"
    assert user["email"] == "a@example.com"
    assert user["status"] == "active"
    assert isinstance(user["balance_usdc"], Decimal)
    assert user["balance_usdc"] == expected
    assert user["pending_usdc"] == 0
    fetched = await client.get_user("alice")
    assert isinstance(fetched["balance_usdc"], Decimal)
    assert fetched["balance_usdc"] == expected
    assert fetched["status"] == "active"
    assert client.ledger.balance(wallet_id("alice")).available == int(expected * 1_000_000)


async def test_provision_keeps_profile(client: DripClient) -> None:
    await client.provision_user(
        "bob",
        email="bob@example.com",
        initial_balance="1",
        container_image="ghcr.io/acme/agent:1",
        metadata={"topic": "AI research", "tier": 2},
    )

    user = await client.get_user("bob")
    assert user["container_image"] == "ghcr.io/acme/agent:1"
    assert user["metadata"] == {"topic": "AI research", "tier": 2}


async def test_provision_without_balance_starts_at_zero(client: DripClient) -> None:
    user = await client.provision_user("zero")

    assert user["balance_usdc"] == Decimal(0)
    assert journal(client, "zero") == []


async def test_reprovision_same_profile_is_idempotent(client: DripClient) -> None:
    first = await client.provision_user("alice", email="a@example.com", initial_balance="5.00")
    second = await client.provision_user("alice", email="a@example.com", initial_balance="5.00")

    assert second["balance_usdc"] == Decimal("5")
    assert second["created_us"] == first["created_us"]
    assert await balance(client, "alice") == Decimal("5")
    assert len(journal(client, "alice")) == 1  # credited once


async def test_reprovision_with_different_email_is_rejected(client: DripClient) -> None:
    await client.provision_user("alice", email="a@example.com", initial_balance="5.00")

    with pytest.raises(errors.AlreadyExists) as info:
        await client.provision_user("alice", email="other@example.com", initial_balance="5.00")

    assert info.value.code == "already_exists"
    user = await client.get_user("alice")
    assert user["email"] == "a@example.com"
    assert user["balance_usdc"] == Decimal("5")


@pytest.mark.parametrize("bad", ["-1", "abc", "0.0000001", float("nan"), float("inf")])
async def test_provision_rejects_bad_initial_balance(client: DripClient, bad: Any) -> None:
    with pytest.raises(errors.InvalidAmount):
        await client.provision_user("alice", initial_balance=bad)

    with pytest.raises(errors.UserNotFound):
        await client.get_user("alice")


async def test_list_users_is_ordered_and_pages(client: DripClient) -> None:
    for name in ("carol", "alice", "bob"):
        await client.provision_user(name, initial_balance="1")

    assert [u["user_id"] for u in client.sync.list_users()] == ["alice", "bob", "carol"]
    assert [u["user_id"] for u in client.sync.list_users(limit=2)] == ["alice", "bob"]
    assert [u["user_id"] for u in client.sync.list_users(after="bob")] == ["carol"]


# --- unknown users --------------------------------------------------------------------


async def test_unknown_user_get_user(client: DripClient) -> None:
    with pytest.raises(errors.UserNotFound) as info:
        await client.get_user("ghost")
    assert info.value.code == "user_not_found"


async def test_unknown_user_debit(client: DripClient) -> None:
    with pytest.raises(errors.UserNotFound):
        await client.debit("ghost", "0.01", "search")


async def test_unknown_user_topup(client: DripClient) -> None:
    with pytest.raises(errors.UserNotFound):
        await client.topup("ghost", "1.00")
    with pytest.raises(errors.UserNotFound):
        await client.get_user("ghost")  # a top-up does not create the user


async def test_unknown_user_hibernate_and_restore(client: DripClient) -> None:
    with pytest.raises(errors.UserNotFound):
        await client.hibernate("ghost")
    with pytest.raises(errors.UserNotFound):
        await client.restore("ghost")


# --- debit ----------------------------------------------------------------------------


async def test_debit_is_exact(client: DripClient) -> None:
    await client.provision_user("alice", initial_balance="5.00")

    for _ in range(3):
        charge = await client.debit("alice", "0.007", "search")
        assert charge.amount == 7_000
        assert charge.transfer.code == "search"
        assert charge.transfer.debit_account_id == wallet_id("alice")

    assert await balance(client, "alice") == Decimal("4.979")
    # floats are read as written, not as their binary approximation
    await client.debit("alice", 0.007, "search")
    assert await balance(client, "alice") == Decimal("4.972")


async def test_debit_returns_a_stored_transfer(client: DripClient) -> None:
    await client.provision_user("alice", initial_balance="1")

    charge = await client.debit("alice", "0.25", "report", metadata={"pages": 3})

    stored = client.ledger.get_transfer(charge.transfer.id)
    assert stored is not None
    assert stored.amount == 250_000
    assert stored.code == "report"
    assert stored.meta == {"pages": 3}


async def test_debit_can_spend_the_whole_balance(client: DripClient) -> None:
    await client.provision_user("alice", initial_balance="0.021")

    for _ in range(3):
        await client.debit("alice", "0.007", "search")

    assert await balance(client, "alice") == Decimal(0)
    with pytest.raises(DripInsufficientCredits):
        await client.debit("alice", "0.000001", "search")


async def test_debit_insufficient_charges_nothing(client: DripClient) -> None:
    await client.provision_user("alice", initial_balance="0.01")
    before = journal(client, "alice")

    with pytest.raises(DripInsufficientCredits) as info:
        await client.debit("alice", "0.02", "search")

    assert info.value.code == "insufficient_credits"
    assert info.value.details["user_id"] == "alice"
    assert info.value.details["needed"] == 20_000
    assert info.value.details["available"] == 10_000
    assert await balance(client, "alice") == Decimal("0.01")
    assert journal(client, "alice") == before


async def test_debit_idempotency_key_charges_once(client: DripClient) -> None:
    await client.provision_user("alice", initial_balance="1.00")

    first = await client.debit("alice", "0.10", "search", idempotency_key="req-42")
    again = await client.debit("alice", "0.10", "search", idempotency_key="req-42")

    assert first.transfer.id == again.transfer.id == "req-42"
    assert again.amount == first.amount == 100_000
    assert await balance(client, "alice") == Decimal("0.90")
    assert len([t for t in journal(client, "alice") if t.id == "req-42"]) == 1


async def test_debit_idempotency_key_reused_with_other_amount_conflicts(
    client: DripClient,
) -> None:
    await client.provision_user("alice", initial_balance="1.00")
    await client.debit("alice", "0.10", "search", idempotency_key="req-42")

    with pytest.raises(errors.IdempotencyConflict):
        await client.debit("alice", "0.20", "search", idempotency_key="req-42")

    assert await balance(client, "alice") == Decimal("0.90")


@pytest.mark.parametrize("bad", ["-1", "1e400", "0.0000001", float("nan"), "0", "abc"], ids=repr)
async def test_debit_rejects_bad_amounts(client: DripClient, bad: Any) -> None:
    await client.provision_user("alice", initial_balance="1.00")
    before = journal(client, "alice")

    with pytest.raises(errors.InvalidAmount) as info:
        await client.debit("alice", bad, "search")

    assert info.value.code == "invalid_amount"
    assert await balance(client, "alice") == Decimal("1")
    assert journal(client, "alice") == before
    assert client.sync.usage("alice") == []


# --- topup, hibernate, restore --------------------------------------------------------


async def test_topup_credits_wallet(client: DripClient) -> None:
    await client.provision_user("alice", initial_balance="1")

    transfer = await client.topup("alice", "2.50")

    assert transfer.amount == 2_500_000
    assert transfer.credit_account_id == wallet_id("alice")
    assert await balance(client, "alice") == Decimal("3.5")


async def test_topup_idempotency_key_credits_once(client: DripClient) -> None:
    await client.provision_user("alice")

    await client.topup("alice", "1", idempotency_key="stripe:pi_1")
    await client.topup("alice", "1", idempotency_key="stripe:pi_1")

    assert await balance(client, "alice") == Decimal("1")


@pytest.mark.parametrize("bad", ["-1", "0", "abc", float("nan")], ids=repr)
async def test_topup_rejects_bad_amounts(client: DripClient, bad: Any) -> None:
    await client.provision_user("alice", initial_balance="1")

    with pytest.raises(errors.InvalidAmount):
        await client.topup("alice", bad)

    assert await balance(client, "alice") == Decimal("1")


async def test_hibernate_pauses_debits_and_restore_resumes(client: DripClient) -> None:
    await client.provision_user("alice", initial_balance="1")

    paused = await client.hibernate("alice")
    assert paused["status"] == "paused"
    assert (await client.get_user("alice"))["status"] == "paused"
    with pytest.raises(errors.AccountFrozen):
        await client.debit("alice", "0.01", "search")
    assert await balance(client, "alice") == Decimal("1")

    restored = await client.restore("alice")
    assert restored["status"] == "active"
    await client.debit("alice", "0.01", "search")
    assert await balance(client, "alice") == Decimal("0.99")


async def test_topup_resumes_a_hibernated_user(client: DripClient) -> None:
    await client.provision_user("alice", initial_balance="1")
    await client.hibernate("alice")

    await client.topup("alice", "2.00")

    user = await client.get_user("alice")
    assert user["status"] == "active"
    assert user["balance_usdc"] == Decimal("3")
    await client.debit("alice", "0.5", "search")
    assert await balance(client, "alice") == Decimal("2.5")


# --- the blocking twin ----------------------------------------------------------------


def test_sync_client_mirrors_async_client(client: DripClient) -> None:
    sync = client.sync
    sync.provision_user("alice", email="a@example.com", initial_balance=5)
    sync.provision_user("alice", email="a@example.com", initial_balance=5)

    for _ in range(3):
        sync.debit("alice", "0.007", "search")
    assert sync.get_user("alice")["balance_usdc"] == Decimal("4.979")

    with pytest.raises(DripInsufficientCredits):
        sync.debit("alice", "10", "search")
    with pytest.raises(errors.InvalidAmount):
        sync.debit("alice", "1e400", "search")
    with pytest.raises(errors.UserNotFound):
        sync.get_user("ghost")
    with pytest.raises(errors.AlreadyExists):
        sync.provision_user("alice", email="b@example.com", initial_balance=5)

    sync.hibernate("alice")
    with pytest.raises(errors.AccountFrozen):
        sync.debit("alice", "0.01", "search")
    sync.topup("alice", "0.021")
    user = sync.get_user("alice")
    assert user["status"] == "active"
    assert user["balance_usdc"] == Decimal("5")
    assert [u["user_id"] for u in sync.list_users()] == ["alice"]
    assert [(r.code, r.calls, r.amount) for r in sync.usage("alice", bucket_s=10**9)] == [
        ("search", 3, 21_000)
    ]


async def test_reads_wait_on_postgresql_without_blocking_the_event_loop(postgres_url: str) -> None:
    """``await client.get_user(...)`` on PostgreSQL waits in a worker thread: while it
    waits on a lock, the loop runs everything else."""
    import asyncio
    import threading
    import time

    import psycopg

    from drip import DripConfig

    client = DripClient(DripConfig(database_url=postgres_url))
    locker = psycopg.connect(postgres_url)
    try:
        await client.provision_user("alice", initial_balance="1")
        locker.execute("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
        release = threading.Timer(1.0, locker.rollback)
        release.start()
        reading = asyncio.create_task(client.get_user("alice"))
        gaps = []
        for _ in range(20):
            started = time.perf_counter()
            await asyncio.sleep(0.01)
            gaps.append(time.perf_counter() - started)
        assert not reading.done()  # still waiting for the lock
        assert max(gaps) < 0.5  # and the loop kept turning meanwhile
        user = await reading
        release.join()
    finally:
        locker.close()
        client.close()
    assert user["balance_usdc"] == Decimal("1")


async def test_a_replayed_topup_resumes_nobody(client: DripClient) -> None:
    """The same idempotency key again moves nothing, so it must not undo a pause made
    since (a payment processor re-sends deliveries for days)."""
    await client.provision_user("p", initial_balance="1")
    await client.hibernate("p")
    first = await client.topup("p", "2", idempotency_key="pay-1")
    assert not first.replayed and (await client.get_user("p"))["status"] == "active"
    await client.hibernate("p")
    again = await client.topup("p", "2", idempotency_key="pay-1")
    assert again.replayed and again.id == first.id
    assert (await client.get_user("p"))["status"] == "paused"
    assert client.sync.topup("p", "2", idempotency_key="pay-1").replayed
    user = await client.get_user("p")
    assert (user["status"], user["balance_usdc"]) == ("paused", Decimal("3"))


async def test_a_top_up_resumes_in_the_same_write_as_its_credit(
    client: DripClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No second write that could fail after the credit and leave a paid user paused (a
    retry would then be a replay, which resumes nobody)."""
    await client.provision_user("atomic", initial_balance="1")
    await client.hibernate("atomic")

    async def no_second_write(*args: object, **kwargs: object) -> None:
        raise AssertionError("the resume must not be a write of its own")

    monkeypatch.setattr(client.ledger, "set_status", no_second_write)
    await client.topup("atomic", "2", idempotency_key="atomic-1")
    user = await client.get_user("atomic")
    assert (user["status"], user["balance_usdc"]) == ("active", Decimal("3"))
