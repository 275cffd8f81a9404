"""``X402Meter``: pure-ASGI x402 v2 for a provider's routes, paid per request in USDC.

- An unpaid request gets 402 with ``PAYMENT-REQUIRED`` (base64 JSON, v2, with
  ``extra.name``/``extra.version``) and the same JSON as its body.
- A ``PAYMENT-SIGNATURE`` is decoded with the SDK's codec and verified by the
  facilitator. Before the handler runs, its ``(payer, nonce)`` is reserved in the
  database: a replayed or concurrently duplicated payment is served at most once, even
  across server processes on one PostgreSQL.
- Default order: verify, serve, settle; the response start is held back until the first
  body chunk so ``PAYMENT-RESPONSE`` can ride on it. ``settle_first`` routes settle
  before the handler runs (for side effects that cannot be undone).
- A settlement that definitely failed answers 402 with the reason; one whose outcome is
  unknown (an exception, a timeout) answers 502 ``settlement_pending`` with what is
  known, never a bare 402. An error status from the handler is not settled, and its
  reservation is released (the authorization was never used on-chain).
- Every settled payment is recorded in the ledger: ``x402:<network>`` -> the provider's
  revenue account, id ``x402:<payer>:<nonce>``.

(The facilitator is anything with the SDK's async ``verify``/``settle``: usually
``HTTPFacilitatorClient`` pointed at ``drip facilitator``.)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from x402.http.utils import (
    decode_payment_signature_header,
    encode_payment_required_header,
    encode_payment_response_header,
)
from x402.schemas import PaymentPayload, PaymentRequired, PaymentRequirements, ResourceInfo

from drip.asgi.middleware import ASGIApp, Message, Receive, Scope, Send, header
from drip.ledger import AccountKind
from drip.ledger.store import Migration, wall_clock_us
from drip.metering import DripClient
from drip.money import parse_amount
from drip.x402.facilitator import authorization_key

log = logging.getLogger("drip.x402")

_V1 = """
CREATE TABLE x402_payments (
    payer TEXT NOT NULL,
    nonce TEXT NOT NULL,
    route TEXT NOT NULL,
    amount TEXT NOT NULL,
    status TEXT NOT NULL,
    tx_hash TEXT,
    created_us BIGINT NOT NULL,
    PRIMARY KEY (payer, nonce)
)
"""
PAYMENT_MIGRATIONS = (Migration(1, _V1, _V1),)


@dataclass(frozen=True, slots=True)
class X402Price:
    """What a route costs in x402: ``amount`` atomic units of ``asset`` to ``pay_to``."""

    requirements: PaymentRequirements
    event: str
    description: str = ""
    settle_first: bool = False


def x402_price(
    event: str,
    amount: object,
    *,
    pay_to: str,
    asset: str,
    network: str,
    asset_name: str = "USD Coin",
    asset_version: str = "2",
    max_timeout_s: int = 120,
    settle_first: bool = False,
    description: str = "",
) -> X402Price:
    """A route's x402 price, e.g. ``x402_price("search", "0.01", pay_to=, asset=, network=)``."""
    atomic = parse_amount(amount, allow_zero=False)
    requirements = PaymentRequirements(
        scheme="exact", network=network, asset=asset, amount=str(atomic), pay_to=pay_to,
        max_timeout_seconds=max_timeout_s,
        extra={"name": asset_name, "version": asset_version},
    )  # fmt: skip
    return X402Price(requirements, event, description, settle_first)


