"""What the REST API refuses at the door, found by review: each was a request that was
taken and then did something other than what the client asked (billed another user,
rounded a cap, could never be credited or reached, filtered nothing)."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest

from drip.config import DripConfig

Server = Any  # the fixture in tests/server/conftest.py


def _code(response: Any) -> tuple[int, str, Any]:
    error = response.json()["error"]
    return response.status_code, error["code"], error["param"]


def test_a_session_and_another_users_id_is_refused(server: Server) -> None:
    with server.client(server.admin) as http:
        for user in ("alice", "bob"):
            http.post("/v1/wallets", json={"user_id": user, "initial_balance": "10"})
        token = http.post("/v1/sessions", json={"user_id": "alice", "provider": "default",
                                                "budget": "5"}).json()["token"]  # fmt: skip
        r = http.post("/v1/charges", json={"user_id": "bob", "amount": "1", "event": "e"},
                      headers={"X-Drip-Session": token, "Idempotency-Key": "k1"})  # fmt: skip
        assert _code(r) == (400, "invalid_request", "user_id")
        same = http.post("/v1/charges", json={"user_id": "alice", "amount": "1", "event": "e"},
                         headers={"X-Drip-Session": token, "Idempotency-Key": "k2"})  # fmt: skip
        assert same.status_code == 200
        balances = [http.get(f"/v1/wallets/{u}").json()["available"]["atomic"]
                    for u in ("alice", "bob")]  # fmt: skip
    assert balances == [9_000_000, 10_000_000]


def test_policy_amounts_are_never_floats(server: Server) -> None:
    with server.client(server.admin) as http:
        http.post("/v1/wallets", json={"user_id": "alice", "initial_balance": "10"})
        for policy in ({"max_per_call": 1.00000000000000001},
                       {"windows": [{"per": 60, "max_amount": 0.1}]},
                       {"routes": {"llm*": {"budget": 0.3}}}):  # fmt: skip
            r = http.post("/v1/sessions", json={"user_id": "alice", "provider": "default",
                                                "budget": "2", "policy": policy})  # fmt: skip
            assert r.status_code == 422, r.text
            assert "decimal strings" in r.json()["error"]["message"]
        ok = http.post("/v1/sessions", json={"user_id": "alice", "provider": "default",
                                             "budget": "2", "policy": {
                                                 "max_per_call": "1", "windows": [
                                                     {"per": 60, "max_calls": 3}]}})  # fmt: skip
        assert ok.status_code == 201, ok.text


def test_usage_refuses_filters_it_does_not_have(server: Server) -> None:
    with server.client(server.admin) as http:
        r = http.get("/v1/usage", params={"route": "/search"})
        assert _code(r) == (400, "invalid_request", "route")
        r = http.get("/v1/usage", params={"since_us": 10, "until_us": 5})
        assert _code(r) == (400, "invalid_request", "since_us")
        assert http.get("/v1/usage", params={"event": "search", "format": "csv"}).is_success


def test_a_wallet_id_no_path_can_reach_is_refused(server: Server) -> None:
    with server.client(server.admin) as http:
        r = http.post("/v1/wallets", json={"user_id": "a/b", "initial_balance": "5"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "user_id"
        assert http.get("/v1/wallets").json()["data"] == []


def test_the_schema_says_where_an_idempotency_key_is_required(server: Server) -> None:
    with server.client() as http:
        paths = http.get("/openapi.json").json()["paths"]

    def required(method: str, path: str) -> bool:
        params = paths[path][method]["parameters"]
        return next(p["required"] for p in params if p["name"] == "Idempotency-Key")

    assert required("post", "/v1/charges") and required("post", "/v1/holds")
    assert required("post", "/v1/wallets/{user_id}/topup")
    assert required("post", "/v1/wallets/{user_id}/adjust")
    assert not required("post", "/v1/wallets") and not required("post", "/v1/checkout")


def test_a_webhook_body_too_large_is_a_413(server: Server) -> None:
    with server.client() as http:
        r = http.post("/v1/webhooks/standard", content=b"x" * (300 * 1024))
    assert _code(r) == (413, "payload_too_large", None)


def test_webhook_endpoints_must_be_public_hosts(server: Server) -> None:
    with server.client(server.admin) as http:
        for url in ("http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:5432/",
                    "http://[::1]:6379/", "http://0x7f000001/", "http://localhost:8402/",
                    "http://10.1.2.3/hook", "https://hooks.example.com:99999/"):  # fmt: skip
            r = http.post("/v1/webhook-endpoints", json={"url": url})
            assert r.status_code == 400 and r.json()["error"]["param"] == "url", url
        assert (
            http.post(
                "/v1/webhook-endpoints", json={"url": "https://hooks.example.com/drip"}
            ).status_code
            == 201
        )


def test_bad_webhook_secrets_are_refused_at_startup_without_showing_them() -> None:
    for secret in ("whsec_", "whsec_!!!!", "my-plain-secret",
                   "whsec_" + base64.b64encode(b"short").decode()):  # fmt: skip
        with pytest.raises(ValueError) as info:
            DripConfig(webhook_secret=secret)
        assert "webhook_secret" in str(info.value)
        body = secret.removeprefix("whsec_")
        assert len(body) < 4 or body not in str(info.value)
    with pytest.raises(ValueError):
        DripConfig(stripe_webhook_secret=" ")
    good = "whsec_" + base64.b64encode(b"sixteen bytes at least").decode()
    assert DripConfig(webhook_secret=good).webhook_secret is not None


def test_a_printed_config_shows_no_database_password() -> None:
    config = DripConfig(database_url="postgresql://drip:S3cretPW@db.internal/drip")
    assert "S3cretPW" not in repr(config) and "S3cretPW" not in str(config)
    assert "drip:***@db.internal" in repr(config)
    assert config.database_url.endswith("S3cretPW@db.internal/drip")  # still usable


def test_stripe_checkouts_are_whole_cents(server: Server) -> None:
    """Stripe pays whole cents: a checkout of 1.234567 could be paid, never credited."""
    with server.client(server.admin) as http:
        http.post("/v1/wallets", json={"user_id": "alice"})
        r = http.post("/v1/checkout", json={"user_id": "alice", "amount": "1.234567"})
        assert _code(r) == (400, "invalid_amount", "amount")
        assert http.post("/v1/checkout", json={"user_id": "alice", "amount": "1.23"}).is_success


def test_amounts_have_no_digit_grouping_and_metadata_no_deep_nesting(server: Server) -> None:
    """``"1_5"`` was credited as 15 USDC; metadata 250 levels deep was stored, then broke
    every listing that included its wallet (a 500 from then on)."""
    deep: dict[str, Any] = {}
    for _ in range(300):
        deep = {"a": deep}
    with server.client(server.admin) as http:
        http.post("/v1/wallets", json={"user_id": "alice"})
        r = http.post("/v1/wallets/alice/topup", json={"amount": "1_5"},
                      headers={"Idempotency-Key": "t1"})  # fmt: skip
        assert r.status_code == 422 and r.json()["error"]["param"] == "amount"
        r = http.post("/v1/wallets", json={"user_id": "bob", "metadata": deep})
        assert r.status_code == 422 and r.json()["error"]["param"] == "metadata"
        r = http.post("/v1/charges", json={"user_id": "alice", "amount": "0", "event": "e",
                                           "metadata": deep},
                      headers={"Idempotency-Key": "c1"})  # fmt: skip
        assert r.status_code == 422 and "nested deeper" in r.json()["error"]["message"]
        listed = http.get("/v1/wallets")
        assert listed.status_code == 200 and [w["user_id"] for w in listed.json()["data"]] == [
            "alice"]  # fmt: skip
        assert http.get("/v1/wallets/alice").json()["available"]["atomic"] == 0


def test_errors_name_the_fields_the_request_has(server: Server) -> None:
    """Not the ledger's internal names (``code``, ``provision:<user>``) nor a character
    position of malformed JSON."""
    with server.client(server.admin) as http:
        http.post("/v1/wallets", json={"user_id": "alice", "initial_balance": "1"})
        r = http.post("/v1/charges", json={"user_id": "alice", "amount": "0.1",
                                           "event": "bad event"},
                      headers={"Idempotency-Key": "e1"})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["param"] == "event"
        r = http.post("/v1/wallets", json={"user_id": "alice", "initial_balance": "2"})
        assert _code(r) == (409, "already_exists", "initial_balance")
        assert "provision:" not in r.json()["error"]["message"]
        r = http.post("/v1/charges", content=b'{"amount": ', headers={
            "Content-Type": "application/json", "Idempotency-Key": "e2"})  # fmt: skip
        assert r.status_code == 422 and r.json()["error"]["param"] is None
        policy = {"max_per_call": "1", "windows": [{"per": 60, "max_amount": "0.5"}]}
        r = http.post("/v1/sessions", json={"user_id": "alice", "provider": "default",
                                            "budget": "1", "policy": policy})  # fmt: skip
        assert r.json()["policy"]["max_per_call"] == "1"  # as every amount is written
        assert r.json()["policy"]["windows"][0]["max_amount"] == "0.5"


def test_an_app_serves_again_after_its_lifespan_ended(store_url: str) -> None:
    """The lifespan closes the client; the same app served again (a second TestClient, a
    restart in one process) must open it again, not answer every request with an error."""
    from fastapi.testclient import TestClient

    from drip.server.app import create_app

    app = create_app(DripConfig(database_url=store_url))
    admin, _ = app.state.keys.create("admin", "tests")
    for user in ("alice", "bob"):
        with TestClient(app) as http:
            r = http.post("/v1/wallets", json={"user_id": user},
                          headers={"Authorization": f"Bearer {admin}"})  # fmt: skip
            assert r.status_code == 201, r.text


def test_policy_amounts_have_no_digit_grouping(server: Server) -> None:
    with server.client(server.admin) as http:
        http.post("/v1/wallets", json={"user_id": "alice", "initial_balance": "10"})
        for policy in ({"max_per_call": "0_5"}, {"windows": [{"per": 60, "max_amount": "1_0"}]},
                       {"routes": {"llm_*": {"budget": "0_50"}}}):  # fmt: skip
            r = http.post("/v1/sessions", json={"user_id": "alice", "provider": "default",
                                                "budget": "2", "policy": policy})  # fmt: skip
            assert r.status_code == 422, r.text
        ok = http.post(
            "/v1/sessions",
            json={
                "user_id": "alice",
                "provider": "default",
                "budget": "2",
                "policy": {"routes": {"llm_*": {"budget": "0.5"}}},
            },
        )
        assert ok.status_code == 201, ok.text  # an underscore in a pattern is fine


def test_keys_answered_before_they_were_the_services_are_still_honoured(
    store_url: str, run_app: Any
) -> None:
    """A request answered (or left dying) under the old per-API-key scheme, whose ledger id
    is idem:<api key id>:<key>, retried after the upgrade: one charge in total."""
    from drip.server.app import create_app

    app = create_app(DripConfig(database_url=store_url))
    admin, key = app.state.keys.create("admin", "tests")
    client = app.state.client
    client.sync.provision_user("eve", initial_balance="10")
    # what the previous release left: the charge made, its record claimed, never answered
    client.ledger.sync.charge(f"idem:{key.key_id}:k1", "user:eve", client.revenue_account,
                              1_000_000, code="search")  # fmt: skip
    from drip.server.charges import ChargeCreate, _keyed
    from drip.server.idempotency import Responses

    body = {"user_id": "eve", "amount": "1", "event": "search"}
    digest = Responses.body_digest("POST", "/v1/charges", _keyed(ChargeCreate(**body), None))
    client.ledger.store.execute(
        "INSERT INTO http_idempotency (key_id, idem_key, method, path, body_sha256, status, "
        "response, created_us) VALUES (?, 'k1', 'POST', '/v1/charges', ?, 0, 'null', 1)",
        (key.key_id, digest),
    )
    client.close()
    app = create_app(DripConfig(database_url=store_url))  # restarted on the new release
    with httpx.Client(base_url=run_app(app), headers={"Authorization": f"Bearer {admin}"}) as h:
        r = h.post("/v1/charges", json=body, headers={"Idempotency-Key": "k1"})
        assert r.status_code == 200, r.text
        assert r.json()["transfer_id"] == f"idem:{key.key_id}:k1"
        assert h.get("/v1/wallets/eve").json()["available"]["atomic"] == 9_000_000


def test_a_key_answered_by_an_older_process_beside_this_one_is_honoured(
    store_url: str, run_app: Any
) -> None:
    """A rolling upgrade: this process started on a database with no per-key records;
    a process of the previous release, still serving, then answers k2 its way; the
    client's retry lands here."""
    from drip.server.app import create_app
    from drip.server.charges import ChargeCreate, _keyed
    from drip.server.idempotency import Responses

    app = create_app(DripConfig(database_url=store_url))
    admin, key = app.state.keys.create("admin", "tests")
    app.state.client.sync.provision_user("eve", initial_balance="10")
    body = {"user_id": "eve", "amount": "1", "event": "search"}
    digest = Responses.body_digest("POST", "/v1/charges", _keyed(ChargeCreate(**body), None))
    with httpx.Client(base_url=run_app(app), headers={"Authorization": f"Bearer {admin}"}) as h:
        # a process of the previous release, still serving beside this one, answers k2
        old = app.state.client  # the same database
        old.ledger.sync.charge(f"idem:{key.key_id}:k2", "user:eve", old.revenue_account,
                               1_000_000, code="search")  # fmt: skip
        answer = {"transfer_id": f"idem:{key.key_id}:k2", "charged": "1"}
        old.ledger.store.execute(
            "INSERT INTO http_idempotency (key_id, idem_key, method, path, body_sha256, "
            "status, response, created_us) VALUES (?, 'k2', 'POST', '/v1/charges', ?, 200, ?, 1)",
            (key.key_id, digest, json.dumps(answer)),
        )
        r = h.post("/v1/charges", json=body, headers={"Idempotency-Key": "k2"})
        assert r.status_code == 200 and r.json() == answer  # its answer, not a second charge
        assert h.get("/v1/wallets/eve").json()["available"]["atomic"] == 9_000_000


def test_true_is_not_an_amount_and_says_so(server: Server) -> None:
    with server.client(server.admin) as http:
        http.post("/v1/wallets", json={"user_id": "alice"})
        r = http.post("/v1/wallets/alice/topup", json={"amount": True},
                      headers={"Idempotency-Key": "t"})  # fmt: skip
    assert r.status_code == 422 and "true/false is not one" in r.json()["error"]["message"]
