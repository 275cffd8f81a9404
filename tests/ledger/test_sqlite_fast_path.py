"""SQLite's loop-thread fast path applies a batch to the rows its connection remembers,
only when ``PRAGMA data_version`` says nobody else committed since. It must never act on
a stale memory: other stores on the file (standing for other processes) and plain SQL
change rows behind its back here. And under a steady load the WAL must stay bounded."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from drip import errors
from drip.ledger import Ledger, open_ledger
from drip.ledger import sqlite as sqlite_store


@pytest.fixture
def pair(tmp_path: Any) -> Iterator[tuple[Ledger, Ledger, str]]:
    path = f"{tmp_path}/ledger.db"
    a = open_ledger(f"sqlite:///{path}")
    b = open_ledger(f"sqlite:///{path}")
    try:
        yield a, b, path
    finally:
        a.close()
        b.close()


@pytest.fixture
def fast_hits(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each fast-path attempt was answered from memory."""
    hits: list[bool] = []
    real = sqlite_store.SqliteStore._from_memory

    def spy(self: Any, cur: Any, window: Any, ops: Any, **kwargs: Any) -> Any:
        try:
            result = real(self, cur, window, ops, **kwargs)
        except Exception:
            hits.append(False)  # a replay met the unique index: rolled back, read again
            raise
        hits.append(result is not None)
        return result

    monkeypatch.setattr(sqlite_store.SqliteStore, "_from_memory", spy)
    return hits


async def _fund(led: Ledger, amount: int) -> None:
    await led.create_account("user:w", "wallet")
    await led.create_account("rev:p", "revenue")
    await led.transfer("fund-1", "funding:USDC", "user:w", amount, code="topup")


async def test_memory_is_used_when_nothing_changed(
    pair: tuple[Ledger, Ledger, str], fast_hits: list[bool]
) -> None:
    a, _, _ = pair
    await _fund(a, 1000)
    for i in range(5):
        hold = await a.hold(f"h{i}", "user:w", "rev:p", 10, code="x")
        await a.post(hold, 7)
    assert fast_hits.count(True) >= 9  # all but (at most) the first read from memory
    assert a.balance("user:w").posted == 1000 - 5 * 7
    assert a.check_invariants().ok


async def test_a_charge_by_another_store_is_never_overspent(
    pair: tuple[Ledger, Ledger, str], fast_hits: list[bool]
) -> None:
    a, b, _ = pair
    await _fund(a, 1000)
    await a.charge("c1", "user:w", "rev:p", 100, code="x")  # a remembers 900
    await b.charge("c2", "user:w", "rev:p", 800, code="x")  # really 100 left
    with pytest.raises(errors.DripInsufficientCredits):
        await a.charge("c3", "user:w", "rev:p", 500, code="x")
    await a.charge("c4", "user:w", "rev:p", 100, code="x")
    assert b.balance("user:w").available == 0 and a.balance("user:w").posted == 0
    assert a.check_invariants().ok


async def test_a_top_up_elsewhere_is_seen(pair: tuple[Ledger, Ledger, str]) -> None:
    a, b, _ = pair
    await _fund(a, 100)
    await a.charge("c1", "user:w", "rev:p", 100, code="x")  # a remembers 0
    await b.transfer("fund-2", "funding:USDC", "user:w", 500, code="topup")
    assert (await a.charge("c2", "user:w", "rev:p", 300, code="x")).amount == 300
    assert a.balance("user:w").available == 200


async def test_a_hold_resolved_elsewhere_is_not_resolved_twice(
    pair: tuple[Ledger, Ledger, str],
) -> None:
    a, b, _ = pair
    await _fund(a, 1000)
    hold = await a.hold("h1", "user:w", "rev:p", 400, code="x")  # a remembers it open
    await b.void("h1")
    with pytest.raises(errors.HoldAlreadyResolved):
        await a.post(hold, 300)
    assert a.balance("user:w").available == 1000
    assert a.check_invariants().ok


async def test_plain_sql_from_another_connection_is_seen(pair: tuple[Ledger, Ledger, str]) -> None:
    a, _, path = pair
    await _fund(a, 1000)
    await a.charge("c1", "user:w", "rev:p", 1, code="x")  # a remembers the wallet open
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.execute("UPDATE accounts SET status = 'frozen' WHERE id = 'user:w'")
    with pytest.raises(errors.DripError) as refused:
        await a.charge("c2", "user:w", "rev:p", 1, code="x")
    assert "frozen" in refused.value.message.lower()


