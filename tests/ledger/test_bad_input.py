"""Bad input is refused with the right error, and refusing it writes nothing.

Every case runs on both stores against a ledger holding one funded wallet, one open
hold and one posted charge; afterwards every account counter, the journal and every
hold must be exactly as before, and the invariants must hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import pytest

from drip.errors import (
    AccountNotFound,
    DripError,
    DripInsufficientCredits,
    HoldNotFound,
    InvalidAmount,
    InvalidId,
    InvalidRequest,
    InvalidTransfer,
)
from drip.ledger import Charge, Ledger, Transfer, TransferFlags, TransferSpec, funding_account_id
from drip.money import AMOUNT_ATOMIC_MAX, parse_amount

FUND = funding_account_id("USDC")
W, R = "user:a", "rev:p"
FUNDS = 1_000_000

Case = Callable[[Ledger], Awaitable[Any]]


def all_history(led: Ledger) -> list[Transfer]:
    items: list[Transfer] = []
    cursor = None
    while True:
        page = led.history(None, cursor=cursor, limit=1000)
        items.extend(page.items)
        if page.next_cursor is None:
            return items
        cursor = page.next_cursor


def snapshot(led: Ledger) -> tuple[object, ...]:
    accounts = {
        a.id: (
            a.kind,
            a.flags,
            a.status,
            a.debits_posted,
            a.credits_posted,
            a.debits_pending,
            a.credits_pending,
        )
        for a in led.list_accounts(limit=1000)
    }
    journal = [
        (t.id, t.debit_account_id, t.credit_account_id, t.amount, t.flags) for t in all_history(led)
    ]
    holds = {t.id: led.get_hold(t.id) for t in all_history(led) if t.flags & TransferFlags.PENDING}
    return accounts, journal, holds


@pytest.fixture
async def led(ledger: Ledger) -> Ledger:
    """conftest's ledger (each store) with a funded wallet, an open hold and a charge."""
    await ledger.create_account(W, "wallet")
    await ledger.create_account(R, "revenue")
    await ledger.transfer("topup", FUND, W, FUNDS, code="topup")
    await ledger.hold("open-hold", W, R, 100_000, code="llm")
    await ledger.charge("charged", W, R, 1_000, code="search")
    return ledger


def parsed(text: object) -> Case:
    """A top-up whose amount comes from a human string: parse_amount refuses it first."""
    return lambda led: led.transfer("t-new", FUND, W, parse_amount(text), code="topup")


def atomic(amount: object, how: str = "transfer") -> Case:
    def case(led: Ledger) -> Awaitable[Any]:
        if how == "transfer":
            return led.transfer("t-new", W, R, amount)
        if how == "charge":
            return led.charge("t-new", W, R, amount, code="search")
        if how == "hold":
            return led.hold("t-new", W, R, amount, code="llm")
        return led.post("open-hold", amount)

    return case


def bad_id(value: object, where: str) -> Case:
    def case(led: Ledger) -> Awaitable[Any]:
        if where == "transfer":
            return led.transfer(value, W, R, 1)
        if where == "hold":
            return led.hold(value, W, R, 1, code="llm")
        if where == "charge":
            return led.charge(value, W, R, 1, code="search")
        if where == "account":
            return led.create_account(value, "wallet")
        if where == "debit":
            return led.transfer("t-new", value, R, 1)
        if where == "post":
            return led.post(value)
        if where == "post_transfer_id":
            return led.post("open-hold", 10, transfer_id=value)
        return led.void("open-hold", transfer_id=value)

    return case


def spec(s: TransferSpec) -> Case:
    """create_transfers reports errors per transfer instead of raising: re-raise them."""

    async def case(led: Ledger) -> None:
        results = await led.create_transfers([s])
        assert len(results) == 1
        if isinstance(results[0], Exception):
            raise results[0]

    return case


BAD_IDS = {
    "empty": "",
    "too-long": "x" * 161,
    "space": "user a",
    "leading-space": " user",
    "tilde": "user~a",
    "newline": "user\n",
    "nul": "user\x00",
    "quote": "user'a",
    "non-ascii": "usér",
    "none": None,
    "int": 123,
}

