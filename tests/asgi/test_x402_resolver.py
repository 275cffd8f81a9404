"""X402Meter with sessions and a ``payer=`` resolver: a resolver that refuses a request
answers with its own error, never a 500 (no chain needed: nothing reaches x402)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from fastapi import FastAPI

from drip import DripClient, DripConfig, errors
from drip.asgi import price
from drip.x402.server import X402Meter, x402_price


def resolver(scope: Any) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == b"x-user":
            if value == b"banned":
                raise errors.PolicyViolation("this caller is not allowed", param="x-user",
                                             policy="caller")  # fmt: skip
            return str(value.decode())
    return None


def test_a_refusing_resolver_answers_with_its_own_error(
    tmp_path: Any, run_app: Callable[[object], str]
) -> None:
    api = FastAPI()
    ran = {"n": 0}

    @api.get("/answer")
    async def answer() -> dict[str, str]:
        ran["n"] += 1
        return {"answer": "42"}

    client = DripClient(DripConfig(database_url=f"sqlite:///{tmp_path}/r.db"))
    client.sync.provision_user("alice", initial_balance="1")
    app = X402Meter(
        api, client=client, facilitator=None, payer=resolver,
        routes={"GET /answer": x402_price("answer", "0.01", pay_to="0x" + "22" * 20,
                                          asset="0x" + "33" * 20, network="eip155:31337")},
        sessions={"GET /answer": price("answer", "0.01")},
    )  # fmt: skip
    try:
        with httpx.Client(base_url=run_app(app)) as http:
            banned = http.get("/answer", headers={"X-User": "banned"})
            alice = http.get("/answer", headers={"X-User": "alice"})
            nobody = http.get("/answer")
        assert banned.status_code == 403, banned.text
        assert banned.json()["error"]["param"] == "x-user"
        assert alice.status_code == 200 and alice.headers["x-drip-charged"] == "0.01"
        assert nobody.status_code == 402 and "payment-required" in nobody.headers
        assert ran["n"] == 1
    finally:
        client.close()
