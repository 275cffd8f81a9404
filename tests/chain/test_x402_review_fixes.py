"""x402 fixes from the second review: a settlement refused because the authorization was
used elsewhere is never a bare 402; a repeated settlement is answered from the
facilitator's record (what the SDK's pending retry expects); the facilitator settles only
its networks (spelled as configured), assets and recipients; Permit2 payments verify; the
paying client passes over options it cannot sign; a chain outage at verify is an outage,
not a bad payment; junk numbers are refused with a reason; a settle-first handler that
raises still tells the client what it paid."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from eth_account import Account
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from x402 import x402ClientSync, x402FacilitatorSync
from x402.http.facilitator_client import HTTPFacilitatorClient, HTTPFacilitatorClientSync
from x402.http.utils import (
    decode_payment_response_header,
    encode_payment_required_header,
    encode_payment_signature_header,
)
from x402.mechanisms.evm.constants import PERMIT2_ADDRESS
from x402.mechanisms.evm.exact import register_exact_evm_client, register_exact_evm_facilitator
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.schemas import (
    PaymentPayload,
    PaymentRequired,
    PaymentRequirements,
    SettleResponse,
    VerifyResponse,
)
from x402.server_base import settle_with_pending_retry

from drip import DripClient, DripConfig
from drip.chain import devnet
from drip.chain.artifacts import artifact
from drip.chain.devnet import Devnet
from drip.chain.networks import DEVNET
from drip.ledger import open_store
from drip.x402 import receipts
from drip.x402.client import CANNOT_SIGN, PayingTransport, SpendPolicy
from drip.x402.facilitator import DripFacilitatorSigner, build, create_app
from drip.x402.server import X402Meter, X402Price, add_x402, x402_price

NETWORK = "eip155:31337"
PAY_TO, ASSET = "0x" + "22" * 20, "0x" + "33" * 20
PAYER = Account.create().address
TX = "0x" + "ab" * 32
NONCE = "0x" + "5a" * 32
DOWN = "http://127.0.0.1:9"  # nothing listens: every JSON-RPC call fails in transport
KEY = "0x" + "11" * 32


class StubFacilitator:
    """Verifies everything; settles with the answer it is given."""

    def __init__(self, answer: SettleResponse | None = None) -> None:
        self.answer = answer
        self.settled = 0

    async def verify(self, payload: Any, requirements: Any) -> VerifyResponse:
        return VerifyResponse(is_valid=True, payer=PAYER)

    async def settle(self, payload: Any, requirements: Any) -> SettleResponse:
        self.settled += 1
        return self.answer or SettleResponse(success=True, payer=PAYER, transaction=TX,
                                             network=requirements.network)  # fmt: skip


def route(**options: Any) -> X402Price:
    return x402_price("answer", "0.01", pay_to=PAY_TO, asset=ASSET, network=NETWORK, **options)


def payment(price: X402Price) -> PaymentPayload:
    return PaymentPayload(x402_version=2, accepted=price.requirements, payload={
        "signature": "0x" + "00" * 65, "authorization": {
            "from": PAYER, "to": PAY_TO, "value": price.requirements.amount, "validAfter": "0",
            "validBefore": str(int(time.time()) + 120), "nonce": NONCE}})  # fmt: skip


def paid(payload: PaymentPayload) -> dict[str, str]:
    return {"PAYMENT-SIGNATURE": encode_payment_signature_header(payload)}


@pytest.fixture
def client(tmp_path: Any) -> Iterator[DripClient]:
    drip = DripClient(DripConfig(database_url=f"sqlite:///{tmp_path}/provider.db"))
    try:
        yield drip
    finally:
        drip.close()


def rows(client: DripClient) -> list[tuple[Any, ...]]:
    found = client.ledger.store.query("SELECT nonce, status, tx_hash FROM x402_payments", ())
    return [tuple(r) for r in found]


def sdk_payment(chain: Devnet, req: PaymentRequirements, payer: int = 1) -> PaymentPayload:
    client = x402ClientSync()
    register_exact_evm_client(client, EthAccountSigner(Account.from_key(chain.accounts[payer][1])))
    client.set_spend_controls(False)
    payload: PaymentPayload = client.create_payment_payload(PaymentRequired(accepts=[req]))
    return payload


def requirements(chain: Devnet, *, network: str = NETWORK, asset: str | None = None,
                 pay_to: int = 2, amount: str = "1000") -> PaymentRequirements:  # fmt: skip
    return PaymentRequirements(scheme="exact", network=network, asset=asset or chain.usdc,
                               amount=amount, pay_to=chain.accounts[pay_to][0],
                               max_timeout_seconds=120,
                               extra={"name": "USD Coin", "version": "2"})  # fmt: skip


def body(payload: PaymentPayload, req: PaymentRequirements) -> dict[str, Any]:
    return {
        "x402Version": 2,
        "paymentPayload": payload.model_dump(by_alias=True, exclude_none=True),
        "paymentRequirements": req.model_dump(by_alias=True, exclude_none=True),
    }


def balance(chain: Devnet, address: str, token: str | None = None) -> int:
    usdc = chain.web3().eth.contract(address=token or chain.usdc, abi=artifact("TestUSDC")["abi"])
    return int(usdc.functions.balanceOf(address).call())


def sent_by_facilitator(chain: Devnet) -> int:
    return int(chain.web3().eth.get_transaction_count(chain.accounts[0][0]))


def settlements(sqlite_url: str) -> list[tuple[Any, ...]]:
    store = open_store(sqlite_url)
    try:
        found = store.query("SELECT network, status, tx_hash FROM x402_settlements", ())
        return [tuple(r) for r in found]
    finally:
        store.close()


# --- 1. an authorization used elsewhere: never a bare 402 -------------------------------------


@pytest.mark.parametrize("reason", ["nonce_already_used", "invalid_exact_evm_nonce_already_used"])
async def test_a_settlement_refused_as_already_used_answers_502_and_keeps_the_payment(
    client: DripClient, reason: str
) -> None:
    used = SettleResponse(success=False, error_reason=reason, transaction="", network=NETWORK)
    ran: list[str] = []
    api = FastAPI()

    @api.get("/paid")
    async def handler() -> dict[str, str]:
        ran.append("paid")
        return {"answer": "42"}

    app = X402Meter(api, client=client, facilitator=StubFacilitator(used),
                    routes={"GET /paid": route()})  # fmt: skip
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as h:
        r = await h.get("/paid", headers=paid(payment(route())))
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "settlement_pending"
    assert reason in r.json()["error"]["message"]
    assert "payment-required" not in r.headers  # never asked to pay again
    assert rows(client) == [(NONCE, "unknown", None)] and ran == ["paid"]
    assert client.ledger.balance(client.revenue_account).posted == 0


async def test_a_payment_settled_elsewhere_while_its_handler_runs_is_not_asked_again(
    chain: Devnet, facilitator_url: str, client: DripClient, run_app: Callable[[object], str]
) -> None:
    """The same authorization reaches the facilitator directly while the provider serves
    it: the money moved once, to this payTo, but not through this provider's settlement
    (one transfer is one caller's success: another service sharing the payTo must not
    book it too). The provider answers 502 settlement_pending and keeps its row unknown,
    never a 402 that would ask the payer to pay again."""
    price = x402_price("answer", "0.001", pay_to=chain.accounts[2][0], asset=chain.usdc,
                       network=NETWORK)  # fmt: skip
    api = FastAPI()

    @api.get("/paid")
    async def handler() -> dict[str, str]:
        await asyncio.sleep(2)  # a slow handler (an LLM call, say)
        return {"answer": "42"}

    url = run_app(X402Meter(api, client=client,
                            facilitator=HTTPFacilitatorClient({"url": facilitator_url}),
                            routes={"GET /paid": price}))  # fmt: skip
    payload = sdk_payment(chain, price.requirements, payer=7)
    payer, payee = chain.accounts[7][0], chain.accounts[2][0]
    before = balance(chain, payer), balance(chain, payee)
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        served = asyncio.create_task(http.get("/paid", headers=paid(payload)))
        await asyncio.sleep(0.7)  # verified, reserved, the handler is running
        direct = await asyncio.to_thread(
            HTTPFacilitatorClientSync({"url": facilitator_url}).settle, payload, price.requirements
        )
        r = await served
    assert direct.success
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "settlement_pending"
    assert "payment-required" not in r.headers  # never asked to pay again
    assert (balance(chain, payer), balance(chain, payee)) == (before[0] - 1000, before[1] + 1000)
    assert [row[1] for row in rows(client)] == ["unknown"]
    assert client.ledger.balance(client.revenue_account).posted == 0


# --- 2. a repeated settlement is answered from the facilitator's record ----------------------


@pytest.mark.parametrize(("built", "index"), [(True, 3), (False, 8)], ids=["build", "sdk"])
def test_the_sdks_pending_retry_gets_the_transaction_and_later_its_outcome(
    chain: Devnet, sqlite_url: str, run_app: Callable[[object], str], built: bool, index: int
) -> None:
    """Made by ``build`` or as the SDK's own facilitator over ``DripFacilitatorSigner``:
    the receipt is read through the signer that sent the transaction."""
    store = open_store(sqlite_url)
    try:
        if built:
            facilitator = build(chain.rpc_url, chain.accounts[0][1], [NETWORK],
                                confirmation_timeout_s=1.0)  # fmt: skip
        else:
            facilitator = x402FacilitatorSync()
            signer = DripFacilitatorSigner(chain.accounts[0][1], chain.rpc_url,
                                           confirmation_timeout_s=1.0)  # fmt: skip
            register_exact_evm_facilitator(facilitator, signer, [NETWORK])
        sdk = HTTPFacilitatorClientSync({"url": run_app(create_app(facilitator, store))})
        req = requirements(chain)
        payload = sdk_payment(chain, req, payer=index)
        payer, payee = chain.accounts[index][0], chain.accounts[2][0]
        before = balance(chain, payee)
        sent = sent_by_facilitator(chain)
        w3 = chain.web3()
        w3.provider.make_request("evm_setAutomine", [False])  # a slow block
        try:
            pending = settle_with_pending_retry(sdk, payload, req)  # settle, then once more
        finally:
            w3.provider.make_request("evm_setAutomine", [True])
        assert not pending.success and pending.error_reason == "settlement_pending", pending
        tx = pending.transaction
        assert tx and sent_by_facilitator(chain) == sent + 1  # the retry sent nothing
        w3.provider.make_request("evm_mine", [])
        assert balance(chain, payee) == before + 1000
        # the receipt is there now: the next settlement of this key is a success, once
        done = sdk.settle(payload, req)
        assert done.success and done.transaction == tx, done
        assert done.network == NETWORK and (done.payer or "").lower() == payer.lower()
        again = sdk.settle(payload, req)  # one payment: one caller told success
        assert not again.success and again.error_reason == "nonce_already_used", again
        assert settlements(sqlite_url) == [(NETWORK, "settled", tx)]
        # requirements that authorization never paid: refused, nothing sent
        other = sdk.settle(payload, requirements(chain, amount="999"))
        assert not other.success and other.error_reason == "nonce_used_for_other_requirements"
        assert not other.transaction and sent_by_facilitator(chain) == sent + 1
    finally:
        store.close()


# --- 3. and 4. only the configured networks, assets and recipients ---------------------------


def test_the_facilitator_settles_only_its_networks_as_spelled(
    chain: Devnet, facilitator_url: str, sqlite_url: str
) -> None:
    sdk = HTTPFacilitatorClientSync({"url": facilitator_url})
    req = requirements(chain)
    payload = sdk_payment(chain, req, payer=4)
    sent = sent_by_facilitator(chain)
    with httpx.Client(base_url=facilitator_url) as http:
        for network in ("eip155:031337", "eip155:0031337", "eip155:+31337", "eip155:31_337",
                        "eip155:1", "eip155:8453"):  # fmt: skip
            spelled = req.model_copy(update={"network": network})
            copy = payload.model_copy(update={"accepted": spelled})
            settled = http.post("/settle", json=body(copy, spelled)).json()
            assert settled["success"] is False, (network, settled)
            assert settled["errorReason"].startswith("unsupported_network"), settled
            verified = http.post("/verify", json=body(copy, spelled)).json()
            assert verified["isValid"] is False
            assert verified["invalidReason"].startswith("unsupported_network")
    assert sent_by_facilitator(chain) == sent and settlements(sqlite_url) == []
    assert sdk.settle(payload, req).success  # as configured: settled, once
    assert sent_by_facilitator(chain) == sent + 1
    for network in ("eip155:031337", "eip155:+31337", "solana:devnet", "eip155:0"):
        with pytest.raises(ValueError, match="eip155:<chain id>"):
            build(DOWN, KEY, [network])


def test_the_facilitator_settles_only_allowed_assets_and_recipients(
    chain: Devnet, sqlite_url: str, run_app: Callable[[object], str]
) -> None:
    assert DEVNET.usdc == chain.usdc  # the default asset of the devnet is its test USDC
    w3 = chain.web3()
    other = devnet.deploy(w3, "TestUSDC", chain.accounts[0])  # an EIP-3009 token as good
    token = w3.eth.contract(address=other, abi=artifact("TestUSDC")["abi"])
    devnet.send(w3, token.functions.mint(chain.accounts[5][0], 10**9), chain.accounts[0])
    store = open_store(sqlite_url)
    try:
        app = create_app(build(chain.rpc_url, chain.accounts[0][1], [NETWORK]), store,
                         pay_to=[chain.accounts[2][0]])  # fmt: skip
        sdk = HTTPFacilitatorClientSync({"url": run_app(app)})
        sent = sent_by_facilitator(chain)
        cases = [(requirements(chain, asset=other), "unsupported_asset"),
                 (requirements(chain, pay_to=3), "unsupported_pay_to")]  # fmt: skip
        for req, reason in cases:
            payload = sdk_payment(chain, req, payer=5)
            assert (sdk.verify(payload, req).invalid_reason or "").startswith(reason)
            refused = sdk.settle(payload, req)
            assert not refused.success and (refused.error_reason or "").startswith(reason)
        assert sent_by_facilitator(chain) == sent and settlements(sqlite_url) == []
        assert balance(chain, chain.accounts[5][0], other) == 10**9
        req = requirements(chain)
        assert sdk.settle(sdk_payment(chain, req, payer=5), req).success  # USDC to payTo
    finally:
        store.close()
    # assets named explicitly; a network whose USDC is unknown needs them
    sdk_facilitator = x402FacilitatorSync()
    register_exact_evm_facilitator(sdk_facilitator, DripFacilitatorSigner(KEY, DOWN),
                                   ["eip155:10"])  # fmt: skip
    store = open_store(sqlite_url)
    try:
        with pytest.raises(ValueError, match="no USDC is known for eip155:10"):
            create_app(sdk_facilitator, store)
        with TestClient(create_app(sdk_facilitator, store, assets=[ASSET])) as http:
            req = requirements(chain, network="eip155:10")
            answer = http.post("/verify", json=body(sdk_payment(chain, req), req)).json()
            assert answer["invalidReason"].startswith("unsupported_asset")
    finally:
        store.close()


# --- 5. Permit2 ---------------------------------------------------------------------------------


def test_a_permit2_payment_verifies(chain: Devnet, facilitator_url: str) -> None:
    """The SDK's Permit2 path needs its ``extensions`` extra (jsonschema)."""
    w3 = chain.web3()
    token = w3.eth.contract(address=chain.usdc, abi=artifact("TestUSDC")["abi"])
    devnet.send(w3, token.functions.approve(PERMIT2_ADDRESS, 10**9), chain.accounts[6])
    req = requirements(chain).model_copy(update={"extra": {
        "name": "USD Coin", "version": "2", "assetTransferMethod": "permit2"}})  # fmt: skip
    payload = sdk_payment(chain, req, payer=6)
    assert "permit2Authorization" in payload.payload
    verified = HTTPFacilitatorClientSync({"url": facilitator_url}).verify(payload, req)
    assert verified.is_valid, verified


