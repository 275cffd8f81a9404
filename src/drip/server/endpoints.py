"""Outgoing webhook endpoints: where Drip will send signed events (Standard Webhooks).

Registering an endpoint returns its signing secret once (``whsec_<base64>``, as Standard
Webhooks defines it). The secret must stay usable to sign deliveries, so it is stored,
unlike API keys, and never returned or logged again. Deliveries themselves (low balance,
pause, resume, top-up) belong to the lifecycle work.

(No ``from __future__ import annotations``: FastAPI reads these signatures.)
"""

import base64
import ipaddress
import re
import secrets
import socket
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI
from pydantic import Field

from drip import errors
from drip.ledger.store import Migration, Store, wall_clock_us
from drip.ledger.types import check_code
from drip.server.charges import RequestBody

_V1 = """
CREATE TABLE webhook_endpoints (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    events TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_us BIGINT NOT NULL,
    deleted_us BIGINT
)
"""
ENDPOINT_MIGRATIONS = (Migration(1, _V1, _V1),)
#: Most endpoints one service keeps, and most event patterns one endpoint names.
ENDPOINTS_MAX = 100
EVENTS_MAX = 20
_ENDPOINT_ID = re.compile(r"we_[0-9a-f]{24}")


class EndpointCreate(RequestBody):
    url: str = Field(min_length=8, max_length=2048)
    events: list[str] = Field(default_factory=lambda: ["*"], min_length=1, max_length=EVENTS_MAX)


def _check_url(url: str) -> str:
    refused = errors.InvalidRequest("url must be an http(s) URL without credentials", param="url")
    if not url.isprintable() or any(c.isspace() for c in url):
        raise refused
    try:
        parts = urlsplit(url)
        hostname = parts.hostname  # raises on a malformed IPv6 literal
        _ = parts.port  # raises on a port out of range
    except ValueError:
        raise refused from None
    if parts.scheme not in ("https", "http") or not hostname:
        raise refused
    # any userinfo: "https://:secret@host" has a password and an empty username, and
    # the URL is listed back to every admin key
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise refused
    if _internal(hostname):
        raise errors.InvalidRequest(
            "url must name a public host (not loopback, private, link-local or a metadata "
            "address)", param="url",
        )  # fmt: skip
    return url


def _internal(hostname: str) -> bool:
    """Whether the host is this machine or its private network, as far as can be told
    without resolving it: localhost names and every spelling of a non-global address
    (``0x7f000001`` and ``127.1`` are 127.0.0.1 to an HTTP client). A delivery must
    check the address it connects to again (DNS can point anywhere)."""
    name = hostname.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(name)
    except ValueError:
        try:  # the legacy numeric forms getaddrinfo also takes
            address = ipaddress.IPv4Address(socket.inet_aton(name))
        except OSError:
            return False  # a name: resolved (and checked) when delivering
    return not address.is_global


class Endpoints:
    def __init__(self, store: Store) -> None:
        self.store = store
        store.migrate("webhook_endpoints", ENDPOINT_MIGRATIONS)

    def create(self, url: str, events: list[str]) -> dict[str, Any]:
        _check_url(url)
        for pattern in events:
            check_code(pattern.replace("*", "x"), "events")
        if len(self.list()) >= ENDPOINTS_MAX:
            raise errors.InvalidRequest(f"at most {ENDPOINTS_MAX} webhook endpoints")
        endpoint_id = f"we_{secrets.token_hex(12)}"
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        self.store.execute(
            "INSERT INTO webhook_endpoints (id, url, events, secret, created_us) "
            "VALUES (?, ?, ?, ?, ?)",
            (endpoint_id, url, ",".join(events), secret, wall_clock_us()),
        )
        return self.get(endpoint_id) | {"secret": secret}

    def list(self) -> list[dict[str, Any]]:
        rows = self.store.query(
            "SELECT id, url, events, created_us FROM webhook_endpoints "
            "WHERE deleted_us IS NULL ORDER BY created_us, id"
        )
        return [{"id": r[0], "url": r[1], "events": r[2].split(","), "created_us": r[3]}
                for r in rows]  # fmt: skip

    def get(self, endpoint_id: str) -> dict[str, Any]:
        for endpoint in self.list():
            if endpoint["id"] == endpoint_id:
                return endpoint
        raise errors.NotFound(f"no webhook endpoint {endpoint_id[:40]!r}", param="id")

    def delete(self, endpoint_id: str) -> None:
        if not _ENDPOINT_ID.fullmatch(endpoint_id):
            raise errors.NotFound(f"no webhook endpoint {endpoint_id[:40]!r}", param="id")
        if not self.store.execute(
            "UPDATE webhook_endpoints SET deleted_us = ? WHERE id = ? AND deleted_us IS NULL",
            (wall_clock_us(), endpoint_id),
        ):
            raise errors.NotFound(f"no webhook endpoint {endpoint_id[:40]!r}", param="id")


def add_routes(app: FastAPI, store: Store, admin: Any) -> None:
    endpoints = Endpoints(store)

    @app.post("/v1/webhook-endpoints", tags=["webhooks"], status_code=201)
    def create_endpoint(body: EndpointCreate, _: admin) -> dict[str, Any]:
        """Register an endpoint; the response's ``secret`` is shown only here."""
        return endpoints.create(body.url, body.events)

    @app.get("/v1/webhook-endpoints", tags=["webhooks"])
    def list_endpoints(_: admin) -> dict[str, Any]:
        return {"data": endpoints.list()}

    @app.delete("/v1/webhook-endpoints/{endpoint_id}", tags=["webhooks"], status_code=204)
    def delete_endpoint(endpoint_id: str, _: admin) -> None:
        endpoints.delete(endpoint_id)
