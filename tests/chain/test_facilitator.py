"""The Drip facilitator over real HTTP, driven by the official x402 SDK's own client and
facilitator client, settling real EIP-3009 transfers on anvil."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

from eth_account import Account
from x402 import x402ClientSync
from x402.http.facilitator_client import HTTPFacilitatorClientSync
from x402.mechanisms.evm.exact import register_exact_evm_client
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.schemas import PaymentRequired, PaymentRequirements

from drip.chain.artifacts import artifact
from drip.chain.devnet import Devnet
from drip.x402.facilitator import GAS_LIMIT, build

NETWORK = "eip155:31337"


def requirements(chain: Devnet, amount: int = 10_000, pay_to: int = 2) -> PaymentRequirements:
    return PaymentRequirements(
        scheme="exact", network=NETWORK, asset=chain.usdc, amount=str(amount),
        pay_to=chain.accounts[pay_to][0], max_timeout_seconds=120,
        extra={"name": "USD Coin", "version": "2"},
    )  # fmt: skip


def pay(chain: Devnet, req: PaymentRequirements, payer: int = 1) -> Any:
    client = x402ClientSync()
    register_exact_evm_client(client, EthAccountSigner(Account.from_key(chain.accounts[payer][1])))
    # the devnet token is not one of the SDK's default assets: allow it explicitly
    client.set_spend_controls({
        "allowed_assets": [{"network": NETWORK, "asset": chain.usdc,
                            "max_amount_per_payment": str(10**18)}],
        "max_amount_per_payment": False,
    })  # fmt: skip
    return client.create_payment_payload(PaymentRequired(accepts=[req]))


def balance(chain: Devnet, who: int) -> int:
    usdc = chain.web3().eth.contract(address=chain.usdc, abi=artifact("TestUSDC")["abi"])
    return int(usdc.functions.balanceOf(chain.accounts[who][0]).call())


def test_supported_verify_settle_once(chain: Devnet, facilitator_url: str) -> None:
    sdk = HTTPFacilitatorClientSync({"url": facilitator_url})
    kinds = sdk.get_supported().kinds
    assert any(k.scheme == "exact" and k.network == NETWORK for k in kinds)
    req = requirements(chain)
    payload = pay(chain, req)
    verified = sdk.verify(payload, req)
    assert verified.is_valid, verified
    assert verified.payer and verified.payer.lower() == chain.accounts[1][0].lower()
    before_payer, before_payee = balance(chain, 1), balance(chain, 2)
    settled = sdk.settle(payload, req)
    assert settled.success, settled
    receipt = chain.web3().eth.get_transaction_receipt(settled.transaction)
    assert receipt["status"] == 1
    # settled with Drip's bounded gas limit, not the SDK's 500k default
    assert chain.web3().eth.get_transaction(settled.transaction)["gas"] == GAS_LIMIT
    assert receipt["gasUsed"] < GAS_LIMIT
    assert (balance(chain, 1), balance(chain, 2)) == (before_payer - 10_000, before_payee + 10_000)
    # a repeated settlement is answered from the facilitator's record, never sent again,
    # and never told success a second time (one payment, one caller's success)
    again = sdk.settle(payload, req)
    assert not again.success and again.error_reason == "nonce_already_used", again
    assert not sdk.verify(payload, req).is_valid
    assert balance(chain, 2) == before_payee + 10_000


def test_concurrent_duplicates_settle_once(chain: Devnet, facilitator_url: str) -> None:
    req = requirements(chain, amount=3_000)
    payload = pay(chain, req)
    before = balance(chain, 2)
    w3, facilitator = chain.web3(), chain.accounts[0][0]
    sent_before = w3.eth.get_transaction_count(facilitator)

    def settle(_: int) -> Any:
        return HTTPFacilitatorClientSync({"url": facilitator_url}).settle(payload, req)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(settle, range(6)))
    # one transaction, one caller told success; the others that it is used or in flight
    assert len([o for o in outcomes if o.success]) == 1, outcomes
    assert all(o.success or o.error_reason in ("settlement_pending", "nonce_already_used")
               for o in outcomes), outcomes  # fmt: skip
    assert w3.eth.get_transaction_count(facilitator) == sent_before + 1
    assert balance(chain, 2) == before + 3_000


def test_mismatches_are_invalid_with_a_reason(chain: Devnet, facilitator_url: str) -> None:
    sdk = HTTPFacilitatorClientSync({"url": facilitator_url})
    req = requirements(chain)
    payload = pay(chain, req)
    for changed in (
        requirements(chain, amount=20_000),  # another amount
        requirements(chain, pay_to=3),  # another recipient
        requirements(chain).model_copy(update={"asset": chain.accounts[4][0]}),  # asset
        requirements(chain).model_copy(update={"network": "eip155:8453"}),  # network
    ):
        result = sdk.verify(payload, changed)
        assert not result.is_valid and result.invalid_reason, changed
    broke = pay(chain, requirements(chain, amount=10**15), payer=5)  # more than it has
    assert not sdk.verify(broke, requirements(chain, amount=10**15)).is_valid


def test_forged_expired_and_malformed_payments(chain: Devnet, facilitator_url: str) -> None:
    import httpx

    sdk = HTTPFacilitatorClientSync({"url": facilitator_url})
    req = requirements(chain)
    good = pay(chain, req)
    auth = dict(good.payload["authorization"])

    def with_auth(**changes: Any) -> Any:
        payload = {**good.payload, "authorization": {**auth, **changes}}
        return good.model_copy(update={"payload": payload})

    now = int(time.time())
    forged_sig = pay(chain, req, payer=4).payload["signature"]
    cases = {
        "expired": with_auth(validBefore=str(now - 10)),
        "not yet valid": with_auth(validAfter=str(now + 3600)),
        "another payer claimed": with_auth(**{"from": chain.accounts[3][0]}),
        "other key's signature": good.model_copy(
            update={"payload": {**good.payload, "signature": forged_sig}}),
    }  # fmt: skip
    for name, payload in cases.items():
        result = sdk.verify(payload, req)
        assert not result.is_valid and result.invalid_reason, name
        settled = sdk.settle(payload, req)
        assert not settled.success, name
    with httpx.Client(base_url=facilitator_url) as http:
        empty = b'{"x402Version": 2, "paymentPayload": {}, "paymentRequirements": {}}'
        for body in (b"{not json", b"[]", b'{"x402Version": 1}', empty):
            for path, flag in (("/verify", "isValid"), ("/settle", "success")):
                r = http.post(path, content=body, headers={"Content-Type": "application/json"})
                assert r.status_code == 200 and r.json()[flag] is False, (path, body)
                assert r.json().get("invalidReason") or r.json().get("errorReason")
    # nothing moved, and the genuine payment still settles once
    before = balance(chain, 2)
    assert sdk.settle(good, req).success
    assert balance(chain, 2) == before + 10_000


def test_gas_limit_is_bounded_and_checked(chain: Devnet) -> None:
    for bad in (0, 20_999, 1_000_001, "150000"):
        try:
            build(chain.rpc_url, chain.accounts[0][1], [NETWORK], gas_limit=bad)  # type: ignore[arg-type]
        except ValueError as exc:
            assert "gas_limit" in str(exc)
        else:
            raise AssertionError(f"gas_limit={bad!r} was accepted")


def test_a_settlement_out_of_gas_fails_and_frees_the_nonce(chain: Devnet) -> None:
    """A limit below what the transfer needs: the transaction reverts, funds stay put."""
    fac = build(chain.rpc_url, chain.accounts[0][1], [NETWORK], gas_limit=30_000)
    req = requirements(chain, amount=1_000)
    payload = pay(chain, req)
    assert fac.verify(payload, req).is_valid
    before = balance(chain, 1), balance(chain, 2)
    result = fac.settle(payload, req)
    assert not result.success and result.error_reason == "transaction_failed"
    mined = chain.web3().eth.get_transaction_receipt(result.transaction)
    assert mined["status"] == 0 and mined["gasUsed"] <= 30_000
    assert (balance(chain, 1), balance(chain, 2)) == before
