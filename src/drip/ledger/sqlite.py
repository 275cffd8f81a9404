"""The embedded default store: one SQLite file in WAL mode.

Each batch runs inside ``BEGIN IMMEDIATE``, which takes SQLite's write lock for the
whole transaction, so several processes sharing the file serialise their batches and
never race. Readers use their own connections (one per thread) and never wait.

Asyncio callers get a fast path: operations submitted during one turn of the event
loop are applied as one batch right there, on the loop's thread, with no thread
hand-off (a transaction here is tens of microseconds of CPU). If the write lock is
busy (another process, or a sync caller's batch in flight) the batch is handed to the
writer thread instead, which waits for the lock; the loop itself never blocks on it.

When no other connection has committed since the loop's connection last did (``PRAGMA
data_version``), its batch is applied to the rows it remembers instead of reading them.

The WAL is checkpointed by the writer thread's housekeeping, not inside commits: every
second, and as soon as the loop has committed ``CHECKPOINT_BATCHES`` batches. The
checkpoint holds the process's write lock (the loop hands batches to the writer thread
meanwhile), so it completes and the next transaction starts the WAL over instead of
growing it without bound under a steady load.

``synchronous`` defaults to ``NORMAL``: in WAL mode a commit survives a crash of the
process, and the last transactions before a power cut may be lost (never corrupted).
Pass ``?synchronous=full`` in the URL to fsync every commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from drip import errors
from drip.ledger.batching import (
    FORKED,
    LoopBound,
    answer,
    drop_orphans,
    fail,
    on_fork_in_child,
)
from drip.ledger.engine import Engine, Op, Result, Writes, private_holds_only
from drip.ledger.rowcache import RowCache, apply_remembered
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
from drip.ledger.types import (
    BATCH_OPS_MAX,
    DERIVED_SEP,
    Account,
    Balance,
    Hold,
    Transfer,
    TransferFlags,
)

_HOLD_EXTRA = "hold_expires_us, hold_state, hold_resolved_amount, hold_resolved_by"
_RESOLVING = int(TransferFlags.POST_PENDING | TransferFlags.VOID_PENDING
                 | TransferFlags.EXPIRE_PENDING)  # fmt: skip
_INSERT_HEAD = f"INSERT INTO transfers ({TRANSFER_INSERT_COLUMNS}, seq) VALUES "
_ROW_MARKS = f"({','.join('?' * 15)})"
#: Rows per multi-row INSERT (15 parameters each, well under SQLite's 32,766).
INSERT_ROWS_MAX = 256
#: Most batches one window answers before it commits, and its longest life (seconds):
#: past it, a watchdog thread commits the window even if the loop is busy.
WINDOW_BATCHES = 16
WINDOW_ROWS = 4096
WINDOW_S = 0.005
#: A loop batch this large is flushed at once; a smaller one waits one more turn of the
#: loop, so the requests being parsed meanwhile join it (a server's batches grow from
#: about 4 operations to 8 with 8 busy connections; an idle loop's extra turn is a few
#: microseconds).
FLUSH_NOW_OPS = 16
#: Ids per ``IN (...)`` list: within the 999 bound variables of old SQLite builds.
IN_LIST_MAX = 500
#: How often a transaction or read looks whether the file at the path is still the one
#: opened (``SqliteStore.check_file``).
FILE_CHECK_S = 0.005
#: How often the watchdog looks (a window lives at most about WINDOW_S + this).
WATCHDOG_POLL_S = 0.01
#: How long a finding that another process has the file open stands.
PRESENCE_CHECK_S = 0.1
_SYNCHRONOUS = {"off": "OFF", "normal": "NORMAL", "full": "FULL", "extra": "EXTRA"}
log = logging.getLogger("drip.ledger")

#: How long a writer waits for another process's write lock before failing the batch.
BUSY_TIMEOUT_MS = 30_000
#: Fast-path commits between two checkpoints (a few MB of WAL at most).
CHECKPOINT_BATCHES = 1000

#: Connections a forked child inherited: never used, closed or freed there (closing one
#: rolls back a transaction its parent may have open, which rewrites the WAL index the
#: parent shares). Kept referenced so that dropping the store does not free them either.
_INHERITED: list[object] = []


def _identity(path: str) -> tuple[int, int]:
    """The file at ``path`` as (device, inode); OSError if there is none."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _busy(exc: sqlite3.OperationalError) -> bool:
    """Another connection holds the write lock (``busy_timeout=0`` does not wait)."""
    return "locked" in str(exc) or "busy" in str(exc)


class _Replay(Exception):
    """The fast path met an existing transfer id: roll back, run the batch reading rows."""


