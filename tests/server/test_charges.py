"""/v1/charges and /v1/holds over HTTP, with sessions and user ids, on each store."""

from __future__ import annotations

from typing import Any

import pytest

Server = Any  # the fixture in tests/server/conftest.py


def _setup(server: Server, budget: str = "0.05") -> str:
    with server.client(server.admin) as http:
        http.post("/v1/wallets", json={"user_id": "ann", "initial_balance": "1"})
        r = http.post("/v1/sessions", json={"user_id": "ann", "provider": "default",
                                            "budget": budget})  # fmt: skip
        return str(r.json()["token"])


def test_charges_with_a_session_and_with_a_user(server: Server) -> None:
    token = _setup(server)
    with server.client(server.admin) as http:
        r = http.post("/v1/charges", json={"amount": "0.02", "event": "search"},
                      headers={"X-Drip-Session": token, "Idempotency-Key": "c1"})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["charged"]["atomic"] == 20_000
        assert r.json()["balance"]["atomic"] == 980_000
        again = http.post("/v1/charges", json={"amount": "0.02", "event": "search"},
                          headers={"X-Drip-Session": token, "Idempotency-Key": "c1"})  # fmt: skip
        assert again.json() == r.json()
        over = http.post("/v1/charges", json={"amount": "0.04", "event": "search"},
                         headers={"X-Drip-Session": token, "Idempotency-Key": "c2"})  # fmt: skip
        assert over.status_code == 402
        assert over.json()["error"]["code"] == "session_budget_exhausted"
        direct = http.post("/v1/charges", json={"amount": "0.5", "event": "batch",
                                                "user_id": "ann"},
                           headers={"Idempotency-Key": "c3"})  # fmt: skip
        assert direct.status_code == 200 and direct.json()["balance"]["atomic"] == 480_000
        nobody = http.post("/v1/charges", json={"amount": "0.5", "event": "x"},
                           headers={"Idempotency-Key": "c4"})  # fmt: skip
        assert nobody.status_code == 400 and nobody.json()["error"]["param"] == "user_id"
        session = http.get("/v1/sessions/current", headers={"X-Drip-Session": token}).json()
        assert session["spent"]["atomic"] == 20_000


def test_holds_capture_and_void(server: Server) -> None:
    token = _setup(server, budget="0.10")
    with server.client(server.admin) as http:

        def hold(key: str, amount: str) -> Any:
            return http.post("/v1/holds", json={"amount": amount, "event": "llm"},
                             headers={"X-Drip-Session": token, "Idempotency-Key": key})  # fmt: skip

        first = hold("h1", "0.06")
        assert first.status_code == 201 and first.json()["state"] == "pending"
        assert hold("h2", "0.06").json()["error"]["code"] == "session_budget_exhausted"
        hold_id = first.json()["hold_id"]
        cap = http.post(f"/v1/holds/{hold_id}/capture", json={"amount": "0.0123"},
                        headers={"Idempotency-Key": "cap1"})  # fmt: skip
        assert cap.status_code == 200 and cap.json()["charged"]["atomic"] == 12_300
        twice = http.post(f"/v1/holds/{hold_id}/capture", json={"amount": "0.02"},
                          headers={"Idempotency-Key": "cap2"})  # fmt: skip
        assert twice.status_code == 409
        second = hold("h3", "0.08")
        assert second.status_code == 201
        void = http.post(f"/v1/holds/{second.json()['hold_id']}/void",
                         headers={"Idempotency-Key": "v1"})  # fmt: skip
        assert void.status_code == 200 and void.json()["state"] == "voided"
        missing = http.post("/v1/holds/nope/void", headers={"Idempotency-Key": "v2"})
        assert missing.status_code == 404
        state = http.get("/v1/sessions/current", headers={"X-Drip-Session": token}).json()
        assert (state["spent"]["atomic"], state["pending"]["atomic"]) == (12_300, 0)
        wallet = http.get("/v1/wallets/ann").json()
        assert wallet["available"]["atomic"] == 1_000_000 - 12_300