CASES: dict[str, tuple[type[DripError], Case]] = {
    # human amounts that parse_amount refuses before anything reaches the ledger
    "parse--1": (InvalidAmount, parsed("-1")),
    "parse-1e400": (InvalidAmount, parsed("1e400")),
    "parse-0.0000001": (InvalidAmount, parsed("0.0000001")),
    "parse-nan": (InvalidAmount, parsed(float("nan"))),
    "parse-inf": (InvalidAmount, parsed(float("inf"))),
    "parse-Decimal-NaN": (InvalidAmount, parsed(Decimal("NaN"))),
    "parse-bool": (InvalidAmount, parsed(True)),
    "parse-abc": (InvalidAmount, parsed("abc")),
    # atomic amounts straight into the ledger
    **{
        f"{how}-amount-{name}": (InvalidAmount, atomic(value, how))
        for how in ("transfer", "charge", "hold")
        for name, value in {
            "negative": -1,
            "zero": 0,
            "true": True,
            "false": False,
            "float": 1.5,
            "whole-float": 1.0,
            "nan": float("nan"),
            "decimal": Decimal(1),
            "str": "100",
            "none": None,
            "too-big": AMOUNT_ATOMIC_MAX + 1,
        }.items()
    },
    **{
        f"post-amount-{name}": (InvalidAmount, atomic(value, "post"))
        for name, value in {
            "negative": -1,
            "true": True,
            "float": 1.5,
            "decimal": Decimal(10),
            "str": "10",
            "too-big": AMOUNT_ATOMIC_MAX + 1,
        }.items()
    },
    "spec-zero-amount": (InvalidAmount, spec(TransferSpec("t-new", W, R, 0))),
    "spec-negative-amount": (InvalidAmount, spec(TransferSpec("t-new", W, R, -5))),
    "spec-post-negative": (
        InvalidAmount,
        spec(
            TransferSpec(
                "t-new", amount=-1, flags=TransferFlags.POST_PENDING, pending_id="open-hold"
            )
        ),
    ),
    # unknown accounts and holds
    "unknown-debit": (AccountNotFound, lambda led: led.transfer("t-new", "ghost", R, 1)),
    "unknown-credit": (AccountNotFound, lambda led: led.transfer("t-new", W, "ghost", 1)),
    "unknown-revenue-charge": (
        AccountNotFound,
        lambda led: led.charge("t-new", W, "ghost", 1, code="search"),
    ),
    "unknown-wallet-hold": (
        AccountNotFound,
        lambda led: led.hold("t-new", "ghost", R, 1, code="llm"),
    ),
    "unknown-tilde-account": (AccountNotFound, lambda led: led.transfer("t-new", W, "x~y", 1)),
    "unknown-hold-post": (HoldNotFound, lambda led: led.post("ghost-hold")),
    "unknown-hold-post-amount": (HoldNotFound, lambda led: led.post("ghost-hold", 5)),
    "unknown-hold-void": (HoldNotFound, lambda led: led.void("ghost-hold")),
    "not-a-hold-post": (HoldNotFound, lambda led: led.post("charged")),
    "not-a-hold-void": (HoldNotFound, lambda led: led.void("topup")),
    "unknown-hold-spec": (
        HoldNotFound,
        spec(TransferSpec("t-new", flags=TransferFlags.VOID_PENDING, pending_id="ghost-hold")),
    ),
    # ids
    **{
        f"id-{where}-{name}": (InvalidId, bad_id(value, where))
        for where in ("transfer", "hold", "charge", "account")
        for name, value in BAD_IDS.items()
    },
    **{
        f"id-{where}-{name}": (InvalidId, bad_id(value, where))
        for where in ("post_transfer_id", "void_transfer_id")
        for name, value in BAD_IDS.items()
        if name != "none"  # transfer_id=None is the default: the ledger derives the id
    },
    **{
        f"id-{where}-{name}": (InvalidId, bad_id(value, where))
        for where in ("debit", "post")
        for name, value in BAD_IDS.items()
        if name != "tilde"  # a '~' account or hold id is merely unknown (see above)
    },
    "id-spec-empty": (InvalidId, spec(TransferSpec("", W, R, 1))),
    "id-spec-tilde": (InvalidId, spec(TransferSpec("a~b", W, R, 1))),
    "id-spec-pending-id": (
        InvalidId,
        spec(TransferSpec("t-new", flags=TransferFlags.POST_PENDING, pending_id="bad id")),
    ),
    # metadata, codes, flags and other fields
    "metadata-oversized": (
        InvalidRequest,
        lambda led: led.transfer("t-new", W, R, 1, metadata={"blob": "x" * 4096}),
    ),
    "metadata-oversized-charge": (
        InvalidRequest,
        lambda led: led.charge("t-new", W, R, 1, code="c", metadata={"k": "é" * 2100}),
    ),
    "metadata-oversized-hold": (
        InvalidRequest,
        lambda led: led.hold("t-new", W, R, 1, code="c", metadata={str(i): i for i in range(900)}),
    ),
    "metadata-oversized-post": (
        InvalidRequest,
        lambda led: led.post("open-hold", 10, metadata={"blob": "x" * 5000}),
    ),
    "metadata-oversized-account": (
        InvalidRequest,
        lambda led: led.create_account("user:b", "wallet", metadata={"blob": "x" * 5000}),
    ),
    "metadata-too-deep": (  # stored, it would break every reader of its row
        InvalidRequest,
        lambda led: led.transfer("t-new", W, R, 1, metadata=_nested(33)),
    ),
    "metadata-too-deep-to-encode": (  # json.dumps itself gives up (RecursionError)
        InvalidRequest,
        lambda led: led.create_account("user:b", "wallet", metadata=_nested(5000)),
    ),
    "metadata-not-object": (
        InvalidRequest,
        lambda led: led.transfer("t-new", W, R, 1, metadata=["a"]),
    ),
    "metadata-not-json": (
        InvalidRequest,
        lambda led: led.transfer("t-new", W, R, 1, metadata={"x": object()}),
    ),
    "metadata-nan": (
        InvalidRequest,
        lambda led: led.transfer("t-new", W, R, 1, metadata={"x": float("nan")}),
    ),
    "code-empty": (InvalidRequest, lambda led: led.transfer("t-new", W, R, 1, code="")),
    "code-too-long": (InvalidRequest, lambda led: led.transfer("t-new", W, R, 1, code="c" * 65)),
    "code-space": (InvalidRequest, lambda led: led.charge("t-new", W, R, 1, code="a b")),
    "code-none": (InvalidRequest, lambda led: led.hold("t-new", W, R, 1, code=None)),
    "timeout-negative": (
        InvalidRequest,
        lambda led: led.hold("t-new", W, R, 1, code="c", timeout_s=-1),
    ),
    "timeout-too-long": (
        InvalidRequest,
        lambda led: led.hold("t-new", W, R, 1, code="c", timeout_s=10**9),
    ),
    "timeout-none": (
        InvalidRequest,
        lambda led: led.hold("t-new", W, R, 1, code="c", timeout_s=None),
    ),
    "spec-post-account-not-a-string": (
        InvalidId,
        spec(
            TransferSpec(
                "t-new",
                ["w"],
                "",
                None,
                flags=TransferFlags.POST_PENDING,  # type: ignore[arg-type]
                pending_id="open-hold",
            )
        ),
    ),
    "spec-void-account-an-int": (
        InvalidId,
        spec(
            TransferSpec(
                "t-new",
                "",
                7,
                None,
                flags=TransferFlags.VOID_PENDING,  # type: ignore[arg-type]
                pending_id="open-hold",
            )
        ),
    ),
    "spec-metadata-a-dict": (
        InvalidRequest,
        spec(TransferSpec("t-new", W, R, 1, metadata={"a": 1})),  # type: ignore[arg-type]
    ),
    "spec-metadata-oversized": (
        InvalidRequest,
        spec(TransferSpec("t-new", W, R, 1, metadata='{"a":"' + "x" * 5000 + '"}')),
    ),
    "spec-metadata-not-an-object": (
        InvalidRequest,
        spec(TransferSpec("t-new", W, R, 1, metadata="[1, 2]")),
    ),
    "spec-unknown-flag": (InvalidRequest, spec(TransferSpec("t-new", W, R, 1, flags=64))),
    "spec-expire-flag": (
        InvalidRequest,
        spec(TransferSpec("t-new", W, R, 1, flags=TransferFlags.EXPIRE_PENDING)),
    ),
    "spec-pending-and-post": (
        InvalidRequest,
        spec(
            TransferSpec(
                "t-new",
                W,
                R,
                1,
                flags=TransferFlags.PENDING | TransferFlags.POST_PENDING,
                pending_id="open-hold",
            )
        ),
    ),
    "spec-pending-id-on-plain": (
        InvalidRequest,
        spec(TransferSpec("t-new", W, R, 1, pending_id="open-hold")),
    ),
    "account-kind-unknown": (
        InvalidRequest,
        lambda led: led.create_account("user:b", "piggybank"),
    ),
    "status-unknown": (InvalidRequest, lambda led: led.set_status(W, "asleep")),
    "status-unknown-account": (AccountNotFound, lambda led: led.set_status("ghost", "frozen")),
    # ledger rules
    "same-account": (InvalidTransfer, lambda led: led.transfer("t-new", W, W, 1)),
    "overdraft": (DripInsufficientCredits, lambda led: led.transfer("t-new", W, R, FUNDS)),
    "counter-overflow": (
        InvalidTransfer,
        lambda led: led.transfer("t-new", FUND, W, AMOUNT_ATOMIC_MAX - FUNDS + 1),
    ),
}