class _SqliteLoader(LoaderBase):
    __slots__ = ()

    def _select(self, columns: str, table: str, ids: set[str]) -> list[Any]:
        rows: list[Any] = []
        listed = list(ids)
        for start in range(0, len(listed), IN_LIST_MAX):
            chunk = listed[start : start + IN_LIST_MAX]
            self.cur.execute(f"SELECT {columns} FROM {table} WHERE id IN "
                             f"({','.join('?' * len(chunk))})", chunk)  # fmt: skip
            rows += self.cur.fetchall()
        return rows

    def load_accounts(self, ids: set[str]) -> dict[str, Account]:
        return {r[0]: Account(*r) for r in self._select(ACCOUNT_COLUMNS, "accounts", ids)}

    def load_transfers(self, ids: set[str]) -> dict[str, Transfer]:
        return {r[0]: Transfer(*r) for r in self._select(TRANSFER_COLUMNS, "transfers", ids)}

    def load_holds(self, ids: set[str]) -> dict[str, Hold]:
        rows = self._select(HOLD_COLUMNS, "transfers", ids)
        return {r[0]: Hold(*r) for r in rows if r[5] is not None}

    def load_all(
        self, hold_ids: set[str], account_ids: set[str], transfer_ids: set[str]
    ) -> tuple[dict[str, Hold], dict[str, Account], dict[str, Transfer]]:
        # holds and transfers live in one table: one query reads both
        holds: dict[str, Hold] = {}
        transfers: dict[str, Transfer] = {}
        ids = hold_ids | transfer_ids
        if ids:
            for r in self._select(f"{TRANSFER_COLUMNS}, {_HOLD_EXTRA}", "transfers", ids):
                if r[0] in transfer_ids:
                    transfers[r[0]] = Transfer(*r[:11])
                if r[0] in hold_ids and r[12] is not None:
                    holds[r[0]] = Hold(r[0], r[1], r[2], r[3], r[11], r[12], r[13], r[14])
        accounts = self.load_accounts(account_ids) if account_ids else {}
        return holds, accounts, transfers