def test_a_charge_whose_answer_was_lost_is_answered_after_its_session_expired(
    server: Server, store_url: str
) -> None:
    """A request that charged and died before answering; its key's claim expires, the
    session too: the retry is answered with the charge that went through, not refused."""
    import time

    from drip.ledger import open_ledger
    from drip.server.idempotency import CLAIM_LEASE_S, IN_PROGRESS

    headers = {"Idempotency-Key": "lost"}
    body = {"amount": "0.1", "event": "search"}
    with server.client(server.admin) as http:
        http.post("/v1/wallets", json={"user_id": "eve", "initial_balance": "1"})
        session = {"user_id": "eve", "provider": "default", "budget": "0.5", "expires_in_s": 1}
        token = http.post("/v1/sessions", json=session).json()["token"]
        paid = {"X-Drip-Session": token}
        first = http.post("/v1/charges", json=body, headers=headers | paid)
        held = {"Idempotency-Key": "lost-hold"} | paid
        hold = http.post("/v1/holds", json=body, headers=held)
    assert first.status_code == 200 and hold.status_code == 201
    other = open_ledger(store_url)  # as if both requests had died before answering
    try:
        other.store.execute(
            "UPDATE http_idempotency SET status = ?, response = 'null', created_us = ?",
            (IN_PROGRESS, time.time_ns() // 1000 - (CLAIM_LEASE_S + 1) * 1_000_000),
        )
    finally:
        other.close()
    time.sleep(1.2)  # the session expires
    with server.client(server.admin) as http:
        late = http.post("/v1/charges", json=body, headers=headers | paid)
        late_hold = http.post("/v1/holds", json=body, headers=held)
        fresh = http.post("/v1/charges", json=body, headers={"Idempotency-Key": "new"} | paid)
        available = http.get("/v1/wallets/eve").json()["available"]["atomic"]
    assert late.status_code == 200 and late.json()["transfer_id"] == first.json()["transfer_id"]
    assert late_hold.status_code == 201 and late_hold.json()["hold_id"] == hold.json()["hold_id"]
    assert fresh.status_code == 403  # a new charge on the expired session is refused
    assert available == 1_000_000 - 100_000 - 100_000  # one charge, one open hold


def _fail_once(monkeypatch: Any, obj: Any, name: str) -> None:
    """The first call of ``obj.name`` fails: a request that committed, then answered 500."""
    real = getattr(obj, name)
    calls = [0]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("a store error after the commit")
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, flaky)


def test_a_released_key_reused_by_another_request_is_a_conflict(
    server: Server, monkeypatch: Any
) -> None:
    """A request that moved money and then failed releases its key; another request
    reusing that key must not be answered with the first one's charge, hold or checkout."""
    from drip.ledger.ledger import Ledger
    from drip.server import topups

    def post(path: str, body: dict[str, Any], key: str) -> Any:
        with server.client(server.admin) as http:
            return http.post(path, json=body, headers={"Idempotency-Key": key})

    for user in ("eve", "bob"):
        wallet = {"user_id": user, "initial_balance": "1"}
        assert post("/v1/wallets", wallet, f"w-{user}").is_success
    eve = {"user_id": "eve", "amount": "0.1", "event": "search"}
    bob = {"user_id": "bob", "amount": "0.5", "event": "other"}
    _fail_once(monkeypatch, Ledger, "balance")  # the answer fails after the charge
    assert post("/v1/charges", eve, "K").status_code == 500
    assert post("/v1/charges", bob, "K").status_code == 409
    assert post("/v1/holds", bob, "K").status_code == 409
    again = post("/v1/charges", eve, "K")  # the same request: its charge, once
    assert again.status_code == 200 and again.json()["charged"]["atomic"] == 100_000
    _fail_once(monkeypatch, topups.Checkouts, "get")  # the answer fails after the insert
    alice = {"user_id": "eve", "amount": "10"}
    assert post("/v1/checkout", alice, "co").status_code == 500
    assert post("/v1/checkout", {"user_id": "bob", "amount": "10"}, "co").status_code == 409
    first = post("/v1/checkout", alice, "co")
    assert first.status_code == 201 and first.json()["user_id"] == "eve"
    with server.client(server.admin) as http:
        assert http.get("/v1/wallets/bob").json()["available"]["atomic"] == 1_000_000
        assert http.get("/v1/wallets/eve").json()["available"]["atomic"] == 900_000


def test_a_released_key_reused_with_another_session_is_a_conflict(
    server: Server, monkeypatch: Any
) -> None:
    """The same body paid by another session of the same user is another request."""
    from drip.ledger.ledger import Ledger

    with server.client(server.admin) as http:
        http.post("/v1/wallets", json={"user_id": "eve", "initial_balance": "1"})
        sessions = [
            http.post("/v1/sessions", json={"user_id": "eve", "provider": "default",
                                            "budget": "0.5"}).json()["token"]
            for _ in range(2)
        ]  # fmt: skip
    body = {"amount": "0.1", "event": "search"}

    def charge(session: str) -> Any:
        headers = {"Idempotency-Key": "K", "X-Drip-Session": session}
        with server.client(server.admin) as http:
            return http.post("/v1/charges", json=body, headers=headers)

    _fail_once(monkeypatch, Ledger, "balance")  # the answer fails after the charge
    assert charge(sessions[0]).status_code == 500
    assert charge(sessions[1]).status_code == 409
    assert charge(sessions[0]).status_code == 200  # the same request: its charge
    with server.client(server.admin) as http:
        assert http.get("/v1/wallets/eve").json()["available"]["atomic"] == 900_000


