"""Rows a writer last committed, served to the engine instead of reading the database.

Both stores' fast paths use it: PostgreSQL checks every row it relied on with
compare-and-set as it writes; SQLite checks, under its write lock, that no other
connection committed since (``PRAGMA data_version``), which makes every remembered row
exact.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

from drip.ledger.engine import Engine, Op, Result
from drip.ledger.types import Account, Hold, HoldState, Transfer

_PENDING = int(HoldState.PENDING)

#: Most rows each cache keeps before it starts over (bounded memory).
CACHE_ROWS_MAX = 100_000


class Miss(Exception):
    """The cache cannot answer: use the locked path."""


class RowCache:
    """Accounts and open holds as this writer last committed them."""

    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}
        self.holds: dict[str, Hold] = {}
        self.backoff = 0
        self._lock = threading.Lock()  # remember() from the loop and the writer threads

    def clear(self) -> None:
        self.accounts.clear()
        self.holds.clear()

    def remember(self, engine: Engine, before: dict[str, Account] | None = None) -> None:
        """Keep the rows ``engine`` left. With ``before`` (the rows a batch read from
        this cache, ``CacheView``), an account is kept only if the cache still holds what
        the batch read: otherwise another thread has remembered a later state since (it
        committed after this batch, on rows that include it), or the cache was cleared."""
        with self._lock:
            self._remember(engine, before)

    def _remember(self, engine: Engine, before: dict[str, Account] | None) -> None:
        if len(self.accounts) > CACHE_ROWS_MAX or len(self.holds) > CACHE_ROWS_MAX:
            self.clear()
        accounts = self.accounts
        for account_id, account in engine.accounts.items():
            if account is None:
                continue
            if before is not None and accounts.get(account_id) is not before.get(account_id):
                continue
            accounts[account_id] = account.copy()
        holds = self.holds
        for hold_id, hold in engine.holds.items():
            if hold is not None and hold.state == _PENDING:
                # kept as is: nothing changes a hold in place once its batch is done (an
                # engine works on copies, ``load_holds``), and callers never get one
                holds[hold_id] = hold
            else:
                holds.pop(hold_id, None)

    # --- rows for an engine (through a CacheView) --------------------------------------

    def load_holds(self, ids: set[str]) -> dict[str, Hold]:
        try:
            return {i: self.holds[i].copy() for i in ids}
        except KeyError:
            raise Miss from None


class CacheView:
    """The engine's loader over a ``RowCache`` for one batch. It records each account as
    it was read (``before``): the compare-and-set's expected values. Reading them from
    the cache again later would be wrong, since another thread sharing the cache may
    remember a newer state in between."""

    __slots__ = ("before", "cache")

    def __init__(self, cache: RowCache) -> None:
        self.cache = cache
        self.before: dict[str, Account] = {}

    def load_accounts(self, ids: set[str]) -> dict[str, Account]:
        remembered = self.cache.accounts
        out: dict[str, Account] = {}
        for i in ids:
            account = remembered.get(i)
            if account is None:
                raise Miss
            self.before[i] = account  # never changed in place: remember() replaces it
            out[i] = account.copy()
        return out

    def load_holds(self, ids: set[str]) -> dict[str, Hold]:
        return self.cache.load_holds(ids)

    def load_transfers(self, ids: set[str]) -> dict[str, Transfer]:
        return {}  # assumed new; an existing id aborts on the unique index

    def window_usage(self, account_id: str, since_us: int) -> tuple[int, int, int | None]:
        raise Miss  # rolling windows are summed from the journal, under the lock

    def window_release_us(
        self, account_id: str, since_us: int, *, calls: int, amount: int
    ) -> int | None:
        raise Miss

    def load_all(
        self, hold_ids: set[str], account_ids: set[str], transfer_ids: set[str]
    ) -> tuple[dict[str, Hold], dict[str, Account], dict[str, Transfer]]:
        return self.load_holds(hold_ids), self.load_accounts(account_ids), {}


class Applied(NamedTuple):
    engine: Engine
    results: list[list[Result]]
    #: each account as the batch read it (see ``CacheView``)
    before: dict[str, Account]


def apply_remembered(cache: RowCache, now_us: int, ops: list[Op]) -> Applied | None:
    """``ops`` applied to the remembered rows, or ``None`` when memory cannot decide them
    alone: a row it lacks, or any refusal (refusals are decided on rows read from the
    database, never on memory)."""
    view = CacheView(cache)
    engine = Engine(view, now_us)
    try:
        engine.prefetch(ops)
        results = [engine.apply(op) for op in ops]
    except Miss:
        return None
    if any(isinstance(r, Exception) for rs in results for r in rs):
        return None
    return Applied(engine, results, view.before)


__all__ = ["CACHE_ROWS_MAX", "Applied", "CacheView", "Miss", "RowCache", "apply_remembered"]
