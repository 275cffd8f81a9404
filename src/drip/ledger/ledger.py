"""The ledger's public API: accounts, transfers, holds, charges, balances, history.

Every method that writes builds one operation, submits it to the store's group
committer, and turns the engine's result into a return value or a raised error. The
async :class:`Ledger` and the blocking :class:`SyncLedger` share that code; only the
submit call differs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeGuard, TypeVar
from urllib.parse import parse_qs, urlsplit

from drip import errors
from drip.ledger.batching import release_orphan
from drip.ledger.engine import (
    CreateAccounts,
    CreateTransfers,
    Op,
    Result,
    SetAccountStatus,
)
from drip.ledger.store import Store, wall_clock_us
from drip.ledger.types import (
    DERIVED_SEP,
    PAGE_LIMIT_MAX,
    Account,
    AccountFlags,
    AccountKind,
    AccountSpec,
    Balance,
    Hold,
    HoldState,
    InvariantReport,
    Page,
    Transfer,
    TransferFlags,
    TransferSpec,
    UsageRow,
    WindowLimit,
    check_code,
    check_id,
    check_text,
    encode_metadata,
)
from drip.money import USDC, Asset, check_atomic

T = TypeVar("T")

#: Basis points in one whole: a fee rate of 250 bps is 2.5%.
BPS_ONE = 10_000
#: Pause before a failed read decorating a replay is tried again.
_REREAD_PAUSE_S = 0.05


def fee_account_id(asset: str) -> str:
    """Where the platform's fees in ``asset`` accumulate."""
    return f"fee:{asset}"


FEE_ACCOUNT_ID = fee_account_id("USDC")

_PENDING = int(TransferFlags.PENDING)
_POST = int(TransferFlags.POST_PENDING)
_VOID = int(TransferFlags.VOID_PENDING)
_LINKED = int(TransferFlags.LINKED)
_ALL_FLAGS = int(
    AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS | AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS
)


def funding_account_id(asset: str) -> str:
    """The ledger's counterparty for money entering or leaving (top-ups, withdrawals)."""
    return f"funding:{asset}"


@dataclass(frozen=True, slots=True)
class Charge:
    """A captured charge: the transfer that moved the money and the platform's cut of it."""

    transfer: Transfer
    fee: Transfer | None

    @property
    def id(self) -> str:
        return self.transfer.id

    @property
    def amount(self) -> int:
        return self.transfer.amount

    @property
    def replayed(self) -> bool:
        """Whether this answers an id used before (nothing moved this time)."""
        return self.transfer.replayed


# A plan is one operation and how to read its results; both twins drive the same plans.
Plan = tuple[Op, Callable[[list[Result]], Any]]


def _submit(
    specs: tuple[TransferSpec, ...], read: Callable[[list[Result]], Any], private: bool = False
) -> Plan:
    """Validate in the caller's context: a malformed transfer raises here and never
    reaches (or disturbs) the batch it would have shared with other callers."""
    for spec in specs:
        spec.validate()
    return CreateTransfers(specs, private), read


def _raise_first(results: list[Result]) -> list[Any]:
    """Raise the most telling error of a linked chain, else return the records."""
    if len(results) == 1:  # the common case, without building lists
        if isinstance(results[0], errors.DripError):
            raise results[0]
        return results
    failures = [r for r in results if isinstance(r, errors.DripError)]
    if failures:
        telling = [f for f in failures if not isinstance(f, errors.LinkedEventFailed)]
        raise (telling or failures)[0]
    return results


def _one(results: list[Result]) -> Any:
    return _raise_first(results)[0]


def _charge(results: list[Result]) -> Charge:
    return Charge(_raise_first(results)[0], None)


def _charge_with_fee(results: list[Result]) -> Charge:
    records = _raise_first(results)
    return Charge(records[0], records[-1])


#: A companion hold taken in the same linked chain as a charge's hold: (debit, credit)
#: accounts, e.g. a session's budget. It holds, posts and voids with the main hold.
class Cap(NamedTuple):
    debit: str
    credit: str
    #: rolling windows checked on ``debit`` when the cap is held or charged
    limits: tuple[WindowLimit, ...] = ()


