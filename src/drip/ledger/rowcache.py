"""Rows a writer last committed, served to the engine instead of reading the database.

Both stores' fast paths use it: PostgreSQL checks every row it relied on with
compare-and-set as it writes; SQLite checks, under its write lock, that no other
connection committed since (``PRAGMA data_version``), which makes every remembered row
exact.
"""

from __future__ import annotations

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

    def clear(self) -> None:
        self.accounts.clear()
        self.holds.clear()

    def remember(self, engine: Engine) -> None:
        if len(self.accounts) > CACHE_ROWS_MAX or len(self.holds) > CACHE_ROWS_MAX:
            self.clear()
        for account_id, account in engine.accounts.items():
            if account is not None:
                self.accounts[account_id] = account.copy()
        holds = self.holds
        for hold_id, hold in engine.holds.items():
            if hold is not None and hold.state == _PENDING:
                # kept as is: nothing changes a hold in place once its batch is done (an
                # engine works on copies, ``load_holds``), and callers never get one
                holds[hold_id] = hold
            else:
                holds.pop(hold_id, None)

    # --- the engine's Loader, served from memory -------------------------------------

    def load_accounts(self, ids: set[str]) -> dict[str, Account]:
        try:
            return {i: self.accounts[i].copy() for i in ids}
        except KeyError:
            raise Miss from None

    def load_holds(self, ids: set[str]) -> dict[str, Hold]:
        try:
            return {i: self.holds[i].copy() for i in ids}
        except KeyError:
            raise Miss from None

    def load_transfers(self, ids: set[str]) -> dict[str, Transfer]:
        return {}  # assumed new; an existing id aborts on the unique index

    def window_usage(self, account_id: str, since_us: int) -> tuple[int, int, int | None]:
        raise Miss  # rolling windows are summed from the journal, under the lock

    def load_all(
        self, hold_ids: set[str], account_ids: set[str], transfer_ids: set[str]
    ) -> tuple[dict[str, Hold], dict[str, Account], dict[str, Transfer]]:
        return self.load_holds(hold_ids), self.load_accounts(account_ids), {}


def apply_remembered(
    cache: RowCache, now_us: int, ops: list[Op]
) -> tuple[Engine, list[list[Result]]] | None:
    """``ops`` applied to the remembered rows, or ``None`` when memory cannot decide them
    alone: a row it lacks, or any refusal (refusals are decided on rows read from the
    database, never on memory)."""
    engine = Engine(cache, now_us)
    try:
        engine.prefetch(ops)
        results = [engine.apply(op) for op in ops]
    except Miss:
        return None
    if any(isinstance(r, Exception) for rs in results for r in rs):
        return None
    return engine, results


__all__ = ["CACHE_ROWS_MAX", "Miss", "RowCache", "apply_remembered"]
