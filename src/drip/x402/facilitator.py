"""``drip facilitator``: ``GET /supported``, ``POST /verify``, ``POST /settle`` in the x402 v2
shapes, on the official SDK's EVM ``exact`` facilitator with a web3 signer.

Always HTTP 200 with ``isValid`` / ``success`` and a reason, as facilitators answer. On
top of the SDK's checks (signature, amount, recipient, asset, network, validity window,
balance, nonce unused on-chain) Drip keeps its own record of every settlement: a
``(payer, nonce)`` is reserved before the transaction is sent, so the same authorization
sent twice, even concurrently or to two facilitator processes on one database, is
settled once; verify refuses a nonce already settled here.

(No ``from __future__ import annotations``: FastAPI reads these signatures.)
"""

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from web3 import Web3
from web3.middleware import ExtraDataToPOAMiddleware
from x402 import x402FacilitatorSync
from x402.mechanisms.evm.exact import register_exact_evm_facilitator
from x402.mechanisms.evm.signers import FacilitatorWeb3Signer
from x402.schemas import PaymentPayload, PaymentRequirements

from drip.chain.rpc import CoalescingHTTPProvider
from drip.ledger.store import Migration, Store, wall_clock_us

log = logging.getLogger("drip.x402.facilitator")

_V1 = """
CREATE TABLE x402_settlements (
    payer TEXT NOT NULL,
    nonce TEXT NOT NULL,
    network TEXT NOT NULL,
    asset TEXT NOT NULL,
    pay_to TEXT NOT NULL,
    amount TEXT NOT NULL,
    status TEXT NOT NULL,
    tx_hash TEXT,
    reason TEXT,
    created_us BIGINT NOT NULL,
    PRIMARY KEY (payer, nonce)
)
"""
SETTLEMENT_MIGRATIONS = (Migration(1, _V1, _V1),)
BODY_BYTES_MAX = 64 * 1024
#: gas bound of one settlement: an EIP-3009 transfer uses ~66k (a fresh payee ~83k);
#: headroom for smart-wallet signatures, far below the SDK's 500k default
GAS_LIMIT = 150_000
CONFIRMATION_TIMEOUT_S = 20.0


class DripFacilitatorSigner(FacilitatorWeb3Signer):
    """The SDK's web3 signer, reading through ``CoalescingHTTPProvider``: concurrent
    verifications share JSON-RPC round trips and the chain id is asked once."""

    def __init__(self, private_key: str, rpc_url: str, *, gas_limit: int = GAS_LIMIT,
                 confirmation_timeout_s: float = CONFIRMATION_TIMEOUT_S) -> None:  # fmt: skip
        super().__init__(private_key, rpc_url, confirmation_timeout_seconds=confirmation_timeout_s,
                         gas_limit=gas_limit)  # fmt: skip
        self.provider = CoalescingHTTPProvider(rpc_url)
        w3 = Web3(self.provider)
        w3.middleware_onion.inject(ExtraDataToPOAMiddleware, layer=0)
        self._w3 = w3  # the SDK signer keeps its client here (x402 2.25+)


def build(
    rpc_url: str, private_key: str, networks: list[str], *, gas_limit: int = GAS_LIMIT
) -> x402FacilitatorSync:
    """The SDK's facilitator with the EVM exact scheme, signing with ``private_key``;
    every settlement transaction carries ``gas_limit``."""
    if not isinstance(gas_limit, int) or not 21_000 <= gas_limit <= 1_000_000:
        raise ValueError("gas_limit must be an int between 21,000 and 1,000,000")
    signer = DripFacilitatorSigner(private_key, rpc_url, gas_limit=gas_limit)
    facilitator = x402FacilitatorSync()
    register_exact_evm_facilitator(facilitator, signer, networks)
    return facilitator


def authorization_key(payload: PaymentPayload) -> tuple[str, str] | None:
    """(payer, nonce) of an EIP-3009 exact payload, lower-cased; None for other shapes."""
    auth = payload.payload.get("authorization") if isinstance(payload.payload, dict) else None
    if not isinstance(auth, dict):
        return None
    payer, nonce = auth.get("from"), auth.get("nonce")
    if isinstance(payer, str) and isinstance(nonce, str):
        return payer.lower(), nonce.lower()
    return None


