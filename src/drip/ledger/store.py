"""What both stores share: the batch transaction around the engine, reads, invariants,
versioned migrations. A store subclass supplies the connection handling and the few
statements whose SQL differs between SQLite and PostgreSQL."""

from __future__ import annotations

import abc
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from drip import errors
from drip.ledger.batching import GroupCommitter
from drip.ledger.engine import Attempts, Engine, ExpireHolds, Loader, Op, Result, Writes
from drip.ledger.types import (
    BATCH_OPS_MAX,
    LATE_CHARGE_MARK,
    Account,
    AccountFlags,
    AccountKind,
    Balance,
    Hold,
    HoldState,
    InvariantReport,
    Transfer,
    TransferFlags,
    UsageRow,
)

ACCOUNT_COLUMNS = (
    "id, kind, asset, flags, owner, status, metadata, debits_posted, credits_posted, "
    "debits_pending, credits_pending, created_us"
)
TRANSFER_COLUMNS = (
    "id, debit_account_id, credit_account_id, amount, code, flags, pending_id, timeout_s, "
    "metadata, ts_us, seq"
)
TRANSFER_INSERT_COLUMNS = (
    TRANSFER_COLUMNS.removesuffix(", seq")
    + ", hold_expires_us, hold_state, hold_resolved_amount, hold_resolved_by"
)
#: A hold is read from its pending transfer's row.
HOLD_COLUMNS = (
    "id, debit_account_id, credit_account_id, amount, hold_expires_us, hold_state, "
    "hold_resolved_amount, hold_resolved_by"
)
#: Transfers that move posted money (plain transfers and posts; not holds, voids, expiries).
NOT_POSTED_FLAGS = int(
    TransferFlags.PENDING | TransferFlags.VOID_PENDING | TransferFlags.EXPIRE_PENDING
)
#: Transfers that resolve a hold (their amounts are on the hold's row already).
RESOLVING_FLAGS = int(
    TransferFlags.POST_PENDING | TransferFlags.VOID_PENDING | TransferFlags.EXPIRE_PENDING
)
#: Most due holds one housekeeping pass expires.
EXPIRE_SWEEP_MAX = 512


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step of a component; ``sqlite``/``postgres`` are SQL scripts."""

    version: int
    sqlite: str
    postgres: str


class LoaderBase:
    """What both stores' loaders share: the rolling-window reads, on the batch's cursor."""

    __slots__ = ("cur", "release_sql", "window_sql")

    def __init__(self, cur: Any, window_sql: tuple[str, str]) -> None:
        self.cur = cur
        self.window_sql, self.release_sql = window_sql

    def window_usage(self, account_id: str, since_us: int) -> tuple[int, int, int | None]:
        self.cur.execute(self.window_sql, (account_id, since_us))
        row = self.cur.fetchone()
        assert row is not None  # an aggregate always returns one row
        calls, amount, oldest = row
        return int(amount), int(calls), None if oldest is None else int(oldest)

    def window_release_us(
        self, account_id: str, since_us: int, *, calls: int, amount: int
    ) -> int | None:
        """The time of the oldest row in the window by whose leaving at least ``calls``
        rows and ``amount`` units have left it (rows leave in time order); ``None`` if
        the rows in the window are not that many or that much."""
        self.cur.execute(self.release_sql, (account_id, since_us, calls, amount))
        row = self.cur.fetchone()
        return None if row is None else int(row[0])


def wall_clock_us() -> int:
    return time.time_ns() // 1000


class Store(abc.ABC):
    """A ledger store: one database, group-committed batches, shared reads."""

    dialect: str = ""
    #: writer threads (batches in flight at once)
    workers: int = 1
    #: a read is a network round trip (it may also wait on locks): async code makes it
    #: in a worker thread (``Ledger.off_loop``), not on its event loop
    remote_reads: bool = True

    def __init__(self, *, clock_us: Callable[[], int] = wall_clock_us) -> None:
        self.clock_us = clock_us
        self._committer: GroupCommitter | None = None
        #: operations whose attempt may have committed unseen (a connection lost under its
        #: commit); their next run answers their own rows as new (``engine.Attempts``)
        self.attempts = Attempts()
        #: opened to read only (``start(read_only=True)``): no migration, no writer
        #: threads, no housekeeping (expiring holds writes); every write is refused
        self.read_only = False

    # --- lifecycle --------------------------------------------------------------------

    def start(self, *, read_only: bool = False) -> None:
        """Migrate the schema and start the writer threads; with ``read_only``, only
        check that the schema is current (``StoreError`` if not) and start nothing."""
        from drip.ledger.schema import LEDGER_MIGRATIONS

        if read_only:
            self.read_only = True
            self.check_schema("ledger", LEDGER_MIGRATIONS)
            return
        self.migrate("ledger", LEDGER_MIGRATIONS)
        self._committer = GroupCommitter(
            self.run_batch,
            workers=self.workers,
            batch_max=BATCH_OPS_MAX,
            housekeeping=self.expire_due_holds,
            name=f"drip-{self.dialect}-writer",
            isolate=self.may_isolate,
        )

    def close(self) -> None:
        if self._committer is not None:
            self._committer.close()
            self._committer = None
        self._close_connections()

    @property
    def is_open(self) -> bool:
        return self._committer is not None

    @property
    def committer(self) -> GroupCommitter:
        self.check_writable()
        if self._committer is None:
            raise errors.StoreError("the ledger store is not open")
        return self._committer

    # --- what a dialect supplies ------------------------------------------------------

    @abc.abstractmethod
    def _close_connections(self) -> None: ...

    @abc.abstractmethod
    def transaction(self) -> AbstractContextManager[Any]:
        """A write transaction; yields a cursor-like object with execute/executemany."""

    @abc.abstractmethod
    def read(self) -> AbstractContextManager[Any]:
        """A read-only cursor (outside any write transaction)."""

    @abc.abstractmethod
    def snapshot(self) -> AbstractContextManager[Any]:
        """A read-only cursor whose queries all see one state of the database (checks
        that compare several queries must not see a batch land between two of them)."""

    @abc.abstractmethod
    def loader(self, cur: Any) -> Loader: ...

    @abc.abstractmethod
    def write(self, cur: Any, writes: Writes) -> None: ...

    @abc.abstractmethod
    def migrate(self, component: str, migrations: Sequence[Migration]) -> None: ...

    def check_writable(self) -> None:
        """Raise ``StoreError`` if this store was opened read-only."""
        if self.read_only:
            raise errors.StoreError("the ledger was opened read-only: it cannot write")

    def schema_version(self, component: str) -> int:
        """The latest migration of ``component`` the database has (0: none, or no Drip
        schema at all). Reads only: creates nothing."""
        if self.dialect == "sqlite":
            exists = "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?"
        else:
            exists = "SELECT count(*) WHERE to_regclass(?::text) IS NOT NULL"
        if not self.query(exists, ("drip_migrations",))[0][0]:
            return 0
        rows = self.query(
            "SELECT coalesce(max(version), 0) FROM drip_migrations WHERE component = ?",
            (component,),
        )
        return int(rows[0][0])

    def check_schema(self, component: str, migrations: Sequence[Migration]) -> None:
        """What a read-only open does instead of migrating: refuse (``StoreError``) a
        database whose schema of ``component`` is older than this Drip's."""
        needed = max((m.version for m in migrations), default=0)
        current = self.schema_version(component)
        if current < needed:
            name = "" if component == "ledger" else f" ({component})"
            raise errors.StoreError(
                f"database schema{name} at version {current}, Drip needs {needed}: run a "
                "write command or `drip serve` to migrate",
                param="database_url",
            )

    def sql(self, query: str) -> str:
        """Our SQL uses ``?`` placeholders; PostgreSQL's driver wants ``%s``."""
        return query

    # --- the batch --------------------------------------------------------------------

    def run_batch(self, ops: list[Op]) -> list[list[Result]]:
        """Apply ``ops`` in one transaction; called by the writer threads."""
        with self.transaction() as cur:
            return self.apply_batch(cur, ops)

    def apply_batch(self, cur: Any, ops: list[Op]) -> list[list[Result]]:
        """The engine's pass over ``ops`` inside the open transaction ``cur``."""
        return self.apply_with(cur, Engine(self.loader(cur), self.clock_us()), ops)

    def apply_with(self, cur: Any, engine: Engine, ops: list[Op]) -> list[list[Result]]:
        """``apply_batch`` with the caller's engine (to keep it after the commit)."""
        engine.prefetch(ops)
        attempts = self.attempts
        if attempts:  # some operation's earlier attempt may have committed unseen
            results = []
            for op in ops:
                engine.ours = attempts.of(op)
                results.append(engine.apply(op))
            engine.ours = frozenset()
        else:
            results = [engine.apply(op) for op in ops]
        writes = engine.finish()
        if not writes.empty():
            self.write(cur, writes)
        self.applied(engine)
        return results

    def may_isolate(self, exc: Exception) -> bool:
        """Whether a batch that failed with ``exc`` is run again one operation at a time,
        so that one bad operation (a value the database refuses) fails alone, never its
        batch-mates. Not for Drip's own errors (decided on purpose, per batch), nor for
        the database being unreachable, locked or failing (every operation would fail
        alike, each after its own wait)."""
        return not isinstance(exc, errors.DripError | OSError)

    def applied(self, engine: Engine) -> None:  # noqa: B027 - a hook; most stores need nothing
        """Called after a batch's writes were sent (PostgreSQL: committed)."""

    def window_usage_sql(self) -> tuple[str, str]:
        """The rolling-window sum of an account's debits, and the query that finds when
        enough of them will have left the window (asked only when a call is refused)."""
        amount = "CASE WHEN hold_state = 1 THEN hold_resolved_amount ELSE amount END"
        # a hold counts until voided: open, captured (what it took) or expired (its call
        # was admitted, and may yet be charged late; that late charge is not counted)
        position = "instr" if self.dialect == "sqlite" else "strpos"
        late = f"{position}(id, '{LATE_CHARGE_MARK}')"
        rows = (
            f"FROM transfers WHERE debit_account_id = ? AND ts_us > ? AND (flags & "
            f"{RESOLVING_FLAGS}) = 0 AND (hold_state IS NULL OR hold_state IN (0, 1, 3)) "
            f"AND (hold_state IS NOT NULL OR {late} = 0)"
        )
        usage = f"SELECT count(*), coalesce(sum({amount}), 0), min(ts_us) {rows}"
        release = (
            f"SELECT ts_us FROM (SELECT ts_us, row_number() OVER w AS n, sum({amount}) OVER "
            f"w AS total {rows} WINDOW w AS (ORDER BY ts_us, seq ROWS UNBOUNDED PRECEDING)) "
            "AS leaving WHERE n >= ? AND total >= ? ORDER BY ts_us LIMIT 1"
        )
        return self.sql(usage), self.sql(release)

    def submit_async(self, op: Op) -> Awaitable[list[Result]]:
        """Queue ``op`` for the next batch; await its results (from a running loop)."""
        return self.committer.submit_async(op)

    def expire_due_holds(self) -> int:
        """Release holds whose timeout passed (bounded per call); returns how many."""
        self.check_writable()
        with self.read() as cur:
            cur.execute(
                self.sql(
                    "SELECT id FROM transfers WHERE hold_state = 0 AND hold_expires_us IS NOT "
                    "NULL AND hold_expires_us <= ? ORDER BY hold_expires_us LIMIT ?"
                ),
                (self.clock_us(), EXPIRE_SWEEP_MAX),
            )
            due = tuple(row[0] for row in cur.fetchall())
        if not due:
            return 0
        [results] = self.run_batch([ExpireHolds(due)])
        return sum(r for r in results if isinstance(r, int))

    # --- reads ------------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.read() as cur:
            cur.execute(self.sql(sql), tuple(params))
            return list(cur.fetchall())

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One statement on a table of another component (API keys, idempotency records),
        committed on its own; returns the row count. Never for the ledger's tables."""
        self.check_writable()
        with self.read() as cur:
            cur.execute(self.sql(sql), tuple(params))
            return int(cur.rowcount)

    def remembered_balance(self, account_id: str) -> Balance | None:
        """The account's balance as this process's own latest batch that touched it left
        it, from memory: no I/O, so it never blocks an event loop. ``None`` when the
        store does not remember the account (then read it: ``get_account``)."""
        return None

    def get_account(self, account_id: str) -> Account | None:
        if not storable(account_id):  # no row can have it (PostgreSQL refuses to compare)
            return None
        rows = self.query(f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ?", (account_id,))
        return Account(*rows[0]) if rows else None

    def list_accounts(
        self, kind: str | None = None, after_id: str | None = None, limit: int = 100
    ) -> list[Account]:
        where, params = ["1 = 1"], []
        if kind is not None:
            if not storable(kind):
                return []  # no account has it
            where.append("kind = ?")
            params.append(kind)
        if after_id is not None:
            if not storable(after_id):
                raise errors.InvalidRequest(
                    "after_id must be text without NUL bytes or lone surrogates",
                    param="after_id",
                )
            where.append("id > ?")
            params.append(after_id)
        rows = self.query(
            f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE {' AND '.join(where)} "
            f"ORDER BY id LIMIT ?",
            (*params, limit),
        )
        return [Account(*r) for r in rows]

    def get_transfer(self, transfer_id: str) -> Transfer | None:
        if not storable(transfer_id):
            return None
        rows = self.query(f"SELECT {TRANSFER_COLUMNS} FROM transfers WHERE id = ?", (transfer_id,))
        return Transfer(*rows[0]) if rows else None

    def get_hold(self, hold_id: str) -> Hold | None:
        if not storable(hold_id):
            return None
        rows = self.query(
            f"SELECT {HOLD_COLUMNS} FROM transfers WHERE id = ? AND hold_state IS NOT NULL",
            (hold_id,),
        )
        return Hold(*rows[0]) if rows else None

    def list_transfers(
        self,
        *,
        account_id: str | None = None,
        code: str | None = None,
        since_us: int | None = None,
        until_us: int | None = None,
        before_seq: int | None = None,
        limit: int = 100,
    ) -> list[Transfer]:
        """Newest first; ``before_seq`` continues a previous page."""
        if not (storable(account_id) and storable(code)):
            return []  # no transfer names it
        where: list[str] = []
        params: list[Any] = []
        if account_id is not None:
            where.append("(debit_account_id = ? OR credit_account_id = ?)")
            params += [account_id, account_id]
        for clause, value in (("code = ?", code), ("ts_us >= ?", since_us),
                              ("ts_us < ?", until_us), ("seq < ?", before_seq)):  # fmt: skip
            if value is not None:
                where.append(clause)
                params.append(value)
        sql = f"SELECT {TRANSFER_COLUMNS} FROM transfers"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self.query(sql + " ORDER BY seq DESC LIMIT ?", (*params, limit))
        return [Transfer(*r) for r in rows]

    def usage(
        self,
        *,
        account_id: str | None = None,
        since_us: int | None = None,
        until_us: int | None = None,
        bucket_s: int = 3600,
        code: str | None = None,
    ) -> list[UsageRow]:
        """Posted charges out of wallets, per event code and time bucket: what wallets
        paid revenue accounts (an adjustment, a refund or an escrow deposit is not usage)."""
        if not (storable(account_id) and storable(code)):
            return []  # no transfer names it
        bucket_us = bucket_s * 1_000_000
        where = [
            f"(t.flags & {NOT_POSTED_FLAGS}) = 0",
            f"t.credit_account_id IN (SELECT id FROM accounts WHERE kind = "
            f"'{AccountKind.REVENUE.value}')",
        ]
        params: list[Any] = []
        if account_id is not None:
            where.append("t.debit_account_id = ?")
            params.append(account_id)
        else:
            where.append(
                f"t.debit_account_id IN (SELECT id FROM accounts WHERE kind = "
                f"'{AccountKind.WALLET.value}')"
            )
        for clause, value in (("t.ts_us >= ?", since_us), ("t.ts_us < ?", until_us),
                              ("t.code = ?", code)):  # fmt: skip
            if value is not None:
                where.append(clause)
                params.append(value)
        bucket = f"(t.ts_us / {bucket_us}) * {bucket_us}"
        try:
            rows = self.query(
                f"SELECT t.code, {bucket} AS bucket, count(*), sum(t.amount) FROM transfers t "
                f"WHERE {' AND '.join(where)} GROUP BY t.code, bucket ORDER BY bucket, t.code",
                params,
            )
        except Exception as exc:
            if self.dialect != "sqlite" or "overflow" not in str(exc):
                raise
            # SQLite's sum() of 64-bit integers overflows past 2**63: add them up here
            totals: dict[tuple[str, int], list[int]] = {}
            for code, start, amount in self.query(
                f"SELECT t.code, {bucket}, t.amount FROM transfers t WHERE {' AND '.join(where)}",
                params,
            ):
                total = totals.setdefault((code, int(start)), [0, 0])
                total[0] += 1
                total[1] += int(amount)
            rows = [(c, b, n, a) for (c, b), (n, a) in sorted(totals.items(), key=_by_bucket)]
        return [UsageRow(r[0], int(r[1]), int(r[2]), int(r[3])) for r in rows]

    # --- invariants -------------------------------------------------------------------

    def check_invariants(self) -> InvariantReport:
        """Check the ledger's invariants against the database; see DESIGN.md section 3."""
        with self.snapshot() as cur:

            def query(sql: str) -> list[tuple[Any, ...]]:
                cur.execute(self.sql(sql))
                return list(cur.fetchall())

            return self._invariants(query)

    def _invariants(self, query: Callable[[str], list[tuple[Any, ...]]]) -> InvariantReport:
        report = InvariantReport()
        accounts = query(
            "SELECT id, asset, debits_posted, credits_posted, debits_pending, credits_pending "
            "FROM accounts"
        )
        # summed here, exactly: SQLite's sum() of many large counters overflows 64 bits
        totals: dict[str, list[int]] = {}
        for _, asset, *counters in accounts:
            total = totals.setdefault(asset, [0, 0, 0, 0, 0])
            for i, value in enumerate(counters):
                total[i] += int(value)
            total[4] += 1
        if not totals:
            report.add("debits equal credits per asset", True, "no accounts yet")
        for asset, (dp, cp, dpe, cpe, n) in sorted(totals.items()):
            ok = dp == cp and dpe == cpe
            report.add(
                f"debits equal credits ({asset})",
                ok,
                f"{n} accounts; posted {dp} = {cp}; pending {dpe} = {cpe}",
            )
        no_overdraft = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
        wallet = AccountKind.WALLET.value
        # every wallet, whatever its flags say (a wallet whose rule was cleared could be
        # overdrawn without the database's CHECK refusing it), and every flagged account
        overdrawn = query(
            "SELECT id, credits_posted - debits_posted - debits_pending FROM accounts "
            f"WHERE (kind = '{wallet}' OR (flags & {no_overdraft}) <> 0) "
            "AND credits_posted - debits_posted - debits_pending < 0 LIMIT 5"
        )
        report.add(
            "no wallet below zero",
            not overdrawn,
            "none" if not overdrawn else f"overdrawn: {overdrawn}",
        )
        unguarded = [
            row[0]
            for row in query(
                f"SELECT id FROM accounts WHERE kind = '{wallet}' "
                f"AND (flags & {no_overdraft}) = 0 LIMIT 5"
            )
        ]
        report.add(
            "every wallet refuses overdraft",
            not unguarded,
            "every wallet has debits_must_not_exceed_credits"
            if not unguarded
            else f"wallets without debits_must_not_exceed_credits: {unguarded}",
        )
        report.add(*self._holds_check(query))
        report.add(*self._fold_check(query, accounts))
        return report

    @staticmethod
    def _holds_check(query: Callable[[str], list[tuple[Any, ...]]]) -> tuple[str, bool, str]:
        """Every hold resolved at most once, and as the transfer that resolved it says.

        A hold is a pending transfer whose own row carries its state; a transfer that
        resolves it names it in ``pending_id``, and the hold names that transfer in
        ``hold_resolved_by``. A pending hold has no resolving transfer; a resolved one has
        exactly one, of the kind its state says: a post (``POSTED``, and
        ``hold_resolved_amount`` is the amount posted), a void (``VOIDED``) or an expiry
        (``EXPIRED``), both of the hold's amount and resolving 0; on the hold's accounts.
        A hold row must have a state and a resolved amount (0 while pending).

        One statement, two passes over the journal, each row looking up one other by its
        unique id (the index; a hash join on PostgreSQL): every hold checks the transfer it
        names, and every resolving transfer checks that its hold names it back (so a
        second one, or one resolving a pending hold or a non-hold, fails).
        """
        pending = int(TransferFlags.PENDING)
        kind = f"(r.flags & {RESOLVING_FLAGS})"
        posted, voided = int(HoldState.POSTED), int(HoldState.VOIDED)
        expired, open_ = int(HoldState.EXPIRED), int(HoldState.PENDING)
        states = ", ".join(str(int(s)) for s in HoldState)
        release = "h.hold_resolved_amount = 0 AND r.amount = h.amount"
        rows = query(
            "SELECT h.id FROM transfers h LEFT JOIN transfers r ON r.id = h.hold_resolved_by "
            f"WHERE ((h.flags & {pending}) <> 0 OR h.hold_state IS NOT NULL) AND ("
            f"(h.flags & {pending}) = 0 OR h.hold_state IS NULL OR h.hold_resolved_amount IS NULL "
            f"OR h.hold_state NOT IN ({states}) "
            f"OR (h.hold_state = {open_} AND h.hold_resolved_by IS NOT NULL) "
            f"OR (h.hold_state <> {open_} AND (r.id IS NULL OR r.pending_id IS NULL "
            "OR r.pending_id <> h.id OR r.debit_account_id <> h.debit_account_id "
            "OR r.credit_account_id <> h.credit_account_id OR NOT ("
            f"({kind} = {int(TransferFlags.POST_PENDING)} AND h.hold_state = {posted} "
            "AND h.hold_resolved_amount = r.amount) "
            f"OR ({kind} = {int(TransferFlags.VOID_PENDING)} AND h.hold_state = {voided} "
            f"AND {release}) "
            f"OR ({kind} = {int(TransferFlags.EXPIRE_PENDING)} AND h.hold_state = {expired} "
            f"AND {release}))))) "
            "UNION ALL "
            "SELECT r.pending_id FROM transfers r LEFT JOIN transfers h ON h.id = r.pending_id "
            "WHERE r.pending_id IS NOT NULL AND (h.id IS NULL OR h.hold_resolved_by IS NULL "
            "OR h.hold_resolved_by <> r.id) LIMIT 10"
        )
        holds = list(dict.fromkeys(row[0] for row in rows))[:5]
        detail = (
            "holds consistent with their resolving transfers"
            if not holds
            else f"holds not as their resolving transfers say (resolved twice, not "
            f"resolved, or state mismatch): {holds}"
        )
        return ("every hold resolved at most once", not holds, detail)

    @staticmethod
    def _fold_check(
        query: Callable[[str], list[tuple[Any, ...]]], accounts: list[tuple[Any, ...]]
    ) -> tuple[str, bool, str]:
        """Recompute every account's four counters from the journal and compare."""
        folded: dict[str, list[int]] = {}

        def add(account: str, index: int, amount: Any) -> None:
            folded.setdefault(account, [0, 0, 0, 0])[index] += int(amount)

        for account, amount in query(
            f"SELECT debit_account_id, sum(amount) FROM transfers "
            f"WHERE (flags & {NOT_POSTED_FLAGS}) = 0 GROUP BY debit_account_id"
        ):
            add(account, 0, amount)
        for account, amount in query(
            f"SELECT credit_account_id, sum(amount) FROM transfers "
            f"WHERE (flags & {NOT_POSTED_FLAGS}) = 0 GROUP BY credit_account_id"
        ):
            add(account, 1, amount)
        # open holds: those no transfer resolved. Found through the resolving transfer the
        # hold names, which must name the hold back (the unique index on ids; a hash join
        # on PostgreSQL): a ``NOT IN`` list of every resolved id is hashed only while it
        # fits PostgreSQL's work_mem, and is scanned once per hold past that (a journal
        # of a million transfers took minutes). A hold that names no such transfer counts
        # as open here, whatever its state says, so a tampered link fails this check too.
        for debit, credit, amount in query(
            "SELECT t.debit_account_id, t.credit_account_id, sum(t.amount) FROM transfers t "
            "LEFT JOIN transfers r ON r.id = t.hold_resolved_by AND r.pending_id = t.id "
            f"WHERE (t.flags & {int(TransferFlags.PENDING)}) <> 0 AND r.id IS NULL "
            "GROUP BY t.debit_account_id, t.credit_account_id"
        ):
            add(debit, 2, amount)
            add(credit, 3, amount)
        bad: list[str] = []
        for account_id, _, *counters in accounts:
            if [int(c) for c in counters] != folded.pop(account_id, [0, 0, 0, 0]):
                bad.append(account_id)
        bad.extend(folded)  # journal entries naming accounts that do not exist
        detail = (
            f"{len(accounts)} accounts match the journal"
            if not bad
            else f"{len(bad)} accounts differ from the journal: {bad[:5]}"
        )
        return ("balances equal the fold of the journal", not bad, detail)

    # --- writing a batch's rows (the SQL both dialects share) ---------------------------

    def insert_rows(
        self, cur: Any, writes: Writes, last_seq: int | None = None
    ) -> Callable[[], None]:
        """INSERT the batch's new accounts and transfers (holds ride on their transfer).

        Returns what to run once the statements' results are in (PostgreSQL reads back
        the sequence numbers it assigned); SQLite assigns them here, under its write lock,
        after ``last_seq`` (the journal's highest, read here when not given).
        """
        if writes.new_accounts:
            cur.executemany(
                self.sql(f"INSERT INTO accounts ({ACCOUNT_COLUMNS}) VALUES ({_marks(12)})"),
                [self.account_row(a) for a in writes.new_accounts],
            )
        if not writes.new_transfers:
            return _nothing
        if last_seq is None:
            cur.execute("SELECT coalesce(max(seq), 0) FROM transfers")
            last_seq = int(cur.fetchone()[0])
        for offset, transfer in enumerate(writes.new_transfers, start=last_seq + 1):
            transfer.seq = offset
        self.insert_transfer_rows(cur, self.transfer_rows(writes, with_seq=True))
        return _nothing

    def insert_transfer_rows(self, cur: Any, rows: list[tuple[Any, ...]]) -> None:
        """INSERT rows of ``TRANSFER_INSERT_COLUMNS`` then ``seq``."""
        cur.executemany(
            self.sql(f"INSERT INTO transfers ({TRANSFER_INSERT_COLUMNS}, seq) "
                     f"VALUES ({_marks(15)})"),
            rows,
        )  # fmt: skip

    def update_rows(self, cur: Any, writes: Writes) -> None:
        """UPDATE the holds and accounts the batch changed (rows it read under its lock)."""
        if writes.changed_holds:
            cur.executemany(
                self.sql(
                    "UPDATE transfers SET hold_state = ?, hold_resolved_amount = ?, "
                    "hold_resolved_by = ? WHERE id = ?"
                ),
                [self.hold_state_row(h) for h in writes.changed_holds.values()],
            )
        if writes.changed_accounts:
            cur.executemany(
                self.sql(
                    "UPDATE accounts SET status = ?, debits_posted = ?, credits_posted = ?, "
                    "debits_pending = ?, credits_pending = ? WHERE id = ?"
                ),
                [self.counters_row(a) for a in writes.changed_accounts.values()],
            )

    # --- helpers for subclasses --------------------------------------------------------

    @staticmethod
    def account_row(a: Account) -> tuple[Any, ...]:
        return (a.id, a.kind, a.asset, a.flags, a.owner, a.status, a.metadata, a.debits_posted,
                a.credits_posted, a.debits_pending, a.credits_pending, a.created_us)  # fmt: skip

    @staticmethod
    def transfer_rows(writes: Writes, *, with_seq: bool = False) -> list[tuple[Any, ...]]:
        """New transfers as rows (``TRANSFER_INSERT_COLUMNS``, then ``seq`` if asked); a
        new hold's current state rides on its transfer's row."""
        holds = {h.id: h for h in writes.new_holds}
        rows = []
        for t in writes.new_transfers:
            h = holds.get(t.id)
            row: tuple[Any, ...] = (
                t.id, t.debit_account_id, t.credit_account_id, t.amount, t.code, t.flags,
                t.pending_id, t.timeout_s, t.metadata, t.ts_us,
                *((None, None, None, None) if h is None
                  else (h.expires_us, int(h.state), h.resolved_amount, h.resolved_by)),
            )  # fmt: skip
            rows.append((*row, t.seq) if with_seq else row)
        return rows

    @staticmethod
    def counters_row(a: Account) -> tuple[Any, ...]:
        return (a.status, a.debits_posted, a.credits_posted, a.debits_pending,
                a.credits_pending, a.id)  # fmt: skip

    @staticmethod
    def hold_state_row(h: Hold) -> tuple[Any, ...]:
        """For ``UPDATE transfers SET hold_state, hold_resolved_amount, hold_resolved_by``."""
        return (int(h.state), h.resolved_amount, h.resolved_by, h.id)


def storable(value: object) -> bool:
    """Whether ``value`` (``None``, or text a read compares with) can be in a row: every
    id, kind and code the ledger writes is UTF-8 text without NUL (PostgreSQL stores no
    other). Anything else is found nowhere; asked as is, PostgreSQL's driver would raise
    (a NUL, a lone surrogate) where SQLite answers not found."""
    if value is None:
        return True
    if not isinstance(value, str) or "\x00" in value:
        return False
    if value.isascii():
        return True
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def _by_bucket(item: tuple[tuple[str, int], list[int]]) -> tuple[int, str]:
    (code, start), _ = item
    return start, code


def _nothing() -> None:
    return None


def _marks(n: int) -> str:
    return ",".join("?" * n)


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


__all__ = ["HoldState", "Migration", "Store"]
