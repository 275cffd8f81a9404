"""The REST API through real HTTP: auth, wallets, idempotency, errors, ops endpoints."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import httpx
import pytest

Server = Any  # the fixture in tests/server/conftest.py


def _error(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "code", "message", "param"}
    return dict(body["error"])


def test_health_metrics_and_openapi(server: Server) -> None:
    with server.client() as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/openapi.json").json()["info"]["title"] == "Drip"
        assert http.get("/docs").status_code == 200
        metrics = http.get("/metrics").text
    assert "drip_http_requests_total" in metrics
    assert 'route="/healthz"' in metrics
    assert "user_id=" not in metrics  # no per-user labels


def test_every_v1_route_needs_a_valid_key(server: Server) -> None:
    with server.client() as http:
        for token in (None, "nonsense", "drip_sk_abc_def", server.admin + "x"):
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            r = http.get("/v1/wallets", headers=headers)
            assert r.status_code == 401
            assert _error(r)["code"] == "unauthenticated"
            assert r.headers["WWW-Authenticate"] == "Bearer"


def test_read_keys_cannot_move_money(server: Server) -> None:
    with server.client(server.reader) as http:
        assert http.get("/v1/wallets").status_code == 200
        r = http.post("/v1/wallets", json={"user_id": "u1"})
        assert r.status_code == 403 and _error(r)["code"] == "forbidden"
        r = http.post("/v1/wallets/u1/topup", json={"amount": "1"},
                      headers={"Idempotency-Key": "k1"})  # fmt: skip
        assert r.status_code == 403
    with server.client(server.admin) as http:
        assert http.get("/v1/wallets").json()["data"] == []


def test_revoked_keys_are_refused(server: Server, store_url: str) -> None:
    from drip.config import DripConfig
    from drip.metering import DripClient
    from drip.server.keys import KeyStore

    client = DripClient(DripConfig(database_url=store_url))
    try:
        keys = KeyStore(client.ledger.store)
        token, key = keys.create("admin")
        with server.client(token) as http:
            assert http.get("/v1/wallets").status_code == 200
            keys.revoke(key.key_id)
            assert http.get("/v1/wallets").status_code == 401
        assert all(k.key_id for k in keys.list())
        # secrets are never stored: only their digests
        stored = client.ledger.store.query("SELECT secret_sha256 FROM api_keys")
        secret = token.removeprefix("drip_sk_").partition("_")[2]
        assert len(secret) >= 40 and all(secret not in row[0] for row in stored)
    finally:
        client.close()


def test_wallet_lifecycle(server: Server) -> None:
    with server.client(server.admin) as http:
        r = http.post("/v1/wallets", json={"user_id": "alice", "email": "a@example.com",
                                           "initial_balance": "5.00"})  # fmt: skip
        assert r.status_code == 201
        assert r.json()["available"] == {"usdc": "5", "atomic": 5_000_000}
        r = http.get("/v1/wallets/alice")
        assert r.json()["status"] == "active" and r.json()["email"] == "a@example.com"
        r = http.post("/v1/wallets/alice/topup", json={"amount": "2.50"},
                      headers={"Idempotency-Key": "top-1"})  # fmt: skip
        assert r.status_code == 200
        assert r.json()["wallet"]["available"]["atomic"] == 7_500_000
        r = http.post("/v1/wallets/alice/adjust", json={"amount": "-0.5", "reason": "refund"},
                      headers={"Idempotency-Key": "adj-1"})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["amount"] == {"usdc": "-0.5", "atomic": -500_000}
        assert r.json()["wallet"]["available"]["atomic"] == 7_000_000
        listed = http.get("/v1/wallets", params={"limit": 10}).json()
        assert [w["user_id"] for w in listed["data"]] == ["alice"]


def test_idempotency_key_replays_and_conflicts(server: Server) -> None:
    with server.client(server.admin) as http:
        http.post("/v1/wallets", json={"user_id": "bob"})
        headers = {"Idempotency-Key": "same"}
        first = http.post("/v1/wallets/bob/topup", json={"amount": "1"}, headers=headers)
        again = http.post("/v1/wallets/bob/topup", json={"amount": "1"}, headers=headers)
        assert first.status_code == again.status_code == 200
        assert first.json() == again.json()
        conflict = http.post("/v1/wallets/bob/topup", json={"amount": "2"}, headers=headers)
        assert conflict.status_code == 409
        assert _error(conflict)["code"] == "idempotency_conflict"
        missing = http.post("/v1/wallets/bob/topup", json={"amount": "1"})
        assert missing.status_code == 400 and _error(missing)["param"] == "Idempotency-Key"
        assert http.get("/v1/wallets/bob").json()["available"]["atomic"] == 1_000_000


def test_a_key_whose_request_died_is_taken_over_after_its_lease(
    server: Server, store_url: str
) -> None:
    """A request that died between moving the money and storing its answer (a crash, a
    forced shutdown) leaves its key claimed: retries get 409 until the claim's lease
    runs out, then one of them runs again, which the ledger answers as a replay."""
    from drip.ledger import open_ledger
    from drip.server.idempotency import CLAIM_LEASE_S, IN_PROGRESS

    headers = {"Idempotency-Key": "died"}
    with server.client(server.admin) as http:
        http.post("/v1/wallets", json={"user_id": "dan"})
        first = http.post("/v1/wallets/dan/topup", json={"amount": "1"}, headers=headers)
        assert first.status_code == 200
    other = open_ledger(store_url)  # as if that request had died before answering
    try:

        def died(ago_s: float) -> None:
            other.store.execute(
                "UPDATE http_idempotency SET status = ?, response = 'null', created_us = ? "
                "WHERE idem_key = 'died'",
                (IN_PROGRESS, time.time_ns() // 1000 - int(ago_s * 1_000_000)),
            )

        died(1)
        with server.client(server.admin) as http:
            early = http.post("/v1/wallets/dan/topup", json={"amount": "1"}, headers=headers)
        assert early.status_code == 409 and "being processed" in _error(early)["message"]
        died(CLAIM_LEASE_S + 1)
        with server.client(server.admin) as http:
            late = http.post("/v1/wallets/dan/topup", json={"amount": "1"}, headers=headers)
            again = http.post("/v1/wallets/dan/topup", json={"amount": "1"}, headers=headers)
            balance = http.get("/v1/wallets/dan").json()["available"]["atomic"]
    finally:
        other.close()
    assert late.status_code == again.status_code == 200
    assert late.json()["transfer_id"] == first.json()["transfer_id"] == again.json()["transfer_id"]
    assert balance == 1_000_000  # credited once


def test_a_taken_over_request_can_neither_release_nor_answer_its_key(
    store_url: str, monkeypatch: Any
) -> None:
    from drip.ledger import open_store
    from drip.server import idempotency

    store = open_store(store_url)
    try:
        responses = idempotency.Responses(store)
        now = [1_000_000_000_000]
        monkeypatch.setattr(idempotency, "wall_clock_us", lambda: now[0])
        record = ("k1", "idem-1", "POST", "/v1/checkout", "digest")
        slow = responses.claim(*record)  # request A: alive, but slower than the lease
        now[0] += (idempotency.CLAIM_LEASE_S + 1) * 1_000_000
        assert responses.find(*record) is None
        newer = responses.claim(*record)  # request B takes the key over
        assert slow is not None and newer is not None and newer != slow
        responses.release("k1", "idem-1", slow)  # A fails: B's claim stays
        assert responses.claim(*record) is None  # so a third request does not run
        responses.complete("k1", "idem-1", newer, 201, {"id": "B"})
        responses.complete("k1", "idem-1", slow, 201, {"id": "A"})  # too late: B's stays
        assert responses.find(*record) == (201, {"id": "B"})
    finally:
        store.close()


def test_concurrent_duplicates_credit_once(server: Server) -> None:
    with server.client(server.admin) as http:
        http.post("/v1/wallets", json={"user_id": "carol"})

    def send(_: int) -> tuple[int, Any]:
        with server.client(server.admin) as http:
            r = http.post("/v1/wallets/carol/topup", json={"amount": "0.25"},
                          headers={"Idempotency-Key": "race"})  # fmt: skip
            return r.status_code, r.json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, range(16)))
    # twins that arrived while the first ran were told 409 "being processed"; retried
    # afterwards, they get the stored answer
    assert all(status == 200 or "being processed" in str(body) for status, body in results)
    results = [send(0) if status == 409 else (status, body) for status, body in results]
    assert {status for status, _ in results} == {200}
    assert len({body["transfer_id"] for _, body in results}) == 1
    with server.client(server.admin) as http:
        assert http.get("/v1/wallets/carol").json()["available"]["atomic"] == 250_000


def test_bad_input_is_4xx_in_the_error_shape(server: Server) -> None:
    with server.client(server.admin) as http:
        http.post("/v1/wallets", json={"user_id": "dave", "initial_balance": "1"})
        cases = [
            ("post", "/v1/wallets", {"json": {"user_id": "x y"}}, 400, "invalid_id"),
            ("post", "/v1/wallets", {"json": {"user_id": "e", "initial_balance": "-1"}}, 400,
             "invalid_amount"),
            ("post", "/v1/wallets", {"json": {}}, 422, "validation_error"),
            ("post", "/v1/wallets", {"content": b"{not json"}, 422, "validation_error"),
            ("get", "/v1/wallets/nobody", {}, 404, "user_not_found"),
            ("get", "/v1/nothing-here", {}, 404, "not_found"),
            ("post", "/v1/wallets/dave/topup", {"json": {"amount": "1e400"},
             "headers": {"Idempotency-Key": "b1"}}, 400, "invalid_amount"),
            ("post", "/v1/wallets/dave/topup", {"json": {"amount": "0.0000001"},
             "headers": {"Idempotency-Key": "b2"}}, 400, "invalid_amount"),
            ("post", "/v1/wallets/nobody/topup", {"json": {"amount": "1"},
             "headers": {"Idempotency-Key": "b3"}}, 404, "user_not_found"),
            ("post", "/v1/wallets/dave/adjust", {"json": {"amount": "-5", "reason": "x"},
             "headers": {"Idempotency-Key": "b4"}}, 402, "insufficient_credits"),
            ("post", "/v1/wallets/dave/topup", {"json": {"amount": "1"},
             "headers": {"Idempotency-Key": "bad key!"}}, 400, "invalid_request"),
            ("get", "/v1/wallets", {"params": {"limit": 0}}, 422, "validation_error"),
        ]  # fmt: skip
        for method, path, kwargs, status, code in cases:
            r = getattr(http, method)(path, **kwargs)
            assert r.status_code == status, (path, kwargs, r.text)
            assert _error(r)["code"] == code, (path, kwargs, r.text)
        # nothing moved
        assert http.get("/v1/wallets/dave").json()["available"]["atomic"] == 1_000_000
        assert [w["user_id"] for w in http.get("/v1/wallets").json()["data"]] == ["dave"]


def test_usage_endpoint(server: Server, store_url: str) -> None:
    import asyncio

    from drip.config import DripConfig
    from drip.metering import DripClient

    async def spend() -> None:
        client = DripClient(DripConfig(database_url=store_url))
        try:
            await client.provision_user("erin", initial_balance="1")
            for _ in range(3):
                await client.debit("erin", "0.01", "search")
        finally:
            client.close()

    asyncio.run(spend())
    with server.client(server.reader) as http:
        rows = http.get("/v1/usage", params={"user_id": "erin"}).json()["data"]
    assert [(r["event"], r["calls"], r["amount"]["atomic"]) for r in rows] == [
        ("search", 3, 30_000)
    ]


def test_sessions_over_http(server: Server, store_url: str) -> None:
    import httpx

    from drip.config import DripConfig
    from drip.metering import DripClient
    from drip.metering.http import DripSessionAuth

    with server.client(server.admin) as http:
        http.post("/v1/wallets", json={"user_id": "sam", "initial_balance": "1"})
        r = http.post("/v1/sessions", json={"user_id": "sam", "provider": "default",
                                            "budget": "0.02", "expires_in_s": 600,
                                            "policy": {"max_per_call": "0.01"}})  # fmt: skip
        assert r.status_code == 201, r.text
        created = r.json()
        token, public_id = created["token"], created["public_id"]
        assert created["budget"] == {"usdc": "0.02", "atomic": 20_000}
        assert created["status"] == "open" and token.startswith("ds_")
    # the caller spends it through the SDK, as a provider's middleware would
    client = DripClient(DripConfig(database_url=store_url))
    try:

        @client.meter(cost="0.01", event="search", session_param="session")
        def search(session: str) -> int:
            return 1

        search(session=token)
    finally:
        client.close()
    with httpx.Client(base_url=server.url, auth=DripSessionAuth(token)) as caller:
        mine = caller.get("/v1/sessions/current").json()
        assert mine["spent"]["atomic"] == 10_000 and mine["remaining"]["atomic"] == 10_000
    with server.client(server.reader) as http:
        assert http.get(f"/v1/sessions/{public_id}").json()["spent"]["atomic"] == 10_000
        assert http.post(f"/v1/sessions/{public_id}/close").status_code == 403
    with server.client(server.admin) as http:
        closed = http.post(f"/v1/sessions/{public_id}/close").json()
        assert closed["status"] == "closed" and closed["remaining"]["atomic"] == 0
        bad = [
            ({"user_id": "sam", "provider": "default", "budget": "-1"}, 400, "invalid_amount"),
            ({"user_id": "nobody", "provider": "default", "budget": "1"}, 404,
             "user_not_found"),
            ({"user_id": "sam", "provider": "default", "budget": "1",
              "policy": {"per_minute": 1}}, 400, "invalid_request"),
            ({"user_id": "sam", "provider": "default"}, 422, "validation_error"),
        ]  # fmt: skip
        for body, status, code in bad:
            r = http.post("/v1/sessions", json=body)
            assert r.status_code == status and _error(r)["code"] == code, r.text
        for path in ("/v1/sessions/" + "0" * 40, "/v1/sessions/not-an-id"):
            assert _error(http.get(path))["code"] == "session_not_found"
    with httpx.Client(base_url=server.url) as anonymous:
        r = anonymous.get("/v1/sessions/current", headers={"X-Drip-Session": "ds_" + "x" * 43})
        assert r.status_code == 404 and _error(r)["code"] == "session_not_found"
        assert anonymous.get("/v1/sessions/current").status_code == 422


def test_usage_filters_csv_and_wallet_history(server: Server) -> None:
    with server.client(server.admin) as http:
        http.post("/v1/wallets", json={"user_id": "fay", "initial_balance": "1"})
        for i, event in enumerate(["search", "search", "scrape"]):
            r = http.post("/v1/charges", json={"amount": "0.01", "event": event,
                                               "user_id": "fay"},
                          headers={"Idempotency-Key": f"u{i}"})  # fmt: skip
            assert r.status_code == 200, r.text
    with server.client(server.reader) as http:
        rows = http.get("/v1/usage", params={"user_id": "fay", "event": "search"}).json()
        assert [(r["event"], r["calls"]) for r in rows["data"]] == [("search", 2)]
        future = http.get("/v1/usage", params={"user_id": "fay", "since_us": 2**62}).json()
        assert future["data"] == []
        csv_text = http.get("/v1/usage", params={"user_id": "fay", "format": "csv"})
        assert csv_text.headers["content-type"].startswith("text/csv")
        lines = csv_text.text.strip().splitlines()
        assert lines[0] == "bucket_start,event,calls,amount_usdc,amount_atomic"
        assert sorted(line.split(",", 1)[1] for line in lines[1:]) == [
            "scrape,1,0.01,10000", "search,2,0.02,20000"]  # fmt: skip
        assert http.get("/v1/usage", params={"format": "xml"}).status_code == 422
        page1 = http.get("/v1/wallets/fay/transfers", params={"limit": 2}).json()
        assert len(page1["data"]) == 2 and page1["next_cursor"]
        page2 = http.get("/v1/wallets/fay/transfers",
                         params={"limit": 2, "cursor": page1["next_cursor"]}).json()  # fmt: skip
        ids = [t["id"] for t in page1["data"] + page2["data"]]
        assert len(ids) == len(set(ids)) == 4  # 3 charges + the initial top-up
        bad = http.get("/v1/wallets/fay/transfers", params={"cursor": "garbage!"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "cursor"


def test_webhook_endpoints(server: Server) -> None:
    with server.client(server.reader) as http:
        assert http.get("/v1/webhook-endpoints").status_code == 403  # admin only
    with server.client(server.admin) as http:
        r = http.post("/v1/webhook-endpoints", json={"url": "https://hooks.example.com/drip",
                                                      "events": ["wallet.*"]})  # fmt: skip
        assert r.status_code == 201, r.text
        created = r.json()
        assert created["secret"].startswith("whsec_") and created["events"] == ["wallet.*"]
        listed = http.get("/v1/webhook-endpoints").json()["data"]
        assert [e["id"] for e in listed] == [created["id"]]
        assert "secret" not in listed[0]
        for body in ({"url": "ftp://x.example.com/a"}, {"url": "https://u:p@x.example.com/"},
                     {"url": "https://x.example.com/", "events": ["bad event"]}):  # fmt: skip
            bad = http.post("/v1/webhook-endpoints", json=body)
            assert bad.status_code == 400, bad.text
        assert http.delete(f"/v1/webhook-endpoints/{created['id']}").status_code == 204
        assert http.get("/v1/webhook-endpoints").json()["data"] == []
        gone = http.delete(f"/v1/webhook-endpoints/{created['id']}")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"


def test_a_request_waiting_on_the_database_does_not_stall_the_server(
    postgres_url: str, run_app: Any
) -> None:
    """Every database call of an endpoint runs off the event loop: while one request
    waits on a PostgreSQL lock, the others are answered."""
    import time

    import httpx
    import psycopg

    from drip.config import DripConfig
    from drip.server import create_app

    app = create_app(DripConfig(database_url=postgres_url))
    admin, _ = app.state.keys.create("admin", "tests")
    url = run_app(app)
    auth = {"Authorization": f"Bearer {admin}"}
    body = {"user_id": "u1", "initial_balance": "1"}
    assert httpx.post(f"{url}/v1/wallets", json=body, headers=auth).status_code == 201
    topup = {"amount": "0.5"}
    locker = psycopg.connect(postgres_url)  # a transaction holding both tables' locks
    try:
        locker.execute("LOCK TABLE accounts, http_idempotency IN ACCESS EXCLUSIVE MODE")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            waiting = [
                pool.submit(httpx.get, f"{url}/v1/wallets/u1", headers=auth, timeout=30),
                pool.submit(httpx.post, f"{url}/v1/wallets/u1/topup", json=topup,
                            headers=auth | {"Idempotency-Key": "t-1"}, timeout=30),
            ]  # fmt: skip
            time.sleep(0.5)
            assert not any(w.done() for w in waiting)  # both wait for the lock
            for _ in range(3):
                started = time.perf_counter()
                assert httpx.get(f"{url}/metrics", timeout=5).status_code == 200
                assert time.perf_counter() - started < 1.0
            locker.rollback()
            responses = [w.result() for w in waiting]
    finally:
        locker.close()
    assert [r.status_code for r in responses] == [200, 200]
    assert responses[1].json()["wallet"]["available"]["usdc"] == "1.5"


def test_amounts_are_exact_or_refused(server: Server) -> None:
    """``true`` is not 1 USDC, and a JSON number with a fraction is a binary float by the
    time it is read (``1.00000000000000001`` reads as 1): both are refused, nothing moves.
    Decimal strings and whole-USDC integers are exact."""
    with server.client(server.admin) as http:
        assert http.post("/v1/wallets", json={"user_id": "exact"}).status_code == 201
        refused = [
            ("/v1/wallets", {"user_id": "exact2", "initial_balance": True}),
            ("/v1/wallets/exact/topup", {"amount": True}),
            ("/v1/wallets/exact/topup", {"amount": 1.00000000000000001}),
            ("/v1/wallets/exact/topup", {"amount": 90071992547.409921}),
            ("/v1/wallets/exact/topup", {"amount": 0.5}),
            ("/v1/checkout", {"user_id": "exact", "amount": True}),
            ("/v1/sessions", {"user_id": "exact", "provider": "default", "budget": True}),
            ("/v1/sessions", {"user_id": "exact", "provider": "default", "budget": "1",
                              "expires_in_s": True}),
            ("/v1/holds", {"amount": "0.1", "event": "e", "user_id": "exact",
                           "timeout_s": True}),
        ]  # fmt: skip
        for i, (path, body) in enumerate(refused):
            r = http.post(path, json=body, headers={"Idempotency-Key": f"exact-{i}"})
            assert r.status_code == 422, (path, body, r.text)
            assert set(_error(r)) == {"type", "code", "message", "param"}
        assert http.get("/v1/wallets/exact").json()["available"]["atomic"] == 0
        assert http.get("/v1/wallets/exact2").status_code == 404
        # (below CREDIT_ATOMIC_MAX, 10^9 USDC: one credit adds no more)
        for i, amount in enumerate(("900719925.474099", 3)):
            r = http.post("/v1/wallets/exact/topup", json={"amount": amount},
                          headers={"Idempotency-Key": f"exact-ok-{i}"})  # fmt: skip
            assert r.status_code == 200, r.text
        assert http.get("/v1/wallets/exact").json()["available"]["atomic"] == 900719928474099


def test_malformed_ids_and_urls_are_4xx_never_500(server: Server) -> None:
    """NUL characters in path ids (PostgreSQL refuses them in text) and URLs that
    ``urlsplit`` cannot parse are the client's mistakes."""
    with server.client(server.admin) as http:
        for url in ("http://[::1", "http://[zz]/x", "http://exa\x00mple.com/hook",
                    "http://example.com/a b"):  # fmt: skip
            r = http.post("/v1/webhook-endpoints", json={"url": url})
            assert r.status_code == 400, (url, r.text)
            assert _error(r)["param"] == "url"
        assert http.delete("/v1/webhook-endpoints/a%00").status_code == 404
        for action in ("capture", "void"):
            r = http.post(f"/v1/holds/a%00b/{action}", json={},
                          headers={"Idempotency-Key": f"nul-{action}"})  # fmt: skip
            assert r.status_code in (400, 404), r.text
            assert set(_error(r)) == {"type", "code", "message", "param"}
        assert http.post("/v1/wallets", json={"user_id": "still-fine"}).status_code == 201


