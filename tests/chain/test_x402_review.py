"""x402 money paths found in review: a settlement whose outcome is unknown is never a
bare 402; a signed authorization stays counted by the paying client and lives no longer
than its policy allows; odd amounts are refused before anything is signed; one
authorization is one key however it is spelled; a payment that would expire before it
could be settled never reaches the handler; the facilitator keeps no row for what it
never sent."""

from __future__ import annotations

import asyncio
import base64
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
    decode_payment_signature_header,
    encode_payment_required_header,
    encode_payment_response_header,
    encode_payment_signature_header,
)
from x402.mechanisms.evm.exact import register_exact_evm_client, register_exact_evm_facilitator
from x402.mechanisms.evm.signers import EthAccountSigner, FacilitatorWeb3Signer
from x402.schemas import (
    PaymentPayload,
    PaymentRequired,
    PaymentRequirements,
    SettleResponse,
    VerifyResponse,
)

from drip import DripClient, DripConfig, errors
from drip.chain.artifacts import artifact
from drip.chain.devnet import Devnet
from drip.ledger import open_store
from drip.x402 import receipts
from drip.x402.client import PayingTransport, SpendPolicy
from drip.x402.facilitator import SETTLEMENT_MIGRATIONS, DripFacilitatorSigner, build, create_app
from drip.x402.server import X402Meter, X402Price, x402_price

NETWORK = "eip155:31337"
PAY_TO, ASSET = "0x" + "22" * 20, "0x" + "33" * 20
PAYER = Account.create().address  # checksummed, as clients write it
TX = "0x" + "ab" * 32
NONCE = "0x" + "5a" * 32
SIGNER = Account.create()


class StubFacilitator:
    """Verifies everything and settles with the answer it is given (the SDK's types): what
    the provider does with each answer is tested here, not the chain."""

    def __init__(self, answer: SettleResponse | None = None) -> None:
        self.answer = answer
        self.verified = 0
        self.settled = 0

    async def verify(self, payload: Any, requirements: Any) -> VerifyResponse:
        self.verified += 1
        return VerifyResponse(is_valid=True, payer=PAYER)

    async def settle(self, payload: Any, requirements: Any) -> SettleResponse:
        self.settled += 1
        return self.answer or SettleResponse(success=True, payer=PAYER, transaction=TX,
                                             network=requirements.network)  # fmt: skip


def route(**options: Any) -> X402Price:
    return x402_price("answer", "0.01", pay_to=PAY_TO, asset=ASSET, network=NETWORK, **options)


def payment(price: X402Price, *, nonce: str = NONCE, payer: str = PAYER,
            valid_before: int | None = None) -> PaymentPayload:  # fmt: skip
    valid_before = int(time.time()) + 120 if valid_before is None else valid_before
    return PaymentPayload(x402_version=2, accepted=price.requirements, payload={
        "signature": "0x" + "00" * 65, "authorization": {
            "from": payer, "to": PAY_TO, "value": price.requirements.amount, "validAfter": "0",
            "validBefore": str(valid_before), "nonce": nonce}})  # fmt: skip


def paid(payload: PaymentPayload) -> dict[str, str]:
    return {"PAYMENT-SIGNATURE": encode_payment_signature_header(payload)}


@pytest.fixture
def client(tmp_path: Any) -> Iterator[DripClient]:
    drip = DripClient(DripConfig(database_url=f"sqlite:///{tmp_path}/provider.db"))
    try:
        yield drip
    finally:
        drip.close()


def provider(client: DripClient, facilitator: Any, ran: list[str], *, status: int = 200,
             delay_s: float = 0.0, **options: Any) -> httpx.AsyncClient:  # fmt: skip
    """``GET /paid`` (route ``options``) behind X402Meter, in process."""
    api = FastAPI()

    @api.get("/paid")
    async def handler() -> JSONResponse:
        ran.append("paid")
        await asyncio.sleep(delay_s)
        return JSONResponse({"answer": "42"}, status_code=status)

    meter_options = {k: options.pop(k) for k in ("signer", "public_url", "settle_margin_s")
                     if k in options}  # fmt: skip
    app = X402Meter(api, client=client, facilitator=facilitator,
                    routes={"GET /paid": route(**options)}, **meter_options)  # fmt: skip
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def rows(client: DripClient) -> list[tuple[Any, ...]]:
    found = client.ledger.store.query("SELECT nonce, status, tx_hash FROM x402_payments", ())
    return [tuple(r) for r in found]


