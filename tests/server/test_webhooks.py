"""The top-up webhook battery: every forged, stale, replayed or mismatched delivery is
refused or credits exactly once; nothing else is ever credited."""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime
from typing import Any

from standardwebhooks.webhooks import Webhook

Server = Any  # the fixture in tests/server/conftest.py


def _balance(server: Server, user: str) -> int:
    with server.client(server.admin) as http:
        return int(http.get(f"/v1/wallets/{user}").json()["available"]["atomic"])


def _checkout(server: Server, user: str, amount: str) -> str:
    with server.client(server.admin) as http:
        http.post("/v1/wallets", json={"user_id": user})
        r = http.post("/v1/checkout", json={"user_id": user, "amount": amount})
        assert r.status_code == 201, r.text
        assert r.json()["status"] == "pending"
        return str(r.json()["id"])


def stripe_event(checkout_id: str, cents: int, event_id: str = "evt_1",
                 currency: str = "usd") -> bytes:  # fmt: skip
    return json.dumps({
        "id": event_id, "type": "checkout.session.completed",
        "data": {"object": {"amount_total": cents, "currency": currency,
                            "payment_status": "paid",
                            "metadata": {"drip_checkout_id": checkout_id}}},
    }).encode()  # fmt: skip


def stripe_header(payload: bytes, secret: str, at: int | None = None) -> str:
    at = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{at}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={at},v1={mac}"


def post_stripe(server: Server, payload: bytes, header: str | None) -> Any:
    headers = {"Content-Type": "application/json"}
    if header is not None:
        headers["Stripe-Signature"] = header
    with server.client() as http:
        return http.post("/v1/webhooks/stripe", content=payload, headers=headers)


def test_a_signed_stripe_payment_credits_its_checkout_once(server: Server) -> None:
    checkout = _checkout(server, "payer", "5.00")
    payload = stripe_event(checkout, 500)
    r = post_stripe(server, payload, stripe_header(payload, server.stripe_secret))
    assert r.status_code == 200, r.text
    assert r.json()["credited"]["atomic"] == 5_000_000
    assert _balance(server, "payer") == 5_000_000
    # the same event again, and another event for the same checkout: no second credit
    assert (
        post_stripe(server, payload, stripe_header(payload, server.stripe_secret)).status_code
        == 200
    )
    other = stripe_event(checkout, 500, event_id="evt_2")
    assert post_stripe(server, other, stripe_header(other, server.stripe_secret)).status_code == 200
    assert _balance(server, "payer") == 5_000_000
    with server.client(server.reader) as http:
        assert http.get(f"/v1/checkout/{checkout}").json()["status"] == "paid"


def test_forged_and_stale_stripe_deliveries_are_refused(server: Server) -> None:
    checkout = _checkout(server, "victim", "1.00")
    payload = stripe_event(checkout, 100)
    good = stripe_header(payload, server.stripe_secret)
    cases = {
        "missing": None,
        "malformed": "nonsense",
        "empty": "",
        "no v1": f"t={int(time.time())}",
        "wrong secret": stripe_header(payload, "whsec_someone_else"),
        "stale": stripe_header(payload, server.stripe_secret, at=int(time.time()) - 3600),
        "future": stripe_header(payload, server.stripe_secret, at=int(time.time()) + 3600),
        "other body": good,  # a valid header for a different body
    }
    for name, header in cases.items():
        body = stripe_event(checkout, 10_000) if name == "other body" else payload
        r = post_stripe(server, body, header)
        assert r.status_code == 400, (name, r.text)
        assert r.json()["error"]["code"] == "invalid_signature", name
    assert _balance(server, "victim") == 0


def test_mismatched_or_unknown_payments_credit_nothing(server: Server) -> None:
    checkout = _checkout(server, "buyer", "2.00")
    cases = [
        (stripe_event(checkout, 199), 400, "payment_mismatch"),
        (stripe_event(checkout, 200, currency="eur"), 400, "payment_mismatch"),
        (stripe_event("co_unknown", 200), 404, "not_found"),
    ]
    for payload, status, code in cases:
        r = post_stripe(server, payload, stripe_header(payload, server.stripe_secret))
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    ignored = json.dumps({"id": "evt_x", "type": "invoice.paid", "data": {}}).encode()
    r = post_stripe(server, ignored, stripe_header(ignored, server.stripe_secret))
    assert r.status_code == 200 and r.json()["ignored"] == "invoice.paid"
    assert _balance(server, "buyer") == 0


def test_concurrent_duplicate_deliveries_credit_once(server: Server) -> None:
    checkout = _checkout(server, "racer", "0.75")
    payload = stripe_event(checkout, 75, event_id="evt_race")
    header = stripe_header(payload, server.stripe_secret)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: post_stripe(server, payload, header).status_code,
                                 range(16)))  # fmt: skip
    assert statuses == [200] * 16
    assert _balance(server, "racer") == 750_000


