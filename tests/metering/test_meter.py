"""``@meter``: hold before the call, capture after it, void on failure, on both stores."""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import threading
from collections.abc import Iterator
from decimal import Decimal
from types import ModuleType
from typing import Any

import pytest

import drip
from drip import DripClient, DripConfig, DripInsufficientCredits, errors
from drip.metering.client import wallet_id

BIG_BUCKET = 10**9  # one usage bucket for the whole test run, whatever the time of day


def user_state(client: DripClient, user_id: str) -> tuple[Decimal, Decimal, Decimal]:
    """(available, posted, pending) in USDC."""
    u = client.sync.get_user(user_id)
    return u["balance_usdc"], u["posted_usdc"], u["pending_usdc"]


def in_fresh_context(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a sync call in its own contextvars context, so ``last_charge`` cannot leak."""
    return contextvars.Context().run(fn, *args, **kwargs)


# --- hold, run, capture ---------------------------------------------------------------


async def test_async_meter_holds_before_and_captures_after(client: DripClient) -> None:
    await client.provision_user("alice", initial_balance="1.00")
    seen: list[tuple[Decimal, Decimal, Decimal]] = []

    @client.meter(cost="0.007", event="search")
    async def search(query: str, user_id: str) -> list[str]:
        seen.append(user_state(client, "alice"))
        return [query.upper()]

    result = await search("agents", user_id="alice")

    assert result == ["AGENTS"]
    # while running: the cost is reserved (pending), not yet posted
    assert seen == [(Decimal("0.993"), Decimal("1"), Decimal("0.007"))]
    # afterwards: captured exactly
    assert user_state(client, "alice") == (Decimal("0.993"), Decimal("0.993"), Decimal(0))
    charge = drip.last_charge()
    assert charge is not None
    assert charge.amount == 7_000
    assert charge.transfer.code == "search"
    assert charge.transfer.debit_account_id == wallet_id("alice")


def test_sync_meter_holds_before_and_captures_after(client: DripClient) -> None:
    client.sync.provision_user("alice", initial_balance="1.00")
    seen: list[tuple[Decimal, Decimal, Decimal]] = []

    @client.meter(cost="0.007", event="search")
    def search(query: str, user_id: str) -> str:
        seen.append(user_state(client, "alice"))
        return query[::-1]

    def call() -> tuple[str, Any]:
        return search("abc", "alice"), drip.last_charge()

    result, charge = in_fresh_context(call)

    assert result == "cba"
    assert seen == [(Decimal("0.993"), Decimal("1"), Decimal("0.007"))]
    assert user_state(client, "alice") == (Decimal("0.993"), Decimal("0.993"), Decimal(0))
    assert charge is not None
    assert charge.amount == 7_000


async def test_meter_keeps_function_metadata(client: DripClient) -> None:
    @client.meter(cost="0.01", event="search")
    async def search(query: str, user_id: str) -> str:
        """Search the web."""
        return query

    assert search.__name__ == "search"
    assert search.__doc__ == "Search the web."
    assert asyncio.iscoroutinefunction(search)


async def test_last_charge_exposes_transfer_and_receipt(client: DripClient) -> None:
    await client.provision_user("alice", initial_balance="1")

    @client.meter(cost="0.05", event="report")
    async def report(user_id: str) -> str:
        return "done"

    await report("alice")
    first = drip.last_charge()
    await report("alice")
    second = drip.last_charge()

    assert first is not None and second is not None
    assert first.amount == second.amount == 50_000
    assert first.transfer.id != second.transfer.id
    stored = client.ledger.get_transfer(second.transfer.id)
    assert stored is not None
    assert stored.amount == 50_000
    assert stored.debit_account_id == wallet_id("alice")
    assert stored.pending_id is not None  # the capture of the call's hold
    assert client.ledger.get_transfer(stored.pending_id) is not None
    assert second.id == second.transfer.id


async def test_last_charge_is_per_task(client: DripClient) -> None:
    await client.provision_user("alice", initial_balance="1")
    await client.provision_user("bob", initial_balance="1")

    @client.meter(cost="0.01", event="search")
    async def search(user_id: str) -> str:
        await asyncio.sleep(0)
        return user_id

    async def call(user_id: str) -> str | None:
        await search(user_id)
        charge = drip.last_charge()
        return charge.transfer.debit_account_id if charge else None

    got = await asyncio.gather(call("alice"), call("bob"))

    assert got == [wallet_id("alice"), wallet_id("bob")]


# --- refused before running -----------------------------------------------------------


async def test_async_insufficient_raised_before_function_runs(client: DripClient) -> None:
    await client.provision_user("alice", initial_balance="0.005")
    ran: list[str] = []

    @client.meter(cost="0.007", event="search")
    async def search(query: str, user_id: str) -> str:
        ran.append(query)
        return query

    with pytest.raises(DripInsufficientCredits) as info:
        await search("agents", user_id="alice")

    assert ran == []
    assert info.value.details["event"] == "search"
    assert info.value.details["needed"] == 7_000
    assert info.value.details["available"] == 5_000
    assert user_state(client, "alice") == (Decimal("0.005"), Decimal("0.005"), Decimal(0))


def test_sync_insufficient_raised_before_function_runs(client: DripClient) -> None:
    client.sync.provision_user("alice", initial_balance="0.005")
    ran: list[str] = []

    @client.meter(cost="0.007", event="search")
    def search(query: str, user_id: str) -> str:
        ran.append(query)
        return query

    with pytest.raises(DripInsufficientCredits):
        search("agents", "alice")

    assert ran == []
    assert user_state(client, "alice") == (Decimal("0.005"), Decimal("0.005"), Decimal(0))


async def test_unknown_user_raised_before_function_runs(client: DripClient) -> None:
    ran: list[str] = []

    @client.meter(cost="0.007", event="search")
    async def search(user_id: str) -> None:
        ran.append(user_id)

    @client.meter(cost="0.007", event="search")
    def search_sync(user_id: str) -> None:
        ran.append(user_id)

    with pytest.raises(errors.UserNotFound):
        await search("ghost")
    with pytest.raises(errors.UserNotFound):
        search_sync("ghost")
    assert ran == []


async def test_hibernated_user_refused_until_restored(client: DripClient) -> None:
    await client.provision_user("alice", initial_balance="1")
    ran: list[str] = []

    @client.meter(cost="0.01", event="search")
    async def search(user_id: str) -> str:
        ran.append("async")
        return "ok"

    @client.meter(cost="0.01", event="search")
    def search_sync(user_id: str) -> str:
        ran.append("sync")
        return "ok"

    await client.hibernate("alice")
    with pytest.raises(errors.AccountFrozen):
        await search("alice")
    with pytest.raises(errors.AccountFrozen):
        search_sync("alice")
    assert ran == []
    assert user_state(client, "alice") == (Decimal("1"), Decimal("1"), Decimal(0))

    await client.restore("alice")
    assert await search("alice") == "ok"
    assert search_sync("alice") == "ok"
    assert ran == ["async", "sync"]
    assert user_state(client, "alice") == (Decimal("0.98"), Decimal("0.98"), Decimal(0))


async def test_topup_resumes_metered_calls(client: DripClient) -> None:
    await client.provision_user("alice", initial_balance="0.01")

    @client.meter(cost="0.01", event="search")
    async def search(user_id: str) -> str:
        return "ok"

    await client.hibernate("alice")
    with pytest.raises(errors.AccountFrozen):
        await search("alice")
    await client.topup("alice", "0.01")

    assert await search("alice") == "ok"
    assert await search("alice") == "ok"
    with pytest.raises(DripInsufficientCredits):
        await search("alice")
    assert user_state(client, "alice") == (Decimal(0), Decimal(0), Decimal(0))


# --- failures -------------------------------------------------------------------------


async def test_async_exception_voids_hold_and_reraises(client: DripClient) -> None:
    await client.provision_user("alice", initial_balance="1")

    @client.meter(cost="0.25", event="flaky")
    async def flaky(user_id: str) -> None:
        assert user_state(client, "alice")[2] == Decimal("0.25")  # held while running
        raise ValueError("upstream timed out")

    async def call() -> Any:
        with pytest.raises(ValueError, match="upstream timed out"):
            await flaky("alice")
        return drip.last_charge()

    # a fresh context: nothing charged means no last charge
    assert await asyncio.create_task(call(), context=contextvars.Context()) is None
    assert user_state(client, "alice") == (Decimal(1), Decimal(1), Decimal(0))
    assert client.sync.usage("alice") == []


def test_sync_exception_voids_hold_and_reraises(client: DripClient) -> None:
    client.sync.provision_user("alice", initial_balance="1")

    @client.meter(cost="0.25", event="flaky")
    def flaky(user_id: str) -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError):
        in_fresh_context(flaky, "alice")

    assert user_state(client, "alice") == (Decimal(1), Decimal(1), Decimal(0))
    assert client.sync.usage("alice") == []


async def test_cancelled_call_voids_hold(client: DripClient) -> None:
    await client.provision_user("alice", initial_balance="1")
    started = asyncio.Event()

    @client.meter(cost="0.25", event="slow")
    async def slow(user_id: str) -> None:
        started.set()
        await asyncio.sleep(3600)

    task = asyncio.create_task(slow("alice"))
    await started.wait()
    assert user_state(client, "alice")[2] == Decimal("0.25")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert user_state(client, "alice") == (Decimal(1), Decimal(1), Decimal(0))


async def test_async_void_on_error_false_captures_full_hold(client: DripClient) -> None:
    await client.provision_user("alice", initial_balance="1")

    @client.meter(cost="0.01", event="fine")
    async def fine(user_id: str) -> None:
        return None

    @client.meter(cost="0.25", event="flaky", void_on_error=False)
    async def flaky(user_id: str) -> None:
        raise RuntimeError("boom")

    await fine("alice")
    with pytest.raises(RuntimeError, match="boom"):
        await flaky("alice")

    assert user_state(client, "alice") == (Decimal("0.74"), Decimal("0.74"), Decimal(0))
    # the captured hold is the last charge of this context (as on the sync path)
    charge = drip.last_charge()
    assert charge is not None
    assert (charge.transfer.code, charge.amount) == ("flaky", 250_000)


def test_sync_void_on_error_false_captures_full_hold(client: DripClient) -> None:
    client.sync.provision_user("alice", initial_balance="1")

    @client.meter(cost=lambda r: "0.01", max_cost="0.25", event="flaky", void_on_error=False)
    def flaky(user_id: str) -> None:
        raise RuntimeError("boom")

    def call() -> Any:
        with pytest.raises(RuntimeError):
            flaky("alice")
        return drip.last_charge()

    charge = in_fresh_context(call)

    # the function never returned a result, so the whole hold (max_cost) is captured
    assert user_state(client, "alice") == (Decimal("0.75"), Decimal("0.75"), Decimal(0))
    assert charge is not None
    assert charge.amount == 250_000


async def test_config_void_on_error_false_and_decorator_override(store_url: str) -> None:
    c = DripClient(DripConfig(database_url=store_url, void_on_error=False))
    try:
        await c.provision_user("alice", initial_balance="1")

        @c.meter(cost="0.1", event="captured")
        async def captured(user_id: str) -> None:
            raise RuntimeError

        @c.meter(cost="0.1", event="voided", void_on_error=True)
        async def voided(user_id: str) -> None:
            raise RuntimeError

        with pytest.raises(RuntimeError):
            await captured("alice")
        with pytest.raises(RuntimeError):
            await voided("alice")

        assert user_state(c, "alice") == (Decimal("0.9"), Decimal("0.9"), Decimal(0))
        assert [(r.code, r.calls) for r in c.sync.usage("alice", bucket_s=BIG_BUCKET)] == [
            ("captured", 1)
        ]
    finally:
        c.close()


# --- dynamic cost ---------------------------------------------------------------------


async def test_dynamic_cost_charges_computed_amount(client: DripClient) -> None:
    await client.provision_user("alice", initial_balance="1")
    pending_seen: list[Decimal] = []

    @client.meter(
        cost=lambda r: r["tokens"] * Decimal("0.000002"), max_cost="0.10", event="llm_call"
    )
    async def llm_call(prompt: str, user_id: str) -> dict[str, int]:
        pending_seen.append(user_state(client, "alice")[2])
        return {"tokens": 1_750}

    assert await llm_call("hi", "alice") == {"tokens": 1_750}

    assert pending_seen == [Decimal("0.10")]  # max_cost is held
    charge = drip.last_charge()
    assert charge is not None
    assert charge.amount == 3_500
    # the rest of the hold is released at once
    assert user_state(client, "alice") == (Decimal("0.9965"), Decimal("0.9965"), Decimal(0))


async def test_dynamic_cost_is_capped_at_max_cost(client: DripClient) -> None:
    await client.provision_user("alice", initial_balance="1")

    @client.meter(cost=lambda r: r, max_cost="0.10", event="llm_call")
    async def llm_call(user_id: str, price: str) -> str:
        return price

    await llm_call("alice", "0.5")

    charge = drip.last_charge()
    assert charge is not None
    assert charge.amount == 100_000
    assert user_state(client, "alice") == (Decimal("0.9"), Decimal("0.9"), Decimal(0))


def test_sync_dynamic_cost(client: DripClient) -> None:
    client.sync.provision_user("alice", initial_balance="1")

    @client.meter(cost=lambda r: len(r) / 1000, max_cost="0.05", event="scrape")
    def scrape(url: str, user_id: str) -> str:
        return url * 3

    def call() -> Any:
        scrape("abcdefg", user_id="alice")  # 21 chars -> 0.021
        first = drip.last_charge()
        scrape("x" * 40, user_id="alice")  # 120 chars -> 0.12, capped at 0.05
        return first, drip.last_charge()

    first, second = in_fresh_context(call)

    assert first.amount == 21_000
    assert second.amount == 50_000
    assert user_state(client, "alice") == (Decimal("0.929"), Decimal("0.929"), Decimal(0))


async def test_dynamic_cost_needs_max_cost_available(client: DripClient) -> None:
    await client.provision_user("alice", initial_balance="0.05")
    ran: list[int] = []

    @client.meter(cost=lambda r: "0.001", max_cost="0.10", event="llm_call")
    async def llm_call(user_id: str) -> None:
        ran.append(1)

    with pytest.raises(DripInsufficientCredits):
        await llm_call("alice")
    assert ran == []


async def test_invalid_dynamic_cost_does_not_leave_a_hold(client: DripClient) -> None:
    """If ``cost(result)`` is not a valid amount the call fails, and its hold must not stay
    pending (locking the user's funds until ``hold_timeout_s``)."""
    await client.provision_user("alice", initial_balance="1")

    @client.meter(cost=lambda r: r, max_cost="0.10", event="llm_call")
    async def llm_call(user_id: str, price: Any) -> Any:
        return price

    with pytest.raises(errors.InvalidAmount):
        await llm_call("alice", "not a number")

    available, posted, pending = user_state(client, "alice")
    assert pending == Decimal(0)
    assert available == posted


async def test_callable_cost_without_max_cost_is_config_error(client: DripClient) -> None:
    with pytest.raises(errors.ConfigError) as info:

        @client.meter(cost=lambda r: "0.01", event="llm_call")
        async def llm_call(user_id: str) -> None: ...

    assert info.value.param == "max_cost"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"cost": "0", "event": "x"}, errors.InvalidAmount),
        ({"cost": "-0.01", "event": "x"}, errors.InvalidAmount),
        ({"cost": "0.0000001", "event": "x"}, errors.InvalidAmount),
        ({"cost": "0.2", "max_cost": "0.1", "event": "x"}, errors.ConfigError),
    ],
    ids=["zero", "negative", "too-precise", "cost-above-max"],
)
async def test_bad_fixed_cost_rejected_at_decoration(
    client: DripClient, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        client.meter(**kwargs)


# --- the payer parameter --------------------------------------------------------------


async def test_user_id_param_positional_and_keyword(client: DripClient) -> None:
    await client.provision_user("cust_1", initial_balance="1")
    await client.provision_user("cust_2", initial_balance="1")

    @client.meter(cost="0.02", event="llm_call", user_id_param="customer_id")
    async def llm_call(prompt: str, customer_id: str) -> str:
        return f"{customer_id}:{prompt}"

    assert await llm_call("a", "cust_1") == "cust_1:a"
    assert await llm_call(prompt="b", customer_id="cust_2") == "cust_2:b"
    assert await llm_call("c", customer_id="cust_2") == "cust_2:c"

    assert user_state(client, "cust_1")[0] == Decimal("0.98")
    assert user_state(client, "cust_2")[0] == Decimal("0.96")


def test_user_id_param_sync_and_default(client: DripClient) -> None:
    client.sync.provision_user("house", initial_balance="1")
    client.sync.provision_user("cust_1", initial_balance="1")

    @client.meter(cost="0.02", event="lookup", user_id_param="customer_id")
    def lookup(key: str, customer_id: str = "house") -> str:
        return key

    lookup("k")  # the parameter's default names the payer
    lookup("k", "cust_1")
    lookup(key="k", customer_id="cust_1")

    assert user_state(client, "house")[0] == Decimal("0.98")
    assert user_state(client, "cust_1")[0] == Decimal("0.96")


async def test_missing_or_non_string_payer_is_invalid_request(client: DripClient) -> None:
    await client.provision_user("alice", initial_balance="1")
    ran: list[int] = []

    @client.meter(cost="0.02", event="search")
    async def search(query: str, user_id: str) -> None:
        ran.append(1)

    with pytest.raises(errors.InvalidRequest):
        await search("q")  # type: ignore[call-arg]
    with pytest.raises(errors.InvalidRequest):
        await search("q", 42)  # type: ignore[arg-type]
    assert ran == []
    assert user_state(client, "alice")[0] == Decimal(1)


def test_function_without_payer_param_is_config_error(client: DripClient) -> None:
    with pytest.raises(errors.ConfigError) as info:

        @client.meter(cost="0.01", event="search")
        async def search(query: str) -> None: ...

    assert info.value.param == "user_id_param"

    with pytest.raises(errors.ConfigError):

        @client.meter(cost="0.01", event="search", user_id_param="customer_id")
        def lookup(user_id: str) -> None: ...


# --- concurrency ----------------------------------------------------------------------


async def test_concurrent_async_calls_never_overdraw(client: DripClient) -> None:
    affordable = 12
    await client.provision_user(
        "alice", initial_balance=Decimal("0.007") * affordable + Decimal("0.003")
    )
    ran: list[int] = []

    @client.meter(cost="0.007", event="search")
    async def search(i: int, user_id: str) -> int:
        await asyncio.sleep(0.001)
        ran.append(i)
        return i

    results = await asyncio.gather(
        *(search(i, user_id="alice") for i in range(50)), return_exceptions=True
    )

    ok = [r for r in results if isinstance(r, int)]
    refused = [r for r in results if isinstance(r, DripInsufficientCredits)]
    assert len(ok) == affordable
    assert len(refused) == 50 - affordable
    assert sorted(ran) == sorted(ok)
    assert user_state(client, "alice") == (Decimal("0.003"), Decimal("0.003"), Decimal(0))
    assert [
        (r.code, r.calls, r.amount) for r in client.sync.usage("alice", bucket_s=BIG_BUCKET)
    ] == [("search", affordable, 7_000 * affordable)]
    assert client.ledger.check_invariants().ok


def test_threaded_sync_calls_never_overdraw(client: DripClient) -> None:
    affordable, threads, per_thread = 30, 8, 10
    client.sync.provision_user("alice", initial_balance=Decimal("0.011") * affordable)
    ran: list[int] = []
    refused: list[int] = []
    other: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads)

    @client.meter(cost="0.011", event="lookup")
    def lookup(i: int, user_id: str) -> int:
        with lock:
            ran.append(i)
        return i

    def worker(t: int) -> None:
        barrier.wait()
        for j in range(per_thread):
            try:
                lookup(t * per_thread + j, "alice")
            except DripInsufficientCredits:
                with lock:
                    refused.append(1)
            except BaseException as exc:  # noqa: BLE001 - reported below
                with lock:
                    other.append(exc)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(timeout=120)

    assert other == []
    assert len(ran) == affordable
    assert len(refused) == threads * per_thread - affordable
    assert user_state(client, "alice") == (Decimal(0), Decimal(0), Decimal(0))
    assert client.ledger.check_invariants().ok


