"""``DripMeter``: pure-ASGI metering for a provider's routes.

identify payer -> price -> hold -> run -> capture / void -> headers

- The payer is the session in ``X-Drip-Session`` (or whatever ``payer=`` returns: a
  user id, from state an authentication layer that runs first has set, never from a
  header the client chooses). No payer, or a payer that cannot afford the route's
  maximum, gets a 402 with Drip's JSON error; the handler never runs.
- A route costs ``per_call`` plus ``per_unit`` times the units the handler reports
  (``report_units(scope, n)``, or ``request.state.drip_units = n`` in Starlette/FastAPI),
  at most ``max_units``. The hold is the maximum; the capture is the actual cost.
- The response's start is held back only until its first body chunk. A complete
  response (one chunk, or a first chunk holding all of the ``content-length``, as
  Starlette's ``BaseHTTPMiddleware`` re-sends one) is captured before it is sent, so it
  carries ``X-Drip-Charged``, ``X-Drip-Balance`` (left out if it cannot be read) and
  ``X-Drip-Receipt``. A streamed response is sent as it comes
  (with ``X-Drip-Receipt`` and ``X-Drip-Max-Charge``) and captured just before its last
  chunk is sent; if the client goes away first, what the handler reported is charged.
- An error status (>= 400), a redirect (3xx, unless the price says ``charge_redirects``)
  or an exception before the response starts voids the hold.
- The most specific price wins (exact keys before globs, then the longest glob). A key
  without a method does not price ``OPTIONS`` (CORS preflights). A path is priced with
  the wrapped app's own ``root_path`` (``FastAPI(root_path=...)``) stripped too. A
  websocket on a priced path is refused at its handshake.
Nothing here reads a body into memory.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Generic, TypeVar

from drip import errors
from drip.ledger import Charge, Transfer
from drip.ledger.ledger import Cap
from drip.ledger.types import DERIVED_SEP, check_code
from drip.metering.client import DripClient, new_call_id
from drip.metering.meter import capture_async, settling_failed
from drip.money import AMOUNT_ATOMIC_MAX, AmountLike, format_plain, parse_amount

log = logging.getLogger("drip.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SESSION_HEADER = b"x-drip-session"
UNITS_KEY = "drip_units"
#: what carries a response's body (the last two are ASGI extensions some servers offer)
BODY_MESSAGES = ("http.response.body", "http.response.pathsend", "http.response.zerocopysend")

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Price:
    """What one call of a route costs, in atomic units."""

    event: str
    per_call: int = 0
    per_unit: int = 0
    max_units: int = 0
    #: whether a 3xx answer is charged (by default a redirect delivers nothing: voided)
    charge_redirects: bool = False

    def __post_init__(self) -> None:
        """The rules ``price()`` applies, for a ``Price`` built directly: one the ledger
        would refuse is a ``ConfigError`` at startup, not a 400 or a 500 on every call."""
        event = self.event
        try:
            check_code(event, "event")
        except errors.DripError as exc:
            raise errors.ConfigError(f"Price({event!r}): {exc.message}") from None
        for name in ("per_call", "per_unit", "max_units"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise errors.ConfigError(f"Price({event!r}): {name} must be an int >= 0 "
                                         f"(atomic units), not {value!r}")  # fmt: skip
        if type(self.charge_redirects) is not bool:
            raise errors.ConfigError(f"Price({event!r}): charge_redirects must be a bool")
        if self.per_unit and self.max_units <= 0:
            raise errors.ConfigError(f"price({event!r}): per_unit needs max_units > 0")
        if self.hold <= 0:
            raise errors.ConfigError(f"price({event!r}) must cost something")
        if self.hold > AMOUNT_ATOMIC_MAX:
            raise errors.ConfigError(f"price({event!r}): the hold (per_call + per_unit * "
                                     "max_units) is more than the ledger can hold")  # fmt: skip

    @property
    def hold(self) -> int:
        return self.per_call + self.per_unit * self.max_units

    def cost(self, units: int) -> int:
        return self.per_call + self.per_unit * max(0, min(units, self.max_units))


def price(
    event: str,
    per_call: AmountLike | None = None,
    *,
    per_unit: AmountLike | None = None,
    max_units: int = 0,
    charge_redirects: bool = False,
) -> Price:
    """A route's price: ``price("search", "0.007")`` or
    ``price("tokens", per_unit="0.000002", max_units=4096)``. A 3xx answer is not
    charged unless ``charge_redirects`` (a route whose product is the redirect)."""
    check_code(event, "event")
    fixed = parse_amount(per_call, param="per_call") if per_call is not None else 0
    unit = parse_amount(per_unit, param="per_unit") if per_unit is not None else 0
    if unit and (not isinstance(max_units, int) or max_units <= 0):
        raise errors.ConfigError(f"price({event!r}): per_unit needs max_units > 0")
    # Price checks the rest (it costs something, the ledger can hold it)
    return Price(event, fixed, unit, max_units if unit else 0, bool(charge_redirects))


def report_units(scope: Scope, units: int) -> None:
    """Tell the middleware how many units this call used so far (call it as they accrue)."""
    if not isinstance(units, int) or isinstance(units, bool) or units < 0:
        raise errors.InvalidRequest("units must be a non-negative int", param="units")
    scope.setdefault("state", {})[UNITS_KEY] = units


class RouteTable(Generic[V]):
    """``"METHOD /path"`` or ``"/path"`` keys (``*`` globs allowed) to prices.

    The most specific key wins, whatever the table's order: an exact key for any path the
    request is priced under (see ``scope_paths``) and any of its methods, before any glob;
    among globs, the one with the most literal characters (then the one naming a method).
    A key without a method does not price ``OPTIONS`` (CORS preflights carry no payer):
    only a key naming ``OPTIONS`` does. ``app`` is the wrapped app: a ``root_path`` it sets
    itself is stripped too (see ``app_root_paths``).
    """

    def __init__(
        self, table: Mapping[str, V], kind: type[V], made_by: str, *, app: object = None
    ) -> None:
        self.app = app
        self.exact: dict[tuple[str, str], V] = {}
        self.patterns: list[tuple[str, str, V]] = []
        for key, value in table.items():
            if not isinstance(value, kind):
                raise errors.ConfigError(f"route {key!r}: the price must be {made_by}")
            if not isinstance(key, str):
                raise errors.ConfigError(f"route {key!r} must be a string")
            method, _, path = key.partition(" ") if " " in key else ("*", "", key)
            method = method.strip().upper() or "*"
            path = path.strip()
            if not path.startswith("/"):
                raise errors.ConfigError(f"route {key!r} must name a path starting with /")
            if not (method == "*" or method.isalpha()):
                raise errors.ConfigError(f"route {key!r}: {method!r} is not an HTTP method")
            if "*" in path or "?" in path or "[" in path:
                self.patterns.append((method, path, value))
            elif (method, path) in self.exact:
                raise errors.ConfigError(f"route {key!r} is priced twice")
            else:
                self.exact[(method, path)] = value
        self.patterns.sort(key=lambda p: (-_literal_chars(p[1]), p[0] == "*"))

    def find(self, method: str, paths: tuple[str, ...]) -> V | None:
        methods = request_methods(method)
        any_method = "OPTIONS" not in methods  # "/path" means any method but OPTIONS
        for path in paths:
            for m in methods:
                found = self.exact.get((m, path))
                if found is not None:
                    return found
            found = self.exact.get(("*", path)) if any_method else None
            if found is not None:
                return found
        for m, pattern, value in self.patterns:
            if (m == "*" and not any_method) or (m != "*" and m not in methods):
                continue
            if any(fnmatch.fnmatchcase(path, pattern) for path in paths):
                return value
        return None

    def for_scope(self, scope: Scope) -> V | None:
        roots = app_root_paths(self.app) if self.app is not None else ()
        # a websocket handshake is a GET
        return self.find(str(scope.get("method") or "GET"), scope_paths(scope, roots))


def _literal_chars(pattern: str) -> int:
    return len(re.sub(r"\[[^\]]*\]|[*?]", "", pattern))


def request_methods(method: str) -> tuple[str, ...]:
    """The methods a request is priced under, in order: HEAD also as GET (Starlette
    answers HEAD with the GET handler)."""
    method = method.upper()
    return (method, "GET") if method == "HEAD" else (method,)


def scope_paths(scope: Scope, app_roots: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The paths a request is priced under, most specific first: the path without a
    ``root_path`` the wrapped app sets itself (``app_roots``: it routes on that), the one
    the app routes on (without a Mount's or proxy's prefix), then the full path (price
    tables written with it)."""
    path = str(scope["path"])
    stripped = (strip_root(path, root) for root in app_roots)
    return tuple(dict.fromkeys((*stripped, route_path(scope), path)))


