"""Admin API keys: shown once, stored as a SHA-256 digest, checked in constant time.

A key reads ``drip_sk_<key id>_<secret>``. The id finds the row; the secret's digest is
compared with ``hmac.compare_digest``. Scopes: ``admin`` (everything) and ``read``
(GET only). Revoked keys stay in the table, refused.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from drip import errors
from drip.ledger.store import Migration, Store, wall_clock_us

SCOPES = ("admin", "read")
PREFIX = "drip_sk_"

_V1 = """
CREATE TABLE api_keys (
    key_id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    scope TEXT NOT NULL,
    label TEXT,
    created_us BIGINT NOT NULL,
    revoked_us BIGINT
)
"""
KEY_MIGRATIONS = (Migration(1, _V1, _V1),)


class Unauthenticated(errors.DripError):
    """No API key, or one that is unknown, malformed or revoked."""

    code = "unauthenticated"
    type = "authentication_error"
    status = 401


class Forbidden(errors.DripError):
    """The key is valid but its scope does not allow this request."""

    code = "forbidden"
    type = "permission_error"
    status = 403


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    scope: str
    label: str | None
    created_us: int
    revoked_us: int | None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    """API keys in the ledger's database (their own versioned schema component)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        store.migrate("api_keys", KEY_MIGRATIONS)

    def create(self, scope: str, label: str | None = None) -> tuple[str, ApiKey]:
        """Returns the full key (the only time it exists outside the caller) and its record."""
        if scope not in SCOPES:
            raise errors.InvalidRequest(f"scope must be one of {SCOPES}", param="scope")
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        now = wall_clock_us()
        self.store.execute(
            "INSERT INTO api_keys (key_id, secret_sha256, scope, label, created_us) "
            "VALUES (?, ?, ?, ?, ?)",
            (key_id, _digest(secret), scope, label, now),
        )
        return f"{PREFIX}{key_id}_{secret}", ApiKey(key_id, scope, label, now, None)

    def list(self) -> list[ApiKey]:
        rows = self.store.query(
            "SELECT key_id, scope, label, created_us, revoked_us FROM api_keys ORDER BY created_us"
        )
        return [ApiKey(*r) for r in rows]

    def revoke(self, key_id: str) -> None:
        if not self.store.execute(
            "UPDATE api_keys SET revoked_us = ? WHERE key_id = ? AND revoked_us IS NULL",
            (wall_clock_us(), key_id),
        ):
            raise errors.NotFound(f"no active key {key_id!r}", param="key_id")

    def authenticate(self, presented: str | None) -> ApiKey:
        """The key's record, or Unauthenticated (the same message for every failure)."""
        refused = Unauthenticated("a valid API key is required (Authorization: Bearer ...)")
        if not presented or not presented.startswith(PREFIX):
            raise refused
        key_id, _, secret = presented.removeprefix(PREFIX).partition("_")
        if not key_id or not secret:
            raise refused
        rows = self.store.query(
            "SELECT key_id, secret_sha256, scope, label, created_us, revoked_us FROM api_keys "
            "WHERE key_id = ?",
            (key_id,),
        )
        # compare even when the id is unknown, so timing does not tell ids apart
        stored = rows[0][1] if rows else _digest(secrets.token_hex(16))
        if not hmac.compare_digest(stored, _digest(secret)) or not rows or rows[0][5] is not None:
            raise refused
        row = rows[0]
        return ApiKey(row[0], row[2], row[3], row[4], row[5])