async def test_a_replayed_id_is_answered_from_the_file(
    pair: tuple[Ledger, Ledger, str], fast_hits: list[bool]
) -> None:
    a, b, _ = pair
    await _fund(a, 1000)
    first = await a.charge("same-id", "user:w", "rev:p", 250, code="x")
    await a.charge("warm", "user:w", "rev:p", 1, code="x")  # memory is current again
    fast_hits.clear()
    again = await a.charge("same-id", "user:w", "rev:p", 250, code="x")  # looks new to memory
    assert again.transfer.id == first.transfer.id and again.transfer.seq == first.transfer.seq
    # memory took it for new; the insert met the unique index, the batch was rolled back
    # and read again, and the answer is the original's (same seq)
    assert fast_hits == [True]
    with pytest.raises(errors.IdempotencyConflict):
        await a.charge("same-id", "user:w", "rev:p", 251, code="x")
    assert a.balance("user:w").posted == 749
    # a replay in the same batch as new work: the new work still lands, once
    results = await asyncio.gather(
        a.charge("same-id", "user:w", "rev:p", 250, code="x"),
        a.charge("new-1", "user:w", "rev:p", 9, code="x"),
    )
    assert [r.amount for r in results] == [250, 9]
    assert b.balance("user:w").posted == 740
    assert a.check_invariants().ok


async def test_the_wal_stays_bounded_under_a_steady_load(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_BATCHES", 50)
    path = f"{tmp_path}/wal.db"
    led = open_ledger(f"sqlite:///{path}")
    try:
        await _fund(led, 10**12)

        async def caller(n: int) -> None:
            for i in range(n):
                hold = await led.hold(f"{n}-{id(asyncio.current_task())}-{i}", "user:w",
                                      "rev:p", 10, code="x")  # fmt: skip
                await led.post(hold, 5)

        await asyncio.gather(*(caller(250) for _ in range(8)))  # ~1,000 batches
        wal = os.path.getsize(f"{path}-wal")
        # without checkpoints these batches append ~30 MB of frames
        assert wal < 12 * 2**20, wal
        assert led.balance("user:w").posted == 10**12 - 8 * 250 * 5
        assert led.check_invariants().ok
    finally:
        led.close()


async def test_async_calls_on_a_closed_store_fail(tmp_path: Any) -> None:
    led = open_ledger(f"sqlite:///{tmp_path}/closed.db")
    await _fund(led, 100)
    led.close()
    with pytest.raises(errors.DripError):
        await asyncio.wait_for(led.charge("c2", "user:w", "rev:p", 1, code="x"), 10)


async def test_account_reads_from_memory_are_never_stale(
    pair: tuple[Ledger, Ledger, str],
) -> None:
    a, b, path = pair
    await _fund(a, 1000)
    await a.charge("c1", "user:w", "rev:p", 100, code="x")
    assert a.balance("user:w").available == 900  # memory, provably current
    await b.charge("c2", "user:w", "rev:p", 50, code="x")  # another connection
    assert a.balance("user:w").available == 850  # memory is not trusted: the file answers
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.execute("UPDATE accounts SET status = 'frozen' WHERE id = 'user:w'")
    assert a.store.get_account("user:w").status == "frozen"  # type: ignore[union-attr]
    assert a.check_invariants().ok


async def test_side_table_writes_keep_the_memory_current(
    pair: tuple[Ledger, Ledger, str], fast_hits: list[bool]
) -> None:
    """Idempotency records, API keys, x402 reservations are written with ``execute``
    between batches; on the loop's connection they do not make the next batch read."""
    a, _, _ = pair
    await _fund(a, 1000)
    a.store.execute("CREATE TABLE IF NOT EXISTS side_records (k TEXT PRIMARY KEY)")
    await a.charge("c0", "user:w", "rev:p", 1, code="x")
    fast_hits.clear()
    for i in range(5):
        assert a.store.execute("INSERT INTO side_records VALUES (?) ON CONFLICT DO NOTHING",
                               (f"k{i}",)) == 1  # fmt: skip
        assert a.store.execute("INSERT INTO side_records VALUES (?) ON CONFLICT DO NOTHING",
                               (f"k{i}",)) == 0  # fmt: skip
        await a.charge(f"c{i + 1}", "user:w", "rev:p", 1, code="x")
    assert fast_hits == [True] * 5
    assert a.store.query("SELECT count(*) FROM side_records", ())[0][0] == 5
    assert a.balance("user:w").posted == 1000 - 6


# --- windows: a batch of holds is answered before it commits ---------------------------
#
# Windows are used only by a store alone on its file (no other store of the process, no
# other Drip process), so these tests open one store and look at the file through a
# plain SQLite connection, as another program would.


class Peek:
    """The file as a plain SQLite connection sees it (committed rows only)."""

    def __init__(self, path: str) -> None:
        # no waiting: "busy" now means the write lock is held now
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=0)

    def counters(self, account_id: str) -> tuple[int, int]:
        """(debits_posted, debits_pending) of a wallet."""
        row = self.conn.execute("SELECT debits_posted, debits_pending FROM accounts "
                                "WHERE id = ?", (account_id,)).fetchone()  # fmt: skip
        return int(row[0]), int(row[1])

    def row(self, transfer_id: str) -> tuple[Any, ...] | None:
        found: tuple[Any, ...] | None = self.conn.execute(
            "SELECT amount, hold_state, hold_resolved_amount, hold_resolved_by, seq "
            "FROM transfers WHERE id = ?", (transfer_id,)).fetchone()  # fmt: skip
        return found

    def can_write(self) -> bool:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return False
        self.conn.execute("ROLLBACK")
        return True


