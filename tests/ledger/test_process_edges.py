"""The ledger at the edges of its process: a fork after it was opened, a close racing a
caller, PostgreSQL connections the server drops (a restart, a failover).

A forked child has none of the parent's writer threads, and must not use the database
connections it inherited (they are the parent's too): every use fails at once with a
``StoreError`` that says so, the child never hangs, and the parent goes on. A close
never strands a caller: what it cannot run is refused. A read whose pooled connection
the server closed is not a raw psycopg error: dead connections are replaced, and a read
that broke under its statement runs once more.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from drip import errors
from drip.ledger import Ledger, funding_account_id, open_ledger
from drip.ledger.batching import FORKED, GroupCommitter

FUND = funding_account_id("USDC")
WALLET, REVENUE = "user:fork", "rev:fork"
ADMIN_DSN = os.environ.get("DRIP_TEST_POSTGRES_DSN", "")

fork_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")


def _tagged(url: str, name: str) -> str:
    """``url`` with an application_name, to find this test's sessions on the server."""
    return f"{url}{'&' if '?' in url else '?'}application_name={name}"


def _funded(url: str) -> Ledger:
    led = open_ledger(url)
    led.sync.create_account(WALLET, "wallet")
    led.sync.create_account(REVENUE, "revenue")
    led.sync.transfer("fund", FUND, WALLET, 10_000_000, code="topup")
    return led


def _sessions(name: str) -> set[int]:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (name,)
        ).fetchall()
    return {row[0] for row in rows}


def _wait_child(pid: int, timeout_s: float) -> int | None:
    """The child's exit code; None if it had to be killed (it hung)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def _in_child(led: Ledger) -> dict[str, Any]:
    """What each use of the parent's ledger does in the child (never waits)."""
    seen: dict[str, Any] = {}

    def attempt(name: str, call: Any) -> None:
        try:
            call()
            seen[name] = "succeeded"
        except errors.StoreError as exc:
            seen[name] = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which asserts
            seen[name] = f"{type(exc).__name__}: {exc}"

    async def charge() -> object:
        return await led.charge("child-async", WALLET, REVENUE, 1, code="call")

    async def hold() -> object:
        return await led.hold("child-hold", WALLET, REVENUE, 1, code="call", private=True)

    attempt("sync write", lambda: led.sync.charge("child-sync", WALLET, REVENUE, 1, code="call"))
    attempt("async write", lambda: asyncio.run(charge()))
    attempt("private hold", lambda: asyncio.run(hold()))
    attempt("read", lambda: led.get_transfer("fund"))
    attempt("expire holds", led.expire_holds)
    attempt("close", led.close)
    return seen


@fork_only
def test_a_forked_child_is_refused_the_parents_ledger_and_the_parent_goes_on(
    store_url: str,
) -> None:
    name = f"drip_fork_{uuid.uuid4().hex[:8]}"
    url = _tagged(store_url, name) if store_url.startswith("postgres") else store_url
    led = _funded(url)
    try:
        asyncio.run(led.charge("parent-before", WALLET, REVENUE, 5, code="call"))
        gc.collect()  # whatever session is going to end by itself, ends before this
        before = _sessions(name) if store_url.startswith("postgres") else set()
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, and leave without running anything of pytest's
            code = 1
            try:
                os.close(read_end)
                signal.signal(signal.SIGALRM, signal.SIG_DFL)  # not pytest's handler
                signal.alarm(10)  # a hang dies here rather than block the parent's wait
                report = json.dumps(_in_child(led)).encode()
                os.write(write_end, report)
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        exit_code = _wait_child(pid, 20)
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read()
        assert exit_code == 0, "the child hung" if exit_code is None or exit_code < 0 else report
        seen = json.loads(report)
        refused = {k: v for k, v in seen.items() if k != "close"}
        assert refused == dict.fromkeys(refused, FORKED), seen
        assert seen["close"] == "succeeded"

        # the parent is untouched: its threads and its sessions (the child closed none)
        if store_url.startswith("postgres"):
            assert before <= _sessions(name)
        led.sync.charge("parent-sync", WALLET, REVENUE, 7, code="call")
        asyncio.run(led.charge("parent-async", WALLET, REVENUE, 11, code="call"))
        assert led.get_transfer("child-sync") is None
        assert led.get_transfer("child-async") is None
        assert led.balance(REVENUE).posted == 5 + 7 + 11
        assert led.check_invariants().ok
    finally:
        led.close()