def route_path(scope: Scope) -> str:
    """The path the app routes on: ``path`` without the ``root_path`` prefix (a proxy's
    prefix, or a ``Mount``: servers and Starlette put it in both), as Starlette does."""
    return strip_root(str(scope["path"]), str(scope.get("root_path") or ""))


def strip_root(path: str, root: str) -> str:
    """``path`` without the prefix ``root``, as Starlette's routing strips it."""
    if not root or not path.startswith(root):
        return path
    rest = path[len(root) :]
    if not rest:
        return "/"
    return rest if rest.startswith("/") else path


#: how many ``.app`` links ``app_root_paths`` follows
APP_CHAIN_MAX = 16


def app_root_paths(app: object) -> tuple[str, ...]:
    """The ``root_path`` attributes of the wrapped app and of the apps it wraps (``.app``),
    innermost first: ``FastAPI(root_path="/api")`` puts its own in the scope inside its
    ``__call__``, after the middleware priced the request, and routes without it (the
    innermost app that sets one has the last word)."""
    roots: list[str] = []
    for _ in range(APP_CHAIN_MAX):
        root = getattr(app, "root_path", None)
        if isinstance(root, str) and root and root not in roots:
            roots.append(root)
        app = getattr(app, "app", None)
        if app is None:
            break
    return tuple(reversed(roots))


