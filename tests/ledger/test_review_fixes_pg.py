"""Review fixes, reproduced against real PostgreSQL (and SQLite where both apply).

1. A commit whose answer is lost (the connection breaks right after the COMMIT, or the
   fast path's one statement, went out) is run again by the store; the rows that first
   attempt wrote are this call's own, so the answer is new (``replayed=False``), not a
   replay. The read that decorates a genuine replay with its fee leg survives a
   connection dropped under it.
2. One operation's bad value (a NUL, a lone surrogate) fails only its own caller, never
   its batch-mates; reads given such a value answer not-found or ``InvalidRequest``,
   never a raw driver error.

The ambiguous commits are made by a TCP proxy between the ledger and PostgreSQL that
forwards a chosen statement, then drops the connection before the answer comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from drip import errors
from drip.ledger import Ledger, funding_account_id, open_ledger, pg_async
from drip.ledger.engine import CreateAccounts, CreateTransfers
from drip.ledger.types import AccountSpec, TransferSpec

FUND = funding_account_id("USDC")
W, R = "user:w", "rev:p"


class Proxy:
    """A TCP proxy to PostgreSQL. Each entry of ``triggers``, in turn, drops the first
    connection that sends a chunk containing it, right after forwarding that chunk: the
    server runs (and commits) the statement, and its answer never reaches the client."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.triggers: list[bytes] = []
        self.fired = 0
        self._lock = threading.Lock()
        self._closed = False
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _hit(self, data: bytes) -> bool:
        with self._lock:
            if self.triggers and self.triggers[0] in data:
                self.triggers.pop(0)
                self.fired += 1
                return True
        return False

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        try:
            while not self._closed:
                ready, _, _ = select.select([client, upstream], [], [], 0.05)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        upstream.sendall(data)
                        if self._hit(data):
                            time.sleep(0.2)  # the server runs it (and commits) ...
                            return  # ... and the answer never reaches the client
                    else:
                        client.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def url(self, url: str) -> str:
        """``url`` through this proxy (without TLS, so statements can be recognised)."""
        parts = urlsplit(url)
        netloc = parts.netloc.rsplit("@", 1)
        hostport = f"127.0.0.1:{self.port}"
        netloc_new = f"{netloc[0]}@{hostport}" if len(netloc) == 2 else hostport
        query = f"{parts.query}&sslmode=disable" if parts.query else "sslmode=disable"
        return urlunsplit((parts.scheme, netloc_new, parts.path, query, parts.fragment))

    def close(self) -> None:
        self._closed = True
        self._sock.close()


@pytest.fixture
def proxy(postgres_url: str) -> Iterator[Proxy]:
    parts = urlsplit(postgres_url)
    p = Proxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    try:
        yield p
    finally:
        p.close()


def _books(led: Ledger, funds: int = 10_000) -> None:
    led.sync.create_account(W, "wallet")
    led.sync.create_account(R, "revenue")
    led.sync.transfer("fund", FUND, W, funds)


# --- 1. ambiguous commits ---------------------------------------------------------------


def test_a_lost_commit_on_the_locked_path_is_answered_as_new(
    postgres_url: str, proxy: Proxy
) -> None:
    """The writer thread's locked path: the COMMIT lands, its answer is lost, the store
    runs the batch again and finds the rows; this call moved the money."""
    led = open_ledger(proxy.url(postgres_url), fee_bps=250)
    try:
        _books(led)
        led.store.shared_cache.clear()  # type: ignore[attr-defined]  # the locked path
        proxy.triggers = [b"COMMIT"]
        charge = led.sync.charge("lost-1", W, R, 1000, code="call")
        assert proxy.fired == 1
        assert charge.replayed is False
        assert charge.fee is not None and charge.fee.replayed is False
        assert charge.fee.amount == 25
        assert led.balance(W).posted == 10_000 - 1000  # moved once
        # a later call with the same id is a replay: the first attempt's memory is gone
        again = led.sync.charge("lost-1", W, R, 1000, code="call")
        assert again.replayed is True and again.transfer.seq == charge.transfer.seq
        assert led.balance(W).posted == 10_000 - 1000
        assert led.check_invariants().ok
    finally:
        led.close()