def _nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize("name", sorted(CASES))
async def test_bad_input_is_refused_and_writes_nothing(led: Ledger, name: str) -> None:
    error, case = CASES[name]
    before = snapshot(led)
    with pytest.raises(error) as info:
        await case(led)
    # every refusal is a DripError with a stable code; none is a bare Python exception
    assert isinstance(info.value, DripError)
    assert info.value.to_dict()["error"]["code"] == error.code
    assert snapshot(led) == before
    assert led.get_transfer("t-new") is None
    assert led.get_transfer("user:b") is None
    assert [a.id for a in led.list_accounts("wallet")] == [W]
    assert (led.balance(W).posted, led.balance(W).pending) == (FUNDS - 1_000, 100_000)
    report = led.check_invariants()
    assert report.ok, report.checks


async def test_the_ledger_still_works_after_bad_input(led: Ledger) -> None:
    """A batch of refusals next to a good transfer: only the good one lands."""
    results = await led.create_transfers(
        [
            TransferSpec("b1", W, R, 0),
            TransferSpec("b2", W, "ghost", 1),
            TransferSpec("good", W, R, 7),
            TransferSpec("b3", W, R, FUNDS),
        ]
    )
    assert isinstance(results[0], InvalidAmount)
    assert isinstance(results[1], AccountNotFound)
    assert isinstance(results[2], Transfer)
    assert isinstance(results[3], DripInsufficientCredits)
    assert led.balance(W).posted == FUNDS - 1_000 - 7
    assert {t.id for t in all_history(led)} == {"topup", "open-hold", "charged", "good"}
    report = led.check_invariants()
    assert report.ok, report.checks