# --- 6. the paying client passes over options it cannot sign -----------------------------------


def offer(**changes: Any) -> PaymentRequirements:
    option = {"scheme": "exact", "network": "eip155:8453", "asset": ASSET, "amount": "10000",
              "pay_to": PAY_TO, "max_timeout_seconds": 120,
              "extra": {"name": "USD Coin", "version": "2"}, **changes}  # fmt: skip
    return PaymentRequirements(**option)


SOLANA = offer(network="solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp",
               asset="EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v",
               pay_to="9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin")  # fmt: skip


@pytest.mark.parametrize("first", [SOLANA, offer(scheme="upto")], ids=["solana", "upto"])
async def test_the_client_passes_over_options_it_cannot_sign(first: PaymentRequirements) -> None:
    kept: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        signature = request.headers.get("payment-signature")
        if signature is None:
            required = PaymentRequired(accepts=[first, offer()])
            return httpx.Response(402, headers={
                "PAYMENT-REQUIRED": encode_payment_required_header(required)})  # fmt: skip
        kept.append(signature)
        return httpx.Response(200)

    policy = SpendPolicy.of(max_per_call="0.02")
    transport = PayingTransport(Account.create(), policy, inner=httpx.MockTransport(handle))
    async with httpx.AsyncClient(transport=transport) as http:
        r = await http.get("http://x/")
    assert r.status_code == 200 and len(kept) == 1
    [made] = transport.payments
    assert (made.network, made.pay_to, made.amount) == ("eip155:8453", PAY_TO, 10_000)


