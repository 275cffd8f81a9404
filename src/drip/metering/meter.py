"""The ``@meter`` decorator: hold before the call, capture after it, void on failure.

1. Find the payer: the argument named ``user_id_param`` (keyword or positional).
2. Hold the call's maximum cost on their wallet; if it does not fit, raise
   ``DripInsufficientCredits`` *before* the function runs.
3. Run the function. If it raises (or is cancelled), void the hold: nothing is charged
   (``void_on_error=False`` captures the full hold instead).
4. Capture the actual cost: the fixed ``cost``, or ``cost(result)`` bounded by
   ``max_cost``. The rest of the hold is released at once.

The captured :class:`~drip.ledger.Charge` of the last metered call in this context is
available as :func:`last_charge`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import functools
import inspect
import logging
import math
import threading
from collections.abc import Callable, Iterator
from decimal import MAX_EMAX, MIN_EMIN, ROUND_HALF_EVEN, Context, Decimal
from typing import TYPE_CHECKING, Any, TypeVar, cast

from drip import errors
from drip.ledger import Charge, Ledger, SyncLedger, Transfer, TransferFlags
from drip.ledger.ledger import Cap
from drip.ledger.types import check_code
from drip.metering.client import new_call_id
from drip.money import AmountLike, parse_amount

if TYPE_CHECKING:
    from drip.metering.client import DripClient

log = logging.getLogger("drip.metering")

F = TypeVar("F", bound=Callable[..., Any])

_last_charge: contextvars.ContextVar[Charge | None] = contextvars.ContextVar(
    "drip_last_charge", default=None
)


def last_charge() -> Charge | None:
    """The charge captured by the most recent metered call in this context (task/thread)."""
    return _last_charge.get()


class _Pricing:
    """A call's hold amount and how to compute what it finally costs."""

    def __init__(self, cost: Any, max_cost: AmountLike | None, event: str) -> None:
        self.dynamic = callable(cost)
        if self.dynamic:
            if _is_async(cost):
                raise errors.ConfigError(
                    f"meter({event!r}): the cost function is async; it would be called, not "
                    "awaited, after the work ran. Pass a plain function of the result",
                    param="cost",
                )
            if max_cost is None:
                raise errors.ConfigError(
                    f"meter({event!r}): a callable cost needs max_cost (the amount to hold)",
                    param="max_cost",
                )
            self.hold = parse_amount(max_cost, allow_zero=False, param="max_cost")
            self.fn: Callable[[Any], Any] = cost
        else:
            self.hold = parse_amount(cost, allow_zero=False, param="cost")
            if max_cost is not None and parse_amount(max_cost, param="max_cost") < self.hold:
                raise errors.ConfigError(f"meter({event!r}): cost exceeds max_cost")
        self.event = event

    def actual(self, result: Any) -> int:
        if not self.dynamic:
            return self.hold
        cost = self.fn(result)
        if inspect.isawaitable(cost):  # not async def, yet hands back a coroutine
            close = getattr(cost, "close", None)
            if callable(close):
                close()  # never awaited: no warning about it later
            raise errors.ConfigError(
                f"meter({self.event!r}): the cost function returned {type(cost).__name__}, "
                "not an amount", param="cost",
            )  # fmt: skip
        try:
            amount = parse_amount(_float_noise_off(cost), param="cost")
        except errors.InvalidAmount as exc:
            if not exc.details.get("above_max"):
                raise
            # beyond the ledger's range is above max_cost too: capped alike (the call ran;
            # refusing now would leave it unbilled)
            log.warning(
                "meter(%r): cost beyond the ledger's range exceeds max_cost %d; charging "
                "max_cost", self.event, self.hold,
            )  # fmt: skip
            return self.hold
        if amount > self.hold:
            log.warning(
                "meter(%r): cost %d exceeds max_cost %d; charging max_cost",
                self.event, amount, self.hold,
            )  # fmt: skip
            return self.hold
        return amount