def standard_post(server: Server, message: dict[str, Any], *, msg_id: str = "msg_1",
                  secret: str | None = None, at: datetime | None = None) -> Any:  # fmt: skip
    body = json.dumps(message)
    at = at or datetime.now(tz=UTC)
    signature = Webhook(secret or server.standard_secret).sign(msg_id, at, body)
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(int(at.timestamp())),
               "webhook-signature": signature, "Content-Type": "application/json"}  # fmt: skip
    with server.client() as http:
        return http.post("/v1/webhooks/standard", content=body, headers=headers)


def test_standard_webhooks_pay_once_and_refuse_forgeries(server: Server) -> None:
    checkout = _checkout(server, "std", "3.50")
    message = {"type": "checkout.paid",
               "data": {"checkout_id": checkout, "amount": "3.50", "currency": "USDC"}}  # fmt: skip
    other_secret = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="
    refused = [
        standard_post(server, message, secret=other_secret),
        standard_post(server, message, at=datetime.fromtimestamp(time.time() - 3600, tz=UTC)),
        standard_post(server, {**message, "data": {**message["data"], "amount": "3.49"}}),
    ]
    assert [r.status_code for r in refused] == [400, 400, 400]
    assert [r.json()["error"]["code"] for r in refused] == [
        "invalid_signature", "invalid_signature", "payment_mismatch"]  # fmt: skip
    with server.client() as http:
        r = http.post("/v1/webhooks/standard", content=b"{}",
                      headers={"Content-Type": "application/json"})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_signature"
    assert _balance(server, "std") == 0
    assert standard_post(server, message).status_code == 200
    assert standard_post(server, message).status_code == 200  # replayed
    assert standard_post(server, message, msg_id="msg_2").status_code == 200
    assert _balance(server, "std") == 3_500_000


def test_a_top_up_resumes_a_paused_user(server: Server, store_url: str) -> None:
    import asyncio

    from drip.config import DripConfig
    from drip.metering import DripClient

    checkout = _checkout(server, "sleepy", "1.00")

    async def pause() -> None:
        client = DripClient(DripConfig(database_url=store_url))
        try:
            await client.hibernate("sleepy")
        finally:
            client.close()

    asyncio.run(pause())
    with server.client(server.admin) as http:
        assert http.get("/v1/wallets/sleepy").json()["status"] == "paused"
    payload = stripe_event(checkout, 100, event_id="evt_wake")
    assert (
        post_stripe(server, payload, stripe_header(payload, server.stripe_secret)).status_code
        == 200
    )
    with server.client(server.admin) as http:
        wallet = http.get("/v1/wallets/sleepy").json()
    assert wallet["status"] == "active" and wallet["available"]["atomic"] == 1_000_000
    # paused again by the operator; the processor re-sends the delivery: nothing moves
    asyncio.run(pause())
    for event_id in ("evt_wake", "evt_wake_again"):
        again = stripe_event(checkout, 100, event_id=event_id)
        r = post_stripe(server, again, stripe_header(again, server.stripe_secret))
        assert r.status_code == 200, r.text
    with server.client(server.admin) as http:
        wallet = http.get("/v1/wallets/sleepy").json()
    assert wallet["status"] == "paused" and wallet["available"]["atomic"] == 1_000_000


def test_a_delivery_that_stopped_before_marking_its_checkout_paid_is_finished(
    server: Server, store_url: str
) -> None:
    """Credited (and resumed, in the same transaction), then the server died before it
    marked the checkout paid: the processor's retry credits nothing more and marks it."""
    import asyncio

    from drip.config import DripConfig
    from drip.metering import DripClient

    checkout = _checkout(server, "crashed", "1.00")

    async def credit_without_finishing() -> None:
        client = DripClient(DripConfig(database_url=store_url))
        try:
            await client.hibernate("crashed")
            await client.topup("crashed", "1", idempotency_key=f"checkout:{checkout}")
        finally:
            client.close()

    asyncio.run(credit_without_finishing())
    payload = stripe_event(checkout, 100, event_id="evt_retry")
    r = post_stripe(server, payload, stripe_header(payload, server.stripe_secret))
    assert r.status_code == 200, r.text
    with server.client(server.admin) as http:
        wallet = http.get("/v1/wallets/crashed").json()
        assert http.get(f"/v1/checkout/{checkout}").json()["status"] == "paid"
    assert wallet["status"] == "active" and wallet["available"]["atomic"] == 1_000_000


def test_a_retry_of_a_credit_never_resumes_a_user_paused_since(
    server: Server, store_url: str
) -> None:
    """Credited (resumed with it), then paused by an operator (a fraud hold) before the
    delivery marked its checkout paid: the processor's retry, or a twin delivery to
    another process, must not turn the user back on. It used to, because the checkout
    still said pending."""
    from drip.ledger import funding_account_id, open_ledger

    checkout = _checkout(server, "held", "1.00")
    led = open_ledger(store_url)
    try:
        led.sync.transfer(f"checkout:{checkout}", funding_account_id("USDC"), "user:held",
                          1_000_000, code="topup", resume=True)  # fmt: skip
        led.sync.set_status("user:held", "frozen")  # the operator's hold, after the credit
    finally:
        led.close()
    payload = stripe_event(checkout, 100, event_id="evt_retry_held")
    r = post_stripe(server, payload, stripe_header(payload, server.stripe_secret))
    assert r.status_code == 200, r.text
    assert r.json()["replayed"] is True
    with server.client(server.admin) as http:
        wallet = http.get("/v1/wallets/held").json()
        assert http.get(f"/v1/checkout/{checkout}").json()["status"] == "paid"
    assert wallet["status"] == "paused" and wallet["available"]["atomic"] == 1_000_000


