"""``/v1/charges`` and ``/v1/holds``: metering over HTTP for services that are not
Python or not behind the middleware.

The payer is a session (``X-Drip-Session``) or a user id in the body. Every call takes
an ``Idempotency-Key``; the ledger id of the charge or hold is derived from it, so a
retry, even one racing the original on another server process, moves money once.

(No ``from __future__ import annotations``: FastAPI reads these signatures.)
"""

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, cast

from fastapi import FastAPI, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt

from drip import errors
from drip.ledger import Charge, Ledger, Transfer, TransferFlags
from drip.ledger.ledger import Cap
from drip.ledger.types import DERIVED_SEP, TIMEOUT_S_MAX, check_id, encode_metadata
from drip.metering import DripClient, wallet_id
from drip.money import format_plain, parse_amount


def _exact_amount(value: object) -> object:
    """Amounts arrive as decimal strings, or whole USDC as JSON integers. A JSON number
    with a fraction is a binary float by the time it is parsed (``1.00000000000000001``
    reads as 1, ``90071992547.409921`` as ``...40993``), and ``true`` is not an amount."""
    if isinstance(value, bool):
        raise ValueError('amounts are decimal strings, e.g. "0.007": true/false is not one')
    if isinstance(value, float):
        raise ValueError(
            'amounts are decimal strings, e.g. "0.007" (or whole USDC as an integer): '
            "a JSON number with a fraction is not exact"
        )
    if isinstance(value, str) and "_" in value:  # "1_5" would be 15: no digit grouping here
        raise ValueError('amounts are plain decimal strings, e.g. "1000.50" (no "_")')
    return value


class Live:
    """Every attribute looked up on what ``get()`` returns at that moment."""

    __slots__ = ("_get",)

    def __init__(self, get: Callable[[], object]) -> None:
        self._get = get

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)