@pytest.fixture
def solo(tmp_path: Any) -> Iterator[tuple[Ledger, Peek]]:
    path = f"{tmp_path}/solo.db"
    led = open_ledger(f"sqlite:///{path}")
    peek = Peek(path)
    try:
        yield led, peek
    finally:
        peek.conn.close()
        led.close()


@pytest.fixture
def commits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """For each commit of the loop's connection, how many batches it had answered."""
    seen: list[int] = []
    real = sqlite_store.SqliteStore._commit

    def spy(self: Any, cur: Any, window: Any) -> None:
        seen.append(window.answered)
        real(self, cur, window)

    monkeypatch.setattr(sqlite_store.SqliteStore, "_commit", spy)
    return seen


async def test_a_hold_and_its_capture_commit_once(
    solo: tuple[Ledger, Peek], commits: list[int]
) -> None:
    a, peek = solo
    await _fund(a, 1000)
    await a.charge("warm", "user:w", "rev:p", 1, code="x")
    commits.clear()
    hold = await a.hold("h1", "user:w", "rev:p", 100, code="x", private=True)
    assert hold.seq > 0 and a.store.window_open  # answered, not yet committed
    assert peek.counters("user:w") == (1, 0)  # nobody else sees it yet
    assert not peek.can_write()  # the window holds SQLite's write lock
    charge = await a.post(hold, 60)  # joins the window, and commits it
    assert commits == [1] and not a.store.window_open
    assert charge.transfer.seq == hold.seq + 1
    assert peek.counters("user:w") == (61, 0) and peek.can_write()
    # the hold's row was written once, already resolved
    assert peek.row("h1") == (100, 1, 60, "h1~post", hold.seq)
    assert peek.row("h1~post") == (60, None, None, None, hold.seq + 1)
    assert a.check_invariants().ok


async def test_every_read_commits_the_window_first(solo: tuple[Ledger, Peek]) -> None:
    a, peek = solo
    await _fund(a, 1000)
    await a.hold("h1", "user:w", "rev:p", 100, code="x", private=True)
    assert a.store.window_open
    assert a.get_hold("h1") is not None  # a read of this process sees what it answered
    assert not a.store.window_open and peek.counters("user:w") == (0, 100)
    await a.hold("h2", "user:w", "rev:p", 100, code="x", private=True)
    assert a.store.window_open
    # from another thread too (a threadpool endpoint, a blocking caller)
    assert (await asyncio.to_thread(a.balance, "user:w")).pending == 200
    assert not a.store.window_open
    await a.hold("h3", "user:w", "rev:p", 100, code="x", private=True)
    assert a.store.window_open
    a.store.execute("CREATE TABLE IF NOT EXISTS side_records (k TEXT PRIMARY KEY)")
    assert not a.store.window_open
    await a.hold("h4", "user:w", "rev:p", 100, code="x", private=True)
    await a.post("h4", 10)  # by id: reads the hold first, then captures it
    assert peek.counters("user:w") == (10, 300)
    assert a.check_invariants().ok


