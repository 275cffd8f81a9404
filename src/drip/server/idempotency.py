"""``Idempotency-Key`` for money-moving POSTs: the same key and body get the same
response; the same key with another body is a 409, and so is a second request arriving
while the first with its key is still running (the key is claimed before the work).

Keys belong to the service, not to the API key that sent them: a retry sent with
another admin key (a rotation, a second worker) is the same request. Records written
before that (per API key) are still found for the key that wrote them.

The money itself is protected by the ledger: the key also names the transfer
(``req:<key>``), so two concurrent requests with one key move money once however they
interleave. This table only makes the *response* repeat exactly.

A request refused with an error releases its key for a retry of the same request; the
record keeps what the request was, so another request with the key is still a 409.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any

from drip import errors
from drip.ledger.store import Migration, Store, wall_clock_us

_V1 = """
CREATE TABLE http_idempotency (
    key_id TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    status INTEGER NOT NULL,
    response TEXT NOT NULL,
    created_us BIGINT NOT NULL,
    PRIMARY KEY (key_id, idem_key)
)
"""
IDEMPOTENCY_MIGRATIONS = (Migration(1, _V1, _V1),)
log = logging.getLogger("drip.server")
_KEY_RE = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
#: Status of a key whose first request is still running.
IN_PROGRESS = 0
#: Status of a key whose request failed with an error: free for a retry of that request.
FAILED = -1
#: Whose keys the records are: the service's (one tenant), whichever API key sent them.
SERVICE_SCOPE = "*"
#: A claim older than this is taken over by the next request with its key (its request
#: died between claiming and answering: a crash, a forced shutdown). Re-running it is
#: safe: the ledger id of its money movement comes from the key, so a charge that went
#: through is a replay. Longer than any request may run.
CLAIM_LEASE_S = 60


def check_key(value: str | None) -> str:
    if value is None:
        raise errors.InvalidRequest(
            "this request moves money: send an Idempotency-Key header", param="Idempotency-Key"
        )
    if not _KEY_RE.fullmatch(value):
        raise errors.InvalidRequest(
            "Idempotency-Key must be 1-100 characters of letters, digits and _.:-",
            param="Idempotency-Key",
        )
    return value


def _lease_start(now_us: int) -> int:
    """Claims made before this are stale: their requests are taken to have died."""
    return now_us - CLAIM_LEASE_S * 1_000_000


class IdempotencyConflictHttp(errors.IdempotencyConflict):
    """The Idempotency-Key was used before with a different request."""


class IdempotencyInProgress(errors.IdempotencyConflict):
    """The first request with this Idempotency-Key is still running: retry shortly (the
    response carries ``Retry-After``)."""

    code = "idempotency_in_progress"


class Responses:
    def __init__(self, store: Store) -> None:
        self.store = store
        store.migrate("http_idempotency", IDEMPOTENCY_MIGRATIONS)

    @staticmethod
    def body_digest(method: str, path: str, body: Any) -> str:
        canonical = json.dumps([method, path, body], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def find(
        self, key_id: str, idem_key: str, method: str, path: str, digest: str
    ) -> tuple[int, Any] | None:
        """The stored response of this key, None if there is none; 409 if the key was used
        for another request, or if its first request is still running."""
        return self.lookup(key_id, idem_key, method, path, digest)[0]

    def lookup(
        self, key_id: str, idem_key: str, method: str, path: str, digest: str
    ) -> tuple[tuple[int, Any] | None, bool]:
        """As ``find``, and whether the key has a record at all (answered or not)."""
        rows = self.store.query(
            "SELECT method, path, body_sha256, status, response, created_us "
            "FROM http_idempotency WHERE key_id = ? AND idem_key = ?",
            (key_id, idem_key),
        )
        if not rows:
            return None, False
        return self._answer(rows[0], method, path, digest), True

    @staticmethod
    def _answer(row: Any, method: str, path: str, digest: str) -> tuple[int, Any] | None:
        r_method, r_path, r_digest, status, response, claimed_us = row
        if (r_method, r_path, r_digest) != (method, path, digest):
            raise IdempotencyConflictHttp(
                "this Idempotency-Key was already used with a different request",
                param="Idempotency-Key",
            )
        if status == FAILED:
            return None  # the same request may run again: ``claim`` takes it over
        if status == IN_PROGRESS:
            if claimed_us < _lease_start(wall_clock_us()):
                return None  # its request died: ``claim`` takes it over
            raise IdempotencyInProgress(
                "a request with this Idempotency-Key is still being processed; retry shortly",
                param="Idempotency-Key", retry_after_s=1,
            )  # fmt: skip
        return int(status), json.loads(response)

    def claim(self, key_id: str, idem_key: str, method: str, path: str, digest: str) -> int | None:
        """Reserve the key for this request: its claim's token (for ``complete`` and
        ``release``), or None if another request holds it (or answered it). A claim older
        than ``CLAIM_LEASE_S`` is taken over; its old holder can then neither complete
        nor release it."""
        now = wall_clock_us()
        if self.store.execute(
            "INSERT INTO http_idempotency (key_id, idem_key, method, path, body_sha256, status, "
            "response, created_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (key_id, idem_key, method, path, digest, IN_PROGRESS, "null", now),
        ):  # fmt: skip
            return now
        if self.store.execute(
            "UPDATE http_idempotency SET created_us = ?, status = ? WHERE key_id = ? AND "
            "idem_key = ? AND method = ? AND path = ? AND body_sha256 = ? AND (status = ? OR "
            "(status = ? AND created_us < ?))",
            (now, IN_PROGRESS, key_id, idem_key, method, path, digest, FAILED, IN_PROGRESS,
             _lease_start(now)),
        ):  # fmt: skip
            return now
        return None

    def complete(self, key_id: str, idem_key: str, token: int, status: int, response: Any) -> None:
        if not self.store.execute(
            "UPDATE http_idempotency SET status = ?, response = ? "
            "WHERE key_id = ? AND idem_key = ? AND status = ? AND created_us = ?",
            (status, json.dumps(response), key_id, idem_key, IN_PROGRESS, token),
        ):
            log.warning(
                "Idempotency-Key %r was taken over while its request ran (over %d s); the "
                "newer run's answer is kept", idem_key, CLAIM_LEASE_S,
            )  # fmt: skip

    def release(self, key_id: str, idem_key: str, token: int) -> None:
        """The request failed before it produced a response: the same request may run
        again with the key (another one is still a 409)."""
        self.store.execute(
            "UPDATE http_idempotency SET status = ? WHERE key_id = ? AND idem_key = ? AND "
            "status = ? AND created_us = ?",
            (FAILED, key_id, idem_key, IN_PROGRESS, token),
        )