def _is_async(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` hands back a coroutine or an async generator (an
    ``async def``, a partial of one, an object whose ``__call__`` is one)."""
    call = getattr(fn, "__call__", None)  # noqa: B004 - a callable object's own method
    return any(inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f)
               for f in (fn, call))  # fmt: skip


def _float_noise_off(cost: object) -> object:
    """A cost function's float, as the 6-decimal amount it stands for when it is one up
    to float arithmetic's noise: ``1234 * 0.000002`` is 0.0024679999999999997, and is
    charged 0.002468 (refusing it would leave a call that already ran unbilled). A float
    that really has more decimals (``0.0000001``) is refused as before."""
    if not isinstance(cost, float) or not math.isfinite(cost):
        return cost
    exact = Decimal(repr(cost))  # from its digits: exact, whatever the context
    # every step in a private context (the caller's may round, or trap, or both)
    rounded = _EXACT.quantize(exact, _ATOMIC)
    error = _EXACT.abs(_EXACT.subtract(exact, rounded))
    if rounded != exact and rounded and error <= _EXACT.multiply(_EXACT.abs(rounded), _FLOAT_NOISE):
        return rounded
    return cost


#: One atomic unit, and the relative error float arithmetic leaves in a product of a few
#: terms (doubles carry ~16 significant digits).
_ATOMIC = Decimal("0.000001")
_FLOAT_NOISE = Decimal("1e-12")
#: Arithmetic on a float's digits, independent of the caller's decimal context: precise
#: enough that only ``quantize`` rounds (where asked: a double has at most ~315 digits
#: down to 10**-6), and it never traps.
_EXACT = Context(prec=400, rounding=ROUND_HALF_EVEN, Emax=MAX_EMAX, Emin=MIN_EMIN, traps=[],
                 flags=[])  # fmt: skip

Payer = Callable[[tuple[Any, ...], dict[str, Any]], str]


def _payer_getter(fn: Callable[..., Any], param: str) -> Payer:
    """Where the payer's argument is in a call, exactly as Python binds it: a positional
    slot (unless keyword-only), a keyword (unless positional-only), or its default."""
    signature = inspect.signature(fn)
    parameter = signature.parameters.get(param)
    if parameter is None or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
        raise errors.ConfigError(
            f"meter: {_name(fn)} has no parameter {param!r} naming the payer "
            f"(set user_id_param=...; not a *args or **kwargs parameter)",
            param="user_id_param",
        )
    position = list(signature.parameters).index(param)
    by_position = parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    by_keyword = parameter.kind != parameter.POSITIONAL_ONLY  # else **kwargs takes the name

    def payer(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        if by_keyword and param in kwargs:
            value = kwargs[param]
        elif by_position and position < len(args):
            value = args[position]
        else:
            default = parameter.default
            if default is inspect.Parameter.empty:
                raise errors.InvalidRequest(f"{param} is required to bill this call", param=param)
            value = default
        if not isinstance(value, str):
            raise errors.InvalidRequest(f"{param} must be a string", param=param)
        return value

    return payer


def make_meter(
    get_client: Callable[[], DripClient],
    cost: Any,
    event: str,
    user_id_param: str = "user_id",
    max_cost: AmountLike | None = None,
    void_on_error: bool | None = None,
    session_param: str | None = None,
) -> Callable[[F], F]:
    """The ``@meter`` decorator. Every call is counted in flight on its client
    (``call_started``), so that closing or retiring the client waits for it."""
    check_code(event, "event")
    pricing = _Pricing(cost, max_cost, event)

    def resolve(client: DripClient, value: str) -> tuple[str, list[Cap], Any]:
        """The wallet, the caps to hold with it, and how to word the ledger's refusals."""
        if session_param is None:
            return client.payer(user_id=value, session=None, event=event, amount=pricing.hold)
        return client.payer(user_id=None, session=value, event=event, amount=pricing.hold)

    async def resolve_async(client: DripClient, value: str) -> tuple[str, list[Cap], Any]:
        if session_param is None:
            return resolve(client, value)
        return await client.payer_async(user_id=None, session=value, event=event,
                                        amount=pricing.hold)  # fmt: skip

    def unseen(hold_id: str, wallet: str, client: DripClient) -> Transfer:
        """The hold ``hold_id`` as the ledger would have returned it, to void one that
        may have landed while its caller never got it back (an interrupt)."""
        return Transfer(hold_id, wallet, client.revenue_account, pricing.hold, event,
                        TransferFlags.PENDING, None, client.config.hold_timeout_s)  # fmt: skip

    def decorate(fn: F) -> F:
        if isinstance(fn, (staticmethod, classmethod)):
            # @meter above @staticmethod/@classmethod: meter the function itself, and wrap
            # it again, so it binds (or not) as written and the payer is found where the
            # function's own signature puts it
            return cast(F, type(fn)(decorate(fn.__func__)))
        call = getattr(fn, "__call__", None)  # noqa: B004 - a callable object's own method
        if any(inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f)
               for f in (fn, call)):  # fmt: skip
            raise errors.ConfigError(
                f"meter: {_name(fn)} is a generator: its body runs as it is iterated, after "
                "the call returned. Meter the function that consumes it, or hold and capture "
                "with client.ledger",
                param="fn",
            )
        payer = _payer_getter(fn, session_param or user_id_param)

        def void_wanted(client: DripClient) -> bool:
            return client.config.void_on_error if void_on_error is None else void_on_error

        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call):

            @functools.wraps(fn)
            async def metered_async(*args: Any, **kwargs: Any) -> Any:
                _last_charge.set(None)
                client = get_client()
                wallet, caps, refusals = await resolve_async(client, payer(args, kwargs))
                led: Ledger | None = None
                try:
                    led = client.call_started()  # the ledger stays open until call_ended
                    return await run_async(client, led, wallet, caps, refusals, args, kwargs)
                finally:
                    if led is not None:
                        client.call_ended(led)

            async def run_async(
                client: DripClient, led: Ledger, wallet: str, caps: list[Cap], refusals: Any,
                args: Any, kwargs: Any,
            ) -> Any:  # fmt: skip
                hold_id = new_call_id("call")
                hold: Transfer | None = None
                try:  # from before the hold: no moment where it is taken and nobody voids it
                    with refusals:
                        hold = await led.hold(
                            hold_id, wallet, client.revenue_account, pricing.hold, code=event,
                            timeout_s=client.config.hold_timeout_s, caps=caps,
                            private=True,  # voided by the ledger if cancelled first
                        )  # fmt: skip
                    result = await fn(*args, **kwargs)
                    amount = pricing.actual(result)
                except BaseException as exc:
                    if hold is None:  # the hold failed, or was interrupted as it landed
                        # a cancellation reaches the hold only inside Ledger.hold's own
                        # await, which releases what it took; any other interrupt may
                        # land after it returned
                        if _may_have_landed(exc) and not isinstance(exc, asyncio.CancelledError):
                            await asyncio.shield(
                                _release_unseen_async(led, unseen(hold_id, wallet, client), caps)
                            )
                        raise
                    failed = _settle_failed_async(led, hold, void_wanted(client), caps)
                    charge = await asyncio.shield(failed)
                    if charge is not None:
                        _last_charge.set(charge)
                    raise
                charge = await asyncio.shield(capture_async(led, hold, amount, caps))
                _last_charge.set(charge)
                return result

            return metered_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def metered(*args: Any, **kwargs: Any) -> Any:
            _last_charge.set(None)
            client = get_client()
            wallet, caps, refusals = resolve(client, payer(args, kwargs))
            led: Ledger | None = None
            try:
                led = client.call_started()  # the ledger stays open until call_ended
                return run(client, led, wallet, caps, refusals, args, kwargs)
            finally:
                if led is not None:
                    client.call_ended(led)

        def run(
            client: DripClient, opened: Ledger, wallet: str, caps: list[Cap], refusals: Any,
            args: Any, kwargs: Any,
        ) -> Any:  # fmt: skip
            led = opened.sync
            hold_id = new_call_id("call")
            hold: Transfer | None = None
            try:  # from before the hold: no moment where it is taken and nobody voids it
                with refusals:
                    hold = led.hold(
                        hold_id, wallet, client.revenue_account, pricing.hold, code=event,
                        timeout_s=client.config.hold_timeout_s, caps=caps,
                        private=True,  # voided by the ledger if interrupted while waiting
                    )  # fmt: skip
                result = fn(*args, **kwargs)
                lazy = _lazy_result(fn, result)
                amount = 0 if lazy is not None else pricing.actual(result)
            except BaseException as exc:
                if hold is None:  # the hold failed, or was interrupted as it landed
                    if _may_have_landed(exc):
                        lost = unseen(hold_id, wallet, client)
                        _soon(client, opened, _release_unseen, led, lost, caps)
                    raise
                with settling_failed(hold):
                    if void_wanted(client):
                        led.void(hold, caps=caps)
                    else:
                        _last_charge.set(capture_sync(led, hold, hold.amount, caps))
                raise
            if lazy is not None:  # nothing ran yet: never charged, whatever void_on_error
                with settling_failed(hold):
                    led.void(hold, caps=caps)
                raise lazy
            try:
                charge = capture_sync(led, hold, amount, caps)
            except BaseException as exc:
                if not isinstance(exc, errors.DripError):
                    # interrupted while capturing: the work ran, so the capture is finished
                    # (or answered as a replay, if it landed) rather than left to expire
                    _soon(client, opened, _capture_later, led, hold, amount, caps)
                raise
            _last_charge.set(charge)
            return result

        return metered  # type: ignore[return-value]

    return decorate


def _name(fn: Callable[..., Any]) -> str:
    return str(getattr(fn, "__qualname__", None) or type(fn).__qualname__)


def _lazy_result(fn: Callable[..., Any], result: Any) -> errors.ConfigError | None:
    """The error for a plain function that hands back a coroutine or a generator: it has
    not done its work yet, so charging for it would bill a body that may never run, or
    fail. ``None`` for a real result."""
    if not (inspect.isawaitable(result) or inspect.isgenerator(result)
            or inspect.isasyncgen(result)):  # fmt: skip
        return None
    close = getattr(result, "close", None)
    if callable(close) and not inspect.isasyncgen(result):
        close()  # never run: no "coroutine was never awaited" warning later
    return errors.ConfigError(
        f"meter: {_name(fn)} returned {type(result).__name__} instead of its result; "
        "meter an async def with async code, and not a generator", param="fn",
    )  # fmt: skip


@contextlib.contextmanager
def settling_failed(hold: Transfer) -> Iterator[None]:
    """Settle a failed call's hold without hiding the call's own exception: a hold that
    expired meanwhile reserves nothing already; any other failure is logged (the hold's
    timeout releases it)."""
    try:
        yield
    except errors.HoldExpired:
        pass
    except errors.DripError as exc:
        log.error("could not settle the hold %s of a failed call (%s); its timeout will",
                  hold.id, exc.code)  # fmt: skip


def _may_have_landed(exc: BaseException) -> bool:
    """Whether a hold that raised ``exc`` may still have been taken: an interrupt
    (``KeyboardInterrupt``, a cancellation, whatever a signal handler raises) or a store
    failure. A refusal (no credit, a policy, a paused user) took nothing."""
    return not isinstance(exc, errors.DripError) or isinstance(exc, errors.StoreError)


def _unseen_failed(hold: Transfer, exc: errors.DripError) -> None:
    """A hold that never landed cannot be voided (nothing to release); one the ledger
    voided already (its own interrupt handling) answers as a replay. Anything else is
    logged: the hold's timeout releases it."""
    if not isinstance(exc, (errors.HoldNotFound, errors.HoldAlreadyResolved)):
        log.warning("could not void the hold %s of an interrupted call (%s); its timeout "
                    "will", hold.id, exc.code)  # fmt: skip


def _release_unseen(led: SyncLedger, hold: Transfer, caps: list[Cap]) -> None:
    """Void a hold its caller may have lost to an interrupt as it landed."""
    try:
        led.void(hold, caps=caps)
    except errors.DripError as exc:
        _unseen_failed(hold, exc)
    except Exception:  # a background thread: nobody else would see it
        log.exception("could not void the hold %s of an interrupted call; its timeout will",
                      hold.id)  # fmt: skip


async def _release_unseen_async(led: Ledger, hold: Transfer, caps: list[Cap]) -> None:
    """The async twin of :func:`_release_unseen`."""
    try:
        await led.void(hold, caps=caps)
    except errors.DripError as exc:
        _unseen_failed(hold, exc)


def _capture_later(led: SyncLedger, hold: Transfer, amount: int, caps: list[Cap]) -> None:
    """Capture (again: the same post is answered as a replay if it landed) for a call
    whose capture an interrupt cut short."""
    try:
        capture_sync(led, hold, amount, caps)
    except errors.HoldAlreadyResolved:
        pass  # voided meanwhile (a store failure's own cleanup): nothing reserved
    except Exception:  # a background thread: nobody else would see it
        log.exception("could not capture the hold %s of an interrupted call; its timeout "
                      "will release it", hold.id)  # fmt: skip


def _soon(client: DripClient, led: Ledger, work: Callable[..., None], *args: Any) -> None:
    """Finish an interrupted sync call's hold in a thread of its own: the interrupt goes on
    to the caller at once (a Ctrl-C does not wait for the database; an interrupt inside
    the ledger's own wait may even have left it slow to answer). The work counts as a
    call on ``led``, so closing the client meanwhile does not close the ledger under it."""

    def finish() -> None:
        try:
            work(*args)
        finally:
            client.call_ended(led)

    client.call_joined(led)
    try:
        threading.Thread(target=finish, daemon=True, name="drip-settle-interrupted").start()
    except BaseException:
        client.call_ended(led)
        raise


def _late_caps(caps: list[Cap]) -> list[Cap]:
    """The caps of a late charge, without their rolling windows: the call was admitted
    when it was held, and has run."""
    return [Cap(c[0], c[1]) for c in caps]


def _retrying(hold: Transfer, exc: errors.DripError) -> None:
    """A capture the store failed (a commit refused: a full disk, a lost connection):
    the call ran, so it is tried once more before it is given up (and its hold voided,
    so a fault that comes and goes leaves no funds reserved for an unbilled call)."""
    log.warning("capture of %s failed (%s); trying once more", hold.id, exc.code)


def _late(hold: Transfer, exc: errors.DripError) -> None:
    log.warning(
        "hold %s expired before its capture (raise hold_timeout_s above the longest call); "
        "charging it afresh: %s", hold.id, exc.code,
    )  # fmt: skip


async def capture_async(led: Ledger, hold: Transfer, amount: int, caps: list[Cap]) -> Charge | None:
    """Capture ``amount`` of the hold. If the hold expired while the call ran, charge the
    amount afresh (it may be refused: then the call goes unbilled, and it is logged)."""
    try:
        try:
            return await led.post(hold, amount, caps=caps)
        except errors.StoreError as exc:
            if isinstance(exc, errors.ClientClosed):
                raise
            _retrying(hold, exc)
            try:  # the same id: if the first did land, this answers it as a replay
                return await led.post(hold, amount, caps=caps)
            except errors.StoreError:
                with contextlib.suppress(errors.DripError):
                    await led.void(hold, caps=caps)  # unbilled: at least not reserving
                raise
    except errors.HoldExpired as exc:
        _late(hold, exc)
        if not amount:
            return None
        try:
            return await led.charge_after_expiry(hold, amount, caps=_late_caps(caps))
        except errors.DripError as refused:
            log.error("late charge of %s refused (%s): the call is unbilled", hold.id, refused.code)
            return None


def capture_sync(led: SyncLedger, hold: Transfer, amount: int, caps: list[Cap]) -> Charge | None:
    """The blocking twin of :func:`capture_async`."""
    try:
        try:
            return led.post(hold, amount, caps=caps)
        except errors.StoreError as exc:
            if isinstance(exc, errors.ClientClosed):
                raise
            _retrying(hold, exc)
            try:  # the same id: if the first did land, this answers it as a replay
                return led.post(hold, amount, caps=caps)
            except errors.StoreError:
                with contextlib.suppress(errors.DripError):
                    led.void(hold, caps=caps)  # unbilled: at least not reserving
                raise
    except errors.HoldExpired as exc:
        _late(hold, exc)
        if not amount:
            return None
        try:
            return led.charge_after_expiry(hold, amount, caps=_late_caps(caps))
        except errors.DripError as refused:
            log.error("late charge of %s refused (%s): the call is unbilled", hold.id, refused.code)
            return None


async def _settle_failed_async(
    led: Ledger, hold: Transfer, void: bool, caps: list[Cap]
) -> Charge | None:
    """Void the hold of a failed call (or capture all of it); runs shielded from cancellation,
    so the caller sets ``last_charge`` from the returned charge in its own context."""
    with settling_failed(hold):
        if not void:  # capture all of it (charged afresh if the hold expired meanwhile)
            return await capture_async(led, hold, hold.amount, caps)
        await led.void(hold, caps=caps)
    return None


# --- module-level configuration (the seed's ``drip.configure()`` + ``@meter``) ---------

_default_client: DripClient | None = None
#: clients ``configure`` replaced (closed at exit)
_retired: list[DripClient] = []


def configure(config: Any = None, **settings: Any) -> DripClient:
    """Set the client that module-level :func:`meter` uses; returns it."""
    from drip.config import DripConfig
    from drip.metering.client import DripClient

    global _default_client
    if config is not None and settings:
        raise errors.ConfigError("pass either a DripConfig or keyword settings, not both")
    config = config if config is not None else DripConfig(**settings)
    old = _default_client
    if old is not None:
        if old.config == config:
            return old  # configured again the same way: the same client
        _retire(old)
    _default_client = DripClient(config)
    return _default_client


def _retire(client: DripClient) -> None:
    """Close a replaced client once the calls it is running are done (now, if none is):
    closing under them would leave work that ran unbilled and its holds reserving. At
    exit, whatever is left is closed."""
    if not _retired:
        atexit.register(_close_retired)
    _retired.append(client)
    client.retire(lambda: _forget(client))


def _forget(client: DripClient) -> None:
    with contextlib.suppress(ValueError):
        _retired.remove(client)


def _close_retired() -> None:
    for client in list(_retired):
        _forget(client)
        with contextlib.suppress(Exception):
            client.close()


def default_client() -> DripClient:
    if _default_client is None:
        raise errors.ConfigError("call drip.configure(...) before using drip.meter")
    return _default_client


def meter(
    cost: Any,
    event: str,
    user_id_param: str = "user_id",
    max_cost: AmountLike | None = None,
    *,
    void_on_error: bool | None = None,
    session_param: str | None = None,
) -> Callable[[F], F]:
    """``@client.meter`` on the client set by :func:`configure` (looked up at call time)."""
    return make_meter(default_client, cost, event, user_id_param, max_cost, void_on_error,
                      session_param)  # fmt: skip