def _as_caps(caps: Sequence[Any]) -> list[Cap]:
    """Caps as ``Cap``s (callers may pass plain ``(debit, credit)`` tuples)."""
    return [c if type(c) is Cap else Cap(*c) for c in caps]


def _cap_id(hold_id: str, index: int) -> str:
    return f"{hold_id}{DERIVED_SEP}cap{index}"


def _link(specs: list[TransferSpec]) -> tuple[TransferSpec, ...]:
    """Chain the specs all-or-nothing: every one but the last is LINKED."""
    for spec in specs[:-1]:
        spec.flags |= _LINKED
    return tuple(specs)


def _caller_id(value: object, param: str = "id") -> None:
    """Refuse ids in the ledger's own ``~`` namespace; the engine checks the rest."""
    if not isinstance(value, str) or DERIVED_SEP in value:
        check_id(value, param, caller=True)


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not text.startswith("s") or not text[1:].isdigit() or len(text) > 19:
            raise ValueError(text)
        return int(text[1:])
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise errors.InvalidRequest("cursor is not one this ledger issued", param="cursor") from exc


class _Plans:
    """Builds operations and reads results; shared by the async and the sync ledger."""

    def __init__(self, store: Store, *, asset: Asset, fee_bps: int) -> None:
        if not isinstance(fee_bps, int) or not 0 <= fee_bps < BPS_ONE:
            raise errors.ConfigError(f"fee_bps must be an int in 0..{BPS_ONE - 1}")
        self.store = store
        self.asset = asset
        self.fee_bps = fee_bps

    def fee_of(self, amount: int) -> int:
        """The platform's cut of a charge, rounded down (the provider keeps the remainder)."""
        return amount * self.fee_bps // BPS_ONE

    # --- plans ------------------------------------------------------------------------

    def create_account(
        self,
        account_id: str,
        kind: str,
        *,
        flags: int | None = None,
        owner: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Plan:
        check_id(account_id, "account_id", caller=True)
        try:
            kind = AccountKind(kind).value
        except ValueError:
            raise errors.InvalidRequest(
                f"kind must be one of {[k.value for k in AccountKind]}", param="kind"
            ) from None
        if flags is None:
            flags = (
                AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS
                if kind in (AccountKind.WALLET, AccountKind.SESSION, AccountKind.ESCROW)
                else AccountFlags.NONE
            )
        if not isinstance(flags, int) or isinstance(flags, bool) or not 0 <= flags <= _ALL_FLAGS:
            raise errors.InvalidRequest("flags must be AccountFlags", param="flags")
        if owner is not None:
            check_text(owner, "owner")  # no NUL: it would fail the batch it rides in
        spec = AccountSpec(account_id, kind, self.asset.symbol, int(flags), owner,
                           encode_metadata(metadata))  # fmt: skip
        return CreateAccounts((spec,)), _one

    def system_accounts(self) -> Plan:
        specs = (
            AccountSpec(funding_account_id(self.asset.symbol), AccountKind.FUNDING.value,
                        self.asset.symbol),
            AccountSpec(fee_account_id(self.asset.symbol), AccountKind.FEE.value,
                        self.asset.symbol),
        )  # fmt: skip
        return CreateAccounts(specs), _raise_first

    def transfers(self, specs: Sequence[TransferSpec]) -> Plan:
        """Raw transfers; returns one result per spec (a Transfer or an error instance).

        A malformed spec gets its error here and is never submitted; the rest of its
        linked chain gets ``LinkedEventFailed``; every other transfer goes ahead.
        """
        specs = tuple(specs)
        refused: dict[int, errors.DripError] = {}
        for index, spec in enumerate(specs):
            try:
                _caller_id(spec.id)
                spec.validate()
            except errors.DripError as exc:
                refused[index] = exc
        if not refused:
            return CreateTransfers(specs), list
        chains: list[list[int]] = [[]]
        for index, spec in enumerate(specs):
            chains[-1].append(index)
            if not (isinstance(spec.flags, int) and spec.flags & _LINKED):
                chains.append([])
        failed = {i for chain in chains if refused.keys() & set(chain) for i in chain}
        kept = [i for i in range(len(specs)) if i not in failed]

        def read(results: list[Result]) -> list[Result]:
            merged: list[Result] = []
            by_index = dict(zip(kept, results, strict=True))
            linked = errors.LinkedEventFailed("another transfer in this linked chain failed")
            for i in range(len(specs)):
                merged.append(by_index[i] if i in by_index else refused.get(i, linked))
            return merged

        return CreateTransfers(tuple(specs[i] for i in kept)), read

    def transfer(
        self,
        transfer_id: str,
        debit_account_id: str,
        credit_account_id: str,
        amount: int,
        *,
        code: str = "transfer",
        metadata: Mapping[str, Any] | None = None,
        resume: bool = False,
    ) -> Plan:
        """A posted transfer. ``resume``: if the credit account is frozen (a paused
        user), open it in the same transaction; only when the transfer is new (a top-up:
        a replay of it neither credits nor resumes anyone)."""
        _caller_id(transfer_id)
        spec = TransferSpec(transfer_id, debit_account_id, credit_account_id, amount,
                            check_code(code), 0, None, 0, encode_metadata(metadata),
                            resume_credit=resume)  # fmt: skip
        return _submit((spec,), _one)

    def charge(
        self,
        transfer_id: str,
        wallet_id: str,
        revenue_id: str,
        amount: int,
        *,
        code: str,
        metadata: Mapping[str, Any] | None = None,
        caps: Sequence[Cap] = (),
    ) -> Plan:
        """A one-step charge: wallet -> revenue (and each cap, all or nothing), then the
        platform fee out of revenue."""
        _caller_id(transfer_id)
        return self._charge(transfer_id, wallet_id, revenue_id, amount, code=code,
                            metadata=metadata, caps=caps)  # fmt: skip

    def charge_after_expiry(self, hold: Transfer, amount: int, *, caps: Sequence[Cap] = ()) -> Plan:
        """A call whose hold expired before its capture, charged afresh under the id its
        capture would have had (``<hold>~post``): a receipt announced for that capture
        exists, and capturing the hold again is refused as resolved. Only for a hold
        that did expire (a state that never changes again): on a live one it would
        charge beside the hold, and take the id its capture needs."""
        if check_atomic(amount) > hold.amount:  # it settles what was admitted, no more
            raise errors.AmountExceedsHold(
                f"cannot charge {amount} for a hold of {hold.amount}", param="amount"
            )
        return self._charge(
            f"{hold.id}{DERIVED_SEP}post", hold.debit_account_id, hold.credit_account_id,
            amount, code=hold.code, metadata={"expired_hold": hold.id}, caps=caps,
            settles=True,  # a paused wallet or a closed session: it was admitted
        )  # fmt: skip

    def with_earlier_fee(self, charge: Charge) -> Charge:
        """A replayed charge with the fee leg it was first written with (the plan had
        none: the fee rate is 0 now, and may not have been then).

        Only a replay is decorated (nothing moved in this call: the store answers what
        a call's own lost-then-found commit wrote as new, ``Store.attempts``). The read
        is tried once more if it fails (a connection the server dropped meanwhile);
        if it fails again, the caller hears ``StoreError``: answering without the fee
        leg would tell it the charge carried none, and trying again is safe (it is
        answered as the same replay)."""
        if not charge.replayed or charge.fee is not None:
            return charge
        fee_id = f"{charge.id}{DERIVED_SEP}fee"
        try:
            fee = self.store.get_transfer(fee_id)
        except errors.StoreError:
            time.sleep(_REREAD_PAUSE_S)
            fee = self.store.get_transfer(fee_id)
        if fee is None:
            return charge
        fee.replayed = True
        return Charge(charge.transfer, fee)

    def check_expired(self, hold: Transfer) -> None:
        """``charge_after_expiry``'s condition: the hold expired (a state that never
        changes again, so checking it before the batch is exact)."""
        state = self.store.get_hold(hold.id) if isinstance(hold, Transfer) else None
        if state is None or state.state != HoldState.EXPIRED:
            raise errors.InvalidRequest(
                f"hold {getattr(hold, 'id', hold)!r} has not expired: capture it instead",
                param="hold",
            )

    def _charge(
        self,
        transfer_id: str,
        wallet_id: str,
        revenue_id: str,
        amount: int,
        *,
        code: str,
        metadata: Mapping[str, Any] | None,
        caps: Sequence[Cap],
        settles: bool = False,
    ) -> Plan:
        check_atomic(amount, allow_zero=False)
        code = check_code(code)
        spec = TransferSpec(transfer_id, wallet_id, revenue_id, amount, code,
                            0, None, 0, encode_metadata(metadata), settles=settles)  # fmt: skip
        capped = [spec] + [TransferSpec(_cap_id(transfer_id, i), c.debit, c.credit, amount, code,
                                        limits=c.limits, settles=settles)
                           for i, c in enumerate(_as_caps(caps))]  # fmt: skip
        specs = self._with_fee(capped, revenue_id, self.fee_of(amount))
        return _submit(_link(specs), _charge_with_fee if len(specs) > len(capped) else _charge)

    def hold(
        self,
        hold_id: str,
        wallet_id: str,
        revenue_id: str,
        amount: int,
        *,
        code: str,
        timeout_s: int = 0,
        metadata: Mapping[str, Any] | None = None,
        caps: Sequence[Cap] = (),
        private: bool = False,
    ) -> Plan:
        """Reserve ``amount`` on the wallet, and on each cap account, all or nothing.

        ``private``: only this process will capture or void the hold (``@meter``, the
        ASGI middleware), and its id is not handed out before then. The store may then
        answer before the hold commits (SQLite keeps the transaction open for the
        capture to join): other processes see it a moment later, and a crash before
        then voids it, which is all a crash between hold and capture ever did."""
        if type(hold_id) is not str or DERIVED_SEP in hold_id:
            _caller_id(hold_id)
        meta = None if metadata is None else encode_metadata(metadata)
        spec = TransferSpec(hold_id, wallet_id, revenue_id, amount, code, _PENDING, None,
                            timeout_s, meta)  # fmt: skip
        if not caps:  # the metered call's common case: one spec, nothing to link
            return _submit((spec,), _one, private)
        specs = [spec] + [TransferSpec(_cap_id(hold_id, i), c.debit, c.credit, amount, code,
                                       _PENDING, None, timeout_s, limits=c.limits)
                          for i, c in enumerate(_as_caps(caps))]  # fmt: skip
        return _submit(_link(specs), _one, private)

    def post(
        self,
        hold: Transfer | Hold | str,
        amount: int | None = None,
        *,
        code: str | None = None,
        transfer_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        caps: Sequence[Cap] = (),
    ) -> Plan:
        """Capture ``amount`` (default: all) of a hold (and of its caps); the rest is
        released."""
        if type(hold) is Transfer and hold.flags & _PENDING:  # as hold() returned it
            held_id, debit_id, credit_id = hold.id, hold.debit_account_id, hold.credit_account_id
            held_amount, code = hold.amount, code or hold.code
        else:
            held = self._held(hold)
            held_id, debit_id, credit_id = held.id, held.debit_account_id, held.credit_account_id
            held_amount, code = held.amount, code or self._hold_code(hold)
        if transfer_id is None:
            post_id = f"{held_id}{DERIVED_SEP}post"
        else:
            _caller_id(transfer_id)
            post_id = transfer_id
        spec = TransferSpec(post_id, debit_id, credit_id, amount, code, _POST, held_id, 0,
                            None if metadata is None else encode_metadata(metadata))  # fmt: skip
        fee = self.fee_of(held_amount if amount is None else check_atomic(amount))
        if not (caps or fee):  # the metered call's common case: one spec, nothing to link
            return _submit((spec,), _charge)
        specs = [spec] + [
            TransferSpec(f"{_cap_id(held_id, i)}{DERIVED_SEP}post", c.debit, c.credit, amount,
                         code, _POST, _cap_id(held_id, i))
            for i, c in enumerate(_as_caps(caps))
        ]  # fmt: skip
        with_fee = self._with_fee(specs, credit_id, fee)
        return _submit(_link(with_fee), _charge_with_fee if fee else _charge)

    def void(
        self,
        hold: Transfer | Hold | str,
        *,
        transfer_id: str | None = None,
        caps: Sequence[Cap] = (),
    ) -> Plan:
        held = self._held(hold)
        if transfer_id is not None:
            _caller_id(transfer_id)
        void_id = f"{held.id}{DERIVED_SEP}void" if transfer_id is None else transfer_id
        code = self._hold_code(hold)
        specs = [TransferSpec(void_id, held.debit_account_id, held.credit_account_id, None,
                              code, _VOID, held.id)]  # fmt: skip
        specs += [TransferSpec(f"{_cap_id(held.id, i)}{DERIVED_SEP}void", c.debit, c.credit,
                               None, code, _VOID, _cap_id(held.id, i))
                  for i, c in enumerate(_as_caps(caps))]  # fmt: skip
        return _submit(_link(specs), _one)

    def set_status(self, account_id: str, status: str) -> Plan:
        check_id(account_id, "account_id")
        return SetAccountStatus(account_id, status), _one

    # --- helpers ----------------------------------------------------------------------

    def _with_fee(self, specs: list[TransferSpec], revenue_id: str, fee: int) -> list[TransferSpec]:
        """The specs, then the platform's ``fee`` out of revenue when there is one."""
        if not fee:
            return specs
        fee_spec = TransferSpec(f"{specs[0].id}{DERIVED_SEP}fee", revenue_id,
                                fee_account_id(self.asset.symbol), fee,
                                "platform_fee")  # fmt: skip
        return [*specs, fee_spec]

    def _held(self, hold: Transfer | Hold | str) -> Hold:
        if isinstance(hold, Hold):
            return hold
        if isinstance(hold, Transfer):
            if not hold.flags & TransferFlags.PENDING:
                raise errors.InvalidRequest("that transfer is not a hold", param="pending_id")
            return Hold(hold.id, hold.debit_account_id, hold.credit_account_id, hold.amount, None)
        check_id(hold, "pending_id")
        found = self.store.get_hold(hold)
        if found is None:
            raise errors.HoldNotFound(f"hold {hold!r} does not exist", param="pending_id")
        return found

    def _hold_code(self, hold: Transfer | Hold | str) -> str:
        if isinstance(hold, Transfer):
            return hold.code
        hold_id = hold.id if isinstance(hold, Hold) else hold
        original = self.store.get_transfer(hold_id)
        return original.code if original is not None else "hold"


class _Reads:
    """Reads shared by both twins; they go straight to the store (no batching needed)."""

    store: Store
    plans: _Plans

    def account(self, account_id: str) -> Account:
        account = self.store.get_account(account_id)
        if account is None:
            raise errors.AccountNotFound(f"account {account_id!r} does not exist")
        return account

    def balance(self, account_id: str) -> Balance:
        return self.account(account_id).balance

    def remembered_balance(self, account_id: str) -> Balance | None:
        """The balance as this process's own latest batch on the account left it (right
        after a capture: the balance that capture left), from memory. No I/O, so it
        never blocks an event loop; it does not see other processes' later writes.
        ``None`` when it is not remembered: ``balance()`` reads the database."""
        return self.store.remembered_balance(account_id)

    def get_transfer(self, transfer_id: str) -> Transfer | None:
        return self.store.get_transfer(transfer_id)

    def get_hold(self, hold_id: str) -> Hold | None:
        return self.store.get_hold(hold_id)

    def list_accounts(
        self, kind: str | None = None, *, after_id: str | None = None, limit: int = 100
    ) -> list[Account]:
        return self.store.list_accounts(kind, after_id, _limit(limit))

    def history(
        self,
        account_id: str | None = None,
        *,
        code: str | None = None,
        since_us: int | None = None,
        until_us: int | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page:
        """Transfers newest first, ``limit`` per page; pass ``next_cursor`` for the next.
        Pages of one account never skip a transfer; see docs/ledger.md for the ledger-wide
        history on PostgreSQL under concurrent writers."""
        limit = _limit(limit)
        since_us, until_us = _time_bound(since_us, "since_us"), _time_bound(until_us, "until_us")
        if code is not None:
            check_code(code, "event")
        if account_id is not None:
            check_id(account_id, "account_id")
        before = decode_cursor(cursor) if cursor else None
        rows = self.store.list_transfers(
            account_id=account_id, code=code, since_us=since_us, until_us=until_us,
            before_seq=before, limit=limit + 1,
        )  # fmt: skip
        more = len(rows) > limit
        rows = rows[:limit]
        return Page(rows, encode_cursor(rows[-1].seq) if more and rows else None)

    def usage(
        self,
        account_id: str | None = None,
        *,
        since_us: int | None = None,
        until_us: int | None = None,
        bucket_s: int = 3600,
        code: str | None = None,
    ) -> list[UsageRow]:
        if (not isinstance(bucket_s, int) or isinstance(bucket_s, bool)
                or not 0 < bucket_s <= BUCKET_S_MAX):  # fmt: skip
            raise errors.InvalidRequest(
                f"bucket_s must be an int in 1..{BUCKET_S_MAX}", param="bucket_s"
            )
        since_us, until_us = _time_bound(since_us, "since_us"), _time_bound(until_us, "until_us")
        if code is not None:
            check_code(code, "event")
        return self.store.usage(account_id=account_id, since_us=since_us, until_us=until_us,
                                bucket_s=bucket_s, code=code)  # fmt: skip

    def check_invariants(self) -> InvariantReport:
        """The store's checks, and that this ledger's system accounts exist (a read-only
        open does not create them)."""
        report = self.store.check_invariants()
        symbol = self.plans.asset.symbol
        missing = []
        for account_id, kind in ((funding_account_id(symbol), AccountKind.FUNDING),
                                 (fee_account_id(symbol), AccountKind.FEE)):  # fmt: skip
            account = self.store.get_account(account_id)
            if account is None or account.kind != kind or account.asset != symbol:
                missing.append(account_id)
        report.add(
            f"system accounts exist ({symbol})",
            not missing,
            f"{funding_account_id(symbol)}, {fee_account_id(symbol)}"
            if not missing
            else f"missing or not a {symbol} system account: {missing}",
        )
        return report

    def expire_holds(self) -> int:
        """Release every hold whose timeout has passed (also done every second in the
        background); returns how many expired."""
        total = 0
        while True:
            n = self.store.expire_due_holds()
            total += n
            if n == 0:
                return total


#: Latest timestamp a query may name (year ~148,000: beyond any real data, within INT64).
TS_US_MAX = 2**62
#: Widest usage bucket (its width in microseconds must fit a signed 64-bit integer).
BUCKET_S_MAX = 2**42


def _time_bound(value: int | None, param: str) -> int | None:
    if value is not None and (
        not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= TS_US_MAX
    ):
        raise errors.InvalidRequest(f"{param} must be microseconds in 0..2**62", param=param)
    return value


def _limit(limit: int) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= PAGE_LIMIT_MAX:
        raise errors.InvalidRequest(f"limit must be an int in 1..{PAGE_LIMIT_MAX}", param="limit")
    return limit


class Ledger(_Reads):
    """The async ledger. Open with :meth:`open` (or :func:`open_ledger`); close when done."""

    def __init__(self, store: Store, *, asset: Asset = USDC, fee_bps: int = 0) -> None:
        self.store = store
        self.plans = _Plans(store, asset=asset, fee_bps=fee_bps)
        self.sync = SyncLedger(self)

    @property
    def asset(self) -> Asset:
        return self.plans.asset

    async def _run(self, plan: Plan) -> Any:
        op, read = plan
        return read(await self.store.submit_async(op))

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, a blocking read of this ledger's database, made without
        blocking the event loop: in a worker thread when the store's reads are network
        round trips (PostgreSQL); right here when they are local (SQLite, microseconds)."""
        if self.store.remote_reads:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    def close(self) -> None:
        self.store.close()

    async def __aenter__(self) -> Ledger:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def create_account(self, account_id: str, kind: str, **kw: Any) -> Account:
        result: Account = await self._run(self.plans.create_account(account_id, kind, **kw))
        return result

    async def set_status(self, account_id: str, status: str) -> Account:
        result: Account = await self._run(self.plans.set_status(account_id, status))
        return result

    async def create_transfers(self, specs: Sequence[TransferSpec]) -> list[Transfer | Exception]:
        result: list[Transfer | Exception] = await self._run(self.plans.transfers(specs))
        return result

    async def transfer(self, transfer_id: str, debit: str, credit: str, amount: int,
                       **kw: Any) -> Transfer:  # fmt: skip
        result: Transfer = await self._run(
            self.plans.transfer(transfer_id, debit, credit, amount, **kw)
        )
        return result

    async def charge(self, transfer_id: str, wallet: str, revenue: str, amount: int,
                     **kw: Any) -> Charge:  # fmt: skip
        result: Charge = await self._run(
            self.plans.charge(transfer_id, wallet, revenue, amount, **kw)
        )
        if result.replayed and result.fee is None:
            return await self.off_loop(self.plans.with_earlier_fee, result)
        return result

    async def charge_after_expiry(self, hold: Transfer, amount: int, **kw: Any) -> Charge:
        await self.off_loop(self.plans.check_expired, hold)
        result: Charge = await self._run(self.plans.charge_after_expiry(hold, amount, **kw))
        if result.replayed and result.fee is None:
            return await self.off_loop(self.plans.with_earlier_fee, result)
        return result

    async def hold(self, hold_id: str, wallet: str, revenue: str, amount: int,
                   **kw: Any) -> Transfer:  # fmt: skip
        """As the plan says. A ``private`` hold's id is this caller's alone: if the caller
        is cancelled before its batch runs, the store drops it; if the batch was already
        under way, the store voids the hold once it lands (``batching.answer``)."""
        op, read = self.plans.hold(hold_id, wallet, revenue, amount, **kw)  # _run, inlined
        landing = self.store.submit_async(op)
        try:
            results = await landing
        except asyncio.CancelledError:
            if kw.get("private") and _answered(landing):
                # answered, but this task was cancelled before it could take the hold
                release_orphan(op, landing.result(), self.store.submit_async)
            raise
        result: Transfer = read(results)
        return result

    async def post(self, hold: Transfer | Hold | str, amount: int | None = None,
                   **kw: Any) -> Charge:  # fmt: skip
        op, read = self.plans.post(hold, amount, **kw)  # _run, inlined: the hot pair
        result: Charge = read(await self.store.submit_async(op))
        if result.transfer.replayed and result.fee is None:
            return await self.off_loop(self.plans.with_earlier_fee, result)
        return result

    async def void(self, hold: Transfer | Hold | str, **kw: Any) -> Transfer:
        result: Transfer = await self._run(self.plans.void(hold, **kw))
        return result


def _answered(future: object) -> TypeGuard[asyncio.Future[Any]]:
    return (isinstance(future, asyncio.Future) and future.done() and not future.cancelled()
            and future.exception() is None)  # fmt: skip


class SyncLedger(_Reads):
    """The same ledger for code without an event loop: each call blocks until committed."""

    def __init__(self, ledger: Ledger) -> None:
        self.store = ledger.store
        self.plans = ledger.plans

    def _run(self, plan: Plan) -> Any:
        op, read = plan
        return read(self.store.committer.submit(op))

    def create_account(self, account_id: str, kind: str, **kw: Any) -> Account:
        result: Account = self._run(self.plans.create_account(account_id, kind, **kw))
        return result

    def set_status(self, account_id: str, status: str) -> Account:
        result: Account = self._run(self.plans.set_status(account_id, status))
        return result

    def create_transfers(self, specs: Sequence[TransferSpec]) -> list[Transfer | Exception]:
        result: list[Transfer | Exception] = self._run(self.plans.transfers(specs))
        return result

    def transfer(self, transfer_id: str, debit: str, credit: str, amount: int,
                 **kw: Any) -> Transfer:  # fmt: skip
        result: Transfer = self._run(self.plans.transfer(transfer_id, debit, credit, amount, **kw))
        return result

    def charge(self, transfer_id: str, wallet: str, revenue: str, amount: int,
               **kw: Any) -> Charge:  # fmt: skip
        result: Charge = self._run(self.plans.charge(transfer_id, wallet, revenue, amount, **kw))
        return self.plans.with_earlier_fee(result) if result.replayed else result

    def charge_after_expiry(self, hold: Transfer, amount: int, **kw: Any) -> Charge:
        self.plans.check_expired(hold)
        result: Charge = self._run(self.plans.charge_after_expiry(hold, amount, **kw))
        return self.plans.with_earlier_fee(result) if result.replayed else result

    def hold(self, hold_id: str, wallet: str, revenue: str, amount: int, **kw: Any) -> Transfer:
        result: Transfer = self._run(self.plans.hold(hold_id, wallet, revenue, amount, **kw))
        return result

    def post(self, hold: Transfer | Hold | str, amount: int | None = None, **kw: Any) -> Charge:
        result: Charge = self._run(self.plans.post(hold, amount, **kw))
        return self.plans.with_earlier_fee(result) if result.replayed else result

    def void(self, hold: Transfer | Hold | str, **kw: Any) -> Transfer:
        result: Transfer = self._run(self.plans.void(hold, **kw))
        return result


def sqlite_path(url: str) -> str:
    """The path a ``sqlite:`` URL names: ``sqlite:///drip.db`` is ``drip.db`` (relative),
    ``sqlite:////tmp/drip.db`` is ``/tmp/drip.db``; query parameters are not part of it.
    A URL without ``//`` (``sqlite:drip.db``) is a ``ConfigError``."""
    rest = url.split(":", 1)[1] if ":" in url else ""
    if not rest.startswith("//"):
        raise errors.ConfigError(
            f"{url!r} is not a SQLite URL: use sqlite:///path (sqlite:///drip.db, or "
            "sqlite:////abs/path/drip.db for an absolute path)",
            param="database_url",
        )
    path = rest[2:].split("?", 1)[0]
    return path[1:] if path.startswith("/") else path


#: What a ``sqlite:`` URL may carry after ``?``.
_SQLITE_OPTIONS = ("synchronous",)


def _sqlite_options(query: str) -> dict[str, str]:
    """The options of a ``sqlite:`` URL; one not known, repeated or empty is refused
    (a misspelled ``?synchronus=full`` would otherwise run with the default)."""
    found = parse_qs(query, keep_blank_values=True)
    for name, values in found.items():
        if name not in _SQLITE_OPTIONS:
            raise errors.ConfigError(
                f"unknown SQLite URL option {name!r}: the options are "
                f"{', '.join(_SQLITE_OPTIONS)} (e.g. ?synchronous=full)", param="database_url",
            )  # fmt: skip
        if len(values) != 1 or not values[0]:
            raise errors.ConfigError(
                f"SQLite URL option {name!r} takes one value", param="database_url"
            )
    return {name: values[0] for name, values in found.items()}


def open_store(
    url: str, *, clock_us: Callable[[], int] = wall_clock_us, read_only: bool = False
) -> Store:
    """A started store for ``sqlite:///path.db`` or ``postgresql://user:pw@host/db``.

    ``read_only``: the database is neither created nor migrated (a schema older than
    this Drip's is a ``StoreError``), no writer threads start, and every write is refused.
    """
    parts = urlsplit(url)
    store: Store
    if parts.scheme == "sqlite":
        options = _sqlite_options(parts.query)
        path = sqlite_path(url)
        if not path or path == ":memory:":
            raise errors.ConfigError(
                "SQLite needs a file (sqlite:///drip.db); ':memory:' cannot be shared by the "
                "writer and reader connections"
            )
        from drip.ledger.sqlite import SqliteStore

        store = SqliteStore(path, synchronous=options.get("synchronous", "normal"),
                            clock_us=clock_us, read_only=read_only)  # fmt: skip
    elif parts.scheme in ("postgresql", "postgres"):
        from drip.ledger.postgres import PostgresStore

        store = PostgresStore(url, clock_us=clock_us)
    else:
        raise errors.ConfigError(
            f"unsupported database URL scheme {parts.scheme!r}: use sqlite:/// or postgresql://"
        )
    try:
        store.start(read_only=read_only)
    except BaseException:
        store.close()
        raise
    return store


def open_ledger(
    url: str,
    *,
    asset: Asset = USDC,
    fee_bps: int = 0,
    clock_us: Callable[[], int] = wall_clock_us,
    read_only: bool = False,
) -> Ledger:
    """Open (and migrate) the database at ``url`` and make sure the system accounts exist.

    ``read_only``: open it to read only, writing nothing (see ``open_store``): no
    migration, no system accounts created (``check_invariants`` reports one missing)."""
    store = open_store(url, clock_us=clock_us, read_only=read_only)
    try:
        ledger = Ledger(store, asset=asset, fee_bps=fee_bps)
        if not read_only:
            ledger.sync._run(ledger.plans.system_accounts())
    except BaseException:
        store.close()
        raise
    return ledger