def test_a_lost_statement_on_the_writers_fast_path_is_answered_as_new(
    postgres_url: str, proxy: Proxy
) -> None:
    """The writer thread's fast path (one autocommit statement): it commits, its answer
    is lost; the locked path that follows finds the rows and answers them as new."""
    led = open_ledger(proxy.url(postgres_url))
    try:
        _books(led)
        led.sync.charge("warm", W, R, 1, code="call")  # rows remembered: the fast path
        proxy.triggers = [b"WITH "]
        hold = led.sync.hold("lost-hold", W, R, 100, code="call", timeout_s=60)
        assert proxy.fired == 1
        assert hold.replayed is False
        posted = led.sync.post(hold, 40)
        assert posted.replayed is False and posted.amount == 40
        assert led.balance(W).posted == 10_000 - 1 - 40
        assert led.balance(W).pending == 0
        assert led.check_invariants().ok
    finally:
        led.close()


async def test_a_lost_statement_on_the_loops_fast_path_is_answered_as_new(
    postgres_url: str, proxy: Proxy
) -> None:
    """The asyncio fast path: the loop's statement commits, its answer is lost; the
    batch goes to the writer thread, which finds the rows: new, not replayed."""
    led = open_ledger(proxy.url(postgres_url), fee_bps=250)
    try:
        _books(led)
        await led.charge("warm", W, R, 100, code="call")  # rows remembered
        proxy.triggers = [b"WITH "]
        first, second = await asyncio.gather(
            led.charge("lost-a", W, R, 1000, code="call"),
            led.charge("lost-b", W, R, 2000, code="call"),
        )
        assert proxy.fired == 1
        assert (first.replayed, second.replayed) == (False, False)
        assert first.fee is not None and first.fee.replayed is False
        assert led.balance(W).posted == 10_000 - 100 - 1000 - 2000
        again = await led.charge("lost-a", W, R, 1000, code="call")
        assert again.replayed is True
        assert again.fee is not None and again.fee.amount == 25
        assert led.check_invariants().ok
    finally:
        led.close()


@pytest.mark.parametrize("path", ["sync", "async"])
async def test_a_replays_fee_leg_read_survives_dropped_connections(
    postgres_url: str, proxy: Proxy, path: str
) -> None:
    """A genuine replay (fee rate now 0) reads its fee leg after the batch; the server
    drops that read's connection twice. The caller still gets the replay with its fee
    leg, not an error (nor a charge said to carry no fee)."""
    first = open_ledger(postgres_url, fee_bps=250)
    try:
        _books(first)
        await first.charge("paid-1", W, R, 1000, code="call")
    finally:
        first.close()
    led = open_ledger(proxy.url(postgres_url), fee_bps=0)
    try:
        proxy.triggers = [b"paid-1~fee", b"paid-1~fee"]
        if path == "sync":
            charge = led.sync.charge("paid-1", W, R, 1000, code="call")
        else:
            charge = await led.charge("paid-1", W, R, 1000, code="call")
        assert proxy.fired == 2
        assert charge.replayed is True
        assert charge.fee is not None and charge.fee.amount == 25 and charge.fee.replayed
        assert led.balance(W).posted == 10_000 - 1000
    finally:
        led.close()


# --- 2. one bad value fails alone --------------------------------------------------------


@pytest.mark.parametrize("owner", ["x\x00y", "tab\there", "line\nbreak", "\ud800", "\x7f"])
async def test_an_owner_with_control_characters_is_refused_alone(
    store_url: str, owner: str
) -> None:
    led = open_ledger(store_url)
    try:
        _books(led)
        results = await asyncio.gather(
            led.charge("innocent-1", W, R, 5, code="call"),
            led.create_account("acct1", "wallet", owner=owner),
            led.charge("innocent-2", W, R, 5, code="call"),
            return_exceptions=True,
        )
        assert isinstance(results[1], errors.InvalidRequest)
        assert getattr(results[1], "param", None) == "owner"
        assert [getattr(r, "id", r) for r in (results[0], results[2])] == [
            "innocent-1",
            "innocent-2",
        ]
        with pytest.raises(errors.InvalidRequest):
            led.sync.create_account("acct2", "wallet", owner=owner)
        assert led.sync.get_transfer("innocent-2") is not None
        with pytest.raises(errors.AccountNotFound):
            led.account("acct1")
        # text that is not a control character is an owner like any other
        named = led.sync.create_account("acct3", "wallet", owner="José \u200d\U0001f44d")
        assert named.owner == "José \u200d\U0001f44d"
        assert led.check_invariants().ok
    finally:
        led.close()


