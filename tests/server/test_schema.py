"""Schemathesis against the app's own OpenAPI: generated requests never get a 5xx, and
every error comes back in the one documented shape.

(Driven through schemathesis's Python API with hypothesis directly: its pytest plugin
does not load under this pytest.)
"""

from __future__ import annotations

import json
from typing import Any

import hypothesis
import schemathesis
from hypothesis import given

from drip.config import DripConfig
from drip.server import create_app


def test_no_5xx_and_one_error_shape(sqlite_url: str) -> None:
    app = create_app(DripConfig(database_url=sqlite_url, webhook_secret="whsec_" + "QUJD" * 8,
                                stripe_webhook_secret="whsec_test"))  # fmt: skip
    admin, _ = app.state.keys.create("admin", "schemathesis")
    app.state.client.sync.provision_user("alice", initial_balance="5")
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    headers = {"Authorization": f"Bearer {admin}", "Idempotency-Key": "schemathesis-1"}
    seen: dict[str, set[int]] = {}

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15  # every route is in the spec
    for operation in operations:

        @given(case=operation.as_strategy())
        @hypothesis.settings(max_examples=60, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))  # fmt: skip
        def check(case: Any) -> None:
            response = case.call(headers=headers)
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
