"""Random sequences of ledger operations against a small pure-Python model.

A Hypothesis state machine drives the blocking API (``ledger.sync``) with top-ups,
charges, transfers, holds, partial posts, voids, linked chains, freezes, replays of
earlier ids (same and conflicting fields) and clock advances with ``expire_holds()``.
After every step every account's counters and every hold's state must equal the
model's, and ``check_invariants()`` must pass. Runs on SQLite (a file per example) and
PostgreSQL (a schema per example).
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from conftest import _with_search_path, need_postgres
from drip import errors
from drip.ledger import (
    FEE_ACCOUNT_ID,
    HoldState,
    Ledger,
    SyncLedger,
    TransferFlags,
    TransferSpec,
    funding_account_id,
    open_ledger,
)

FUND = funding_account_id("USDC")
WALLETS = ("w0", "w1", "w2")
REVENUES = ("r0", "r1")
ACCOUNTS = (FUND, FEE_ACCOUNT_ID, *WALLETS, *REVENUES)
CODES = ("search", "llm")
FEE_BPS = 250
T0 = 1_700_000_000_000_000
S = 1_000_000

amounts = st.integers(min_value=1, max_value=3_000)


def fee_of(amount: int) -> int:
    return amount * FEE_BPS // 10_000


@dataclass
class ModelHold:
    wallet: str
    revenue: str
    amount: int
    code: str
    expires_us: int | None
    state: HoldState = HoldState.PENDING
    resolved_amount: int = 0


@dataclass
class Done:
    """A call that succeeded, to replay later: the method, its arguments, its id."""

    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    transfer_id: str


@dataclass
class Model:
    # account -> [debits_posted, credits_posted, debits_pending, credits_pending]
    counters: dict[str, list[int]] = field(
        default_factory=lambda: {a: [0, 0, 0, 0] for a in ACCOUNTS}
    )
    frozen: set[str] = field(default_factory=set)
    holds: dict[str, ModelHold] = field(default_factory=dict)
    done: list[Done] = field(default_factory=list)

    def available(self, account: str) -> int:
        dp, cp, dpe, _ = self.counters[account]
        return cp - dp - dpe

    def refusal(self, debit: str, amount: int) -> type[errors.DripError] | None:
        """Why a debit of ``amount`` from ``debit`` would be refused, if it would."""
        if debit in self.frozen:
            return errors.AccountFrozen
        if debit in WALLETS and amount > self.available(debit):
            return errors.DripInsufficientCredits
        return None

    def move(self, debit: str, credit: str, amount: int) -> None:
        self.counters[debit][0] += amount
        self.counters[credit][1] += amount

    def reserve(self, debit: str, credit: str, amount: int) -> None:
        self.counters[debit][2] += amount
        self.counters[credit][3] += amount

    def release(self, hold: ModelHold) -> None:
        self.counters[hold.wallet][2] -= hold.amount
        self.counters[hold.revenue][3] -= hold.amount


class LedgerMachine(RuleBasedStateMachine):
    """Subclassed per store with ``new_database`` (returns a URL and a cleanup)."""

    @staticmethod
    def new_database() -> tuple[str, Callable[[], None]]:
        raise NotImplementedError

    def __init__(self) -> None:
        super().__init__()
        self.url, self._cleanup = self.new_database()
        self.now_us = T0
        self.ledger: Ledger = open_ledger(self.url, fee_bps=FEE_BPS, clock_us=lambda: self.now_us)
        self.api: SyncLedger = self.ledger.sync
        self.model = Model()
        self.serial = 0

    def teardown(self) -> None:
        try:
            self.ledger.close()
        finally:
            self._cleanup()

    def new_id(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial}"

    def expect(self, error: type[errors.DripError] | None, call: Callable[[], Any]) -> Any:
        """Run ``call``; it must raise exactly ``error`` (or succeed when None)."""
        if error is None:
            return call()
        try:
            result = call()
        except errors.DripError as exc:
            assert type(exc) is error, f"expected {error.__name__}, got {exc!r}"
            return None
        raise AssertionError(f"expected {error.__name__}, got {result!r}")

    # --- setup --------------------------------------------------------------------------

    @initialize()
    def accounts(self) -> None:
        for w in WALLETS:
            self.api.create_account(w, "wallet")
        for r in REVENUES:
            self.api.create_account(r, "revenue")
        for w in WALLETS:
            self.topup(w, 10_000)

    # --- money in and out -------------------------------------------------------------------

    @rule(wallet=st.sampled_from(WALLETS), amount=st.integers(1, 10_000))
    def topup(self, wallet: str, amount: int) -> None:
        tid = self.new_id("top")
        args = (tid, FUND, wallet, amount)
        t = self.api.transfer(*args, code="topup")
        assert (t.id, t.amount) == (tid, amount)
        self.model.move(FUND, wallet, amount)
        self.model.done.append(Done("transfer", args, {"code": "topup"}, tid))

    @rule(
        wallet=st.sampled_from(WALLETS),
        revenue=st.sampled_from(REVENUES),
        amount=amounts,
        code=st.sampled_from(CODES),
    )
    def charge(self, wallet: str, revenue: str, amount: int, code: str) -> None:
        tid = self.new_id("chg")
        args = (tid, wallet, revenue, amount)
        error = self.model.refusal(wallet, amount)
        charge = self.expect(error, lambda: self.api.charge(*args, code=code))
        if error is None:
            assert charge.amount == amount
            fee = fee_of(amount)
            assert (charge.fee.amount if charge.fee else 0) == fee
            self.model.move(wallet, revenue, amount)
            self.model.move(revenue, FEE_ACCOUNT_ID, fee)
            self.model.done.append(Done("charge", args, {"code": code}, tid))

    @rule(
        debit=st.sampled_from(WALLETS),
        credit=st.sampled_from(WALLETS + REVENUES),
        amount=amounts,
    )
    def transfer(self, debit: str, credit: str, amount: int) -> None:
        tid = self.new_id("xfer")
        args = (tid, debit, credit, amount)
        if debit == credit:
            error: type[errors.DripError] | None = errors.InvalidTransfer
        else:
            error = self.model.refusal(debit, amount)
        self.expect(error, lambda: self.api.transfer(*args, code="move"))
        if error is None:
            self.model.move(debit, credit, amount)
            self.model.done.append(Done("transfer", args, {"code": "move"}, tid))

    @rule(
        wallet=st.sampled_from(WALLETS),
        revenue=st.sampled_from(REVENUES),
        first=amounts,
        second=amounts,
    )
    def linked_chain(self, wallet: str, revenue: str, first: int, second: int) -> None:
        """Two charges out of one wallet that commit together or not at all."""
        a, b = self.new_id("ca"), self.new_id("cb")
        results = self.api.create_transfers(
            [
                TransferSpec(a, wallet, revenue, first, code="search", flags=TransferFlags.LINKED),
                TransferSpec(b, wallet, revenue, second, code="search"),
            ]
        )
        error = self.model.refusal(wallet, first) or self.model.refusal(wallet, first + second)
        if error is None:
            assert [r.id for r in results] == [a, b]
            self.model.move(wallet, revenue, first + second)
        else:
            assert all(isinstance(r, errors.DripError) for r in results), results
            assert any(type(r) is error for r in results), results
            assert any(type(r) is errors.LinkedEventFailed for r in results), results

    # --- holds --------------------------------------------------------------------------------

    @rule(
        wallet=st.sampled_from(WALLETS),
        revenue=st.sampled_from(REVENUES),
        amount=amounts,
        code=st.sampled_from(CODES),
        timeout_s=st.sampled_from([0, 0, 1, 3, 10]),
    )
    def hold(self, wallet: str, revenue: str, amount: int, code: str, timeout_s: int) -> None:
        hid = self.new_id("hold")
        args = (hid, wallet, revenue, amount)
        kwargs = {"code": code, "timeout_s": timeout_s}
        error = self.model.refusal(wallet, amount)
        h = self.expect(error, lambda: self.api.hold(*args, **kwargs))
        if error is None:
            assert (h.id, h.amount, h.flags) == (hid, amount, TransferFlags.PENDING)
            self.model.reserve(wallet, revenue, amount)
            expires = self.now_us + timeout_s * S if timeout_s else None
            self.model.holds[hid] = ModelHold(wallet, revenue, amount, code, expires)
            self.model.done.append(Done("hold", args, kwargs, hid))

    def _resolution_error(self, hold: ModelHold, amount: int) -> type[errors.DripError] | None:
        if hold.state == HoldState.EXPIRED:
            return errors.HoldExpired
        if hold.state != HoldState.PENDING:
            return errors.HoldAlreadyResolved
        if amount > hold.amount:
            return errors.AmountExceedsHold
        return None

    @precondition(lambda self: self.model.holds)
    @rule(data=st.data(), how=st.sampled_from(["all", "part", "part", "over"]))
    def post(self, data: st.DataObject, how: str) -> None:
        hid = data.draw(st.sampled_from(sorted(self.model.holds)), label="hold")
        hold = self.model.holds[hid]
        if hold.wallet in self.model.frozen:
            return  # posting a frozen wallet's hold is outside this model
        amount: int | None
        if how == "all":
            amount = None
        elif how == "part":
            amount = data.draw(st.integers(0, hold.amount), label="amount")
        else:
            amount = hold.amount + data.draw(st.integers(1, 10), label="excess")
        tid = self.new_id("post")
        kwargs = {"transfer_id": tid}
        posted = hold.amount if amount is None else amount
        error = self._resolution_error(hold, posted)
        charge = self.expect(error, lambda: self.api.post(hid, amount, **kwargs))
        if error is None:
            assert (charge.id, charge.amount) == (tid, posted)
            assert charge.transfer.code == hold.code
            self.model.release(hold)
            self.model.move(hold.wallet, hold.revenue, posted)
            self.model.move(hold.revenue, FEE_ACCOUNT_ID, fee_of(posted))
            hold.state, hold.resolved_amount = HoldState.POSTED, posted
            self.model.done.append(Done("post", (hid, amount), kwargs, tid))

    @precondition(lambda self: self.model.holds)
    @rule(data=st.data())
    def void(self, data: st.DataObject) -> None:
        hid = data.draw(st.sampled_from(sorted(self.model.holds)), label="hold")
        hold = self.model.holds[hid]
        if hold.wallet in self.model.frozen:
            return
        tid = self.new_id("void")
        kwargs = {"transfer_id": tid}
        error = self._resolution_error(hold, 0)
        v = self.expect(error, lambda: self.api.void(hid, **kwargs))
        if error is None:
            assert (v.id, v.amount, v.pending_id) == (tid, hold.amount, hid)
            self.model.release(hold)
            hold.state = HoldState.VOIDED
            self.model.done.append(Done("void", (hid,), kwargs, tid))

    @rule()
    def resolve_unknown_hold(self) -> None:
        self.expect(errors.HoldNotFound, lambda: self.api.post("no-such-hold", 1))
        self.expect(errors.HoldNotFound, lambda: self.api.void("no-such-hold"))

    @rule(seconds=st.integers(1, 6))
    def advance_clock(self, seconds: int) -> None:
        self.now_us += seconds * S
        due = [
            h
            for h in self.model.holds.values()
            if h.state == HoldState.PENDING and h.expires_us is not None
            and h.expires_us <= self.now_us
        ]  # fmt: skip
        expired = self.api.expire_holds()
        # the ledger's own background sweep (once a second) may have taken some first
        assert expired <= len(due)
        assert self.api.expire_holds() == 0
        for h in due:
            self.model.release(h)
            h.state = HoldState.EXPIRED

    # --- accounts --------------------------------------------------------------------------

    @rule(wallet=st.sampled_from(WALLETS))
    def toggle_freeze(self, wallet: str) -> None:
        if wallet in self.model.frozen:
            self.api.set_status(wallet, "open")
            self.model.frozen.discard(wallet)
        else:
            self.api.set_status(wallet, "frozen")
            self.model.frozen.add(wallet)

    # --- replays ----------------------------------------------------------------------------

    def _call(self, done: Done, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        result = getattr(self.api, done.method)(*args, **kwargs)
        return str(result.id)

    @precondition(lambda self: self.model.done)
    @rule(data=st.data())
    def replay_same(self, data: st.DataObject) -> None:
        """The same id with the same fields returns the original; nothing moves."""
        done = data.draw(st.sampled_from(self.model.done), label="replay")
        assert self._call(done, done.args, done.kwargs) == done.transfer_id
        stored = self.api.get_transfer(done.transfer_id)
        assert stored is not None

    @precondition(lambda self: self.model.done)
    @rule(data=st.data())
    def replay_conflicting(self, data: st.DataObject) -> None:
        """The same id with different fields is refused; nothing moves."""
        done = data.draw(st.sampled_from(self.model.done), label="replay")
        args, kwargs = list(done.args), dict(done.kwargs)
        if done.method in ("transfer", "charge", "hold"):
            args[3] += data.draw(st.integers(1, 5), label="delta")
        elif done.method == "post":
            hold = self.model.holds[done.args[0]]
            posted = hold.amount if args[1] is None else args[1]
            args[1] = posted + 1 if posted < hold.amount else posted - 1
        else:  # a void's fields all come from its hold: reuse its id for a post instead
            self.expect(
                errors.IdempotencyConflict,
                lambda: self.api.post(done.args[0], 0, transfer_id=done.transfer_id),
            )
            return
        self.expect(errors.IdempotencyConflict, lambda: self._call(done, tuple(args), kwargs))
        # and a plain transfer under any used id conflicts too
        self.expect(
            errors.IdempotencyConflict,
            lambda: self.api.transfer(done.transfer_id, FUND, "w0", 1, code="conflict"),
        )

    # --- checks after every step ---------------------------------------------------------------

    @invariant()
    def balances_match_the_model(self) -> None:
        for account_id in ACCOUNTS:
            a = self.api.account(account_id)
            counters = [a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending]
            assert counters == self.model.counters[account_id], account_id
            assert a.status == ("frozen" if account_id in self.model.frozen else "open")
            if account_id in WALLETS:
                b = self.api.balance(account_id)
                dp, cp, dpe, _ = counters
                assert (b.posted, b.pending, b.available) == (cp - dp, dpe, cp - dp - dpe)
                assert b.available >= 0

    @invariant()
    def holds_match_the_model(self) -> None:
        for hid, expected in self.model.holds.items():
            h = self.api.get_hold(hid)
            assert h is not None
            assert (h.state, h.amount, h.expires_us) == (
                expected.state,
                expected.amount,
                expected.expires_us,
            ), hid
            if expected.state == HoldState.POSTED:
                assert h.resolved_amount == expected.resolved_amount

    @invariant()
    def invariants_hold(self) -> None:
        report = self.api.check_invariants()
        assert report.ok, report.checks


def _sqlite_database(root: str) -> Callable[[], tuple[str, Callable[[], None]]]:
    def new() -> tuple[str, Callable[[], None]]:
        directory = tempfile.mkdtemp(dir=root)
        return f"sqlite:///{directory}/drip.db", lambda: None

    return new


def _postgres_database(dsn: str) -> Callable[[], tuple[str, Callable[[], None]]]:
    import psycopg

    def new() -> tuple[str, Callable[[], None]]:
        schema = f"sm_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}".encode())

        def drop() -> None:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE".encode())

        return _with_search_path(dsn, schema), drop

    return new


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_ledger_matches_model(store: str, tmp_path: Any) -> None:
    if store == "postgres":
        new_database = _postgres_database(need_postgres())
    else:
        new_database = _sqlite_database(str(tmp_path))
    machine = type(
        f"LedgerMachine_{store}",
        (LedgerMachine,),
        {"new_database": staticmethod(new_database)},
    )
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=50,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            database=None,
        ),
    )
