"""The ledger contract (DESIGN.md section 3, docs/ledger.md), on SQLite and PostgreSQL.

Every test runs once per store (``store_url``). Time is an injected clock, so hold
expiry and usage buckets are deterministic. Each scenario ends with
``check_invariants().ok``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from drip import errors
from drip.errors import (
    AccountFrozen,
    AccountNotFound,
    AmountExceedsHold,
    AssetMismatch,
    DripInsufficientCredits,
    HoldAlreadyResolved,
    HoldExpired,
    HoldNotFound,
    IdempotencyConflict,
    InvalidId,
    InvalidRequest,
    InvalidTransfer,
    LinkedEventFailed,
)
from drip.ledger import (
    FEE_ACCOUNT_ID,
    AccountFlags,
    Balance,
    HoldState,
    Ledger,
    Transfer,
    TransferFlags,
    TransferSpec,
    UsageRow,
    funding_account_id,
    open_ledger,
)
from drip.money import Asset

FUND = funding_account_id("USDC")
LINKED = TransferFlags.LINKED
PENDING = TransferFlags.PENDING
POST = TransferFlags.POST_PENDING
VOID = TransferFlags.VOID_PENDING
#: a day boundary (so also an hour boundary): usage buckets start at T0
T0 = 19_676 * 86_400 * 1_000_000
S = 1_000_000  # one second in microseconds
USD = 1_000_000  # one dollar in atomic units


class Clock:
    """An injectable clock (int microseconds) the test moves by hand."""

    def __init__(self, now_us: int = T0) -> None:
        self.now_us = now_us

    def __call__(self) -> int:
        return self.now_us

    def advance(self, seconds: float) -> None:
        self.now_us += int(seconds * S)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_ledger(store_url: str, clock: Clock) -> Iterator[Callable[..., Ledger]]:
    """Open ledgers on this test's database with the test clock; closed at teardown."""
    opened: list[Ledger] = []

    def make(**kw: Any) -> Ledger:
        kw.setdefault("clock_us", clock)
        led = open_ledger(store_url, **kw)
        opened.append(led)
        return led

    yield make
    for led in opened:
        led.close()


@pytest.fixture
def led(make_ledger: Callable[..., Ledger]) -> Ledger:
    return make_ledger()


@pytest.fixture
def fee_led(make_ledger: Callable[..., Ledger]) -> Ledger:
    """A ledger that takes a 2.5% platform fee on every charge."""
    return make_ledger(fee_bps=250)


# --- helpers ---------------------------------------------------------------------------


def assert_invariants(led: Ledger) -> None:
    report = led.check_invariants()
    assert report.ok, report.checks
    assert {name for name, _, _ in report.checks} >= {
        "no wallet below zero",
        "every hold resolved at most once",
        "balances equal the fold of the journal",
    }


def all_history(led: Ledger, account: str | None = None, **kw: Any) -> list[Transfer]:
    items: list[Transfer] = []
    cursor = None
    while True:
        page = led.history(account, cursor=cursor, limit=1000, **kw)
        items.extend(page.items)
        if page.next_cursor is None:
            return items
        cursor = page.next_cursor


def snapshot(led: Ledger) -> tuple[object, ...]:
    """Everything a write could change: account counters and status, the journal, holds."""
    accounts = {
        a.id: (a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending, a.status)
        for a in led.list_accounts(limit=1000)
    }
    journal = [(t.id, t.amount, t.flags) for t in all_history(led)]
    holds = {}
    for t in all_history(led):
        if t.flags & PENDING:
            h = led.get_hold(t.id)
            assert h is not None
            holds[t.id] = (h.state, h.resolved_amount, h.resolved_by)
    return accounts, journal, holds


async def wallet(
    led: Ledger, wallet_id: str = "user:a", funds: int = USD, revenue_id: str = "rev:p"
) -> None:
    """A wallet holding ``funds`` and a provider revenue account."""
    await led.create_account(wallet_id, "wallet")
    await led.create_account(revenue_id, "revenue")
    if funds:
        await led.transfer(f"topup:{wallet_id}", FUND, wallet_id, funds, code="topup")


def bal(led: Ledger, account: str) -> tuple[int, int, int]:
    b = led.balance(account)
    return (b.posted, b.pending, b.available)


# --- accounts ----------------------------------------------------------------------------


async def test_system_accounts(led: Ledger, make_ledger: Callable[..., Ledger]) -> None:
    funding = led.account(FUND)
    assert funding.kind == "funding"
    assert funding.flags == AccountFlags.NONE  # may go negative
    assert funding.asset == "USDC"
    fee = led.account(FEE_ACCOUNT_ID)
    assert fee.kind == "fee"
    # opening the same database again is harmless
    again = make_ledger()
    assert again.account(FUND).id == FUND
    assert {a.id for a in again.list_accounts()} == {FUND, FEE_ACCOUNT_ID}
    assert_invariants(led)


async def test_create_account_is_idempotent(led: Ledger) -> None:
    w = await led.create_account("user:a", "wallet", owner="a", metadata={"x": 1, "y": [2]})
    assert w.kind == "wallet"
    assert w.flags & AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS
    assert w.owner == "a"
    assert w.meta == {"x": 1, "y": [2]}
    # the same fields (metadata in another key order) return the existing account
    again = await led.create_account("user:a", "wallet", owner="a", metadata={"y": [2], "x": 1})
    assert (again.id, again.kind, again.flags, again.created_us) == (
        w.id,
        w.kind,
        w.flags,
        w.created_us,
    )
    for kw in (
        {"kind": "revenue", "owner": "a", "metadata": {"x": 1, "y": [2]}},
        {"kind": "wallet", "owner": "b", "metadata": {"x": 1, "y": [2]}},
        {"kind": "wallet", "owner": "a", "metadata": {"x": 2}},
        {"kind": "wallet", "owner": "a", "metadata": {"x": 1, "y": [2]}, "flags": 0},
    ):
        with pytest.raises(IdempotencyConflict):
            await led.create_account("user:a", **kw)
    with pytest.raises(IdempotencyConflict):
        await led.create_account(FUND, "wallet")
    r = await led.create_account("rev:p", "revenue")
    assert r.flags == AccountFlags.NONE
    assert led.balance("user:a").available == 0
    assert [a.id for a in led.list_accounts("wallet")] == ["user:a"]
    assert_invariants(led)


async def test_unknown_account_reads(led: Ledger) -> None:
    with pytest.raises(AccountNotFound):
        led.balance("nobody")
    with pytest.raises(AccountNotFound):
        led.account("nobody")
    assert led.get_transfer("nothing") is None
    assert led.get_hold("nothing") is None
    assert led.history("nobody").items == []


# --- transfers and balances ------------------------------------------------------------