# --- usage ----------------------------------------------------------------------------


async def test_usage_per_event(client: DripClient) -> None:
    await client.provision_user("alice", initial_balance="1")
    await client.provision_user("bob", initial_balance="1")

    @client.meter(cost="0.007", event="search")
    async def search(user_id: str) -> None:
        return None

    @client.meter(cost=lambda r: r, max_cost="0.05", event="llm_call")
    async def llm_call(user_id: str, price: str) -> str:
        return price

    @client.meter(cost="0.5", event="flaky")
    async def flaky(user_id: str) -> None:
        raise RuntimeError

    for _ in range(3):
        await search("alice")
    await llm_call("alice", "0.02")
    await llm_call("alice", "0.03")
    with pytest.raises(RuntimeError):
        await flaky("alice")  # voided: not usage
    await search("bob")
    await client.debit("bob", "0.1", "export")
    await client.topup("alice", "1")  # credits are not usage

    alice = {r.code: (r.calls, r.amount) for r in client.sync.usage("alice", bucket_s=BIG_BUCKET)}
    assert alice == {"search": (3, 21_000), "llm_call": (2, 50_000)}
    everyone = {r.code: (r.calls, r.amount) for r in client.sync.usage(bucket_s=BIG_BUCKET)}
    assert everyone == {"search": (4, 28_000), "llm_call": (2, 50_000), "export": (1, 100_000)}
    # the default daily buckets add up to the same totals
    daily = client.sync.usage("alice")
    assert sum(r.calls for r in daily) == 5
    assert sum(r.amount for r in daily) == 71_000
    assert all(r.bucket_start_us % (86_400 * 1_000_000) == 0 for r in daily)


