"""``X402Meter``: pure-ASGI x402 v2 for a provider's routes, paid per request in USDC.

- An unpaid request gets 402 with ``PAYMENT-REQUIRED`` (base64 JSON, v2, with
  ``extra.name``/``extra.version``) and the same JSON as its body.
- A ``PAYMENT-SIGNATURE`` is decoded with the SDK's codec and verified by the
  facilitator. Before the handler runs, its ``(payer, nonce)`` is reserved in the
  database: a replayed or concurrently duplicated payment is served at most once, even
  across server processes on one PostgreSQL.
- Default order: verify, serve, settle; the response start is held back until the first
  body chunk so ``PAYMENT-RESPONSE`` can ride on it. ``settle_first`` routes settle
  before the handler runs (for side effects that cannot be undone). A payment that
  expires within ``settle_margin_s`` is refused before the handler runs: it could not be
  settled after serving.
- A settlement that definitely failed (refused, nothing sent) answers 402 with the
  reason; one whose outcome is unknown (an exception, a timeout, a failure that names a
  transaction, ``settlement_pending``, ``nonce_already_used``: someone else settled the
  authorization) answers 502 ``settlement_pending`` with what is known, never a bare
  402, and its row stays ``unknown``. An error status from the handler is not settled,
  and its reservation is released (the authorization was never used on-chain). A verify
  the facilitator could not complete (``verify_error: ...``, e.g. its chain is down) is
  503, not a 402: the payment was not found wanting.
- A settle-first route whose handler raises after the payment settled answers 500 with
  ``PAYMENT-RESPONSE`` and ``X-Drip-Receipt`` (when it had sent nothing yet).
- Every settled payment is recorded in the ledger: ``x402:<network>`` -> the provider's
  revenue account, id ``x402:<payer>:<nonce>``, sent back as ``X-Drip-Receipt``. With a
  ``signer`` key, the 402 carries signed offers and ``PAYMENT-RESPONSE`` a signed receipt
  (the x402 ``offer-receipt`` extension, EIP-712) when the resource was delivered (not on
  a settle-first route's error answer); the receipt is kept with the payment.
- One flow for both kinds of callers: with ``sessions=`` (the ``DripMeter`` price table),
  a request carrying ``X-Drip-Session`` (or a payer the ``payer=`` resolver finds) is
  metered against its prepaid wallet, one carrying ``PAYMENT-SIGNATURE`` pays in x402,
  and one carrying neither gets a 402 offering both: ``accepts`` for x402 and
  ``extensions["drip-session"]`` for a session. A session refused for credit (402)
  also gets ``PAYMENT-REQUIRED``, so the caller can pay that call in x402 instead.

(The facilitator is anything with the SDK's async ``verify``/``settle``: usually
``HTTPFacilitatorClient`` pointed at ``drip facilitator``.)
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from starlette.requests import Request
from x402 import ERR_SETTLEMENT_PENDING
from x402.http.utils import (
    decode_payment_signature_header,
    encode_payment_required_header,
    encode_payment_response_header,
)
from x402.mechanisms.evm import ERR_NONCE_ALREADY_USED, ERR_VALID_BEFORE_EXPIRED
from x402.schemas import (
    PaymentPayload,
    PaymentRequired,
    PaymentRequirements,
    ResourceInfo,
    SettleResponse,
)

from drip import errors
from drip.asgi.middleware import (
    BODY_MESSAGES,
    ASGIApp,
    DripMeter,
    Message,
    Price,
    Receive,
    RouteTable,
    Scope,
    Send,
    header,
    refuse_websocket,
)
from drip.ledger import AccountKind
from drip.ledger.store import Migration, wall_clock_us
from drip.ledger.types import check_code
from drip.metering import DripClient
from drip.money import format_plain, parse_amount
from drip.x402 import receipts
from drip.x402.facilitator import read_authorization

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
_V2 = """
ALTER TABLE x402_payments ADD COLUMN transfer_id TEXT;
ALTER TABLE x402_payments ADD COLUMN receipt TEXT
"""
PAYMENT_MIGRATIONS = (Migration(1, _V1, _V1), Migration(2, _V2, _V2))
SESSION_EXTENSION = "drip-session"
STATE_KEY = "x402"
OFFER_CACHE_MAX = 1024
#: how long a payment must stay valid when it arrives: the handler's time plus settling
SETTLE_MARGIN_S = 30


@dataclass(frozen=True, slots=True)
class X402Price:
    """What a route costs in x402: ``amount`` atomic units of ``asset`` to ``pay_to``."""

    requirements: PaymentRequirements
    event: str
    description: str = ""
    settle_first: bool = False
    #: whether a 3xx answer is paid (by default a redirect delivers nothing: released)
    charge_redirects: bool = False


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
    charge_redirects: bool = False,
) -> X402Price:
    """A route's x402 price, e.g. ``x402_price("search", "0.01", pay_to=, asset=, network=)``."""
    check_code(event, "event")
    if not isinstance(network, str) or not re.fullmatch(r"[-a-z0-9]{3,8}:[-_a-zA-Z0-9]{1,32}",
                                                        network):  # fmt: skip
        raise errors.ConfigError(f"x402_price({event!r}): network must be CAIP-2, e.g. eip155:8453")
    atomic = parse_amount(amount, allow_zero=False)
    requirements = PaymentRequirements(
        scheme="exact", network=network, asset=asset, amount=str(atomic), pay_to=pay_to,
        max_timeout_seconds=max_timeout_s,
        extra={"name": asset_name, "version": asset_version},
    )  # fmt: skip
    return X402Price(requirements, event, description, settle_first, bool(charge_redirects))


