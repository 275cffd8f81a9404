"""The distributed store: PostgreSQL through psycopg 3.

Each writer thread owns one connection and runs a batch as one READ COMMITTED
transaction: it locks the holds the batch resolves, then the accounts it touches
(``SELECT ... ORDER BY id FOR UPDATE``, always in that order, so batches from many
processes queue on a hot wallet instead of racing or deadlocking), reads the
transfers it names, lets the engine apply the rules, and writes everything back in
one pipeline. A batch that loses a race (a deadlock, or the same new transfer id
inserted by another process) is retried whole; every operation is idempotent by
id, so a retry, even after an ambiguous commit, never applies anything twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from drip import errors
from drip.ledger.batching import FORKED, on_fork_in_child
from drip.ledger.engine import Engine, Op, Result, Writes
from drip.ledger.pg_async import LoopBatcher
from drip.ledger.pg_optimistic import may_have_committed, try_batch
from drip.ledger.rowcache import RowCache
from drip.ledger.store import (
    ACCOUNT_COLUMNS,
    HOLD_COLUMNS,
    TRANSFER_COLUMNS,
    TRANSFER_INSERT_COLUMNS,
    LoaderBase,
    Migration,
    Store,
    wall_clock_us,
)
from drip.ledger.types import Account, Balance, Hold, Transfer

#: How many times a batch that lost a race is retried before its callers hear of it.
BATCH_RETRIES_MAX = 8
#: Writer threads per process: batches in flight at once.
WRITERS = 1
#: Longest wait for the server to answer a new connection (psycopg: whole seconds).
CONNECT_TIMEOUT_S = 10
#: TCP settings of every connection unless the DSN sets its own: a server that goes
#: silent under an open connection (a host gone, packets dropped) fails the statement in
#: about 15 s (unacknowledged data, or keepalive probes unanswered), not after the OS's
#: retransmission timeout (about 15 minutes on Linux) with every writer of the process
#: blocked behind it.
_TCP_TIMEOUTS: dict[str, int] = {
    "connect_timeout": CONNECT_TIMEOUT_S,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 5,
    "tcp_user_timeout": 15_000,
}
#: Longest a read waits for a pooled connection: with the server down, a request fails
#: (503) after this instead of hanging for the pool's default 30 s, each, while they pile
#: up; the pool keeps reconnecting in the background and serves again once it can.
POOL_TIMEOUT_S = 5.0
_MIGRATION_LOCK_KEY = 0x44524950  # "DRIP"
_RETRYABLE = (
    pg_errors.DeadlockDetected,
    pg_errors.SerializationFailure,
    pg_errors.UniqueViolation,
    pg_errors.LockNotAvailable,
)


_LOCK_HOLDS = (
    f"SELECT {HOLD_COLUMNS} FROM transfers WHERE id = ANY(%s) "
    'AND hold_state IS NOT NULL ORDER BY id COLLATE "C" FOR UPDATE'
)
# locks are taken in code-point order (COLLATE "C"), the order Python sorts ids in for the
# fast path's statements, whatever the database's collation: the two paths never deadlock
_LOCK_ACCOUNTS = (
    f'SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ANY(%s) ORDER BY id COLLATE "C" FOR UPDATE'
)
_SELECT_TRANSFERS = f"SELECT {TRANSFER_COLUMNS} FROM transfers WHERE id = ANY(%s)"


class _PgLoader(LoaderBase):
    __slots__ = ()

    def load_holds(self, ids: set[str]) -> dict[str, Hold]:
        self.cur.execute(_LOCK_HOLDS, (sorted(ids),))
        return {r[0]: Hold(*r) for r in self.cur.fetchall()}

    def load_accounts(self, ids: set[str]) -> dict[str, Account]:
        self.cur.execute(_LOCK_ACCOUNTS, (sorted(ids),))
        return {r[0]: Account(*r) for r in self.cur.fetchall()}

    def load_transfers(self, ids: set[str]) -> dict[str, Transfer]:
        self.cur.execute(_SELECT_TRANSFERS, (list(ids),))
        return {r[0]: Transfer(*r) for r in self.cur.fetchall()}

    def load_all(
        self, hold_ids: set[str], account_ids: set[str], transfer_ids: set[str]
    ) -> tuple[dict[str, Hold], dict[str, Account], dict[str, Transfer]]:
        """One round trip: the three reads go out in a pipeline, locks in the usual order."""
        conn = self.cur.connection
        with conn.cursor() as c_holds, conn.cursor() as c_accounts, conn.cursor() as c_xfers:
            with conn.pipeline():
                if hold_ids:
                    c_holds.execute(_LOCK_HOLDS, (sorted(hold_ids),))
                if account_ids:
                    c_accounts.execute(_LOCK_ACCOUNTS, (sorted(account_ids),))
                if transfer_ids:
                    c_xfers.execute(_SELECT_TRANSFERS, (list(transfer_ids),))
            holds = {r[0]: Hold(*r) for r in c_holds.fetchall()} if hold_ids else {}
            accounts = {r[0]: Account(*r) for r in c_accounts.fetchall()} if account_ids else {}
            transfers = {r[0]: Transfer(*r) for r in c_xfers.fetchall()} if transfer_ids else {}
        return holds, accounts, transfers


class PostgresStore(Store):
    dialect = "postgres"
    workers = WRITERS

    def __init__(self, url: str, *, clock_us: Callable[[], int] = wall_clock_us) -> None:
        super().__init__(clock_us=clock_us)
        self.url = url
        self._local = threading.local()
        self._writers: list[psycopg.Connection[Any]] = []
        self._writers_lock = threading.Lock()
        #: the rows this process's batches last committed, for the fast paths (a hint:
        #: every row it vouches for is checked by compare-and-set as it is written)
        self.shared_cache = RowCache()
        self._loop_batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopBatcher]
        self._loop_batchers = weakref.WeakKeyDictionary()
        try:
            # one plain connection first: a server that is down or refuses the login is a
            # clear error now, not a pool retrying (and logging) for 30 s
            psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S).close()
            #: every connection's (``_TCP_TIMEOUTS``), but for what the DSN sets itself
            given = conninfo_to_dict(url)
            self.timeouts: dict[str, Any] = {
                k: v for k, v in _TCP_TIMEOUTS.items() if k not in given
            }
            self._pool = ConnectionPool(
                url, min_size=1, max_size=8, kwargs={"autocommit": True, **self.timeouts},
                open=True, timeout=POOL_TIMEOUT_S,
            )  # fmt: skip
            self._pool.wait(timeout=30)
        except Exception as exc:  # noqa: BLE001 - any failure to connect, as one StoreError
            # not chained: the driver's own message may quote the DSN, password included,
            # and a logged traceback prints the cause
            raise errors.StoreError(f"cannot connect to PostgreSQL: {_safe(exc, url)}") from None
        #: True in a child forked after the store opened: every use raises ``FORKED``
        self.inherited = False
        on_fork_in_child(self)

    def forked(self) -> None:
        """In a forked child: every connection here is the parent's too (one socket, one
        session), and the writer and pool threads are gone. Every use raises from now on;
        no connection is closed (that would end the parent's sessions)."""
        self.inherited = True

    def check_usable(self) -> None:
        """Raise unless this process may use the store (open, and not inherited)."""
        if self.inherited:
            raise errors.StoreError(FORKED)
        if not self.is_open:
            raise errors.StoreError("the ledger store is not open")

    # --- connections ------------------------------------------------------------------

    def _writer(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = psycopg.connect(self.url, autocommit=False, **self.timeouts)
            # every statement a writer runs finds its rows by id or through an index, and
            # psycopg prepares them: a plan made while a table is young (a sequential scan
            # is cheapest on a few pages) would be kept as the journal grows past millions
            conn.execute("SET enable_seqscan = off")
            conn.commit()
            self._local.conn = conn
            with self._writers_lock:
                self._writers.append(conn)
        return conn

    def _close_connections(self) -> None:
        if self.inherited:  # the parent's sessions: left to the parent (see forked)
            return
        for batcher in list(self._loop_batchers.values()):
            batcher.close()
        with self._writers_lock:
            for conn in self._writers:
                conn.close()
            self._writers.clear()
        self._pool.close()

    def sql(self, query: str) -> str:
        return query.replace("?", "%s")

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Cursor[Any]]:
        """A transaction on this thread's writer connection; ``write`` commits it."""
        conn = self._writer()
        try:
            with conn.cursor() as cur:
                yield cur
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.commit()
        except BaseException:
            if not conn.closed:
                conn.rollback()
            raise

    def _getconn(self) -> psycopg.Connection[Any]:
        """A pooled connection, after discarding those the server closed while they sat
        idle in the pool (a restart, a failover, an idle timeout): each is found by one
        look at its socket (``_dropped``), not by the statement it would fail."""
        pool = self._pool
        for _ in range(pool.max_size):
            conn = pool.getconn()
            if not _dropped(conn):
                return conn
            pool.putconn(conn)  # broken: the pool discards it and connects a new one
        return pool.getconn()

    @contextmanager
    def _pooled(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection for reads; the server unreachable or gone (an
        ``OperationalError``, or no connection within the pool's timeout) as a
        ``StoreError``, a ``_Dropped`` one if the connection broke under the statement."""
        if self.inherited:
            raise errors.StoreError(FORKED)
        lost = False
        try:
            conn = self._getconn()
            try:
                yield conn
            except psycopg.OperationalError:
                lost = conn.broken
                raise
            finally:
                self._pool.putconn(conn)  # the pool discards it if it broke
        except (psycopg.OperationalError, PoolTimeout) as exc:
            kind = _Dropped if lost else errors.StoreError
            raise kind(f"PostgreSQL read failed: {_safe(exc, self.url)}") from None

    @contextmanager
    def read(self) -> Iterator[psycopg.Cursor[Any]]:
        with self._pooled() as conn, conn.cursor() as cur:
            yield cur

    @contextmanager
    def snapshot(self) -> Iterator[psycopg.Cursor[Any]]:
        """A REPEATABLE READ, READ ONLY transaction: one snapshot for every query."""
        with self._pooled() as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield cur

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """As the base; a read whose connection broke under it (the server dropped it
        meanwhile) runs once more, on another connection: a read is safe to repeat."""
        try:
            return super().query(sql, params)
        except _Dropped:
            return super().query(sql, params)

    def loader(self, cur: psycopg.Cursor[Any]) -> _PgLoader:
        return _PgLoader(cur, self.window_usage_sql())

    # --- the batch --------------------------------------------------------------------

    def run_batch(self, ops: list[Op]) -> list[list[Result]]:
        cache = self.shared_cache
        try:
            fast = try_batch(self, self._writer(), cache, ops)
        except psycopg.OperationalError:
            fast = None  # the locked path reconnects
            cache.clear()
        if fast is not None:
            return fast
        return self._run_locked(ops)

    def submit_async(self, op: Op) -> Awaitable[list[Result]]:
        """Asyncio callers' batches run on their loop (``pg_async``)."""
        self.check_writable()
        if not self.is_open:
            raise errors.StoreError("the ledger store is not open")
        loop = asyncio.get_running_loop()
        batcher = self._loop_batchers.get(loop)
        if batcher is None:
            batcher = self._loop_batchers[loop] = LoopBatcher(self, loop)
        return batcher.submit(op)

    def applied(self, engine: Engine) -> None:
        self.shared_cache.remember(engine)

    def remembered_balance(self, account_id: str) -> Balance | None:
        # every batch of this process remembers the rows it wrote once its statement
        # succeeded (compare-and-set checked), and never changes a remembered row in place
        account = self.shared_cache.accounts.get(account_id)
        return None if account is None else account.balance

    def may_isolate(self, exc: Exception) -> bool:
        # a connection lost or refused, the pool exhausted: every operation alike
        return super().may_isolate(exc) and not isinstance(
            exc, psycopg.OperationalError | PoolTimeout
        )

    def _attempt_locked(self, ops: list[Op]) -> list[list[Result]]:
        """One locked run of the batch. If it fails once its writes may have gone out (the
        connection broke after the COMMIT was sent: an ambiguous commit), its new
        transfers are noted (``Store.attempts``): the next run finds them and answers
        them as the operations' own, not as replays of an earlier call."""
        with self.transaction() as cur:
            engine = Engine(self.loader(cur), self.clock_us())
            try:
                return self.apply_with(cur, engine, ops)
            except BaseException as exc:
                if may_have_committed(exc):
                    self.attempts.note(ops, engine.writes)
                raise

    def _run_locked(self, ops: list[Op]) -> list[list[Result]]:
        """Read and lock current rows, apply, write; retried whole when it loses a race."""
        delay_s = 0.001
        for attempt in range(BATCH_RETRIES_MAX + 1):
            try:
                return self._attempt_locked(ops)
            except _RETRYABLE:
                self.shared_cache.clear()
                if attempt == BATCH_RETRIES_MAX:
                    raise
            except pg_errors.CheckViolation as exc:
                raise errors.InvariantViolation(
                    f"the database refused the batch: {exc.diag.message_primary}"
                ) from exc
            except psycopg.OperationalError:
                # the connection broke (maybe mid-commit): reconnect and replay; ids dedupe,
                # and what this batch itself committed is answered as new (``attempts``)
                self.shared_cache.clear()
                conn = getattr(self._local, "conn", None)
                if conn is not None:
                    conn.close()
                if attempt == BATCH_RETRIES_MAX:
                    raise
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.1)
        raise AssertionError("unreachable")  # pragma: no cover

    def write(self, cur: psycopg.Cursor[Any], writes: Writes) -> None:
        # one round trip: the writes and the COMMIT go out together in a pipeline
        with cur.connection.pipeline():
            self.update_rows(cur, writes)
            read_back = self.insert_rows(cur, writes)
            cur.connection.commit()
        read_back()

    def insert_rows(
        self, cur: Any, writes: Writes, last_seq: int | None = None
    ) -> Callable[[], None]:
        """As the base, but PostgreSQL assigns ``seq`` (an identity): read it back with
        RETURNING, on a cursor of its own (pipelined results are per cursor)."""
        if writes.new_accounts:
            cur.executemany(
                f"INSERT INTO accounts ({ACCOUNT_COLUMNS}) VALUES ({','.join(['%s'] * 12)})",
                [self.account_row(a) for a in writes.new_accounts],
            )
        if not writes.new_transfers:
            return lambda: None
        returning = cur.connection.cursor()
        returning.executemany(
            f"INSERT INTO transfers ({TRANSFER_INSERT_COLUMNS}) "
            f"VALUES ({','.join(['%s'] * 14)}) RETURNING seq",
            self.transfer_rows(writes),
            returning=True,
        )
        transfers = writes.new_transfers

        def read_back() -> None:
            with returning:
                for transfer in transfers:
                    row = returning.fetchone()
                    transfer.seq = int(row[0]) if row else 0
                    returning.nextset()

        return read_back

    def migrate(self, component: str, migrations: Sequence[Migration]) -> None:
        if self.inherited:
            raise errors.StoreError(FORKED)
        if self.read_only:  # checked, never changed
            self.check_schema(component, migrations)
            return
        try:
            self._migrate(component, migrations)
        except psycopg.Error as exc:  # a timeout, a lost connection: typed, as SQLite's
            raise errors.StoreError(
                f"cannot prepare PostgreSQL database: {_safe(exc, self.url)}"
            ) from None

    def _migrate(self, component: str, migrations: Sequence[Migration]) -> None:
        with psycopg.connect(self.url, autocommit=False) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS drip_migrations (component TEXT NOT NULL, "
                "version INTEGER NOT NULL, applied_us BIGINT NOT NULL, "
                "PRIMARY KEY (component, version))"
            )
            row = conn.execute(
                "SELECT coalesce(max(version), 0) FROM drip_migrations WHERE component = %s",
                (component,),
            ).fetchone()
            current = row[0] if row else 0
            for m in sorted(migrations, key=lambda m: m.version):
                if m.version <= current:
                    continue
                conn.execute(m.postgres.encode())
                conn.execute(
                    "INSERT INTO drip_migrations VALUES (%s, %s, %s)",
                    (component, m.version, wall_clock_us()),
                )


class _Dropped(errors.StoreError):
    """A read's connection broke under its statement: the server closed it (a restart,
    a failover, ``pg_terminate_backend``). ``query`` runs the read once more."""


def _readable(fd: int) -> bool:
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])  # pragma: no cover - no poll (Windows)