# --- module-level configure() + @drip.meter -------------------------------------------


@pytest.fixture
def meter_module() -> Iterator[ModuleType]:
    """``drip.metering.meter`` with no default client; whatever a test configures is closed."""
    module = importlib.import_module("drip.metering.meter")
    saved = module._default_client
    module._default_client = None
    try:
        yield module
    finally:
        if module._default_client is not None:
            module._default_client.close()
        module._close_retired()
        module._default_client = saved


async def test_configure_then_module_meter(store_url: str, meter_module: ModuleType) -> None:
    configured = drip.configure(database_url=store_url)
    assert isinstance(configured, DripClient)
    assert meter_module._default_client is configured
    await configured.provision_user("alice", initial_balance="1")

    @drip.meter(cost="0.007", event="search")
    async def search(query: str, user_id: str) -> str:
        return query

    @drip.meter(cost="0.003", event="scrape")
    def scrape(url: str, user_id: str) -> str:
        return url

    assert await search("q", user_id="alice") == "q"
    assert scrape("u", "alice") == "u"

    assert user_state(configured, "alice") == (Decimal("0.99"), Decimal("0.99"), Decimal(0))


async def test_module_meter_looks_up_client_at_call_time(
    store_url: str, meter_module: ModuleType
) -> None:
    ran: list[str] = []

    @drip.meter(cost="0.01", event="search")
    async def search(user_id: str) -> None:
        ran.append(user_id)

    @drip.meter(cost="0.01", event="search")
    def search_sync(user_id: str) -> None:
        ran.append(user_id)

    with pytest.raises(errors.ConfigError):
        await search("alice")
    with pytest.raises(errors.ConfigError):
        search_sync("alice")
    assert ran == []

    configured = drip.configure(DripConfig(database_url=store_url))
    await configured.provision_user("alice", initial_balance="1")
    await search("alice")
    search_sync("alice")

    assert ran == ["alice", "alice"]
    assert user_state(configured, "alice")[0] == Decimal("0.98")


