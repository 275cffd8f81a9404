"""X402Meter on a provider route, paid by the official x402 client over its httpx
transport, verified and settled by `drip facilitator`, on anvil."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from eth_account import Account
from fastapi import FastAPI
from x402 import x402Client
from x402.http.clients import x402_httpx_transport
from x402.http.facilitator_client import HTTPFacilitatorClient
from x402.http.utils import decode_payment_response_header
from x402.mechanisms.evm.exact import register_exact_evm_client
from x402.mechanisms.evm.signers import EthAccountSigner

from drip import DripClient, DripConfig
from drip.chain.artifacts import artifact
from drip.chain.devnet import Devnet
from drip.x402.server import X402Meter, x402_price

NETWORK = "eip155:31337"


class Provider:
    def __init__(self, url: str, client: DripClient, ran: dict[str, int]) -> None:
        self.url, self.client, self.ran = url, client, ran


@pytest.fixture
def provider(
    chain: Devnet, facilitator_url: str, tmp_path: Any, run_app: Any
) -> Iterator[Provider]:
    api = FastAPI()
    ran = {"paid": 0, "effect": 0}

    @api.get("/paid")
    async def paid() -> dict[str, str]:
        ran["paid"] += 1
        return {"answer": "42"}

    @api.post("/effect")
    async def effect() -> dict[str, str]:
        ran["effect"] += 1
        return {"done": "yes"}

    client = DripClient(DripConfig(database_url=f"sqlite:///{tmp_path}/provider.db"))
    price = {"pay_to": chain.accounts[2][0], "asset": chain.usdc, "network": NETWORK}
    app = X402Meter(api, client=client, facilitator=HTTPFacilitatorClient({"url": facilitator_url}),
                    routes={"GET /paid": x402_price("answer", "0.01", **price),
                            "POST /effect": x402_price("effect", "0.02", settle_first=True,
                                                       **price)})  # fmt: skip
    try:
        yield Provider(run_app(app), client, ran)
    finally:
        client.close()


def payer_client(chain: Devnet, index: int = 1) -> x402Client:
    client = x402Client()
    register_exact_evm_client(client, EthAccountSigner(Account.from_key(chain.accounts[index][1])))
    client.set_spend_controls({
        "allowed_assets": [{"network": NETWORK, "asset": chain.usdc,
                            "max_amount_per_payment": "1000000"}],
    })  # fmt: skip
    return client


def balance(chain: Devnet, who: int) -> int:
    usdc = chain.web3().eth.contract(address=chain.usdc, abi=artifact("TestUSDC")["abi"])
    return int(usdc.functions.balanceOf(chain.accounts[who][0]).call())


async def test_the_official_client_pays_a_drip_route(chain: Devnet, provider: Provider) -> None:
    async with httpx.AsyncClient(base_url=provider.url) as plain:
        unpaid = await plain.get("/paid")
    assert unpaid.status_code == 402 and "payment-required" in unpaid.headers
    assert unpaid.json()["accepts"][0]["extra"] == {"name": "USD Coin", "version": "2"}
    before = balance(chain, 2)
    transport = x402_httpx_transport(payer_client(chain))
    async with httpx.AsyncClient(base_url=provider.url, transport=transport) as http:
        r = await http.get("/paid")
    assert r.status_code == 200 and r.json() == {"answer": "42"}
    settlement = decode_payment_response_header(r.headers["payment-response"])
    assert settlement.success and settlement.transaction
    assert balance(chain, 2) == before + 10_000
    assert provider.ran["paid"] == 1
    revenue = provider.client.ledger.balance(provider.client.revenue_account)
    assert revenue.posted == 10_000  # recorded in the ledger
    assert provider.client.ledger.check_invariants().ok


async def test_a_replayed_payment_is_served_once(chain: Devnet, provider: Provider) -> None:
    captured: list[str] = []

    class Recording(httpx.AsyncBaseTransport):
        """Under the x402 transport: sees the paid retry and keeps its signature."""

        def __init__(self) -> None:
            self.inner = httpx.AsyncHTTPTransport()

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if "payment-signature" in request.headers:
                captured.append(request.headers["payment-signature"])
            return await self.inner.handle_async_request(request)

    transport = x402_httpx_transport(payer_client(chain), transport=Recording())
    async with httpx.AsyncClient(base_url=provider.url, transport=transport) as http:
        assert (await http.get("/paid")).status_code == 200
    async with httpx.AsyncClient(base_url=provider.url) as plain:
        replay = await plain.get("/paid", headers={"PAYMENT-SIGNATURE": captured[-1]})
        garbage = await plain.get("/paid", headers={"PAYMENT-SIGNATURE": "not base64!"})
    assert replay.status_code == 402 and replay.json()["error"]
    assert garbage.status_code == 402
    assert provider.ran["paid"] == 1


async def test_settle_first_routes_settle_before_running(chain: Devnet, provider: Provider) -> None:
    before = balance(chain, 2)
    transport = x402_httpx_transport(payer_client(chain))
    async with httpx.AsyncClient(base_url=provider.url, transport=transport) as http:
        r = await http.post("/effect")
    assert r.status_code == 200 and provider.ran["effect"] == 1
    assert decode_payment_response_header(r.headers["payment-response"]).success
    assert balance(chain, 2) == before + 20_000


async def test_a_payer_without_funds_never_reaches_the_handler(
    chain: Devnet, provider: Provider
) -> None:
    poor = Account.create()
    client = x402Client()
    register_exact_evm_client(client, EthAccountSigner(poor))
    client.set_spend_controls({"allowed_assets": [{"network": NETWORK, "asset": chain.usdc}]})
    async with httpx.AsyncClient(base_url=provider.url,
                                 transport=x402_httpx_transport(client)) as http:  # fmt: skip
        r = await http.get("/paid")
    assert r.status_code == 402
    assert provider.ran["paid"] == 0


async def test_drips_paying_client_within_its_policy(chain: Devnet, provider: Provider) -> None:
    from drip.x402.client import PayingTransport, SpendPolicy

    payer = Account.from_key(chain.accounts[6][1])
    policy = SpendPolicy.of(max_per_call="0.015", budget_per_hour="0.025",
                            allowed_networks=[NETWORK], allowed_assets=[chain.usdc],
                            allowed_recipients=[chain.accounts[2][0]])  # fmt: skip
    transport = PayingTransport(payer, policy)
    before = balance(chain, 6)
    async with httpx.AsyncClient(base_url=provider.url, transport=transport) as http:
        first = await http.get("/paid")
        second = await http.get("/paid")
        third = await http.get("/paid")  # 0.03 > the hourly 0.025
        effect = await http.post("/effect")  # 0.02 > max_per_call
    assert (first.status_code, second.status_code) == (200, 200)
    assert third.status_code == 402
    assert third.headers["x-drip-payment-refused"] == "hourly budget exhausted"
    assert effect.status_code == 402
    assert effect.headers["x-drip-payment-refused"] == "more than max_per_call"
    assert [p.amount for p in transport.payments] == [10_000, 10_000]
    assert all(p.transaction for p in transport.payments)
    assert balance(chain, 6) == before - 20_000
    assert provider.ran == {"paid": 2, "effect": 0}
    elsewhere = PayingTransport(payer, SpendPolicy.of(allowed_recipients=["0x" + "1" * 40]))
    async with httpx.AsyncClient(base_url=provider.url, transport=elsewhere) as http:
        refused = await http.get("/paid")
    assert refused.headers["x-drip-payment-refused"] == "recipient not allowed"
    assert elsewhere.payments == [] and balance(chain, 6) == before - 20_000


def test_the_402_header_round_trips_through_the_sdk_codecs(chain: Devnet) -> None:
    from x402.http.utils import decode_payment_required_header, encode_payment_required_header
    from x402.schemas import PaymentRequired

    price = x402_price("answer", "0.01", pay_to=chain.accounts[2][0], asset=chain.usdc,
                       network=NETWORK)  # fmt: skip
    required = PaymentRequired(accepts=[price.requirements], error="payment required")
    decoded = decode_payment_required_header(encode_payment_required_header(required))
    assert decoded == required
    assert decoded.accepts[0].amount == "10000" and decoded.x402_version == 2


async def test_interop_with_the_official_server_middleware(
    chain: Devnet, facilitator_url: str, run_app: Any
) -> None:
    """(b) Drip's client pays a route guarded by the official x402 FastAPI middleware, and
    (c) that official server verifies and settles through `drip facilitator`."""
    from x402 import x402ResourceServer
    from x402.http.middleware.fastapi import payment_middleware
    from x402.mechanisms.evm.exact import register_exact_evm_server

    from drip.x402.client import PayingTransport, SpendPolicy

    server = x402ResourceServer(HTTPFacilitatorClient({"url": facilitator_url}))
    register_exact_evm_server(server, NETWORK)
    routes = {"GET /official": {"accepts": {
        "scheme": "exact", "payTo": chain.accounts[2][0], "network": NETWORK,
        "price": {"amount": "7000", "asset": chain.usdc,
                  "extra": {"name": "USD Coin", "version": "2"}},
    }}}  # fmt: skip
    api = FastAPI()
    ran: list[int] = []

    @api.get("/official")
    async def official() -> dict[str, str]:
        ran.append(1)
        return {"ok": "yes"}

    guard = payment_middleware(routes, server)
    api.middleware("http")(guard)
    url = run_app(api)
    before = balance(chain, 2)
    transport = PayingTransport(Account.from_key(chain.accounts[7][1]),
                                SpendPolicy.of(max_per_call="0.01"))  # fmt: skip
    async with httpx.AsyncClient(base_url=url, transport=transport) as http:
        r = await http.get("/official")
    assert r.status_code == 200, (r.status_code, r.headers, r.text[:300])
    assert ran == [1]
    assert balance(chain, 2) == before + 7_000
    assert [p.amount for p in transport.payments] == [7_000]


async def test_one_payment_sent_to_two_servers_at_once_is_served_once(
    chain: Devnet, facilitator_url: str, postgres_url: str, run_app: Any
) -> None:
    """Two providers (own connections, like two processes) on one PostgreSQL database."""
    import asyncio

    from x402.http.utils import encode_payment_signature_header
    from x402.schemas import PaymentRequired

    ran: list[str] = []
    clients = [DripClient(DripConfig(database_url=postgres_url)) for _ in range(2)]
    price = x402_price("answer", "0.01", pay_to=chain.accounts[2][0], asset=chain.usdc,
                       network=NETWORK)  # fmt: skip
    urls = []
    for name, client in zip("ab", clients, strict=True):
        api = FastAPI()

        @api.get("/paid")
        async def paid(name: str = name) -> dict[str, str]:
            ran.append(name)
            return {"served_by": name}

        facilitator = HTTPFacilitatorClient({"url": facilitator_url})
        meter = X402Meter(api, client=client, routes={"GET /paid": price}, facilitator=facilitator)
        urls.append(run_app(meter))
    try:
        payer = payer_client(chain, 8)
        payload = await payer.create_payment_payload(PaymentRequired(accepts=[price.requirements]))
        header = {"PAYMENT-SIGNATURE": encode_payment_signature_header(payload)}
        before = balance(chain, 2)
        async with httpx.AsyncClient() as http:
            answers = await asyncio.gather(*(http.get(f"{url}/paid", headers=header)
                                             for url in urls * 3))  # fmt: skip
        assert sorted(r.status_code for r in answers) == [200, 402, 402, 402, 402, 402]
        assert len(ran) == 1
        assert balance(chain, 2) == before + 10_000
    finally:
        for client in clients:
            client.close()


async def test_security_battery_refused_with_a_reason_and_never_served(
    chain: Devnet, provider: Provider
) -> None:
    """Each bad payment at the provider's route: a 402 with the reason, never a 5xx, the
    handler never run, nothing moved on-chain."""
    import base64
    import json
    import time

    from x402 import x402ClientSync
    from x402.http.utils import encode_payment_signature_header
    from x402.schemas import PaymentRequired, PaymentRequirements

    async with httpx.AsyncClient(base_url=provider.url) as plain:
        offered = (await plain.get("/paid")).json()["accepts"][0]
    req = PaymentRequirements.model_validate(offered)

    def signed(requirements: PaymentRequirements, payer: int = 1) -> Any:
        client = x402ClientSync()
        register_exact_evm_client(
            client, EthAccountSigner(Account.from_key(chain.accounts[payer][1]))
        )
        client.set_spend_controls(False)
        return client.create_payment_payload(PaymentRequired(accepts=[requirements]))

    good = signed(req)
    auth = dict(good.payload["authorization"])

    def with_auth(**changes: Any) -> Any:
        return good.model_copy(
            update={"payload": {**good.payload, "authorization": {**auth, **changes}}}
        )

    def claims(requirements: PaymentRequirements) -> Any:
        """Signed for ``requirements``, presented as if for the route's own."""
        return signed(requirements).model_copy(update={"accepted": req})

    now = int(time.time())
    poor = Account.create()
    client = x402ClientSync()
    register_exact_evm_client(client, EthAccountSigner(poor))
    client.set_spend_controls(False)
    cases: dict[str, str] = {
        "expired": encode_payment_signature_header(with_auth(validBefore=str(now - 10))),
        "not yet valid": encode_payment_signature_header(with_auth(validAfter=str(now + 3600))),
        "wrong amount": encode_payment_signature_header(
            claims(req.model_copy(update={"amount": "1"}))),
        "wrong recipient": encode_payment_signature_header(
            claims(req.model_copy(update={"pay_to": chain.accounts[5][0]}))),
        "wrong asset": encode_payment_signature_header(
            claims(req.model_copy(update={"asset": chain.accounts[4][0]}))),
        "wrong network": encode_payment_signature_header(
            signed(req.model_copy(update={"network": "eip155:8453"}))),
        "wrong chain id": encode_payment_signature_header(
            claims(req.model_copy(update={"network": "eip155:84532"}))),
        "another key's signature": encode_payment_signature_header(good.model_copy(
            update={"payload": {**good.payload,
                                "signature": signed(req, payer=4).payload["signature"]}})),
        "payer without funds": encode_payment_signature_header(
            client.create_payment_payload(PaymentRequired(accepts=[req]))),
        "malformed base64": "%%%not-base64%%%",
        "malformed json": base64.b64encode(b"{not json").decode(),
        "json, not a payload": base64.b64encode(json.dumps({"x402Version": 2}).encode()).decode(),
    }  # fmt: skip
    expected = {
        "expired": "valid_before", "not yet valid": "valid_after",
        "wrong amount": "value_mismatch", "wrong recipient": "recipient_mismatch",
        "wrong asset": "signature", "wrong network": "network_mismatch",
        "wrong chain id": "signature", "another key's signature": "signature",
        "payer without funds": "insufficient_balance", "malformed base64": "invalid payment",
        "malformed json": "invalid payment", "json, not a payload": "invalid payment",
    }  # fmt: skip
    before = balance(chain, 1), balance(chain, 2)
    async with httpx.AsyncClient(base_url=provider.url) as plain:
        for name, value in cases.items():
            r = await plain.get("/paid", headers={"PAYMENT-SIGNATURE": value})
            assert r.status_code == 402, (name, r.status_code, r.text[:200])
            assert r.json()["error"], name
            assert expected[name] in r.json()["error"], (name, r.json()["error"])
            assert "payment-required" in r.headers, name
    assert provider.ran["paid"] == 0
    assert (balance(chain, 1), balance(chain, 2)) == before
    # the genuine payment is still good, once
    async with httpx.AsyncClient(base_url=provider.url) as plain:
        ok = await plain.get("/paid", headers={
            "PAYMENT-SIGNATURE": encode_payment_signature_header(good)})  # fmt: skip
    assert ok.status_code == 200 and provider.ran["paid"] == 1
