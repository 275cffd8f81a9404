"""Requests a review found taken and then answered for something other than what the
client sent (a misspelled field dropped, a credit that broke every later top-up, the
last of two filters silently used), or answered with a 500 or an error naming the wrong
field. Each is refused at the door now, naming what the client sent."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from datetime import UTC, datetime
from typing import Any

from standardwebhooks.webhooks import Webhook

from drip.money import CREDIT_ATOMIC_MAX

Server = Any  # the fixture in tests/server/conftest.py


def _code(response: Any) -> tuple[int, str, Any]:
    error = response.json()["error"]
    assert set(error) == {"type", "code", "message", "param"}, error
    return response.status_code, error["code"], error["param"]


def _key(n: list[int] = [0]) -> dict[str, str]:  # noqa: B006 - a counter on purpose
    n[0] += 1
    return {"Idempotency-Key": f"review-{n[0]}-{time.time_ns()}"}


def _wallet(http: Any, user: str, balance: str = "10") -> None:
    r = http.post("/v1/wallets", json={"user_id": user, "initial_balance": balance})
    assert r.status_code == 201, r.text


def _available(http: Any, user: str) -> int:
    return int(http.get(f"/v1/wallets/{user}").json()["available"]["atomic"])


def test_a_misspelled_or_unknown_field_is_a_422_naming_it(server: Server) -> None:
    with server.client(server.admin) as http:
        r = http.post("/v1/wallets", json={"user_id": "typo", "intial_balance": "100"})
        assert _code(r) == (422, "validation_error", "intial_balance")
        assert "intial_balance" in r.json()["error"]["message"]
        assert http.get("/v1/wallets").json()["data"] == []  # no empty wallet was made

        _wallet(http, "alice")
        hold = http.post("/v1/holds", json={"amount": "5", "event": "llm", "user_id": "alice"},
                         headers=_key()).json()["hold_id"]  # fmt: skip
        # {"amout": "0.01"} captured the whole hold
        for typo in ({"amout": "0.01"}, {"amount_usdc": "0.01"}):
            r = http.post(f"/v1/holds/{hold}/capture", json=typo, headers=_key())
            assert _code(r) == (422, "validation_error", next(iter(typo)))
        assert _available(http, "alice") == 5_000_000  # still held, nothing captured
        session = {"user_id": "alice", "provider": "default", "budget": "1"}
        refused = {
            ("/v1/wallets/alice/topup", "amout"): {"amout": "1"},
            ("/v1/wallets/alice/topup", "note"): {"amount": "1", "note": "x"},
            ("/v1/wallets/alice/adjust", "resaon"): {"amount": "1", "resaon": "x"},
            ("/v1/checkout", "currency"): {"user_id": "alice", "amount": "1", "currency": "eur"},
            ("/v1/sessions", "polcy"): {**session, "polcy": {"max_per_call": "0.01"}},
            ("/v1/sessions", "expires_in"): {**session, "expires_in": 3600},
            ("/v1/charges", "user"): {"amount": "1", "event": "e", "user_id": "alice",
                                      "user": "bob"},
            ("/v1/holds", "timeout"): {"amount": "1", "event": "e", "user_id": "alice",
                                       "timeout": 5},
            ("/v1/webhook-endpoints", "event"): {"url": "https://hooks.example.com/d",
                                                 "event": ["x"]},
        }  # fmt: skip
        for (path, field), body in refused.items():
            r = http.post(path, json=body, headers=_key())
            assert _code(r) == (422, "validation_error", field), (path, r.text)
        assert _available(http, "alice") == 5_000_000
        assert http.get("/v1/webhook-endpoints").json()["data"] == []


def test_a_credit_above_the_ceiling_is_refused_naming_its_field(server: Server) -> None:
    """Credits are drawn from one funding account whose debit counter is 64 bits: a typo
    of 9,000,000,000,000 USDC brought it to overflow, after which every top-up failed."""
    assert CREDIT_ATOMIC_MAX == 10**15
    above = "1000000000.000001"
    with server.client(server.admin) as http:
        r = http.post("/v1/wallets", json={"user_id": "rich", "initial_balance": above})
        assert _code(r) == (400, "invalid_amount", "initial_balance")
        assert http.get("/v1/wallets").json()["data"] == []
        _wallet(http, "alice", "1")
        for path, body in (
            ("/v1/wallets/alice/topup", {"amount": above}),
            ("/v1/wallets/alice/topup", {"amount": 9_000_000_000_000}),
            ("/v1/wallets/alice/adjust", {"amount": "9000000000000", "reason": "typo"}),
            ("/v1/checkout", {"user_id": "alice", "amount": above}),
        ):
            r = http.post(path, json=body, headers=_key())
            assert _code(r) == (400, "invalid_amount", "amount"), (path, r.text)
        assert _available(http, "alice") == 1_000_000
        # the ceiling itself is taken, and a debit is bounded by the balance, not by it
        r = http.post("/v1/wallets/alice/topup", json={"amount": "1000000000"}, headers=_key())
        assert r.status_code == 200, r.text
        undo = {"amount": "-1000000000.5", "reason": "undo"}
        r = http.post("/v1/wallets/alice/adjust", json=undo, headers=_key())
        assert r.status_code == 200, r.text
        assert _available(http, "alice") == 500_000
        # and every top-up still works afterwards
        r = http.post("/v1/wallets/alice/topup", json={"amount": "1"}, headers=_key())
        assert r.status_code == 200, r.text


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def test_a_signed_webhook_nested_too_deep_is_a_400_not_a_500(server: Server) -> None:
    payloads = [
        '{"type":"checkout.paid","data":{"x":' + _deep(100_000) + "}}",  # past the parser
        '{"type":"checkout.paid","data":{"x":' + _deep(200) + "}}",  # past the limit
        '{"type":' + _deep(900) + ',"data":{}}',  # an ignored type, printed back before
    ]
    for payload in payloads:
        now = datetime.now(tz=UTC)
        signature = Webhook(server.standard_secret).sign("msg_deep", now, payload)
        headers = {"webhook-id": "msg_deep", "webhook-timestamp": str(int(now.timestamp())),
                   "webhook-signature": signature}  # fmt: skip
        with server.client() as http:
            r = http.post("/v1/webhooks/standard", content=payload.encode(), headers=headers)
        assert _code(r) == (400, "invalid_request", None), r.text[:300]
        at = int(time.time())
        mac = hmac.new(server.stripe_secret.encode(), f"{at}.{payload}".encode(),
                       hashlib.sha256).hexdigest()  # fmt: skip
        with server.client() as http:
            r = http.post("/v1/webhooks/stripe", content=payload.encode(),
                          headers={"Stripe-Signature": f"t={at},v1={mac}"})  # fmt: skip
        assert _code(r) == (400, "invalid_request", None), r.text[:300]
    # an ordinary event Drip does not use is still answered with its type
    payload = json.dumps({"id": "evt_x", "type": "invoice.paid", "data": {"object": {}}})
    at = int(time.time())
    mac = hmac.new(server.stripe_secret.encode(), f"{at}.{payload}".encode(),
                   hashlib.sha256).hexdigest()  # fmt: skip
    with server.client() as http:
        r = http.post("/v1/webhooks/stripe", content=payload.encode(),
                      headers={"Stripe-Signature": f"t={at},v1={mac}"})  # fmt: skip
    assert r.status_code == 200 and r.json()["ignored"] == "invoice.paid", r.text


def test_a_repeated_query_parameter_is_a_400_naming_it(server: Server) -> None:
    with server.client(server.admin) as http:
        for user, amount in (("qa", "1"), ("qb", "2")):
            _wallet(http, user)
            r = http.post("/v1/charges", json={"amount": amount, "event": "e", "user_id": user},
                          headers=_key())  # fmt: skip
            assert r.status_code == 200, r.text
        for query in ("user_id=qa&user_id=qb", "user_id=qb&user_id=qa",
                      "event=e&user_id=qa&event=e"):  # fmt: skip
            r = http.get(f"/v1/usage?{query}")
            param = query.split("=")[0]
            assert _code(r) == (400, "invalid_request", param), (query, r.text)
        one = http.get("/v1/usage?user_id=qa").json()["data"]
        assert [row["amount"]["atomic"] for row in one] == [1_000_000]
        assert _code(http.get("/v1/wallets?limit=1&limit=1000")) == (
            400, "invalid_request", "limit")  # fmt: skip
        assert _code(http.get("/v1/wallets/qa/transfers?event=e&event=x")) == (
            400, "invalid_request", "event")  # fmt: skip


def test_errors_name_the_field_the_client_sent(server: Server) -> None:
    with server.client(server.admin) as http:
        _wallet(http, "alice")
        base = {"user_id": "alice", "provider": "default", "budget": "1"}
        r = http.post("/v1/sessions", json={**base, "policy": {"allow_events": ["x" * 60] * 70}})
        assert _code(r) == (400, "invalid_request", "policy")
        r = http.post("/v1/sessions", json={**base, "expires_in_s": 10**9})
        assert _code(r) == (422, "validation_error", "expires_in_s")
        for allow in ("x", [5], [""]):
            r = http.post("/v1/sessions", json={**base, "policy": {"allow_events": allow}})
            assert _code(r) == (400, "invalid_request", "policy.allow_events"), allow
        r = http.post("/v1/sessions", json={**base, "policy": {"deny_events": "x"}})
        assert _code(r) == (400, "invalid_request", "policy.deny_events")
        assert _code(http.get("/v1/usage?bucket_s=1")) == (422, "validation_error", "bucket_s")
        assert _code(http.get("/v1/wallets?limit=0")) == (422, "validation_error", "limit")
        r = http.post("/v1/charges", json={"amount": "1", "event": "e", "user_id": "alice"})
        assert _code(r)[2] == "Idempotency-Key"
        r = http.get("/v1/sessions/current")  # a header missing: named as sent
        assert _code(r) == (422, "validation_error", "X-Drip-Session")

        # amount is optional on a capture: no body at all captures the whole hold
        hold = http.post("/v1/holds", json={"amount": "2", "event": "e", "user_id": "alice"},
                         headers=_key()).json()["hold_id"]  # fmt: skip
        key = _key()
        r = http.post(f"/v1/holds/{hold}/capture", headers=key)
        assert r.status_code == 200, r.text
        assert r.json()["charged"]["atomic"] == 2_000_000
        assert http.post(f"/v1/holds/{hold}/capture", json={}, headers=key).json() == r.json()
        assert _available(http, "alice") == 8_000_000
        paths = http.get("/openapi.json").json()["paths"]
        assert not paths["/v1/holds/{hold_id}/capture"]["post"]["requestBody"].get("required")


def test_a_webhook_url_with_any_credentials_is_refused(server: Server) -> None:
    with server.client(server.admin) as http:
        for url in ("https://:s3cret-token@example.com/hook", "https://user@example.com/hook",
                    "https://user:pw@example.com/hook", "https://@example.com/hook"):  # fmt: skip
            r = http.post("/v1/webhook-endpoints", json={"url": url})
            assert _code(r) == (400, "invalid_request", "url"), url
        assert http.get("/v1/webhook-endpoints").json()["data"] == []


def test_a_user_id_no_url_path_can_carry_is_refused(server: Server) -> None:
    with server.client(server.admin) as http:
        for user in (".", ".."):
            r = http.post("/v1/wallets", json={"user_id": user, "initial_balance": "1"})
            assert _code(r) == (400, "invalid_id", "user_id"), user
            r = http.post("/v1/wallets", json={"user_id": user}, headers=_key())
            assert _code(r) == (400, "invalid_id", "user_id"), user
        assert http.get("/v1/wallets").json()["data"] == []
        _wallet(http, "a.b")  # dots within an id are fine
        _wallet(http, "...")


def test_a_session_token_is_never_taken_in_a_url(server: Server) -> None:
    """A session is named in a URL by its public id; its token (which spends) would end
    up in proxies' and access logs, and is refused there."""
    with server.client(server.admin) as http:
        _wallet(http, "tok")
        r = http.post("/v1/sessions", json={"user_id": "tok", "provider": "default",
                                            "budget": "1"}, headers=_key())  # fmt: skip
        assert r.status_code == 201, r.text
        token, public = r.json()["token"], r.json()["public_id"]
        assert http.get(f"/v1/sessions/{public}").status_code == 200
        for method, path in (("GET", f"/v1/sessions/{token}"),
                             ("POST", f"/v1/sessions/{token}/close")):  # fmt: skip
            r = http.request(method, path)
            assert _code(r) == (400, "invalid_request", "public_id"), r.text
        assert http.get(f"/v1/sessions/{public}").json()["status"] != "closed"


def test_wallet_amounts_are_exact_whatever_the_decimal_context(server: Server) -> None:
    import decimal
    from decimal import Decimal

    from drip.server.app import wallet_json

    with decimal.localcontext(decimal.Context(prec=3, traps=[decimal.Inexact])):
        view = wallet_json({"user_id": "u", "email": None, "status": "active",
                            "balance_usdc": Decimal("123.456789"),
                            "posted_usdc": Decimal("123.456789"),
                            "pending_usdc": Decimal("0"), "metadata": {}})  # fmt: skip
    assert view["available"]["atomic"] == 123_456_789