class SqliteStore(Store):
    dialect = "sqlite"
    remote_reads = False  # a local file in WAL mode: readers never wait for writers

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "normal",
        clock_us: Callable[[], int] = wall_clock_us,
        read_only: bool = False,
    ) -> None:
        super().__init__(clock_us=clock_us)
        if synchronous.lower() not in _SYNCHRONOUS:
            raise errors.ConfigError(f"synchronous must be one of {sorted(_SYNCHRONOUS)}")
        #: read-only: no file is created, every connection is ``query_only``, and the
        #: journal mode is left as it is (a Drip database is in WAL mode already)
        self.read_only = read_only
        if read_only and not os.path.exists(path):
            raise errors.StoreError(f"no SQLite database at {path!r}", param="database_url")
        self.path = path
        #: every connection opens this (a relative path would follow the process's
        #: working directory, and a reader opened after a chdir would find another file)
        self._abspath = os.path.abspath(path)
        self.synchronous = _SYNCHRONOUS[synchronous.lower()]
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []  # the writer's and the loop's
        #: each thread's read connection, closed when its thread ends (worker pools come
        #: and go) or when the store closes
        self._readers: weakref.WeakSet[_Reader] = weakref.WeakSet()
        self._all_lock = threading.Lock()
        self._writer = self._connect()
        try:
            self._writer.execute(
                "SELECT count(*) FROM sqlite_master" if read_only else "PRAGMA journal_mode=WAL"
            )
        except sqlite3.Error as exc:  # e.g. "file is not a database"
            self._writer.close()
            raise errors.StoreError(f"cannot open SQLite database {path!r}: {exc}") from exc
        #: the file this store opened, as (device, inode): a file deleted or replaced at
        #: its path (a restore done with mv, an rm) is noticed, not written on unseen
        self._identity = _identity(self._abspath)
        self._gone: str | None = None
        self._file_checked_s = time.monotonic()
        # the loop's connection never waits for the lock: busy means "hand off"
        self._fast = self._connect()
        self._fast.execute("PRAGMA busy_timeout=0")
        limit = self._fast.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        #: the fast connection's memory of its own commits (see try_run_batch_now)
        self._cache = RowCache()
        self._fast_version: int | None = None
        #: the journal's highest seq as of the fast connection's last commit, if known
        self._fast_seq: int | None = None
        #: the loop connection's open transaction, if a batch of holds left one open
        self._window: _Window | None = None
        #: whether holds may be answered before they commit (off after a failed commit)
        self._deferring = True
        #: taken by whoever runs or commits the window (the loop, or a thread settling it)
        self._window_mutex = threading.Lock()
        self._presence = _Presence(path)
        self._watchdog: threading.Thread | None = None
        self._closing = threading.Event()
        #: rows per multi-row INSERT within this SQLite's limit on bound variables
        self._insert_rows_max = max(1, min(INSERT_ROWS_MAX, limit // 15))
        self._since_checkpoint = 0
        #: one transaction at a time in this process, whichever connection runs it
        self._write_lock = threading.Lock()
        self._loop_batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopBatcher]
        self._loop_batchers = weakref.WeakKeyDictionary()
        self._last_batcher: weakref.ref[_LoopBatcher] | None = None
        #: set in a child forked after the store opened: every use raises ``FORKED``
        self._forked = False
        on_fork_in_child(self)

    def forked(self) -> None:
        """In a forked child: the connections are the parent's (SQLite's locks belong to
        processes, its memory of them to the connection), and the writer and watchdog
        threads are gone. Every use raises from now on; nothing inherited is touched."""
        self._forked = True
        _INHERITED.extend([*self._all, *(reader.conn for reader in list(self._readers))])

    def _connect(self, *, keep: bool = True) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self._abspath,
                isolation_level=None,
                check_same_thread=False,
                timeout=BUSY_TIMEOUT_MS / 1000,
            )
        except sqlite3.Error as exc:
            raise errors.StoreError(f"cannot open SQLite database {self.path!r}: {exc}") from exc
        try:
            for pragma in (
                f"busy_timeout={BUSY_TIMEOUT_MS}",
                f"synchronous={self.synchronous}",
                "foreign_keys=OFF",
                "cache_size=-65536",
                # commits never checkpoint (that would fsync on the hot path); housekeeping
                f"wal_autocheckpoint={0 if self.synchronous != 'FULL' else 1000}",
                "journal_size_limit=67108864",
                *(("query_only=ON",) if self.read_only else ()),
            ):
                conn.execute(f"PRAGMA {pragma}")
        except sqlite3.Error as exc:
            conn.close()
            raise errors.StoreError(f"cannot open SQLite database {self.path!r}: {exc}") from exc
        if keep:
            with self._all_lock:
                self._all.append(conn)
        return conn

    def _close_connections(self) -> None:
        if self._forked:  # the parent's connections, locks and threads: left alone
            return
        self._closing.set()
        try:
            self.settle()
        except errors.DripError:
            log.exception("SQLite: the last open window could not commit")
        if self._watchdog is not None:
            self._watchdog.join(1.0)
        self._presence.close()
        with self._all_lock:
            for conn in [*self._all, *(r.conn for r in list(self._readers))]:
                conn.close()
            self._all.clear()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """This process's write lock, for a blocking writer. Settling and then waiting
        would not do: the loop may open a new window in between, and keep it until a
        capture joins it, while the loop may be waiting on this very thread. So: settle,
        try, and settle again until the lock is ours."""
        while True:
            self.settle()
            if self._write_lock.acquire(timeout=0.002):
                break
        try:
            yield
        finally:
            self._write_lock.release()

    def check_file(self) -> None:
        """Raise StoreError if the file this store opened is no longer the one at its path
        (deleted, or replaced): its writes would land where nobody will ever read them,
        and its reads would answer from a file that is gone. Sticky: once found, every
        use fails. One ``stat`` at most every ``FILE_CHECK_S`` (it costs about as much as
        a metered call's Python work), so what lands in a replaced file is bounded by
        that, as a window's life is by ``WINDOW_S``."""
        if self._gone is None:
            now_s = time.monotonic()
            if now_s < self._file_checked_s + FILE_CHECK_S:
                return
            self._file_checked_s = now_s
            try:
                now = _identity(self._abspath)
            except OSError:
                now = None
            if now == self._identity:
                return
            how = "deleted" if now is None else "replaced by another file"
            self._gone = (f"the SQLite database {self.path!r} was {how} while this process "
                          "had it open; restart it to use the file now at that path")  # fmt: skip
            log.error("SQLite: %s", self._gone)
        raise errors.StoreError(self._gone)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        self.check_file()
        with self._locked():
            # another connection is about to commit: the loop's memory of rows is no
            # longer the file's (its next batch would read them again anyway), and must
            # not answer ``remembered_balance`` meanwhile
            self._cache.clear()
            cur = self._writer.cursor()
            cur.execute("BEGIN IMMEDIATE")
            with _rollback_on_error(cur):
                yield cur

    def try_run_batch_now(
        self, ops: list[Op], *, may_defer: bool = False
    ) -> list[list[Result]] | None:
        """Run ``ops`` now if the write lock is free at once; ``None`` if it is not.

        When no other connection has committed since this one last did (``PRAGMA
        data_version`` unchanged, read under the write lock), the rows it remembers from
        its own last batches are exactly the database's: the batch is applied to them
        without reading. Anything they cannot decide, a refusal, or a transfer id that
        turns out to exist sends the batch down the reading path instead.

        With ``may_defer``, a batch that only takes private holds is answered before it
        commits: its transaction stays open (a *window*, see ``_Window``) for the next
        batches to join; ``settle()`` commits it."""
        if self._forked:  # per batch, before any lock (the parent's threads held them)
            raise errors.StoreError(FORKED)
        with self._window_mutex:
            for _attempt in (1, 2):
                window = self._window
                cur = self._fast.cursor()
                try:
                    if window is None:
                        window = self._open_window(cur)
                        if window is None:
                            return None  # the lock is busy
                    return self._run_in_window(cur, window, ops, may_defer)
                except _Replay:  # nothing was answered: roll back, read the rows this time
                    self._abandon(cur, window)
                except BaseException as exc:
                    if self._window is window and window is not None:  # not committed
                        self._deferring = False  # see _commit
                        self._abandon(cur, window)
                    if isinstance(exc, sqlite3.Error):
                        raise errors.StoreError(f"SQLite could not commit: {exc}") from exc
                    raise
            raise AssertionError("unreachable: the second attempt reads every row")

    def may_isolate(self, exc: Exception) -> bool:
        # the database busy, locked, full or failing: every operation alike
        return super().may_isolate(exc) and not isinstance(exc, sqlite3.OperationalError)

    def _open_window(self, cur: sqlite3.Cursor) -> _Window | None:
        """Take the write lock and begin, without waiting; ``None`` if either is busy."""
        self.check_file()
        if not self._write_lock.acquire(blocking=False):
            return None
        try:
            if not self._begin(cur):
                self._write_lock.release()
                return None
            version = cur.execute("PRAGMA data_version").fetchone()[0]
        except BaseException:
            self._abandon(cur, None)
            raise
        self._window = _Window(version)
        return self._window

    def _run_in_window(
        self, cur: sqlite3.Cursor, window: _Window, ops: list[Op], may_defer: bool
    ) -> list[list[Result]]:
        """The batch inside the open transaction; commits unless it may stay open."""
        results = None
        defer = (may_defer and self._deferring and private_holds_only(ops)
                 and window.roomy() and self._presence.alone())  # fmt: skip
        if window.version == self._fast_version:
            results = self._from_memory(
                cur, window, ops, check_ids=defer or window.answered > 0, answered=defer
            )
        if results is None:
            results = self._read_in_window(cur, window, ops)
        elif not defer:
            try:
                self._write_window(cur, window)
            except _Replay:
                if window.answered:  # pragma: no cover - their ids were checked first
                    raise errors.InvariantViolation(
                        "a transfer id in an open window exists"
                    ) from None
                raise
        if defer:
            window.answered += 1
            if self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=_watch,
                    args=(weakref.ref(self), self._closing),
                    daemon=True,
                    name="drip-sqlite-window-watchdog",
                )
                self._watchdog.start()
            return results  # answered; committed by settle(), the next batch, the watchdog
        self._commit(cur, window)
        return results

    def _read_in_window(
        self, cur: sqlite3.Cursor, window: _Window, ops: list[Op]
    ) -> list[list[Result]]:
        """The batch on rows read in this transaction, after the window's own writes.
        With answers already given, the batch runs under a savepoint: if it fails, only
        its own writes are undone, and the answered holds still commit."""
        try:
            self._write_window(cur, window)
        except _Replay:
            if window.answered:  # pragma: no cover - their ids were checked first
                raise errors.InvariantViolation("a transfer id in an open window exists") from None
            raise
        self._cache.clear()
        self._fast_seq = None
        guarded = window.answered > 0
        if guarded:
            cur.execute("SAVEPOINT drip_batch")
        try:
            engine = Engine(self.loader(cur), self.clock_us())
            results = self.apply_with(cur, engine, ops)
        except BaseException:
            if not guarded:
                raise
            cur.execute("ROLLBACK TO drip_batch")
            cur.execute("RELEASE drip_batch")
            self._forget()
            self._commit(cur, window)  # what was answered stands; this batch failed alone
            raise
        if guarded:
            cur.execute("RELEASE drip_batch")
        self._cache.remember(engine)
        new = engine.writes.new_transfers
        if new:
            self._fast_seq = new[-1].seq
        self._fast_version = window.version  # what it read, under the lock, is exact
        return results

    def _from_memory(
        self,
        cur: sqlite3.Cursor,
        window: _Window,
        ops: list[Op],
        *,
        check_ids: bool,
        answered: bool = False,
    ) -> list[list[Result]] | None:
        """The batch on remembered rows, added to the window's writes (nothing is sent
        yet), or ``None`` when they cannot decide it alone. ``check_ids``: look for
        replayed ids now (a window that answers before it commits cannot roll back when
        the insert finds one)."""
        applied = apply_remembered(self._cache, self.clock_us(), ops)
        if applied is None:
            return None
        engine, results, _ = applied
        writes = engine.finish()
        if check_ids and self._exists(cur, window, writes):
            return None
        if self._fast_seq is None:
            cur.execute("SELECT coalesce(max(seq), 0) FROM transfers")
            self._fast_seq = int(cur.fetchone()[0])
        for transfer in writes.new_transfers:
            self._fast_seq += 1
            transfer.seq = self._fast_seq
        # answered before its rows are sent: the window keeps its own copies of the
        # transfers it answers with, so what a caller does to those cannot reach the file
        window.add(writes, copies=answered)
        self._cache.remember(engine)
        return results

    @staticmethod
    def _exists(cur: sqlite3.Cursor, window: _Window, writes: Writes) -> bool:
        """Whether an id among the new transfers is taken (in the window, or in the file).
        Not looked up: a hold's resolution (``<hold>~post``, ``~void``, ``~expired``: new
        whenever the hold is open in exact memory), and ids derived from an id of this
        very batch (its ``~fee``, ``~cap0``: new if that one is). A late charge
        (``<expired hold>~post``, a plain transfer whose hold is not in the batch) is."""
        new = writes.new_transfers
        batch = {t.id for t in new}
        # a derived id is new if its parent (``<id>`` of ``<id>~fee``) is new in this batch:
        # a resolution (new by memory) or an id looked up here itself
        ids = [t.id for t in new if DERIVED_SEP not in t.id or not (
            t.flags & _RESOLVING or t.id.rsplit(DERIVED_SEP, 1)[0] in batch)]  # fmt: skip
        if not ids:
            return False
        if not window.ids.isdisjoint(ids):
            return True
        for start in range(0, len(ids), IN_LIST_MAX):
            chunk = ids[start : start + IN_LIST_MAX]
            cur.execute(f"SELECT 1 FROM transfers WHERE id IN ({','.join('?' * len(chunk))}) "
                        "LIMIT 1", chunk)  # fmt: skip
            if cur.fetchone() is not None:
                return True
        return False

    def _write_window(self, cur: sqlite3.Cursor, window: _Window) -> None:
        """Send the window's rows (inserts carry each new hold's latest state)."""
        writes = window.take()
        if writes.empty():
            return
        try:
            if writes.new_accounts:  # pragma: no cover - memory never creates accounts
                self.write(cur, Writes(new_accounts=writes.new_accounts))
            if writes.new_transfers:
                self.insert_transfer_rows(cur, self.transfer_rows(writes, with_seq=True))
            self.update_rows(cur, writes)
        except sqlite3.IntegrityError:  # a transfer id that already exists: a replay
            raise _Replay from None

    def _commit(self, cur: sqlite3.Cursor, window: _Window) -> None:
        cur.execute("COMMIT")
        # committed: nothing after this point may raise (the batch is done)
        self._window = None
        # windows again: after a failed one (a full disk, an I/O error) holds are answered
        # only once committed, so a fault that lasts fails each call before its work runs
        # instead of rolling back holds already answered, call after call
        self._deferring = True
        self._fast_version = window.version
        self._write_lock.release()
        self._since_checkpoint += 1
        if self._since_checkpoint >= CHECKPOINT_BATCHES:
            self._since_checkpoint = 0
            committer = self._committer
            if committer is not None:
                with contextlib.suppress(errors.DripError):
                    committer.housekeep_soon()

    def _abandon(self, cur: sqlite3.Cursor, window: _Window | None) -> None:
        """Roll back the open transaction and forget what memory it built on. Holds it
        had answered are lost, as in a crash: their captures will not find them."""
        if window is not None and window.answered:
            log.error("SQLite batch failed: %d answered holds rolled back", window.answered)
        self._forget()
        self._window = None
        try:
            if self._fast.in_transaction:
                cur.execute("ROLLBACK")
        finally:
            self._write_lock.release()

    @property
    def window_open(self) -> bool:
        return self._window is not None

    def settle(self) -> None:
        """Commit the open window, if any (from any thread). Every read and every other
        writer calls this first, so nobody ever sees less than what was answered. In a
        forked child it raises: so does every read and write that calls it first."""
        if self._forked:  # a window here is the parent's, on the parent's connection
            raise errors.StoreError(FORKED)
        if self._window is None:
            return
        with self._window_mutex:
            window = self._window
            if window is None:
                return
            cur = self._fast.cursor()
            try:
                self._write_window(cur, window)
                self._commit(cur, window)
            except BaseException as exc:
                if self._window is window:  # not committed: undo it
                    self._deferring = False  # see _commit
                    self._abandon(cur, window)
                if isinstance(exc, sqlite3.Error | _Replay):
                    raise errors.StoreError(f"SQLite could not commit: {exc!r}") from exc
                raise

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """As the base, but on the loop's connection when the write lock is free at once:
        a write there (never to a ledger table) leaves its memory of ledger rows provably
        current, where one from another connection would make the next batch read them."""
        self.check_writable()
        self.settle()
        if not self._write_lock.acquire(blocking=False):
            with self._locked():  # not behind windows the loop keeps reopening
                return super().execute(sql, params)
        try:
            cur = self._fast.cursor()
            try:
                cur.execute(sql, tuple(params))
                return int(cur.rowcount)
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    raise
            finally:
                cur.close()
        finally:
            self._write_lock.release()
        with self._locked():  # another process holds the file's lock: wait for it
            return super().execute(sql, params)

    def remembered_balance(self, account_id: str) -> Balance | None:
        # the loop's memory is the file's as of its own latest batch (each batch checks
        # that nobody else committed since, or reads), or it was cleared; rows in it are
        # replaced, never changed in place
        account = self._cache.accounts.get(account_id)
        return None if account is None else account.balance

    def get_account(self, account_id: str) -> Account | None:
        """From the loop connection's memory when it is provably the file's (nobody else
        committed since its last batch, checked now), else from the file."""
        self.settle()
        if account_id in self._cache.accounts and self._write_lock.acquire(blocking=False):
            try:
                remembered = self._cache.accounts.get(account_id)
                if remembered is not None and self._fast_version is not None:
                    version = self._fast.execute("PRAGMA data_version").fetchone()[0]
                    if version == self._fast_version:
                        return remembered.copy()
            except sqlite3.Error:
                pass  # the file answers below
            finally:
                self._write_lock.release()
        return super().get_account(account_id)

    def _begin(self, cur: sqlite3.Cursor) -> bool:
        """``BEGIN IMMEDIATE`` without waiting; False if another process holds the lock."""
        try:
            cur.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _busy(exc):
                return False
            raise
        return True

    def _forget(self) -> None:
        self._fast_version = None
        self._fast_seq = None
        self._cache.clear()

    def submit_async(self, op: Op) -> Awaitable[list[Result]]:
        self.check_writable()
        loop = asyncio.get_running_loop()
        last = self._last_batcher
        batcher = None if last is None else last()
        if batcher is None or batcher.loop is not loop:
            batcher = self._loop_batchers.get(loop)
            if batcher is None:
                batcher = self._loop_batchers[loop] = _LoopBatcher(self, loop)
            self._last_batcher = weakref.ref(batcher)
        return batcher.submit(op)

    def checkpoint(self) -> None:
        """Copy the WAL back into the database file, in two passes: the bulk beside this
        process's writers, then, with them waiting, the few frames they added meanwhile,
        so the checkpoint completes and the next transaction starts the WAL over. (A
        checkpoint beside a steady writer never completes, and the WAL would grow
        without bound; one done entirely under the lock stops the writers for the whole
        copy and its fsync, tens of milliseconds.) Other processes' writers never wait."""
        with self.read() as cur:  # not the writer's connection: its transactions go on
            cur.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        with self._locked():
            self._writer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def expire_due_holds(self) -> int:
        self.check_writable()
        self.checkpoint()
        return super().expire_due_holds()

    @contextmanager
    def read(self) -> Iterator[sqlite3.Cursor]:
        self.settle()
        self.check_file()
        reader: _Reader | None = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._local.reader = _Reader(self._connect(keep=False))
            self._readers.add(reader)
        cur = reader.conn.cursor()
        try:
            yield cur
        finally:
            cur.close()

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Cursor]:
        """A read transaction on this thread's reader: WAL keeps its first read's state
        for every later query until it ends."""
        with self.read() as cur:
            cur.execute("BEGIN")
            try:
                yield cur
            finally:
                cur.execute("COMMIT")

    def insert_transfer_rows(self, cur: Any, rows: list[tuple[Any, ...]]) -> None:
        """One multi-row INSERT per chunk: one statement step instead of one per row
        (about 15% less time for a batch's rows than ``executemany``)."""
        step = self._insert_rows_max
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            cur.execute(_INSERT_HEAD + ",".join([_ROW_MARKS] * len(chunk)),
                        [value for row in chunk for value in row])  # fmt: skip

    def loader(self, cur: sqlite3.Cursor) -> _SqliteLoader:
        return _SqliteLoader(cur, self.window_usage_sql())

    def write(self, cur: sqlite3.Cursor, writes: Writes) -> None:
        try:
            self.insert_rows(cur, writes)
            self.update_rows(cur, writes)
        except sqlite3.IntegrityError as exc:
            raise errors.InvariantViolation(f"the database refused the batch: {exc}") from exc

    def migrate(self, component: str, migrations: Sequence[Migration]) -> None:
        if self.read_only:  # checked, never changed
            self.check_schema(component, migrations)
            return
        with self._locked():
            try:
                self._migrate(component, migrations)
            except sqlite3.Error as exc:  # not a database, locked past the timeout, ...
                raise errors.StoreError(
                    f"cannot prepare SQLite database {self.path!r}: {exc}"
                ) from exc

    def _migrate(self, component: str, migrations: Sequence[Migration]) -> None:
        cur = self._writer.cursor()
        cur.execute(
            "CREATE TABLE IF NOT EXISTS drip_migrations (component TEXT NOT NULL, "
            "version INTEGER NOT NULL, applied_us INTEGER NOT NULL, "
            "PRIMARY KEY (component, version))"
        )
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.execute(
                "SELECT coalesce(max(version), 0) FROM drip_migrations WHERE component = ?",
                (component,),
            )
            current = cur.fetchone()[0]
            for m in sorted(migrations, key=lambda m: m.version):
                if m.version <= current:
                    continue
                for statement in m.sqlite.split(";"):
                    if statement.strip():
                        cur.execute(statement)
                cur.execute(
                    "INSERT INTO drip_migrations VALUES (?, ?, ?)",
                    (component, m.version, wall_clock_us()),
                )
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise


