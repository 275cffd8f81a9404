"""``drip serve``: the REST API over the ledger and the metering SDK.

(No ``from __future__ import annotations`` here: FastAPI reads the route signatures,
which name types defined inside ``create_app``.)

Every error, from Drip or from request validation, leaves as
``{"error": {"type", "code", "message", "param"}}`` with the status of DESIGN.md
section 6; nothing a client sends produces a 500.
"""

import asyncio
import contextvars
import csv
import io
import logging
import re
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, cast

import psycopg
import psycopg_pool
import structlog
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import AfterValidator, BaseModel, Field, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from drip import errors
from drip.config import DripConfig
from drip.ledger import AccountKind, Transfer, UsageRow, funding_account_id
from drip.ledger.store import Store
from drip.ledger.types import encode_metadata, has_control
from drip.metering import DripClient, wallet_id
from drip.metering.client import user_errors
from drip.metering.sessions import EXPIRES_IN_S_MAX, TOKEN_PREFIX, session_specs
from drip.money import credit_amount, format_plain, parse_amount, to_decimal
from drip.server.charges import Amount, Live, Metadata, RequestBody
from drip.server.charges import add_routes as add_charge_routes
from drip.server.endpoints import add_routes as add_endpoint_routes
from drip.server.idempotency import (
    SERVICE_SCOPE,
    IdempotencyInProgress,
    Responses,
    check_key,
)
from drip.server.keys import ApiKey, Forbidden, KeyStore, Unauthenticated
from drip.server.logs import request_logger
from drip.server.topups import (
    ATOMIC_PER_CENT,
    Checkouts,
    Payment,
    PaymentMismatch,
    event_type,
    standard_payment,
    stripe_payment,
    verify_standard,
    verify_stripe,
)

#: Largest webhook body read.
WEBHOOK_BYTES_MAX = 256 * 1024
#: Largest request body any route takes.
BODY_BYTES_MAX = 1024 * 1024
#: Writes idempotent by their own nature (a wallet per user id; a checkout is only a
#: pending top-up): ``Idempotency-Key`` is optional there, required on the others.
_IDEMPOTENCY_OPTIONAL = frozenset({("post", "/v1/wallets"), ("post", "/v1/checkout")})
#: A policy's amount fields (its other strings, event patterns, may hold "_").
_POLICY_AMOUNTS = frozenset({"max_per_call", "max_amount", "budget"})
#: Ledger parameter names an error may carry, as the requests name them.
_LEDGER_PARAMS = {"code": "event", "pending_id": "hold_id"}
#: The query parameters of ``GET /v1/usage``.
_USAGE_PARAMS = frozenset({"user_id", "event", "since_us", "until_us", "bucket_s", "format"})
#: Where a validation error's ``loc`` says the value came from: not part of its name.
_LOCATIONS = frozenset({"body", "query", "header", "path", "cookie"})
#: Ids a URL path cannot carry: clients and proxies normalise ``/v1/wallets/..`` away.
_DOT_SEGMENTS = frozenset({".", ".."})
#: Methods counted by name in the metrics; any other is "other" (labels stay bounded).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: An incoming ``X-Request-ID`` is kept if it looks like one; otherwise one is made.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "drip_request_id", default=None
)

log = logging.getLogger("drip.server")


def _no_control(value: str | None) -> str | None:
    """An email with a control character (ESC, a C1 code, a newline): stored, it would
    reach whoever prints it (a terminal running ``drip wallet list`` acts on escape
    sequences: links, screen clears) or a notice's headers."""
    if value is not None and has_control(value):
        raise ValueError("must not contain control characters")
    return value


class WalletCreate(RequestBody):
    # no "/": the wallet's routes (/v1/wallets/{user_id}/...) could never reach it
    user_id: str = Field(min_length=1, max_length=150, pattern=r"^[^/]+$")
    email: Annotated[str | None, AfterValidator(_no_control)] = Field(default=None, max_length=320)
    initial_balance: Amount = "0"
    metadata: Metadata = None