async def test_topup_and_transfer(led: Ledger, clock: Clock) -> None:
    await wallet(led, funds=0)
    t = await led.transfer("t1", FUND, "user:a", 5 * USD, code="topup", metadata={"src": "card"})
    assert (t.id, t.debit_account_id, t.credit_account_id, t.amount) == (
        "t1",
        FUND,
        "user:a",
        5 * USD,
    )
    assert t.code == "topup"
    assert t.meta == {"src": "card"}
    assert t.ts_us == clock.now_us
    assert t.flags == 0
    assert bal(led, "user:a") == (5 * USD, 0, 5 * USD)
    assert led.balance(FUND).posted == -5 * USD  # funding has no balance rule
    clock.advance(1)
    await led.transfer("t2", "user:a", "rev:p", 1_250_000, code="search")
    assert bal(led, "user:a") == (3_750_000, 0, 3_750_000)
    assert bal(led, "rev:p") == (1_250_000, 0, 1_250_000)
    stored = led.get_transfer("t2")
    assert stored is not None
    assert stored.amount == 1_250_000
    assert stored.ts_us == T0 + S
    assert stored.seq > led.get_transfer("t1").seq  # type: ignore[union-attr]
    a = led.account("user:a")
    assert (a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending) == (
        1_250_000,
        5 * USD,
        0,
        0,
    )
    assert_invariants(led)


async def test_no_overdraft(led: Ledger) -> None:
    await wallet(led, funds=100)
    before = snapshot(led)
    with pytest.raises(DripInsufficientCredits) as info:
        await led.transfer("t1", "user:a", "rev:p", 101)
    assert info.value.status == 402
    assert info.value.details == {"available": 100, "needed": 101, "account": "user:a"}
    with pytest.raises(DripInsufficientCredits):
        await led.charge("c1", "user:a", "rev:p", 101, code="search")
    with pytest.raises(DripInsufficientCredits):
        await led.hold("h1", "user:a", "rev:p", 101, code="search")
    assert snapshot(led) == before
    assert led.get_transfer("t1") is None
    # exactly the balance works, then nothing more
    await led.transfer("t1", "user:a", "rev:p", 100)
    assert bal(led, "user:a") == (0, 0, 0)
    with pytest.raises(DripInsufficientCredits):
        await led.transfer("t2", "user:a", "rev:p", 1)
    # a failed id is not reserved: after a top-up the same id goes through
    await led.transfer("top2", FUND, "user:a", 1)
    await led.transfer("t2", "user:a", "rev:p", 1)
    assert bal(led, "user:a") == (0, 0, 0)
    assert bal(led, "rev:p") == (101, 0, 101)
    assert_invariants(led)


async def test_remembered_balance_is_what_this_process_last_wrote(
    make_ledger: Callable[..., Ledger],
) -> None:
    led = make_ledger()
    assert led.remembered_balance("user:a") is None  # never touched here
    await wallet(led, funds=USD)
    hold = await led.hold("h1", "user:a", "rev:p", 300_000, code="search", private=True)
    assert led.remembered_balance("user:a") == Balance(USD, 300_000, USD - 300_000)
    await led.post(hold, 100_000)
    after = Balance(USD - 100_000, 0, USD - 100_000)
    assert led.remembered_balance("user:a") == after == led.balance("user:a")
    # another process charges the wallet: memory does not see it (it says "as my last
    # batch left it"), a read does; this process's next batch starts from the file again
    other = make_ledger()
    await other.transfer("elsewhere", "user:a", "rev:p", 50_000, code="search")
    assert led.remembered_balance("user:a") == after
    assert led.balance("user:a").posted == USD - 150_000
    await led.transfer("here", "user:a", "rev:p", 25_000, code="search")
    assert led.remembered_balance("user:a") == Balance(USD - 175_000, 0, USD - 175_000)
    # a blocking caller's batch (the writer thread) leaves memory exact or empty
    led.sync.transfer("blocking", "user:a", "rev:p", 5_000, code="search")
    remembered = led.remembered_balance("user:a")
    assert remembered is None or remembered == led.balance("user:a")
    assert led.balance("user:a").posted == USD - 180_000
    assert_invariants(led)


async def test_pending_holds_count_against_available(led: Ledger) -> None:
    await wallet(led, funds=100)
    await led.hold("h1", "user:a", "rev:p", 60, code="search")
    assert bal(led, "user:a") == (100, 60, 40)
    with pytest.raises(DripInsufficientCredits):
        await led.transfer("t1", "user:a", "rev:p", 41)
    with pytest.raises(DripInsufficientCredits):
        await led.hold("h2", "user:a", "rev:p", 41, code="search")
    await led.charge("c1", "user:a", "rev:p", 40, code="search")
    assert bal(led, "user:a") == (60, 60, 0)
    assert_invariants(led)


async def test_transfer_to_itself_is_refused(led: Ledger) -> None:
    await wallet(led)
    before = snapshot(led)
    with pytest.raises(InvalidTransfer):
        await led.transfer("t1", "user:a", "user:a", 1)
    assert snapshot(led) == before
    assert_invariants(led)


async def test_asset_mismatch(make_ledger: Callable[..., Ledger]) -> None:
    """Two ledgers of different assets share one database; money cannot cross."""
    usdc = make_ledger()
    eurc = make_ledger(asset=Asset("EURC", 6))
    await usdc.create_account("user:usd", "wallet")
    await eurc.create_account("user:eur", "wallet")
    await usdc.transfer("top", FUND, "user:usd", USD)
    before = snapshot(usdc)
    with pytest.raises(AssetMismatch):
        await usdc.transfer("x", "user:usd", "user:eur", 1)
    assert snapshot(usdc) == before
    assert_invariants(usdc)


# --- holds ---------------------------------------------------------------------------------


async def test_hold_reserves(led: Ledger, clock: Clock) -> None:
    await wallet(led, funds=1000)
    h = await led.hold("h1", "user:a", "rev:p", 300, code="llm", metadata={"route": "/v1"})
    assert h.flags & PENDING
    assert (h.id, h.amount, h.code, h.meta) == ("h1", 300, "llm", {"route": "/v1"})
    assert bal(led, "user:a") == (1000, 300, 700)
    assert led.account("rev:p").credits_pending == 300
    assert led.balance("rev:p").posted == 0
    hold = led.get_hold("h1")
    assert hold is not None
    assert (hold.state, hold.amount, hold.expires_us) == (HoldState.PENDING, 300, None)
    assert_invariants(led)


async def test_partial_post_releases_the_rest(led: Ledger) -> None:
    await wallet(led, funds=1000)
    h = await led.hold("h1", "user:a", "rev:p", 300, code="llm")
    charge = await led.post(h, 120)
    assert charge.amount == 120
    assert charge.fee is None
    assert charge.transfer.flags & POST
    assert charge.transfer.pending_id == "h1"
    assert charge.transfer.code == "llm"
    assert bal(led, "user:a") == (880, 0, 880)
    assert bal(led, "rev:p") == (120, 0, 120)
    assert led.account("rev:p").credits_pending == 0
    hold = led.get_hold("h1")
    assert hold is not None
    assert (hold.state, hold.resolved_amount, hold.resolved_by) == (
        HoldState.POSTED,
        120,
        charge.id,
    )
    assert_invariants(led)