def balance(chain: Devnet, address: str) -> int:
    usdc = chain.web3().eth.contract(address=chain.usdc, abi=artifact("TestUSDC")["abi"])
    return int(usdc.functions.balanceOf(address).call())


# --- 1. a settlement whose outcome is unknown ----------------------------------------------


@pytest.mark.parametrize(
    ("answer", "kept_tx"),
    [
        # the SDK's receipt wait timed out: the transfer was broadcast and may land
        (SettleResponse(success=False, error_reason="settlement_pending", transaction=TX,
                        network=NETWORK), TX),
        # Drip's facilitator: an exception after a transaction was attempted
        (SettleResponse(success=False, error_reason="settle_error: ReadTimeout",
                        transaction="", network=NETWORK), None),
        # any failure naming a transaction: it was sent
        (SettleResponse(success=False, error_reason="transaction_failed", transaction=TX,
                        network=NETWORK), TX),
    ],
)  # fmt: skip
async def test_an_ambiguous_settlement_answers_502_and_keeps_the_payment_unknown(
    client: DripClient, answer: SettleResponse, kept_tx: str | None
) -> None:
    ran: list[str] = []
    async with provider(client, StubFacilitator(answer), ran) as http:
        r = await http.get("/paid", headers=paid(payment(route())))
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "settlement_pending"
    assert "payment-required" not in r.headers and "payment-response" not in r.headers
    if kept_tx:
        assert kept_tx in r.json()["error"]["message"]
    assert rows(client) == [(NONCE, "unknown", kept_tx)]
    assert client.ledger.balance(client.revenue_account).posted == 0  # for reconciliation
    assert ran == ["paid"]


async def test_a_refused_settlement_is_a_402_and_frees_the_payment(client: DripClient) -> None:
    refused = SettleResponse(success=False, error_reason="invalid_exact_evm_insufficient_balance",
                             transaction="", network=NETWORK)  # fmt: skip
    ran: list[str] = []
    async with provider(client, StubFacilitator(refused), ran, public_url="https://p.test") as http:
        r = await http.get("/paid", headers=paid(payment(route())))
    assert r.status_code == 402 and ran == ["paid"]
    assert r.json()["error"] == "settlement failed: invalid_exact_evm_insufficient_balance"
    assert r.json()["resource"]["url"] == "https://p.test/paid"  # the resource it was for
    assert rows(client) == []


