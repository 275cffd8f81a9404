"""The SDK's review fixes: an empty idempotency key, money under the caller's decimal
context, closing a client under its calls, the session token and other origins, async
cost functions, an interrupt right after a hold lands, ``RateLimited.retry_after_s``,
``@meter`` over ``@staticmethod``/``@classmethod``, and costs beyond the ledger's range."""

from __future__ import annotations

import asyncio
import decimal
import functools
import importlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal, localcontext
from types import FrameType
from typing import Any

import httpx
import pytest

from drip import DripClient, DripConfig, errors, last_charge
from drip.ledger import open_ledger
from drip.metering.http import async_session_client, session_client
from drip.money import to_decimal

TOKEN = "ds_" + "a" * 43


@pytest.fixture
def sq(sqlite_url: str) -> Iterator[DripClient]:
    """A client on SQLite with a user ``u`` holding 10 USDC."""
    c = DripClient(DripConfig(database_url=sqlite_url))
    c.sync.provision_user("u", initial_balance="10")
    try:
        yield c
    finally:
        c.close()


def balances(client: DripClient, user: str = "u") -> tuple[Decimal, Decimal]:
    user_view = client.sync.get_user(user)
    return user_view["posted_usdc"], user_view["pending_usdc"]


def settled(client: DripClient, posted: str, user: str = "u") -> bool:
    """Whether ``user`` reaches ``posted`` with nothing pending within a few seconds (what
    an interrupted call leaves is settled by a thread of its own)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if balances(client, user) == (Decimal(posted), Decimal(0)):
            return True
        time.sleep(0.02)
    return False


# --- 1. an empty idempotency key ---------------------------------------------------------


async def test_an_empty_idempotency_key_is_refused_not_read_as_no_key(client: DripClient) -> None:
    """``idempotency_key=""`` used to mean "no key": every retry charged again."""
    await client.provision_user("u", initial_balance="10")
    writes: list[Callable[[], Any]] = [
        lambda: client.sync.debit("u", "1", "job", idempotency_key=""),
        lambda: client.sync.topup("u", "5", idempotency_key=""),
        lambda: client.sync.debit("u", "1", "job", idempotency_key=" "),
        lambda: client.sync.topup("u", "1", idempotency_key="a~b"),
    ]
    for write in writes:
        with pytest.raises(errors.InvalidId) as info:
            write()
        assert info.value.param == "idempotency_key"
    for twin in (client.debit("u", "1", "job", idempotency_key=""),
                 client.topup("u", "5", idempotency_key="")):  # fmt: skip
        with pytest.raises(errors.InvalidId):
            await twin
    assert balances(client) == (Decimal(10), Decimal(0))  # nothing moved
    # a real key charges once, however often it is retried; no key is a new charge
    first = await client.debit("u", "1", "job", idempotency_key="order-1")
    again = client.sync.debit("u", "1", "job", idempotency_key="order-1")
    assert again.replayed and again.transfer.id == first.transfer.id
    await client.debit("u", "1", "job")
    client.sync.topup("u", "2", idempotency_key=None)
    assert balances(client) == (Decimal(10), Decimal(0))


# --- 2. money and the caller's decimal context -------------------------------------------


def test_to_decimal_is_exact_whatever_the_decimal_context() -> None:
    expected = {0: "0.000000", 1: "0.000001", 1_500_000: "1.500000", 123_456_789: "123.456789",
                -7_000: "-0.007000", 2**63 - 1: "9223372036854.775807"}  # fmt: skip
    for prec, traps in ((28, ()), (6, ()), (3, (decimal.Inexact, decimal.Rounded))):
        with localcontext() as ctx:
            ctx.prec = prec
            for trap in traps:
                ctx.traps[trap] = True
            for units, text in expected.items():
                assert str(to_decimal(units)) == text


def test_balances_and_sessions_read_exactly_under_a_low_precision(sq: DripClient) -> None:
    sq.sync.topup("u", "113.456789")
    session = sq.sync.create_session("u", "default", budget="99.999999")
    with localcontext() as ctx:
        ctx.prec = 3
        ctx.traps[decimal.Inexact] = ctx.traps[decimal.Rounded] = True
        assert sq.sync.get_user("u")["balance_usdc"] == Decimal("123.456789")
        assert sq._session(session.id, sq.session_info(session.id)).budget == Decimal("99.999999")
        with pytest.raises(errors.DripInsufficientCredits) as info:
            sq.sync.debit("u", "1000", "big")
        assert "123.456789 USDC available" in info.value.message


@pytest.mark.parametrize("traps", [False, True])
def test_a_float_cost_is_charged_whatever_the_decimal_context(sq: DripClient, traps: bool) -> None:
    """With a caller's low precision the float noise check raised a raw InvalidOperation
    after the work ran (the call unbilled); with traps, Inexact/Rounded escaped."""
    ran: list[int] = []

    @sq.meter(cost=lambda r: r * 1.1, max_cost="5", event="llm")
    def call(x: float, user_id: str) -> float:
        ran.append(1)
        return x

    with localcontext() as ctx:
        ctx.prec = 6 if not traps else 28
        if traps:
            ctx.traps[decimal.Inexact] = ctx.traps[decimal.Rounded] = True
        assert call(1.1, "u") == 1.1
        assert last_charge().amount == 1_210_000  # type: ignore[union-attr]
        ctx.prec = 2
        assert call(1234 * 0.000002 / 1.1, "u")  # float noise, rounded in the meter's context
        assert last_charge().amount == 2_468  # type: ignore[union-attr]
    assert balances(sq) == (Decimal("8.787532"), Decimal(0))


# --- 3. closing a client under its calls --------------------------------------------------


def test_closing_a_client_lets_its_sync_calls_in_flight_capture(store_url: str) -> None:
    client = DripClient(DripConfig(database_url=store_url))
    client.sync.provision_user("u", initial_balance="10")
    started, go_on = threading.Event(), threading.Event()

    @client.meter(cost="1", event="e")
    def slow(user_id: str) -> str:
        started.set()
        go_on.wait(10)
        return "result"

    out: list[object] = []
    worker = threading.Thread(target=lambda: out.append(slow("u")))
    worker.start()
    assert started.wait(10)
    led = client._ledger
    assert led is not None
    client.close()
    assert client._ledger is None  # let go of at once; closed when the call ends
    led.sync.set_status("user:u", "open")  # still open (for writes too) under the call
    go_on.set()
    worker.join(10)
    assert out == ["result"] and client._draining == {}
    with pytest.raises(errors.StoreError):
        led.sync.set_status("user:u", "open")  # closed by its last call
    # used again, the client reopens (an app served twice): charged once, nothing held
    assert balances(client) == (Decimal(9), Decimal(0))
    client.close()


async def test_closing_a_client_lets_its_async_calls_in_flight_capture(sq: DripClient) -> None:
    @sq.meter(cost="1", event="e")
    async def slow(user_id: str) -> str:
        await asyncio.sleep(0.3)
        return "result"

    task = asyncio.create_task(slow("u"))
    await asyncio.sleep(0.1)
    sq.close()  # from the loop the call runs on: it cannot wait there, the ledger does
    assert await task == "result"
    async with sq:
        assert balances(sq) == (Decimal(9), Decimal(0))
        assert await slow("u") == "result"  # a call after close reopens
    assert sq._ledger is None
    assert balances(sq) == (Decimal(8), Decimal(0))


def test_a_closed_client_on_a_given_ledger_refuses_calls_before_their_work(
    sqlite_url: str,
) -> None:
    led = open_ledger(sqlite_url)
    client = DripClient(DripConfig(database_url=sqlite_url), ledger=led)
    client.sync.provision_user("u", initial_balance="10")
    started, go_on = threading.Event(), threading.Event()
    ran: list[str] = []

    @client.meter(cost="1", event="e")
    def call(user_id: str) -> str:
        ran.append(user_id)
        started.set()
        go_on.wait(10)
        return "result"

    out: list[object] = []
    worker = threading.Thread(target=lambda: out.append(call("u")))
    worker.start()
    assert started.wait(10)
    client.close()
    with pytest.raises(errors.ClientClosed):
        call("u")  # started after close: refused before it runs
    go_on.set()
    worker.join(10)
    assert out == ["result"] and ran == ["u"]
    assert led.sync.balance("user:u").posted == 9_000_000  # the giver's ledger: still open
    assert led.sync.balance("user:u").pending == 0
    led.close()


# --- 4. the session token and other origins ----------------------------------------------


def _recorder(seen: list[tuple[str, str | None]]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("x-drip-session")))
        if request.url.path.endswith("/redirect"):
            return httpx.Response(302, headers={"location": "https://evil.example/r"})
        return httpx.Response(200, json={"result_url": "https://files.other-cdn.example/r/1"})

    return httpx.MockTransport(handler)


def _tokens(seen: list[tuple[str, str | None]]) -> list[tuple[str, bool]]:
    return [(url, token == TOKEN) for url, token in seen]


def test_a_session_client_with_a_base_url_sends_the_token_only_there() -> None:
    seen: list[tuple[str, str | None]] = []
    with session_client(TOKEN, base_url="https://api.example.com", transport=_recorder(seen),
                        follow_redirects=True) as http:  # fmt: skip
        link = http.get("/search").json()["result_url"]
        http.get(link)  # a link the API returned
        http.get("https://evil.example/x")
        http.get("http://api.example.com/plain")  # another scheme: another origin
        http.get("https://api.example.com:443/same")  # the same origin, spelled out
        http.get("/redirect")
    assert _tokens(seen) == [
        ("https://api.example.com/search", True),
        ("https://files.other-cdn.example/r/1", False),
        ("https://evil.example/x", False),
        ("http://api.example.com/plain", False),
        ("https://api.example.com/same", True),
        ("https://api.example.com/redirect", True),
        ("https://evil.example/r", False),
    ]


async def test_an_async_session_client_with_a_base_url_sends_the_token_only_there() -> None:
    seen: list[tuple[str, str | None]] = []
    async with async_session_client(TOKEN, base_url="https://api.example.com/v1",
                                    transport=_recorder(seen),
                                    follow_redirects=True) as http:  # fmt: skip
        link = (await http.get("search")).json()["result_url"]
        await http.get(link)
        await http.get("/redirect")
    assert _tokens(seen) == [
        ("https://api.example.com/v1/search", True),
        ("https://files.other-cdn.example/r/1", False),
        ("https://api.example.com/v1/redirect", True),
        ("https://evil.example/r", False),
    ]


def test_a_session_client_without_a_base_url_keeps_the_token_to_each_requests_origin() -> None:
    seen: list[tuple[str, str | None]] = []
    with session_client(TOKEN, transport=_recorder(seen), follow_redirects=True) as http:
        http.get("https://api.example.com/search")
        http.get("https://api.example.com/redirect")
    assert _tokens(seen) == [
        ("https://api.example.com/search", True),
        ("https://api.example.com/redirect", True),
        ("https://evil.example/r", False),  # a redirect elsewhere never carries it
    ]


# --- 6. async cost functions ---------------------------------------------------------------


async def _async_price(result: Any) -> str:
    return "0.05"


class _AsyncPrice:
    async def __call__(self, result: Any) -> str:
        return "0.05"


@pytest.mark.parametrize(
    "cost", [_async_price, functools.partial(_async_price), _AsyncPrice()],
    ids=["async def", "partial", "async __call__"],
)  # fmt: skip
def test_an_async_cost_function_is_refused_when_decorating(sq: DripClient, cost: Any) -> None:
    with pytest.raises(errors.ConfigError) as info:
        sq.meter(cost=cost, max_cost="0.10", event="llm")
    assert info.value.param == "cost" and "async" in info.value.message


async def test_a_cost_function_handing_back_a_coroutine_voids_without_a_warning(
    sq: DripClient,
) -> None:
    @sq.meter(cost=lambda r: _async_price(r), max_cost="0.10", event="llm")
    async def call(user_id: str) -> int:
        return 1

    with pytest.raises(errors.ConfigError):
        await call("u")
    assert balances(sq) == (Decimal(10), Decimal(0))


# --- 7. an interrupt as the hold lands ----------------------------------------------------


def _interrupt_at(name: str, owner: str, event: str) -> Callable[[FrameType, str, Any], Any]:
    """A trace function raising KeyboardInterrupt (as a signal handler does) at the
    ``event`` ("call" or "return") of ``owner.name`` in the ledger."""

    def tracer(frame: FrameType, ev: str, arg: Any) -> Any:
        if (ev == "call" and frame.f_code.co_name == name
                and frame.f_code.co_filename.endswith("ledger.py")
                and type(frame.f_locals.get("self")).__name__ == owner):  # fmt: skip
            if event == "call":
                sys.settrace(None)
                raise KeyboardInterrupt

            def local(fr: FrameType, e: str, a: Any) -> Any:
                if e == "return" and a is not None:  # a coroutine's suspensions return None
                    sys.settrace(None)
                    raise KeyboardInterrupt
                return local

            return local
        return None

    return tracer


def test_an_interrupt_as_a_sync_hold_returns_leaves_nothing_reserved(sq: DripClient) -> None:
    ran: list[int] = []

    @sq.meter(cost="1", event="s")
    def call(user_id: str) -> str:
        ran.append(1)
        return "ok"

    sys.settrace(_interrupt_at("hold", "SyncLedger", "return"))
    try:
        with pytest.raises(KeyboardInterrupt):
            call("u")
    finally:
        sys.settrace(None)
    assert not ran
    assert settled(sq, "10")
    assert call("u") == "ok" and settled(sq, "9")
    assert sq._calls == 0  # the release thread counted itself out


async def test_an_interrupt_as_an_async_hold_returns_leaves_nothing_reserved(
    sq: DripClient,
) -> None:
    ran: list[int] = []

    @sq.meter(cost="1", event="s")
    async def call(user_id: str) -> str:
        ran.append(1)
        return "ok"

    sys.settrace(_interrupt_at("hold", "Ledger", "return"))
    try:
        with pytest.raises(KeyboardInterrupt):
            await call("u")
    finally:
        sys.settrace(None)
    assert not ran
    assert balances(sq) == (Decimal(10), Decimal(0))  # voided before the interrupt went on
    assert await call("u") == "ok"
    assert balances(sq) == (Decimal(9), Decimal(0))


@pytest.mark.parametrize("event", ["call", "return"])
def test_an_interrupted_sync_capture_still_charges_once(sq: DripClient, event: str) -> None:
    """The work ran: an interrupt before the capture was sent (or as its answer came
    back) is finished by a capture of its own (a replay if the first landed)."""

    @sq.meter(cost="1", event="s")
    def call(user_id: str) -> str:
        sys.settrace(_interrupt_at("post", "SyncLedger", event))
        return "ok"

    try:
        with pytest.raises(KeyboardInterrupt):
            call("u")
    finally:
        sys.settrace(None)
    assert settled(sq, "9")
    deadline = time.monotonic() + 5
    while sq._calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sq._calls == 0  # the capture thread counted itself out


# --- 8. RateLimited.retry_after_s ---------------------------------------------------------


def test_rate_limited_names_its_retry_after(sq: DripClient) -> None:
    assert errors.RateLimited("slow down", retry_after_s=7).retry_after_s == 7
    assert errors.RateLimited("slow down").retry_after_s is None
    session = sq.sync.create_session(
        "u", "default", "5", policy={"windows": [{"per": "minute", "max_calls": 1}]}
    )

    @sq.meter(cost="0.01", event="e", session_param="session")
    def call(session: str) -> int:
        return 1

    call(session.id)
    with pytest.raises(errors.RateLimited) as info:
        call(session.id)
    assert info.value.retry_after_s == info.value.details["retry_after_s"]
    assert 1 <= info.value.retry_after_s <= 60  # type: ignore[operator]


# --- 10. @meter over @staticmethod / @classmethod ------------------------------------------


async def test_meter_above_staticmethod_and_classmethod_bills_the_named_user(
    sq: DripClient,
) -> None:
    sq.sync.provision_user("q", initial_balance="10")  # the argument billed by mistake before

    class Service:
        @sq.meter(cost="0.01", event="sm")
        @staticmethod
        def sm(q: str, user_id: str) -> tuple[str, str]:
            return ("sm", q)

        @sq.meter(cost="0.01", event="cm")
        @classmethod
        def cm(cls, q: str, user_id: str) -> tuple[str, str]:
            return (cls.__name__, q)

        @sq.meter(cost="0.01", event="asm")
        @staticmethod
        async def asm(q: str, user_id: str) -> str:
            return q

    service = Service()
    assert service.sm("q", "u") == ("sm", "q") and Service.sm("q", user_id="u") == ("sm", "q")
    assert service.cm("q", "u") == ("Service", "q") and Service.cm("q", "u") == ("Service", "q")
    assert await service.asm("q", "u") == "q"
    assert balances(sq) == (Decimal("9.95"), Decimal(0))
    assert balances(sq, "q") == (Decimal(10), Decimal(0))


# --- 11. a cost beyond the ledger's range --------------------------------------------------


@pytest.mark.parametrize("cost", ["1e15", 10**20, Decimal("1e30"), 1e300])
def test_a_cost_beyond_the_ledgers_range_is_capped_at_max_cost(
    sq: DripClient, caplog: pytest.LogCaptureFixture, cost: object
) -> None:
    @sq.meter(cost=lambda r: r, max_cost="0.10", event="dyn")
    def call(value: object, user_id: str) -> object:
        return value

    with caplog.at_level(logging.WARNING, logger="drip.metering"):
        assert call(cost, "u") == cost
    assert last_charge().amount == 100_000  # type: ignore[union-attr]
    assert "charging max_cost" in caplog.text
    assert balances(sq) == (Decimal("9.9"), Decimal(0))


@pytest.mark.parametrize("cost", ["-1e15", Decimal("-1e30"), "-0.01"])
def test_a_negative_cost_is_still_refused(sq: DripClient, cost: object) -> None:
    @sq.meter(cost=lambda r: r, max_cost="0.10", event="dyn")
    def call(value: object, user_id: str) -> object:
        return value

    with pytest.raises(errors.InvalidAmount):
        call(cost, "u")
    assert balances(sq) == (Decimal(10), Decimal(0))


def test_module_meter_counts_its_calls_as_before(tmp_path: Any) -> None:
    """configure()'s retirement still waits for the module-level meter's calls."""
    module = importlib.import_module("drip.metering.meter")
    saved = module._default_client
    module._default_client = None
    try:
        first = module.configure(DripConfig(database_url=f"sqlite:///{tmp_path}/a.db"))
        first.sync.provision_user("u", initial_balance="1")
        started, go_on = threading.Event(), threading.Event()

        @module.meter("0.5", "slow")
        def slow(user_id: str) -> str:
            started.set()
            go_on.wait(10)
            return "done"

        out: list[str] = []
        worker = threading.Thread(target=lambda: out.append(slow("u")))
        worker.start()
        assert started.wait(10)
        module.configure(DripConfig(database_url=f"sqlite:///{tmp_path}/b.db"))
        assert first._ledger is not None  # retired, not closed under the call
        go_on.set()
        worker.join(10)
        assert out == ["done"] and first._ledger is None
        with DripClient(DripConfig(database_url=f"sqlite:///{tmp_path}/a.db")) as check:
            assert balances(check) == (Decimal("0.5"), Decimal(0))
    finally:
        if module._default_client is not None:
            module._default_client.close()
        module._close_retired()
        module._default_client = saved


def test_an_email_with_control_characters_is_refused_by_the_sdk(tmp_path: Any) -> None:
    """The SDK (and so the CLI) refuses what the REST API refuses: a stored escape
    sequence would act on the terminal of whoever lists wallets."""
    client = DripClient(DripConfig(database_url=f"sqlite:///{tmp_path}/e.db"))
    try:
        for email in ("a\x1b]8;;http://x\x07b@x.com", "a\nBcc: x@y.z", "a\x85b@x.com"):
            with pytest.raises(errors.InvalidRequest) as info:
                client.sync.provision_user("u", email=email)
            assert info.value.param == "email"
        assert client.sync.provision_user("u", email="ü@例え.jp")["email"] == "ü@例え.jp"
    finally:
        client.close()


def test_the_sdk_refuses_a_credit_above_the_ceiling(tmp_path: Any) -> None:
    """A top-up or initial balance above 10^9 USDC is refused by the SDK (and so the
    CLI) as by the REST API: every credit draws on the one funding account, whose
    counter one typo could bring near overflow, after which no top-up would go through."""
    from drip.money import CREDIT_ATOMIC_MAX

    client = DripClient(DripConfig(database_url=f"sqlite:///{tmp_path}/c.db"))
    try:
        with pytest.raises(errors.InvalidAmount) as info:
            client.sync.provision_user("u", initial_balance="9000000000000")
        assert info.value.param == "initial_balance"
        client.sync.provision_user("u", initial_balance="1000000000")  # the ceiling itself
        with pytest.raises(errors.InvalidAmount):
            client.sync.topup("u", "1000000000.000001")
        assert client.sync.topup("u", "5").amount == 5_000_000
        assert client.ledger.balance("funding:USDC").posted == -(CREDIT_ATOMIC_MAX + 5_000_000)
    finally:
        client.close()