async def test_a_window_nobody_joins_commits_within_its_time(
    solo: tuple[Ledger, Peek], commits: list[int]
) -> None:
    """No capture, no read: the watchdog commits the window once it is WINDOW_S old,
    while the loop goes on."""
    a, peek = solo
    await _fund(a, 1000)
    commits.clear()
    await a.hold("h1", "user:w", "rev:p", 100, code="x", private=True)
    assert a.store.window_open
    await asyncio.sleep(sqlite_store.WINDOW_S + 3 * sqlite_store.WATCHDOG_POLL_S)
    assert not a.store.window_open and commits == [1]
    assert peek.counters("user:w") == (0, 100)


async def test_a_blocking_call_on_the_loop_does_not_deadlock(solo: tuple[Ledger, Peek]) -> None:
    a, peek = solo
    await _fund(a, 1000)
    await a.hold("h1", "user:w", "rev:p", 100, code="x", private=True)
    assert a.store.window_open
    # the writer thread needs the write lock the window holds: it commits the window
    a.sync.charge("c1", "user:w", "rev:p", 5, code="x")
    a.store.checkpoint()
    assert peek.counters("user:w") == (5, 100)


async def test_replayed_holds_inside_a_window(solo: tuple[Ledger, Peek], tmp_path: Any) -> None:
    a, peek = solo
    await _fund(a, 1000)
    first = await a.hold("h1", "user:w", "rev:p", 100, code="x", private=True)
    again = await a.hold("h1", "user:w", "rev:p", 100, code="x", private=True)  # same window
    assert again.seq == first.seq
    with pytest.raises(errors.IdempotencyConflict):
        await a.hold("h1", "user:w", "rev:p", 101, code="x", private=True)
    # in one batch: the same id twice, beside new work
    results = await asyncio.gather(
        a.hold("h2", "user:w", "rev:p", 10, code="x", private=True),
        a.hold("h2", "user:w", "rev:p", 10, code="x", private=True),
        a.hold("h3", "user:w", "rev:p", 10, code="x", private=True),
    )
    assert results[0].seq == results[1].seq != results[2].seq
    # an id another program took while this store remembers the rows: a plain insert
    await a.charge("warm", "user:w", "rev:p", 1, code="x")
    peek.conn.execute(
        "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, code, flags, "
        "timeout_s, ts_us, seq) SELECT 'taken', 'rev:p', 'user:w', 0, 'x', 0, 0, 1, "
        "max(seq) + 1 FROM transfers"
    )
    with pytest.raises(errors.IdempotencyConflict):
        await a.hold("taken", "user:w", "rev:p", 1, code="x", private=True)
    assert peek.counters("user:w") == (1, 120)
    assert a.balance("user:w").posted == 999


async def test_a_window_takes_a_bounded_number_of_batches(
    solo: tuple[Ledger, Peek], commits: list[int]
) -> None:
    a, peek = solo
    await _fund(a, 10**6)
    commits.clear()

    async def holds(task: int) -> None:
        for i in range(40):
            await a.hold(f"t{task}-{i}", "user:w", "rev:p", 1, code="x", private=True)

    await asyncio.gather(*(holds(t) for t in range(4)))
    a.store.settle()  # type: ignore[attr-defined]
    # 40 batches of 4 holds: windows fill up to the bound, then commit
    assert len(commits) >= 2 and max(commits) == sqlite_store.WINDOW_BATCHES
    assert peek.counters("user:w") == (0, 160)
    assert a.check_invariants().ok