def test_a_sessions_half_of_a_hold_cannot_be_settled_alone(server: Server) -> None:
    """``<hold>~cap0`` is the session's part of a linked hold: it settles with its hold,
    never on its own (which would charge the session with no revenue, and leave the
    wallet's part reserved until it expires)."""
    token = _setup(server, budget="1")
    with server.client(server.admin) as http:
        r = http.post("/v1/holds", json={"amount": "0.5", "event": "llm"},
                      headers={"X-Drip-Session": token, "Idempotency-Key": "linked"})  # fmt: skip
        hold_id = r.json()["hold_id"]
        for action, body in (("capture", {"amount": "0.1"}), ("void", None)):
            alone = http.post(f"/v1/holds/{hold_id}~cap0/{action}", json=body,
                              headers={"Idempotency-Key": f"alone-{action}"})  # fmt: skip
            assert alone.status_code == 404, alone.text
            assert alone.json()["error"]["code"] == "hold_not_found"
        session = http.get("/v1/sessions/current", headers={"X-Drip-Session": token}).json()
        assert (session["spent"]["atomic"], session["pending"]["atomic"]) == (0, 500_000)
        whole = http.post(f"/v1/holds/{hold_id}/capture", json={"amount": "0.1"},
                          headers={"Idempotency-Key": "whole"})  # fmt: skip
        assert whole.status_code == 200, whole.text
        session = http.get("/v1/sessions/current", headers={"X-Drip-Session": token}).json()
        assert (session["spent"]["atomic"], session["pending"]["atomic"]) == (100_000, 0)


def test_a_key_is_the_services_whichever_api_key_sends_it(server: Server, store_url: str) -> None:
    """A retry straddling an API key rotation (or sent by a worker with another key) is the
    same request: it used to charge a second time."""
    from drip.config import DripConfig
    from drip.metering import DripClient
    from drip.server.keys import KeyStore

    client = DripClient(DripConfig(database_url=store_url))
    try:
        rotated, _ = KeyStore(client.ledger.store).create("admin", "rotated")
    finally:
        client.close()
    body = {"user_id": "eve", "amount": "0.25", "event": "search"}
    headers = {"Idempotency-Key": "order-42"}
    with server.client(server.admin) as http:
        http.post("/v1/wallets", json={"user_id": "eve", "initial_balance": "1"})
        first = http.post("/v1/charges", json=body, headers=headers)
    with server.client(rotated) as http:
        again = http.post("/v1/charges", json=body, headers=headers)
        other = http.post("/v1/charges", json={**body, "amount": "0.5"}, headers=headers)
        balance = http.get("/v1/wallets/eve").json()["available"]["atomic"]
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and first.json()["transfer_id"] == "req:order-42"
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    assert balance == 750_000


def test_a_refused_key_is_free_for_the_same_request_only(server: Server) -> None:
    """A 402 stores no answer (a retry after a top-up may pass), but the key stays bound
    to its request: another body or endpoint with it is a 409, as after a success."""

    def post(path: str, body: dict[str, Any]) -> Any:
        with server.client(server.admin) as http:
            return http.post(path, json=body, headers={"Idempotency-Key": "K"})

    with server.client(server.admin) as http:
        http.post("/v1/wallets", json={"user_id": "eve", "initial_balance": "1"})
    too_much = {"user_id": "eve", "amount": "5", "event": "search"}
    assert post("/v1/charges", too_much).status_code == 402
    small = post("/v1/charges", {**too_much, "amount": "0.1"})
    assert small.status_code == 409 and small.json()["error"]["code"] == "idempotency_conflict"
    assert post("/v1/wallets/eve/topup", {"amount": "5"}).status_code == 409
    with server.client(server.admin) as http:
        http.post("/v1/wallets/eve/topup", json={"amount": "5"}, headers={"Idempotency-Key": "T"})
    assert post("/v1/charges", too_much).status_code == 200  # the same request, now paid
    with server.client(server.admin) as http:
        assert http.get("/v1/wallets/eve").json()["available"]["atomic"] == 1_000_000


def test_a_key_still_running_is_a_retryable_409(store_url: str) -> None:
    from drip.ledger import open_store
    from drip.server import idempotency

    store = open_store(store_url)
    try:
        responses = idempotency.Responses(store)
        record = ("*", "k", "POST", "/v1/charges", "digest")
        assert responses.claim(*record) is not None
        with pytest.raises(idempotency.IdempotencyInProgress) as info:
            responses.find(*record)
        assert info.value.code == "idempotency_in_progress" and info.value.status == 409
        assert info.value.details["retry_after_s"] == 1
    finally:
        store.close()


def test_a_paused_wallet_is_a_402_not_a_conflict(server: Server, store_url: str) -> None:
    """A 409 means an idempotency conflict; a paused user is resumed by a top-up."""
    from drip.config import DripConfig
    from drip.metering import DripClient

    with server.client(server.admin) as http:
        http.post("/v1/wallets", json={"user_id": "eve", "initial_balance": "1"})
    client = DripClient(DripConfig(database_url=store_url))
    try:
        client.sync.hibernate("eve")
    finally:
        client.close()
    with server.client(server.admin) as http:
        r = http.post("/v1/charges", json={"user_id": "eve", "amount": "0.1", "event": "s"},
                      headers={"Idempotency-Key": "c"})  # fmt: skip
    assert r.status_code == 402, r.text
    assert r.json()["error"]["type"] == "payment_required_error"