async def test_the_client_refuses_when_it_can_sign_no_option() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        required = PaymentRequired(accepts=[SOLANA, offer(scheme="upto")])
        return httpx.Response(402, headers={
            "PAYMENT-REQUIRED": encode_payment_required_header(required)})  # fmt: skip

    transport = PayingTransport(Account.create(), SpendPolicy(), inner=httpx.MockTransport(handle))
    async with httpx.AsyncClient(transport=transport) as http:
        r = await http.get("http://x/")
    assert r.status_code == 402 and r.headers["x-drip-payment-refused"] == CANNOT_SIGN
    assert transport.payments == []


# --- 7. a chain outage at verify ----------------------------------------------------------------


async def test_a_chain_outage_at_verify_is_503_not_a_402(
    client: DripClient, sqlite_url: str, run_app: Callable[[object], str]
) -> None:
    store = open_store(sqlite_url)
    try:
        url = run_app(create_app(build(DOWN, KEY, [NETWORK]), store, assets=[ASSET]))
        payer = x402ClientSync()
        register_exact_evm_client(payer, EthAccountSigner(Account.create()))
        payer.set_spend_controls(False)
        payload = payer.create_payment_payload(PaymentRequired(accepts=[route().requirements]))
        verified = HTTPFacilitatorClientSync({"url": url}).verify(payload, route().requirements)
        assert not verified.is_valid
        assert (verified.invalid_reason or "").startswith("verify_error: "), verified
        ran: list[str] = []
        api = FastAPI()

        @api.get("/paid")
        async def handler() -> dict[str, str]:
            ran.append("paid")
            return {"answer": "42"}

        app = X402Meter(api, client=client, facilitator=HTTPFacilitatorClient({"url": url}),
                        routes={"GET /paid": route()})  # fmt: skip
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as http:  # fmt: skip
            r = await http.get("/paid", headers=paid(payload))
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "facilitator_unavailable"
        assert "payment-required" not in r.headers and "retry-after" in r.headers
        assert ran == [] and rows(client) == []
    finally:
        store.close()