async def test_a_settlement_whose_receipt_times_out_is_pending_everywhere(
    chain: Devnet, client: DripClient, sqlite_url: str, run_app: Callable[[object], str]
) -> None:
    """The facilitator broadcasts, its receipt wait times out: the provider answers 502
    naming the transaction, both rows stay unknown with it, the paying client keeps the
    payment counted (no second payment within its budget), and the transfer lands."""
    signer = DripFacilitatorSigner(chain.accounts[0][1], chain.rpc_url, confirmation_timeout_s=1)
    sdk = x402FacilitatorSync()
    register_exact_evm_facilitator(sdk, signer, [NETWORK])
    facilitator_store = open_store(sqlite_url)
    price = x402_price("answer", "0.01", pay_to=chain.accounts[2][0], asset=chain.usdc,
                       network=NETWORK)  # fmt: skip
    api = FastAPI()

    @api.get("/paid")
    async def handler() -> dict[str, str]:
        return {"answer": "42"}

    facilitator = HTTPFacilitatorClient({"url": run_app(create_app(sdk, facilitator_store))})
    url = run_app(X402Meter(api, client=client, facilitator=facilitator,
                            routes={"GET /paid": price}))  # fmt: skip
    payer, payee = chain.accounts[1][0], chain.accounts[2][0]
    before = balance(chain, payer), balance(chain, payee)
    transport = PayingTransport(Account.from_key(chain.accounts[1][1]),
                                SpendPolicy.of(budget_per_hour="0.01"))  # fmt: skip
    w3 = chain.web3()
    w3.provider.make_request("evm_setAutomine", [False])
    try:
        async with httpx.AsyncClient(base_url=url, transport=transport, timeout=60) as http:
            r = await http.get("/paid")
    finally:
        w3.provider.make_request("evm_setAutomine", [True])
        w3.provider.make_request("evm_mine", [])
    try:
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "settlement_pending"
        [(_, status, tx)] = rows(client)
        assert status == "unknown" and tx and tx in r.json()["error"]["message"]
        settlement = facilitator_store.query("SELECT status, tx_hash FROM x402_settlements", ())
        assert [tuple(s) for s in settlement] == [("unknown", tx)]
        assert w3.eth.get_transaction_receipt(tx)["status"] == 1
        assert (balance(chain, payer), balance(chain, payee)) == (before[0] - 10_000,
                                                                  before[1] + 10_000)  # fmt: skip
        assert [p.amount for p in transport.payments] == [10_000]
        async with httpx.AsyncClient(base_url=url, transport=transport) as http:
            again = await http.get("/paid")
        assert again.headers["x-drip-payment-refused"] == "hourly budget exhausted"
        assert balance(chain, payer) == before[0] - 10_000
    finally:
        facilitator_store.close()


# --- 2. the paying client: what it signed stays counted, for a bounded time -----------------


def offering(amount: str = "10000", max_timeout_s: int = 60) -> str:
    req = PaymentRequirements(scheme="exact", network="eip155:84532", asset=ASSET,
                              amount=amount, pay_to=PAY_TO, max_timeout_seconds=max_timeout_s,
                              extra={"name": "USD Coin", "version": "2"})  # fmt: skip
    return str(encode_payment_required_header(PaymentRequired(accepts=[req])))


def server(offer: Callable[[], str], paid_status: int, kept: list[PaymentPayload],
           settle: bool = False) -> httpx.MockTransport:  # fmt: skip
    """A server that keeps every authorization it is sent and answers ``paid_status``."""

    def handle(request: httpx.Request) -> httpx.Response:
        signature = request.headers.get("payment-signature")
        if signature is None:
            return httpx.Response(402, headers={"PAYMENT-REQUIRED": offer()})
        kept.append(decode_payment_signature_header(signature))
        headers = {}
        if settle:
            done = SettleResponse(success=True, transaction=TX, network="eip155:84532")
            headers["PAYMENT-RESPONSE"] = encode_payment_response_header(done)
        return httpx.Response(paid_status, headers=headers)

    return httpx.MockTransport(handle)


@pytest.mark.parametrize("paid_status", [402, 500])
async def test_a_signed_authorization_stays_counted_whatever_the_server_answers(
    paid_status: int,
) -> None:
    kept: list[PaymentPayload] = []
    policy = SpendPolicy.of(max_per_call="0.01", budget_per_hour="0.02")
    transport = PayingTransport(Account.create(), policy,
                                inner=server(offering, paid_status, kept))  # fmt: skip
    async with httpx.AsyncClient(transport=transport) as http:
        answers = [await http.get("http://x/") for _ in range(5)]
    # the server holds every authorization it got: the payer can be charged for each
    assert len(kept) == 2 and [p.amount for p in transport.payments] == [10_000, 10_000]
    assert [a.status_code for a in answers] == [paid_status] * 2 + [402] * 3
    assert answers[-1].headers["x-drip-payment-refused"] == "hourly budget exhausted"