async def test_metadata_with_a_nul_is_stored_escaped(store_url: str) -> None:
    """Metadata is JSON: a NUL in it travels escaped, on every path (the locked path,
    the writer's and the loop's fast paths), and reads back as given."""
    led = open_ledger(store_url)
    try:
        _books(led)
        meta = {"k\x00": "a\x00b"}
        account = led.sync.create_account("acct-meta", "wallet", metadata=meta)
        assert led.account(account.id).meta == meta
        led.sync.charge("m-1", W, R, 1, code="call", metadata=meta)
        led.sync.charge("m-2", W, R, 1, code="call", metadata=meta)
        await led.charge("m-3", W, R, 1, code="call", metadata=meta)
        await led.charge("m-4", W, R, 1, code="call", metadata=meta)
        for tid in ("m-1", "m-2", "m-3", "m-4"):
            transfer = led.get_transfer(tid)
            assert transfer is not None and transfer.meta == meta
    finally:
        led.close()


@pytest.mark.parametrize("bad", ["a\x00b", "\ud800", "x\x00"])
def test_reads_of_an_impossible_id_answer_not_found(store_url: str, bad: str) -> None:
    """What no row can hold is found nowhere, on both stores alike: never a raw driver
    error (PostgreSQL's refuses a NUL; both drivers refuse a lone surrogate)."""
    led = open_ledger(store_url)
    try:
        _books(led)
        with pytest.raises(errors.AccountNotFound):
            led.sync.account(bad)
        with pytest.raises(errors.AccountNotFound):
            led.sync.balance(bad)
        assert led.sync.get_transfer(bad) is None
        assert led.sync.get_hold(bad) is None
        assert led.store.get_account(bad) is None
        assert led.sync.list_accounts(bad) == []
        with pytest.raises(errors.InvalidRequest) as refused:
            led.sync.list_accounts(after_id=bad)
        assert refused.value.param == "after_id"
        assert led.sync.usage(bad) == []
        assert led.store.list_transfers(account_id=bad) == []
        assert led.store.list_transfers(code=bad) == []
        with pytest.raises(errors.InvalidRequest):
            led.sync.history(bad)
        with pytest.raises(errors.InvalidRequest):
            led.sync.void(bad)
        assert [a.id for a in led.sync.list_accounts(after_id="user:")] == [W]
    finally:
        led.close()


def _raw_charge(transfer_id: str, amount: int) -> CreateTransfers:
    return CreateTransfers((TransferSpec(transfer_id, W, R, amount, "call"),))


def _raw_bad_account(owner: str) -> CreateAccounts:
    """An account the ledger's checks would refuse, submitted past them (a caller of the
    store itself, or a value a check missed): the database refuses it."""
    return CreateAccounts((AccountSpec("acct-bad", "wallet", "USDC", 1, owner),))


async def _batch_mates(led: Ledger, submit: Any, bad: str) -> list[Any]:
    """Two charges and the bad operation, submitted in one turn of the loop: one batch."""
    return list(
        await asyncio.gather(
            submit(_raw_charge("mate-1", 5)),
            submit(_raw_bad_account(bad)),
            submit(_raw_charge("mate-2", 7)),
            return_exceptions=True,
        )
    )


def _check_mates(led: Ledger, results: list[Any]) -> None:
    assert isinstance(results[1], errors.StoreError)  # the bad one fails, alone
    assert results[0][0].id == "mate-1" and results[0][0].replayed is False
    assert results[2][0].id == "mate-2" and results[2][0].replayed is False
    assert led.sync.get_transfer("mate-1") is not None
    assert led.sync.get_transfer("mate-2") is not None
    assert led.balance(W).posted == 10_000 - 12
    with pytest.raises(errors.AccountNotFound):
        led.sync.account("acct-bad")
    # the writer carries on
    assert led.sync.charge("after", W, R, 1, code="call").replayed is False
    assert led.check_invariants().ok


async def test_a_value_the_database_refuses_fails_alone_on_the_writer_thread(
    store_url: str,
) -> None:
    """The writer thread's batch fails as a whole (the driver refuses the value), and
    is run again one operation at a time: only the bad operation fails."""
    led = open_ledger(store_url)
    try:
        _books(led)
        results = await _batch_mates(led, led.store.committer.submit_async, "\ud800")
        _check_mates(led, results)
    finally:
        led.close()