def _storable_metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the ledger would refuse (too large, too deep, not UTF-8) is a 422 before any
    work: metadata too deep to serialise back would break every read of its row."""
    try:
        encode_metadata(value)
    except errors.InvalidRequest as exc:
        raise ValueError(exc.message) from None
    return value


Metadata = Annotated[dict[str, Any] | None, AfterValidator(_storable_metadata)]

Amount = Annotated[
    str | int,
    BeforeValidator(_exact_amount),
    Field(description='USDC as a decimal string, e.g. "0.007"'),
]
Once = Callable[..., Awaitable[JSONResponse]]


class RequestBody(BaseModel):
    """A request body: a field it does not have (a typo such as ``amout``, a name from
    another API) is a 422 naming it, never silently dropped: ``{"amout": "0.01"}`` would
    otherwise capture the whole hold."""

    model_config = ConfigDict(extra="forbid")


class ChargeCreate(RequestBody):
    amount: Amount
    event: str = Field(min_length=1, max_length=64)
    user_id: str | None = Field(default=None, max_length=150)
    metadata: Metadata = None


class HoldCreate(ChargeCreate):
    timeout_s: StrictInt = Field(default=300, gt=0, le=TIMEOUT_S_MAX)


class Capture(RequestBody):
    amount: Amount | None = Field(default=None, description="Omit to capture the whole hold")


def _money(units: int) -> dict[str, Any]:
    return {"usdc": format_plain(units), "atomic": units}


def add_routes(app: FastAPI, client: DripClient, once: Once, admin: Any) -> None:
    """Mount the routes; ``admin`` is the dependency that requires an admin key."""
    SessionHeader = Annotated[str | None, Header(alias="X-Drip-Session")]
    IdemKey = Annotated[str | None, Header(alias="Idempotency-Key")]
    led = cast(Ledger, Live(lambda: client.ledger))  # reopened after a lifespan's end

    def caps_of(hold_id: str) -> list[Cap]:
        caps: list[Cap] = []
        while (cap := led.get_hold(f"{hold_id}{DERIVED_SEP}cap{len(caps)}")) is not None:
            caps.append(Cap(cap.debit_account_id, cap.credit_account_id))
        return caps

    def earlier(transfer_id: str, body: ChargeCreate, amount: int, session: str | None,
                held: bool) -> Transfer | None:  # fmt: skip
        """The transfer this very request made before (same payer, amount, event,
        metadata, kind), or None: then the ledger decides (a replay, or a conflict)."""
        done = led.get_transfer(transfer_id)
        if done is None:
            return None
        # the payer too: which session paid (its cap row) or that none did
        cap = led.get_transfer(f"{transfer_id}{DERIVED_SEP}cap0")
        try:
            info = client.session_info(session) if session else None
        except errors.DripError:
            return None
        if info is not None:
            user_id: str | None = info.user_id
            if cap is None or cap.debit_account_id != info.account_id:
                return None
        elif cap is not None:
            return None
        else:
            user_id = body.user_id
        timeout_s = body.timeout_s if isinstance(body, HoldCreate) else 0
        meta = None if body.metadata is None else encode_metadata(body.metadata)
        same = (
            user_id is not None and done.debit_account_id == wallet_id(user_id)
            and done.credit_account_id == client.revenue_account and done.amount == amount
            and done.code == body.event and done.metadata == meta
            and bool(done.flags & TransferFlags.PENDING) == held and done.timeout_s == timeout_s
        )  # fmt: skip
        return done if same else None

    def hold_json(hold: Transfer) -> dict[str, Any]:
        state = led.get_hold(hold.id)
        return {"hold_id": hold.id, "event": hold.code, "amount": _money(hold.amount),
                "state": ["pending", "posted", "voided", "expired"][state.state]
                if state is not None else "pending"}  # fmt: skip

    def charge_json(charge: Charge) -> dict[str, Any]:
        wallet = led.balance(charge.transfer.debit_account_id)
        return {"transfer_id": charge.id, "event": charge.transfer.code,
                "charged": _money(charge.amount),
                "fee": _money(charge.fee.amount if charge.fee else 0),
                "balance": _money(wallet.available)}  # fmt: skip

    @app.post("/v1/charges", tags=["metering"])
    async def create_charge(
        body: ChargeCreate, key: admin, request: Request,
        session: SessionHeader = None, idem: IdemKey = None,
    ) -> JSONResponse:  # fmt: skip
        """Charge now (no hold): 402 and nothing moved if the payer cannot afford it."""
        amount = parse_amount(body.amount, allow_zero=False)
        _check_payer(body, session)

        async def run(transfer_id: str) -> tuple[int, Any]:
            # a charge that went through (its answer was lost: a crash, a cancelled
            # request) is answered as it was, even if the session has expired since;
            # a different request with its key falls through to the ledger's conflict
            done = await run_in_threadpool(earlier, transfer_id, body, amount, session, False)
            if done is not None:
                fee = await run_in_threadpool(led.get_transfer, f"{transfer_id}{DERIVED_SEP}fee")
                return 200, await run_in_threadpool(charge_json, Charge(done, fee))
            wallet, caps, refusals = await client.payer_async(
                user_id=body.user_id, session=session, event=body.event, amount=amount
            )
            with refusals:
                charge = await led.charge(transfer_id, wallet, client.revenue_account, amount,
                                          code=body.event, metadata=body.metadata,
                                          caps=caps)  # fmt: skip
            return 200, await run_in_threadpool(charge_json, charge)

        return await once(key, idem, request, _keyed(body, session), run)

    @app.post("/v1/holds", tags=["metering"], status_code=201)
    async def create_hold(
        body: HoldCreate, key: admin, request: Request,
        session: SessionHeader = None, idem: IdemKey = None,
    ) -> JSONResponse:  # fmt: skip
        """Reserve the call's maximum before running it; capture or void it afterwards."""
        amount = parse_amount(body.amount, allow_zero=False)
        _check_payer(body, session)

        async def run(hold_id: str) -> tuple[int, Any]:
            done = await run_in_threadpool(earlier, hold_id, body, amount, session, True)
            if done is not None:  # as for charges
                return 201, await run_in_threadpool(hold_json, done)
            wallet, caps, refusals = await client.payer_async(
                user_id=body.user_id, session=session, event=body.event, amount=amount
            )
            with refusals:
                hold = await led.hold(hold_id, wallet, client.revenue_account, amount,
                                      code=body.event, timeout_s=body.timeout_s,
                                      metadata=body.metadata, caps=caps)  # fmt: skip
            return 201, await run_in_threadpool(hold_json, hold)

        return await once(key, idem, request, _keyed(body, session), run)

    @app.post("/v1/holds/{hold_id}/capture", tags=["metering"])
    async def capture(
        hold_id: str, key: admin, request: Request, body: Capture | None = None,
        idem: IdemKey = None,
    ) -> JSONResponse:  # fmt: skip
        """Capture up to the held amount; the rest is released at once. No body (or
        ``{}``) captures the whole hold."""
        _check_hold_id(hold_id)
        body = Capture() if body is None else body  # the same request (digest too) as {}
        amount = None if body.amount is None else parse_amount(body.amount)

        async def run(_: str) -> tuple[int, Any]:
            caps = await run_in_threadpool(caps_of, hold_id)
            charge = await led.post(hold_id, amount, caps=caps)
            return 200, await run_in_threadpool(charge_json, charge)

        return await once(key, idem, request, body.model_dump(mode="json"), run)

    @app.post("/v1/holds/{hold_id}/void", tags=["metering"])
    async def void(
        hold_id: str, key: admin, request: Request, idem: IdemKey = None
    ) -> JSONResponse:
        """Release the hold: nothing is charged."""
        _check_hold_id(hold_id)

        async def run(_: str) -> tuple[int, Any]:
            await led.void(hold_id, caps=await run_in_threadpool(caps_of, hold_id))
            hold = await run_in_threadpool(led.get_transfer, hold_id)
            if hold is None:  # pragma: no cover - void would have raised HoldNotFound
                raise errors.HoldNotFound(f"hold {hold_id!r} does not exist")
            return 200, await run_in_threadpool(hold_json, hold)

        return await once(key, idem, request, {}, run)


def _check_hold_id(hold_id: str) -> None:
    """A hold this API handed out: a valid id, and not a session's or route's half of a
    linked hold (``<hold>~cap0``), which settles with its hold, never alone."""
    check_id(hold_id, "hold_id")
    if DERIVED_SEP in hold_id:
        raise errors.HoldNotFound(f"hold {hold_id!r} does not exist", param="hold_id")


def _keyed(body: BaseModel, session: str | None) -> dict[str, Any]:
    """What an Idempotency-Key's request is compared on (the session only by digest)."""
    import hashlib

    fields = body.model_dump(mode="json")
    if session is not None:
        fields["session_sha256"] = hashlib.sha256(session.encode()).hexdigest()
    return fields


def _check_payer(body: ChargeCreate, session: str | None) -> None:
    """A charge names its payer: a session token, or a user id (both: the same user)."""
    if session is None and body.user_id is None:
        raise errors.InvalidRequest("send user_id or an X-Drip-Session token", param="user_id")
