"""DripMeter at the edges of ASGI: HEAD, prefixes (root_path, Mount), pathsend, calls that
outlive their hold, units reported in odd types. Found by review; each is a way a priced
handler could run unpaid, or a receipt or a status could be wrong."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Mount, Route

from drip import DripClient, DripConfig, errors
from drip.asgi import DripMeter, price

PROVIDER = "edges"


def handlers(ran: list[str]) -> list[Route]:
    async def search(request: Request) -> JSONResponse:
        ran.append(request.method)
        return JSONResponse({"ok": True})

    async def slow(request: Request) -> PlainTextResponse:
        await asyncio.sleep(1.3)  # outlives a 1 s hold
        ran.append("slow")
        return PlainTextResponse("gone", status_code=int(request.query_params.get("status", 200)))

    async def stream(request: Request) -> StreamingResponse:
        async def body() -> Any:
            for chunk in (b"a", b"b"):
                await asyncio.sleep(0.7)
                yield chunk
            request.state.drip_units = 2

        return StreamingResponse(body())

    async def units(request: Request) -> PlainTextResponse:
        given = {"int": 3, "float": 3.0, "decimal": Decimal(3), "bool": True, "half": 2.5}
        request.state.drip_units = given[request.query_params["v"]]
        return PlainTextResponse("ok")

    return [
        Route("/search", search),
        Route("/slow", slow),
        Route("/stream", stream),
        Route("/units", units),
    ]


ROUTES = {
    "GET /search": price("search", "0.01"),
    "GET /slow": price("slow", "0.01"),
    "GET /stream": price("stream", "0.001", per_unit="0.001", max_units=10),
    "GET /units": price("units", "0.001", per_unit="0.01", max_units=10),
}


class Edges:
    def __init__(self, client: DripClient, run_app: Callable[[object], str]) -> None:
        self.client, self.run_app = client, run_app
        self.ran: list[str] = []

    def metered(self) -> DripMeter:
        return DripMeter(Starlette(routes=handlers(self.ran)), client=self.client, routes=ROUTES)

    def token(self) -> str:
        return str(self.client.sync.create_session("payer", PROVIDER, "1").id)

    def spent(self, token: str) -> tuple[int, int]:
        state = self.client.sync.get_session(token)
        return int(state["spent"]), int(state["pending"])


@pytest.fixture
def edges(store_url: str, run_app: Callable[[object], str]) -> Iterator[Edges]:
    client = DripClient(DripConfig(database_url=store_url, provider=PROVIDER, hold_timeout_s=1))
    client.sync.provision_user("payer", initial_balance="1")
    try:
        yield Edges(client, run_app)
    finally:
        client.close()


def test_head_is_priced_as_get(edges: Edges) -> None:
    """Starlette answers HEAD with the GET handler: it is the same call, at the same price."""
    url = edges.run_app(edges.metered())
    token = edges.token()
    with httpx.Client(base_url=url) as http:
        assert http.head("/search").status_code == 402
        assert edges.ran == []
        r = http.head("/search", headers={"X-Drip-Session": token})
    assert r.status_code == 200 and r.headers["x-drip-charged"] == "0.01"
    assert edges.ran == ["HEAD"] and edges.spent(token) == (10_000, 0)


def test_a_prefix_does_not_hide_a_priced_route(edges: Edges) -> None:
    """Mounted under a path, or behind a proxy prefix (``root_path``, which servers put
    in ``path`` too), the route is the path the app routes on."""
    token = edges.token()
    mounted = Starlette(routes=[Mount("/v1", app=edges.metered())])
    for app, path in ((mounted, "/v1/search"), (_with_root_path(edges.metered(), "/api"),
                                                "/api/search")):  # fmt: skip
        with httpx.Client(base_url=edges.run_app(app)) as http:
            assert http.get(path).status_code == 402
            r = http.get(path, headers={"X-Drip-Session": token})
        assert r.status_code == 200 and r.headers["x-drip-charged"] == "0.01"
    assert edges.ran == ["GET", "GET"] and edges.spent(token) == (20_000, 0)


def test_a_price_table_written_with_the_prefix_still_prices_its_routes(edges: Edges) -> None:
    token = edges.token()
    inner = DripMeter(Starlette(routes=handlers(edges.ran)), client=edges.client,
                      routes={"GET /v1/search": price("search", "0.01")})  # fmt: skip
    url = edges.run_app(Starlette(routes=[Mount("/v1", app=inner)]))
    with httpx.Client(base_url=url) as http:
        assert http.get("/v1/search").status_code == 402
        r = http.get("/v1/search", headers={"X-Drip-Session": token})
    assert r.status_code == 200 and r.headers["x-drip-charged"] == "0.01"
    assert edges.spent(token) == (10_000, 0)


def _with_root_path(app: Any, root: str) -> Any:
    """As ``uvicorn --root-path /api`` behind a proxy that keeps the prefix."""

    async def prefixed(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope = {**scope, "root_path": root}
        await app(scope, receive, send)

    return prefixed


async def test_a_pathsend_response_gets_its_start_first(edges: Edges) -> None:
    """``http.response.pathsend`` (a server sending a file itself) is the whole body: the
    held start, with the charge headers, goes before it, and nothing after it."""
    token = edges.token()

    async def file_app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.pathsend", "path": "/etc/hostname"})

    meter = DripMeter(file_app, client=edges.client, routes={"/file": price("file", "0.01")})
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/file", "root_path": "",
             "headers": [(b"x-drip-session", token.encode())], "query_string": b""}  # fmt: skip
    await meter(scope, receive, send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.pathsend"]
    assert dict(sent[0]["headers"])[b"x-drip-charged"] == b"0.01"
    assert edges.spent(token) == (10_000, 0)


def test_a_call_that_outlives_its_hold_keeps_its_status(edges: Edges) -> None:
    """The hold expired while the handler ran: an error status is still the app's (the
    void finds nothing reserved), and a success is charged afresh under the receipt's id."""
    url = edges.run_app(edges.metered())
    token = edges.token()
    with httpx.Client(base_url=url, headers={"X-Drip-Session": token}, timeout=30) as http:
        missing = http.get("/slow", params={"status": 404})
        assert missing.status_code == 404 and missing.text == "gone"
        assert missing.headers["x-drip-charged"] == "0"
        ok = http.get("/slow")
    assert ok.status_code == 200 and ok.headers["x-drip-charged"] == "0.01"
    receipt = edges.client.ledger.get_transfer(ok.headers["x-drip-receipt"])
    assert receipt is not None and receipt.amount == 10_000
    edges.client.ledger.expire_holds()  # the sweep's work (each second in the background)
    assert edges.spent(token) == (10_000, 0)
    assert edges.client.ledger.check_invariants().ok


