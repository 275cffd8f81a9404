"""``drip facilitator``: ``GET /supported``, ``POST /verify``, ``POST /settle`` in the x402 v2
shapes, on the official SDK's EVM ``exact`` facilitator with a web3 signer.

Always HTTP 200 with ``isValid`` / ``success`` and a reason, as facilitators answer. On
top of the SDK's checks (signature, amount, recipient, asset, network, validity window,
balance, nonce unused on-chain) Drip keeps its own record of every settlement: a
``(payer, nonce, network, asset)`` is reserved before the transaction is sent, so the same
authorization sent twice, even concurrently or to two facilitator processes on one
database, is settled once; verify refuses a nonce already settled here. The key is read as
the SDK reads the authorization (:func:`read_authorization`), so no other spelling of one
authorization is a new payment.

(No ``from __future__ import annotations``: FastAPI reads these signatures.)
"""

import json
import logging
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from web3 import Web3
from web3.middleware import ExtraDataToPOAMiddleware
from x402 import x402FacilitatorSync
from x402.mechanisms.evm import normalize_address
from x402.mechanisms.evm.exact import register_exact_evm_facilitator
from x402.mechanisms.evm.exact.eip3009_utils import parse_eip3009_authorization
from x402.mechanisms.evm.signers import FacilitatorWeb3Signer
from x402.mechanisms.evm.types import ExactEIP3009Payload, ExactPermit2Payload, is_permit2_payload
from x402.schemas import PaymentPayload, PaymentRequirements, SettleResponse

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
#: one authorization is (payer, nonce) of one token on one chain: the same nonce on another
#: network or asset is another payment (a v1 key blocked it everywhere)
_V2 = """
CREATE TABLE x402_settlements_v2 (
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
    PRIMARY KEY (payer, nonce, network, asset)
);
INSERT INTO x402_settlements_v2 SELECT payer, nonce, network, lower(asset), pay_to, amount,
    status, tx_hash, reason, created_us FROM x402_settlements;
DROP TABLE x402_settlements;
ALTER TABLE x402_settlements_v2 RENAME TO x402_settlements
"""
SETTLEMENT_MIGRATIONS = (Migration(1, _V1, _V1), Migration(2, _V2, _V2))
BODY_BYTES_MAX = 64 * 1024
#: gas bound of one settlement: an EIP-3009 transfer uses ~66k (a fresh payee ~83k);
#: headroom for smart-wallet signatures, far below the SDK's 500k default
GAS_LIMIT = 150_000
CONFIRMATION_TIMEOUT_S = 20.0
#: a settlement's key: (payer, nonce, network, asset)
_Key = tuple[str, str, str, str]


class _Sends:
    """Whether the settlement in this context tried to send a transaction."""

    attempted = False


#: set around each /settle: an error before any send is a refusal (nothing can land),
#: after one the outcome is unknown (a send that raised may still have been broadcast)
_SENDS: ContextVar[_Sends | None] = ContextVar("drip_x402_sends", default=None)


def _sending() -> None:
    sends = _SENDS.get()
    if sends is not None:
        sends.attempted = True


class DripFacilitatorSigner(FacilitatorWeb3Signer):
    """The SDK's web3 signer, reading through ``CoalescingHTTPProvider``: concurrent
    verifications share JSON-RPC round trips and the chain id is asked once. It notes
    every transaction it is asked to send, so the facilitator knows whether a settlement
    that failed may still move money."""

    def __init__(self, private_key: str, rpc_url: str, *, gas_limit: int = GAS_LIMIT,
                 confirmation_timeout_s: float = CONFIRMATION_TIMEOUT_S) -> None:  # fmt: skip
        super().__init__(private_key, rpc_url, confirmation_timeout_seconds=confirmation_timeout_s,
                         gas_limit=gas_limit)  # fmt: skip
        self.provider = CoalescingHTTPProvider(rpc_url)
        w3 = Web3(self.provider)
        w3.middleware_onion.inject(ExtraDataToPOAMiddleware, layer=0)
        self._w3 = w3  # the SDK signer keeps its client here (x402 2.25+)

    def write_contract(self, *args: Any, **kwargs: Any) -> str:
        _sending()  # before: a send that raises may have reached the node
        return str(super().write_contract(*args, **kwargs))

    def send_transaction(self, to: str, data: bytes) -> str:
        _sending()
        return str(super().send_transaction(to, data))


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


@dataclass(frozen=True, slots=True)
class Authorization:
    """An exact EVM payment's authorization, read as the SDK reads it, in one spelling:
    ``payer`` a lower-case 0x address, ``nonce`` 0x + 32 bytes of lower-case hex (EIP-3009)
    or a decimal integer (Permit2); ``valid_before`` in unix seconds (Permit2's deadline)."""

    payer: str
    nonce: str
    valid_before: int

    @property
    def key(self) -> tuple[str, str]:
        return self.payer, self.nonce


