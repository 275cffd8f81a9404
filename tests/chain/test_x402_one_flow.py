"""One provider route, two kinds of callers: a prepaid Drip session or an x402 payment,
whichever the request carries; the 402 offers both. With a signer, offers and receipts
of the x402 ``offer-receipt`` extension are signed and check out offline."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Annotated, Any

import httpx
import pytest
from eth_account import Account
from fastapi import Depends, FastAPI
from x402.http.clients import x402_httpx_transport
from x402.http.facilitator_client import HTTPFacilitatorClient
from x402.http.utils import decode_payment_required_header, decode_payment_response_header

from drip import DripClient, DripConfig, errors
from drip.asgi import price
from drip.chain.devnet import Devnet
from drip.x402 import receipts
from drip.x402.client import PayingTransport, SpendPolicy
from drip.x402.server import X402Meter, X402Payment, add_x402, x402_payment, x402_price

NETWORK = "eip155:31337"
Paid = Annotated[X402Payment | None, Depends(x402_payment)]
PROVIDER = "acme"
SIGNER = Account.create()


class Shop:
    def __init__(self, url: str, client: DripClient, ran: dict[str, int]) -> None:
        self.url, self.client, self.ran = url, client, ran

    def session(self, budget: str = "0.05") -> str:
        return str(self.client.sync.create_session("buyer", PROVIDER, budget).id)


@pytest.fixture
def shop(chain: Devnet, facilitator_url: str, tmp_path: Any, run_app: Any) -> Iterator[Shop]:
    api = FastAPI()
    ran = {"answer": 0, "local": 0}

    @api.get("/answer")
    async def answer() -> dict[str, str]:
        ran["answer"] += 1
        return {"answer": "42"}

    @api.get("/local")
    async def local() -> dict[str, str]:
        ran["local"] += 1
        return {"local": "yes"}

    client = DripClient(DripConfig(database_url=f"sqlite:///{tmp_path}/shop.db",
                                   provider=PROVIDER))  # fmt: skip
    client.sync.provision_user("buyer", initial_balance="0.025")
    app = X402Meter(
        api, client=client, facilitator=HTTPFacilitatorClient({"url": facilitator_url}),
        routes={"GET /answer": x402_price("answer", "0.01", pay_to=chain.accounts[2][0],
                                          asset=chain.usdc, network=NETWORK)},
        sessions={"GET /answer": price("answer", "0.01"), "GET /local": price("local", "0.001")},
        signer=SIGNER, public_url="https://api.acme.test",
    )  # fmt: skip
    try:
        yield Shop(run_app(app), client, ran)
    finally:
        client.close()


def x402_payer(chain: Devnet, index: int = 1) -> httpx.AsyncBaseTransport:
    from x402 import x402Client
    from x402.mechanisms.evm.exact import register_exact_evm_client
    from x402.mechanisms.evm.signers import EthAccountSigner

    client = x402Client()
    register_exact_evm_client(client, EthAccountSigner(Account.from_key(chain.accounts[index][1])))
    allowed = {"network": NETWORK, "asset": chain.usdc, "max_amount_per_payment": "1000000"}
    client.set_spend_controls({"allowed_assets": [allowed]})
    return x402_httpx_transport(client)


async def test_the_402_offers_both_a_session_and_x402(shop: Shop) -> None:
    async with httpx.AsyncClient(base_url=shop.url) as http:
        r = await http.get("/answer")
    assert r.status_code == 402
    required = decode_payment_required_header(r.headers["payment-required"])
    assert required.accepts[0].amount == "10000" and required.accepts[0].network == NETWORK
    session = required.extensions["drip-session"]["info"]
    assert session == {
        "header": "X-Drip-Session", "event": "answer", "currency": "USDC",
        "perCall": "0.01", "perUnit": "0", "maxUnits": 0, "maxCharge": "0.01",
    }  # fmt: skip
    assert r.json()["extensions"]["drip-session"]["info"] == session  # the body says the same
    assert required.resource is not None
    assert required.resource.url == "https://api.acme.test/answer"
    assert shop.ran["answer"] == 0


async def test_a_session_pays_from_its_wallet_and_x402_is_not_touched(
    chain: Devnet, shop: Shop
) -> None:
    token = shop.session()
    async with httpx.AsyncClient(base_url=shop.url) as http:
        r = await http.get("/answer", headers={"X-Drip-Session": token})
    assert r.status_code == 200 and r.json() == {"answer": "42"}
    assert r.headers["x-drip-charged"] == "0.01"
    assert "payment-response" not in r.headers
    assert shop.client.sync.get_user("buyer")["balance_usdc"] == Decimal("0.015")
    assert shop.client.ledger.store.query("SELECT count(*) FROM x402_payments", ())[0][0] == 0


async def test_a_session_short_of_credit_can_pay_that_call_in_x402(
    chain: Devnet, shop: Shop
) -> None:
    token = shop.session()
    async with httpx.AsyncClient(base_url=shop.url) as http:
        for _ in range(2):
            assert (await http.get("/answer", headers={"X-Drip-Session": token})).status_code == 200
        short = await http.get("/answer", headers={"X-Drip-Session": token})
    # Drip's own error shape, plus the x402 way out
    assert short.status_code == 402
    assert short.json()["error"]["code"] == "insufficient_credits"
    required = decode_payment_required_header(short.headers["payment-required"])
    assert required.accepts[0].pay_to == chain.accounts[2][0]
    assert shop.ran["answer"] == 2
    # the same caller pays this one call with x402 instead
    async with httpx.AsyncClient(base_url=shop.url, transport=x402_payer(chain)) as http:
        paid = await http.get("/answer")
    assert paid.status_code == 200 and shop.ran["answer"] == 3
    assert decode_payment_response_header(paid.headers["payment-response"]).success
    assert shop.client.sync.get_user("buyer")["balance_usdc"] == Decimal("0.005")  # untouched


async def test_a_session_only_route_refuses_without_an_x402_offer(shop: Shop) -> None:
    async with httpx.AsyncClient(base_url=shop.url) as http:
        r = await http.get("/local")
        ok = await http.get("/local", headers={"X-Drip-Session": shop.session()})
        paid_header_only = await http.get("/local", headers={"PAYMENT-SIGNATURE": "e30="})
    assert r.status_code == 402 and "payment-required" not in r.headers
    assert r.json()["error"]["param"] == "X-Drip-Session"
    assert ok.status_code == 200 and ok.headers["x-drip-charged"] == "0.001"
    assert paid_header_only.status_code == 402  # x402 is not offered here: no session, no call
    assert shop.ran["local"] == 1


async def test_offers_and_receipts_are_signed_and_check_out(chain: Devnet, shop: Shop) -> None:
    async with httpx.AsyncClient(base_url=shop.url) as http:
        unpaid = await http.get("/answer")
    required = decode_payment_required_header(unpaid.headers["payment-required"])
    [offer] = required.extensions["offer-receipt"]["info"]["offers"]
    assert receipts.recover_offer(offer) == SIGNER.address
    accepted = required.accepts[0]
    assert offer["payload"] == {
        "resourceUrl": "https://api.acme.test/answer", "scheme": "exact", "network": NETWORK,
        "asset": accepted.asset, "payTo": accepted.pay_to, "amount": "10000",
        "maxTimeoutSeconds": accepted.max_timeout_seconds, "issuedAt": 0,
    }  # fmt: skip

    async with httpx.AsyncClient(base_url=shop.url, transport=x402_payer(chain, 3)) as http:
        paid = await http.get("/answer")
    assert paid.status_code == 200
    settlement = decode_payment_response_header(paid.headers["payment-response"])
    receipt = receipts.receipt_of(settlement)
    assert receipt is not None and receipts.recover_receipt(receipt) == SIGNER.address
    assert receipt["payload"]["transaction"] == settlement.transaction
    assert receipt["payload"]["payer"].lower() == chain.accounts[3][0].lower()
    assert receipt["payload"]["resourceUrl"] == "https://api.acme.test/answer"
    assert receipt["payload"]["network"] == NETWORK

    # the ledger transfer behind X-Drip-Receipt, and the receipt kept with the payment
    transfer_id = paid.headers["x-drip-receipt"]
    transfer = shop.client.ledger.get_transfer(transfer_id)
    assert transfer.amount == 10_000 and transfer.credit_account_id == shop.client.revenue_account
    [(stored, tx)] = shop.client.ledger.store.query(
        "SELECT receipt, tx_hash FROM x402_payments WHERE transfer_id = ?", (transfer_id,)
    )
    assert json.loads(stored) == receipt and tx == settlement.transaction

    # a receipt edited after signing names somebody else
    forged = {**receipt, "payload": {**receipt["payload"], "payer": chain.accounts[4][0]}}
    assert receipts.recover_receipt(forged) != SIGNER.address
    for bad in ({}, {"format": "jws", "signature": "x"}, {"format": "eip712", "payload": {}},
                {**receipt, "signature": "0x1234"}, None):  # fmt: skip
        with pytest.raises(errors.InvalidRequest):
            receipts.recover_receipt(bad)


async def test_drips_paying_client_gets_the_receipt_too(chain: Devnet, shop: Shop) -> None:
    transport = PayingTransport(Account.from_key(chain.accounts[4][1]), SpendPolicy())
    async with httpx.AsyncClient(base_url=shop.url, transport=transport) as http:
        r = await http.get("/answer")
    assert r.status_code == 200
    receipt = receipts.receipt_of(decode_payment_response_header(r.headers["payment-response"]))
    assert receipt is not None and receipts.recover_receipt(receipt) == SIGNER.address


def test_receipt_helpers_refuse_non_evm_networks() -> None:
    with pytest.raises(errors.InvalidRequest):
        receipts.sign_receipt(SIGNER, network="solana:mainnet", resource_url="u", payer="p")
    assert receipts.receipt_of({"extensions": None}) is None
    assert receipts.receipt_of({}) is None


async def test_the_fastapi_helper_and_dependency(
    chain: Devnet, facilitator_url: str, tmp_path: Any, run_app: Any
) -> None:
    api = FastAPI()

    @api.post("/report")
    async def report(payment: Paid) -> dict[str, Any]:
        assert payment is not None
        return {"payer": payment.payer, "amount": payment.amount, "tx": payment.transaction}

    @api.get("/free")
    async def free(payment: Paid) -> dict[str, Any]:
        return {"paid": payment is not None}

    client = DripClient(DripConfig(database_url=f"sqlite:///{tmp_path}/helper.db"))
    add_x402(api, client=client, facilitator=HTTPFacilitatorClient({"url": facilitator_url}),
             routes={"POST /report": x402_price("report", "0.002", pay_to=chain.accounts[2][0],
                                                asset=chain.usdc, network=NETWORK,
                                                settle_first=True)})  # fmt: skip
    try:
        url = run_app(api)
        async with httpx.AsyncClient(base_url=url) as plain:
            assert (await plain.post("/report")).status_code == 402
            assert (await plain.get("/free")).json() == {"paid": False}
        async with httpx.AsyncClient(base_url=url, transport=x402_payer(chain, 5)) as http:
            r = await http.post("/report")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["payer"] == chain.accounts[5][0].lower() and body["amount"] == 2_000
        # settle-first: the handler already knows the transaction it was paid by
        assert (
            body["tx"] == decode_payment_response_header(r.headers["payment-response"]).transaction
        )
    finally:
        client.close()


def test_prices_and_signers_are_checked_at_configuration(chain: Devnet, tmp_path: Any) -> None:
    from drip import errors as drip_errors

    base = {"pay_to": chain.accounts[2][0], "asset": chain.usdc}
    with pytest.raises(drip_errors.DripError):
        x402_price("no spaces allowed", "0.01", network=NETWORK, **base)
    with pytest.raises(drip_errors.ConfigError):
        x402_price("ok", "0.01", network="base-sepolia", **base)  # v1 names are not CAIP-2
    client = DripClient(DripConfig(database_url=f"sqlite:///{tmp_path}/cfg.db"))
    try:
        with pytest.raises(drip_errors.ConfigError, match="public_url"):
            X402Meter(FastAPI(), client=client, facilitator=None, signer=SIGNER,
                      routes={"/x": x402_price("x", "0.01", network=NETWORK, **base)})  # fmt: skip
        solana = x402_price("x", "0.01", network="solana:devnet", **base)
        with pytest.raises(drip_errors.ConfigError, match="eip155"):
            X402Meter(FastAPI(), client=client, facilitator=None, signer=SIGNER,
                      public_url="https://p.test", routes={"/x": solana})  # fmt: skip
    finally:
        client.close()


async def test_a_settlement_that_reverts_after_serving_answers_502_naming_its_transaction(
    chain: Devnet, shop: Shop, run_app: Any, facilitator_url: str, tmp_path: Any
) -> None:
    """The payer empties its wallet while the handler runs: the settlement's transaction
    reverts. A failure that names a transaction is not a bare 402: 502 settlement_pending
    with the transaction, the row kept unknown with it (reconciliation reads the receipt),
    nothing booked."""
    from drip.chain.artifacts import artifact
    from drip.chain.devnet import send

    payer = chain.accounts[6]
    api = FastAPI()

    @api.get("/drain")
    async def drain() -> dict[str, str]:
        w3 = chain.web3()
        usdc = w3.eth.contract(address=chain.usdc, abi=artifact("TestUSDC")["abi"])
        everything = usdc.functions.balanceOf(payer[0]).call()
        send(w3, usdc.functions.transfer(chain.accounts[7][0], everything), payer)
        return {"drained": "yes"}

    client = DripClient(DripConfig(database_url=f"sqlite:///{tmp_path}/drain.db"))
    app = X402Meter(api, client=client, facilitator=HTTPFacilitatorClient({"url": facilitator_url}),
                    routes={"GET /drain": x402_price("drain", "0.01", pay_to=chain.accounts[2][0],
                                                     asset=chain.usdc, network=NETWORK)},
                    signer=SIGNER, public_url="https://api.acme.test")  # fmt: skip
    try:
        url = run_app(app)
        async with httpx.AsyncClient(base_url=url, transport=x402_payer(chain, 6)) as http:
            r = await http.get("/drain")
        assert r.status_code == 502 and r.json()["error"]["code"] == "settlement_pending"
        [(status, tx)] = client.ledger.store.query("SELECT status, tx_hash FROM x402_payments", ())
        assert status == "unknown" and tx in r.json()["error"]["message"]
        assert chain.web3().eth.get_transaction_receipt(tx)["status"] == 0
        assert client.ledger.balance(client.revenue_account).posted == 0
    finally:
        client.close()
        # give the payer its funds back for the other tests
        w3 = chain.web3()
        usdc = w3.eth.contract(address=chain.usdc, abi=artifact("TestUSDC")["abi"])
        back = usdc.functions.balanceOf(chain.accounts[7][0]).call()
        send(w3, usdc.functions.transfer(payer[0], back), chain.accounts[7])


async def test_a_booking_failure_after_settlement_still_serves_the_payer(
    chain: Devnet, shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    from drip.x402 import server as x402_server

    async def broken(self: object, tx_hash: str, network: str) -> str:
        raise RuntimeError("the ledger is down")

    monkeypatch.setattr(x402_server._PaidCall, "_record", broken)
    async with httpx.AsyncClient(base_url=shop.url, transport=x402_payer(chain, 8)) as http:
        r = await http.get("/answer")
    assert r.status_code == 200 and r.json() == {"answer": "42"}
    settlement = decode_payment_response_header(r.headers["payment-response"])
    assert settlement.success and "x-drip-receipt" not in r.headers
    # the row says the money moved, for reconciliation
    [(status, tx)] = shop.client.ledger.store.query("SELECT status, tx_hash FROM x402_payments", ())
    assert status == "settled" and tx == settlement.transaction


def test_head_and_prefixed_paths_find_their_priced_route(chain: Devnet, tmp_path: Any) -> None:
    """As DripMeter: HEAD runs the GET handler, and a Mount or proxy prefix (root_path,
    in ``path`` too) does not hide the route the app serves."""
    base = {"pay_to": chain.accounts[2][0], "asset": chain.usdc}
    client = DripClient(DripConfig(database_url=f"sqlite:///{tmp_path}/route.db"))
    try:
        answer = x402_price("answer", "0.01", network=NETWORK, **base)
        meter = X402Meter(FastAPI(), client=client, facilitator=None, signer=SIGNER,
                          public_url="https://p.test", routes={"GET /answer": answer},
                          sessions={"GET /answer": price("answer", "0.01")})  # fmt: skip
        for method, path, root in (("GET", "/answer", ""), ("HEAD", "/answer", ""),
                                   ("get", "/v1/answer", "/v1")):  # fmt: skip
            scope = {"type": "http", "method": method, "path": path, "root_path": root}
            assert meter._route(scope) is answer, (method, path)
            assert meter._session_price(scope) is not None
        assert meter._route({"method": "POST", "path": "/answer", "root_path": ""}) is None
    finally:
        client.close()