def test_configure_rejects_config_and_settings_together(
    sqlite_url: str, meter_module: ModuleType
) -> None:
    with pytest.raises(errors.ConfigError):
        drip.configure(DripConfig(database_url=sqlite_url), database_url=sqlite_url)
    assert meter_module._default_client is None


def test_configure_again_replaces_the_client(tmp_path: Any, meter_module: ModuleType) -> None:
    first = drip.configure(database_url=f"sqlite:///{tmp_path}/one.db")
    first.sync.provision_user("alice", initial_balance="1")
    second = drip.configure(database_url=f"sqlite:///{tmp_path}/two.db")
    second.sync.provision_user("alice", initial_balance="2")

    @drip.meter(cost="0.5", event="search")
    def search(user_id: str) -> None:
        return None

    search("alice")

    assert meter_module._default_client is second
    assert user_state(second, "alice")[0] == Decimal("1.5")
    check = DripClient(DripConfig(database_url=f"sqlite:///{tmp_path}/one.db"))
    try:
        assert user_state(check, "alice")[0] == Decimal("1")  # the old database untouched
    finally:
        check.close()


# --- calls that must never be billed (review findings) ----------------------------------


def test_generators_cannot_be_metered(client: DripClient) -> None:
    """A generator's body runs only as it is iterated, after the call returned: metering
    it would bill a body that may fail or never run. Refused at decoration."""

    def sync_gen(user_id: str) -> Iterator[int]:
        yield 1

    async def async_gen(user_id: str) -> Any:
        yield 1

    class Streams:
        def __call__(self, user_id: str) -> Iterator[int]:
            yield 1

    for fn in (sync_gen, async_gen, Streams()):
        with pytest.raises(errors.ConfigError, match="generator"):
            client.meter(cost="0.1", event="gen")(fn)