class X402Meter:
    """Wrap an ASGI app: ``X402Meter(app, client=..., facilitator=..., routes={...})``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        client: DripClient,
        facilitator: Any,
        routes: Mapping[str, X402Price],
    ) -> None:
        self.app = app
        self.client = client
        self.facilitator = facilitator
        self.routes = dict(routes)
        self._ready = False

    def _prepare(self) -> None:
        if not self._ready:
            self.client.ledger.store.migrate("x402_payments", PAYMENT_MIGRATIONS)
            self._ready = True

    def _route(self, scope: Scope) -> X402Price | None:
        return self.routes.get(f"{scope['method']} {scope['path']}") or self.routes.get(
            scope["path"]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self._route(scope) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        self._prepare()
        signature = header(scope, b"payment-signature")
        if signature is None:
            await self._payment_required(scope, send, route, "payment required")
            return
        try:
            payload = decode_payment_signature_header(signature)
            if not isinstance(payload, PaymentPayload):
                raise ValueError("x402 v2 payloads only")
        except Exception as exc:  # noqa: BLE001 - any undecodable header is the payer's error
            await self._payment_required(scope, send, route, f"invalid payment: {exc}"[:200])
            return
        requirements = route.requirements
        try:
            verified = await self.facilitator.verify(payload, requirements)
        except Exception as exc:  # noqa: BLE001 - the facilitator is unreachable: not 402
            error = {"type": "api_error", "code": "facilitator_error",
                     "message": type(exc).__name__, "param": None}  # fmt: skip
            await _json(send, 502, {"error": error})
            return
        if not verified.is_valid:
            reason = verified.invalid_reason or "invalid payment"
            await self._payment_required(scope, send, route, reason)
            return
        key = authorization_key(payload) or ((verified.payer or "").lower(), signature[-64:])
        store = self.client.ledger.store
        if not store.execute(
            "INSERT INTO x402_payments (payer, nonce, route, amount, status, created_us) "
            "VALUES (?, ?, ?, ?, 'reserved', ?) ON CONFLICT DO NOTHING",
            (*key, scope["path"], requirements.amount, wall_clock_us()),
        ):
            await self._payment_required(scope, send, route, "payment already used")
            return
        call = _PaidCall(self, route, payload, key)
        if route.settle_first and not await call.settle(send):
            return
        await call.run(scope, receive, send)

    async def _payment_required(self, scope: Scope, send: Send, route: X402Price,
                                reason: str) -> None:  # fmt: skip
        required = PaymentRequired(
            error=reason, accepts=[route.requirements],
            resource=ResourceInfo(url=scope["path"], description=route.description or route.event,
                                  mime_type="application/json"),
        )  # fmt: skip
        body = json.loads(required.model_dump_json(by_alias=True, exclude_none=True))
        await _json(
            send,
            402,
            body,
            [(b"payment-required", encode_payment_required_header(required).encode())],
        )


class _PaidCall:
    """One verified, reserved payment: settle exactly once, or release the reservation."""

    def __init__(self, meter: X402Meter, route: X402Price, payload: PaymentPayload,
                 key: tuple[str, str]) -> None:  # fmt: skip
        self.meter = meter
        self.route = route
        self.payload = payload
        self.key = key
        self.response_header: bytes | None = None
        self.done = False
        #: the client already got an answer from us (a failed settlement): drop the app's
        self.answered = False

    def _release(self) -> None:
        self.meter.client.ledger.store.execute(
            "DELETE FROM x402_payments WHERE payer = ? AND nonce = ? AND status = 'reserved'",
            self.key,
        )

    async def settle(self, send: Send) -> bool:
        """Settle; on failure answer the client (402 or 502) and return False."""
        self.done = True
        store = self.meter.client.ledger.store
        try:
            result = await self.meter.facilitator.settle(self.payload, self.route.requirements)
        except Exception as exc:  # noqa: BLE001 - outcome unknown: keep the reservation
            store.execute("UPDATE x402_payments SET status = 'unknown' WHERE payer = ? AND "
                          "nonce = ?", self.key)  # fmt: skip
            await _json(send, 502, {"error": {
                "type": "api_error", "code": "settlement_pending", "param": None,
                "message": f"the payment's settlement outcome is unknown ({type(exc).__name__})",
            }})  # fmt: skip
            return False
        if not result.success:
            self._release()
            await self.meter._payment_required(
                {"path": "", "method": ""},
                send,
                self.route,
                f"settlement failed: {result.error_reason or 'unknown'}",
            )
            return False
        store.execute("UPDATE x402_payments SET status = 'settled', tx_hash = ? WHERE payer = ? "
                      "AND nonce = ?", (result.transaction, *self.key))  # fmt: skip
        await self._record(result.transaction, str(result.network))
        self.response_header = encode_payment_response_header(result).encode()
        return True

    async def _record(self, tx_hash: str, network: str) -> None:
        led = self.meter.client.ledger
        source = f"x402:{network}"
        await led.create_account(source, AccountKind.FUNDING)
        payer, nonce = self.key
        await led.transfer(
            f"x402:{payer}:{nonce}"[:160], source, self.meter.client.revenue_account,
            int(self.route.requirements.amount), code=self.route.event,
            metadata={"tx": tx_hash, "payer": payer, "network": network},
        )  # fmt: skip

    async def run(self, scope: Scope, receive: Receive, send: Send) -> None:
        start: Message | None = None

        async def paid_send(message: Message) -> None:
            nonlocal start
            if self.answered:
                return
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] == "http.response.body" and start is not None:
                held, start = start, None
                if int(held["status"]) >= 400:
                    if not self.done:
                        self.done = True
                        self._release()
                elif not self.done and not await self.settle(send):
                    self.answered = True  # settle answered the client itself
                    return
                headers = list(held.get("headers", []))
                if self.response_header is not None:
                    headers.append((b"payment-response", self.response_header))
                await send({**held, "headers": headers})
            await send(message)

        try:
            await self.meter.app(scope, receive, paid_send)
        except BaseException:
            if not self.done:
                self.done = True
                self._release()
            raise


async def _json(send: Send, status: int, body: Any,
                headers: list[tuple[bytes, bytes]] | None = None) -> None:  # fmt: skip
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


__all__ = ["X402Meter", "X402Price", "x402_price"]