def _dropped(conn: psycopg.Connection[Any]) -> bool:
    """Whether the server closed this idle connection. The server says nothing unasked
    on an idle session, except its last words when it ends it (a FATAL message, then
    end of file): a silent socket is taken as alive without a round trip (one ``poll``);
    one with something to read is checked by an empty query."""
    if conn.closed or conn.broken:
        return True
    try:
        if not _readable(conn.fileno()):
            return False
        ConnectionPool.check_connection(conn)
    except (psycopg.Error, OSError, ValueError):
        return True
    return False


def _safe(exc: BaseException, url: str) -> str:
    """An error message without the DSN's password. libpq quotes back the part of a DSN
    it cannot parse (``invalid percent-encoded token: "..."``): such a message has every
    quoted token masked; the password, as libpq or a URL parser reads it, is masked in
    any message. Truncated last, so a long secret is never cut before it is masked."""
    text = str(exc).split("\n")[0]
    if isinstance(exc, psycopg.ProgrammingError):  # the DSN itself did not parse
        text = re.sub(r'"[^"]*"', '"***"', text)
    secrets: set[str] = set()
    with contextlib.suppress(psycopg.Error):  # not a usable DSN: its URL form may still be
        secrets.add(str(conninfo_to_dict(url).get("password") or ""))
    with contextlib.suppress(ValueError):
        raw = urlsplit(url).password or ""
        secrets |= {raw, unquote(raw)}
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:  # shorter ones would mask parts of ordinary words
            text = text.replace(secret, "***")
    return type(exc).__name__ + ": " + text[:200]