# --- 8. numbers no int() can take ---------------------------------------------------------------


def test_a_permit2_number_of_1e999_is_refused_with_a_reason(sqlite_url: str) -> None:
    store = open_store(sqlite_url)
    req = {"scheme": "exact", "network": NETWORK, "asset": ASSET, "amount": "10000",
           "payTo": PAY_TO, "maxTimeoutSeconds": 60,
           "extra": {"name": "USD Coin", "version": "2"}}  # fmt: skip
    head = json.dumps(req)

    def raw(nonce: str, deadline: str) -> bytes:
        permit = f'{{"from":"{PAYER}","nonce":{nonce},"deadline":{deadline}}}'
        return (f'{{"x402Version":2,"paymentPayload":{{"x402Version":2,"accepted":{head},'
                f'"payload":{{"permit2Authorization":{permit},"signature":"0x{"55" * 65}"}}}},'
                f'"paymentRequirements":{head}}}').encode()  # fmt: skip

    try:
        app = create_app(build(DOWN, KEY, [NETWORK]), store, assets=[ASSET])
        with TestClient(app, raise_server_exceptions=False) as http:
            for content in (raw("1e999", '"99999999999"'), raw('"1"', "1e999"),
                            raw("-1e999", '"99999999999"')):  # fmt: skip
                for path, flag, reason in (("/verify", "isValid", "invalidReason"),
                                           ("/settle", "success", "errorReason")):  # fmt: skip
                    r = http.post(path, content=content,
                                  headers={"content-type": "application/json"})  # fmt: skip
                    assert r.status_code == 200, (path, r.text)
                    assert r.json()[flag] is False
                    assert r.json()[reason].startswith("invalid_payload"), r.json()
        assert store.query("SELECT * FROM x402_settlements", ()) == []
    finally:
        store.close()


