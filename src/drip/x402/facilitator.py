"""``drip facilitator``: ``GET /supported``, ``POST /verify``, ``POST /settle`` in the x402 v2
shapes, on the official SDK's EVM ``exact`` facilitator with a web3 signer.

Always HTTP 200 with ``isValid`` / ``success`` and a reason, as facilitators answer. On
top of the SDK's checks (signature, amount, recipient, asset, network, validity window,
balance, nonce unused on-chain) Drip keeps its own record of every settlement: a
``(payer, nonce, network, asset)`` is reserved before the transaction is sent, so the same
authorization sent twice, even concurrently or to two facilitator processes on one
database, is settled once; verify refuses a nonce already settled here. The key is read as
the SDK reads the authorization (:func:`read_authorization`), so no other spelling of one
authorization is a new payment; a settle of a key already known is answered from its row
(the SDK's ``settle_with_pending_retry`` resends a pending settlement once), never sent
again. Only the configured networks (spelled exactly), assets (default: each network's
USDC) and, when listed, ``payTo`` addresses are settled: anything else is refused before
a row is written or a transaction sent.

(No ``from __future__ import annotations``: FastAPI reads these signatures.)
"""

import json
import logging
import re
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from web3 import Web3
from web3.exceptions import TransactionNotFound
from web3.middleware import ExtraDataToPOAMiddleware
from web3.types import RPCEndpoint, RPCResponse
from x402 import x402FacilitatorSync
from x402.mechanisms.evm import (
    ERR_SETTLEMENT_PENDING,
    ERR_TRANSACTION_FAILED,
    TX_STATUS_SUCCESS,
    TransactionReceipt,
    normalize_address,
)
from x402.mechanisms.evm.constants import ERR_TRANSFER_EVENT_MISMATCH
from x402.mechanisms.evm.exact import register_exact_evm_facilitator
from x402.mechanisms.evm.exact.eip3009_utils import (
    parse_eip3009_authorization,
    verify_eip3009_transfer_event,
)
from x402.mechanisms.evm.signers import FacilitatorWeb3Signer
from x402.mechanisms.evm.types import ExactEIP3009Payload, ExactPermit2Payload, is_permit2_payload
from x402.schemas import PaymentPayload, PaymentRequirements, SettleResponse

from drip.chain.networks import NETWORKS
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
#: a network as the facilitator is configured with it (the SDK reads ``eip155:031337``,
#: ``eip155:+31337`` and ``eip155:31_337`` as chain 31337: only this spelling is served)
_NETWORK = re.compile(r"eip155:[1-9][0-9]{0,19}")
#: a repeated settlement of a key already settled: at most one caller hears success
ERR_NONCE_ALREADY_USED = "nonce_already_used"
#: a settlement whose authorization was settled, or is being settled, for other
#: requirements (another payTo or amount): this payment received nothing
ERR_NONCE_USED_ELSEWHERE = "nonce_used_for_other_requirements"


class _Watch:
    """What happened on the chain during one verify or settle: whether a transaction was
    to be sent (and by which signer), and the type of a JSON-RPC transport error if one
    was raised."""

    attempted = False
    sender: "DripFacilitatorSigner | None" = None
    transport_error: str | None = None


#: set around each /verify and /settle: an error before any send is a refusal (nothing can
#: land), after one the outcome is unknown (a send that raised may still have been
#: broadcast); a verify that failed while the RPC did is an outage, not a bad payment
_WATCH: ContextVar[_Watch | None] = ContextVar("drip_x402_watch", default=None)


def _sending(signer: "DripFacilitatorSigner") -> None:
    watch = _WATCH.get()
    if watch is not None:
        watch.attempted = True
        watch.sender = signer