async def test_full_post(led: Ledger) -> None:
    await wallet(led, funds=1000)
    h = await led.hold("h1", "user:a", "rev:p", 300, code="llm")
    charge = await led.post(h)
    assert charge.amount == 300
    assert bal(led, "user:a") == (700, 0, 700)
    assert bal(led, "rev:p") == (300, 0, 300)
    # by id, and posting exactly the held amount
    await led.hold("h2", "user:a", "rev:p", 200, code="llm")
    assert (await led.post("h2", 200)).amount == 200
    # posting zero captures nothing and releases everything
    await led.hold("h3", "user:a", "rev:p", 100, code="llm")
    assert (await led.post("h3", 0)).amount == 0
    assert bal(led, "user:a") == (500, 0, 500)
    assert led.get_hold("h3").state == HoldState.POSTED  # type: ignore[union-attr]
    assert_invariants(led)


@contextlib.contextmanager
def _writes_blocked(store_url: str) -> Iterator[None]:
    """Another connection holds the database's write lock (SQLite) or the accounts'
    table lock (PostgreSQL) until the block ends: batches wait in flight meanwhile."""
    release = _block_writes(store_url)
    try:
        yield
    finally:
        release()


def _block_writes(store_url: str) -> Callable[[], None]:
    """``_writes_blocked`` until the returned function is called (from any thread)."""
    if store_url.startswith("sqlite"):
        import sqlite3

        conn = sqlite3.connect(store_url.removeprefix("sqlite:///"), isolation_level=None,
                               check_same_thread=False)  # fmt: skip
        conn.execute("BEGIN IMMEDIATE")

        def release() -> None:
            conn.execute("COMMIT")
            conn.close()

        return release
    import psycopg

    pg = psycopg.connect(store_url)
    pg.execute("LOCK TABLE accounts IN EXCLUSIVE MODE")

    def unlock() -> None:
        pg.rollback()
        pg.close()

    return unlock


async def test_a_cancelled_callers_private_hold_is_dropped_or_voided(
    led: Ledger, store_url: str
) -> None:
    await wallet(led, funds=USD)
    # a session-like cap: each hold also reserves on it (a linked chain)
    await led.create_account("session:s", "session",
                             flags=AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)  # fmt: skip
    await led.create_account("budget:b", "funding")
    await led.transfer("budget", "budget:b", "session:s", USD, code="budget")

    caps = [("session:s", "budget:b")]  # plain (debit, credit) pairs are caps too

    def hold(hold_id: str, private: bool = True) -> asyncio.Task[Transfer]:
        return asyncio.create_task(led.hold(hold_id, "user:a", "rev:p", 300_000, code="search",
                                            private=private, caps=caps))  # fmt: skip

    async def cancel(*calls: asyncio.Task[Transfer]) -> None:
        for call in calls:
            call.cancel()
        for call in calls:
            with pytest.raises(asyncio.CancelledError):
                await call

    early = hold("h-early")
    await asyncio.sleep(0)  # submitted; its batch has not run yet
    await cancel(early)
    with _writes_blocked(store_url):
        late, public = hold("h-late"), hold("h-public", private=False)
        await asyncio.sleep(0.3)  # both batches are under way, waiting for the lock
        await cancel(late, public)
    for _ in range(500):
        voided = led.get_hold("h-late")
        if voided is not None and voided.state != HoldState.PENDING:
            break
        await asyncio.sleep(0.01)
    # a private hold nobody else can resolve: never taken, or voided once it landed
    assert led.get_hold("h-early") is None
    assert voided is not None and voided.state == HoldState.VOIDED
    cap = led.get_hold("h-late~cap0")  # the whole chain
    assert cap is not None and cap.state == HoldState.VOIDED
    # a hold whose id the caller chose stays: the caller can void it by that id
    kept = led.get_hold("h-public")
    assert kept is not None and kept.state == HoldState.PENDING
    assert bal(led, "user:a") == (USD, 300_000, USD - 300_000)
    assert bal(led, "session:s") == (USD, 300_000, USD - 300_000)
    await led.void("h-public", caps=caps)
    assert bal(led, "session:s") == (USD, 0, USD)
    assert_invariants(led)


def test_an_interrupted_blocking_wait_for_a_private_hold_voids_it(store_url: str) -> None:
    """A thread blocked on a private hold (``@meter`` on a sync function) and interrupted
    (Ctrl-C, or what a signal handler raises) never gets the hold: once it lands it is
    voided, not left reserving the funds until its timeout."""
    import signal
    import threading
    import time

    class Interrupted(BaseException):
        pass

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    led = open_ledger(store_url)
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        asyncio.run(wallet(led, funds=USD))
        release = threading.Timer(0.6, _block_writes(store_url))
        release.start()
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Interrupted):
            led.sync.hold("h-sync", "user:a", "rev:p", 300_000, code="search", private=True)
        release.join()
        for _ in range(300):
            held = led.get_hold("h-sync")
            if held is not None and held.state != HoldState.PENDING:
                break
            time.sleep(0.01)
        assert held is not None and held.state == HoldState.VOIDED
        assert bal(led, "user:a") == (USD, 0, USD)
        # a hold whose id the caller chose is the caller's to resolve: it stays
        release = threading.Timer(0.6, _block_writes(store_url))
        release.start()
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Interrupted):
            led.sync.hold("h-public", "user:a", "rev:p", 300_000, code="search")
        release.join()
        time.sleep(0.5)
        kept = led.get_hold("h-public")
        assert kept is not None and kept.state == HoldState.PENDING
        assert_invariants(led)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        led.close()


def test_a_shutdown_with_private_holds_in_flight_leaves_none_reserved(store_url: str) -> None:
    """``asyncio.run``'s teardown (Ctrl-C, a main() that returns with metered calls in
    flight) cancels the callers of private holds while their batch waits for the
    database (PostgreSQL: a statement in flight; SQLite: handed to the writer thread),
    and closes their loop: no hold may be left reserving funds until its timeout."""
    import threading
    import time

    led = open_ledger(store_url)
    try:

        async def funded() -> None:
            await wallet(led, funds=USD)
            await led.charge("warm", "user:a", "rev:p", 1, code="search")  # rows remembered

        asyncio.run(funded())
        release = threading.Timer(1.0, _block_writes(store_url))  # after the teardown
        release.start()

        async def caller(i: int) -> None:
            await led.hold(f"h{i}", "user:a", "rev:p", 10_000, code="search", private=True,
                           timeout_s=300)  # fmt: skip

        async def main() -> None:
            calls = [asyncio.ensure_future(caller(i)) for i in range(5)]
            await asyncio.sleep(0.3)  # the batch waits for the lock
            assert not any(c.done() for c in calls)
            # returning now: asyncio.run cancels every task and closes the loop

        asyncio.run(main())
        release.join()
        time.sleep(1.5)  # the writer finishes, then voids
        holds = [led.get_hold(f"h{i}") for i in range(5)]
        assert all(h is None or h.state != HoldState.PENDING for h in holds)
        assert led.balance("user:a").pending == 0
        assert_invariants(led)
    finally:
        led.close()


