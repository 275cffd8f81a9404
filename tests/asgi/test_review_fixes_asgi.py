"""DripMeter, found by review: an app's own ``root_path`` hid a priced route, Starlette's
``BaseHTTPMiddleware`` turned every response into a stream, a method-less key priced CORS
preflights, a ``Price`` built directly was never checked, a failed balance read answered
a charged call 500, the example served tokens it never billed, and the README's
``payer=`` trusted a header any client sets."""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from starlette.middleware.base import RequestResponseEndpoint

from drip import DripClient, DripConfig, errors
from drip.asgi import DripMeter, Price, price
from drip.asgi.middleware import RouteTable

ROOT = Path(__file__).resolve().parents[2]
PROVIDER = "review"


@pytest.fixture
def client(store_url: str) -> Iterator[DripClient]:
    c = DripClient(DripConfig(database_url=store_url, provider=PROVIDER))
    c.sync.provision_user("payer", initial_balance="1")
    try:
        yield c
    finally:
        c.close()


def token(client: DripClient) -> str:
    return str(client.sync.create_session("payer", PROVIDER, "1").id)


def spent(client: DripClient, tok: str) -> tuple[int, int]:
    state = client.sync.get_session(tok)
    return int(state["spent"]), int(state["pending"])


def search_api(ran: list[str], **kw: Any) -> FastAPI:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FastAPI(root_path=...) is deprecated, still used
        api = FastAPI(**kw)

    @api.get("/search")
    async def search() -> dict[str, str]:
        ran.append("search")
        return {"results": "paid content"}

    return api


# 1. an app's own root_path


def test_an_apps_own_root_path_does_not_serve_a_priced_route_free(
    client: DripClient, run_app: Callable[[object], str]
) -> None:
    """``FastAPI(root_path="/api")`` sets the scope's root_path in its own ``__call__``,
    after DripMeter priced the request, and routes ``/api/search`` to ``/search``."""
    ran: list[str] = []
    routes = {"GET /search": price("search", "0.007")}
    direct = DripMeter(search_api(ran, root_path="/api"), client=client, routes=routes)
    # wrapped in another middleware (``.app``) before DripMeter: found through the chain
    wrapped = DripMeter(CORSMiddleware(search_api(ran, root_path="/api"), allow_origins=["*"]),
                        client=client, routes=routes)  # fmt: skip
    tok = token(client)
    for app in (direct, wrapped):
        with httpx.Client(base_url=run_app(app)) as http:
            assert http.get("/api/search").status_code == 402
            assert http.get("/search").status_code == 402
            assert ran == []
            r = http.get("/api/search", headers={"X-Drip-Session": tok})
        assert r.status_code == 200 and r.headers["x-drip-charged"] == "0.007"
        assert ran == ["search"]
        ran.clear()
    assert spent(client, tok) == (14_000, 0)


def test_the_app_root_is_the_most_specific_path() -> None:
    class App:
        root_path = "/api"

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None: ...

    table = RouteTable({"/search": price("inner", "0.01"), "/api/search": price("full", "0.02")},
                       Price, "price", app=App())  # fmt: skip
    found = table.for_scope({"type": "http", "method": "GET", "path": "/api/search"})
    assert found is not None and found.event == "inner"  # what the app routes /api/search to
    plain = RouteTable({"/search": price("inner", "0.01")}, Price, "price")
    assert plain.for_scope({"type": "http", "method": "GET", "path": "/api/search"}) is None


# 2. BaseHTTPMiddleware