def _whole_units(value: object) -> int | None:
    """Units given as ``3.0`` or ``Decimal(3)`` are 3; ``True``, ``2.5`` or ``"3"`` are
    not units at all."""
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Decimal) and not value.is_finite():
        return None
    whole = int(value)
    return whole if whole == value and whole >= 0 else None


def _whole_body(start: Message, message: Message) -> bool:
    """Whether a body chunk is the whole body the start's ``content-length`` announces."""
    for key, value in start.get("headers", ()):
        if bytes(key).lower() == b"content-length":
            text = bytes(value).decode("latin-1").strip()
            body = message.get("body") or b""
            return text.isascii() and text.isdigit() and int(text) == len(body)
    return False


def _error_body(exc: errors.DripError) -> bytes:
    return json.dumps(exc.to_dict()).encode()


class DripMeter:
    """Wrap an ASGI app: ``app = DripMeter(app, client=client, routes={...})``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        client: DripClient,
        routes: Mapping[str, Price],
        payer: Callable[[Scope], str | None] | None = None,
        on_402: Callable[[Scope], list[tuple[bytes, bytes]]] | None = None,
    ) -> None:
        self.app = app
        self.client = client
        self.routes = RouteTable(routes, Price, "drip.asgi.price(...)", app=app)
        self.payer = payer
        #: extra headers for a 402 refusal (``X402Meter`` adds ``PAYMENT-REQUIRED``)
        self.on_402 = on_402

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket" and self.routes.for_scope(scope) is not None:
                await refuse_websocket(receive, send)
                return
            await self.app(scope, receive, send)
            return
        route = self.routes.for_scope(scope)
        if route is None:
            await self.app(scope, receive, send)
            return
        await self.metered(scope, receive, send, route)

    async def metered(self, scope: Scope, receive: Receive, send: Send, route: Price) -> None:
        """Hold, run, capture: one call of a priced route."""
        try:
            call = await self._hold(scope, route)
        except errors.DripError as exc:
            extra = self.on_402(scope) if exc.status == 402 and self.on_402 is not None else []
            await self._refuse(send, exc, extra)
            return
        await call.run(self.app, scope, receive, send)

    def has_payer(self, scope: Scope) -> bool:
        """Whether the request names a Drip payer (a session, or the ``payer=`` resolver's)."""
        if self.payer is not None and self.payer(scope) is not None:
            return True
        return header(scope, SESSION_HEADER) is not None

    async def _hold(self, scope: Scope, route: Price) -> _MeteredCall:
        client = self.client
        user_id = self.payer(scope) if self.payer is not None else None
        token = None if user_id is not None else header(scope, SESSION_HEADER)
        wallet, caps, refusals = await client.payer_async(
            user_id=user_id, session=token, event=route.event, amount=route.hold
        )
        led = client.ledger
        with refusals:
            hold = await led.hold(
                new_call_id("http"), wallet, client.revenue_account, route.hold,
                code=route.event, timeout_s=client.config.hold_timeout_s, caps=caps,
                private=True,  # captured or voided here; its id is not handed out first
            )  # fmt: skip
        return _MeteredCall(client, route, hold, caps)

    @staticmethod
    async def _refuse(send: Send, exc: errors.DripError,
                      extra: list[tuple[bytes, bytes]] | None = None) -> None:  # fmt: skip
        headers = [(b"content-type", b"application/json"), *(extra or [])]
        if exc.status == 429 and "retry_after_s" in exc.details:
            headers.append((b"retry-after", str(exc.details["retry_after_s"]).encode()))
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": _error_body(exc)})


async def refuse_websocket(receive: Receive, send: Send) -> None:
    """A websocket on a priced path is closed at its handshake (the server answers 403):
    metering holds and captures per HTTP request, and a socket is not one."""
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close", "code": 1008,
                    "reason": "this route is metered per HTTP request"})  # fmt: skip