@contextmanager
def _rollback_on_error(cur: sqlite3.Cursor) -> Iterator[None]:
    """Commit the open transaction after the block, or roll it back if the block fails."""
    try:
        yield
    except BaseException:
        cur.execute("ROLLBACK")
        raise
    try:
        cur.execute("COMMIT")
    except sqlite3.Error as exc:
        cur.execute("ROLLBACK")
        raise errors.StoreError(f"SQLite could not commit: {exc}") from exc


def _watch(ref: weakref.ref[SqliteStore], closing: threading.Event) -> None:
    """The watchdog: commits a window that outlives ``WINDOW_S`` (its loop may be busy
    running callers' code, or gone), so no window holds the lock for long. It holds the
    store weakly: a store nobody closed can still be collected."""
    while not closing.wait(WATCHDOG_POLL_S):
        store = ref()
        if store is None:
            return
        window = store._window
        if window is not None and time.monotonic() - window.opened > WINDOW_S:
            try:
                store.settle()
            except Exception:  # logged; the watchdog must keep watching
                log.exception("SQLite: the watchdog could not commit a window")
        del store


class _LockFile:
    """This process's one descriptor on a ``<database>-drip.lock``, shared by every store
    of the process on that database (POSIX locks belong to the process, and closing any
    descriptor of the file drops them all), with a count of those stores."""

    def __init__(self, fd: int, writable: bool) -> None:
        self.fd = fd
        self.writable = writable
        self.stores = 0
        #: POSIX locks are not inherited by a forked child: its stores take their own
        self.pid = os.getpid()


