"""Signed offers and receipts of the x402 ``offer-receipt`` extension (EIP-712 format).

- An **offer** commits the server to one ``accepts[]`` entry: it rides in the 402's
  ``extensions["offer-receipt"].info.offers``.
- A **receipt** says a payment was received and the resource served: it rides in the
  settlement response (``PAYMENT-RESPONSE``) at ``extensions["offer-receipt"].info.receipt``.

Both are EIP-712 signatures under the domain ``{name: "x402 offer" | "x402 receipt",
version: "1", chainId}`` with the spec's fixed types, so anyone can check them offline:
``recover_receipt(receipt)`` returns the signer's address, to be compared with the key
the provider publishes (by default its ``payTo`` address).
"""

from __future__ import annotations

import time
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount

from drip import errors

EXTENSION = "offer-receipt"
VERSION = 1
OFFER_TYPES = {
    "Offer": [
        {"name": "resourceUrl", "type": "string"},
        {"name": "scheme", "type": "string"},
        {"name": "network", "type": "string"},
        {"name": "asset", "type": "string"},
        {"name": "payTo", "type": "address"},
        {"name": "amount", "type": "string"},
        {"name": "maxTimeoutSeconds", "type": "uint256"},
        {"name": "issuedAt", "type": "uint256"},
    ]
}
RECEIPT_TYPES = {
    "Receipt": [
        {"name": "network", "type": "string"},
        {"name": "resourceUrl", "type": "string"},
        {"name": "payer", "type": "string"},
        {"name": "issuedAt", "type": "uint256"},
        {"name": "transaction", "type": "string"},
    ]
}


def chain_id(network: str) -> int:
    """The EIP-712 chain id of a CAIP-2 ``eip155:<id>`` network."""
    namespace, _, ref = network.partition(":")
    if namespace != "eip155" or not ref.isdigit():
        raise errors.InvalidRequest(f"not an eip155 network: {network!r}", param="network")
    return int(ref)


def _domain(name: str, network: str) -> dict[str, Any]:
    return {"name": name, "version": "1", "chainId": chain_id(network)}


def _sign(account: LocalAccount, name: str, types: dict[str, Any], payload: dict[str, Any]) -> str:
    signed = account.sign_typed_data(_domain(name, payload["network"]), types, payload)
    return "0x" + bytes(signed.signature).hex()


def _recover(artifact: Any, name: str, types: dict[str, Any]) -> str:
    if not isinstance(artifact, dict) or artifact.get("format") != "eip712":
        raise errors.InvalidRequest("not an eip712 offer-receipt artifact", param="format")
    payload, signature = artifact.get("payload"), artifact.get("signature")
    if not isinstance(payload, dict) or not isinstance(signature, str):
        raise errors.InvalidRequest("an artifact needs a payload and a signature")
    try:
        message = encode_typed_data(_domain(name, str(payload.get("network"))), types, payload)
        return str(Account.recover_message(message, signature=signature))
    except errors.DripError:
        raise
    except Exception as exc:
        raise errors.InvalidRequest(f"unreadable {name}: {type(exc).__name__}") from exc


def sign_offer(
    account: LocalAccount,
    *,
    resource_url: str,
    scheme: str,
    network: str,
    asset: str,
    pay_to: str,
    amount: str,
    max_timeout_s: int = 0,
    issued_at: int = 0,
) -> dict[str, Any]:
    """An EIP-712 signed offer for one ``accepts[]`` entry."""
    payload = {
        "resourceUrl": resource_url, "scheme": scheme, "network": network, "asset": asset,
        "payTo": pay_to, "amount": amount, "maxTimeoutSeconds": int(max_timeout_s),
        "issuedAt": int(issued_at),
    }  # fmt: skip
    return {"format": "eip712", "payload": payload,
            "signature": _sign(account, "x402 offer", OFFER_TYPES, payload)}  # fmt: skip


def sign_receipt(
    account: LocalAccount,
    *,
    network: str,
    resource_url: str,
    payer: str,
    transaction: str = "",
    issued_at: int | None = None,
) -> dict[str, Any]:
    """An EIP-712 signed receipt: ``payer`` paid on ``network`` for ``resource_url``."""
    payload = {
        "network": network, "resourceUrl": resource_url, "payer": payer,
        "issuedAt": int(time.time()) if issued_at is None else int(issued_at),
        "transaction": transaction,
    }  # fmt: skip
    return {"format": "eip712", "payload": payload,
            "signature": _sign(account, "x402 receipt", RECEIPT_TYPES, payload)}  # fmt: skip


def recover_offer(offer: Any) -> str:
    """The address that signed an EIP-712 offer (raises ``InvalidRequest`` if unreadable)."""
    return _recover(offer, "x402 offer", OFFER_TYPES)


def recover_receipt(receipt: Any) -> str:
    """The address that signed an EIP-712 receipt (raises ``InvalidRequest`` if unreadable)."""
    return _recover(receipt, "x402 receipt", RECEIPT_TYPES)


def extension(**info: Any) -> dict[str, Any]:
    """``{"offer-receipt": {"info": {"version": 1, **info}}}`` for an ``extensions`` field."""
    return {EXTENSION: {"info": {"version": VERSION, **info}}}


def receipt_of(settle_response: Any) -> dict[str, Any] | None:
    """The receipt inside a decoded ``PAYMENT-RESPONSE`` (SDK object or dict), if any."""
    extensions = getattr(settle_response, "extensions", None)
    if extensions is None and isinstance(settle_response, dict):
        extensions = settle_response.get("extensions")
    info = ((extensions or {}).get(EXTENSION) or {}).get("info") or {}
    receipt = info.get("receipt")
    return receipt if isinstance(receipt, dict) else None


__all__ = [
    "EXTENSION",
    "extension",
    "receipt_of",
    "recover_offer",
    "recover_receipt",
    "sign_offer",
    "sign_receipt",
]