async def test_a_private_hold_answered_as_its_caller_is_cancelled_is_voided(
    led: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    await wallet(led, funds=USD)
    submit = led.store.submit_async
    caller: asyncio.Task[Transfer] | None = None

    def answered_then_cancelled(op: Any) -> Any:
        future = submit(op)
        # runs before the caller's own wake-up: the hold is answered, the caller is gone
        future.add_done_callback(lambda _: caller.cancel() if caller else None)
        return future

    monkeypatch.setattr(led.store, "submit_async", answered_then_cancelled)
    caller = asyncio.create_task(
        led.hold("h-race", "user:a", "rev:p", 300_000, code="search", private=True)
    )
    with pytest.raises(asyncio.CancelledError):
        await caller
    monkeypatch.undo()
    for _ in range(500):
        hold = led.get_hold("h-race")
        if hold is not None and hold.state != HoldState.PENDING:
            break
        await asyncio.sleep(0.01)
    assert hold is not None and hold.state == HoldState.VOIDED
    assert bal(led, "user:a") == (USD, 0, USD)
    assert_invariants(led)


async def test_void_releases(led: Ledger) -> None:
    await wallet(led, funds=1000)
    h = await led.hold("h1", "user:a", "rev:p", 300, code="llm")
    v = await led.void(h)
    assert v.flags & VOID
    assert v.pending_id == "h1"
    assert bal(led, "user:a") == (1000, 0, 1000)
    assert bal(led, "rev:p") == (0, 0, 0)
    assert led.account("rev:p").credits_pending == 0
    assert led.get_hold("h1").state == HoldState.VOIDED  # type: ignore[union-attr]
    await led.hold("h2", "user:a", "rev:p", 1000, code="llm")
    await led.void("h2")
    assert bal(led, "user:a") == (1000, 0, 1000)
    assert_invariants(led)


async def test_a_hold_resolves_at_most_once(led: Ledger) -> None:
    await wallet(led, funds=1000)
    # post after void
    h1 = await led.hold("h1", "user:a", "rev:p", 100, code="llm")
    await led.void(h1)
    before = snapshot(led)
    with pytest.raises(HoldAlreadyResolved):
        await led.post(h1)
    with pytest.raises(HoldAlreadyResolved):
        await led.post("h1", 50, transfer_id="h1-post-later")
    assert snapshot(led) == before
    # void after post
    h2 = await led.hold("h2", "user:a", "rev:p", 100, code="llm")
    await led.post(h2, 40)
    before = snapshot(led)
    with pytest.raises(HoldAlreadyResolved):
        await led.void(h2)
    with pytest.raises(HoldAlreadyResolved):
        await led.void("h2", transfer_id="h2-void-later")
    # a second capture under a new id
    with pytest.raises(HoldAlreadyResolved):
        await led.post(h2, 40, transfer_id="h2-second-post")
    assert snapshot(led) == before
    assert bal(led, "user:a") == (960, 0, 960)
    assert_invariants(led)


async def test_second_capture_of_a_posted_hold_is_hold_already_resolved(led: Ledger) -> None:
    """post(hold) twice for different amounts is a second capture of one hold, which the
    contract refuses with HoldAlreadyResolved. The caller never chose the post's id (the
    ledger derives it), so this is not an IdempotencyConflict about "an id reused"."""
    await wallet(led, funds=1000)
    h = await led.hold("h1", "user:a", "rev:p", 100, code="llm")
    await led.post(h, 40)
    before = snapshot(led)
    with pytest.raises(HoldAlreadyResolved):
        await led.post(h, 60)
    with pytest.raises(HoldAlreadyResolved):
        await led.post("h1")  # all of it, after 40 was captured
    assert snapshot(led) == before
    assert bal(led, "user:a") == (960, 0, 960)
    assert_invariants(led)


async def test_repeating_a_resolution_is_an_idempotent_replay(led: Ledger) -> None:
    """The exact same post (or void) again is a retry: the original comes back, and
    nothing moves a second time."""
    await wallet(led, funds=1000)
    h = await led.hold("h1", "user:a", "rev:p", 100, code="llm")
    first = await led.post(h, 40)
    before = snapshot(led)
    again = await led.post(h, 40)
    assert again.transfer == led.get_transfer(first.id)
    assert again.id == first.id
    assert snapshot(led) == before
    h2 = await led.hold("h2", "user:a", "rev:p", 100, code="llm")
    v1 = await led.void(h2)
    before = snapshot(led)
    v2 = await led.void("h2")
    assert (v2.id, v2.amount, v2.flags) == (v1.id, v1.amount, v1.flags)
    assert snapshot(led) == before
    assert bal(led, "user:a") == (960, 0, 960)
    assert_invariants(led)


async def test_post_more_than_held(led: Ledger) -> None:
    await wallet(led, funds=1000)
    h = await led.hold("h1", "user:a", "rev:p", 100, code="llm")
    before = snapshot(led)
    with pytest.raises(AmountExceedsHold) as info:
        await led.post(h, 101)
    assert isinstance(info.value, InvalidTransfer)
    assert snapshot(led) == before
    # the hold is still open and can be posted within its amount
    assert led.get_hold("h1").state == HoldState.PENDING  # type: ignore[union-attr]
    assert (await led.post(h, 100)).amount == 100
    assert bal(led, "user:a") == (900, 0, 900)
    assert_invariants(led)


async def test_unknown_hold(led: Ledger) -> None:
    await wallet(led)
    await led.transfer("plain", "user:a", "rev:p", 10)
    before = snapshot(led)
    for target in ("nope", "plain"):  # "plain" is a transfer, not a hold
        with pytest.raises(HoldNotFound):
            await led.post(target)
        with pytest.raises(HoldNotFound):
            await led.void(target)
    [result] = await led.create_transfers(
        [TransferSpec("p1", "user:a", "rev:p", 5, flags=POST, pending_id="nope")]
    )
    assert isinstance(result, HoldNotFound)
    with pytest.raises(InvalidRequest):  # a non-pending Transfer object is not a hold
        await led.post(led.get_transfer("plain"))  # type: ignore[arg-type]
    assert snapshot(led) == before
    assert_invariants(led)


async def test_hold_expiry_sweep(led: Ledger, clock: Clock) -> None:
    await wallet(led, funds=1000)
    h1 = await led.hold("h1", "user:a", "rev:p", 100, code="llm", timeout_s=10)
    await led.hold("h2", "user:a", "rev:p", 200, code="llm", timeout_s=10)
    await led.hold("h3", "user:a", "rev:p", 300, code="llm", timeout_s=20)
    await led.hold("h4", "user:a", "rev:p", 50, code="llm")  # no timeout: never expires
    assert led.get_hold("h1").expires_us == T0 + 10 * S  # type: ignore[union-attr]
    assert bal(led, "user:a") == (1000, 650, 350)
    clock.advance(9.999999)
    assert led.expire_holds() == 0
    assert bal(led, "user:a") == (1000, 650, 350)
    clock.advance(0.000001)  # exactly the timeout: due
    assert led.expire_holds() == 2
    assert led.expire_holds() == 0
    assert bal(led, "user:a") == (1000, 350, 650)
    assert led.account("rev:p").credits_pending == 350
    for hid in ("h1", "h2"):
        hold = led.get_hold(hid)
        assert hold is not None
        assert hold.state == HoldState.EXPIRED
        expiry = led.get_transfer(f"{hid}~expired")
        assert expiry is not None
        assert expiry.flags & TransferFlags.EXPIRE_PENDING
        assert expiry.pending_id == hid
    assert led.get_hold("h3").state == HoldState.PENDING  # type: ignore[union-attr]
    # resolving an expired hold is refused
    before = snapshot(led)
    with pytest.raises(HoldExpired) as info:
        await led.post(h1)
    assert isinstance(info.value, HoldAlreadyResolved)
    with pytest.raises(HoldExpired):
        await led.void("h2")
    assert snapshot(led) == before
    clock.advance(3600)
    assert led.expire_holds() == 1
    assert bal(led, "user:a") == (1000, 50, 950)
    assert led.get_hold("h4").state == HoldState.PENDING  # type: ignore[union-attr]
    assert_invariants(led)


@pytest.mark.parametrize("fee_bps", [0, 250])
async def test_post_after_timeout_refuses_and_releases(
    make_ledger: Callable[..., Ledger], clock: Clock, fee_bps: int
) -> None:
    """A post naming a hold whose time has passed (no sweep yet) raises HoldExpired, and
    the hold's funds are released on the spot (HoldExpired: "its funds were released")."""
    led = make_ledger(fee_bps=fee_bps)
    await wallet(led, funds=1000)
    h = await led.hold("h1", "user:a", "rev:p", 400, code="llm", timeout_s=5)
    await led.hold("h2", "user:a", "rev:p", 100, code="llm", timeout_s=5)
    clock.advance(5)
    with pytest.raises(HoldExpired):
        await led.post(h, 100)
    assert led.get_hold("h1").state == HoldState.EXPIRED  # type: ignore[union-attr]
    assert bal(led, "user:a") == (1000, 100, 900)
    assert bal(led, "rev:p") == (0, 0, 0)
    with pytest.raises(HoldExpired):
        await led.void("h2")
    assert led.get_hold("h2").state == HoldState.EXPIRED  # type: ignore[union-attr]
    assert bal(led, "user:a") == (1000, 0, 1000)
    assert led.expire_holds() == 0
    assert_invariants(led)


async def test_hold_timeout_validation(led: Ledger) -> None:
    await wallet(led)
    before = snapshot(led)
    for bad in (-1, 30 * 24 * 3600 + 1, 1.5, True):
        with pytest.raises(InvalidRequest):
            await led.hold("h1", "user:a", "rev:p", 10, code="llm", timeout_s=bad)
    # a timeout only makes sense on a hold
    [result] = await led.create_transfers([TransferSpec("t1", "user:a", "rev:p", 10, timeout_s=5)])
    assert isinstance(result, InvalidRequest)
    assert snapshot(led) == before
    h = await led.hold("h1", "user:a", "rev:p", 10, code="llm", timeout_s=30 * 24 * 3600)
    assert h.timeout_s == 30 * 24 * 3600
    assert_invariants(led)


# --- linked chains ---------------------------------------------------------------------------


async def test_linked_chain_commits_together(led: Ledger) -> None:
    await wallet(led, funds=0)
    await led.create_account("fee:p2", "revenue")
    results = await led.create_transfers(
        [
            TransferSpec("a", FUND, "user:a", 1000, flags=LINKED),
            TransferSpec("b", "user:a", "rev:p", 700, flags=LINKED),
            TransferSpec("c", "rev:p", "fee:p2", 70),
        ]
    )
    assert [r.id for r in results] == ["a", "b", "c"]
    assert all(isinstance(r, Transfer) for r in results)
    assert not any(r.flags & LINKED for r in results)  # type: ignore[union-attr]
    assert bal(led, "user:a") == (300, 0, 300)
    assert bal(led, "rev:p") == (630, 0, 630)
    assert bal(led, "fee:p2") == (70, 0, 70)
    assert_invariants(led)


async def test_linked_chain_is_all_or_nothing(led: Ledger) -> None:
    await wallet(led, funds=100)
    before = snapshot(led)
    results = await led.create_transfers(
        [
            TransferSpec("a", FUND, "user:a", 500, flags=LINKED),
            TransferSpec("b", "user:a", "rev:p", 2000),  # more than 100 + 500
        ]
    )
    assert isinstance(results[0], LinkedEventFailed)
    assert isinstance(results[1], DripInsufficientCredits)
    assert snapshot(led) == before
    assert led.get_transfer("a") is None
    assert led.history("user:a", code="transfer").items == []
    # the failure is in the middle: before and after it everything rolls back
    results = await led.create_transfers(
        [
            TransferSpec("x", FUND, "user:a", 500, flags=LINKED),
            TransferSpec("h", "user:a", "rev:p", 300, flags=LINKED | PENDING),
            TransferSpec("y", "user:a", "nobody", 1, flags=LINKED),
            TransferSpec("z", FUND, "rev:p", 5),
        ]
    )
    assert [type(r) for r in results] == [
        LinkedEventFailed,
        LinkedEventFailed,
        AccountNotFound,
        LinkedEventFailed,
    ]
    assert snapshot(led) == before
    assert led.get_hold("h") is None
    # the failed ids are free: the fixed chain goes through
    results = await led.create_transfers(
        [
            TransferSpec("a", FUND, "user:a", 500, flags=LINKED),
            TransferSpec("b", "user:a", "rev:p", 600),
        ]
    )
    assert all(isinstance(r, Transfer) for r in results)
    assert bal(led, "user:a") == (0, 0, 0)
    assert_invariants(led)


async def test_chains_do_not_affect_their_neighbours(led: Ledger) -> None:
    await wallet(led, funds=100)
    results = await led.create_transfers(
        [
            TransferSpec("before", "user:a", "rev:p", 10),
            TransferSpec("c1", FUND, "user:a", 1, flags=LINKED),
            TransferSpec("c2", "user:a", "rev:p", 10_000),
            TransferSpec("lone-bad", "user:a", "rev:p", 10_000),
            TransferSpec("after", "user:a", "rev:p", 20),
        ]
    )
    assert isinstance(results[0], Transfer)
    assert isinstance(results[1], LinkedEventFailed)
    assert isinstance(results[2], DripInsufficientCredits)
    assert isinstance(results[3], DripInsufficientCredits)
    assert isinstance(results[4], Transfer)
    assert bal(led, "user:a") == (70, 0, 70)
    assert {t.id for t in all_history(led, "user:a")} == {"topup:user:a", "before", "after"}
    assert_invariants(led)


async def test_open_chain_fails_whole(led: Ledger) -> None:
    await wallet(led, funds=100)
    before = snapshot(led)
    results = await led.create_transfers(
        [
            TransferSpec("a", "user:a", "rev:p", 10, flags=LINKED),
            TransferSpec("b", "user:a", "rev:p", 10, flags=LINKED),
        ]
    )
    assert len(results) == 2
    assert all(isinstance(r, InvalidTransfer) for r in results)
    assert snapshot(led) == before
    assert_invariants(led)


async def test_chain_length_limit(led: Ledger) -> None:
    await wallet(led, funds=1000)
    before = snapshot(led)

    def chain(prefix: str, n: int) -> list[TransferSpec]:
        return [
            TransferSpec(f"{prefix}{i}", "user:a", "rev:p", 1, flags=LINKED if i < n - 1 else 0)
            for i in range(n)
        ]

    too_long = await led.create_transfers(chain("long", 65))
    assert len(too_long) == 65
    assert all(isinstance(r, errors.DripError) for r in too_long)
    assert snapshot(led) == before
    ok = await led.create_transfers(chain("ok", 64))
    assert all(isinstance(r, Transfer) for r in ok)
    assert bal(led, "user:a") == (936, 0, 936)
    assert_invariants(led)


async def test_failed_chain_posting_a_hold_leaves_it_open(led: Ledger) -> None:
    await wallet(led, funds=1000)
    await led.hold("h1", "user:a", "rev:p", 300, code="llm")
    before = snapshot(led)
    results = await led.create_transfers(
        [
            TransferSpec("p1", amount=200, flags=POST | LINKED, pending_id="h1", code="llm"),
            TransferSpec("t1", "user:a", "rev:p", 10_000),
        ]
    )
    assert isinstance(results[0], LinkedEventFailed)
    assert isinstance(results[1], DripInsufficientCredits)
    assert snapshot(led) == before
    assert led.get_hold("h1").state == HoldState.PENDING  # type: ignore[union-attr]
    assert (await led.post("h1", 250)).amount == 250
    assert bal(led, "user:a") == (750, 0, 750)
    assert_invariants(led)


async def test_failed_chain_next_to_new_account_in_the_same_batch(led: Ledger) -> None:
    """Concurrent callers are coalesced into one batch (group commit). A linked chain
    that fails must leave nothing behind, even on an account created in that batch."""
    await wallet(led, funds=1000)
    created, results = await asyncio.gather(
        led.create_account("user:new", "wallet"),
        led.create_transfers(
            [
                TransferSpec("a", FUND, "user:new", 100, flags=LINKED),
                TransferSpec("b", "user:new", "rev:p", 1000),
            ]
        ),
    )
    assert created.id == "user:new"
    assert isinstance(results[0], LinkedEventFailed)
    assert isinstance(results[1], DripInsufficientCredits)
    assert led.get_transfer("a") is None
    assert bal(led, "user:new") == (0, 0, 0)
    assert led.balance(FUND).posted == -1000
    assert_invariants(led)


async def test_failed_chain_next_to_new_hold_in_the_same_batch(led: Ledger) -> None:
    """A hold created in a batch and posted by a chain that fails stays open."""
    await wallet(led, funds=1000)
    hold, _ = await asyncio.gather(
        led.hold("h1", "user:a", "rev:p", 300, code="llm"),
        led.create_transfers(
            [
                TransferSpec("p1", amount=100, flags=POST | LINKED, pending_id="h1", code="llm"),
                TransferSpec("t1", "user:a", "rev:p", 10_000),
            ]
        ),
    )
    assert hold.id == "h1"
    assert led.get_transfer("p1") is None
    stored = led.get_hold("h1")
    assert stored is not None
    assert stored.state == HoldState.PENDING
    assert bal(led, "user:a") == (1000, 300, 700)
    assert_invariants(led)
    assert (await led.post("h1", 100)).amount == 100
    assert bal(led, "user:a") == (900, 0, 900)
    assert_invariants(led)


# --- fees --------------------------------------------------------------------------------


async def test_charge_fee_split(fee_led: Ledger) -> None:
    led = fee_led
    await wallet(led, funds=10 * USD)
    charge = await led.charge("c1", "user:a", "rev:p", USD, code="search")
    assert charge.id == "c1"
    assert charge.amount == USD
    assert charge.fee is not None
    assert (charge.fee.id, charge.fee.amount, charge.fee.code) == ("c1~fee", 25_000, "platform_fee")
    assert (charge.fee.debit_account_id, charge.fee.credit_account_id) == (
        "rev:p",
        FEE_ACCOUNT_ID,
    )
    assert bal(led, "user:a") == (9 * USD, 0, 9 * USD)
    assert bal(led, "rev:p") == (975_000, 0, 975_000)
    assert bal(led, FEE_ACCOUNT_ID) == (25_000, 0, 25_000)
    # rounded down: the provider keeps the remainder
    small = await led.charge("c2", "user:a", "rev:p", 39, code="search")
    assert small.fee is None
    odd = await led.charge("c3", "user:a", "rev:p", 79, code="search")
    assert odd.fee is not None
    assert odd.fee.amount == 1
    assert bal(led, FEE_ACCOUNT_ID) == (25_001, 0, 25_001)
    assert bal(led, "rev:p") == (975_000 + 39 + 78, 0, 975_000 + 39 + 78)
    assert_invariants(led)


async def test_post_fee_is_on_the_captured_amount(fee_led: Ledger) -> None:
    led = fee_led
    await wallet(led, funds=10 * USD)
    h = await led.hold("h1", "user:a", "rev:p", USD, code="llm")
    charge = await led.post(h, 400_000)
    assert charge.fee is not None
    assert charge.fee.amount == 10_000
    assert bal(led, "rev:p") == (390_000, 0, 390_000)
    await led.hold("h2", "user:a", "rev:p", 2 * USD, code="llm")
    full = await led.post("h2")
    assert full.amount == 2 * USD
    assert full.fee is not None
    assert full.fee.amount == 50_000
    assert bal(led, FEE_ACCOUNT_ID) == (60_000, 0, 60_000)
    assert bal(led, "user:a") == (10 * USD - 2_400_000, 0, 10 * USD - 2_400_000)
    # a void takes no fee
    await led.hold("h3", "user:a", "rev:p", USD, code="llm")
    await led.void("h3")
    assert bal(led, FEE_ACCOUNT_ID) == (60_000, 0, 60_000)
    assert_invariants(led)


async def test_refused_charge_takes_no_fee(fee_led: Ledger) -> None:
    led = fee_led
    await wallet(led, funds=100)
    before = snapshot(led)
    with pytest.raises(DripInsufficientCredits):
        await led.charge("c1", "user:a", "rev:p", 10_000, code="search")
    assert snapshot(led) == before
    assert led.get_transfer("c1~fee") is None
    assert_invariants(led)


async def test_fee_rate_is_validated(store_url: str) -> None:
    for bad in (-1, 10_000, 2.5, "250"):
        with pytest.raises(errors.ConfigError):
            open_ledger(store_url, fee_bps=bad)  # type: ignore[arg-type]


# --- idempotency ---------------------------------------------------------------------------


async def test_transfer_replay_moves_money_once(led: Ledger, clock: Clock) -> None:
    await wallet(led, funds=100)
    first = await led.transfer("t1", "user:a", "rev:p", 100, code="x", metadata={"a": 1, "b": 2})
    before = snapshot(led)
    clock.advance(60)
    # same fields, metadata in another key order; the wallet could not pay for it again
    again = await led.transfer("t1", "user:a", "rev:p", 100, code="x", metadata={"b": 2, "a": 1})
    assert (again.id, again.amount, again.ts_us) == (first.id, first.amount, first.ts_us)
    assert again == led.get_transfer("t1")
    assert snapshot(led) == before
    assert bal(led, "user:a") == (0, 0, 0)
    assert [t.id for t in all_history(led, "rev:p")] == ["t1"]
    assert_invariants(led)


async def test_conflicting_replay_writes_nothing(led: Ledger) -> None:
    await wallet(led, funds=1000)
    await led.create_account("rev:q", "revenue")
    await led.transfer("t1", "user:a", "rev:p", 100, code="x", metadata={"a": 1})
    before = snapshot(led)
    for args, kw in (
        (("user:a", "rev:p", 101), {"code": "x", "metadata": {"a": 1}}),
        (("user:a", "rev:q", 100), {"code": "x", "metadata": {"a": 1}}),
        (("user:a", "rev:p", 100), {"code": "y", "metadata": {"a": 1}}),
        (("user:a", "rev:p", 100), {"code": "x", "metadata": {"a": 2}}),
        (("user:a", "rev:p", 100), {"code": "x"}),
        ((FUND, "user:a", 100), {"code": "x", "metadata": {"a": 1}}),
    ):
        with pytest.raises(IdempotencyConflict) as info:
            await led.transfer("t1", *args, **kw)
        assert info.value.status == 409
    # the same id as a hold or a charge is a conflict too
    with pytest.raises(IdempotencyConflict):
        await led.hold("t1", "user:a", "rev:p", 100, code="x", metadata={"a": 1})
    assert snapshot(led) == before
    assert bal(led, "user:a") == (900, 0, 900)
    assert_invariants(led)


async def test_charge_replay_with_fee(fee_led: Ledger) -> None:
    led = fee_led
    await wallet(led, funds=USD)
    first = await led.charge("c1", "user:a", "rev:p", 400_000, code="search")
    before = snapshot(led)
    again = await led.charge("c1", "user:a", "rev:p", 400_000, code="search")
    assert again.id == first.id
    assert again.fee is not None
    assert first.fee is not None
    assert again.fee.id == first.fee.id
    assert snapshot(led) == before
    with pytest.raises(IdempotencyConflict):
        await led.charge("c1", "user:a", "rev:p", 500_000, code="search")
    with pytest.raises(IdempotencyConflict):
        await led.charge("c1", "user:a", "rev:p", 400_000, code="other")
    assert snapshot(led) == before
    assert bal(led, "user:a") == (600_000, 0, 600_000)
    assert bal(led, FEE_ACCOUNT_ID) == (10_000, 0, 10_000)
    assert_invariants(led)


async def test_hold_replay_reserves_once(led: Ledger, clock: Clock) -> None:
    await wallet(led, funds=1000)
    first = await led.hold("h1", "user:a", "rev:p", 600, code="llm", timeout_s=30)
    before = snapshot(led)
    clock.advance(1)
    again = await led.hold("h1", "user:a", "rev:p", 600, code="llm", timeout_s=30)
    assert (again.id, again.amount, again.ts_us) == (first.id, first.amount, first.ts_us)
    assert snapshot(led) == before
    assert bal(led, "user:a") == (1000, 600, 400)
    for kw in ({"timeout_s": 31}, {"timeout_s": 0}, {"timeout_s": 30, "code": "other"}):
        kw.setdefault("code", "llm")
        with pytest.raises(IdempotencyConflict):
            await led.hold("h1", "user:a", "rev:p", 600, **kw)
    with pytest.raises(IdempotencyConflict):
        await led.transfer("h1", "user:a", "rev:p", 600, code="llm")
    assert snapshot(led) == before
    # after the hold resolves, replaying its creation still returns it and moves nothing
    await led.post(first, 100)
    before = snapshot(led)
    replay = await led.hold("h1", "user:a", "rev:p", 600, code="llm", timeout_s=30)
    assert replay.id == "h1"
    assert snapshot(led) == before
    assert bal(led, "user:a") == (900, 0, 900)
    assert_invariants(led)


async def test_conflicting_post_replay(led: Ledger) -> None:
    await wallet(led, funds=1000)
    await led.hold("h1", "user:a", "rev:p", 300, code="llm")
    await led.post("h1", 100, transfer_id="cap1")
    before = snapshot(led)
    again = await led.post("h1", 100, transfer_id="cap1")
    assert again.id == "cap1"
    with pytest.raises(IdempotencyConflict):
        await led.post("h1", 150, transfer_id="cap1")
    assert snapshot(led) == before
    assert_invariants(led)


async def test_tilde_ids_are_reserved(led: Ledger) -> None:
    await wallet(led, funds=1000)
    await led.hold("h1", "user:a", "rev:p", 100, code="llm")
    before = snapshot(led)
    with pytest.raises(InvalidId):
        await led.create_account("user:b~x", "wallet")
    with pytest.raises(InvalidId):
        await led.transfer("t~1", "user:a", "rev:p", 1)
    with pytest.raises(InvalidId):
        await led.charge("c~fee", "user:a", "rev:p", 1, code="x")
    with pytest.raises(InvalidId):
        await led.hold("h~2", "user:a", "rev:p", 1, code="x")
    with pytest.raises(InvalidId):
        await led.post("h1", 10, transfer_id="h1~post")
    with pytest.raises(InvalidId):
        await led.void("h1", transfer_id="h1~void")
    assert snapshot(led) == before
    # create_transfers reports each transfer's error instead of raising it; the other
    # (unlinked) transfers of the call go ahead
    results = await led.create_transfers(
        [TransferSpec("topup:user:a~fee", FUND, "user:a", 1), TransferSpec("ok", FUND, "user:a", 2)]
    )
    assert isinstance(results[0], InvalidId)
    assert isinstance(results[1], Transfer)
    assert led.get_transfer("topup:user:a~fee") is None
    assert bal(led, "user:a") == (1002, 100, 902)
    assert_invariants(led)


# --- reads -----------------------------------------------------------------------------------


async def test_history_pagination(led: Ledger, clock: Clock) -> None:
    await wallet(led, funds=1000)
    await led.create_account("user:b", "wallet")
    ids = []
    for i in range(23):
        clock.advance(1)
        tid = f"t{i:02d}"
        await led.transfer(tid, "user:a", "rev:p", 1 + i % 3, code="even" if i % 2 else "odd")
        ids.append(tid)
        if i % 5 == 0:  # other accounts' transfers interleave
            await led.transfer(f"other{i}", FUND, "user:b", 1)
    expected = ["topup:user:a", *ids][::-1]  # newest first
    for limit in (1, 4, 7, 12, 24, 100):
        seen: list[str] = []
        seqs: list[int] = []
        cursor = None
        pages = 0
        while True:
            page = led.history("user:a", limit=limit, cursor=cursor)
            pages += 1
            assert len(page.items) <= limit
            seen += [t.id for t in page.items]
            seqs += [t.seq for t in page.items]
            if page.next_cursor is None:
                break
            assert len(page.items) == limit
            cursor = page.next_cursor
        assert seen == expected, limit  # no duplicates, nothing missed, newest first
        assert seqs == sorted(seqs, reverse=True)
        assert pages == max(1, -(-len(expected) // limit))
    # filters combine with pagination
    odd = all_history(led, "user:a", code="odd")
    assert [t.id for t in odd] == [t for t in expected if t[1:].isdigit() and int(t[1:]) % 2 == 0]
    window = all_history(led, "user:a", since_us=T0 + 5 * S, until_us=T0 + 10 * S)
    assert {t.ts_us for t in window} == {T0 + k * S for k in range(5, 10)}
    assert [t.id for t in window] == ["t08", "t07", "t06", "t05", "t04"]
    everything = all_history(led)
    assert len(everything) == len(expected) + 5
    assert len({t.id for t in everything}) == len(everything)
    assert all(t.id.startswith("other") for t in all_history(led, "user:b"))
    assert_invariants(led)


async def test_history_rejects_bad_arguments(led: Ledger) -> None:
    await wallet(led)
    for limit in (0, -1, 1001, 2.0):
        with pytest.raises(InvalidRequest):
            led.history("user:a", limit=limit)  # type: ignore[arg-type]
    for cursor in ("garbage!!", "eHl6", "czEyYQ"):
        with pytest.raises(InvalidRequest):
            led.history("user:a", cursor=cursor)


async def test_usage_aggregates(led: Ledger, clock: Clock) -> None:
    await wallet(led, funds=10 * USD)
    await wallet(led, "user:b", funds=10 * USD, revenue_id="rev:p")
    hour = 3600 * S
    # bucket 0: two searches and a posted llm call by a; a search by b
    await led.charge("s1", "user:a", "rev:p", 100, code="search")
    clock.advance(10)
    await led.charge("s2", "user:a", "rev:p", 250, code="search")
    await led.hold("h1", "user:a", "rev:p", 5000, code="llm")
    await led.post("h1", 1200)
    await led.charge("s3", "user:b", "rev:p", 7, code="search")
    # not usage: holds still open, voided, expired; top-ups; provider payouts
    await led.hold("h2", "user:a", "rev:p", 999, code="llm")
    await led.hold("h3", "user:a", "rev:p", 999, code="llm")
    await led.void("h3")
    await led.hold("h4", "user:a", "rev:p", 999, code="llm", timeout_s=1)
    clock.advance(2)
    assert led.expire_holds() == 1
    await led.transfer("payout", "rev:p", FUND, 10, code="payout")
    # bucket 1
    clock.now_us = T0 + hour + 5 * S
    await led.charge("s4", "user:a", "rev:p", 1000, code="search")
    await led.post("h2", 999)
    rows = led.usage(None, bucket_s=3600)
    assert rows == [
        UsageRow("llm", T0, 1, 1200),
        UsageRow("search", T0, 3, 357),
        UsageRow("llm", T0 + hour, 1, 999),
        UsageRow("search", T0 + hour, 1, 1000),
    ]
    assert led.usage("user:b", bucket_s=3600) == [UsageRow("search", T0, 1, 7)]
    # one bucket for the whole day; a time window
    assert led.usage("user:a", bucket_s=86_400) == [
        UsageRow("llm", T0 // (86_400 * S) * 86_400 * S, 2, 2199),
        UsageRow("search", T0 // (86_400 * S) * 86_400 * S, 3, 1350),
    ]
    assert led.usage("user:a", since_us=T0 + 10 * S, until_us=T0 + hour, bucket_s=60) == [
        UsageRow("llm", T0, 1, 1200),
        UsageRow("search", T0, 1, 250),
    ]
    for bad in (0, -60, 1.5):
        with pytest.raises(InvalidRequest):
            led.usage(None, bucket_s=bad)  # type: ignore[arg-type]
    assert_invariants(led)


# --- frozen accounts ---------------------------------------------------------------------------


async def test_frozen_accounts_refuse_debits_accept_credits(led: Ledger) -> None:
    await wallet(led, funds=1000)
    await led.hold("h0", "user:a", "rev:p", 100, code="llm")
    frozen = await led.set_status("user:a", "frozen")
    assert frozen.status == "frozen"
    assert led.account("user:a").status == "frozen"
    before = snapshot(led)
    with pytest.raises(AccountFrozen) as info:
        await led.transfer("t1", "user:a", "rev:p", 1)
    assert info.value.status == 402  # a top-up resumes a paused user
    with pytest.raises(AccountFrozen):
        await led.charge("c1", "user:a", "rev:p", 1, code="search")
    with pytest.raises(AccountFrozen):
        await led.hold("h1", "user:a", "rev:p", 1, code="search")
    assert snapshot(led) == before
    # credits still land; releasing a hold is not a debit
    await led.transfer("top2", FUND, "user:a", 500, code="topup")
    await led.void("h0")
    assert bal(led, "user:a") == (1500, 0, 1500)
    # freezing twice is harmless; unfreezing restores debits
    await led.set_status("user:a", "frozen")
    await led.set_status("user:a", "open")
    await led.transfer("t1", "user:a", "rev:p", 1)
    assert bal(led, "user:a") == (1499, 0, 1499)
    with pytest.raises(InvalidRequest):
        await led.set_status("user:a", "asleep")
    with pytest.raises(AccountNotFound):
        await led.set_status("nobody", "frozen")
    assert led.account("user:a").status == "open"
    assert_invariants(led)


async def test_a_batch_runs_in_no_callers_context(led: Ledger) -> None:
    """The operations of many callers share a batch: it must not run in the context of
    whichever caller submitted first (a server's request id would tag every log line of
    the batch, for other requests' work too)."""
    import contextvars

    tag: contextvars.ContextVar[str] = contextvars.ContextVar("tag", default="none")
    await wallet(led, funds=USD)
    seen: list[str] = []
    clock = led.store.clock_us

    def clock_that_looks() -> int:
        seen.append(tag.get())
        return clock()

    led.store.clock_us = clock_that_looks  # type: ignore[method-assign]

    async def caller(name: str) -> None:
        tag.set(name)
        await led.charge(f"ctx-{name}", "user:a", "rev:p", 1, code="search")

    await asyncio.gather(caller("first"), caller("second"))
    assert seen and set(seen) == {"none"}, seen