def test_a_response_through_base_http_middleware_is_complete(
    client: DripClient, run_app: Callable[[object], str]
) -> None:
    """``@app.middleware("http")`` re-sends a plain response as its whole body with
    ``more_body=True``, then an empty last chunk: still one complete, captured response."""
    ran: list[str] = []
    api = search_api(ran)

    @api.middleware("http")
    async def served_by(request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        response.headers["x-served-by"] = "a"
        return response

    tok = token(client)
    meter = DripMeter(api, client=client, routes={"GET /search": price("search", "0.007")})
    with httpx.Client(base_url=run_app(meter)) as http:
        r = http.get("/search", headers={"X-Drip-Session": tok})
    assert r.status_code == 200 and r.json() == {"results": "paid content"}
    assert r.headers["x-served-by"] == "a"
    assert r.headers["x-drip-charged"] == "0.007"
    assert r.headers["x-drip-balance"] == "0.993"
    assert "x-drip-max-charge" not in r.headers
    receipt = client.ledger.get_transfer(r.headers["x-drip-receipt"])
    assert receipt is not None and receipt.amount == 7_000
    assert spent(client, tok) == (7_000, 0)  # charged once, the empty chunk added nothing


async def test_the_capture_commits_before_the_first_chunk_and_only_once(
    client: DripClient,
) -> None:
    tok = token(client)
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"5")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"hello", "more_body": True})
        sent.append({"spent_before_the_last_chunk": spent(client, tok)})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message["body"]:
            sent.append({"spent_when_the_body_left": spent(client, tok)})
        sent.append(message)

    meter = DripMeter(app, client=client, routes={"/x": price("x", "0.01")})
    await meter(_scope("GET", "/x", tok), receive, send)
    assert sent[0]["type"] == "http.response.start"
    assert dict(sent[0]["headers"])[b"x-drip-charged"] == b"0.01"
    assert sent[1] == {"spent_when_the_body_left": (10_000, 0)}
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert spent(client, tok) == (10_000, 0)


async def test_a_first_chunk_shorter_than_its_content_length_is_still_a_stream(
    client: DripClient,
) -> None:
    tok = token(client)
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"10")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"hello", "more_body": True})
        await send({"type": "http.response.body", "body": b"world", "more_body": False})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    meter = DripMeter(app, client=client, routes={"/x": price("x", "0.01")})
    await meter(_scope("GET", "/x", tok), _receive, send)
    headers = dict(sent[0]["headers"])
    assert b"x-drip-max-charge" in headers and b"x-drip-charged" not in headers
    assert spent(client, tok) == (10_000, 0)


# 3. OPTIONS


def test_a_cors_preflight_is_not_metered_by_a_method_less_key(
    client: DripClient, run_app: Callable[[object], str]
) -> None:
    ran: list[str] = []
    api = FastAPI()
    api.add_middleware(CORSMiddleware, allow_origins=["https://app.example"],
                       allow_headers=["x-drip-session"], allow_methods=["*"])  # fmt: skip

    @api.post("/v1/chat")
    async def chat() -> dict[str, int]:
        ran.append("chat")
        return {"ok": 1}

    tok = token(client)
    meter = DripMeter(api, client=client, routes={"/v1/chat": price("chat", "0.01"),
                                                  "/v1/*": price("any", "0.02")})  # fmt: skip
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "x-drip-session"}  # fmt: skip
    with httpx.Client(base_url=run_app(meter)) as http:
        pre = http.options("/v1/chat", headers=preflight)
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        with_session = http.options("/v1/chat", headers={**preflight, "X-Drip-Session": tok})
        assert with_session.status_code == 200 and "x-drip-charged" not in with_session.headers
        assert http.options("/v1/other", headers=preflight).status_code == 200  # glob too
        assert spent(client, tok) == (0, 0)
        assert http.post("/v1/chat").status_code == 402  # the call itself is still priced
        r = http.post("/v1/chat", headers={"X-Drip-Session": tok})
    assert r.status_code == 200 and r.headers["x-drip-charged"] == "0.01"
    assert ran == ["chat"] and spent(client, tok) == (10_000, 0)


