"""PostgreSQL's one-round-trip path must never act on a stale memory of the rows.

Two ledgers on one database stand for two server processes: each remembers the rows
its own batches saw, and the other changes them behind its back.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from drip import errors
from drip.ledger import Ledger, open_ledger, pg_optimistic


@pytest.fixture
def pair(postgres_url: str) -> Iterator[tuple[Ledger, Ledger]]:
    a = open_ledger(postgres_url)
    b = open_ledger(postgres_url)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _fund(led: Ledger, amount: int) -> None:
    led.sync.create_account("user:w", "wallet")
    led.sync.create_account("rev:p", "revenue")
    if amount:
        led.sync.transfer("fund-1", "funding:USDC", "user:w", amount, code="topup")


def test_a_top_up_elsewhere_is_seen_before_refusing(pair: tuple[Ledger, Ledger]) -> None:
    a, b = pair
    _fund(a, 100)
    a.sync.charge("c1", "user:w", "rev:p", 100, code="x")  # a now remembers 0 available
    b.sync.transfer("fund-2", "funding:USDC", "user:w", 500, code="topup")
    charge = a.sync.charge("c2", "user:w", "rev:p", 300, code="x")
    assert charge.amount == 300
    assert a.balance("user:w").available == 200
    assert a.check_invariants().ok


def test_a_charge_elsewhere_is_never_overspent(pair: tuple[Ledger, Ledger]) -> None:
    a, b = pair
    _fund(a, 1000)
    a.sync.charge("c1", "user:w", "rev:p", 100, code="x")  # a remembers 900
    b.sync.charge("c2", "user:w", "rev:p", 800, code="x")  # really 100 left
    with pytest.raises(errors.DripInsufficientCredits):
        a.sync.charge("c3", "user:w", "rev:p", 500, code="x")
    assert a.balance("user:w").posted == 100
    a.sync.charge("c4", "user:w", "rev:p", 100, code="x")
    assert b.balance("user:w").available == 0
    assert a.check_invariants().ok


def test_a_hold_resolved_elsewhere_is_not_resolved_twice(pair: tuple[Ledger, Ledger]) -> None:
    a, b = pair
    _fund(a, 1000)
    hold = a.sync.hold("h1", "user:w", "rev:p", 400, code="x")  # a remembers it open
    b.sync.void("h1")
    with pytest.raises(errors.HoldAlreadyResolved):
        a.sync.post(hold, 300)
    assert a.balance("user:w") == b.balance("user:w")
    assert a.balance("user:w").available == 1000
    assert a.check_invariants().ok


def test_a_replayed_id_is_answered_from_the_database(pair: tuple[Ledger, Ledger]) -> None:
    a, b = pair
    _fund(a, 1000)
    first = b.sync.charge("same-id", "user:w", "rev:p", 250, code="x")
    again = a.sync.charge("same-id", "user:w", "rev:p", 250, code="x")  # a thinks it is new
    assert again.transfer.id == first.transfer.id and again.amount == 250
    with pytest.raises(errors.IdempotencyConflict):
        a.sync.charge("same-id", "user:w", "rev:p", 251, code="x")
    assert a.balance("user:w").posted == 750
    assert a.check_invariants().ok


def test_the_fast_path_is_taken_when_nothing_changed(
    pair: tuple[Ledger, Ledger], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = pair
    _fund(a, 1000)
    a.sync.charge("warm", "user:w", "rev:p", 1, code="x")
    taken: list[bool] = []
    real = pg_optimistic.try_batch

    def spy(*args: object, **kwargs: object) -> object:
        result = real(*args, **kwargs)  # type: ignore[arg-type]
        taken.append(result is not None)
        return result

    monkeypatch.setattr("drip.ledger.postgres.try_batch", spy)
    for i in range(5):
        hold = a.sync.hold(f"h{i}", "user:w", "rev:p", 10, code="x")
        a.sync.post(hold, 7)
    assert taken and all(taken)
    assert a.balance("user:w").posted == 1000 - 1 - 5 * 7
    assert a.check_invariants().ok


# --- the same, for asyncio callers: their batches run on the loop (pg_async) -----------


async def _afund(led: Ledger, amount: int) -> None:
    await led.create_account("user:w", "wallet")
    await led.create_account("rev:p", "revenue")
    await led.transfer("fund-1", "funding:USDC", "user:w", amount, code="topup")


@pytest.fixture
def loop_fast(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each batch on the loop was written by the fast path."""
    from drip.ledger import pg_async

    taken: list[bool] = []
    real = pg_async.LoopBatcher._fast

    async def spy(self: object, ops: object) -> object:
        result = await real(self, ops)  # type: ignore[arg-type]
        taken.append(result is not None)
        return result

    monkeypatch.setattr(pg_async.LoopBatcher, "_fast", spy)
    return taken