def test_undecodable_or_non_object_bodies_are_400(server: Server) -> None:
    assert post_stripe(server, b"\xff\xfe{}", "t=1,v1=00").status_code == 400
    for payload in (b"[1]", b'{"id": "e", "type": "x", "data": 5}'):
        r = post_stripe(server, payload, stripe_header(payload, server.stripe_secret))
        assert r.status_code == 400, r.text
        assert set(r.json()["error"]) == {"type", "code", "message", "param"}
    with server.client(server.reader) as http:
        assert http.get("/v1/checkout/%00").status_code == 404
        assert http.get("/v1/usage", params={"event": "\x00"}).status_code == 400


def test_a_checkout_request_run_again_returns_the_same_checkout(store_url: str) -> None:
    """A request taken over after its claim's lease runs again: with the id taken from
    its Idempotency-Key, it finds the checkout the first run created."""
    from drip.ledger import open_store
    from drip.server.topups import Checkouts

    store = open_store(store_url)
    try:
        checkouts = Checkouts(store)
        first = checkouts.create("u1", 5_000_000, "idem:k1:checkout-1")
        again = checkouts.create("u1", 5_000_000, "idem:k1:checkout-1")
        other = checkouts.create("u1", 5_000_000, "idem:k1:checkout-2")
        unkeyed = checkouts.create("u1", 5_000_000)
        assert first == again and len({first.id, other.id, unkeyed.id}) == 3
        rows = store.query("SELECT count(*) FROM checkouts")
        assert rows[0][0] == 3
    finally:
        store.close()


def test_a_delayed_stripe_payment_credits_when_it_succeeds(server: Server) -> None:
    """Bank debits complete the Checkout Session ``unpaid``; the money is there only at
    ``checkout.session.async_payment_succeeded``."""
    checkout = _checkout(server, "ach", "3.00")
    completed = json.loads(stripe_event(checkout, 300, event_id="evt_done"))
    completed["data"]["object"]["payment_status"] = "unpaid"
    payload = json.dumps(completed).encode()
    r = post_stripe(server, payload, stripe_header(payload, server.stripe_secret))
    assert r.status_code == 200 and r.json()["ignored"] == "checkout.session.completed"
    assert _balance(server, "ach") == 0
    paid = json.loads(stripe_event(checkout, 300, event_id="evt_paid"))
    paid["type"] = "checkout.session.async_payment_succeeded"
    payload = json.dumps(paid).encode()
    r = post_stripe(server, payload, stripe_header(payload, server.stripe_secret))
    assert r.status_code == 200, r.text
    assert _balance(server, "ach") == 3_000_000


def test_odd_but_signed_stripe_events_credit_nothing_and_are_not_500s(server: Server) -> None:
    checkout = _checkout(server, "odd", "1.00")
    odd_metadata = json.loads(stripe_event(checkout, 100, event_id="evt_odd"))
    odd_metadata["data"]["object"]["metadata"] = ["drip_checkout_id", checkout]
    bad_id = json.loads(stripe_event(checkout, 100, event_id="evt_\u0000nul"))
    for event, status in ((odd_metadata, 200), (bad_id, 400)):
        payload = json.dumps(event).encode()
        r = post_stripe(server, payload, stripe_header(payload, server.stripe_secret))
        assert r.status_code == status, r.text
    assert _balance(server, "odd") == 0
    with server.client(server.reader) as http:
        assert http.get(f"/v1/checkout/{checkout}").json()["status"] == "pending"


def test_an_oversized_webhook_body_is_refused_before_it_is_read(server: Server) -> None:
    """The route takes no key: a declared size past the cap is refused at once, and an
    undeclared (chunked) body is read only up to the cap."""
    from drip.server.app import WEBHOOK_BYTES_MAX

    big = b"x" * (WEBHOOK_BYTES_MAX + 1)
    with server.client() as http:
        r = http.post("/v1/webhooks/stripe", content=big,
                      headers={"Stripe-Signature": "t=1,v1=00"})  # fmt: skip
        assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]


async def test_an_undeclared_webhook_body_is_read_only_up_to_the_cap() -> None:
    import pytest
    from starlette.requests import Request

    from drip import errors
    from drip.server.app import WEBHOOK_BYTES_MAX, webhook_body

    sent = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        sent += 1  # 64 MiB in all, if it were all read
        return {"type": "http.request", "body": b"x" * (1 << 20), "more_body": sent < 64}

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    with pytest.raises(errors.InvalidRequest, match="larger than"):
        await webhook_body(request)
    assert sent == WEBHOOK_BYTES_MAX // (1 << 20) + 1