def test_an_answered_hold_dies_with_its_process(tmp_path: Any) -> None:
    """A window is not durable until it commits: if the process dies first, its holds
    are gone, exactly as if they had been voided (their captures never come)."""
    path = f"{tmp_path}/crash.db"
    code = f"""
import asyncio, os
from drip.ledger import open_ledger

async def main():
    led = open_ledger("sqlite:///{path}")
    await led.create_account("user:w", "wallet")
    await led.create_account("rev:p", "revenue")
    await led.transfer("fund-1", "funding:USDC", "user:w", 1000, code="topup")
    await led.charge("c1", "user:w", "rev:p", 10, code="x")
    await led.hold("h1", "user:w", "rev:p", 100, code="x", private=True)
    assert led.store.window_open
    os._exit(0)

asyncio.run(main())
"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    led = open_ledger(f"sqlite:///{path}")
    try:
        assert led.get_hold("h1") is None
        assert led.balance("user:w").available == 990  # the charge before it is durable
        assert led.check_invariants().ok
    finally:
        led.close()


async def test_closing_the_ledger_commits_its_window(tmp_path: Any) -> None:
    path = f"{tmp_path}/close.db"
    led = open_ledger(f"sqlite:///{path}")
    await _fund(led, 1000)
    await led.hold("h1", "user:w", "rev:p", 100, code="x", private=True)
    assert led.store.window_open
    led.close()
    again = open_ledger(f"sqlite:///{path}")
    try:
        assert again.balance("user:w").pending == 100
    finally:
        again.close()


async def test_a_hold_whose_id_is_handed_out_commits_before_it_is_answered(
    pair: tuple[Ledger, Ledger, str],
) -> None:
    """Without ``private`` (the REST API's holds: the client captures them, perhaps
    through another process), the hold is committed before the caller hears of it."""
    a, b, _ = pair
    await _fund(a, 1000)
    hold = await a.hold("h1", "user:w", "rev:p", 100, code="x")
    assert not a.store.window_open
    await b.void(hold.id)  # another process finds it at once
    assert a.balance("user:w").available == 1000


# --- what keeps windows from hurting anyone else ----------------------------------------


def test_no_window_while_another_process_has_the_file_open(tmp_path: Any) -> None:
    """Windows keep SQLite's write lock across a turn of the loop; with another Drip
    process on the file (its writers would wait), holds commit before they are answered."""
    import subprocess
    import sys

    path = f"{tmp_path}/shared.db"
    led = open_ledger(f"sqlite:///{path}")
    try:
        store: Any = led.store
        assert store._presence.alone()
        other = subprocess.Popen(
            [sys.executable, "-c", f"""
import sys, time
from drip.ledger import open_ledger
led = open_ledger("sqlite:///{path}")
print("open", flush=True)
sys.stdin.readline()
led.close()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert other.stdout is not None and other.stdout.readline().strip() == "open"
            monkey_checked = store._presence
            monkey_checked._checked = 0.0  # the finding is cached for PRESENCE_CHECK_S
            assert not store._presence.alone()

            async def hold_then_look() -> bool:
                await _fund(led, 1000)
                await led.hold("h1", "user:w", "rev:p", 100, code="x", private=True)
                return bool(store.window_open)

            assert asyncio.run(hold_then_look()) is False
        finally:
            assert other.stdin is not None
            other.stdin.write("\n")
            other.stdin.flush()
            other.wait(30)
        store._presence._checked = 0.0
        assert store._presence.alone()  # alone again once it closed
    finally:
        led.close()