def header(scope: Scope, name: bytes) -> str | None:
    """A request header's value (first occurrence), or None."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class _MeteredCall:
    """One held call: runs the app, then captures or voids exactly once."""

    def __init__(self, client: DripClient, route: Price, hold: Transfer, caps: list[Cap]) -> None:
        self.client = client
        self.route = route
        self.hold = hold
        self.caps = caps
        self.settled = False
        self.start: Message | None = None
        self.status = 0
        self.streaming = False
        self.scope: Scope = {}

    @property
    def receipt(self) -> str:
        return f"{self.hold.id}{DERIVED_SEP}post"

    def units(self) -> int:
        value = self.scope.get("state", {}).get(UNITS_KEY, 0)
        if type(value) is int and value >= 0:
            return value
        units = _whole_units(value)
        if units is None:
            log.error("route %r: drip_units must be a whole number >= 0, got %r; charging "
                      "the per-call price only", self.route.event, value)  # fmt: skip
            return 0
        return units

    async def capture(self) -> Charge | None:
        self.settled = True
        units, route = self.units(), self.route
        if route.per_unit and units > route.max_units:
            log.warning("route %r: %d units reported, more than max_units=%d; charging the "
                        "maximum", route.event, units, route.max_units)  # fmt: skip
        return await capture_async(self.client.ledger, self.hold, route.cost(units), self.caps)

    async def void(self) -> None:
        self.settled = True
        with settling_failed(self.hold):  # expired meanwhile: it reserves nothing already
            await self.client.ledger.void(self.hold, caps=self.caps)

    async def run(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        scope.setdefault("state", {})

        async def metered_send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                self.start = message
                self.status = int(message["status"])
                return
            if kind in BODY_MESSAGES:
                # pathsend (a file the server sends itself) is the whole body at once
                more = kind != "http.response.pathsend" and bool(message.get("more_body"))
                if self.start is not None:
                    start, self.start = self.start, None
                    if (more and kind == "http.response.body" and not self.route.per_unit
                            and _whole_body(start, message)):  # fmt: skip
                        # a complete response re-sent as a stream (Starlette's
                        # BaseHTTPMiddleware: the body, then an empty last chunk): captured
                        # before it is sent; the empty chunk then passes as it is. Not for a
                        # per-unit price: a stream may report its units after its bytes
                        more = False
                    await send(await self._headers(start, more=more))
                elif self.streaming and not more and not self.settled:
                    # the stream's end: capture first, so the receipt exists when it arrives
                    await self.capture()
            await send(message)

        try:
            await app(scope, receive, metered_send)
        except BaseException:
            if not self.settled:
                # nothing sent yet: the call failed, release it; mid-stream: charge what ran
                await (self.capture() if self.streaming else self.void())
            raise
        if self.start is not None:  # a response with no body message at all
            start, self.start = self.start, None
            await send(await self._headers(start, more=False))
            await send({"type": "http.response.body", "body": b""})
        if not self.settled:
            if self.streaming:
                await self.capture()  # the stream stopped early (client gone): pay what ran
            else:
                await self.void()  # the app never answered

    async def _balance(self) -> int:
        """What the payer has left: as this call's capture left it, from the ledger's
        memory; read (off the event loop on PostgreSQL) when it is not remembered."""
        led, wallet = self.client.ledger, self.hold.debit_account_id
        balance = led.remembered_balance(wallet)
        if balance is None:
            balance = await led.off_loop(led.balance, wallet)
        return balance.available

    async def _headers(self, start: Message, *, more: bool) -> Message:
        headers = list(start.get("headers", []))
        if self.status >= 400 or (self.status >= 300 and not self.route.charge_redirects):
            await self.void()
            headers.append((b"x-drip-charged", b"0"))
        elif not more:
            charge = await self.capture()
            headers.append(
                (b"x-drip-charged", format_plain(charge.amount if charge else 0).encode())
            )
            try:
                balance = await self._balance()
            except errors.DripError:
                # the call is captured: answer it (a 500 would invite a paid retry)
                log.exception("route %r: the balance after the capture could not be read; "
                              "X-Drip-Balance left out", self.route.event)  # fmt: skip
            else:
                headers.append((b"x-drip-balance", format_plain(balance).encode()))
            if charge is not None:
                headers.append((b"x-drip-receipt", charge.id.encode()))
        else:
            self.streaming = True
            headers += [
                (b"x-drip-receipt", self.receipt.encode()),
                (b"x-drip-max-charge", format_plain(self.route.hold).encode()),
            ]
        return {**start, "headers": headers}