class _WatchedProvider(CoalescingHTTPProvider):
    """Notes every JSON-RPC call that fails in transport (connection refused, timeout, HTTP
    error): the SDK turns such a failure into a verdict on the payment (``invalid
    signature``), which the facilitator then reports as the outage it was."""

    def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        try:
            return super().make_request(method, params)
        except Exception as exc:
            watch = _WATCH.get()
            if watch is not None and watch.transport_error is None:
                watch.transport_error = type(exc).__name__
            raise


class DripFacilitatorSigner(FacilitatorWeb3Signer):
    """The SDK's web3 signer, reading through ``CoalescingHTTPProvider``: concurrent
    verifications share JSON-RPC round trips and the chain id is asked once. It notes
    every transaction it is asked to send, so the facilitator knows whether a settlement
    that failed may still move money, and every read that failed in transport."""

    def __init__(self, private_key: str, rpc_url: str, *, gas_limit: int = GAS_LIMIT,
                 confirmation_timeout_s: float = CONFIRMATION_TIMEOUT_S) -> None:  # fmt: skip
        super().__init__(private_key, rpc_url, confirmation_timeout_seconds=confirmation_timeout_s,
                         gas_limit=gas_limit)  # fmt: skip
        self.provider = _WatchedProvider(rpc_url)
        w3 = Web3(self.provider)
        w3.middleware_onion.inject(ExtraDataToPOAMiddleware, layer=0)
        self._w3 = w3  # the SDK signer keeps its client here (x402 2.25+)

    def write_contract(self, *args: Any, **kwargs: Any) -> str:
        _sending(self)  # before: a send that raises may have reached the node
        return str(super().write_contract(*args, **kwargs))

    def send_transaction(self, to: str, data: bytes) -> str:
        _sending(self)
        return str(super().send_transaction(to, data))

    def receipt(self, tx_hash: str) -> TransactionReceipt | None:
        """The transaction's receipt if it is mined, None if not (yet); no waiting."""
        try:
            found = self._w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
        except TransactionNotFound:
            return None
        return TransactionReceipt(
            status=TX_STATUS_SUCCESS if found["status"] == 1 else 0,
            block_number=found["blockNumber"], tx_hash=tx_hash,
            logs=list(found.get("logs") or []),
        )  # fmt: skip


class DripFacilitator(x402FacilitatorSync):
    """The SDK's facilitator, with the signer it settles with (whose receipts answer a
    repeated settlement) and the networks it was configured for."""

    def __init__(self, signer: DripFacilitatorSigner, networks: list[str]) -> None:
        super().__init__()
        self.signer = signer
        self.networks = list(networks)


def build(
    rpc_url: str,
    private_key: str,
    networks: list[str],
    *,
    gas_limit: int = GAS_LIMIT,
    confirmation_timeout_s: float = CONFIRMATION_TIMEOUT_S,
) -> DripFacilitator:
    """The SDK's facilitator with the EVM exact scheme on ``networks`` (``eip155:<chain
    id>``), signing with ``private_key``; every settlement transaction carries
    ``gas_limit``, and a receipt not seen within ``confirmation_timeout_s`` is
    ``settlement_pending``."""
    if not isinstance(gas_limit, int) or not 21_000 <= gas_limit <= 1_000_000:
        raise ValueError("gas_limit must be an int between 21,000 and 1,000,000")
    for network in networks:
        if not isinstance(network, str) or not _NETWORK.fullmatch(network):
            raise ValueError(f"network {network!r} must be eip155:<chain id>, e.g. eip155:8453")
    signer = DripFacilitatorSigner(private_key, rpc_url, gas_limit=gas_limit,
                                   confirmation_timeout_s=confirmation_timeout_s)  # fmt: skip
    facilitator = DripFacilitator(signer, networks)
    register_exact_evm_facilitator(facilitator, signer, networks)
    return facilitator