@pytest.mark.parametrize(("offered", "lifetime"), [(86_400, 300), (0, 300), (60, 60)])
async def test_an_authorization_lives_no_longer_than_the_policy_allows(
    offered: int, lifetime: int
) -> None:
    kept: list[PaymentPayload] = []
    inner = server(lambda: offering(max_timeout_s=offered), 200, kept, settle=True)
    transport = PayingTransport(Account.create(), SpendPolicy(), inner=inner)
    now = int(time.time())
    async with httpx.AsyncClient(transport=transport) as http:
        assert (await http.get("http://x/")).status_code == 200
    [payload] = kept
    valid_before = int(payload.payload["authorization"]["validBefore"])
    assert now + lifetime <= valid_before <= int(time.time()) + lifetime
    assert payload.accepted.max_timeout_seconds == offered  # the offer, echoed as made
    assert [p.transaction for p in transport.payments] == [TX]
    for too_short in (0, 30, 59):  # a server refuses what expires within its margin
        with pytest.raises(ValueError, match="max_timeout_s"):
            SpendPolicy.of(max_timeout_s=too_short)


async def test_a_settle_first_route_that_fails_sends_no_signed_receipt(
    client: DripClient,
) -> None:
    """The payment settled before the handler, which then failed: PAYMENT-RESPONSE says
    what settled, but no receipt attests a delivery that did not happen."""
    signed = {"signer": SIGNER, "public_url": "https://p.test", "settle_first": True}
    async with provider(client, StubFacilitator(), [], status=500, **signed) as http:
        failed = await http.get("/paid", headers=paid(payment(route())))
    assert failed.status_code == 500
    settlement = decode_payment_response_header(failed.headers["payment-response"])
    assert settlement.success and settlement.transaction == TX
    assert receipts.receipt_of(settlement) is None
    stored = client.ledger.store.query("SELECT status, receipt FROM x402_payments", ())
    assert [tuple(s) for s in stored] == [("settled", None)]
    # a delivered one carries its receipt
    async with provider(client, StubFacilitator(), [], **signed) as http:
        ok = await http.get("/paid", headers=paid(payment(route(), nonce="0x" + "5b" * 32)))
    receipt = receipts.receipt_of(decode_payment_response_header(ok.headers["payment-response"]))
    assert receipt is not None and receipts.recover_receipt(receipt) == SIGNER.address


# --- 3. amounts the client will sign ---------------------------------------------------------


@pytest.mark.parametrize("amount", ["-5000000", "1e3", "0x10", "010", "+5", " 5", "1.5", "0",
                                    "1_000", str(2**256)])  # fmt: skip
async def test_an_amount_that_is_not_a_plain_positive_integer_is_refused(amount: str) -> None:
    kept: list[PaymentPayload] = []
    policy = SpendPolicy.of(max_per_call="1", budget_per_hour="1")
    transport = PayingTransport(Account.create(), policy,
                                inner=server(lambda: offering(amount), 200, kept))  # fmt: skip
    async with httpx.AsyncClient(transport=transport) as http:
        r = await http.get("http://x/")
    assert r.status_code == 402
    assert r.headers["x-drip-payment-refused"] == "amount is not a positive integer"
    assert kept == [] and transport.payments == []


async def test_an_unreadable_offer_is_not_paid() -> None:
    kept: list[PaymentPayload] = []
    transport = PayingTransport(Account.create(), SpendPolicy(),
                                inner=server(lambda: "%%%not an offer", 200, kept))  # fmt: skip
    async with httpx.AsyncClient(transport=transport) as http:
        r = await http.get("http://x/")
    assert r.status_code == 402
    assert r.headers["x-drip-payment-refused"] == "unreadable PAYMENT-REQUIRED"
    assert kept == [] and transport.payments == []


async def test_a_signing_failure_spends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    kept: list[PaymentPayload] = []
    transport = PayingTransport(Account.create(), SpendPolicy.of(budget_per_hour="0.01"),
                                inner=server(offering, 200, kept))  # fmt: skip

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the signer is unavailable")

    monkeypatch.setattr(transport._x402, "create_payment_payload", broken)
    async with httpx.AsyncClient(transport=transport) as http:
        with pytest.raises(RuntimeError):
            await http.get("http://x/")
    assert transport.payments == [] and kept == []


# --- 4. one authorization, one key -------------------------------------------------------------


