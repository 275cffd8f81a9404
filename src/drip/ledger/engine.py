"""The ledger's rules, applied to one batch of operations in memory.

A store opens a transaction, hands the engine a :class:`Loader` over that transaction,
lets it apply every operation of the batch in order, and writes back what the engine
collected (new rows and changed rows) before committing. Both stores share this code,
so SQLite and PostgreSQL cannot disagree about a rule.

Each operation gets its own result: a record, or a :class:`DripError` instance. An
operation's error never affects the others, except inside a linked chain, which
commits all-or-nothing.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass, field
from typing import Any, Protocol

from drip import errors
from drip.ledger.types import (
    CHAIN_TRANSFERS_MAX,
    DERIVED_SEP,
    LATE_CHARGE_MARK,
    Account,
    AccountFlags,
    AccountSpec,
    AccountStatus,
    Hold,
    HoldState,
    Transfer,
    TransferFlags,
    TransferSpec,
    WindowLimit,
    check_id,
)
from drip.money import AMOUNT_ATOMIC_MAX

# plain ints: enum arithmetic costs more than the rest of a transfer on the hot path
_PENDING = int(TransferFlags.PENDING)
_POST = int(TransferFlags.POST_PENDING)
_VOID = int(TransferFlags.VOID_PENDING)
_EXPIRE = int(TransferFlags.EXPIRE_PENDING)
_LINKED = int(TransferFlags.LINKED)
_MUST_NOT_EXCEED_CREDITS = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
_MUST_NOT_EXCEED_DEBITS = int(AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS)


class Loader(Protocol):
    """Reads rows inside the batch's transaction (PostgreSQL locks accounts it reads)."""

    def load_accounts(self, ids: set[str]) -> dict[str, Account]: ...

    def load_transfers(self, ids: set[str]) -> dict[str, Transfer]: ...

    def load_holds(self, ids: set[str]) -> dict[str, Hold]: ...

    def window_usage(self, account_id: str, since_us: int) -> tuple[int, int, int | None]:
        """(amount, calls, oldest ts) of the account's debits after ``since_us``, open
        holds included, voided and expired ones not."""
        ...

    def window_release_us(
        self, account_id: str, since_us: int, *, calls: int, amount: int
    ) -> int | None:
        """When (the time of the row whose leaving does it) at least ``calls`` of those
        rows and ``amount`` of their units will have left the window, if ever."""
        ...

    def load_all(
        self, hold_ids: set[str], account_ids: set[str], transfer_ids: set[str]
    ) -> tuple[dict[str, Hold], dict[str, Account], dict[str, Transfer]]:
        """All three reads at once (in this order: holds, accounts, transfers)."""
        ...


# --- operations ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, weakref_slot=True)
class CreateAccounts:
    accounts: tuple[AccountSpec, ...]


@dataclass(frozen=True, slots=True, weakref_slot=True)
class CreateTransfers:
    """Transfers applied in order; a ``LINKED`` run commits all-or-nothing."""

    transfers: tuple[TransferSpec, ...]
    #: holds only this process will resolve: they may be answered before they commit
    private: bool = False


@dataclass(frozen=True, slots=True, weakref_slot=True)
class SetAccountStatus:
    account_id: str
    status: str


@dataclass(frozen=True, slots=True, weakref_slot=True)
class ExpireHolds:
    """Expire these holds if their timeout has passed (ids found by the store's sweep)."""

    hold_ids: tuple[str, ...]


Op = CreateAccounts | CreateTransfers | SetAccountStatus | ExpireHolds

#: What an operation's earlier attempts may have written: (transfer id, ts_us) pairs.
Written = Set[tuple[str, int]]
_NONE_WRITTEN: Written = frozenset()


