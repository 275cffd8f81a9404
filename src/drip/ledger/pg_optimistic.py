"""PostgreSQL's fast path: one round trip per batch, checked by compare-and-set.

The writer remembers the accounts and open holds its last batches saw. A batch is
first applied to those remembered rows, without reading the database, and sent as one
pipeline: hold updates, account updates, inserts, ``COMMIT``. Every update is a
compare-and-set: if a row is not what was remembered (another process changed it), the
update writes ``-1`` into a column whose ``CHECK`` forbids it, the transaction aborts,
and the batch is run again on the locked path, which reads (and locks) current rows.
A transfer id that already exists aborts the same way, on its unique index.

Anything the memory cannot decide (an unknown account or hold, a refusal such as
insufficient funds, an expiry) goes to the locked path at once: a refusal is only ever
given on rows read under lock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

from drip.ledger.engine import Op, Result, Writes
from drip.ledger.rowcache import RowCache, apply_remembered
from drip.ledger.store import Store

#: Batches that go straight to the locked path after a compare-and-set failed.
BACKOFF_BATCHES = 8

_CAS_ACCOUNT = (
    "UPDATE accounts SET status = %s, "
    "debits_posted = CASE WHEN debits_posted = %s AND credits_posted = %s "
    "AND debits_pending = %s AND credits_pending = %s AND status = %s THEN %s ELSE -1 END, "
    "credits_posted = %s, debits_pending = %s, credits_pending = %s WHERE id = %s"
)
_CAS_HOLD = (
    "UPDATE transfers SET hold_state = CASE WHEN hold_state = 0 THEN %s ELSE -1 END, "
    "hold_resolved_amount = %s, hold_resolved_by = %s WHERE id = %s"
)


def try_batch(
    store: Store, conn: psycopg.Connection[Any], cache: RowCache, ops: list[Op]
) -> list[list[Result]] | None:
    """Apply ``ops`` in one round trip, or return ``None`` for the locked path."""
    if cache.backoff:
        cache.backoff -= 1
        return None
    applied = apply_remembered(cache, store.clock_us(), ops)
    if applied is None:
        return None  # the locked path reads (and locks) the rows
    engine, results = applied
    writes = engine.finish()
    try:
        _send(store, conn, writes, cache)
    except Exception as exc:
        # whatever failed, leave no aborted transaction behind for the locked path
        _reset(conn)
        cache.clear()
        cache.backoff = BACKOFF_BATCHES
        if isinstance(exc, psycopg.Error):  # aborts, lost races, a broken connection
            return None  # the locked path reads current rows (and reconnects if needed)
        raise
    cache.remember(engine)
    return results


def _send(store: Store, conn: psycopg.Connection[Any], writes: Writes, cache: RowCache) -> None:
    with conn.cursor() as cur:
        with conn.pipeline():
            read_back = _pipelined(store, conn, cur, writes, cache)
        read_back()


def _pipelined(
    store: Store, conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any], writes: Writes,
    cache: RowCache,
) -> Callable[[], None]:  # fmt: skip
    """Queue the batch's compare-and-set updates, inserts and COMMIT on the pipeline."""
    # lock order as on the locked path: holds, then accounts (each sorted by id)
    if writes.changed_holds:
        cur.executemany(
            _CAS_HOLD,
            [Store.hold_state_row(h) for _, h in sorted(writes.changed_holds.items())],
        )
    if writes.changed_accounts:
        rows = []
        for account_id, a in sorted(writes.changed_accounts.items()):
            old = cache.accounts[account_id]
            rows.append((
                a.status, old.debits_posted, old.credits_posted, old.debits_pending,
                old.credits_pending, old.status, a.debits_posted, a.credits_posted,
                a.debits_pending, a.credits_pending, account_id,
            ))  # fmt: skip
        cur.executemany(_CAS_ACCOUNT, rows)
    read_back = store.insert_rows(cur, writes)
    conn.commit()
    return read_back


def _reset(conn: psycopg.Connection[Any]) -> None:
    try:
        if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()
    except psycopg.Error:
        conn.close()  # the locked path opens a fresh connection
