"""The SDK used the way its users do, found by review: a cost function's float, a user id
at the length limit, the async client's reads, a closed client, the first use of one
client from many threads, a session token in a printout or behind a redirect."""

from __future__ import annotations

import importlib
import threading
from decimal import Decimal
from typing import Any

import httpx
import pytest

from drip import DripClient, DripConfig, errors, last_charge
from drip.ledger import open_ledger
from drip.metering.http import async_session_client, session_client


@pytest.fixture
def client(sqlite_url: str) -> Any:
    c = DripClient(DripConfig(database_url=sqlite_url))
    c.sync.provision_user("alice", initial_balance="10")
    yield c
    c.close()


async def test_a_float_cost_is_charged_as_the_amount_it_stands_for(client: DripClient) -> None:
    """``tokens * 0.000002`` is 0.0024679999999999997 for 1234 tokens: it used to fail
    after the call ran (unbilled, result lost); a float of more decimals still fails."""

    @client.meter(cost=lambda r: r * 0.000002, max_cost="1", event="tokens")
    async def llm(n: int, user_id: str) -> int:
        return n

    assert await llm(1234, user_id="alice") == 1234
    assert last_charge().amount == 2_468  # type: ignore[union-attr]
    for n in range(1, 300):
        await llm(n, user_id="alice")  # every count is a whole number of atomic units

    @client.meter(cost=lambda r: 0.0000001, max_cost="1", event="tiny")
    async def tiny(user_id: str) -> None:
        return None

    with pytest.raises(errors.InvalidAmount):
        await tiny(user_id="alice")


async def test_a_user_id_too_long_writes_nothing(client: DripClient) -> None:
    long_id = "b" * 151
    with pytest.raises(errors.InvalidId) as info:
        await client.provision_user(long_id, email="x@example.com", initial_balance="1")
    assert info.value.details.get("param", info.value.param) == "user_id"
    assert [u["user_id"] for u in await client.list_users()] == ["alice"]
    await client.provision_user("c" * 150, initial_balance="1")  # the limit itself is fine


async def test_the_async_clients_reads_are_awaitable(client: DripClient) -> None:
    session = await client.create_session("alice", "default", "1")
    assert [u["user_id"] for u in await client.list_users()] == ["alice"]
    assert await client.usage("alice") == []
    assert (await client.get_session(session.id))["public_id"] == session.public_id


def test_a_closed_client_opens_only_what_it_owns(sqlite_url: str, tmp_path: Any) -> None:
    # a client that opened its own ledger opens it again on use (an app served twice)
    with DripClient(DripConfig(database_url=sqlite_url)) as c:
        c.sync.provision_user("u", initial_balance="1")
    assert c.sync.get_user("u")["user_id"] == "u"
    c.close()
    # a ledger given to a client is the giver's: closing the client neither closes it nor
    # lets the client open another one (from its config) behind the caller's back
    led = open_ledger(sqlite_url)
    given = DripClient(DripConfig(database_url=f"sqlite:///{tmp_path}/other.db"), ledger=led)
    assert given.sync.get_user("u")["user_id"] == "u"
    given.close()
    with pytest.raises(errors.ClientClosed):
        given.sync.get_user("u")
    assert led.sync.balance("user:u").posted == 1_000_000  # still open
    led.close()
    assert not (tmp_path / "other.db").exists()