def test_a_streams_announced_receipt_exists_when_its_hold_expired(edges: Edges) -> None:
    url = edges.run_app(edges.metered())
    token = edges.token()
    with httpx.Client(base_url=url, headers={"X-Drip-Session": token}, timeout=30) as http:
        r = http.get("/stream")
    assert r.status_code == 200 and r.content == b"ab"
    receipt = edges.client.ledger.get_transfer(r.headers["x-drip-receipt"])
    assert receipt is not None and receipt.amount == 3_000  # 0.001 + 2 units of 0.001
    assert receipt.meta == {"expired_hold": r.headers["x-drip-receipt"].split("~")[0]}
    edges.client.ledger.expire_holds()
    assert edges.spent(token) == (3_000, 0)
    assert edges.client.ledger.check_invariants().ok


@pytest.mark.parametrize(
    ("given", "charged"),
    [("int", "0.031"), ("float", "0.031"), ("decimal", "0.031"), ("bool", "0.001"),
     ("half", "0.001")],
)  # fmt: skip
def test_units_are_whole_numbers_whatever_their_type(
    edges: Edges, given: str, charged: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = edges.run_app(edges.metered())
    token = edges.token()
    with httpx.Client(base_url=url, headers={"X-Drip-Session": token}) as http:
        r = http.get("/units", params={"v": given})
    assert r.status_code == 200 and r.headers["x-drip-charged"] == charged
    refused = [rec for rec in caplog.records if "drip_units" in rec.getMessage()]
    assert bool(refused) == (charged == "0.001")  # a provider's bug is logged, not hidden


def test_a_price_the_ledger_cannot_hold_is_a_config_error() -> None:
    with pytest.raises(errors.ConfigError, match="more than the ledger can hold"):
        price("tokens", per_unit="1", max_units=2**62)
