"""An API provider billing per call with Drip: run it, then call it with a session.

    python examples/provider_app.py              # serves on 127.0.0.1:8080 (SQLite)

- ``GET /search``: 0.007 USDC per call.
- ``GET /generate?n=20``: streamed, 0.001 USDC per token actually sent (``n`` at most
  100, the price's ``max_units``: a larger ``n`` is a 422, uncharged).
- ``GET /health``: free (not in the price table).
Callers send ``X-Drip-Session: <token>`` from ``client.create_session(...)``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Annotated

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import StreamingResponse

from drip import DripClient, DripConfig
from drip.asgi import DripMeter, price, report_units

PROVIDER = "api.example.com"
#: the most tokens one /generate call may ask for: the price's max_units (the hold)
MAX_TOKENS = 100


def build(database_url: str, *, token_delay_s: float = 0.0) -> tuple[DripMeter, DripClient, dict]:
    """The metered app, its Drip client, and counters of what the handlers ran."""
    api = FastAPI(title="Example provider")
    ran = {"search": 0, "generate": 0, "broken": 0}

    @api.get("/search")
    async def search(q: str) -> dict[str, object]:
        ran["search"] += 1
        return {"query": q, "results": [f"https://example.org/{q}/{i}" for i in range(3)]}

    @api.get("/generate")
    async def generate(
        request: Request, n: Annotated[int, Query(ge=0, le=MAX_TOKENS)] = 10
    ) -> StreamingResponse:
        # n is capped at max_units: units beyond it would be served but never billed
        ran["generate"] += 1

        async def tokens():  # type: ignore[no-untyped-def]
            for i in range(n):
                report_units(request.scope, i + 1)  # bill only what was produced
                yield f"token{i} "
                if token_delay_s:
                    await asyncio.sleep(token_delay_s)

        return StreamingResponse(tokens(), media_type="text/plain")

    @api.get("/broken")
    async def broken() -> None:
        ran["broken"] += 1
        raise HTTPException(status_code=503, detail="upstream unavailable")

    @api.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    client = DripClient(DripConfig(database_url=database_url, provider=PROVIDER))
    app = DripMeter(
        api,
        client=client,
        routes={
            "GET /search": price("search", "0.007"),
            "GET /generate": price("tokens", per_unit="0.001", max_units=MAX_TOKENS),
            "GET /broken": price("broken", "0.01"),
        },
    )
    return app, client, ran


if __name__ == "__main__":
    import uvicorn

    app, _, _ = build(os.environ.get("DRIP_DATABASE_URL", "sqlite:///provider.db"))
    uvicorn.run(app, host="127.0.0.1", port=8080)