async def test_a_nul_fails_alone_on_postgres_loop_and_writer(postgres_url: str) -> None:
    """The loop's batch (the asyncio path): the new account sends it to the writer
    thread, whose batch PostgreSQL's driver refuses (a NUL); each then runs alone."""
    led = open_ledger(postgres_url)
    try:
        _books(led)
        await led.charge("warm", W, R, 1, code="call")
        led.sync.transfer("refund-warm", R, W, 1)
        results = await _batch_mates(led, led.store.submit_async, "x\x00y")
        _check_mates(led, results)
    finally:
        led.close()


async def test_an_unexpected_failure_on_the_loop_fails_nobody(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that fails on the event loop for an unexpected reason (here, building
    its statement) is not failed whole: the writer thread runs it (each operation
    alone, should it fail again there)."""
    led = open_ledger(postgres_url)
    try:
        _books(led)
        await led.charge("warm", W, R, 1, code="call")  # rows remembered: the fast path
        led.sync.transfer("refund-warm", R, W, 1)
        await led.charge("warm-2", W, R, 1, code="call")
        real = pg_async.one_statement

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise ValueError("cannot build this statement")

        monkeypatch.setattr(pg_async, "one_statement", broken)
        results = await asyncio.gather(
            led.charge("odd-1", W, R, 5, code="call"),
            led.charge("odd-2", W, R, 7, code="call"),
            return_exceptions=True,
        )
        monkeypatch.setattr(pg_async, "one_statement", real)
        assert [getattr(r, "id", r) for r in results] == ["odd-1", "odd-2"]
        assert [getattr(r, "replayed", None) for r in results] == [False, False]
        assert led.balance(W).posted == 10_000 - 1 - 12
        assert led.check_invariants().ok
    finally:
        led.close()


async def test_a_value_sqlite_refuses_fails_alone_on_the_loop(sqlite_url: str) -> None:
    """SQLite's loop batch: the driver refuses one operation's value (a lone surrogate
    cannot be encoded); the batch goes to the writer threads, where each operation runs
    alone, so only the bad one fails."""
    led = open_ledger(sqlite_url)
    try:
        _books(led)
        await led.charge("warm", W, R, 1, code="call")  # rows remembered: the loop's path
        led.sync.transfer("refund-warm", R, W, 1)
        results = await _batch_mates(led, led.store.submit_async, "\ud800")
        _check_mates(led, results)
    finally:
        led.close()


async def test_a_replay_refused_by_the_unique_index_is_a_replay_with_a_frozen_clock(
    store_url: str,
) -> None:
    """The fast path's statement refused by the unique index proves nothing committed:
    the row found is an earlier call's, a replay, even when both carry the same
    timestamp (a frozen or coarse clock)."""
    frozen = 1_700_000_000_000_000
    led = open_ledger(store_url, clock_us=lambda: frozen)
    try:
        _books(led)
        first = led.sync.charge("c1", W, R, 5, code="call")
        assert first.replayed is False
        assert led.sync.charge("c1", W, R, 5, code="call").replayed is True
        assert (await led.charge("c1", W, R, 5, code="call")).replayed is True
        assert led.balance(W).posted == 10_000 - 5
    finally:
        led.close()


def test_a_linked_chain_naming_an_id_twice_says_so(store_url: str) -> None:
    from drip.ledger.types import TransferFlags, TransferSpec

    led = open_ledger(store_url)
    try:
        _books(led)
        linked = int(TransferFlags.LINKED)
        results = led.sync.create_transfers([
            TransferSpec("b1", W, R, 1, "call", linked),
            TransferSpec("b1", W, R, 1, "call"),
        ])  # fmt: skip
        assert isinstance(results[1], errors.InvalidTransfer)
        assert "appears twice" in results[1].message
        assert isinstance(results[0], errors.LinkedEventFailed)
        assert led.get_transfer("b1") is None
    finally:
        led.close()


def test_a_posted_transfer_leaves_an_open_hold_its_room(store_url: str) -> None:
    """A hold accepted as fitting the counters when captured can always be captured in
    full: a later posted transfer may not take the room it was counted against."""
    from drip.money import AMOUNT_ATOMIC_MAX

    led = open_ledger(store_url)
    try:
        led.sync.create_account("payer", "wallet")
        for account in ("src", "sink"):  # no balance rule: "src" may run negative
            led.sync.create_account(account, "revenue")
        led.sync.transfer("fund-payer", "funding:USDC", "payer", 100, code="topup")
        led.sync.transfer("pre", "src", "sink", AMOUNT_ATOMIC_MAX - 1100, code="call")
        hold = led.sync.hold("hh", "payer", "sink", 100, code="call", timeout_s=60)
        with pytest.raises(errors.InvalidTransfer):  # would eat the hold's room on "sink"
            led.sync.transfer("late", "src", "sink", 1050, code="call")
        led.sync.transfer("fits", "src", "sink", 1000, code="call")  # what is left beside it
        assert led.sync.post(hold).amount == 100
        assert led.check_invariants().ok
    finally:
        led.close()


@pytest.mark.parametrize(
    "query",
    [
        "synchronus=full",
        "SYNCHRONOUS=full",
        "mode=ro",
        "synchronous=",
        "synchronous=full&synchronous=off",
    ],
)
def test_a_sqlite_url_option_not_known_or_empty_is_refused(tmp_path: Any, query: str) -> None:
    """A misspelled ``?synchronus=full`` ran with synchronous=NORMAL, silently."""
    with pytest.raises(errors.ConfigError):
        open_ledger(f"sqlite:///{tmp_path}/o.db?{query}")


def test_a_bool_is_not_a_limit_or_a_bucket(store_url: str) -> None:
    led = open_ledger(store_url)
    try:
        _books(led)
        with pytest.raises(errors.InvalidRequest):
            led.history(W, limit=True)
        with pytest.raises(errors.InvalidRequest):
            led.usage(W, bucket_s=True)
    finally:
        led.close()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_a_sqlite_file_deleted_or_replaced_while_open_is_refused(
    tmp_path: Any, how: str
) -> None:
    """A database file removed (rm) or replaced (a restore done with mv) under a running
    process: its writes would land in a file nobody will read again, so every write and
    read is refused, and nothing recreates the file."""
    import os

    path = f"{tmp_path}/{how}.db"
    led = open_ledger(f"sqlite:///{path}")
    try:
        _books(led)
        await led.charge("before", W, R, 1, code="call")
        if how == "deleted":
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.remove(path + suffix)
        else:
            open_ledger(f"sqlite:///{tmp_path}/other.db").close()
            os.replace(f"{tmp_path}/other.db", path)
        from drip.ledger.sqlite import FILE_CHECK_S

        await asyncio.sleep(2 * FILE_CHECK_S)  # the file is looked at every FILE_CHECK_S
        with pytest.raises(errors.StoreError, match=how.split()[0][:7]):
            await led.charge("after", W, R, 1, code="call")
        with pytest.raises(errors.StoreError):
            led.sync.charge("after-sync", W, R, 1, code="call")
        with pytest.raises(errors.StoreError):
            led.get_transfer("before")
        if how == "deleted":
            assert not os.path.exists(path)
    finally:
        led.close()


def test_a_late_charge_takes_no_more_than_its_hold(store_url: str) -> None:
    """A late charge settles what was admitted: never more than the expired hold (it
    passes a paused wallet or a closed session, and windows count the hold, not it)."""
    now = [1_800_000_000_000_000]
    led = open_ledger(store_url, clock_us=lambda: now[0])
    try:
        _books(led)
        hold = led.sync.hold("late-h", W, R, 500, code="call", timeout_s=5)
        now[0] += 6_000_000
        led.expire_holds()
        with pytest.raises(errors.AmountExceedsHold):
            led.sync.charge_after_expiry(hold, 5_000)
        assert led.sync.charge_after_expiry(hold, 500).amount == 500
        assert led.check_invariants().ok
    finally:
        led.close()


def test_a_relative_sqlite_path_keeps_its_file_after_a_chdir(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every connection opens the file the store opened, whatever the working directory
    is later (a reader opened after a chdir created an empty file there)."""
    import os

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    led = open_ledger("sqlite:///drip.db")
    try:
        _books(led)
        monkeypatch.chdir(tmp_path / "b")
        result: list[Any] = []
        reader = threading.Thread(target=lambda: result.append(led.get_transfer("fund")))
        reader.start()
        reader.join()
        assert result and result[0] is not None
        assert led.sync.charge("after-chdir", W, R, 1, code="call").replayed is False
        assert not os.path.exists(tmp_path / "b" / "drip.db")
    finally:
        led.close()