@dataclass(frozen=True, slots=True)
class X402Payment:
    """The verified payment a request carries, as its handler sees it. ``transaction``
    is set when the route settles first (otherwise settlement follows the response)."""

    payer: str
    nonce: str
    amount: int
    asset: str
    network: str
    pay_to: str
    event: str
    transaction: str | None = None


def x402_payment(request: Request) -> X402Payment | None:
    """FastAPI dependency: ``payment: X402Payment | None = Depends(x402_payment)``; None
    when the request was not paid in x402 (a Drip session, or an unpriced route)."""
    found = request.scope.get("state", {}).get(STATE_KEY)
    return found if isinstance(found, X402Payment) else None


def add_x402(app: Any, **options: Any) -> None:
    """FastAPI/Starlette helper: ``add_x402(app, client=..., facilitator=..., routes=...)``
    is ``app.add_middleware(X402Meter, ...)`` (the same options as :class:`X402Meter`)."""
    app.add_middleware(X402Meter, **options)


class X402Meter:
    """Wrap an ASGI app: ``X402Meter(app, client=..., facilitator=..., routes={...})``;
    add ``sessions={...}`` (``drip.asgi.price``) to accept Drip sessions on the same routes
    and ``signer=`` (a key) for signed offers and receipts. ``settle_margin_s``: a payment
    whose authorization expires sooner than that is refused before the handler runs (set
    it above the routes' handling time plus a settlement's)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        client: DripClient,
        facilitator: Any,
        routes: Mapping[str, X402Price],
        sessions: Mapping[str, Price] | None = None,
        payer: Callable[[Scope], str | None] | None = None,
        signer: LocalAccount | str | None = None,
        public_url: str | None = None,
        settle_margin_s: int = SETTLE_MARGIN_S,
    ) -> None:
        self.app = app
        self.client = client
        self.facilitator = facilitator
        self.routes = dict(routes)
        #: priced as ``DripMeter`` prices: the most specific key wins, globs allowed
        self.table = RouteTable(self.routes, X402Price, "drip.x402.x402_price(...)", app=app)
        self.sessions = (
            DripMeter(app, client=client, routes=sessions, payer=payer, on_402=self._offer)
            if sessions
            else None
        )
        self.signer = Account.from_key(signer) if isinstance(signer, str) else signer
        self.public_url = public_url.rstrip("/") if public_url else None
        if self.signer is not None:
            if self.public_url is None:
                # signed offers and receipts name the resource: never let a request's
                # Host header choose what the provider's key signs
                raise errors.ConfigError("X402Meter(signer=...) needs public_url=")
            for key, route in self.routes.items():
                if not str(route.requirements.network).startswith("eip155:"):
                    raise errors.ConfigError(f"route {key!r}: signed receipts need eip155")
        if type(settle_margin_s) is not int or settle_margin_s < 0:
            raise errors.ConfigError("X402Meter(settle_margin_s=...) must be an int >= 0")
        for key, route in self.routes.items():
            if route.requirements.max_timeout_seconds <= settle_margin_s:
                # clients sign for maxTimeoutSeconds: every payment would be refused
                raise errors.ConfigError(
                    f"route {key!r}: max_timeout_s must exceed settle_margin_s ({settle_margin_s})"
                )
        self.settle_margin_s = settle_margin_s
        self._offers: dict[tuple[int, str], dict[str, Any]] = {}
        self._ready = False

    def _prepare(self) -> None:
        if not self._ready:
            self.client.ledger.store.migrate("x402_payments", PAYMENT_MIGRATIONS)
            self._ready = True

    def _route(self, scope: Scope) -> X402Price | None:
        """As ``DripMeter``'s: the served path, then the full one; HEAD runs GET's handler."""
        return self.table.for_scope(scope)

    def _names_payer(self, scope: Scope) -> bool:
        assert self.sessions is not None
        try:
            return self.sessions.has_payer(scope)
        except errors.DripError:
            return True  # the resolver refused: metering answers with its error

    def _session_price(self, scope: Scope) -> Price | None:
        if self.sessions is None:
            return None
        return self.sessions.routes.for_scope(scope)

    def url(self, scope: Scope) -> str:
        """The resource's URL (no query string: it may hold secrets)."""
        if self.public_url is not None:
            return self.public_url + str(scope["path"])
        host = header(scope, b"host") or "localhost"
        return f"{scope.get('scheme', 'http')}://{host}{scope['path']}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket" and (
                self._route(scope) is not None or self._session_price(scope) is not None
            ):
                await refuse_websocket(receive, send)
                return
            await self.app(scope, receive, send)
            return
        route = self._route(scope)
        session_price = self._session_price(scope)
        if route is None and session_price is None:
            await self.app(scope, receive, send)
            return
        self._prepare()
        signature = header(scope, b"payment-signature") if route is not None else None
        if signature is None or route is None:
            if (
                session_price is not None
                and self.sessions is not None
                and (route is None or self._names_payer(scope))
            ):
                await self.sessions.metered(scope, receive, send, session_price)
                return
            assert route is not None
            await self._payment_required(scope, send, route, "payment required")
            return
        try:
            payload = decode_payment_signature_header(signature)
            if not isinstance(payload, PaymentPayload):
                raise ValueError("x402 v2 payloads only")
            # (payer, nonce) as the SDK reads them: one key however the payer spells them
            authorization = read_authorization(payload)
        except Exception as exc:  # noqa: BLE001 - any undecodable header is the payer's error
            await self._payment_required(scope, send, route, f"invalid payment: {exc}"[:200])
            return
        if authorization.valid_before < time.time() + self.settle_margin_s:
            # the SDK accepts 6 s of validity: the handler would run for a payment that
            # expires before it can be settled
            reason = f"{ERR_VALID_BEFORE_EXPIRED}: valid for less than {self.settle_margin_s} s"
            await self._payment_required(scope, send, route, reason)
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
            if reason.startswith("verify_error"):
                # the facilitator could not judge the payment (its chain is unreachable):
                # an outage, not a reason to pay again
                error = {"type": "api_error", "code": "facilitator_unavailable",
                         "message": f"the payment could not be verified ({reason[:160]})",
                         "param": None}  # fmt: skip
                await _json(send, 503, {"error": error}, [(b"retry-after", b"5")])
                return
            await self._payment_required(scope, send, route, reason)
            return
        key = authorization.key
        store = self.client.ledger.store
        if not store.execute(
            "INSERT INTO x402_payments (payer, nonce, route, amount, status, created_us) "
            "VALUES (?, ?, ?, ?, 'reserved', ?) ON CONFLICT DO NOTHING",
            (*key, scope["path"], requirements.amount, wall_clock_us()),
        ):
            await self._payment_required(scope, send, route, "payment already used")
            return
        call = _PaidCall(self, route, payload, key, scope)
        if route.settle_first and not await call.settle(send):
            return
        await call.run(scope, receive, send)

    def required(self, scope: Scope, route: X402Price, reason: str) -> PaymentRequired:
        """The 402's offer: x402 ``accepts`` and, where they apply, a session and signed offers."""
        url = self.url(scope)
        extensions: dict[str, Any] = {}
        session_price = self._session_price(scope)
        if session_price is not None:
            extensions[SESSION_EXTENSION] = {"info": {
                "header": "X-Drip-Session", "event": session_price.event, "currency": "USDC",
                "perCall": format_plain(session_price.per_call),
                "perUnit": format_plain(session_price.per_unit),
                "maxUnits": session_price.max_units,
                "maxCharge": format_plain(session_price.hold),
            }}  # fmt: skip
        if self.signer is not None:
            extensions.update(receipts.extension(offers=[self._signed_offer(route, url)]))
        return PaymentRequired(
            error=reason, accepts=[route.requirements], extensions=extensions or None,
            resource=ResourceInfo(url=url, description=route.description or route.event,
                                  mime_type="application/json"),
        )  # fmt: skip

    def _signed_offer(self, route: X402Price, url: str) -> dict[str, Any]:
        assert self.signer is not None
        key = (id(route), url)
        offer = self._offers.get(key)
        if offer is None:
            req = route.requirements
            offer = receipts.sign_offer(
                self.signer, resource_url=url, scheme=req.scheme, network=str(req.network),
                asset=req.asset, pay_to=req.pay_to, amount=req.amount,
                max_timeout_s=req.max_timeout_seconds,
            )  # fmt: skip
            if len(self._offers) >= OFFER_CACHE_MAX:  # Host headers vary: stay bounded
                self._offers.clear()
            self._offers[key] = offer
        return offer

    def _offer(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        """``PAYMENT-REQUIRED`` for a session's 402, when the route also takes x402."""
        route = self._route(scope)
        if route is None:
            return []
        required = self.required(scope, route, "insufficient credits: pay this call in x402")
        return [(b"payment-required", encode_payment_required_header(required).encode())]

    async def _payment_required(self, scope: Scope, send: Send, route: X402Price,
                                reason: str) -> None:  # fmt: skip
        required = self.required(scope, route, reason)
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
                 key: tuple[str, str], scope: Scope) -> None:  # fmt: skip
        self.meter = meter
        self.scope = scope
        url = meter.url(scope)
        self.route = route
        self.payload = payload
        self.key = key
        self.url = url
        #: the facilitator's answer once the payment settled
        self.settled: SettleResponse | None = None
        self.transfer_id: str | None = None
        self.transaction: str | None = None
        self.done = False
        #: the client already got an answer from us (a failed settlement): drop the app's
        self.answered = False
        #: a response start went to the client (the app's, or ours)
        self.started = False

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
            await self._unknown(send, None, type(exc).__name__)
            return False
        if not result.success:
            if _ambiguous(result):
                await self._unknown(send, result.transaction or None, result.error_reason)
                return False
            self._release()
            await self.meter._payment_required(
                self.scope, send, self.route,
                f"settlement failed: {result.error_reason or 'unknown'}",
            )  # fmt: skip
            return False
        # the money moved: say so first, then book it (a booking failure is logged and
        # left for reconciliation from this row; the payer is still served)
        self.settled = result
        self.transaction = result.transaction
        store.execute("UPDATE x402_payments SET status = 'settled', tx_hash = ? WHERE payer = ? "
                      "AND nonce = ?", (result.transaction, *self.key))  # fmt: skip
        try:
            self.transfer_id = await self._record(result.transaction, str(result.network))
            store.execute("UPDATE x402_payments SET transfer_id = ? WHERE payer = ? AND nonce = ?",
                          (self.transfer_id, *self.key))  # fmt: skip
        except Exception:
            log.exception("x402 payment settled (tx %s) but not booked", result.transaction)
        return True

    async def _unknown(self, send: Send, transaction: str | None, reason: str | None) -> None:
        """The settlement may still move the money: keep the row (``unknown``, with the
        transaction when there is one) for reconciliation, and answer 502, never a bare
        402 (the client would pay again for what it may have paid)."""
        self.meter.client.ledger.store.execute(
            "UPDATE x402_payments SET status = 'unknown', tx_hash = ? WHERE payer = ? "
            "AND nonce = ?",
            (transaction, *self.key),
        )
        message = f"the payment's settlement outcome is unknown ({reason or 'unknown'})"
        if transaction:
            message += f"; transaction {transaction}"
        await _json(send, 502, {"error": {"type": "api_error", "code": "settlement_pending",
                                          "message": message, "param": None}})  # fmt: skip

    def _payment_response(self, delivered: bool) -> bytes:
        """``PAYMENT-RESPONSE`` of the settled payment. A signed receipt attests delivery
        (the offer-receipt extension returns one only on success): none when a settle-first
        route's handler answered an error."""
        assert self.settled is not None
        result = self.settled
        signer = self.meter.signer
        if delivered and signer is not None:
            try:
                receipt = receipts.sign_receipt(
                    signer, network=str(result.network), resource_url=self.url,
                    payer=result.payer or self.key[0], transaction=result.transaction,
                )  # fmt: skip
                extensions = {**(result.extensions or {}), **receipts.extension(receipt=receipt)}
                result = result.model_copy(update={"extensions": extensions})
                self.meter.client.ledger.store.execute(
                    "UPDATE x402_payments SET receipt = ? WHERE payer = ? AND nonce = ?",
                    (json.dumps(receipt), *self.key),
                )
            except Exception:
                log.exception("x402 payment settled (tx %s): no receipt", result.transaction)
        return encode_payment_response_header(result).encode()

    async def _failed_after_settling(self, send: Send) -> None:
        """The handler raised after the payment settled and before it answered: a 500 that
        still says what was paid (``PAYMENT-RESPONSE``, ``X-Drip-Receipt``), with no signed
        receipt (nothing was delivered)."""
        self.started = True
        headers = [(b"payment-response", self._payment_response(delivered=False))]
        if self.transfer_id is not None:
            headers.append((b"x-drip-receipt", self.transfer_id.encode()))
        message = "the handler failed after the payment settled"
        if self.transaction:
            message += f" (transaction {self.transaction})"
        error = {"type": "api_error", "code": "internal_error", "message": message, "param": None}
        try:
            await _json(send, 500, {"error": error}, headers)
        except Exception:  # the client may be gone: the handler's error is the one to raise
            log.exception("x402 payment settled (tx %s): no answer sent", self.transaction)

    async def _record(self, tx_hash: str, network: str) -> str:
        led = self.meter.client.ledger
        source = f"x402:{network}"
        await led.create_account(source, AccountKind.FUNDING)
        payer, nonce = self.key
        transfer = await led.transfer(
            f"x402:{payer}:{nonce}"[:160], source, self.meter.client.revenue_account,
            int(self.route.requirements.amount), code=self.route.event,
            metadata={"tx": tx_hash, "payer": payer, "network": network},
        )  # fmt: skip
        return transfer.id

    async def run(self, scope: Scope, receive: Receive, send: Send) -> None:
        start: Message | None = None
        payer, nonce = self.key
        req = self.route.requirements
        # what the handler may read: ``request.state.x402`` (or ``Depends(x402_payment)``)
        scope.setdefault("state", {})[STATE_KEY] = X402Payment(
            payer=payer, nonce=nonce, amount=int(req.amount), asset=req.asset,
            network=str(req.network), pay_to=req.pay_to, event=self.route.event,
            transaction=self.transaction,
        )  # fmt: skip

        async def send_start(held: Message) -> bool:
            """Settle (or release) on the app's status, then send its start; False when
            settling failed and the client got our answer instead."""
            status = int(held["status"])
            delivered = status < 300 or (status < 400 and self.route.charge_redirects)
            if not delivered:
                if not self.done:
                    self.done = True
                    self._release()
            elif not self.done and not await self.settle(send):
                self.answered = True  # settle answered the client itself
                return False
            headers = list(held.get("headers", []))
            if self.settled is not None:
                headers.append((b"payment-response", self._payment_response(delivered)))
            if self.transfer_id is not None:
                headers.append((b"x-drip-receipt", self.transfer_id.encode()))
            self.started = True
            await send({**held, "headers": headers})
            return True

        async def paid_send(message: Message) -> None:
            nonlocal start
            if self.answered:
                return
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] in BODY_MESSAGES and start is not None:  # pathsend too
                held, start = start, None
                if not await send_start(held):
                    return
            await send(message)

        try:
            await self.meter.app(scope, receive, paid_send)
        except BaseException as exc:
            if not self.done:
                self.done = True
                self._release()
            elif isinstance(exc, Exception) and self.settled is not None and not self.started:
                await self._failed_after_settling(send)
            raise
        if start is not None and not self.answered:  # a start and no body message at all
            held, start = start, None
            if await send_start(held):
                await send({"type": "http.response.body", "body": b""})
        if not self.done:  # the app answered nothing: nothing was delivered
            self.done = True
            self._release()


#: a settlement refused because the authorization was already used: by someone else's
#: settlement of this very payment (the payer's money moved, to this route's payTo)
_USED = frozenset({"nonce_already_used", ERR_NONCE_ALREADY_USED})


def _ambiguous(result: SettleResponse) -> bool:
    """A failed settlement whose money may still move, or has moved: it names a
    transaction (one was sent: whether it landed is for reconciliation to read from its
    receipt), says its outcome is unknown (the SDK's ``settlement_pending``, Drip's
    ``settle_error: ...``), or says the authorization was used already (its transfer was
    sent by another settlement: asking the payer again would charge it twice)."""
    reason = result.error_reason or ""
    return (bool(result.transaction) or reason == ERR_SETTLEMENT_PENDING
            or reason.startswith("settle_error") or reason in _USED)  # fmt: skip


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


__all__ = ["X402Meter", "X402Payment", "X402Price", "add_x402", "x402_payment", "x402_price"]
