"""Top-ups: a checkout names a wallet and an amount; a signed webhook pays it, once.

- ``POST /v1/checkout`` records a pending top-up (``co_...``) for a user and amount.
- A payment processor's webhook completes it: Stripe (``Stripe-Signature``, verified by
  the ``stripe`` library) or any sender of Standard Webhooks (``webhook-id``,
  ``webhook-timestamp``, ``webhook-signature``, verified by ``standardwebhooks``). Both
  compare in constant time and refuse stale timestamps.
- The credit's ledger id is ``checkout:<id>``: however many times, and however
  concurrently, events for one checkout arrive, the wallet is credited once. An amount
  or currency that differs from the checkout's is refused and nothing is credited.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from drip import errors
from drip.ledger.store import Migration, Store, wall_clock_us

_V1 = """
CREATE TABLE checkouts (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    amount BIGINT NOT NULL CHECK (amount > 0),
    status TEXT NOT NULL,
    created_us BIGINT NOT NULL,
    paid_event_id TEXT,
    paid_us BIGINT
)
"""
CHECKOUT_MIGRATIONS = (Migration(1, _V1, _V1),)
_CHECKOUT_RE = re.compile(r"co_[0-9a-f]{24}")
#: Stripe reports amounts in cents; USDC atomic units are millionths.
ATOMIC_PER_CENT = 10_000
#: Deepest nesting of a webhook body's objects and arrays (the body itself is level 1).
#: Stripe's events are a dozen levels deep at most; a signed body nested thousands deep
#: would exhaust the parser's recursion, or anything that walks it afterwards.
WEBHOOK_DEPTH_MAX = 64


class InvalidSignature(errors.DripError):
    """The webhook's signature is missing, malformed, wrong or too old."""

    code = "invalid_signature"
    type = "authentication_error"
    status = 400


class PaymentMismatch(errors.DripError):
    """The paid amount or currency differs from the checkout's; nothing was credited."""

    code = "payment_mismatch"
    type = "invalid_request_error"
    status = 400


@dataclass(frozen=True, slots=True)
class Checkout:
    id: str
    user_id: str
    amount: int
    status: str
    created_us: int
    paid_event_id: str | None
    paid_us: int | None

    def to_json(self) -> dict[str, Any]:
        from drip.money import format_plain

        return {
            "id": self.id, "user_id": self.user_id,
            "amount": {"usdc": format_plain(self.amount), "atomic": self.amount},
            "status": self.status, "created_us": self.created_us,
            "paid_event_id": self.paid_event_id, "paid_us": self.paid_us,
        }  # fmt: skip


class Checkouts:
    def __init__(self, store: Store) -> None:
        self.store = store
        store.migrate("checkouts", CHECKOUT_MIGRATIONS)

    @staticmethod
    def _id_for(request_id: str) -> str:
        return "co_" + hashlib.sha256(request_id.encode()).hexdigest()[:24]

    def exists_for(self, request_id: str) -> bool:
        """Whether a checkout was created for ``request_id``."""
        found = self.store.query("SELECT 1 FROM checkouts WHERE id = ?",
                                 (self._id_for(request_id),))  # fmt: skip
        return bool(found)

    def create(self, user_id: str, amount: int, request_id: str = "") -> Checkout:
        """A pending checkout. With ``request_id`` (an Idempotency-Key's), its id comes
        from it, so running that request again returns the same checkout."""
        checkout_id = self._id_for(request_id) if request_id else f"co_{secrets.token_hex(12)}"
        self.store.execute(
            "INSERT INTO checkouts (id, user_id, amount, status, created_us) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (checkout_id, user_id, amount, "pending", wall_clock_us()),
        )
        checkout = self.get(checkout_id)
        if (checkout.user_id, checkout.amount) != (user_id, amount):
            raise errors.IdempotencyConflict(
                "this Idempotency-Key was already used with a different request",
                param="Idempotency-Key",
            )
        return checkout

    def get(self, checkout_id: str) -> Checkout:
        if not isinstance(checkout_id, str) or not _CHECKOUT_RE.fullmatch(checkout_id):
            raise errors.NotFound(f"no checkout {str(checkout_id)[:40]!r}", param="checkout_id")
        rows = self.store.query(
            "SELECT id, user_id, amount, status, created_us, paid_event_id, paid_us "
            "FROM checkouts WHERE id = ?",
            (checkout_id,),
        )
        if not rows:
            raise errors.NotFound(f"no checkout {checkout_id[:40]!r}", param="checkout_id")
        return Checkout(*rows[0])

    def mark_paid(self, checkout_id: str, event_id: str) -> None:
        self.store.execute(
            "UPDATE checkouts SET status = 'paid', paid_event_id = ?, paid_us = ? "
            "WHERE id = ? AND status = 'pending'",
            (event_id, wall_clock_us(), checkout_id),
        )


@dataclass(frozen=True, slots=True)
class Payment:
    """What a verified webhook says was paid."""

    event_id: str
    checkout_id: str
    amount: int
    currency: str