class TopUp(RequestBody):
    amount: Amount


class CheckoutCreate(RequestBody):
    user_id: str = Field(min_length=1, max_length=150)
    amount: Amount


def _no_fractions(value: Any, where: str = "policy") -> Any:
    """A policy's amounts are decimal strings, as every amount here: a JSON number with a
    fraction would be read as a binary float (and ``1.00000000000000001`` taken as 1)."""
    if isinstance(value, float):
        raise ValueError(f"{where}: a JSON number with a fraction is not taken; send amounts "
                         'as decimal strings ("0.10")')  # fmt: skip
    if isinstance(value, dict):
        for k, v in value.items():
            if k in _POLICY_AMOUNTS and isinstance(v, str) and "_" in v:  # "0_5" would be 5
                raise ValueError(f'{where}.{k}: amounts are plain decimal strings (no "_")')
            _no_fractions(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _no_fractions(v, f"{where}[{i}]")
    return value


class SessionCreate(RequestBody):
    user_id: str = Field(min_length=1, max_length=150)
    provider: str = Field(min_length=1, max_length=150)
    budget: Amount
    expires_in_s: StrictInt | None = Field(default=None, gt=0, le=EXPIRES_IN_S_MAX)
    policy: Annotated[dict[str, Any] | None, AfterValidator(_no_fractions)] = None


class Adjust(RequestBody):
    amount: Amount = Field(description="Signed: positive credits the wallet, negative debits it")
    reason: str = Field(min_length=1, max_length=200)


class PayloadTooLarge(errors.InvalidRequest):
    """The request body is larger than the route takes."""

    code = "payload_too_large"
    status = 413


async def webhook_body(request: Request) -> bytes:
    """The body, read no further than ``WEBHOOK_BYTES_MAX`` (the route needs no key)."""
    too_large = PayloadTooLarge(f"the webhook body is larger than {WEBHOOK_BYTES_MAX} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > WEBHOOK_BYTES_MAX:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > WEBHOOK_BYTES_MAX:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


class BodyLimit:
    """Pure ASGI: a request body larger than ``max_bytes`` is a 413 in the error shape.
    A declared ``Content-Length`` is refused before the app runs; a chunked body is cut
    off as it streams past the limit (the route sees a 413 instead of the rest)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = StarletteHTTPException(413, f"the body is larger than {self.max_bytes} bytes")
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                err = errors.InvalidRequest(str(too_large.detail))
                await JSONResponse(err.to_dict(), status_code=413)(scope, receive, send)
                return
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, counted, send)


class ErrorDetail(BaseModel):
    type: str
    code: str
    message: str
    param: str | None = None


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer (DESIGN section 6)."""

    error: ErrorDetail


_ERROR_STATUSES = {
    400: "Invalid request", 401: "No valid API key", 402: "Payment required",
    403: "Not allowed", 404: "Not found", 409: "Conflict (Idempotency-Key, replays)",
    413: "Body too large", 422: "Validation error", 429: "Rate limited",
}  # fmt: skip


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": what} for status, what in _ERROR_STATUSES.items()
}


#: what a read raises when the database is down or busy (writes are StoreErrors already);
#: a programming or schema error stays a 500, visible as the bug it is
_DATABASE_ERRORS = (sqlite3.OperationalError, psycopg.OperationalError, psycopg_pool.PoolTimeout)


def _error_response(exc: errors.DripError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthenticated) else {}
    if exc.status in (409, 429) and "retry_after_s" in exc.details:
        headers["Retry-After"] = str(exc.details["retry_after_s"])
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)


def single_query_params(request: Request) -> None:
    """A query parameter sent twice (``?user_id=A&user_id=B``) is refused: taking either
    one silently would answer for a filter the client did not mean."""
    seen: set[str] = set()
    for name, _ in request.query_params.multi_items():
        if name in seen:
            raise errors.InvalidRequest(f"query parameter {name!r} is sent more than once",
                                        param=name)  # fmt: skip
        seen.add(name)