async def test_async_batches_take_the_fast_path(
    pair: tuple[Ledger, Ledger], loop_fast: list[bool]
) -> None:
    a, _ = pair
    await _afund(a, 1000)
    await a.charge("warm", "user:w", "rev:p", 1, code="x")
    loop_fast.clear()
    for i in range(5):
        hold = await a.hold(f"h{i}", "user:w", "rev:p", 10, code="x")
        charge = await a.post(hold, 7)
        assert charge.transfer.seq > hold.seq > 0
    assert loop_fast and all(loop_fast)
    assert a.balance("user:w").posted == 1000 - 1 - 5 * 7
    assert a.check_invariants().ok


async def test_async_charge_elsewhere_is_never_overspent(
    pair: tuple[Ledger, Ledger], loop_fast: list[bool]
) -> None:
    a, b = pair
    await _afund(a, 1000)
    await a.charge("c1", "user:w", "rev:p", 100, code="x")  # a remembers 900
    b.sync.charge("c2", "user:w", "rev:p", 800, code="x")  # really 100 left
    with pytest.raises(errors.DripInsufficientCredits):
        await a.charge("c3", "user:w", "rev:p", 500, code="x")
    await a.charge("c4", "user:w", "rev:p", 100, code="x")
    assert b.balance("user:w").available == 0
    assert a.check_invariants().ok


async def test_async_hold_resolved_elsewhere_is_not_resolved_twice(
    pair: tuple[Ledger, Ledger],
) -> None:
    a, b = pair
    await _afund(a, 1000)
    hold = await a.hold("h1", "user:w", "rev:p", 400, code="x")
    b.sync.void("h1")
    with pytest.raises(errors.HoldAlreadyResolved):
        await a.post(hold, 300)
    assert a.balance("user:w").available == 1000
    assert a.check_invariants().ok


async def test_async_replay_and_new_work_in_one_batch(pair: tuple[Ledger, Ledger]) -> None:
    import asyncio

    a, b = pair
    await _afund(a, 1000)
    first = b.sync.charge("same-id", "user:w", "rev:p", 250, code="x")
    await a.charge("warm", "user:w", "rev:p", 1, code="x")
    again, new = await asyncio.gather(
        a.charge("same-id", "user:w", "rev:p", 250, code="x"),
        a.charge("new-1", "user:w", "rev:p", 9, code="x"),
    )
    assert again.transfer.seq == first.transfer.seq and new.amount == 9
    with pytest.raises(errors.IdempotencyConflict):
        await a.charge("same-id", "user:w", "rev:p", 251, code="x")
    assert a.balance("user:w").posted == 1000 - 250 - 1 - 9
    assert a.check_invariants().ok


async def test_async_path_survives_a_broken_connection(pair: tuple[Ledger, Ledger]) -> None:
    import asyncio

    a, _ = pair
    await _afund(a, 1000)
    await a.charge("c1", "user:w", "rev:p", 1, code="x")
    batcher = a.store._loop_batchers[asyncio.get_running_loop()]  # type: ignore[attr-defined]
    assert batcher.conn is not None
    batcher.conn.pgconn.finish()  # the server went away under it
    charge = await a.charge("c2", "user:w", "rev:p", 2, code="x")  # locked path, then back
    assert charge.amount == 2
    await a.charge("c3", "user:w", "rev:p", 3, code="x")
    assert a.balance("user:w").posted == 1000 - 6
    assert a.check_invariants().ok


def test_a_status_memory_believes_is_set_is_checked(pair: tuple[Ledger, Ledger]) -> None:
    """An operation that reads a remembered row and writes nothing (a no-op status)
    must not be answered from memory another process made stale."""
    a, b = pair
    _fund(a, 1000)
    a.sync.set_status("user:w", "frozen")  # a remembers it frozen
    b.sync.set_status("user:w", "open")  # really open now
    a.sync.set_status("user:w", "frozen")  # looks like a no-op to a's memory
    assert b.balance("user:w").available == 1000
    with pytest.raises(errors.DripError):
        b.sync.charge("after", "user:w", "rev:p", 5, code="x")  # the freeze holds
    assert a.store.get_account("user:w").status == "frozen"  # type: ignore[union-attr]


async def test_async_status_memory_believes_is_set_is_checked(
    pair: tuple[Ledger, Ledger],
) -> None:
    import asyncio

    a, b = pair
    await _afund(a, 1000)
    await a.set_status("user:w", "frozen")  # a remembers it frozen
    b.sync.set_status("user:w", "open")  # really open now
    # the status is the only read of user:w; the transfer's rows are written (and checked)
    await asyncio.gather(a.set_status("user:w", "frozen"),
                         a.transfer("t-x", "funding:USDC", "rev:p", 1, code="topup"))  # fmt: skip
    assert a.store.get_account("user:w").status == "frozen"  # type: ignore[union-attr]
    with pytest.raises(errors.DripError):
        b.sync.charge("after", "user:w", "rev:p", 5, code="x")


async def test_async_calls_on_a_closed_store_fail_instead_of_hanging(
    postgres_url: str,
) -> None:
    import asyncio

    led = open_ledger(postgres_url)
    await _afund(led, 100)
    await led.charge("c1", "user:w", "rev:p", 1, code="x")
    led.close()
    with pytest.raises(errors.DripError):
        await asyncio.wait_for(led.charge("c2", "user:w", "rev:p", 1, code="x"), 10)
    with pytest.raises(errors.DripError):  # a batch the fast path cannot take
        await asyncio.wait_for(led.create_account("user:new", "wallet"), 10)