def test_one_client_opens_one_ledger_whatever_the_threads(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import drip.metering.client as module

    opened: list[object] = []
    real = module.open_ledger

    def counting(*args: Any, **kwargs: Any) -> Any:
        led = real(*args, **kwargs)
        opened.append(led)
        return led

    monkeypatch.setattr(module, "open_ledger", counting)
    c = DripClient(DripConfig(database_url=sqlite_url))
    barrier = threading.Barrier(8)

    def first_use(i: int) -> None:
        barrier.wait()
        c.sync.provision_user(f"t{i}", initial_balance="1")

    threads = [threading.Thread(target=first_use, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    c.close()
    assert len(opened) == 1


async def test_a_session_prints_without_its_token_and_replays_say_so(client: DripClient) -> None:
    session = await client.create_session("alice", "default", "1")
    assert session.id not in repr(session) and session.public_id in repr(session)
    first = await client.debit("alice", "0.5", "search", idempotency_key="order-1")
    again = await client.debit("alice", "0.5", "search", idempotency_key="order-1")
    assert not first.replayed and again.replayed
    assert (await client.get_user("alice"))["balance_usdc"] == Decimal("9.5")


async def test_the_session_token_never_follows_a_redirect_elsewhere() -> None:
    token = "ds_" + "A" * 43
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("x-drip-session")))
        if request.url.path == "/export":
            return httpx.Response(302, headers={"location": "https://cdn.other.example/f"})
        if request.url.path == "/here":
            return httpx.Response(302, headers={"location": "/there"})
        return httpx.Response(200)

    transport = httpx.MockTransport(handler)
    base = "https://api.provider.example"
    with session_client(token, base_url=base, transport=transport, follow_redirects=True) as h:
        h.get("/export")
        h.get("/here")
    async with async_session_client(token, base_url=base, transport=transport,
                                    follow_redirects=True) as ah:  # fmt: skip
        await ah.get("/export")
    assert seen == [
        (f"{base}/export", token), ("https://cdn.other.example/f", None),
        (f"{base}/here", token), (f"{base}/there", token),
        (f"{base}/export", token), ("https://cdn.other.example/f", None),
    ]  # fmt: skip


def test_a_replaced_default_client_is_closed_once_its_calls_are_done(tmp_path: Any) -> None:
    import time

    import drip

    module = importlib.import_module("drip.metering.meter")
    saved = module._default_client
    module._default_client = None
    try:
        first = drip.configure(database_url=f"sqlite:///{tmp_path}/a.db", hold_timeout_s=1)
        first.sync.provision_user("u", initial_balance="1")
        started, go_on = threading.Event(), threading.Event()

        @drip.meter(cost="0.5", event="slow")
        def slow(user_id: str) -> str:
            started.set()
            go_on.wait(10)
            return "done"

        results: list[object] = []
        worker = threading.Thread(target=lambda: results.append(slow("u")))
        worker.start()
        started.wait(10)
        drip.configure(database_url=f"sqlite:///{tmp_path}/b.db")
        time.sleep(1.5)  # past the hold's lifetime: the call still runs on the old client
        assert first._ledger is not None
        go_on.set()
        worker.join(10)
        assert results == ["done"] and first._ledger is None  # charged late, then closed
        assert first not in module._retired
        with DripClient(DripConfig(database_url=f"sqlite:///{tmp_path}/a.db")) as check:
            assert check.sync.get_user("u")["balance_usdc"] == Decimal("0.5")
        idle = drip.configure(database_url=f"sqlite:///{tmp_path}/c.db")
        idle.sync.provision_user("v")
        drip.configure(database_url=f"sqlite:///{tmp_path}/d.db")
        assert idle._ledger is None  # nothing in flight: closed at once
    finally:
        if module._default_client is not None:
            module._default_client.close()
        module._close_retired()
        module._default_client = saved


def test_wallets_of_longer_ids_made_before_the_limit_still_work(sqlite_url: str) -> None:
    old = "u" * 153  # provisionable before USER_ID_MAX (the ledger allows 160 in all)
    led = open_ledger(sqlite_url)
    led.sync.create_account(f"user:{old}", "wallet", owner=old)
    led.close()
    with DripClient(DripConfig(database_url=sqlite_url)) as c:
        c.sync.topup(old, "1")
        assert c.sync.get_user(old)["balance_usdc"] == Decimal("1")
        c.sync.debit(old, "0.25", "search")
        assert c.sync.get_user(old)["balance_usdc"] == Decimal("0.75")


def test_a_printed_config_masks_a_password_given_as_a_parameter() -> None:
    for url in ("postgresql://drip@db/drip?password=s3cret",
                "postgresql:///drip?user=drip&password=s3cret&sslmode=require"):  # fmt: skip
        config = DripConfig(database_url=url)
        assert "s3cret" not in repr(config) and "password=***" in repr(config)


def test_a_call_starting_while_its_client_is_retired_runs_on_a_ledger_that_stays_open(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """configure() decided the old client was idle, then closed its ledger a moment
    later; a call that counted itself in between took its hold on that ledger and
    failed with StoreError after its work ran. The ledger is now let go of in the same
    step as the count is read: such a call opens a fresh one."""
    module = importlib.import_module("drip.metering.meter")
    saved = module._default_client
    module._default_client = None
    try:
        first = module.configure(DripConfig(database_url=f"sqlite:///{tmp_path}/d.db"))
        first.sync.provision_user("u", initial_balance="10")
        closing, running, closed = threading.Event(), threading.Event(), threading.Event()

        def slowly(real: Any) -> Any:
            def slow(*args: Any) -> Any:  # preempted right after retire() decided
                if closed.is_set():
                    return real(*args)
                closing.set()
                running.wait(5)
                try:
                    return real(*args)
                finally:
                    closed.set()

            return slow

        # whichever way the retirement closes the ledger (close(), or letting go of it
        # under the lock first), it is held up while the call runs
        monkeypatch.setattr(first, "close", slowly(first.close))
        if hasattr(first, "_close_detached"):
            monkeypatch.setattr(first, "_close_detached", slowly(first._close_detached))
        monkeypatch.setattr(module, "default_client", lambda: first)  # fetched before

        @module.meter("0.1", "llm")
        def call(user_id: str) -> int:
            running.set()
            closed.wait(5)
            return 1

        other = DripConfig(database_url=f"sqlite:///{tmp_path}/e.db")
        retiring = threading.Thread(target=module.configure, args=(other,))
        retiring.start()
        closing.wait(5)
        assert call(user_id="u") == 1
        retiring.join(10)
        assert last_charge() is not None and first._ledger is None
        with DripClient(DripConfig(database_url=f"sqlite:///{tmp_path}/d.db")) as check:
            assert check.sync.get_user("u")["balance_usdc"] == Decimal("9.9")
    finally:
        monkeypatch.undo()
        if module._default_client is not None:
            module._default_client.close()
        module._close_retired()
        module._default_client = saved


async def test_a_user_id_no_path_could_reach_is_refused(client: DripClient) -> None:
    with pytest.raises(errors.InvalidId) as info:
        await client.provision_user("team/a", initial_balance="1")
    assert info.value.param == "user_id"
    assert [u["user_id"] for u in await client.list_users()] == ["alice"]