def create_app(facilitator: x402FacilitatorSync, store: Store) -> FastAPI:
    store.migrate("x402_settlements", SETTLEMENT_MIGRATIONS)
    app = FastAPI(title="Drip x402 facilitator", version="0.1.0")

    async def parse(request: Request) -> tuple[PaymentPayload, PaymentRequirements] | str:
        body = await request.body()
        if len(body) > BODY_BYTES_MAX:
            return "invalid_payload: body too large"
        try:
            data = json.loads(body)
            if not isinstance(data, dict) or data.get("x402Version") != 2:
                return "invalid_x402_version"
            payload = PaymentPayload.model_validate(data.get("paymentPayload"))
            return payload, PaymentRequirements.model_validate(data.get("paymentRequirements"))
        except (ValueError, ValidationError) as exc:
            return f"invalid_payload: {str(exc).splitlines()[0][:160]}"

    def settled_before(key: tuple[str, str] | None) -> bool:
        if key is None:
            return False
        rows = store.query("SELECT status FROM x402_settlements WHERE payer = ? AND nonce = ?", key)
        return bool(rows)

    @app.get("/supported")
    async def supported() -> dict[str, Any]:
        result: dict[str, Any] = facilitator.get_supported().model_dump(
            by_alias=True, exclude_none=True
        )
        return result

    @app.post("/verify")
    async def verify(request: Request) -> dict[str, Any]:
        parsed = await parse(request)
        if isinstance(parsed, str):
            return {"isValid": False, "invalidReason": parsed}
        payload, requirements = parsed
        key = authorization_key(payload)
        if settled_before(key):
            return {"isValid": False, "invalidReason": "nonce_already_used",
                    "payer": key[0] if key else None}  # fmt: skip
        try:
            response = await run_in_threadpool(facilitator.verify, payload, requirements)
        except Exception as exc:  # noqa: BLE001 - a facilitator answers 200 with a reason
            log.warning("verify failed: %s", type(exc).__name__)
            return {"isValid": False, "invalidReason": f"verify_error: {type(exc).__name__}"}
        result: dict[str, Any] = response.model_dump(by_alias=True, exclude_none=True)
        return result

    @app.post("/settle")
    async def settle(request: Request) -> dict[str, Any]:
        parsed = await parse(request)
        if isinstance(parsed, str):
            return {"success": False, "errorReason": parsed, "transaction": "", "network": ""}
        payload, requirements = parsed
        network = str(requirements.network)
        key = authorization_key(payload)
        if key is not None and not store.execute(
            "INSERT INTO x402_settlements (payer, nonce, network, asset, pay_to, amount, status,"
            " created_us) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?) ON CONFLICT DO NOTHING",
            (*key, network, requirements.asset, requirements.pay_to, requirements.amount,
             wall_clock_us()),
        ):  # fmt: skip
            return {"success": False, "errorReason": "nonce_already_used",
                    "payer": key[0], "transaction": "", "network": network}  # fmt: skip
        try:
            response = await run_in_threadpool(facilitator.settle, payload, requirements)
        except Exception as exc:  # noqa: BLE001 - the reservation stays: retrying is unsafe
            log.warning("settle failed: %s", type(exc).__name__)
            if key is not None:
                store.execute(
                    "UPDATE x402_settlements SET status = 'unknown', reason = ? "
                    "WHERE payer = ? AND nonce = ?",
                    (type(exc).__name__, *key),
                )
            return {"success": False, "errorReason": f"settle_error: {type(exc).__name__}",
                    "transaction": "", "network": network}  # fmt: skip
        if key is not None:
            if response.success:
                store.execute(
                    "UPDATE x402_settlements SET status = 'settled', tx_hash = ? "
                    "WHERE payer = ? AND nonce = ?",
                    (response.transaction, *key),
                )
            else:  # refused before any transaction: the nonce may be used again
                store.execute(
                    "DELETE FROM x402_settlements WHERE payer = ? AND nonce = ? "
                    "AND status = 'pending'",
                    key,
                )
        result: dict[str, Any] = response.model_dump(by_alias=True, exclude_none=True)
        return result

    return app