async def test_an_object_with_an_async_call_is_metered_as_async(client: DripClient) -> None:
    await client.provision_user("obj", initial_balance="1")

    class Tool:
        async def __call__(self, user_id: str, fail: bool = False) -> str:
            if fail:
                raise ValueError("boom")
            return "done"

    tool = client.meter(cost="0.1", event="tool")(Tool())
    assert await tool(user_id="obj") == "done"
    with pytest.raises(ValueError, match="boom"):
        await tool(user_id="obj", fail=True)
    assert user_state(client, "obj") == (Decimal("0.9"), Decimal("0.9"), Decimal("0"))


def test_a_lazy_result_is_refused_and_not_billed(client: DripClient) -> None:
    """A plain function handing back a coroutine or generator has not done its work."""
    client.sync.provision_user("lazy", initial_balance="1")

    async def work() -> str:
        return "never run"

    @client.meter(cost="0.1", event="lazy")
    def returns_coroutine(user_id: str) -> Any:
        return work()

    @client.meter(cost="0.1", event="lazy")
    def returns_generator(user_id: str) -> Any:
        return (i for i in range(3))

    for fn in (returns_coroutine, returns_generator):
        with pytest.raises(errors.ConfigError, match="instead of its result"):
            in_fresh_context(fn, user_id="lazy")
    assert user_state(client, "lazy") == (Decimal("1"), Decimal("1"), Decimal("0"))