@dataclass(frozen=True, slots=True)
class Authorization:
    """An exact EVM payment's authorization, read as the SDK reads it, in one spelling:
    ``payer`` a lower-case 0x address, ``nonce`` 0x + 32 bytes of lower-case hex (EIP-3009)
    or a decimal integer (Permit2); ``valid_before`` in unix seconds (Permit2's deadline).
    ``payer_as_written``: the ``from`` address as the payload spells it (the SDK's answers
    name the payer so)."""

    payer: str
    nonce: str
    valid_before: int
    payer_as_written: str = ""

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
            return Authorization(_address(permit.from_address), str(nonce), int(permit.deadline),
                                 str(permit.from_address))  # fmt: skip
        eip3009 = ExactEIP3009Payload.from_dict(payload.payload).authorization
        auth = parse_eip3009_authorization(eip3009)  # refuses a nonce that is not 32 bytes
        return Authorization(_address(auth.from_address), "0x" + auth.nonce.hex(),
                             auth.valid_before, str(eip3009.from_address))  # fmt: skip
    # OverflowError: a JSON number such as 1e999 is a float infinity, which int() refuses
    except (AttributeError, TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"unreadable authorization: {exc}") from None


def _address(value: str) -> str:
    return str(normalize_address(value)).lower()


def _may_have_moved(response: SettleResponse, watch: _Watch) -> bool:
    """A failed settlement's money may still move: a transaction was sent (a receipt that
    timed out says settlement_pending, with its hash), or a send was attempted."""
    return bool(response.transaction) or watch.attempted


def _served_networks(facilitator: x402FacilitatorSync) -> frozenset[str]:
    """The v2 networks the facilitator was configured for, as configured."""
    if isinstance(facilitator, DripFacilitator):
        return frozenset(facilitator.networks)
    kinds = facilitator.get_supported().kinds
    return frozenset(str(k.network) for k in kinds if k.x402_version == 2)


def _allowed_assets(
    networks: frozenset[str], assets: Iterable[str] | None
) -> dict[str, frozenset[str]]:
    """Per network, the token contracts settled there: ``assets`` on every network, or
    each network's USDC (``drip.chain.networks``)."""
    if assets is not None:
        listed = frozenset(_address(a) for a in assets)
        if not listed:
            raise ValueError("assets: name at least one token contract")
        return {n: listed for n in networks}
    allowed = {}
    for n in networks:
        known = NETWORKS.get(n)
        if known is None or known.usdc is None:
            raise ValueError(f"no USDC is known for {n}: name the assets it settles")
        allowed[n] = frozenset({_address(known.usdc)})
    return allowed


def _outcome(receipt: TransactionReceipt, payload: PaymentPayload,
             requirements: PaymentRequirements) -> str | None:  # fmt: skip
    """None when a mined settlement transaction did what the authorization says (as the
    SDK judges its own receipts), else the failure reason."""
    if receipt.status != TX_STATUS_SUCCESS:
        return ERR_TRANSACTION_FAILED
    if is_permit2_payload(payload.payload):
        return None  # the SDK takes a successful Permit2 settlement's receipt as it is
    auth = parse_eip3009_authorization(ExactEIP3009Payload.from_dict(payload.payload).authorization)
    moved = verify_eip3009_transfer_event(
        receipt.logs, requirements.asset,
        from_address=auth.from_address, to=auth.to, value=auth.value,
    )  # fmt: skip
    return None if moved else ERR_TRANSFER_EVENT_MISMATCH