# --- close --------------------------------------------------------------------------------


def _echo(ops: list[Any]) -> list[Any]:
    return [("done", op) for op in ops]


class _GatedCondition:
    """The committer's condition, whose entry by the thread named ``caller`` is held at
    the gate until ``release`` is set: the race of a push against a close, made sure."""

    def __init__(self, real: threading.Condition) -> None:
        self.real = real
        self.arrived = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def __enter__(self) -> bool:
        if threading.current_thread().name == "caller":
            self.arrived.set()
            self.release.wait(10)
        return self.real.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.real.__exit__(*exc)


def test_a_push_racing_close_is_refused_not_stranded() -> None:
    committer = GroupCommitter(_echo, housekeeping_interval_s=0.05)
    assert committer.submit("warm") == ("done", "warm")
    gate = _GatedCondition(committer._cond)
    committer._cond = gate  # type: ignore[assignment]
    outcome: list[object] = []

    def caller() -> None:
        try:
            outcome.append(committer.submit("late"))
        except errors.StoreError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=caller, name="caller", daemon=True)
    thread.start()
    assert gate.arrived.wait(5)  # the caller is at the lock, past any check made before it
    committer.close(timeout_s=5)  # the writer saw "closed and empty", and is gone
    gate.release.set()
    thread.join(5)
    assert not thread.is_alive(), "the caller blocked forever on an item nobody runs"
    [result] = outcome
    assert isinstance(result, errors.StoreError) and str(result) == "the ledger is closed"
    assert not committer._queue


def test_close_refuses_what_the_writers_left_queued() -> None:
    """A batch still running when close() gives up waiting: what was queued behind it
    never runs, and its callers, blocking and asyncio alike, hear so at once."""
    running, unblock = threading.Event(), threading.Event()

    def slow(ops: list[Any]) -> list[Any]:
        if "first" in ops:
            running.set()
            unblock.wait(10)
        return _echo(ops)

    committer = GroupCommitter(slow)
    answers: dict[str, object] = {}

    def blocking(op: str) -> None:
        try:
            answers[op] = committer.submit(op)
        except errors.StoreError as exc:
            answers[op] = exc

    async def waiting(op: str) -> None:
        try:
            answers[op] = await committer.submit_async(op)
        except errors.StoreError as exc:
            answers[op] = exc

    first = threading.Thread(target=blocking, args=("first",), daemon=True)
    first.start()
    assert running.wait(5)
    queued = [
        threading.Thread(target=blocking, args=("behind",), daemon=True),
        threading.Thread(target=lambda: asyncio.run(waiting("behind-async")), daemon=True),
    ]
    for thread in queued:
        thread.start()
    deadline = time.monotonic() + 5
    while len(committer._queue) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(committer._queue) == 2
    try:
        committer.close(timeout_s=0.2)  # the first batch is still running
        for thread in queued:
            thread.join(5)
            assert not thread.is_alive()
        for op in ("behind", "behind-async"):
            answer = answers[op]
            assert isinstance(answer, errors.StoreError), answer
            assert str(answer) == "the ledger is closed"
    finally:
        unblock.set()
    first.join(5)
    assert answers["first"] == ("done", "first")  # what was under way still finishes


# --- PostgreSQL: connections the server drops ------------------------------------------


@pytest.fixture
def pg_ledger(postgres_url: str) -> Iterator[tuple[Ledger, str]]:
    name = f"drip_drop_{uuid.uuid4().hex[:8]}"
    led = _funded(_tagged(postgres_url, name))
    try:
        yield led, name
    finally:
        led.close()