def session_json(state: dict[str, Any]) -> dict[str, Any]:
    money = ("budget", "spent", "pending", "remaining")
    return {k: _money(v) if k in money else v for k, v in state.items()}


def usage_csv(rows: list[UsageRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["bucket_start", "event", "calls", "amount_usdc", "amount_atomic"])
    for r in rows:
        start = datetime.fromtimestamp(r.bucket_start_us / 1_000_000, tz=UTC).isoformat()
        writer.writerow([start, _csv_text(r.code), r.calls, format_plain(r.amount), r.amount])
    return out.getvalue()


def _csv_text(value: str) -> str:
    """A client-chosen text cell a spreadsheet must not run as a formula (``-A1/A2``)."""
    return f"'{value}" if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def transfer_json(t: Transfer) -> dict[str, Any]:
    return {"id": t.id, "debit_account": t.debit_account_id, "credit_account": t.credit_account_id,
            "amount": _money(t.amount), "event": t.code, "flags": t.flags,
            "pending_id": t.pending_id, "ts_us": t.ts_us, "metadata": t.meta}  # fmt: skip


def _no_session() -> dict[str, Any]:
    raise errors.SessionNotFound("no such session", param="X-Drip-Session")


def _money(units: int) -> dict[str, Any]:
    return {"usdc": format_plain(units), "atomic": units}


#: claims of a key a request makes while twins holding it keep failing and releasing it
CLAIM_ATTEMPTS = 3


async def _to_the_end(fn: Callable[..., object], *args: Any) -> None:
    """``fn(*args)`` in a worker thread, carried to its end even if the awaiting request
    is cancelled meanwhile (a forced shutdown): the thread is not given up, only waited
    for. A process that dies first leaves a claim that ``CLAIM_LEASE_S`` expires."""
    await asyncio.shield(asyncio.get_running_loop().run_in_executor(None, fn, *args))


def _public_id(public_id: str) -> str:
    """A session named in a URL: by its public id only. A token there would end up in
    proxies' and access logs, and it spends: it goes in X-Drip-Session."""
    if public_id.startswith(TOKEN_PREFIX):
        raise errors.InvalidRequest(
            "name a session by its public id in a URL; its token is sent only as "
            "X-Drip-Session", param="public_id",
        )  # fmt: skip
    return public_id


def wallet_json(user: dict[str, Any]) -> dict[str, Any]:
    def atomic(value: Decimal) -> int:
        # from the digits: exact whatever the decimal context (scaleb rounds to its
        # precision); the SDK's amounts have at most 6 decimals
        sign, digits, exponent = value.as_tuple()
        assert isinstance(exponent, int) and exponent >= -6
        units: int = int("".join(map(str, digits)) or "0") * 10 ** (exponent + 6)
        return -units if sign else units

    return {
        "user_id": user["user_id"],
        "email": user["email"],
        "status": user["status"],
        "available": _money(atomic(user["balance_usdc"])),
        "posted": _money(atomic(user["posted_usdc"])),
        "pending": _money(atomic(user["pending_usdc"])),
        "metadata": user["metadata"],
    }


def create_app(config: DripConfig | None = None) -> FastAPI:
    config = config or DripConfig()
    client = DripClient(config)
    # the client's store as of each use: the lifespan closes the client at shutdown, and
    # an app served again (a second TestClient, a restart in-process) opens it afresh
    store = cast(Store, Live(lambda: client.ledger.store))
    keys = KeyStore(store)
    responses = Responses(store)
    checkouts = Checkouts(store)

    def legacy_lookup(
        key_id: str, idem_key: str, method: str, path: str, digest: str
    ) -> tuple[tuple[int, Any] | None, bool]:
        """A key as the previous release scoped it (per API key, ledger id
        ``idem:<api key id>:<key>``; a process of that release may still serve beside
        this one): its stored answer, and whether it was used at all (a record, a
        transfer or a checkout), so a retry runs under the old id. A few indexed
        lookups, for new keys only."""
        found, recorded = responses.lookup(key_id, idem_key, method, path, digest)
        if recorded:
            return found, True
        legacy_id = f"idem:{key_id}:{idem_key}"
        used = store.get_transfer(legacy_id) is not None or checkouts.exists_for(legacy_id)
        return None, used

    registry = CollectorRegistry()
    requests_total = Counter(
        "drip_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry
    )
    latency = Histogram(
        "drip_http_request_duration_seconds", "HTTP request latency", ["route"],
        registry=registry,
    )  # fmt: skip

    http_log = request_logger()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        client.close()

    app = FastAPI(
        title="Drip",
        version="0.1.0",
        description="Prepaid wallets and metered billing for APIs and AI agents.",
        lifespan=lifespan,
        # documented as sent: every error is DESIGN section 6's shape (FastAPI's default
        # 422 schema, {"detail": [...]}, is not what Drip answers)
        responses=_ERROR_RESPONSES,
    )
    # before any route runs: a body too large is refused before the key is looked at
    app.add_middleware(BodyLimit, max_bytes=BODY_BYTES_MAX)
    app.state.client = client
    app.state.keys = keys

    @app.exception_handler(errors.DripError)
    async def drip_error(_: Request, exc: errors.DripError) -> JSONResponse:
        if exc.param in _LEDGER_PARAMS:  # the ledger's name for what the request calls so
            exc.param = _LEDGER_PARAMS[exc.param]
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        found = list(exc.errors())
        # a misspelled field ({"amout": ...}) is named first, before the missing one
        found.sort(key=lambda e: e.get("type") != "extra_forbidden")
        first = found[0] if found else {}

        def name(e: Any) -> str | None:
            loc = tuple(e.get("loc", ()))
            if loc and loc[0] in _LOCATIONS:  # "query.bucket_s" is the client's "bucket_s"
                loc = loc[1:]
            return ".".join(str(p) for p in loc) or None

        where = name(first)
        message = str(first.get("msg", "invalid request"))
        if first.get("type") == "json_invalid":  # its "loc" is a character position
            where = None
        elif first.get("type") == "extra_forbidden":
            missing = [name(e) for e in found if e.get("type") == "missing"]
            message = f"unknown field {where!r}: this request has no such field" + (
                f" (required: {', '.join(map(str, missing))})" if missing else ""
            )
        err = errors.InvalidRequest(message, param=where)
        body = err.to_dict()
        body["error"]["code"] = "validation_error"
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = errors.NotFound if exc.status_code == 404 else errors.InvalidRequest
        err = kind(str(exc.detail))
        # a 405's Allow, for one: the headers the exception carries are the response's
        return JSONResponse(err.to_dict(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, _DATABASE_ERRORS):  # a read that found the database down
            log.error("database unavailable: %s", type(exc).__name__)
            return _error_response(errors.StoreError("the database is unavailable; retry later"))
        log.exception("unhandled error")
        err = errors.DripError("internal error; retry with the same Idempotency-Key")
        body = err.to_dict()
        body["error"]["code"] = "internal_error"
        rid = _request_id.get()
        return JSONResponse(body, status_code=500,
                            headers={"X-Request-ID": rid} if rid else None)  # fmt: skip

    @app.middleware("http")
    async def observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        began = time.perf_counter()
        given = request.headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        # each request runs in a context of its own: left set for the 500 handler, which
        # runs outside this middleware, and for every log line of the request
        _request_id.set(rid)
        structlog.contextvars.bind_contextvars(request_id=rid)
        method = request.method if request.method in _METHODS else "other"  # bounded labels
        status = 500  # unless a response comes back: an exception is answered 500 outside
        try:
            response = await call_next(request)
            status = response.status_code
            response.headers["X-Request-ID"] = rid
            return response
        except ClientDisconnect:
            status = 499  # the client left mid-request: not a server error
            raise
        finally:
            name = getattr(request.scope.get("route"), "path", "unmatched")
            elapsed_s = time.perf_counter() - began
            requests_total.labels(method, name, str(status)).inc()
            latency.labels(name).observe(elapsed_s)
            http_log.info("request", method=method, route=name, status=status,
                          duration_ms=round(elapsed_s * 1000, 3))  # fmt: skip

    # declared as the OpenAPI security scheme; a missing or non-Bearer header gives None,
    # which ``authenticate`` answers with Drip's own 401
    bearer = HTTPBearer(auto_error=False, description="An API key from `drip keys create`")

    def need(scope: str) -> Callable[..., ApiKey]:
        def check(
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        ) -> ApiKey:
            token = credentials.credentials.strip() if credentials is not None else None
            key = keys.authenticate(token)
            if scope == "admin" and key.scope != "admin":
                raise Forbidden("this key may only read (scope 'read')")
            return key

        return check

    Reader = Annotated[ApiKey, Depends(need("read"))]
    Admin = Annotated[ApiKey, Depends(need("admin"))]
    IdemKey = Annotated[str | None, Header(alias="Idempotency-Key")]

    async def once(
        key: ApiKey, idem: str | None, request: Request, body: Any,
        run: Callable[[str], Awaitable[tuple[int, Any]]],
    ) -> JSONResponse:  # fmt: skip
        """Run a money-moving request at most once per Idempotency-Key: the key is claimed
        first, so a concurrent twin gets a 409 instead of running too."""
        idem_key = check_key(idem)
        method, path = request.method, request.url.path
        if not path.isprintable():  # a %00 in a path id: no such resource (and no record)
            raise errors.NotFound("no such resource")
        digest = Responses.body_digest(method, path, body)
        # the records are database round trips: off the event loop, as every read here
        record = (SERVICE_SCOPE, idem_key, method, path, digest)
        found = await run_in_threadpool(responses.find, *record)
        run_id = f"req:{idem_key}"
        if found is None:  # keys were once the API key's: look there too
            found, legacy = await run_in_threadpool(
                legacy_lookup, key.key_id, idem_key, method, path, digest
            )
            if legacy:  # a request that died after (perhaps) moving money: run it under
                run_id = f"idem:{key.key_id}:{idem_key}"  # its old id, answered as a replay
        token = None
        for _ in range(CLAIM_ATTEMPTS if found is None else 0):
            token = await run_in_threadpool(responses.claim, *record)
            if token is not None:
                break
            # claimed by a twin: its response, or a 409 while it runs (``find`` raises);
            # none means the twin failed and released the key just now: claim again
            found = await run_in_threadpool(responses.find, *record)
            if found is not None:
                break
        if token is not None:
            try:
                found = await run(run_id)
            except BaseException:
                await _to_the_end(responses.release, SERVICE_SCOPE, idem_key, token)
                raise
            await _to_the_end(responses.complete, SERVICE_SCOPE, idem_key, token, *found)
        if found is None:
            raise IdempotencyInProgress(
                "a request with this Idempotency-Key just failed; retry",
                param="Idempotency-Key", retry_after_s=1,
            )  # fmt: skip
        status, payload = found
        return JSONResponse(payload, status_code=status)

    add_charge_routes(app, client, once, Admin)
    add_endpoint_routes(app, store, Admin)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        client.ledger.store.query("SELECT 1")
        return {"status": "ok"}

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/wallets", tags=["wallets"], status_code=201)
    async def create_wallet(
        body: WalletCreate, key: Admin, request: Request, idem: IdemKey = None
    ) -> JSONResponse:
        """Provision a user's wallet. Idempotent by user id; the key is optional here."""
        if body.user_id in _DOT_SEGMENTS:  # /v1/wallets/.. is /v1/ to any HTTP client
            raise errors.InvalidId(f"user_id may not be {body.user_id!r}: no URL path can "
                                   "name it", param="user_id")  # fmt: skip
        credit_amount(body.initial_balance, "initial_balance", allow_zero=True)

        async def run(_: str) -> tuple[int, Any]:
            user = await client.provision_user(
                body.user_id, email=body.email, initial_balance=body.initial_balance,
                metadata=body.metadata,
            )  # fmt: skip
            return 201, wallet_json(user)

        if idem is None:
            status, payload = await run("")
            return JSONResponse(payload, status_code=status)
        return await once(key, idem, request, body.model_dump(mode="json"), run)

    @app.get("/v1/wallets", tags=["wallets"])
    def list_wallets(
        _: Reader,
        request: Request,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        after: Annotated[str | None, Query(max_length=150)] = None,
    ) -> dict[str, Any]:
        single_query_params(request)
        users = client.list_users_now(after=after, limit=limit)
        more = len(users) == limit
        return {
            "data": [wallet_json(u) for u in users],
            "next_after": users[-1]["user_id"] if more and users else None,
        }

    @app.get("/v1/wallets/{user_id}", tags=["wallets"])
    def get_wallet(user_id: str, _: Reader) -> dict[str, Any]:
        return wallet_json(client.get_user_now(user_id))

    @app.post("/v1/wallets/{user_id}/topup", tags=["wallets"])
    async def topup(
        user_id: str, body: TopUp, key: Admin, request: Request, idem: IdemKey = None
    ) -> JSONResponse:
        """Credit the wallet (resumes a paused user). Requires Idempotency-Key."""
        credit_amount(body.amount, "amount")
        wallet_id(user_id)

        async def run(transfer_id: str) -> tuple[int, Any]:
            transfer = await client.topup(user_id, body.amount, idempotency_key=transfer_id)
            user = await run_in_threadpool(client.get_user_now, user_id)
            return 200, {"transfer_id": transfer.id, "amount": _money(transfer.amount),
                         "wallet": wallet_json(user)}  # fmt: skip

        return await once(key, idem, request, body.model_dump(mode="json"), run)

    @app.post("/v1/wallets/{user_id}/adjust", tags=["wallets"])
    async def adjust(
        user_id: str, body: Adjust, key: Admin, request: Request, idem: IdemKey = None
    ) -> JSONResponse:
        """A signed correction with a reason, recorded against the funding account."""
        amount = parse_amount(body.amount, allow_zero=False, allow_negative=True)
        if amount > 0:  # a credit; a debit is bounded by the wallet's balance
            credit_amount(body.amount, "amount")
        wallet = wallet_id(user_id)
        led = client.ledger
        funding = funding_account_id(led.asset.symbol)

        async def run(transfer_id: str) -> tuple[int, Any]:
            debit, credit = (funding, wallet) if amount > 0 else (wallet, funding)
            with user_errors(user_id, "adjustment"):
                if (await run_in_threadpool(led.account, wallet)).kind != AccountKind.WALLET:
                    raise errors.UserNotFound(f"no user {user_id!r}", param="user_id")
                transfer = await led.transfer(transfer_id, debit, credit, abs(amount),
                                              code="adjustment",
                                              metadata={"reason": body.reason})  # fmt: skip
            signed = transfer.amount if amount > 0 else -transfer.amount
            user = await run_in_threadpool(client.get_user_now, user_id)
            return 200, {"transfer_id": transfer.id, "amount": _money(signed),
                         "reason": body.reason, "wallet": wallet_json(user)}  # fmt: skip

        return await once(key, idem, request, body.model_dump(mode="json"), run)

    @app.post("/v1/sessions", tags=["sessions"], status_code=201)
    async def create_session(body: SessionCreate, _: Admin) -> dict[str, Any]:
        """A budget on a user's wallet for one provider. The response's ``token`` is the
        ``X-Drip-Session`` value, shown only here; a retry opens another session."""
        # the session's facts are stored with its account, within the metadata limit: a
        # policy too large for it is refused as the policy, before anything is created
        facts = session_specs(body.user_id, body.provider, body.budget, body.expires_in_s,
                              body.policy)[1]  # fmt: skip
        encode_metadata(facts.metadata(), param="policy")
        session = await client.create_session(
            body.user_id, body.provider, body.budget, expires_in=body.expires_in_s,
            policy=body.policy,
        )  # fmt: skip
        state = await client.get_session(session.public_id)
        return {"token": session.id} | session_json(state)

    @app.get("/v1/sessions/current", tags=["sessions"])
    def current_session(
        token: Annotated[str, Header(alias="X-Drip-Session")],
    ) -> dict[str, Any]:
        """The state of the session whose token is sent (no API key needed)."""
        return session_json(
            client.get_session_now(token) if token.startswith("ds_") else _no_session()
        )

    @app.get("/v1/sessions/{public_id}", tags=["sessions"])
    def get_session(public_id: str, _: Reader) -> dict[str, Any]:
        return session_json(client.get_session_now(_public_id(public_id)))

    @app.post("/v1/sessions/{public_id}/close", tags=["sessions"])
    async def close_session(public_id: str, _: Admin) -> dict[str, Any]:
        return session_json(await client.close_session(_public_id(public_id)))

    @app.post("/v1/checkout", tags=["top-ups"], status_code=201)
    async def create_checkout(
        body: CheckoutCreate, key: Admin, request: Request, idem: IdemKey = None
    ) -> JSONResponse:
        """A pending top-up; a signed payment webhook naming its id credits the wallet."""
        amount = credit_amount(body.amount, "amount")
        if config.stripe_webhook_secret is not None and amount % ATOMIC_PER_CENT:
            # Stripe charges whole cents: such a checkout could be paid but never credited
            raise errors.InvalidAmount(
                "top-ups paid through Stripe are whole cents (at most 2 decimals)",
                param="amount",
            )
        await run_in_threadpool(client.get_user_now, body.user_id)

        async def run(request_id: str) -> tuple[int, Any]:
            checkout = await run_in_threadpool(checkouts.create, body.user_id, amount, request_id)
            return 201, checkout.to_json()

        if idem is None:
            status, payload = await run("")
            return JSONResponse(payload, status_code=status)
        return await once(key, idem, request, body.model_dump(mode="json"), run)

    @app.get("/v1/checkout/{checkout_id}", tags=["top-ups"])
    def get_checkout(checkout_id: str, _: Reader) -> dict[str, Any]:
        return checkouts.get(checkout_id).to_json()

    async def settle(payment: Payment, currencies: tuple[str, ...]) -> dict[str, Any]:
        checkout = await run_in_threadpool(checkouts.get, payment.checkout_id)
        if payment.currency not in currencies or payment.amount != checkout.amount:
            log.warning("webhook %s: paid %s %s for checkout %s of %s; refused",
                        payment.event_id, payment.amount, payment.currency, checkout.id,
                        checkout.amount)  # fmt: skip
            raise PaymentMismatch(
                "the paid amount or currency does not match the checkout; nothing credited",
                param="amount",
            )
        transfer = await client.topup(
            checkout.user_id, to_decimal(checkout.amount), idempotency_key=f"checkout:{checkout.id}"
        )
        # a replay resumes nobody, even on a checkout still marked pending (a delivery
        # that stopped between its credit and marking it paid, or a twin running now):
        # the credit resumed the user in its own transaction, and whoever paused them
        # since (an operator's hold) must not be overruled by a duplicate delivery
        await run_in_threadpool(checkouts.mark_paid, checkout.id, payment.event_id)
        return {"received": True, "credited": _money(transfer.amount),
                "checkout_id": checkout.id, "transfer_id": transfer.id,
                "replayed": transfer.replayed}  # fmt: skip

    @app.post("/v1/webhooks/stripe", tags=["top-ups"])
    async def stripe_webhook(request: Request) -> dict[str, Any]:
        """Stripe's ``checkout.session.completed`` for a Drip checkout credits it once."""
        if config.stripe_webhook_secret is None:
            raise errors.NotFound("the Stripe webhook is not configured")
        event = verify_stripe(
            await webhook_body(request), request.headers.get("stripe-signature"),
            config.stripe_webhook_secret.get_secret_value(), config.webhook_tolerance_s,
        )  # fmt: skip
        payment = stripe_payment(event)
        if payment is None:
            return {"received": True, "ignored": event_type(event)}
        return await settle(payment, ("USD",))

    @app.post("/v1/webhooks/standard", tags=["top-ups"])
    async def standard_webhook(request: Request) -> dict[str, Any]:
        """A Standard Webhooks ``checkout.paid`` message credits its checkout once."""
        if config.webhook_secret is None:
            raise errors.NotFound("the Standard Webhooks endpoint is not configured")
        message = verify_standard(await webhook_body(request), dict(request.headers),
                                  config.webhook_secret.get_secret_value())  # fmt: skip
        payment = standard_payment(message, request.headers["webhook-id"])
        if payment is None:
            return {"received": True, "ignored": event_type(message)}
        return await settle(payment, ("USDC",))

    @app.get("/v1/usage", tags=["usage"], response_model=None)
    def usage(
        _: Reader,
        request: Request,
        user_id: Annotated[str | None, Query(max_length=150)] = None,
        event: Annotated[str | None, Query(max_length=64)] = None,
        since_us: Annotated[int | None, Query(ge=0)] = None,
        until_us: Annotated[int | None, Query(ge=0)] = None,
        bucket_s: Annotated[int, Query(ge=60, le=31 * 86_400)] = 86_400,
        format: Annotated[str, Query(pattern="^(json|csv)$")] = "json",
    ) -> dict[str, Any] | Response:
        """Charged calls and USDC per event and time bucket; ``format=csv`` for a file."""
        single_query_params(request)
        unknown = sorted(set(request.query_params) - _USAGE_PARAMS)
        if unknown:  # e.g. route= or model=: silently unfiltered totals would mislead
            raise errors.InvalidRequest(
                f"usage has no filter {unknown[0]!r} (filters: user_id, event, since_us, "
                "until_us)", param=unknown[0],
            )  # fmt: skip
        if since_us is not None and until_us is not None and since_us > until_us:
            raise errors.InvalidRequest("since_us is after until_us", param="since_us")
        rows = client.usage_now(user_id, since_us=since_us, until_us=until_us, bucket_s=bucket_s,
                            event=event)  # fmt: skip
        if format == "csv":
            return Response(
                usage_csv(rows),
                media_type="text/csv",
                headers={"Content-Disposition": 'attachment; filename="usage.csv"'},
            )
        return {"data": [{"event": r.code, "bucket_start_us": r.bucket_start_us,
                          "calls": r.calls, "amount": _money(r.amount)} for r in rows]}  # fmt: skip

    @app.get("/v1/wallets/{user_id}/transfers", tags=["wallets"])
    def wallet_transfers(
        user_id: str,
        _: Reader,
        request: Request,
        event: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: Annotated[str | None, Query(max_length=64)] = None,
    ) -> dict[str, Any]:
        """The wallet's journal, newest first; pass ``next_cursor`` back for more."""
        single_query_params(request)
        client.get_user_now(user_id)
        page = client.ledger.history(wallet_id(user_id), code=event, limit=limit, cursor=cursor)
        return {"data": [transfer_json(t) for t in page.items], "next_cursor": page.next_cursor}

    openapi = app.openapi

    def openapi_with_required_keys() -> dict[str, Any]:
        """The header is declared optional (its absence gets Drip's own 400, not a bare
        422) but is required wherever money moves: say so in the schema."""
        fresh = app.openapi_schema is None
        schema = openapi()
        if fresh:
            for path, operations in schema.get("paths", {}).items():
                for method, operation in operations.items():
                    for param in operation.get("parameters", []):
                        if (param.get("name") == "Idempotency-Key"
                                and (method, path) not in _IDEMPOTENCY_OPTIONAL):  # fmt: skip
                            param["required"] = True
        return schema

    app.openapi = openapi_with_required_keys  # type: ignore[method-assign]
    return app