async def test_a_failing_batch_does_not_undo_answered_holds(
    solo: tuple[Ledger, Peek], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, peek = solo
    await _fund(a, 1000)
    hold = await a.hold("h1", "user:w", "rev:p", 100, code="x", private=True)
    assert a.store.window_open
    real = sqlite_store.Engine.apply

    def apply(self: Any, op: Any) -> Any:
        if getattr(op, "accounts", None) and op.accounts[0].id == "acct:boom":
            raise RuntimeError("an unexpected failure in this batch only")
        return real(self, op)

    monkeypatch.setattr(sqlite_store.Engine, "apply", apply)
    with pytest.raises(errors.StoreError):
        await a.create_account("acct:boom", "revenue")  # joins the window, fails alone
    assert not a.store.window_open
    assert peek.row("h1") is not None  # what was answered was committed
    charge = await a.post(hold, 60)
    assert charge.amount == 60 and peek.counters("user:w") == (60, 0)
    assert a.store.get_account("acct:boom") is None and a.check_invariants().ok


async def test_a_busy_loop_does_not_keep_the_window_open(solo: tuple[Ledger, Peek]) -> None:
    """The loop commits a window at its next turn; if that turn is long (callers' own
    synchronous work), the watchdog thread commits it after WINDOW_S."""
    import time

    a, peek = solo
    await _fund(a, 1000)
    await a.hold("h1", "user:w", "rev:p", 100, code="x", private=True)
    assert a.store.window_open
    time.sleep(sqlite_store.WINDOW_S + 3 * sqlite_store.WATCHDOG_POLL_S)  # the loop is busy
    assert not a.store.window_open
    assert peek.can_write()  # another writer is not kept waiting
    assert peek.counters("user:w") == (0, 100)


@pytest.mark.timeout(60)
async def test_a_blocking_writer_overtaken_by_a_new_window_still_gets_the_lock(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blocking writer that settled, found no window, and then waits for the lock may
    be overtaken by the loop opening one; it must not wait for the loop's next turn (the
    loop may be waiting on it: this would deadlock). It settles again while it waits, and
    the watchdog commits the window anyway. The race is widened by a pause inside the
    loop's BEGIN."""
    import threading
    import time

    led = open_ledger(f"sqlite:///{tmp_path}/race.db")
    try:
        await _fund(led, 1000)
        store: Any = led.store
        arm = threading.Event()
        real_begin = sqlite_store.SqliteStore._begin

        def slow_begin(self: Any, cur: Any) -> bool:
            ok = real_begin(self, cur)
            if arm.is_set() and threading.current_thread() is threading.main_thread():
                arm.clear()
                self.committer.housekeep_soon()  # the writer thread's checkpoint settles now
                time.sleep(0.2)
            return bool(ok)

        monkeypatch.setattr(sqlite_store.SqliteStore, "_begin", slow_begin)
        arm.set()
        await led.hold("h1", "user:w", "rev:p", 100, code="x", private=True)
        # a blocking call on the loop: the writer thread needs the lock the window holds
        led.sync.charge("c1", "user:w", "rev:p", 5, code="x")
        assert store.get_hold("h1") is not None
        assert led.balance("user:w").posted == 995
    finally:
        led.close()


def _as_old_sqlite(led: Ledger) -> None:
    """Make the store's connections allow 999 bound variables, as old SQLite builds do."""
    store: Any = led.store
    for conn in store._all:
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
    store._insert_rows_max = 999 // 15  # what such a build reports when opened


def test_multi_row_inserts_respect_the_variable_limit(tmp_path: Any) -> None:
    """Old SQLite builds allow 999 bound variables: rows go in chunks that fit."""
    led = open_ledger(f"sqlite:///{tmp_path}/limit.db")
    try:
        _as_old_sqlite(led)

        async def many() -> None:
            await _fund(led, 10**6)
            await asyncio.gather(*(led.transfer(f"t{i}", "user:w", "rev:p", 1, code="x")
                                   for i in range(300)))  # fmt: skip

        asyncio.run(many())
        assert led.balance("rev:p").posted == 300
    finally:
        led.close()


def test_presence_counts_every_store_of_a_process(tmp_path: Any) -> None:
    """Two stores of one process on one file: neither is alone. Closing one keeps the
    process visible to others (POSIX locks belong to the process, and closing any of
    its descriptors on a file would drop them all)."""
    import subprocess
    import sys

    path = f"{tmp_path}/two.db"
    first, second = open_ledger(f"sqlite:///{path}"), open_ledger(f"sqlite:///{path}")
    try:
        one: Any = first.store
        assert not one._presence.alone() and not second.store._presence.alone()  # type: ignore[attr-defined]
        second.close()
        one._presence._checked = 0.0
        assert one._presence.alone()
        probe = subprocess.run(
            [sys.executable, "-c", f"""
from drip.ledger import open_ledger
led = open_ledger("sqlite:///{path}")
print(led.store._presence.alone())
led.close()
"""], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert probe.returncode == 0, probe.stderr
        assert probe.stdout.strip() == "False"  # this process still counts
    finally:
        first.close()
        second.close()


async def test_what_a_caller_does_to_an_answer_cannot_reach_the_file(
    solo: tuple[Ledger, Peek],
) -> None:
    a, peek = solo
    await _fund(a, 1000)
    hold = await a.hold("h1", "user:w", "rev:p", 100, code="x", private=True)
    assert a.store.window_open
    hold.amount = 999_999  # a careless caller
    hold.debit_account_id = "rev:p"
    a.store.settle()  # type: ignore[attr-defined]
    assert peek.row("h1") == (100, 0, 0, None, hold.seq)
    assert a.check_invariants().ok


def test_id_lists_respect_the_variable_limit(tmp_path: Any) -> None:
    """Old SQLite builds allow 999 bound variables: id lookups go in chunks too."""
    led = open_ledger(f"sqlite:///{tmp_path}/ids.db")
    try:
        _as_old_sqlite(led)

        async def many() -> None:
            await _fund(led, 10**6)
            await asyncio.gather(*(led.hold(f"h{i}", "user:w", "rev:p", 1, code="x",
                                            private=True) for i in range(1000)))  # fmt: skip
            await asyncio.gather(*(led.post(f"h{i}", 1) for i in range(1000)))

        asyncio.run(many())
        assert led.balance("rev:p").posted == 1000
        assert led.check_invariants().ok
    finally:
        led.close()


def test_checkpoints_beside_blocking_writers_refuse_nothing(tmp_path: Any) -> None:
    """A checkpoint's unlocked pass must not share the writer's connection: there it
    made the writer's COMMIT fail ("SQL statements in progress") and refused charges."""
    import threading
    import time

    led = open_ledger(f"sqlite:///{tmp_path}/ckpt.db")
    try:
        api = led.sync
        api.create_account("user:w", "wallet")
        api.create_account("rev:p", "revenue")
        api.transfer("fund", "funding:USDC", "user:w", 10**12, code="topup")
        stop = time.monotonic() + 2.0
        done: list[str] = []
        failed: list[str] = []

        def charges(worker: int) -> None:
            i = 0
            while time.monotonic() < stop:
                i += 1
                try:
                    done.append(api.charge(f"c{worker}-{i}", "user:w", "rev:p", 1, code="x").id)
                except errors.DripError as exc:
                    failed.append(repr(exc))

        def sweeps() -> None:
            while time.monotonic() < stop:
                try:
                    led.expire_holds()  # checkpoints first
                except Exception as exc:  # noqa: BLE001 - recorded and asserted on
                    failed.append(repr(exc))

        threads = [threading.Thread(target=charges, args=(k,)) for k in range(4)]
        threads.append(threading.Thread(target=sweeps))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failed == [] and len(done) > 100
        assert led.balance("user:w").posted == 10**12 - len(done)
        assert led.check_invariants().ok
    finally:
        led.close()


def test_read_connections_of_ended_threads_are_closed(tmp_path: Any) -> None:
    """Worker pools come and go: each thread's read connection ends with its thread."""
    import gc
    import os
    import threading

    led = open_ledger(f"sqlite:///{tmp_path}/ledger.db")
    try:

        def burst() -> None:
            threads = [threading.Thread(target=led.list_accounts) for _ in range(10)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            gc.collect()

        burst()
        fds = len(os.listdir("/proc/self/fd"))
        for _ in range(5):
            burst()
        # 50 threads' connections were opened; each kept would hold ~3 descriptors
        assert len(os.listdir("/proc/self/fd")) < fds + 20
    finally:
        led.close()


async def test_a_late_charge_replayed_inside_a_window_is_a_replay(
    solo: tuple[Ledger, Peek],
) -> None:
    """A late charge's id is derived (``<expired hold>~post``) but it is a plain charge:
    its replay must be found before a window answers, not at insert time (which would
    roll back the window, and with it a hold already handed to another caller)."""
    a, _ = solo
    await _fund(a, 10_000)
    expired = await a.hold("call-0", "user:w", "rev:p", 100, code="x", timeout_s=1, private=True)
    await asyncio.sleep(1.1)
    with pytest.raises(errors.HoldExpired):
        await a.post(expired, 100)
    first = await a.charge_after_expiry(expired, 100)
    other = await a.hold("call-1", "user:w", "rev:p", 200, code="x", private=True)  # in a window
    again = await a.charge_after_expiry(expired, 100)
    assert again.transfer.replayed and again.id == first.id == "call-0~post"
    captured = await a.post(other, 150)
    assert captured.amount == 150
    assert a.balance("user:w").posted == 10_000 - 100 - 150
    report = a.check_invariants()
    assert report.ok, report.checks


async def test_a_capture_with_a_fee_looks_nothing_up(tmp_path: Any) -> None:
    """A capture's ``~post`` and its ``~post~fee`` are new whenever its hold is open in
    memory: the metered call's hot path sends no SELECT for them."""
    led = open_ledger(f"sqlite:///{tmp_path}/fee.db", fee_bps=250)
    try:
        await _fund(led, 100_000)
        await led.charge("warm", "user:w", "rev:p", 1_000, code="x")  # rows (fee's too) kept
        statements: list[str] = []
        led.store._fast.set_trace_callback(statements.append)  # type: ignore[attr-defined]
        hold = await led.hold("call-1", "user:w", "rev:p", 1_000, code="x", private=True)
        charge = await led.post(hold, 800)
        assert charge.fee is not None and charge.fee.amount == 20
        assert not any("SAVEPOINT" in s for s in statements)  # answered from memory
        lookups = [s for s in statements if s.lstrip().upper().startswith("SELECT 1 FROM")]
        assert lookups == ["SELECT 1 FROM transfers WHERE id IN ('call-1') LIMIT 1"], lookups
    finally:
        led.close()


def test_after_a_failed_commit_holds_are_answered_only_once_committed(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk: every window's commit fails. Holds answered before they committed
    were rolled back call after call, each after its work ran (and went unbilled).
    After one failed commit, holds wait for their own commit again, so a call fails
    before it runs; once a commit succeeds, windows come back."""
    from drip import DripClient, DripConfig
    from drip.ledger.sqlite import SqliteStore

    client = DripClient(DripConfig(database_url=f"sqlite:///{tmp_path}/full.db"))
    client.sync.provision_user("u", initial_balance="10")
    full = {"on": False}
    real_commit = SqliteStore._commit

    def commit(self: SqliteStore, cur: Any, window: Any) -> None:
        if full["on"]:
            raise sqlite3.OperationalError("database or disk is full")
        real_commit(self, cur, window)

    monkeypatch.setattr(SqliteStore, "_commit", commit)
    ran = {"n": 0}

    @client.meter(cost="0.01", event="work")
    async def work(user_id: str) -> None:
        ran["n"] += 1

    async def calls(n: int) -> list[object]:
        return [await _outcome(work(user_id="u")) for _ in range(n)]

    try:
        asyncio.run(calls(3))  # windows on: holds answered before their commit
        before = ran["n"]
        full["on"] = True
        outcomes = asyncio.run(calls(20))
        assert all(isinstance(o, errors.StoreError) for o in outcomes)
        assert ran["n"] - before <= 1  # at most the call whose hold was in the window
        full["on"] = False
        assert asyncio.run(calls(5)) == [None] * 5
        store = client.ledger.store
        assert store._deferring  # type: ignore[attr-defined]
        assert client.sync.get_user("u")["balance_usdc"] == Decimal("10") - Decimal(
            "0.01") * (before + 5)  # fmt: skip
        assert client.ledger.check_invariants().ok
    finally:
        client.close()


async def _outcome(call: Any) -> object:
    try:
        await call
    except Exception as exc:  # noqa: BLE001 - the test looks at which
        return exc
    return None


def test_a_capture_the_store_failed_is_tried_again_or_releases_its_hold(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commit faults that come and go: a call's hold committed, then its capture's commit
    failed. The call ran unbilled and its hold reserved the user's funds until its
    timeout. The capture is now tried once more, and if that fails too, the hold is
    voided."""
    from drip import DripClient, DripConfig
    from drip.ledger.sqlite import SqliteStore

    client = DripClient(DripConfig(database_url=f"sqlite:///{tmp_path}/flap.db"))
    client.sync.provision_user("u", initial_balance="10")
    commits = {"n": 0, "every": 0}
    real_commit = SqliteStore._commit

    def commit(self: SqliteStore, cur: Any, window: Any) -> None:
        commits["n"] += 1
        if commits["every"] and commits["n"] % commits["every"] == 0:
            raise sqlite3.OperationalError("database or disk is full")
        real_commit(self, cur, window)

    monkeypatch.setattr(SqliteStore, "_commit", commit)

    @client.meter(cost="0.01", event="work")
    async def work(user_id: str) -> None:
        return None

    @client.meter(cost="0.01", event="work_sync")
    def work_sync(user_id: str) -> None:
        return None

    async def calls(n: int) -> list[object]:
        return [await _outcome(work(user_id="u")) for _ in range(n)]

    try:
        asyncio.run(calls(3))
        for every in (2, 3):
            commits["every"] = every
            outcomes = asyncio.run(calls(30))
            for _ in range(10):
                outcomes.append(_outcome_sync(work_sync, "u"))
            assert any(o is None for o in outcomes)
        commits["every"] = 0
        balance = client.ledger.balance("user:u")
        assert balance.pending == 0  # nothing left reserving for a call that ran
        assert client.ledger.check_invariants().ok
    finally:
        client.close()


def _outcome_sync(fn: Any, user: str) -> object:
    try:
        fn(user_id=user)
    except Exception as exc:  # noqa: BLE001 - the test looks at which
        return exc
    return None