class Attempts:
    """Transfers that operations' earlier attempts sent without learning whether they
    committed (the connection broke after the statement or the COMMIT went out: an
    ambiguous commit), kept per operation until it is run again.

    The store runs such an operation again, and the engine then finds the rows the lost
    attempt did write. A row with an id that attempt wrote and that attempt's timestamp
    (``ts_us``, the attempt's clock) is the operation's own write, not an earlier call's:
    it is answered as new (``replayed=False``; this call moved the money), where a row
    written by anyone else (an earlier call with the same id) is a replay.

    Operations are held weakly: an entry goes when its operation does (once its caller
    has its answer), so a later call with the same id, a new operation, is a replay."""

    def __init__(self) -> None:
        self._by_op: dict[int, tuple[weakref.ref[CreateTransfers], set[tuple[str, int]]]] = {}

    def __bool__(self) -> bool:
        return bool(self._by_op)

    def note(self, ops: Iterable[Op], writes: Writes) -> None:
        """``ops``' attempt sent ``writes`` and may have committed them."""
        if not writes.new_transfers:
            return
        sent = {t.id: t.ts_us for t in writes.new_transfers}
        by_op = self._by_op
        for op in ops:
            if type(op) is not CreateTransfers:
                continue
            mine = {(s.id, sent[s.id]) for s in op.transfers if s.id in sent}
            if not mine:
                continue
            entry = by_op.get(id(op))
            if entry is None or entry[0]() is not op:
                # the callback runs as the op is freed, before its id can be reused
                entry = by_op[id(op)] = (weakref.ref(op, self._forget(id(op))), set())
            entry[1].update(mine)

    def _forget(self, key: int) -> Callable[[object], None]:
        by_op = self._by_op

        def forget(_: object) -> None:
            by_op.pop(key, None)

        return forget

    def of(self, op: Op) -> Written:
        """What ``op``'s earlier attempts may have written (empty if none failed)."""
        entry = self._by_op.get(id(op))
        if entry is None or entry[0]() is not op:
            return _NONE_WRITTEN
        return entry[1]


def private_holds_only(ops: Iterable[Op]) -> bool:
    """Whether every operation only takes private holds (``Ledger.hold(private=True)``):
    new pending transfers that this process itself will capture or void. A store may
    answer such a batch before it is durable: losing it in a crash is exactly a void."""
    for op in ops:
        if type(op) is not CreateTransfers or not op.private:
            return False
        for spec in op.transfers:
            if not spec.flags & _PENDING:
                return False
    return True


def orphan_voids(op: Op) -> CreateTransfers | None:
    """The linked voids that release a private hold chain (``private_holds_only``) whose
    caller was cancelled before it got the hold, so that nobody else could resolve it;
    the same transfers ``Ledger.void`` would write. ``None`` for any other operation."""
    if type(op) is not CreateTransfers or not op.private:
        return None
    last = len(op.transfers) - 1
    return CreateTransfers(tuple(
        TransferSpec(f"{s.id}{DERIVED_SEP}void", s.debit_account_id, s.credit_account_id,
                     None, s.code, _VOID | (_LINKED if i < last else 0), s.id)
        for i, s in enumerate(op.transfers)
    ))  # fmt: skip


#: A result is a record or the error instance for that record.
Result = Any


@dataclass(slots=True)
class Writes:
    """Everything a batch changed, for the store to persist in the same transaction."""

    new_accounts: list[Account] = field(default_factory=list)
    new_transfers: list[Transfer] = field(default_factory=list)
    new_holds: list[Hold] = field(default_factory=list)
    changed_accounts: dict[str, Account] = field(default_factory=dict)
    changed_holds: dict[str, Hold] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.new_accounts or self.new_transfers or self.changed_accounts
                    or self.changed_holds)  # fmt: skip


#: plain values of the hot comparisons (an enum member compares slower)
_FROZEN = AccountStatus.FROZEN.value
_HOLD_PENDING = int(HoldState.PENDING)

_MISSING: Any = object()


#: the platform fee leg a ledger chain ends with (``<charge>~fee``, ``<hold>~post~fee``)
_FEE_SUFFIX = f"{DERIVED_SEP}fee"


class _ChainFailed(Exception):
    def __init__(self, index: int, error: errors.DripError) -> None:
        self.index = index
        self.error = error


