"""PostgreSQL's fast path for asyncio callers, on the event loop itself.

The operations one turn of the loop submits form a batch; it is applied to the rows the
store remembers (``RowCache``, shared with the writer thread) and sent as the fast
path's one statement over an ``AsyncConnection`` that belongs to this loop, so no
thread is woken and none wakes the loop back. One batch is in flight per loop;
operations that arrive meanwhile form the next. Whatever the fast path cannot take (a
row it does not remember, a refusal, a lost compare-and-set, a broken connection) goes
to the writer thread's locked path, which reads and locks current rows, exactly as
blocking callers' batches do.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import weakref
from typing import TYPE_CHECKING, Any

import psycopg

from drip import errors
from drip.ledger.batching import LoopBound, answer, drop_orphans, fail, hand_off_cancelled
from drip.ledger.engine import Op, Result, private_holds_only
from drip.ledger.pg_optimistic import (
    lost_race,
    may_have_committed,
    one_statement,
    prepare,
    take_seqs,
)
from drip.ledger.types import BATCH_OPS_MAX

if TYPE_CHECKING:
    from drip.ledger.postgres import PostgresStore

log = logging.getLogger("drip.ledger")


class LoopBatcher(LoopBound):
    """One event loop's batches: applied on the loop, sent on its own connection."""

    def __init__(self, store: PostgresStore, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.bind(loop)
        weakref.finalize(loop, self.close)  # its connection closes when the loop is gone
        self.pending: list[tuple[Op, asyncio.Future[list[Result]]]] = []
        self.running = False
        self.conn: psycopg.AsyncConnection[Any] | None = None
        #: batches run in a context of their own, not the first submitter's
        self.context = contextvars.Context()

    def submit(self, op: Op) -> asyncio.Future[list[Result]]:
        future: asyncio.Future[list[Result]] = self.loop.create_future()
        self.pending.append((op, future))
        if not self.running:
            self.running = True
            self.loop.call_soon(self._start, context=self.context)
        return future

    def _start(self) -> None:
        # runs in the batcher's context already (call_soon above): the task copies it
        # (passing the same context would enter it twice under an eager task factory)
        self.loop.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch = self.pending[:BATCH_OPS_MAX]
                del self.pending[:BATCH_OPS_MAX]
                await self._run(batch)
        finally:
            self.running = False
            if self.pending:  # a failure above left work behind: start over
                self.running = True
                self.loop.call_soon(self._start, context=self.context)

    async def _run(self, batch: list[tuple[Op, asyncio.Future[list[Result]]]]) -> None:
        batch = drop_orphans(batch)
        if not batch:
            return
        try:
            # None: the locked path, on the writer thread
            results = await self._fast([op for op, _ in batch])
        except asyncio.CancelledError:
            # this task was cancelled (the loop is shutting down) with the statement in
            # flight, maybe committed: the writer thread settles it (see the function)
            lost_race(self.store.shared_cache)
            self.close()
            hand_off_cancelled(batch, lambda: self.store.committer)
            raise
        except errors.DripError as exc:
            # decided (a closed store; a committed batch that misreported its rows):
            # every waiter hears it
            fail(batch, exc)
            return
        except Exception:  # unexpected, and maybe one operation's value
            # the writer thread runs the batch on the locked path, and each operation
            # alone if it fails again, so one bad operation fails only its own caller;
            # what did commit is found again by id (its own rows: ``Store.attempts``)
            log.exception("ledger: a batch failed on the event loop; the writer runs it")
            lost_race(self.store.shared_cache)
            results = None
        answer(batch, results, lambda: self.store.committer, self.store.submit_async)

    async def _fast(self, ops: list[Op]) -> list[list[Result]] | None:
        self.store.check_usable()  # open, and not inherited from a parent process
        cache = self.store.shared_cache
        prepared = prepare(self.store, cache, ops)
        if prepared is None:
            return None
        engine, results, writes, before = prepared
        if writes.empty():  # pragma: no cover - checked_writes leaves no such batch
            return results
        asynchronous = private_holds_only(ops)
        query, params = one_statement(writes, before, asynchronous=asynchronous)
        try:
            conn = await self._connection()
            cursor = await conn.execute(query, params)
            rows = await cursor.fetchall()
        except psycopg.Error as exc:
            # a lost compare-and-set or a replayed id: nothing was committed (one
            # statement, autocommit); a broken connection: maybe it was, unseen, so the
            # run that follows answers those rows as the operations' own (``attempts``).
            # The locked path decides.
            if may_have_committed(exc):
                self.store.attempts.note(ops, writes)
            lost_race(cache)
            await self._reset()
            return None
        except BaseException:  # cancelled with the statement in flight (see _run), ...
            self.store.attempts.note(ops, writes)
            raise
        try:
            take_seqs(writes, rows, asynchronous=asynchronous)
            cache.remember(engine, before)
        except BaseException:  # committed: whoever runs the batch again finds its rows
            self.store.attempts.note(ops, writes)
            raise
        return results

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self.conn is None or self.conn.closed:
            conn = await psycopg.AsyncConnection.connect(
                self.store.url, autocommit=True, **self.store.timeouts
            )
            await conn.execute("SET enable_seqscan = off")  # see PostgresStore._writer
            self.conn = conn
        return self.conn

    async def _reset(self) -> None:
        conn = self.conn
        if conn is not None and (conn.closed or conn.broken):
            self.conn = None

    def close(self) -> None:
        """Close the connection from any thread (the loop may be gone); in a forked child,
        only forget it (the parent's session: finishing it would end it for the parent)."""
        conn, self.conn = self.conn, None
        if conn is not None and not conn.closed and not self.store.inherited:
            conn.pgconn.finish()


__all__ = ["LoopBatcher"]