async def test_one_authorization_spelled_several_ways_is_served_and_booked_once(
    client: DripClient,
) -> None:
    facilitator = StubFacilitator()
    ran: list[str] = []
    price = route()
    digits = NONCE[2:]
    spaced = " ".join(digits[i : i + 2] for i in range(0, 64, 2))
    async with provider(client, facilitator, ran, delay_s=0.2) as http:
        first = await http.get("/paid", headers=paid(payment(price, nonce=spaced)))
        others = await asyncio.gather(*(
            http.get("/paid", headers=paid(payment(price, nonce=nonce, payer=payer)))
            for nonce, payer in ((NONCE, PAYER), (digits, PAYER), ("0x" + digits.upper(), PAYER),
                                 (NONCE, PAYER.lower()), (spaced, PAYER))))  # fmt: skip
    assert first.status_code == 200, first.text
    # booked under the one spelling, whatever the payer wrote
    assert first.headers["x-drip-receipt"] == f"x402:{PAYER.lower()}:{NONCE}"
    assert client.ledger.balance(client.revenue_account).posted == 10_000
    assert [r.status_code for r in others] == [402] * 5
    assert all(r.json()["error"] == "payment already used" for r in others)
    assert ran == ["paid"] and facilitator.settled == 1
    assert rows(client) == [(NONCE, "settled", TX)]


@pytest.mark.parametrize("nonce", ["0x1234", "0x" + "zz" * 32, "0x" + "00" * 33, ""])
async def test_a_nonce_that_is_not_32_bytes_is_refused_before_verify(
    client: DripClient, nonce: str
) -> None:
    facilitator = StubFacilitator()
    ran: list[str] = []
    async with provider(client, facilitator, ran) as http:
        r = await http.get("/paid", headers=paid(payment(route(), nonce=nonce)))
    assert r.status_code == 402 and r.json()["error"].startswith("invalid payment")
    assert facilitator.verified == 0 and ran == [] and rows(client) == []


async def test_a_permit2_payment_is_keyed_on_its_payer_and_nonce(client: DripClient) -> None:
    """Re-encoded (JSON spacing, the nonce with a leading zero): one payment, one key."""
    price = route()
    ran: list[str] = []
    facilitator = StubFacilitator()

    def header(nonce: str, separators: tuple[str, str]) -> dict[str, str]:
        body = {"x402Version": 2, "accepted": price.requirements.model_dump(by_alias=True),
                "payload": {"signature": "0x" + "55" * 65, "permit2Authorization": {
                    "from": PAYER, "nonce": nonce, "deadline": str(int(time.time()) + 120),
                    "permitted": {"token": ASSET, "amount": "10000"}, "spender": "0x" + "44" * 20,
                    "witness": {"to": PAY_TO, "validAfter": "0"}}}}  # fmt: skip
        raw = json.dumps(body, separators=separators).encode()
        return {"PAYMENT-SIGNATURE": base64.b64encode(raw).decode()}

    spellings = [("12345", (",", ":")), ("12345", (", ", ": ")), ("012345", (",", ":"))]
    async with provider(client, facilitator, ran, delay_s=0.2) as http:
        answers = await asyncio.gather(*(http.get("/paid", headers=header(n, s))
                                         for n, s in spellings))  # fmt: skip
    assert sorted(r.status_code for r in answers) == [200, 402, 402]
    assert ran == ["paid"] and facilitator.settled == 1
    found = client.ledger.store.query("SELECT payer, nonce FROM x402_payments", ())
    assert [tuple(r) for r in found] == [(PAYER.lower(), "12345")]


def sdk_payment(chain: Devnet, req: PaymentRequirements, payer: int = 1) -> PaymentPayload:
    client = x402ClientSync()
    register_exact_evm_client(client, EthAccountSigner(Account.from_key(chain.accounts[payer][1])))
    client.set_spend_controls(False)
    payload: PaymentPayload = client.create_payment_payload(PaymentRequired(accepts=[req]))
    return payload