class Engine:
    """Applies a batch of operations to rows read through ``loader``; see module doc."""

    def __init__(self, loader: Loader, now_us: int) -> None:
        self.loader = loader
        self.now_us = now_us
        self.accounts: dict[str, Account | None] = {}
        self.transfers: dict[str, Transfer | None] = {}
        self.holds: dict[str, Hold | None] = {}
        self.writes = Writes()
        self._new_account_ids: set[str] = set()
        self._new_hold_ids: set[str] = set()
        self._undo: list[tuple[dict[str, Any], str, Any]] | None = None
        #: holds found expired inside a chain: expired at the end, whatever the chain does
        self._due_expiries: list[str] = []
        #: what the operation being applied may have written itself in an attempt whose
        #: commit was lost (``Attempts``): such rows are its own, not replays
        self.ours: Written = _NONE_WRITTEN

    # --- loading ----------------------------------------------------------------------

    def prefetch(self, ops: Iterable[Op]) -> None:
        """Load every row the batch names, in as few queries as possible."""
        account_ids: set[str] = set()
        transfer_ids: set[str] = set()
        hold_ids: set[str] = set()
        #: a hold whose accounts the batch does not name must be read before the accounts
        holds_first = False
        for op in ops:
            if isinstance(op, CreateTransfers):
                for t in op.transfers:
                    transfer_ids.add(t.id)
                    if t.debit_account_id:
                        account_ids.add(t.debit_account_id)
                    if t.credit_account_id:
                        account_ids.add(t.credit_account_id)
                    if t.pending_id:
                        hold_ids.add(t.pending_id)
                        if not (t.debit_account_id and t.credit_account_id):
                            holds_first = True
            elif isinstance(op, CreateAccounts):
                account_ids.update(a.id for a in op.accounts)
            elif isinstance(op, SetAccountStatus):
                account_ids.add(op.account_id)
            else:
                hold_ids.update(op.hold_ids)
                holds_first = True
        if holds_first:
            self._load_holds(hold_ids)
            for hold in self.holds.values():
                if hold is not None:
                    account_ids.add(hold.debit_account_id)
                    account_ids.add(hold.credit_account_id)
            self._load_accounts(account_ids)
            self._load_transfers(transfer_ids)
            return
        holds, accounts, transfers = self.loader.load_all(hold_ids, account_ids, transfer_ids)
        for i in hold_ids:
            self.holds[i] = holds.get(i)
        for i in account_ids:
            self.accounts[i] = accounts.get(i)
        for i in transfer_ids:
            self.transfers[i] = transfers.get(i)

    def _load_accounts(self, ids: set[str]) -> None:
        ids = {i for i in ids if i not in self.accounts}
        if ids:
            found = self.loader.load_accounts(ids)
            for i in ids:
                self.accounts[i] = found.get(i)

    def _load_transfers(self, ids: set[str]) -> None:
        ids = {i for i in ids if i not in self.transfers}
        if ids:
            found = self.loader.load_transfers(ids)
            for i in ids:
                self.transfers[i] = found.get(i)

    def _load_holds(self, ids: set[str]) -> None:
        ids = {i for i in ids if i not in self.holds}
        if ids:
            found = self.loader.load_holds(ids)
            for i in ids:
                self.holds[i] = found.get(i)

    def _account(self, account_id: str) -> Account | None:
        if account_id not in self.accounts:
            self._load_accounts({account_id})
        return self.accounts[account_id]

    def _transfer(self, transfer_id: str) -> Transfer | None:
        if transfer_id not in self.transfers:
            self._load_transfers({transfer_id})
        return self.transfers[transfer_id]

    def _hold(self, hold_id: str) -> Hold | None:
        if hold_id not in self.holds:
            self._load_holds({hold_id})
        return self.holds[hold_id]

    # --- change tracking --------------------------------------------------------------

    def _touch_account(self, account: Account) -> Account:
        """Return the account to mutate, remembering its old value for a chain rollback."""
        if self._undo is not None:
            self._undo.append((self.accounts, account.id, account.copy()))
        if account.id not in self._new_account_ids:
            self.writes.changed_accounts[account.id] = account
        return account

    def _touch_hold(self, hold: Hold) -> Hold:
        if self._undo is not None:
            self._undo.append((self.holds, hold.id, hold.copy()))
        if hold.id not in self._new_hold_ids:
            self.writes.changed_holds[hold.id] = hold
        return hold

    def _remember(self, table: dict[str, Any], key: str) -> None:
        if self._undo is not None:
            self._undo.append((table, key, table.get(key, _MISSING)))

    # --- operations -------------------------------------------------------------------

    def apply(self, op: Op) -> list[Result]:
        """Apply one operation; returns one result per record it names."""
        if isinstance(op, CreateTransfers):
            return self._create_transfers(op.transfers)
        if isinstance(op, CreateAccounts):
            return [self._guard(self._create_account, spec) for spec in op.accounts]
        if isinstance(op, SetAccountStatus):
            return [self._guard(self._set_status, op)]
        return [self._guard(self._expire, hold_id, False) for hold_id in op.hold_ids]

    @staticmethod
    def _guard(fn: Any, *args: Any) -> Result:
        try:
            return fn(*args)
        except errors.DripError as exc:
            return exc

    def _create_account(self, spec: AccountSpec) -> Account:
        check_id(spec.id, "account_id")
        existing = self._account(spec.id)
        if existing is not None:
            if (existing.kind, existing.asset, existing.flags, existing.owner,
                    existing.metadata) == spec.fingerprint():  # fmt: skip
                return existing
            raise errors.IdempotencyConflict(
                f"account {spec.id!r} exists with different fields", param="id"
            )
        if spec.flags & _MUST_NOT_EXCEED_CREDITS and spec.flags & _MUST_NOT_EXCEED_DEBITS:
            raise errors.InvalidRequest("an account takes at most one balance rule", param="flags")
        account = Account(
            id=spec.id, kind=spec.kind, asset=spec.asset, flags=spec.flags, owner=spec.owner,
            metadata=spec.metadata, created_us=self.now_us,
        )  # fmt: skip
        self.accounts[spec.id] = account
        self._new_account_ids.add(spec.id)
        self.writes.new_accounts.append(account)
        return account

    def _set_status(self, op: SetAccountStatus) -> Account:
        if op.status not in (AccountStatus.OPEN, AccountStatus.FROZEN):
            raise errors.InvalidRequest(f"unknown account status {op.status!r}", param="status")
        account = self._account(op.account_id)
        if account is None:
            raise errors.AccountNotFound(f"account {op.account_id!r} does not exist")
        if account.status != op.status:
            self._touch_account(account).status = op.status
        return account

    def _create_transfers(self, specs: tuple[TransferSpec, ...]) -> list[Result]:
        results: list[Result] = []
        i = 0
        n = len(specs)
        while i < n:
            j = i
            while j < n and specs[j].flags & _LINKED:  # find the chain's true end
                j += 1
            if j == i:
                try:
                    results.append(self._transfer_one(specs[i]))
                except errors.DripError as exc:
                    results.append(exc)
                i += 1
                continue
            chain = specs[i : j + 1]
            if j == n or len(chain) > CHAIN_TRANSFERS_MAX:
                # an open chain (last transfer still LINKED) or an over-long one fails whole
                err = errors.InvalidTransfer(
                    f"a linked chain must end with an unlinked transfer and hold at most "
                    f"{CHAIN_TRANSFERS_MAX} transfers",
                    param="flags",
                )
                results.extend(err for _ in chain)
                i += len(chain)
                continue
            ids = [spec.id for spec in chain]
            twice = next((k for k, x in enumerate(ids) if x in ids[:k]), None)
            if twice is not None:  # nothing is tried: the chain could never be all of itself
                dup = errors.InvalidTransfer(
                    f"transfer id {ids[twice]!r} appears twice in this linked chain", param="id"
                )
                linked = errors.LinkedEventFailed("another transfer in this linked chain failed")
                results.extend(dup if k == twice else linked for k in range(len(chain)))
                i = j + 1
                continue
            results.extend(self._apply_chain(chain))
            i = j + 1
        return results

    def _apply_chain(self, chain: tuple[TransferSpec, ...]) -> list[Result]:
        undo: list[tuple[dict[str, Any], str, Any]] = []
        marks = (len(self.writes.new_transfers), len(self.writes.new_holds))
        changed_accounts = set(self.writes.changed_accounts)
        changed_holds = set(self.writes.changed_holds)
        self._undo = undo
        done: list[Result] = []
        #: whether each leg wrote a row (a replay, even of this batch's twin, writes none)
        created: list[bool] = []
        try:
            for index, spec in enumerate(chain):
                if index and done[0].replayed and spec.id.endswith(_FEE_SUFFIX):
                    done.append(self._earlier_fee(spec))
                    created.append(False)
                    continue
                rows = len(self.writes.new_transfers)
                try:
                    result = self._transfer_one(spec)
                except errors.RateLimited as exc:
                    raise _ChainFailed(*self._worse_than_waiting(chain, index, exc)) from None
                except errors.DripError as exc:
                    raise _ChainFailed(index, exc) from None
                created.append(len(self.writes.new_transfers) > rows)
                if index and created[index] != created[0]:
                    # all or nothing holds for a replay too: a chain written before with
                    # other legs (a cap it did not have) is another request, not a replay
                    raise _ChainFailed(index, errors.IdempotencyConflict(
                        f"transfer id {chain[0].id!r} was already used in a chain without "
                        f"{spec.id!r}" if created[index] else
                        f"transfer {spec.id!r} exists, but {chain[0].id!r} is new",
                        param="id"))  # fmt: skip
                done.append(result)
        except _ChainFailed as failed:
            for table, key, old in reversed(undo):
                if old is _MISSING:
                    table.pop(key, None)
                else:
                    table[key] = old
            del self.writes.new_transfers[marks[0] :]
            for hold in self.writes.new_holds[marks[1] :]:
                self._new_hold_ids.discard(hold.id)
            del self.writes.new_holds[marks[1] :]
            for key in set(self.writes.changed_accounts) - changed_accounts:
                del self.writes.changed_accounts[key]
            for key in set(self.writes.changed_holds) - changed_holds:
                del self.writes.changed_holds[key]
            self._expire_chain_holds(chain)
            linked = errors.LinkedEventFailed("another transfer in this linked chain failed")
            return [failed.error if k == failed.index else linked for k in range(len(chain))]
        finally:
            self._undo = None
        return done

    def _worse_than_waiting(
        self, chain: tuple[TransferSpec, ...], index: int, waited: errors.RateLimited
    ) -> tuple[int, errors.DripError]:
        """A rolling window refused leg ``index``: if a later leg would be refused for a
        reason no wait cures (a route budget too small for the call), that is the answer,
        not "retry later". The later legs are tried on the chain's own state, which its
        failure undoes."""
        for later in range(index + 1, len(chain)):
            try:
                self._transfer_one(chain[later])
            except errors.RateLimited:
                continue
            except errors.DripError as exc:
                return later, exc
        return index, waited

    def _expire_chain_holds(self, chain: tuple[TransferSpec, ...]) -> None:
        """After a chain failed, the holds its legs resolve that are past their timeout
        expire anyway (as the first one found so did): a capture whose hold expired
        fails at its first leg, and its companions (a session's ``~cap0``) must not go
        on reserving until the sweep, or a late charge would find them in the way."""
        for spec in chain:
            if spec.flags & (_POST | _VOID) and spec.pending_id:
                hold = self._hold(spec.pending_id)
                if (hold is not None and hold.state == _HOLD_PENDING
                        and hold.expires_us is not None and hold.expires_us <= self.now_us
                        and hold.id not in self._due_expiries):  # fmt: skip
                    self._due_expiries.append(hold.id)

    def _earlier_fee(self, spec: TransferSpec) -> Transfer | None:
        """A replayed charge's fee leg as it was first written, or None if it carried
        none: the fee rate is the ledger's setting, not the caller's, and may have changed
        since; a replay neither moves money for it nor conflicts on it."""
        existing = self._transfer(spec.id)
        return None if existing is None else _as_replay(existing)

    def finish(self) -> Writes:
        """What to persist: every written row as it stands now (after any rollbacks)."""
        w = self.writes
        for hold_id in self._due_expiries:
            self._expire(hold_id, True)
        self._due_expiries.clear()
        accounts, holds = self.accounts, self.holds
        w.new_accounts = [accounts[a.id] or a for a in w.new_accounts]
        w.new_holds = [holds[h.id] or h for h in w.new_holds]
        w.changed_accounts = {k: accounts[k] or v for k, v in w.changed_accounts.items()}
        w.changed_holds = {k: holds[k] or v for k, v in w.changed_holds.items()}
        return w

    def _transfer_one(self, spec: TransferSpec) -> Transfer:
        # specs were validated when submitted (Ledger plans), in the caller's context
        flags = spec.flags
        existing = self._transfer(spec.id)
        if existing is not None:
            return self._replay(spec, existing)
        if flags & (_POST | _VOID):
            return self._resolve(spec)
        debit = self._account(spec.debit_account_id)
        credit = self._account(spec.credit_account_id)
        if debit is None:
            raise errors.AccountNotFound(
                f"account {spec.debit_account_id!r} does not exist", param="debit_account_id"
            )
        if credit is None:
            raise errors.AccountNotFound(
                f"account {spec.credit_account_id!r} does not exist", param="credit_account_id"
            )
        if debit.id == credit.id:
            raise errors.InvalidTransfer("debit and credit accounts must differ")
        if debit.asset != credit.asset:
            raise errors.AssetMismatch(
                f"cannot move {debit.asset} into a {credit.asset} account",
                param="credit_account_id",
            )
        if debit.status == _FROZEN and not spec.settles:
            raise errors.AccountFrozen(f"account {debit.id!r} is frozen (paused)", account=debit.id)
        amount = spec.amount
        assert amount is not None  # validated: only post may omit it
        if debit.flags & _MUST_NOT_EXCEED_CREDITS:
            available = debit.credits_posted - debit.debits_posted - debit.debits_pending
            if amount > available:
                raise errors.DripInsufficientCredits(
                    f"account {debit.id!r} has {available} available, {amount} needed",
                    available=available,
                    needed=amount,
                    account=debit.id,
                )
        if credit.flags & _MUST_NOT_EXCEED_DEBITS:
            room = credit.debits_posted - credit.credits_posted - credit.credits_pending
            if amount > room:
                raise errors.DripInsufficientCredits(
                    f"account {credit.id!r} can take {room} more credit, {amount} offered",
                    available=room,
                    needed=amount,
                    account=credit.id,
                )
        if spec.limits:  # after the refusals that retrying cannot cure (a 429 invites one)
            self._check_limits(debit.id, spec)
        pending = bool(flags & _PENDING)
        if pending:
            # a hold must fit the pending counters now, and the posted ones when captured
            if (debit.debits_posted + debit.debits_pending + amount > AMOUNT_ATOMIC_MAX
                    or credit.credits_posted + credit.credits_pending + amount
                    > AMOUNT_ATOMIC_MAX):  # fmt: skip
                raise errors.InvalidTransfer("the transfer would overflow an account counter")
            self._touch_account(debit).debits_pending += amount
            self._touch_account(credit).credits_pending += amount
            expires = self.now_us + spec.timeout_s * 1_000_000 if spec.timeout_s else None
            hold = Hold(spec.id, debit.id, credit.id, amount, expires)
            if self._undo is not None:
                self._remember(self.holds, spec.id)
            self.holds[spec.id] = hold
            self._new_hold_ids.add(spec.id)
            self.writes.new_holds.append(hold)
        else:
            # the open holds' room stays theirs: each can still be captured in full
            if (debit.debits_posted + debit.debits_pending + amount > AMOUNT_ATOMIC_MAX
                    or credit.credits_posted + credit.credits_pending + amount
                    > AMOUNT_ATOMIC_MAX):  # fmt: skip
                raise errors.InvalidTransfer("the transfer would overflow an account counter")
            self._touch_account(debit).debits_posted += amount
            self._touch_account(credit).credits_posted += amount
            if spec.resume_credit and credit.status == _FROZEN:
                self._touch_account(credit).status = AccountStatus.OPEN
        return self._record(spec, debit.id, credit.id, amount)

    def _check_limits(self, account_id: str, spec: TransferSpec) -> None:
        """Rolling windows on the debit account: what the journal holds in the window plus
        what this batch already added, plus this transfer, must stay within each cap."""
        amount = spec.amount or 0
        batch_amount = batch_calls = 0
        for t in self.writes.new_transfers:
            if t.debit_account_id == account_id and not t.flags & (_POST | _VOID | _EXPIRE):
                counted = self._window_amount(t)
                if counted is not None:
                    batch_amount += counted
                    batch_calls += 1
        released = self._released_in_batch(account_id)
        for limit in spec.limits:
            if limit.max_amount is not None and amount > limit.max_amount:
                # no wait would let it through: a refusal, not a rate limit
                raise errors.PolicyViolation(
                    f"this call reserves {amount}, more than the {limit.name} limit allows in "
                    f"{limit.window_s} s ({limit.max_amount})",
                    param=limit.name, policy=limit.name, account=account_id,
                    reserved=amount, max_amount=limit.max_amount, window_s=limit.window_s,
                )  # fmt: skip
        refused: tuple[int, WindowLimit, str] | None = None
        for limit in spec.limits:
            since_us = self.now_us - limit.window_s * 1_000_000
            used_amount, used_calls, _ = self.loader.window_usage(account_id, since_us)
            # the journal's holds this batch released, read above as still reserving
            for taken_us, calls, freed in released:
                if taken_us > since_us:
                    used_calls -= calls
                    used_amount -= freed
            # how much has to leave the window (rows leave as they age) for the call to fit
            excess_amount = excess_calls = 0
            if limit.max_amount is not None:
                excess_amount = max(0, used_amount + batch_amount + amount - limit.max_amount)
            if limit.max_calls is not None:
                excess_calls = max(0, used_calls + batch_calls + 1 - limit.max_calls)
            if excess_amount or excess_calls:
                wait_us = self._window_wait_us(
                    account_id, since_us, limit.window_s, excess_calls, excess_amount,
                    (used_calls, used_amount),
                )  # fmt: skip
                what = "amount" if excess_amount else "calls"
                if refused is None or wait_us > refused[0]:
                    refused = (wait_us, limit, what)
        if refused is not None:
            # the longest wait: usage only shrinks with time, so after it every window fits
            wait_us, limit, what = refused
            raise errors.RateLimited(
                f"the {limit.name} limit is reached ({what} per {limit.window_s} s); "
                "retry later",
                param=limit.name, policy=limit.name,
                retry_after_s=max(1, -(-wait_us // 1_000_000)), account=account_id,
            )  # fmt: skip

    def _window_amount(self, t: Transfer) -> int | None:
        """What a debit this batch wrote counts in a rolling window, as the journal counts
        it (``window_usage_sql``): None for a hold already voided and for a late charge
        (its expired hold still counts, in full), a captured hold's captured amount,
        anything else its amount."""
        if not t.flags & _PENDING:
            return None if LATE_CHARGE_MARK in t.id else t.amount
        hold = self.holds.get(t.id)
        if hold is None or hold.state in (_HOLD_PENDING, HoldState.EXPIRED):
            return t.amount
        if hold.state == HoldState.POSTED:
            return hold.resolved_amount
        return None

    def _released_in_batch(self, account_id: str) -> list[tuple[int, int, int]]:
        """The journal's holds on ``account_id`` this batch resolved, which the journal's
        window sums still count at their full amount: (taken at, calls, amount) each
        frees (a void: the call and its amount; a partial capture: the rest; an expiry
        nothing: its call was admitted, and may yet be charged late). Read only when a
        transfer carries limits."""
        out: list[tuple[int, int, int]] = []
        for hold_id, hold in self.writes.changed_holds.items():
            if hold.debit_account_id != account_id or hold.state in (
                _HOLD_PENDING,
                HoldState.EXPIRED,
            ):
                continue
            row = self._transfer(hold_id)
            if row is None:  # rows the cache's view does not have: the journal is read next
                continue
            if hold.state == HoldState.POSTED:
                out.append((row.ts_us, 0, hold.amount - hold.resolved_amount))
            else:
                out.append((row.ts_us, 1, hold.amount))
        return out

    def _window_wait_us(
        self, account_id: str, since_us: int, window_s: int, calls: int, amount: int,
        used: tuple[int, int],
    ) -> int:  # fmt: skip
        """Microseconds until ``calls`` rows and ``amount`` units have left the window.
        The journal's rows leave first (oldest first); this batch's own, taken now, leave
        a whole window from now."""
        used_calls, used_amount = used
        if calls <= used_calls and amount <= used_amount:
            release_us = self.loader.window_release_us(
                account_id, since_us, calls=calls, amount=amount
            )
            if release_us is not None:
                return release_us + window_s * 1_000_000 - self.now_us
        return window_s * 1_000_000

    def _record(self, spec: TransferSpec, debit_id: str, credit_id: str, amount: int) -> Transfer:
        transfer = Transfer(spec.id, debit_id, credit_id, amount, spec.code,
                            spec.flags & ~_LINKED, spec.pending_id, spec.timeout_s,
                            spec.metadata, self.now_us)  # fmt: skip
        if self._undo is not None:
            self._remember(self.transfers, spec.id)
        self.transfers[spec.id] = transfer
        self.writes.new_transfers.append(transfer)
        return transfer

    def _pending_hold(self, spec: TransferSpec) -> Hold:
        assert spec.pending_id is not None
        hold = self._hold(spec.pending_id)
        if hold is None:
            raise errors.HoldNotFound(
                f"hold {spec.pending_id!r} does not exist", param="pending_id"
            )
        for given, actual, name in (
            (spec.debit_account_id, hold.debit_account_id, "debit_account_id"),
            (spec.credit_account_id, hold.credit_account_id, "credit_account_id"),
        ):
            if given and given != actual:
                raise errors.InvalidTransfer(f"{name} does not match the hold's", param=name)
        return hold

    def _resolve(self, spec: TransferSpec) -> Transfer:
        hold = self._pending_hold(spec)
        if hold.state != _HOLD_PENDING:
            raise _resolved_error(hold)
        if hold.expires_us is not None and hold.expires_us <= self.now_us:
            if self._undo is None:
                self._expire(hold.id, True)
            else:
                self._due_expiries.append(hold.id)
            raise errors.HoldExpired(f"hold {hold.id!r} expired before it was resolved")
        post = bool(spec.flags & _POST)
        amount = (hold.amount if spec.amount is None else spec.amount) if post else hold.amount
        if amount > hold.amount:
            raise errors.AmountExceedsHold(
                f"cannot post {amount}: the hold reserved {hold.amount}", param="amount"
            )
        self._release(hold, amount if post else 0, spec.id,
                      HoldState.POSTED if post else HoldState.VOIDED)  # fmt: skip
        return self._record(spec, hold.debit_account_id, hold.credit_account_id, amount)

    def _release(self, hold: Hold, posted: int, by: str, state: HoldState) -> None:
        debit = self._account(hold.debit_account_id)
        credit = self._account(hold.credit_account_id)
        if debit is None or credit is None:  # pragma: no cover - rows are never deleted
            raise errors.InvariantViolation(f"hold {hold.id!r} names a missing account")
        if (debit.debits_posted + posted > AMOUNT_ATOMIC_MAX
                or credit.credits_posted + posted > AMOUNT_ATOMIC_MAX):  # fmt: skip
            # checked before anything changes: this transfer fails alone, not its batch
            raise errors.InvalidTransfer("the transfer would overflow an account counter")
        d = self._touch_account(debit)
        d.debits_pending -= hold.amount
        d.debits_posted += posted
        c = self._touch_account(credit)
        c.credits_pending -= hold.amount
        c.credits_posted += posted
        if d.debits_pending < 0 or c.credits_pending < 0:
            raise errors.InvariantViolation(f"hold {hold.id!r} released more than was pending")
        h = self._touch_hold(hold)
        h.state = state
        h.resolved_amount = posted
        h.resolved_by = by

    def _expire(self, hold_id: str, known_due: bool) -> int:
        """Expire a due hold; returns 1 if it expired now, 0 if it was not due or resolved."""
        hold = self._hold(hold_id)
        if hold is None or hold.state != HoldState.PENDING:
            return 0
        if not known_due and (hold.expires_us is None or hold.expires_us > self.now_us):
            return 0
        expiry_id = f"{hold.id}{DERIVED_SEP}expired"
        self._release(hold, 0, expiry_id, HoldState.EXPIRED)
        spec = TransferSpec(id=expiry_id, code="hold_expired", amount=hold.amount,
                            flags=_EXPIRE, pending_id=hold.id)  # fmt: skip
        self._record(spec, hold.debit_account_id, hold.credit_account_id, hold.amount)
        return 1

    def _replay(self, spec: TransferSpec, existing: Transfer) -> Transfer:
        """Same id: the same fields return the original transfer; anything else conflicts."""
        debit_id, credit_id, amount = spec.debit_account_id, spec.credit_account_id, spec.amount
        hold: Hold | None = None
        if spec.flags & (_POST | _VOID):
            hold = self._pending_hold(spec)
            debit_id, credit_id = hold.debit_account_id, hold.credit_account_id
            if spec.flags & _VOID or amount is None:
                amount = hold.amount
        asked = (debit_id, credit_id, amount, spec.code, spec.flags & ~_LINKED, spec.pending_id,
                 spec.timeout_s, spec.metadata)  # fmt: skip
        if asked != existing.fingerprint():
            # the ledger chose this id (``<hold>~post``): the caller is capturing twice
            if hold is not None and hold.state != HoldState.PENDING and DERIVED_SEP in spec.id:
                raise _resolved_error(hold)
            raise errors.IdempotencyConflict(
                f"transfer id {spec.id!r} was already used with different fields", param="id"
            )
        if not existing.seq:
            # created by this very batch (its seq comes when it is written): the same
            # record, not a replay of an earlier one
            return existing
        if self.ours and (existing.id, existing.ts_us) in self.ours:
            # written by this very operation, in an attempt whose commit was lost
            # (``Attempts``): this call moved the money, so it is no replay
            return existing.copy()
        return _as_replay(existing)


def _as_replay(existing: Transfer) -> Transfer:
    """What a create answers for a transfer written by an earlier batch: a copy marked
    ``replayed`` (nothing moved this time); the record itself stays as loaded."""
    replay = existing.copy()
    replay.replayed = True
    return replay


def _resolved_error(hold: Hold) -> errors.DripError:
    if hold.state == HoldState.EXPIRED:
        return errors.HoldExpired(f"hold {hold.id!r} expired before it was resolved")
    how = "posted" if hold.state == HoldState.POSTED else "voided"
    return errors.HoldAlreadyResolved(f"hold {hold.id!r} was already {how}", param="pending_id")