# --- 9. a settle-first handler that raises after settling -----------------------------------------


@pytest.mark.parametrize("wrapped", [False, True], ids=["add_x402", "X402Meter(app)"])
async def test_a_settle_first_handler_that_raises_still_says_what_was_paid(
    client: DripClient, wrapped: bool
) -> None:
    """With ``add_x402`` the meter sits inside Starlette's error middleware: the handler's
    exception passes through it, and it answers the 500 itself. Wrapping the app, the
    app's own 500 passes through it and gets the headers."""
    api = FastAPI()

    @api.post("/effect")
    async def effect() -> JSONResponse:
        raise RuntimeError("boom")

    options: dict[str, Any] = {
        "client": client, "facilitator": StubFacilitator(), "signer": Account.create(),
        "routes": {"POST /effect": route(settle_first=True)}, "public_url": "https://p.test",
    }  # fmt: skip
    if wrapped:
        app: Any = X402Meter(api, **options)
    else:
        add_x402(api, **options)
        app = api
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        r = await http.post("/effect", headers=paid(payment(route(settle_first=True))))
    assert r.status_code == 500
    settlement = decode_payment_response_header(r.headers["payment-response"])
    assert settlement.success and settlement.transaction == TX
    assert receipts.receipt_of(settlement) is None  # nothing was delivered
    assert r.headers["x-drip-receipt"] == f"x402:{PAYER.lower()}:{NONCE}"
    if not wrapped:
        assert r.json()["error"]["code"] == "internal_error"
    assert rows(client) == [(NONCE, "settled", TX)]
    assert client.ledger.balance(client.revenue_account).posted == 10_000