def test_a_key_naming_options_prices_it() -> None:
    table = RouteTable({"OPTIONS /x": price("opt", "0.01"), "/x": price("any", "0.02"),
                        "OPTIONS /g/*": price("gopt", "0.01")}, Price, "price")  # fmt: skip
    assert table.find("OPTIONS", ("/x",)) == price("opt", "0.01")
    assert table.find("options", ("/g/a",)) == price("gopt", "0.01")
    assert table.find("POST", ("/x",)) == price("any", "0.02")
    assert RouteTable({"* /x": price("any", "0.02")}, Price, "price").find(
        "OPTIONS", ("/x",)) is None  # fmt: skip


# 4. Price built directly


@pytest.mark.parametrize(
    "kwargs",
    [
        {"event": "zero"},
        {"event": "neg", "per_call": -5000},
        {"event": "str", "per_call": "0.01"},
        {"event": "float", "per_call": 10.0},
        {"event": "bool", "per_call": True},
        {"event": "bad event!", "per_call": 10},
        {"event": 7, "per_call": 10},
        {"event": "nomax", "per_unit": 1000},
        {"event": "negunit", "per_call": 10_000, "per_unit": -1000, "max_units": 5},
        {"event": "negmax", "per_call": 10_000, "per_unit": 1000, "max_units": -5},
        {"event": "huge", "per_unit": 2**40, "max_units": 2**40},
        {"event": "redir", "per_call": 10, "charge_redirects": "no"},
    ],
)
def test_a_price_built_directly_is_checked_at_construction(kwargs: dict[str, Any]) -> None:
    with pytest.raises(errors.ConfigError):
        Price(**kwargs)


def test_a_valid_price_built_directly_is_the_same_as_price() -> None:
    assert Price("search", per_call=7_000) == price("search", "0.007")
    assert Price("tokens", per_unit=2, max_units=4096) == price(
        "tokens", per_unit="0.000002", max_units=4096)  # fmt: skip


# 5. a failed balance read after the capture


