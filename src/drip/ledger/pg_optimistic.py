"""PostgreSQL's fast path: one statement per batch, checked by compare-and-set.

The writer remembers the accounts and open holds its last batches saw. A batch is
first applied to those remembered rows, without reading the database, and sent as ONE
statement in autocommit mode (one round trip, one transaction): data-modifying CTEs
update the holds, then the accounts (rows sorted by id, the locked path's lock order),
and insert the transfers, all rows of each kind at once (JSON, ``json_to_recordset``).
Every update is a compare-and-set: if a row is not what was remembered (another process
changed it), the update writes ``-1`` into a column whose ``CHECK`` forbids it, the
statement aborts, and the batch is run again on the locked path, which reads (and
locks) current rows. A transfer id that already exists aborts the same way, on its
unique index.

Anything the memory cannot decide (an unknown account or hold, a refusal such as
insufficient funds, an expiry) goes to the locked path at once: a refusal is only ever
given on rows read under lock.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg

from drip import errors
from drip.ledger.engine import Engine, Op, Result, Writes, private_holds_only
from drip.ledger.rowcache import RowCache, apply_remembered
from drip.ledger.store import TRANSFER_INSERT_COLUMNS, Store
from drip.ledger.types import Account

#: Batches that go straight to the locked path after a compare-and-set failed.
BACKOFF_BATCHES = 8


def try_batch(
    store: Store, conn: psycopg.Connection[Any], cache: RowCache, ops: list[Op]
) -> list[list[Result]] | None:
    """Apply ``ops`` in one round trip, or return ``None`` for the locked path."""
    prepared = prepare(store, cache, ops)
    if prepared is None:
        return None  # the locked path reads (and locks) the rows
    engine, results, writes, before = prepared
    if writes.empty():  # pragma: no cover - checked_writes leaves no such batch
        return results
    try:
        _send(conn, writes, before, private_holds_only(ops))
    except Exception as exc:
        if may_have_committed(exc):
            # the statement may have committed though its answer was lost (a connection
            # broken after sending it): the run that follows answers those rows as the
            # operations' own, not as replays
            store.attempts.note(ops, writes)
        # whatever failed, leave no aborted transaction behind for the locked path
        _reset(conn)
        lost_race(cache)
        if isinstance(exc, psycopg.Error):  # aborts, lost races, a broken connection
            return None  # the locked path reads current rows (and reconnects if needed)
        raise
    cache.remember(engine, before)
    return results


def prepare(
    store: Store, cache: RowCache, ops: list[Op]
) -> tuple[Engine, list[list[Result]], Writes, dict[str, Account]] | None:
    """``ops`` applied to the remembered rows, with writes that compare-and-set checks
    entirely, and the accounts as they were read (the compare-and-set's expected values);
    ``None`` sends the batch to the locked path (so does a recent lost race)."""
    if cache.backoff:
        cache.backoff -= 1
        return None
    applied = apply_remembered(cache, store.clock_us(), ops)
    if applied is None:
        return None
    writes = checked_writes(applied.engine)
    if writes is None:
        return None
    return applied.engine, applied.results, writes, applied.before


def lost_race(cache: RowCache) -> None:
    """The fast path failed: forget the rows, and let the next batches read them."""
    cache.clear()
    cache.backoff = BACKOFF_BATCHES


def checked_writes(engine: Engine) -> Writes | None:
    """The batch's writes, if every remembered row it relied on is among them, so a
    compare-and-set checks it; else ``None``. (An operation that reads a row and writes
    nothing, such as setting a status it believes is already set, would otherwise be
    answered from memory that another process may have made stale.)"""
    writes = engine.finish()
    if writes.new_accounts:
        return None  # not met here (an unknown account misses); the locked path inserts
    for account_id, account in engine.accounts.items():
        if account is not None and account_id not in writes.changed_accounts:
            return None
    created = {h.id for h in writes.new_holds}
    for hold_id, hold in engine.holds.items():
        if hold is not None and hold_id not in writes.changed_holds and hold_id not in created:
            return None
    return writes


def _send(
    conn: psycopg.Connection[Any], writes: Writes, before: dict[str, Account],
    asynchronous: bool,
) -> None:  # fmt: skip
    query, params = one_statement(writes, before, asynchronous=asynchronous)
    conn.autocommit = True
    try:
        rows = conn.execute(query, params).fetchall()
    finally:
        conn.autocommit = False
    take_seqs(writes, rows, asynchronous=asynchronous)


def take_seqs(writes: Writes, rows: list[Any], *, asynchronous: bool = False) -> None:
    """Check what the batch statement reports it wrote; give each new transfer its seq."""
    seqs = {row[1]: int(row[2]) for row in rows if row[0] == "i"}
    if asynchronous != any(row[0] == "s" for row in rows):
        raise errors.InvariantViolation("the batch statement chose the wrong commit mode")
    counts = (sum(row[0] == "h" for row in rows), sum(row[0] == "a" for row in rows))
    if len(seqs) != len(writes.new_transfers) or counts != (
        len(writes.changed_holds),
        len(writes.changed_accounts),
    ):  # committed, yet a row was missing: never expected; fail loudly, never replay
        raise errors.InvariantViolation("the batch statement missed rows it was given")
    for transfer in writes.new_transfers:
        transfer.seq = seqs[transfer.id]


_HOLDS_CTE = (
    "h AS (UPDATE transfers t SET "
    "hold_state = CASE WHEN t.hold_state = 0 THEN v.state ELSE -1 END, "
    "hold_resolved_amount = v.amount, hold_resolved_by = v.by "
    "FROM json_to_recordset(%s::json) AS v(id text, state smallint, amount bigint, by text) "
    "WHERE t.id = ANY(%s::text[]) AND t.id = v.id RETURNING t.id)"
)
_ACCOUNTS_CTE = (
    "a AS (UPDATE accounts t SET status = v.status, "
    "debits_posted = CASE WHEN t.debits_posted = v.odp AND t.credits_posted = v.ocp "
    "AND t.debits_pending = v.odpe AND t.credits_pending = v.ocpe AND t.status = v.ostatus "
    "THEN v.dp ELSE -1 END, "
    "credits_posted = v.cp, debits_pending = v.dpe, credits_pending = v.cpe "
    "FROM json_to_recordset(%s::json) AS v(id text, status text, odp bigint, ocp bigint, "
    "odpe bigint, ocpe bigint, ostatus text, dp bigint, cp bigint, dpe bigint, cpe bigint) "
    "WHERE t.id = ANY(%s::text[]) AND t.id = v.id RETURNING t.id)"
)
_INSERT_CTE = (
    "i AS (INSERT INTO transfers ({columns}) SELECT {columns} FROM json_to_recordset(%s::json) "
    "AS v(id text, debit_account_id text, credit_account_id text, amount bigint, code text, "
    "flags integer, pending_id text, timeout_s integer, metadata text, ts_us bigint, "
    "hold_expires_us bigint, hold_state smallint, hold_resolved_amount bigint, "
    "hold_resolved_by text) RETURNING id, seq)"
)
_INSERT_KEYS = tuple(c.strip() for c in TRANSFER_INSERT_COLUMNS.split(","))
_ACCOUNT_KEYS = ("id", "status", "odp", "ocp", "odpe", "ocpe", "ostatus", "dp", "cp", "dpe",
                 "cpe")  # fmt: skip


#: Commits a batch without waiting for its WAL to reach the disk (``asynchronous``).
_ASYNC_COMMIT_CTE = "s AS (SELECT set_config('synchronous_commit', 'off', true) AS v)"


def one_statement(
    writes: Writes, before: dict[str, Account], *, asynchronous: bool = False
) -> tuple[str, list[Any]]:
    """The batch as one statement: ``WITH h, a, i ... SELECT`` what was written. Rows
    travel as JSON (one parameter per kind; PostgreSQL parses it in C).

    ``asynchronous`` (a batch of private holds only, ``engine.private_holds_only``):
    the statement's own transaction commits with ``synchronous_commit = off``. A
    database crash may then forget it, which is exactly a void (the capture, from the
    same process, fails, and nothing is charged), and any later commit that waits for
    the disk (the capture that resolves the hold) flushes it first, since the WAL is
    written in order. Money only moves in commits that wait for the disk."""
    ctes: list[str] = []
    selects: list[str] = []
    params: list[Any] = []
    if asynchronous:
        # set for this statement's own transaction (autocommit), read when it commits
        ctes.append(_ASYNC_COMMIT_CTE)
        selects.append("SELECT 's', v, NULL::bigint FROM s")
    # each UPDATE finds its rows with ``id = ANY(ids)`` (an index scan of exactly those
    # rows, whatever the planner guesses of the JSON's size), then joins their new values
    if writes.changed_holds:
        holds = sorted(writes.changed_holds.items())
        params.append(json.dumps([
            {"id": h.id, "state": int(h.state), "amount": h.resolved_amount,
             "by": h.resolved_by}
            for _, h in holds
        ]))  # fmt: skip
        params.append([hold_id for hold_id, _ in holds])
        ctes.append(_HOLDS_CTE)
        selects.append("SELECT 'h', id, NULL::bigint FROM h")
    if writes.changed_accounts:
        rows = []
        for account_id, a in sorted(writes.changed_accounts.items()):
            old = before[account_id]  # as the batch read it, not as the cache is now
            rows.append(dict(zip(_ACCOUNT_KEYS, (
                account_id, a.status, old.debits_posted, old.credits_posted,
                old.debits_pending, old.credits_pending, old.status, a.debits_posted,
                a.credits_posted, a.debits_pending, a.credits_pending,
            ), strict=True)))  # fmt: skip
        params.append(json.dumps(rows))
        params.append([row["id"] for row in rows])
        ctes.append(_ACCOUNTS_CTE)
        selects.append("SELECT 'a', id, NULL::bigint FROM a")
    if writes.new_transfers:
        params.append(json.dumps([dict(zip(_INSERT_KEYS, row, strict=True))
                                  for row in Store.transfer_rows(writes)]))  # fmt: skip
        ctes.append(_INSERT_CTE.format(columns=TRANSFER_INSERT_COLUMNS))
        selects.append("SELECT 'i', id, seq FROM i")
    return "WITH " + ", ".join(ctes) + " " + " UNION ALL ".join(selects), params


def _reset(conn: psycopg.Connection[Any]) -> None:
    try:
        if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()
    except psycopg.Error:
        conn.close()  # the locked path opens a fresh connection


def may_have_committed(exc: BaseException) -> bool:
    """Whether a statement that failed with ``exc`` may have committed all the same: the
    connection lost (its answer never came), or anything not from the server. An error
    the server answered (a unique or check violation, a lost compare-and-set) proves the
    single autocommit statement did not: its rows, found later, are another call's."""
    return isinstance(exc, psycopg.OperationalError) or not isinstance(exc, psycopg.DatabaseError)
