"""Schemathesis against the app's own OpenAPI, over real HTTP (uvicorn on 127.0.0.1), on
each store: generated requests never get a 5xx, and every error comes back in the one
documented shape.

(Driven through schemathesis's Python API with hypothesis directly: its pytest plugin
does not load under this pytest.)
"""

from __future__ import annotations

import json
from typing import Any

import hypothesis
import schemathesis
from hypothesis import given


def test_no_5xx_and_one_error_shape(server: Any) -> None:
    with server.client(server.admin) as http:
        created = http.post("/v1/wallets", json={"user_id": "alice", "initial_balance": "5"},
                            headers={"Idempotency-Key": "seed-alice"})  # fmt: skip
        assert created.status_code == 201, created.text
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    headers = {"Authorization": f"Bearer {server.admin}", "Idempotency-Key": "schemathesis-1"}
    seen: dict[str, set[int]] = {}

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15  # every route is in the spec
    for operation in operations:

        @given(case=operation.as_strategy())
        @hypothesis.settings(max_examples=60, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))  # fmt: skip
        def check(case: Any) -> None:
            response = case.call(base_url=server.url, headers=headers, timeout=30)
            label = f"{case.method} {case.path}"
            seen.setdefault(label, set()).add(response.status_code)
            assert response.status_code < 500, (label, case.body, response.text[:300])
            if response.status_code >= 400:
                body = json.loads(response.text)
                assert set(body) == {"error"}, (label, body)
                assert set(body["error"]) == {"type", "code", "message", "param"}, body
                assert isinstance(body["error"]["code"], str) and body["error"]["message"]

        check()
    assert len(seen) == len(operations)