async def test_bad_input_does_not_fail_other_callers_in_the_same_batch(led: Ledger) -> None:
    """Operations submitted together share one store transaction (group commit). One
    caller's malformed id must be refused on its own (InvalidId), never fail the batch
    and with it the valid operations of other callers."""
    await led.create_account("user:b", "wallet")
    await led.transfer("topup-b", FUND, "user:b", FUNDS, code="topup")
    results = await asyncio.gather(
        led.transfer("good-1", W, R, 1),
        led.transfer("bad\x00id", W, R, 1),
        led.charge("good-2", "user:b", R, 2, code="search"),
        led.transfer("good-3", 123, R, 1),  # type: ignore[arg-type]
        led.hold("good-4", W, R, 3, code="llm"),
        return_exceptions=True,
    )
    assert isinstance(results[1], InvalidId), results[1]
    assert isinstance(results[3], InvalidId), results[3]
    assert [type(r) for r in results[0::2]] == [Transfer, Charge, Transfer], results
    assert led.balance(W).posted == FUNDS - 1_000 - 1
    assert led.balance(W).pending == 100_000 + 3
    assert led.balance("user:b").posted == FUNDS - 2
    report = led.check_invariants()
    assert report.ok, report.checks


async def test_a_hold_near_a_counters_limit_keeps_its_room(led: Ledger) -> None:
    """A posted counter near its limit: the hold that could never be captured is refused
    when taken; a hold that fits keeps its room (a later transfer that would take it is
    refused), so its capture never overflows, batched with others or not."""
    await led.create_account("rev:full", "revenue")
    for source in ("funding:a", "funding:b"):
        await led.create_account(source, "funding")
    await led.transfer("fill", "funding:a", "rev:full", AMOUNT_ATOMIC_MAX - 1_000, code="topup")
    with pytest.raises(InvalidTransfer, match="overflow"):
        await led.hold("never-capturable", W, "rev:full", 2_000, code="c")
    hold = await led.hold("fits", W, "rev:full", 600, code="c")
    with pytest.raises(InvalidTransfer, match="overflow"):  # 1,100 past fill
        await led.transfer("grew", "funding:b", "rev:full", 500, code="topup")
    results = await asyncio.gather(
        led.post(hold, 600), led.transfer("innocent", FUND, W, 5, code="topup"),
        return_exceptions=True,
    )  # fmt: skip
    assert not any(isinstance(r, Exception) for r in results), results
    report = led.check_invariants()
    assert report.ok, report.checks