def requirements(chain: Devnet) -> PaymentRequirements:
    return PaymentRequirements(scheme="exact", network=NETWORK, asset=chain.usdc, amount="1000",
                               pay_to=chain.accounts[2][0], max_timeout_seconds=120,
                               extra={"name": "USD Coin", "version": "2"})  # fmt: skip


def test_the_facilitator_sends_one_transaction_however_the_nonce_is_spelled(
    chain: Devnet, facilitator_url: str, sqlite_url: str
) -> None:
    sdk = HTTPFacilitatorClientSync({"url": facilitator_url})
    req = requirements(chain)
    payload = sdk_payment(chain, req)
    nonce = payload.payload["authorization"]["nonce"]
    digits = nonce[2:]
    w3, facilitator = chain.web3(), chain.accounts[0][0]
    sent_before = w3.eth.get_transaction_count(facilitator)
    answers = []
    for spelling in (nonce, digits, " ".join(digits[i : i + 2] for i in range(0, 64, 2))):
        copy = payload.model_copy(deep=True)
        copy.payload["authorization"]["nonce"] = spelling
        answers.append(sdk.settle(copy, req))
    # the other spellings are the settled key: answered from its row, with its transaction
    assert [a.success for a in answers] == [True, False, False]
    assert [a.error_reason for a in answers[1:]] == ["nonce_already_used"] * 2
    assert w3.eth.get_transaction_count(facilitator) == sent_before + 1
    store = open_store(sqlite_url)
    try:
        found = store.query("SELECT nonce, status FROM x402_settlements WHERE nonce = ?",
                            (nonce.lower(),))  # fmt: skip
        assert [tuple(r) for r in found] == [(nonce.lower(), "settled")]
    finally:
        store.close()


# --- 5. a payment that expires before it could be settled ----------------------------------------


async def test_a_payment_expiring_within_the_settle_margin_never_reaches_the_handler(
    client: DripClient,
) -> None:
    facilitator = StubFacilitator()
    ran: list[str] = []
    soon = payment(route(), valid_before=int(time.time()) + 20)  # the SDK accepts >= now + 6
    async with provider(client, facilitator, ran) as http:
        r = await http.get("/paid", headers=paid(soon))
    assert r.status_code == 402 and "valid_before" in r.json()["error"]
    assert ran == [] and facilitator.verified == 0 and rows(client) == []
    # a route whose handler is quick may take it
    async with provider(client, facilitator, ran, settle_margin_s=10) as http:
        assert (await http.get("/paid", headers=paid(soon))).status_code == 200
    assert ran == ["paid"]
    # a margin no payment could meet is a configuration error
    with pytest.raises(errors.ConfigError, match="settle_margin_s"):
        provider(client, facilitator, ran, settle_margin_s=120)  # max_timeout_s is 120


# --- 6. the facilitator keeps rows only for what it may have sent ----------------------------


KEY = "0x" + "11" * 32


def facilitator_body(req: dict[str, Any], **auth: str) -> dict[str, Any]:
    authorization = {"from": PAYER, "to": PAY_TO, "value": "10000", "validAfter": "0",
                     "validBefore": "99999999999", "nonce": NONCE, **auth}  # fmt: skip
    payload = {
        "x402Version": 2,
        "accepted": req,
        "payload": {"authorization": authorization, "signature": "0x" + "55" * 65},
    }
    return {"x402Version": 2, "paymentPayload": payload, "paymentRequirements": req}