def read_authorization(payload: PaymentPayload) -> Authorization:
    """The payload's authorization, parsed by the SDK's own readers; ValueError when they
    cannot read it. The SDK takes '0xAB..', 'ab..' and 'ab cd ..' as one nonce: keyed as
    written, each would be a new payment (served, and sent on-chain, once per spelling)."""
    try:
        if is_permit2_payload(payload.payload):
            permit = ExactPermit2Payload.from_dict(payload.payload).permit2_authorization
            nonce = int(permit.nonce)  # a uint256, read with int() as the SDK reads it
            if not 0 <= nonce < 2**256:
                raise ValueError("permit2 nonce out of range")
            return Authorization(_address(permit.from_address), str(nonce), int(permit.deadline))
        eip3009 = ExactEIP3009Payload.from_dict(payload.payload).authorization
        auth = parse_eip3009_authorization(eip3009)  # refuses a nonce that is not 32 bytes
        return Authorization(_address(auth.from_address), "0x" + auth.nonce.hex(),
                             auth.valid_before)  # fmt: skip
    except (AttributeError, TypeError, ValueError) as exc:  # fields of the wrong type too
        raise ValueError(f"unreadable authorization: {exc}") from None


def _address(value: str) -> str:
    return str(normalize_address(value)).lower()


def _may_have_moved(response: SettleResponse, sends: _Sends) -> bool:
    """A failed settlement's money may still move: a transaction was sent (a receipt that
    timed out says settlement_pending, with its hash), or a send was attempted."""
    return bool(response.transaction) or sends.attempted


def create_app(facilitator: x402FacilitatorSync, store: Store) -> FastAPI:
    """The facilitator's HTTP app. Whether a failed settlement sent a transaction is known
    from ``DripFacilitatorSigner`` (as :func:`build` makes); with another signer, only
    from the transaction the SDK reports."""
    store.migrate("x402_settlements", SETTLEMENT_MIGRATIONS)
    app = FastAPI(title="Drip x402 facilitator", version="0.1.0")

    async def parse(request: Request) -> tuple[PaymentPayload, PaymentRequirements, _Key] | str:
        """The body, and its settlement key; a reason when either cannot be read (before
        anything is stored: junk never reserves a nonce)."""
        body = await request.body()
        if len(body) > BODY_BYTES_MAX:
            return "invalid_payload: body too large"
        try:
            data = json.loads(body)
            if not isinstance(data, dict) or data.get("x402Version") != 2:
                return "invalid_x402_version"
            payload = PaymentPayload.model_validate(data.get("paymentPayload"))
            requirements = PaymentRequirements.model_validate(data.get("paymentRequirements"))
            payer, nonce = read_authorization(payload).key
            key = (payer, nonce, str(requirements.network), _address(requirements.asset))
            return payload, requirements, key
        except (ValueError, ValidationError) as exc:
            return f"invalid_payload: {str(exc).splitlines()[0][:160]}"

    where = "WHERE payer = ? AND nonce = ? AND network = ? AND asset = ?"

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
        payload, requirements, key = parsed
        if store.query(f"SELECT status FROM x402_settlements {where}", key):
            return {"isValid": False, "invalidReason": "nonce_already_used", "payer": key[0]}
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
        payload, requirements, key = parsed
        network = str(requirements.network)
        if not store.execute(
            "INSERT INTO x402_settlements (payer, nonce, network, asset, pay_to, amount, status,"
            " created_us) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?) ON CONFLICT DO NOTHING",
            (*key, requirements.pay_to, requirements.amount, wall_clock_us()),
        ):  # fmt: skip
            return {"success": False, "errorReason": "nonce_already_used",
                    "payer": key[0], "transaction": "", "network": network}  # fmt: skip
        sends = _Sends()

        def watched() -> SettleResponse:
            token = _SENDS.set(sends)
            try:
                return facilitator.settle(payload, requirements)
            finally:
                _SENDS.reset(token)

        try:
            response = await run_in_threadpool(watched)
        except Exception as exc:  # noqa: BLE001 - a facilitator answers 200 with a reason
            log.warning("settle failed: %s", type(exc).__name__)
            if not sends.attempted:  # nothing was sent: a refusal, the nonce is free again
                store.execute(f"DELETE FROM x402_settlements {where}", key)
                return {"success": False, "errorReason": f"settle_refused: {type(exc).__name__}",
                        "transaction": "", "network": network}  # fmt: skip
            # a transaction may be in flight: retrying the authorization is unsafe
            store.execute(f"UPDATE x402_settlements SET status = 'unknown', reason = ? {where}",
                          (type(exc).__name__, *key))  # fmt: skip
            return {"success": False, "errorReason": f"settle_error: {type(exc).__name__}",
                    "transaction": "", "network": network}  # fmt: skip
        if response.success:
            store.execute(f"UPDATE x402_settlements SET status = 'settled', tx_hash = ? {where}",
                          (response.transaction, *key))  # fmt: skip
        elif _may_have_moved(response, sends):
            # e.g. settlement_pending: the receipt wait timed out, the transfer may land
            store.execute(
                f"UPDATE x402_settlements SET status = 'unknown', tx_hash = ?, reason = ? {where}",
                (response.transaction or None, response.error_reason, *key),
            )
            if not response.transaction:  # the SDK lost a send that raised: say it is unknown
                response = response.model_copy(update={"error_reason": "settle_error: "
                                                       f"{response.error_reason}"})  # fmt: skip
        else:  # refused before any transaction: the nonce may be used again
            store.execute(f"DELETE FROM x402_settlements {where} AND status = 'pending'", key)
        result: dict[str, Any] = response.model_dump(by_alias=True, exclude_none=True)
        return result

    return app