def test_a_body_nested_too_deep_is_a_reason_not_a_500(sqlite_url: str) -> None:
    """With the recursion limit kept (``drip.chain._libs``), a deeply nested body makes
    the parser raise RecursionError: answered 200 with a reason, as any junk."""
    store = open_store(sqlite_url)
    try:
        app = create_app(build(DOWN, KEY, [NETWORK]), store, assets=[ASSET])
        with TestClient(app, raise_server_exceptions=False) as http:
            for depth in (5_000, 30_000):
                body = ("[" * depth + "]" * depth).encode()
                for path, flag, reason in (("/verify", "isValid", "invalidReason"),
                                           ("/settle", "success", "errorReason")):  # fmt: skip
                    r = http.post(path, content=body,
                                  headers={"content-type": "application/json"})  # fmt: skip
                    assert r.status_code == 200, (path, depth, r.text[:200])
                    assert r.json()[flag] is False and r.json()[reason], r.json()
        assert store.query("SELECT * FROM x402_settlements", ()) == []
    finally:
        store.close()


def test_a_payment_that_paid_other_requirements_is_refused_not_pending() -> None:
    """The facilitator's ``nonce_used_for_other_requirements`` (the authorization was
    settled for another payTo or amount: this route received nothing) is a refusal, a
    402; its ``nonce_already_used`` (settled for these very requirements, by another
    caller) is ambiguous, a 502, never 'pay again'."""
    from drip.x402.server import _ambiguous

    elsewhere = SettleResponse(success=False, error_reason="nonce_used_for_other_requirements",
                               transaction="", network=NETWORK)  # fmt: skip
    used = SettleResponse(success=False, error_reason="nonce_already_used",
                          transaction="", network=NETWORK)  # fmt: skip
    assert not _ambiguous(elsewhere)
    assert _ambiguous(used)


@pytest.mark.parametrize("header", ["WzFd", "e30=", "!!!", "W1tbW1tbW1tbW1tbW1tbW1tbW1td"])
async def test_the_paying_client_answers_junk_payment_required_with_the_402(header: str) -> None:
    """A hostile server's PAYMENT-REQUIRED of any shape (a list, an empty object, not
    base64) is not an exception: the 402 comes back, marked unreadable."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(402, headers={"PAYMENT-REQUIRED": header}, json={})

    transport = PayingTransport(Account.create(), SpendPolicy(max_per_call="0.01"),
                                httpx.MockTransport(handler))  # fmt: skip
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        r = await http.get("/x")
    assert r.status_code == 402