def test_the_facilitator_keeps_no_row_for_what_it_never_sent(sqlite_url: str) -> None:
    """Junk is refused before anything is stored; an error before any transaction frees
    the nonce (the RPC here is unreachable: nothing can be sent)."""
    store = open_store(sqlite_url)
    app = create_app(build("http://127.0.0.1:9", KEY, [NETWORK]), store, assets=[ASSET])
    req = {
        "scheme": "exact",
        "network": NETWORK,
        "asset": ASSET,
        "amount": "10000",
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 60,
        "extra": {"name": "USD Coin", "version": "2"},
    }
    cases = [
        (facilitator_body(req, value="abc"), "invalid_payload"),
        (facilitator_body(req, nonce="0x1234"), "invalid_payload"),
        (facilitator_body(req, **{"from": "nobody"}), "invalid_payload"),
        # the SDK raises before sending anything: no such scheme
        (facilitator_body({**req, "scheme": "upto"}), "settle_refused"),
        # a network not configured, an asset not allowed: refused before the SDK
        (facilitator_body({**req, "network": "solana:devnet"}), "unsupported_network"),
        (facilitator_body({**req, "asset": PAY_TO}), "unsupported_asset"),
        # the SDK's own refusal (it cannot read the chain)
        (facilitator_body(req), "invalid_exact_evm"),
    ]
    try:
        with TestClient(app) as http:
            for body, reason in cases:
                settled = http.post("/settle", json=body).json()
                assert settled["success"] is False
                assert settled["errorReason"].startswith(reason), (body, settled)
                assert http.post("/verify", json=body).json()["isValid"] is False
        assert store.query("SELECT * FROM x402_settlements", ()) == []
    finally:
        store.close()


def test_a_send_that_raised_keeps_the_settlement_unknown(
    chain: Devnet, sqlite_url: str, run_app: Callable[[object], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The node may have taken a transaction whose send raised (the SDK reports no
    transaction): the nonce stays reserved, and the answer says the outcome is unknown."""

    def lost(self: Any, *args: Any, **kwargs: Any) -> str:
        raise TimeoutError("no answer from the node")

    monkeypatch.setattr(FacilitatorWeb3Signer, "write_contract", lost)
    store = open_store(sqlite_url)
    try:
        url = run_app(create_app(build(chain.rpc_url, chain.accounts[0][1], [NETWORK]), store))
        req = requirements(chain)
        answer = HTTPFacilitatorClientSync({"url": url}).settle(sdk_payment(chain, req), req)
        assert not answer.success and not answer.transaction
        assert (answer.error_reason or "").startswith("settle_error")
        found = store.query("SELECT status FROM x402_settlements", ())
        assert [tuple(r) for r in found] == [("unknown",)]
    finally:
        store.close()


def test_one_nonce_on_another_asset_is_another_settlement(
    chain: Devnet, facilitator_url: str, sqlite_url: str
) -> None:
    sdk = HTTPFacilitatorClientSync({"url": facilitator_url})
    req = requirements(chain)
    payload = sdk_payment(chain, req)
    auth = payload.payload["authorization"]
    store = open_store(sqlite_url)
    try:  # the same payer and nonce, settled elsewhere
        store.execute("INSERT INTO x402_settlements (payer, nonce, network, asset, pay_to, "
                      "amount, status, created_us) VALUES (?, ?, ?, ?, ?, '1', 'settled', 0)",
                      (auth["from"].lower(), auth["nonce"], NETWORK, ASSET, PAY_TO))  # fmt: skip
    finally:
        store.close()
    assert sdk.verify(payload, req).is_valid
    assert sdk.settle(payload, req).success


def test_settlement_rows_migrate_to_the_network_and_asset_key(store_url: str) -> None:
    store = open_store(store_url)
    try:
        store.migrate("x402_settlements", SETTLEMENT_MIGRATIONS[:1])
        insert = ("INSERT INTO x402_settlements (payer, nonce, network, asset, pay_to, amount, "
                  "status, created_us) VALUES (?, ?, ?, ?, ?, '1', 'settled', 7)")  # fmt: skip
        store.execute(insert, (PAYER.lower(), NONCE, NETWORK, "0x" + "Ab" * 20, PAY_TO))
        create_app(build("http://127.0.0.1:9", KEY, [NETWORK]), store)  # migrates
        found = store.query("SELECT payer, nonce, network, asset, status FROM x402_settlements", ())
        assert [tuple(r) for r in found] == [
            (PAYER.lower(), NONCE, NETWORK, "0x" + "ab" * 20, "settled")]  # fmt: skip
        assert store.execute(insert, (PAYER.lower(), NONCE, "eip155:8453", ASSET, PAY_TO))
    finally:
        store.close()