async def test_the_payer_is_found_as_python_binds_the_call(client: DripClient) -> None:
    """A keyword-only payer after ``*args`` is not read from the positional arguments, and
    a positional-only payer is not read from ``**kwargs``."""
    await client.provision_user("alice", initial_balance="1")
    await client.provision_user("bob", initial_balance="1")

    @client.meter(cost="0.1", event="tag")
    async def tag(*labels: str, user_id: str) -> tuple[str, ...]:
        return labels

    @client.meter(cost="0.1", event="opts")
    async def opts(user_id: str, /, **options: str) -> dict[str, str]:
        return options

    assert await tag("urgent", "bob", user_id="alice") == ("urgent", "bob")
    assert await opts("alice", user_id="bob") == {"user_id": "bob"}
    assert (await client.get_user("alice"))["balance_usdc"] == Decimal("0.8")
    assert (await client.get_user("bob"))["balance_usdc"] == Decimal("1")

    async def by_star(*user_id: str) -> None:
        return None

    with pytest.raises(errors.ConfigError, match="user_id"):
        client.meter(cost="0.1", event="x")(by_star)


async def test_last_charge_is_none_after_an_uncharged_call(client: DripClient) -> None:
    await client.provision_user("lc", initial_balance="0.25")

    @client.meter(cost="0.1", event="e")
    async def call(user_id: str, fail: bool = False) -> None:
        if fail:
            raise RuntimeError("failed")

    await call(user_id="lc")
    assert drip.last_charge() is not None
    with pytest.raises(RuntimeError):
        await call(user_id="lc", fail=True)
    assert drip.last_charge() is None  # voided: nothing was charged by the last call
    await call(user_id="lc")
    with pytest.raises(DripInsufficientCredits):
        await call(user_id="lc")
    assert drip.last_charge() is None