async def test_a_callers_longest_id_still_has_room_for_the_ids_derived_from_it(
    led: Ledger,
) -> None:
    longest = "h" * 160
    await led.create_account("session:s", "session")
    await led.create_account("budget:s", "funding")
    await led.transfer("budget-s", "budget:s", "session:s", FUNDS, code="budget")
    caps = [("session:s", "budget:s")]
    hold = await led.hold(longest, W, R, 400, code="c", caps=caps)
    charge = await led.post(hold, 100, caps=caps)
    assert charge.id == longest + "~post"
    second = await led.hold("c" * 160, W, R, 50, code="c")
    assert (await led.void(second)).id == "c" * 160 + "~void"
    assert (await led.charge("d" * 160, W, R, 10, code="c", caps=caps)).amount == 10
    with pytest.raises(InvalidId):
        await led.transfer("e" * 161, W, R, 1)
    report = led.check_invariants()
    assert report.ok, report.checks


def test_a_replay_after_the_fee_rate_changed_moves_nothing(store_url: str) -> None:
    """The fee is the ledger's setting, not part of the caller's request: a charge or a
    capture replayed under another rate answers as first written (its fee, or none)."""
    from drip.ledger import fee_account_id, open_ledger

    first = open_ledger(store_url)
    try:
        first.sync.create_account(W, "wallet")
        first.sync.create_account(R, "revenue")
        first.sync.transfer("topup", FUND, W, FUNDS, code="topup")
        charged = first.sync.charge("c1", W, R, 1_000, code="e")
        held = first.sync.hold("h1", W, R, 1_000, code="e")
        posted = first.sync.post(held, 1_000)
    finally:
        first.close()
    for bps in (250, 300):
        later = open_ledger(store_url, fee_bps=bps)
        try:
            again = later.sync.charge("c1", W, R, 1_000, code="e")
            assert again.transfer.replayed and again.fee is None and again.id == charged.id
            reposted = later.sync.post("h1", 1_000)
            assert reposted.transfer.replayed and reposted.fee is None
            assert reposted.id == posted.id
            assert later.balance(fee_account_id("USDC")).posted == 0
            assert later.balance(W).posted == FUNDS - 2_000
            report = later.check_invariants()
            assert report.ok, report.checks
        finally:
            later.close()


def test_usage_adds_up_amounts_past_64_bits(store_url: str) -> None:
    from drip.ledger import open_ledger

    led = open_ledger(store_url)
    try:
        half = AMOUNT_ATOMIC_MAX // 2 + 1
        for user in ("user:x", "user:y"):
            led.sync.create_account(user, "wallet")
            led.sync.create_account(f"rev:{user}", "revenue")
            led.sync.create_account(f"funding:{user}", "funding")
            led.sync.transfer(f"fund-{user}", f"funding:{user}", user, half, code="topup")
            led.sync.charge(f"big-{user}", user, f"rev:{user}", half, code="big")
        [row] = led.usage(None, bucket_s=10**9, code="big")
        assert (row.calls, row.amount) == (2, 2 * half)
    finally:
        led.close()