# --- holds commit without waiting for the disk; money never does ----------------------


async def test_only_hold_batches_commit_asynchronously(
    pair: tuple[Ledger, Ledger], postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of private holds (only this process resolves them) sets
    ``synchronous_commit = off`` for its own transaction; a capture, a transfer, or a
    hold whose id is handed out keeps the server's default."""
    import psycopg

    from drip.ledger import pg_async

    a, _ = pair
    await _afund(a, 1000)
    await a.charge("warm", "user:w", "rev:p", 1, code="x")
    sent: list[tuple[str, list[object], bool]] = []
    real = pg_async.one_statement

    def spy(writes: object, cache: object, *, asynchronous: bool) -> tuple[str, list[object]]:
        query, params = real(writes, cache, asynchronous=asynchronous)  # type: ignore[arg-type]
        sent.append((query, params, asynchronous))
        return query, params

    monkeypatch.setattr(pg_async, "one_statement", spy)
    hold = await a.hold("h-async", "user:w", "rev:p", 100, code="x", private=True)
    await a.post(hold, 60)
    await a.charge("c-async", "user:w", "rev:p", 5, code="x")
    await a.hold("h-public", "user:w", "rev:p", 10, code="x")  # its id goes to a client
    assert [only for _, _, only in sent] == [True, False, False, False]
    assert a.balance("user:w").posted == 1000 - 1 - 60 - 5

    # the hold's statement carried the setting (take_seqs checks its row came back) ...
    assert pg_optimistic._ASYNC_COMMIT_CTE in sent[0][0]
    assert all(pg_optimistic._ASYNC_COMMIT_CTE not in query for query, _, _ in sent[1:])
    # ... and such a setting holds for the rest of the statement's own transaction
    with psycopg.connect(postgres_url) as conn:
        conn.execute(f"WITH {pg_optimistic._ASYNC_COMMIT_CTE} SELECT v FROM s").fetchall()
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("off",)
        conn.rollback()
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)


async def test_compare_and_set_expects_the_rows_the_batch_read(
    pair: tuple[Ledger, Ledger], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop and the writer thread share one memory of the rows. If the writer
    thread remembers a newer account between the loop's batch reading it and sending
    its statement, the statement must still expect what the batch read (and lose the
    race), not the newer row (which would write values computed from the older one)."""
    import threading

    from drip.ledger import pg_async

    a, _ = pair
    await _afund(a, 10**6)
    await a.charge("warm", "user:w", "rev:p", 1, code="x")
    real = pg_async.prepare
    armed = [True]

    def prepare(store: object, cache: object, ops: object) -> object:
        prepared = real(store, cache, ops)  # type: ignore[arg-type]
        if prepared is not None and armed[0]:
            armed[0] = False  # meanwhile, a blocking caller charges on the writer thread
            worker = threading.Thread(
                target=a.sync.charge, args=("sync-1", "user:w", "rev:p", 3), kwargs={"code": "x"}
            )
            worker.start()
            worker.join()
        return prepared

    monkeypatch.setattr(pg_async, "prepare", prepare)
    await a.charge("async-1", "user:w", "rev:p", 1, code="x")
    assert a.balance("user:w").posted == 10**6 - 1 - 3 - 1
    rows = a.store.query(
        "SELECT coalesce(sum(amount), 0) FROM transfers WHERE debit_account_id = ? AND flags = 0",
        ("user:w",),
    )
    assert a.account("user:w").debits_posted == rows[0][0] == 5
    assert a.check_invariants().ok


def test_a_late_remember_never_overwrites_a_later_row() -> None:
    """The loop's fast path remembers its rows after its statement returns; a writer
    thread may have committed on top of them and remembered the result first. The late
    remember must keep the later row (what ``remembered_balance`` answers from)."""
    from drip.ledger.engine import CreateTransfers
    from drip.ledger.rowcache import RowCache, apply_remembered
    from drip.ledger.types import Account, TransferSpec

    cache = RowCache()
    cache.accounts["user:a"] = Account("user:a", "wallet", "USDC", credits_posted=1_000)
    cache.accounts["rev:p"] = Account("rev:p", "revenue", "USDC")
    charge = CreateTransfers((TransferSpec("c1", "user:a", "rev:p", 100, "search"),))
    applied = apply_remembered(cache, 0, [charge])
    assert applied is not None
    # meanwhile a writer thread commits on top of it and remembers first
    later = Account("user:a", "wallet", "USDC", credits_posted=1_000, debits_posted=150)
    cache.accounts["user:a"] = later
    cache.remember(applied.engine, applied.before)
    assert cache.accounts["user:a"] is later
    assert cache.accounts["rev:p"].credits_posted == 100  # nobody else touched this one
    # a cleared cache stays cleared for the rows the batch read
    cache.clear()
    cache.remember(applied.engine, applied.before)
    assert "user:a" not in cache.accounts