def _terminate(name: str, *, active_query: str | None = None) -> int:
    """End this test's sessions (all, or the one running ``active_query``) as a restart
    or a failover would, and wait until the server has let them go."""
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        sql = "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
        args: tuple[Any, ...] = (name,)
        if active_query is not None:
            sql += " AND state = 'active' AND query = %s"
            args += (active_query,)
        pids = [row[0] for row in admin.execute(sql, args).fetchall()]
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
        ).fetchone() != (0,):
            time.sleep(0.01)
    return len(pids)


def test_reads_survive_pooled_connections_the_server_dropped(
    pg_ledger: tuple[Ledger, str],
) -> None:
    led, name = pg_ledger
    barrier = threading.Barrier(8)

    def busy_reads() -> None:  # eight at once: the pool grows to eight connections
        barrier.wait(5)
        for _ in range(20):
            led.get_transfer("fund")

    readers = [threading.Thread(target=busy_reads) for _ in range(8)]
    for thread in readers:
        thread.start()
    for thread in readers:
        thread.join(30)
    assert _terminate(name) >= 2  # every session: the pool's, the writer's

    for _ in range(12):
        transfer = led.get_transfer("fund")
        assert transfer is not None and transfer.amount == 10_000_000
    assert led.store.execute("SELECT 1") == 1  # not retried, but no dead connection either
    assert led.check_invariants().ok
    led.sync.charge("after-sync", WALLET, REVENUE, 3, code="call")
    asyncio.run(led.charge("after-async", WALLET, REVENUE, 4, code="call"))
    assert led.balance(REVENUE).posted == 7


def test_a_read_whose_connection_broke_under_it_runs_once_more(
    pg_ledger: tuple[Ledger, str],
) -> None:
    led, name = pg_ledger
    sql = "SELECT 7 FROM pg_sleep(1)"
    result: list[object] = []

    def read() -> None:
        try:
            result.append(led.store.query(sql))
        except Exception as exc:  # noqa: BLE001 - asserted below
            result.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not _terminate(name, active_query=sql):  # as soon as it runs
        assert time.monotonic() < deadline, "the read never started"
        time.sleep(0.01)
    thread.join(10)
    assert result == [[(7,)]]


def test_a_read_that_keeps_failing_is_a_store_error(pg_ledger: tuple[Ledger, str]) -> None:
    led, _ = pg_ledger
    with pytest.raises(errors.StoreError) as raised:
        led.store.query("SELECT pg_terminate_backend(pg_backend_pid())")
    assert "AdminShutdown" in str(raised.value)
    with pytest.raises(errors.StoreError), led.store.read() as cur:
        cur.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    # the pool replaced what broke: reads go on
    assert led.store.query("SELECT 1") == [(1,)]
    assert led.check_invariants().ok


def test_event_loops_that_used_the_ledger_are_not_kept(store_url: str) -> None:
    """A batcher per event loop, in a dictionary weak on the loop, used to keep its loop
    alive itself: every ``asyncio.run`` that touched the ledger stayed in memory (on
    PostgreSQL with an open connection) until the store closed."""
    led = open_ledger(store_url)
    try:

        async def setup() -> None:
            await led.create_account("w", "wallet")
            await led.create_account("r", "revenue")
            await led.transfer("t", funding_account_id("USDC"), "w", 10**9, code="topup")

        async def call() -> None:
            hold = await led.hold(uuid.uuid4().hex, "w", "r", 10, code="c", timeout_s=60,
                                  private=True)  # fmt: skip
            await led.post(hold, 5)

        asyncio.run(setup())
        for _ in range(20):
            asyncio.run(call())
        gc.collect()
        batchers = led.store._loop_batchers  # type: ignore[attr-defined]
        assert len(batchers) <= 1
        assert led.balance("w").posted == 10**9 - 20 * 5
    finally:
        led.close()