@pytest.mark.parametrize("void_on_error", [True, False])
async def test_a_call_failing_after_its_hold_expired_raises_its_own_error(
    store_url: str, void_on_error: bool
) -> None:
    client = DripClient(DripConfig(database_url=store_url, hold_timeout_s=1,
                                   void_on_error=void_on_error))  # fmt: skip
    try:
        await client.provision_user("slow", initial_balance="1")

        @client.meter(cost="0.1", event="slow")
        async def slow(user_id: str) -> None:
            await asyncio.sleep(1.3)
            client.ledger.expire_holds()
            raise ValueError("boom")

        @client.meter(cost="0.1", event="slow")
        def slow_sync(user_id: str) -> None:
            import time

            time.sleep(1.3)
            client.ledger.expire_holds()
            raise ValueError("boom sync")

        with pytest.raises(ValueError, match="boom"):
            await slow(user_id="slow")
        with pytest.raises(ValueError, match="boom sync"):
            await asyncio.to_thread(in_fresh_context, slow_sync, user_id="slow")
        # void_on_error=False charges the whole hold afresh (the late charge), else nothing
        charged = Decimal("0.2") if not void_on_error else Decimal("0")
        state = (await client.get_user("slow"))["balance_usdc"], Decimal("1") - charged
        assert state[0] == state[1]
        assert client.ledger.check_invariants().ok
    finally:
        client.close()


async def test_configure_again_lets_calls_in_flight_finish(
    tmp_path: Any, meter_module: ModuleType
) -> None:
    """A second configure() used to close the client under calls already running: the work
    ran, the caller got a StoreError, nothing was billed and the hold stayed reserved."""
    first = drip.configure(database_url=f"sqlite:///{tmp_path}/one.db")
    await first.provision_user("alice", initial_balance="1")
    started, go_on = asyncio.Event(), asyncio.Event()

    @drip.meter(cost="0.01", event="render")
    async def render(user_id: str) -> str:
        started.set()
        await go_on.wait()
        return "img"

    call = asyncio.create_task(render("alice"))
    await started.wait()
    assert drip.configure(database_url=f"sqlite:///{tmp_path}/one.db") is first  # same: kept
    second = drip.configure(database_url=f"sqlite:///{tmp_path}/two.db")
    go_on.set()
    assert await call == "img"
    assert user_state(first, "alice") == (Decimal("0.99"), Decimal("0.99"), Decimal(0))
    assert meter_module._default_client is second