def verify_stripe(
    payload: bytes, header: str | None, secret: str, tolerance_s: int
) -> dict[str, Any]:
    """The verified event, or InvalidSignature. ``stripe`` compares in constant time."""
    import stripe

    if not header:
        raise InvalidSignature("missing Stripe-Signature header", param="Stripe-Signature")
    try:
        stripe.WebhookSignature.verify_header(payload, header, secret, tolerance=tolerance_s)
    except UnicodeDecodeError:
        raise InvalidSignature("the webhook body is not UTF-8", param="Stripe-Signature") from None
    except stripe.SignatureVerificationError as exc:
        raise InvalidSignature(
            f"Stripe-Signature refused: {exc.user_message or 'bad signature'}",
            param="Stripe-Signature",
        ) from None
    # the library refuses old timestamps only; a far-future one would stretch the replay
    # window, so it is refused too
    stamps = [p.removeprefix("t=") for p in header.split(",") if p.startswith("t=")]
    if not stamps or not stamps[0].isdigit() or int(stamps[0]) > time.time() + tolerance_s:
        raise InvalidSignature("Stripe-Signature timestamp is in the future",
                               param="Stripe-Signature")  # fmt: skip
    return _json(payload)


#: Stripe's events that say a Checkout Session is paid: at completion (cards), or later
#: for delayed methods (bank debits), whose completion comes first with ``unpaid``.
STRIPE_PAID_EVENTS = ("checkout.session.completed", "checkout.session.async_payment_succeeded")


def stripe_payment(event: Any) -> Payment | None:
    """A paid Drip checkout from a Stripe event, or None for events Drip does not use."""
    if not isinstance(event, dict) or event.get("type") not in STRIPE_PAID_EVENTS:
        return None
    obj = event.get("data", {}).get("object", {})
    if not isinstance(obj, dict):
        return None
    metadata = obj.get("metadata") or {}
    checkout_id = metadata.get("drip_checkout_id") if isinstance(metadata, dict) else None
    if obj.get("payment_status") not in (None, "paid") or not isinstance(checkout_id, str):
        return None
    cents = obj.get("amount_total")
    if not isinstance(cents, int) or isinstance(cents, bool) or cents <= 0:
        raise PaymentMismatch("amount_total must be a positive integer of cents")
    return Payment(event_id(event.get("id")), checkout_id, cents * ATOMIC_PER_CENT,
                   str(obj.get("currency", "")).upper())  # fmt: skip


def event_id(value: object) -> str:
    """A delivery's event id as it is recorded with the checkout it paid."""
    if not isinstance(value, str) or not 0 < len(value) <= 255 or not value.isprintable():
        raise errors.InvalidRequest("the event id must be 1-255 printable characters",
                                    param="id")  # fmt: skip
    return value


def verify_standard(payload: bytes, headers: dict[str, str], secret: str) -> dict[str, Any]:
    """The verified message, or InvalidSignature (Standard Webhooks: id, timestamp and a
    signature over both and the body; 5-minute tolerance; constant-time comparison)."""
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    names: tuple[str, ...] = ("webhook-id", "webhook-timestamp", "webhook-signature")
    wanted: dict[str, str] = {k: headers[k] for k in names if k in headers}
    if len(wanted) < 3:
        raise InvalidSignature("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        # verified only: the body is parsed once, below, where its depth is bounded
        Webhook(secret).verify(payload, wanted, json_parse=False)
    except (WebhookVerificationError, ValueError) as exc:
        # the library's own words only: other errors could describe the secret
        reason = str(exc) if isinstance(exc, WebhookVerificationError) else "malformed"
        raise InvalidSignature(f"webhook signature refused: {reason}") from None
    return _json(payload)


def standard_payment(message: Any, msg_id: str) -> Payment | None:
    if not isinstance(message, dict) or message.get("type") != "checkout.paid":
        return None
    data = message.get("data") or {}
    checkout_id = data.get("checkout_id")
    if not isinstance(checkout_id, str):
        raise PaymentMismatch("data.checkout_id is required", param="checkout_id")
    from drip.money import parse_amount

    amount = parse_amount(data.get("amount"), allow_zero=False, param="data.amount")
    return Payment(event_id(msg_id), checkout_id, amount, str(data.get("currency", "")).upper())


def _json(payload: bytes) -> dict[str, Any]:
    """The verified body as a JSON object (anything else is refused)."""
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.InvalidRequest(f"the webhook body is not JSON: {exc}") from None
    except RecursionError:  # nested deeper than the parser can follow
        raise errors.InvalidRequest(
            f"the webhook body is nested deeper than {WEBHOOK_DEPTH_MAX} levels"
        ) from None
    if _depth_above(body, WEBHOOK_DEPTH_MAX):
        raise errors.InvalidRequest(
            f"the webhook body is nested deeper than {WEBHOOK_DEPTH_MAX} levels"
        )
    if not isinstance(body, dict) or not isinstance(body.get("data", {}), dict):
        raise errors.InvalidRequest("the webhook body must be an object with an object data")
    return body


def _depth_above(value: object, limit: int) -> bool:
    """Whether ``value`` nests objects and arrays more than ``limit`` levels deep
    (iteratively: a walk by recursion would fail on the very bodies it looks for)."""
    level: list[object] = [value]
    depth = 0
    while level:
        containers = [v for v in level if isinstance(v, dict | list)]
        if not containers:
            return False
        depth += 1
        if depth > limit:
            return True
        level = [c for v in containers for c in (v.values() if isinstance(v, dict) else v)]
    return False


def event_type(event: dict[str, Any]) -> str:
    """An event's type as echoed back for events Drip does not use (a string; anything
    else is named by its JSON kind, never printed whole)."""
    kind = event.get("type")
    if isinstance(kind, str):
        return kind
    if isinstance(kind, dict | list):
        return "object" if isinstance(kind, dict) else "array"
    return str(kind)