#: lock file path -> this process's descriptor on it
_LOCK_FILES: dict[str, _LockFile] = {}
_LOCK_FILES_LOCK = threading.Lock()


def _renew_lock_files_lock() -> None:
    """In a forked child: a parent's thread may have held the lock at the fork, and a
    store the child opens must not wait for it forever."""
    global _LOCK_FILES_LOCK
    _LOCK_FILES_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_renew_lock_files_lock)


class _Presence:
    """Whether another process, or another store of this one, has the database open.

    Each process with a store on the database holds a POSIX read lock on the first
    byte of ``<database>-drip.lock`` (opened read-only if it may not write it, which is
    enough for a read lock). POSIX locks belong to processes, so a process can take a
    write lock there (then return to a read lock) exactly when no other process holds
    one. A store alone in its process and its process alone on the file may keep
    SQLite's write lock across a turn of its event loop (a window) without making
    anyone wait. Unknown (no ``fcntl``, no lock file) counts as not alone."""

    def __init__(self, path: str) -> None:
        self._file: _LockFile | None = None
        self._memory = path in ("", ":memory:") or path.startswith("file:")
        self._alone = False
        self._checked = 0.0
        if self._memory:
            return
        try:
            import fcntl
        except ImportError:
            return
        name = os.path.realpath(path) + "-drip.lock"
        with _LOCK_FILES_LOCK:
            shared = _LOCK_FILES.get(name)
            if shared is None or shared.pid != os.getpid():
                shared = self._open(fcntl, name, path)
                if shared is None:
                    return
                _LOCK_FILES[name] = shared
            shared.stores += 1
        self._file = shared
        self._name = name

    @staticmethod
    def _open(fcntl: Any, name: str, path: str) -> _LockFile | None:
        try:
            mode = os.stat(path).st_mode & 0o666
        except OSError:
            mode = 0o644
        for flags, writable in ((os.O_RDWR | os.O_CREAT, True), (os.O_RDONLY, False)):
            try:
                fd = os.open(name, flags, mode)
            except OSError:
                continue
            try:
                fcntl.lockf(fd, fcntl.LOCK_SH, 1, 0)  # waits out another's brief check
            except OSError:
                os.close(fd)
                continue
            return _LockFile(fd, writable)
        return None

    def alone(self) -> bool:
        if self._memory:
            return False  # a memory or URI database: no lock file to tell
        shared = self._file
        if shared is None or not shared.writable or shared.stores != 1:
            return False
        now = time.monotonic()
        if now - self._checked < PRESENCE_CHECK_S:
            return self._alone
        import fcntl

        with _LOCK_FILES_LOCK:
            try:
                fcntl.lockf(shared.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
            except OSError:
                self._alone = False
            else:
                fcntl.lockf(shared.fd, fcntl.LOCK_SH, 1, 0)
                self._alone = True
        self._checked = now
        return self._alone

    def close(self) -> None:
        shared, self._file = self._file, None
        if shared is None:
            return
        with _LOCK_FILES_LOCK:
            shared.stores -= 1
            if shared.stores == 0:
                if _LOCK_FILES.get(self._name) is shared:
                    del _LOCK_FILES[self._name]
                if shared.pid == os.getpid():
                    os.close(shared.fd)  # releases the process's lock


class _Reader:
    """A thread's read connection: it closes when its thread ends and lets it go."""

    __slots__ = ("__weakref__", "conn")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


class _Window:
    """The loop connection's open transaction and what it has not sent yet.

    A batch that only takes holds is answered before it commits: the transaction stays
    open (this process keeps SQLite's write lock) so the next batch, typically those
    holds' captures, joins it, and a hold taken and captured in one window is written
    once, already resolved. Holding the lock, the window's memory of the rows is exact,
    and nobody else can commit anything that would contradict an answer it gave.

    An answered hold is not yet durable: if the process dies first, the hold is gone,
    which is exactly a void (its capture, in the same process, never comes). Every read
    and every other writer of this process commits the window first (``settle``), so
    nobody sees less than was answered. A batch that must be durable (a capture) joins
    it and commits it; at most ``WINDOW_BATCHES`` batches join one window, and a
    watchdog thread commits one older than ``WINDOW_S``. Only a store alone on its file
    keeps windows (``_Presence``), so no other writer waits behind one.
    """

    __slots__ = ("answered", "changed_accounts", "changed_holds", "ids", "new_holds",
                 "new_transfers", "opened", "version")  # fmt: skip

    def __init__(self, version: int) -> None:
        self.version = version
        self.opened = time.monotonic()
        #: batches answered before the commit
        self.answered = 0
        self.ids: set[str] = set()
        self.new_transfers: list[Transfer] = []
        self.new_holds: dict[str, Hold] = {}
        self.changed_holds: dict[str, Hold] = {}
        self.changed_accounts: dict[str, Account] = {}

    def roomy(self) -> bool:
        return (
            self.answered < WINDOW_BATCHES
            and len(self.new_transfers) < WINDOW_ROWS
            and time.monotonic() - self.opened < WINDOW_S
        )

    def add(self, writes: Writes, *, copies: bool = False) -> None:
        """Fold a batch's writes in: rows to insert, and the latest state of each row."""
        if writes.new_accounts:  # pragma: no cover - memory never creates accounts
            raise errors.InvariantViolation("a remembered batch created an account")
        for transfer in writes.new_transfers:
            self.new_transfers.append(transfer.copy() if copies else transfer)
            self.ids.add(transfer.id)
        for hold in writes.new_holds:
            self.new_holds[hold.id] = hold
        for hold_id, hold in writes.changed_holds.items():
            if hold_id in self.new_holds:
                self.new_holds[hold_id] = hold  # not inserted yet: its row carries the state
            else:
                self.changed_holds[hold_id] = hold
        self.changed_accounts.update(writes.changed_accounts)

    def take(self) -> Writes:
        """What to send now; the window then has nothing pending."""
        writes = Writes(
            new_transfers=self.new_transfers,
            new_holds=list(self.new_holds.values()),
            changed_accounts=self.changed_accounts,
            changed_holds=self.changed_holds,
        )
        self.new_transfers, self.new_holds = [], {}
        self.changed_holds, self.changed_accounts = {}, {}
        return writes


class _LoopBatcher(LoopBound):
    """Coalesces the operations one event loop submits during one turn into one batch."""

    def __init__(self, store: SqliteStore, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.bind(loop)
        self.pending: list[tuple[Op, asyncio.Future[list[Result]]]] = []
        self.scheduled = False
        #: batches run in a context of their own, not the first submitter's (whose
        #: variables, such as a request id in the logs, are not the batch's)
        self.context = contextvars.Context()

    def submit(self, op: Op) -> asyncio.Future[list[Result]]:
        future: asyncio.Future[list[Result]] = self.loop.create_future()
        self.pending.append((op, future))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._first_turn, context=self.context)
        return future

    def _first_turn(self) -> None:
        """Flush a batch of a fair size now; give a small one one more turn of the loop
        to grow (requests of other connections that are being parsed right now join it),
        since each transaction has a fixed cost."""
        if len(self.pending) >= FLUSH_NOW_OPS:
            self.flush()
        else:
            self.loop.call_soon(self.flush, context=self.context)

    def flush(self) -> None:
        batch = self.pending[:BATCH_OPS_MAX]
        del self.pending[:BATCH_OPS_MAX]
        if self.pending:
            self.loop.call_soon(self.flush, context=self.context)
        else:
            self.scheduled = False
        batch = drop_orphans(batch)
        if not batch:
            return
        try:
            # None: the lock is busy, the writer thread will wait for it
            results = self.store.try_run_batch_now([op for op, _ in batch], may_defer=True)
        except Exception as exc:  # noqa: BLE001 - every waiter must hear about it
            if _refused_value(self.store, exc):
                # a value the driver or the database refused (nothing of this batch
                # committed): the writer threads run it again, and then each operation
                # alone, so the bad one fails alone and its batch-mates go through
                answer(batch, None, lambda: self.store.committer, self.store.submit_async)
            else:
                fail(batch, exc)
            return
        answer(batch, results, lambda: self.store.committer, self.store.submit_async)


def _refused_value(store: SqliteStore, exc: Exception) -> bool:
    """Whether a loop batch failed on what one of its operations carried (a value SQLite
    or its driver refuses: ``may_isolate`` of the SQLite error it wraps), not on the
    database (busy, full, failing), which would fail every operation again, each after
    its own wait."""
    if not isinstance(exc, errors.DripError):
        return True  # not the store's own failure: let each operation find out alone
    cause = exc.__cause__
    return isinstance(cause, sqlite3.Error) and store.may_isolate(cause)