def test_a_failed_balance_read_still_answers_the_charged_call(
    client: DripClient,
    run_app: Callable[[object], str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[str] = []
    led = client.ledger

    def failing_balance(account: str) -> Any:
        raise errors.StoreError("connection lost")

    monkeypatch.setattr(led, "remembered_balance", lambda account: None)
    monkeypatch.setattr(led, "balance", failing_balance)
    tok = token(client)
    meter = DripMeter(search_api(ran), client=client,
                      routes={"GET /search": price("search", "0.007")})  # fmt: skip
    with caplog.at_level(logging.ERROR, "drip.asgi"), httpx.Client(base_url=run_app(meter)) as http:
        r = http.get("/search", headers={"X-Drip-Session": tok})
    assert r.status_code == 200 and r.json() == {"results": "paid content"}
    assert r.headers["x-drip-charged"] == "0.007" and "x-drip-balance" not in r.headers
    receipt = client.ledger.get_transfer(r.headers["x-drip-receipt"])
    assert receipt is not None and receipt.amount == 7_000
    assert ran == ["search"] and spent(client, tok) == (7_000, 0)
    assert any("X-Drip-Balance left out" in rec.getMessage() for rec in caplog.records)


# 6. the example's /generate


def test_the_example_serves_no_more_tokens_than_it_bills(
    store_url: str, run_app: Callable[[object], str]
) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    from provider_app import PROVIDER as EXAMPLE
    from provider_app import build

    app, c, ran = build(store_url)
    try:
        c.sync.provision_user("buyer", initial_balance="1")
        tok = str(c.sync.create_session("buyer", EXAMPLE, "1").id)
        with httpx.Client(base_url=run_app(app), headers={"X-Drip-Session": tok}) as http:
            too_many = http.get("/generate", params={"n": 150})
            assert too_many.status_code == 422 and "token" not in too_many.text
            assert too_many.headers["x-drip-charged"] == "0"
            assert http.get("/generate", params={"n": -1}).status_code == 422
            r = http.get("/generate", params={"n": 100})
        assert r.status_code == 200 and r.text.count("token") == 100
        assert ran["generate"] == 1
        state = c.sync.get_session(tok)
        assert (int(state["spent"]), int(state["pending"])) == (100_000, 0)
    finally:
        c.close()


# 7. the README's payer= example


def readme_payer() -> Callable[[dict[str, Any]], str | None]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Metering a provider's API", 1)[1].split("\n## ", 1)[0]
    found = re.findall(r"`(lambda scope:[^`]*)`", section)
    assert len(found) == 1, found
    payer: Callable[[dict[str, Any]], str | None] = eval(found[0])
    return payer


def test_the_readme_payer_reads_authenticated_state_not_a_header(client: DripClient) -> None:
    payer = readme_payer()
    assert payer({"headers": [(b"x-user-id", b"payer")]}) is None
    assert payer({"headers": [(b"x-user-id", b"payer")], "state": {}}) is None
    assert payer({"headers": [], "state": {"user_id": "payer"}}) == "payer"


async def test_the_readme_payer_behind_an_auth_layer_bills_only_the_authenticated_user(
    client: DripClient,
) -> None:
    ran: list[str] = []

    async def api(scope: Any, receive: Any, send: Any) -> None:
        ran.append("search")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    meter = DripMeter(api, client=client, routes={"/search": price("search", "0.01")},
                      payer=readme_payer())  # fmt: skip
    keys = {"Bearer key-of-payer": "payer"}

    async def auth(scope: Any, receive: Any, send: Any) -> None:
        """An authentication layer around DripMeter: it runs first and sets the state."""
        user = keys.get(dict(scope["headers"]).get(b"authorization", b"").decode())
        if user is not None:
            scope.setdefault("state", {})["user_id"] = user
        await meter(scope, receive, send)

    async def call(headers: list[tuple[bytes, bytes]]) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/search", "root_path": "",
                 "headers": headers, "query_string": b""}  # fmt: skip
        await auth(scope, _receive, send)
        return sent

    forged = await call([(b"x-user-id", b"payer")])
    assert forged[0]["status"] == 402 and ran == []
    paid = await call([(b"authorization", b"Bearer key-of-payer")])
    assert paid[0]["status"] == 200 and dict(paid[0]["headers"])[b"x-drip-charged"] == b"0.01"
    assert ran == ["search"]
    assert client.sync.get_user("payer")["balance_usdc"] == Decimal("0.99")


def _scope(method: str, path: str, tok: str) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "root_path": "",
            "headers": [(b"x-drip-session", tok.encode())], "query_string": b""}  # fmt: skip


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def test_a_per_unit_stream_with_a_content_length_is_charged_its_units() -> None:
    """A streamed response that declares content-length and sends it all in its first
    chunk may still report its units after that chunk: a per-unit route is captured at
    the stream's end, with them (the early capture is only for per-call prices)."""
    import tempfile

    import httpx
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    from drip import DripClient, DripConfig
    from drip.asgi import DripMeter, price, report_units

    client = DripClient(DripConfig(database_url=f"sqlite:///{tempfile.mkdtemp()}/w.db",
                                   provider="p"))  # fmt: skip
    api = FastAPI()

    @api.get("/file")
    async def file(request: Request) -> StreamingResponse:
        data = b"x" * 100

        async def gen():  # type: ignore[no-untyped-def]
            yield data
            report_units(request.scope, 50)  # counted once it was sent

        return StreamingResponse(gen(), headers={"content-length": str(len(data))})

    app = DripMeter(api, client=client,
                    routes={"GET /file": price("dl", per_unit="0.001", max_units=100)},
                    payer=lambda scope: "u")  # fmt: skip
    try:
        await client.provision_user("u", initial_balance="1")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            r = await http.get("/file")
        assert r.status_code == 200 and len(r.content) == 100
        assert str((await client.get_user("u"))["balance_usdc"]) == "0.950000"
    finally:
        client.close()