def test_metadata_no_response_could_carry_is_refused_at_the_door(server: Server) -> None:
    """A lone surrogate (``\\ud800``) is valid JSON text but not UTF-8: stored, it would
    make every later read of the wallet, its list and its transfers a 500."""
    poison = b'{"user_id": "mallory", "metadata": {"n": "\\ud800"}}'
    with server.client(server.admin) as http:
        r = http.post("/v1/wallets", content=poison, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text  # refused by the request model
        assert _error(r)["param"] == "metadata"
        assert http.get("/v1/wallets/mallory").status_code == 404
        http.post("/v1/wallets", json={"user_id": "alice", "initial_balance": "1"})
        charge = (b'{"amount": "0.01", "event": "e", "user_id": "alice", '
                  b'"metadata": {"n": "\\udfff"}}')  # fmt: skip
        headers = {"Content-Type": "application/json", "Idempotency-Key": "sur"}
        r = http.post("/v1/charges", content=charge, headers=headers)
        assert r.status_code == 422, r.text
        assert http.get("/v1/wallets").status_code == 200
        assert http.get("/v1/wallets/alice/transfers").status_code == 200


def test_a_body_past_the_limit_is_refused_before_the_key_is_looked_at(server: Server) -> None:
    from drip.server.app import BODY_BYTES_MAX

    def chunked() -> Any:  # no Content-Length: cut off as it streams past the limit
        for _ in range(BODY_BYTES_MAX // 65536 + 2):
            yield b" " * 65536

    for body in (b"{" + b" " * BODY_BYTES_MAX + b"}", chunked()):
        with server.client() as http:  # no key at all
            r = http.post("/v1/wallets", content=body,
                          headers={"Content-Type": "application/json"})  # fmt: skip
        assert r.status_code == 413, r.text
        assert set(_error(r)) == {"type", "code", "message", "param"}


def test_requests_carry_an_id_and_every_outcome_is_counted(
    store_url: str, run_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An X-Request-ID (the caller's if it is sane) on every response, 500s included; the
    metrics count 500s too, and invented methods do not each get a series."""
    from drip.config import DripConfig
    from drip.server.app import create_app

    app = create_app(DripConfig(database_url=store_url))
    admin, _ = app.state.keys.create("admin", "tests")
    url = run_app(app)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug, not the client's")

    monkeypatch.setattr(app.state.client, "list_users_now", broken)
    auth = {"Authorization": f"Bearer {admin}"}
    with httpx.Client(base_url=url, headers=auth) as http:  # a 500 closes its connection
        failed = http.get("/v1/wallets")
        assert failed.status_code == 500 and failed.headers.get("x-request-id")
    with httpx.Client(base_url=url, headers=auth) as http:
        mine = http.get("/healthz", headers={"X-Request-ID": "trace-42"})
        assert mine.headers["x-request-id"] == "trace-42"
        made = http.get("/healthz", headers={"X-Request-ID": "no spaces; no ' either"})
        assert len(made.headers["x-request-id"]) == 32
        for i in range(20):
            http.request(f"X{i:04d}", "/healthz")
        not_allowed = http.patch("/v1/wallets")
        assert not_allowed.status_code == 405 and not_allowed.headers["allow"]
        metrics = http.get("/metrics").text
    assert 'route="/v1/wallets",status="500"' in metrics
    assert 'method="other"' in metrics and 'method="X0001"' not in metrics


def test_usage_is_what_wallets_paid_not_adjustments(server: Server) -> None:
    with server.client(server.admin) as http:
        http.post("/v1/wallets", json={"user_id": "u", "initial_balance": "5"})
        http.post("/v1/charges", json={"amount": "0.01", "event": "search", "user_id": "u"},
                  headers={"Idempotency-Key": "use-1"})  # fmt: skip
        r = http.post("/v1/wallets/u/adjust", json={"amount": "-2", "reason": "correction"},
                      headers={"Idempotency-Key": "use-2"})  # fmt: skip
        assert r.status_code == 200, r.text
        rows = http.get("/v1/usage").json()["data"]
        assert [(row["event"], row["calls"]) for row in rows] == [("search", 1)], rows
        http.post("/v1/charges", json={"amount": "0.01", "event": "-A1/A2", "user_id": "u"},
                  headers={"Idempotency-Key": "use-3"})  # fmt: skip
        csv_text = http.get("/v1/usage", params={"format": "csv"}).text
    assert ",'-A1/A2," in csv_text and ",-A1/A2," not in csv_text


def test_the_openapi_document_says_what_the_server_sends(server: Server) -> None:
    with server.client() as http:
        spec = http.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert [s["scheme"].lower() for s in schemes.values()] == ["bearer"]
    create = spec["paths"]["/v1/wallets"]["post"]
    assert create["security"] and "authorization" not in str(create.get("parameters", []))
    for status in ("401", "402", "409", "413", "422"):
        ref = create["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorBody"), (status, ref)
    detail = spec["components"]["schemas"]["ErrorDetail"]["properties"]
    assert set(detail) == {"type", "code", "message", "param"}
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def test_a_read_that_finds_the_database_down_is_a_503(
    store_url: str, run_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    import psycopg_pool

    from drip.config import DripConfig
    from drip.server.app import create_app

    app = create_app(DripConfig(database_url=store_url))
    url = run_app(app)
    failures = (sqlite3.OperationalError("disk I/O error"),
                psycopg_pool.PoolTimeout("no connection after 30.00 sec"))  # fmt: skip
    for failure in failures:

        def down(*args: Any, _failure: Exception = failure, **kwargs: Any) -> Any:
            raise _failure

        monkeypatch.setattr(app.state.client.ledger.store, "query", down)
        with httpx.Client(base_url=url) as http:
            r = http.get("/healthz")
        assert r.status_code == 503, r.text
        assert _error(r)["code"] == "store_unavailable"
