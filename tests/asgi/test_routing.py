"""Which price a request pays, whatever the price table's order, and what is not a
priced call at all (a redirect, a websocket). Found by review: each was a way to pay
the wrong price, to pay twice, or to run a priced handler unpaid."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect
from x402.http.utils import encode_payment_signature_header
from x402.schemas import PaymentPayload, SettleResponse, VerifyResponse

from drip import DripClient, DripConfig, errors
from drip.asgi import DripMeter, price
from drip.x402.server import X402Meter, x402_price

PROVIDER = "routing"
PAY_TO, ASSET, PAYER = "0x" + "22" * 20, "0x" + "33" * 20, "0x" + "11" * 20


@pytest.fixture
def client(tmp_path: Any) -> Iterator[DripClient]:
    c = DripClient(DripConfig(database_url=f"sqlite:///{tmp_path}/r.db", provider=PROVIDER))
    c.sync.provision_user("payer", initial_balance="10")
    try:
        yield c
    finally:
        c.close()


def api(ran: list[str]) -> Starlette:
    async def ok(request: Request) -> PlainTextResponse:
        ran.append(f"{request.method} {request.url.path}")
        request.state.drip_units = int(request.query_params.get("units", 0))
        return PlainTextResponse("ok")

    async def moved(request: Request) -> RedirectResponse:
        ran.append("moved")
        return RedirectResponse("/v1/search", status_code=303)

    async def socket(ws: WebSocket) -> None:
        ran.append("socket")
        await ws.accept()
        await ws.send_text("premium data")
        await ws.close()

    return Starlette(routes=[
        Route("/v1/{name:path}", ok, methods=["GET", "POST"]),
        Route("/items/{id}", ok),
        Route("/moved", moved),
        Route("/shorten", moved),
        WebSocketRoute("/ws/feed", socket),
    ])  # fmt: skip


def charged(http: httpx.Client, token: str, method: str, path: str) -> str:
    r = http.request(method, path, headers={"X-Drip-Session": token})
    assert r.status_code < 400, r.text
    return r.headers.get("x-drip-charged", "-")


def test_the_most_specific_price_wins_in_any_order(
    client: DripClient, run_app: Callable[[object], str]
) -> None:
    ran: list[str] = []
    table = {  # the cheap catch-all first: it used to win over everything after it
        "/v1/*": price("any", "0.001"),
        "/v1/premium/*": price("premium", "1"),
        "/v1/s*": price("s", "0.002"),
        "GET /v1/search": price("search", "0.5"),
        "POST /v1/premium/*": price("premium_post", "2"),
    }
    token = str(client.sync.create_session("payer", PROVIDER, "10").id)
    url = run_app(DripMeter(api(ran), client=client, routes=table))
    with httpx.Client(base_url=url) as http:
        assert charged(http, token, "GET", "/v1/other") == "0.001"
        assert charged(http, token, "GET", "/v1/premium/gpt") == "1"
        assert charged(http, token, "POST", "/v1/premium/gpt") == "2"  # names its method
        assert charged(http, token, "GET", "/v1/sea") == "0.002"
        assert charged(http, token, "GET", "/v1/search") == "0.5"
        # HEAD is GET's call: GET's exact price, not a glob's
        assert charged(http, token, "HEAD", "/v1/search") == "0.5"
    # behind a Mount, an exact key written with the prefix beats the stripped path's glob
    inner = DripMeter(api(ran), client=client, routes={
        "GET /*": price("any", "0.001"), "GET /api/items/7": price("seven", "1")})  # fmt: skip
    url = run_app(Starlette(routes=[Mount("/api", app=inner)]))
    with httpx.Client(base_url=url) as http:
        assert charged(http, token, "GET", "/api/items/7") == "1"
        assert charged(http, token, "GET", "/api/items/8") == "0.001"


def test_bad_route_keys_are_refused_when_the_meter_is_built(client: DripClient) -> None:
    app = api([])
    for table in ({"GET search": price("s", "1")}, {"G3T /search": price("s", "1")},
                  {"GET /a": price("s", "1"), "get /a": price("s", "2")}):  # fmt: skip
        with pytest.raises(errors.ConfigError):
            DripMeter(app, client=client, routes=table)
    assert DripMeter(app, client=client, routes={"get /a": price("s", "1")}).routes.exact


def test_a_redirect_is_not_charged_unless_the_price_says_so(
    client: DripClient, run_app: Callable[[object], str]
) -> None:
    """Starlette's own trailing-slash redirect (before any handler) used to be charged,
    then the followed request again: one call, two charges."""
    ran: list[str] = []
    table = {"GET /items/*": price("item", "0.1"), "GET /moved": price("moved", "0.1"),
             "GET /shorten": price("shorten", "0.1", charge_redirects=True)}  # fmt: skip
    token = str(client.sync.create_session("payer", PROVIDER, "10").id)
    url = run_app(DripMeter(api(ran), client=client, routes=table))
    with httpx.Client(base_url=url, headers={"X-Drip-Session": token}) as http:
        r = http.get("/items/42/")
        assert r.status_code == 307 and r.headers["x-drip-charged"] == "0"
        assert http.get("/items/42").headers["x-drip-charged"] == "0.1"
        assert http.get("/moved").headers["x-drip-charged"] == "0"
        assert http.get("/shorten").headers["x-drip-charged"] == "0.1"
    session = client.sync.get_session(token)
    assert (session["spent"], session["pending"]) == (200_000, 0)


def test_a_websocket_on_a_priced_path_is_refused(client: DripClient) -> None:
    ran: list[str] = []
    table = {"/ws/*": price("feed", "0.1")}
    for app in (DripMeter(api(ran), client=client, routes=table),
                X402Meter(api(ran), client=client, facilitator=None, routes={
                    "/ws/*": x402_price("feed", "0.1", pay_to=PAY_TO, asset=ASSET,
                                        network="eip155:31337")})):  # fmt: skip
        with (TestClient(app) as tc, pytest.raises(WebSocketDisconnect) as info,
              tc.websocket_connect("/ws/feed")):  # fmt: skip
            pass
        assert info.value.code == 1008
    assert ran == []
    # an unpriced socket path still works
    unpriced = DripMeter(api(ran), client=client, routes={"/v1/*": price("v", "1")})
    with TestClient(unpriced) as tc, tc.websocket_connect("/ws/feed") as ws:
        assert ws.receive_text() == "premium data"


def test_units_past_max_units_are_capped_with_a_warning(
    client: DripClient, run_app: Callable[[object], str], caplog: pytest.LogCaptureFixture
) -> None:
    table = {"/v1/*": price("tokens", "0.01", per_unit="0.01", max_units=10)}
    token = str(client.sync.create_session("payer", PROVIDER, "10").id)
    url = run_app(DripMeter(api([]), client=client, routes=table))
    with caplog.at_level(logging.WARNING, logger="drip.asgi"), httpx.Client(base_url=url) as http:
        assert charged(http, token, "GET", "/v1/x?units=1000") == "0.11"
    assert "1000 units reported, more than max_units=10" in caplog.text


class Facilitator:
    """Answers as a facilitator does (the real x402 schema types); no chain needed for
    what is tested here: which routes ask for a payment, and when one is settled."""

    def __init__(self) -> None:
        self.settled = 0

    async def verify(self, payload: Any, requirements: Any) -> VerifyResponse:
        return VerifyResponse(is_valid=True, payer=PAYER)

    async def settle(self, payload: Any, requirements: Any) -> SettleResponse:
        self.settled += 1
        return SettleResponse(success=True, payer=PAYER, transaction="0x" + "ab" * 32,
                              network=requirements.network)  # fmt: skip


def signature(route: Any, nonce: str) -> str:
    payload = PaymentPayload(x402_version=2, accepted=route.requirements, payload={
        "signature": "0x00", "authorization": {
            "from": PAYER, "to": PAY_TO, "value": route.requirements.amount,
            "validAfter": "0", "validBefore": "9999999999", "nonce": nonce}})  # fmt: skip
    return str(encode_payment_signature_header(payload))


def test_x402_routes_are_matched_as_drip_meters_are(
    client: DripClient, run_app: Callable[[object], str]
) -> None:
    ran: list[str] = []

    def p(event: str, amount: str) -> Any:
        return x402_price(event, amount, pay_to=PAY_TO, asset=ASSET, network="eip155:31337")

    app = X402Meter(api(ran), client=client, facilitator=Facilitator(), routes={
        "POST /v1/chat/*": p("chat", "0.5"), "get /v1/answer": p("answer", "0.01"),
        "/v1/*": p("any", "0.001")})  # fmt: skip
    with httpx.Client(base_url=run_app(app)) as http:
        for method, path, amount in (("POST", "/v1/chat/gpt", "500000"),
                                     ("GET", "/v1/answer", "10000"),
                                     ("HEAD", "/v1/answer", "10000"),
                                     ("GET", "/v1/other", "1000")):  # fmt: skip
            r = http.request(method, path)
            assert r.status_code == 402
            if method != "HEAD":
                assert r.json()["accepts"][0]["amount"] == amount
    assert ran == []


async def test_x402_a_response_without_a_body_message_is_sent_and_settled(
    client: DripClient,
) -> None:
    route = x402_price("ping", "0.01", pay_to=PAY_TO, asset=ASSET, network="eip155:31337")

    async def bare(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        # and no body message: the server ends the response itself

    facilitator = Facilitator()
    app = X402Meter(bare, client=client, facilitator=facilitator, routes={"GET /ping": route})
    sent: list[dict[str, Any]] = []

    async def drive(nonce: str) -> list[str]:
        sent.clear()
        scope = {"type": "http", "method": "GET", "path": "/ping", "root_path": "",
                 "query_string": b"", "headers": [(b"payment-signature",
                 signature(route, nonce).encode()), (b"host", b"t")]}  # fmt: skip

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)
        return [m["type"] for m in sent]

    assert await drive("0x" + "02" * 32) == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 204 and facilitator.settled == 1
    assert dict(sent[0]["headers"])[b"x-drip-receipt"].startswith(b"x402:")
    rows = client.ledger.store.query("SELECT status FROM x402_payments")
    assert [tuple(r) for r in rows] == [("settled",)]


def test_a_request_naming_no_payer_is_not_told_to_top_up(
    client: DripClient, run_app: Callable[[object], str]
) -> None:
    url = run_app(DripMeter(api([]), client=client, routes={"/v1/*": price("v", "0.1")}))
    with httpx.Client(base_url=url) as http:
        r = http.get("/v1/x")
    assert r.status_code == 402
    assert r.json()["error"]["code"] == "payer_required"  # not insufficient_credits


def test_x402_prices_a_route_under_the_apps_own_root_path(
    client: DripClient, run_app: Callable[[object], str]
) -> None:
    """``FastAPI(root_path="/api")`` routes ``/api/search`` to ``/search`` inside its own
    ``__call__``: X402Meter prices that path too, or the route would be served unpaid."""
    from fastapi import FastAPI

    ran: list[str] = []
    inner = FastAPI(root_path="/api")

    @inner.get("/search")
    async def search() -> dict[str, bool]:
        ran.append("search")
        return {"ok": True}

    app = X402Meter(inner, client=client, facilitator=Facilitator(), routes={
        "GET /search": x402_price("search", "0.01", pay_to=PAY_TO, asset=ASSET,
                                  network="eip155:31337")})  # fmt: skip
    with httpx.Client(base_url=run_app(app)) as http:
        for path in ("/search", "/api/search"):
            r = http.get(path)
            assert r.status_code == 402, (path, r.status_code, r.text)
            assert r.json()["accepts"][0]["amount"] == "10000"
    assert ran == []