def test_a_migration_that_fails_on_postgresql_is_a_store_error(postgres_url: str) -> None:
    """A statement or lock timeout (or a lost connection) while migrating raised a raw
    psycopg error from open_ledger; SQLite's is a StoreError, and so is this now. Here:
    another session holds the migration lock past this one's lock_timeout."""
    from urllib.parse import quote

    from drip.ledger.postgres import _MIGRATION_LOCK_KEY

    impatient = postgres_url.replace(quote("-csearch_path="),
                                     quote("-clock_timeout=100 -csearch_path="))  # fmt: skip
    assert impatient != postgres_url
    with psycopg.connect(postgres_url) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
        with pytest.raises(errors.StoreError) as info:
            open_ledger(impatient).close()
    assert "cannot prepare PostgreSQL database" in info.value.message


class _Forwarder:
    """A TCP forwarder in front of PostgreSQL that can be cut, as an outage would: every
    connection through it closes, and new ones are refused."""

    def __init__(self, port: int) -> None:
        import socket

        self._socket = socket
        self.upstream = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.conns: list[Any] = []
        self.cut_off = False
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # cut
            upstream = self._socket.create_connection(("127.0.0.1", self.upstream))
            with self.lock:  # a connection accepted just before the cut is cut too
                self.conns += [client, upstream]
                if self.cut_off:
                    self._close(client, upstream)
                    continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: Any, dst: Any) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def _close(self, *socks: Any) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(self._socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def cut(self) -> None:
        with self.lock:
            self.cut_off = True
            self.listener.close()
            self._close(*self.conns)


def test_reads_fail_fast_while_the_server_is_unreachable(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the server gone, a read waits for a pooled connection for ``POOL_TIMEOUT_S``
    and is then a StoreError (a 503), not a request held for the pool's default 30 s."""
    from urllib.parse import urlsplit

    from drip.ledger import postgres

    monkeypatch.setattr(postgres, "POOL_TIMEOUT_S", 1.0)
    port = urlsplit(postgres_url).port or 5432
    forwarder = _Forwarder(port)
    led = _funded(postgres_url.replace(f":{port}/", f":{forwarder.port}/", 1))
    try:
        assert led.get_transfer("fund") is not None
        forwarder.cut()
        start = time.monotonic()
        with pytest.raises(errors.StoreError):
            for _ in range(3):  # the first may still find a pooled connection, then break
                led.get_transfer("fund")
        assert time.monotonic() - start < 10
    finally:
        led.close()


def test_every_connection_times_out_a_silent_server(postgres_url: str) -> None:
    """Pool, writer and event-loop connections carry TCP timeouts (a server gone silent
    fails a statement in seconds, not after the OS's ~15 min), except where the DSN sets
    its own."""
    own = f"{postgres_url}&connect_timeout=3"
    led = open_ledger(own)
    try:
        store = led.store
        writer = store._writer().info.get_parameters()  # type: ignore[attr-defined]
        with store._pooled() as pooled:  # type: ignore[attr-defined]
            reader = pooled.info.get_parameters()

        async def loop_conn() -> dict[str, str]:
            from drip.ledger.pg_async import LoopBatcher

            batcher = LoopBatcher(store, asyncio.get_running_loop())  # type: ignore[arg-type]
            conn = await batcher._connection()
            try:
                return dict(conn.info.get_parameters())
            finally:
                await conn.close()

        looped = asyncio.run(loop_conn())
        for params in (writer, reader, looped):
            assert params["tcp_user_timeout"] == "15000"
            assert params["keepalives"] == "1"
            assert params["connect_timeout"] == "3"  # the DSN's own
    finally:
        led.close()


def test_a_refused_connection_leaks_no_password_through_its_cause() -> None:
    """libpq quotes back a DSN token it cannot parse, password included; the StoreError
    masks it, and is not chained to the driver's error (a logged traceback prints the
    cause)."""
    with pytest.raises(errors.StoreError) as info:
        open_ledger("postgresql://drip_test:S3CRET%zzpw@127.0.0.1:5432/drip_test")
    printed: list[str] = []  # each message a traceback prints, as it walks the chain
    exc: BaseException | None = info.value
    while exc is not None:
        printed.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    assert not any("S3CRET" in line for line in printed), printed
    assert "***" in printed[0]