def create_app(
    facilitator: x402FacilitatorSync,
    store: Store,
    *,
    assets: Iterable[str] | None = None,
    pay_to: Iterable[str] | None = None,
    signer: DripFacilitatorSigner | None = None,
) -> FastAPI:
    """The facilitator's HTTP app. It settles on the networks the facilitator was
    configured for (spelled exactly so), in ``assets`` (default: each network's USDC) and,
    when ``pay_to`` lists addresses, to those only. Whether a failed settlement sent a
    transaction is known from ``DripFacilitatorSigner`` (as :func:`build` makes); with
    another signer, only from the transaction the SDK reports. A repeated settlement whose
    transaction's fate was unknown is judged from its receipt, read through ``signer``
    (default: the one :func:`build` settles with, else the ``DripFacilitatorSigner`` seen
    sending on that network)."""
    store.migrate("x402_settlements", SETTLEMENT_MIGRATIONS)
    served = _served_networks(facilitator)
    allowed_assets = _allowed_assets(served, assets)
    allowed_pay_to = None if pay_to is None else frozenset(_address(a) for a in pay_to)
    if signer is None and isinstance(facilitator, DripFacilitator):
        signer = facilitator.signer
    #: per network, the signer whose receipts answer a repeated settlement
    readers: dict[str, DripFacilitatorSigner] = dict.fromkeys(served, signer) if signer else {}
    app = FastAPI(title="Drip x402 facilitator", version="0.1.0")

    def refused(requirements: PaymentRequirements) -> str | None:
        """Why these requirements are not settled here, if they are not."""
        network = str(requirements.network)
        if network not in served:
            return f"unsupported_network: {network[:64]!r} is not served here"
        asset = _address(requirements.asset)
        if asset not in allowed_assets[network]:
            return f"unsupported_asset: {asset} is not settled on {network}"
        if allowed_pay_to is not None and _address(requirements.pay_to) not in allowed_pay_to:
            return f"unsupported_pay_to: {_address(requirements.pay_to)} is not settled to"
        return None

    async def parse(
        request: Request,
    ) -> tuple[PaymentPayload, PaymentRequirements, Authorization, _Key] | str:
        """The body, its authorization and its settlement key; a reason when any cannot be
        read or is not settled here (before anything is stored: junk never reserves a
        nonce, and nothing is sent for a network, token or recipient not configured)."""
        body = await request.body()
        if len(body) > BODY_BYTES_MAX:
            return "invalid_payload: body too large"
        try:
            data = json.loads(body)
            if not isinstance(data, dict) or data.get("x402Version") != 2:
                return "invalid_x402_version"
            payload = PaymentPayload.model_validate(data.get("paymentPayload"))
            requirements = PaymentRequirements.model_validate(data.get("paymentRequirements"))
            auth = read_authorization(payload)
            reason = refused(requirements)
            if reason is not None:
                return reason
            key = (auth.payer, auth.nonce, str(requirements.network), _address(requirements.asset))
            return payload, requirements, auth, key
        except RecursionError:  # nested past the parser's depth
            return "invalid_payload: nested too deep"
        except (ValueError, ValidationError, OverflowError) as exc:
            return f"invalid_payload: {str(exc).splitlines()[0][:160]}"

    where = "WHERE payer = ? AND nonce = ? AND network = ? AND asset = ?"

    def watched(call: Any, watch: _Watch, *args: Any) -> Any:
        token = _WATCH.set(watch)
        try:
            return call(*args)
        finally:
            _WATCH.reset(token)

    async def known(row: Any, payload: PaymentPayload, requirements: PaymentRequirements,
                    auth: Authorization, key: _Key) -> dict[str, Any]:  # fmt: skip
        """A settlement of a key already stored, answered from its row (never sent again).
        At most one caller hears success for one payment: a key settled already is
        ``nonce_already_used`` (two services sharing a payTo must not both serve and book
        one transfer; the authorization is public once its transaction is); one whose
        transaction's fate was unknown is judged from its receipt when it is mined, and
        the one caller that turns it settled hears success (the official SDK's pending
        retry); else it is still pending."""
        status, tx_hash, reason, pay_to, amount = row
        answer: dict[str, Any] = {"success": False, "transaction": tx_hash or "",
                                  "network": str(requirements.network),
                                  "payer": auth.payer_as_written or auth.payer}  # fmt: skip
        if _address(pay_to) != _address(requirements.pay_to) or amount != requirements.amount:
            # these requirements were never settled: that authorization paid for others
            return {**answer, "errorReason": ERR_NONCE_USED_ELSEWHERE, "transaction": ""}
        if status == "settled":
            return {**answer, "errorReason": ERR_NONCE_ALREADY_USED}
        if not tx_hash:  # in flight now, or a send whose fate nobody can read
            why = ERR_SETTLEMENT_PENDING if status == "pending" else f"settle_error: {reason}"
            return {**answer, "errorReason": why}
        reader = readers.get(str(requirements.network))
        try:
            receipt = await run_in_threadpool(reader.receipt, tx_hash) if reader else None
        except Exception as exc:  # noqa: BLE001 - the chain cannot say yet: still pending
            log.warning("receipt of %s unreadable: %s", tx_hash, type(exc).__name__)
            receipt = None
        if receipt is None:
            return {**answer, "errorReason": ERR_SETTLEMENT_PENDING}
        failure = _outcome(receipt, payload, requirements)
        if failure is None:
            won = store.execute(
                f"UPDATE x402_settlements SET status = 'settled', reason = NULL {where} "
                "AND status = 'unknown'", key,
            )  # fmt: skip
            if won != 1:  # another caller turned it settled first: theirs is the success
                return {**answer, "errorReason": ERR_NONCE_ALREADY_USED}
            return {**answer, "success": True}
        store.execute(f"UPDATE x402_settlements SET reason = ? {where}", (failure, *key))
        return {**answer, "errorReason": failure}

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
        payload, requirements, _, key = parsed
        if store.query(f"SELECT status FROM x402_settlements {where}", key):
            return {"isValid": False, "invalidReason": "nonce_already_used", "payer": key[0]}
        watch = _Watch()
        try:
            response = await run_in_threadpool(watched, facilitator.verify, watch, payload,
                                               requirements)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a facilitator answers 200 with a reason
            log.warning("verify failed: %s", type(exc).__name__)
            return {"isValid": False, "invalidReason": f"verify_error: {type(exc).__name__}"}
        result: dict[str, Any] = response.model_dump(by_alias=True, exclude_none=True)
        if not response.is_valid and watch.transport_error is not None:
            # the SDK reports an unreachable chain as a bad signature: it is an outage
            log.warning("verify failed on the RPC: %s", watch.transport_error)
            result["invalidReason"] = f"verify_error: {watch.transport_error}"
        return result

    @app.post("/settle")
    async def settle(request: Request) -> dict[str, Any]:
        parsed = await parse(request)
        if isinstance(parsed, str):
            return {"success": False, "errorReason": parsed, "transaction": "", "network": ""}
        payload, requirements, auth, key = parsed
        network = str(requirements.network)
        insert = ("INSERT INTO x402_settlements (payer, nonce, network, asset, pay_to, amount,"
                  " status, created_us) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)"
                  " ON CONFLICT DO NOTHING")  # fmt: skip
        # a refused settlement frees its row between our insert and our read: try again once
        for _ in range(2):
            if store.execute(insert, (*key, requirements.pay_to, requirements.amount,
                                      wall_clock_us())):  # fmt: skip
                break
            rows = store.query("SELECT status, tx_hash, reason, pay_to, amount FROM "
                               f"x402_settlements {where}", key)  # fmt: skip
            if rows:
                return await known(rows[0], payload, requirements, auth, key)
        else:
            return {"success": False, "errorReason": ERR_SETTLEMENT_PENDING, "transaction": "",
                    "network": network}  # fmt: skip
        watch = _Watch()
        try:
            response: SettleResponse = await run_in_threadpool(
                watched, facilitator.settle, watch, payload, requirements
            )
            if watch.sender is not None:
                readers.setdefault(network, watch.sender)
        except Exception as exc:  # noqa: BLE001 - a facilitator answers 200 with a reason
            log.warning("settle failed: %s", type(exc).__name__)
            if not watch.attempted:  # nothing was sent: a refusal, the nonce is free again
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
        elif _may_have_moved(response, watch):
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
