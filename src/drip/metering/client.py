"""``DripClient``: users with prepaid wallets, debits, top-ups, pause and resume.

A user is a wallet account ``user:<user_id>`` in the ledger; its profile (email,
container image, metadata) is the account's metadata, and its status is the account's
(``frozen`` = paused). Amounts come in as people write them (``"0.007"``,
``Decimal``, ``5`` meaning five dollars, ``0.01`` read through ``str``) and go out as
``Decimal``; inside, everything is atomic-unit integers.
"""

from __future__ import annotations

import binascii
import dataclasses
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

from drip import errors
from drip.config import DripConfig
from drip.ledger import (
    Account,
    AccountKind,
    AccountStatus,
    Charge,
    Ledger,
    SyncLedger,
    Transfer,
    UsageRow,
    funding_account_id,
    open_ledger,
)
from drip.ledger.ledger import Cap
from drip.ledger.types import check_id, has_control
from drip.metering.sessions import (
    SESSION_CACHE_MAX,
    Session,
    SessionInfo,
    public_account_id,
    session_account_id,
    session_specs,
    session_view,
)
from drip.money import AmountLike, credit_amount, format_plain, parse_amount, to_decimal

if TYPE_CHECKING:
    from drip.metering.meter import F

WALLET_PREFIX = "user:"
#: One ledger call, by method name, for the async or the blocking twin to run.
Step = tuple[str, tuple[Any, ...], dict[str, Any]]
REVENUE_PREFIX = "revenue:"

log = logging.getLogger("drip.metering")


#: Longest user id: ``provision:<user id>`` and the other ids derived from it fit the
#: ledger's 160 characters (checked before anything is written).
USER_ID_MAX = 150


def wallet_id(user_id: str) -> str:
    """The ledger account of a user's prepaid wallet."""
    check_id(user_id, "user_id", caller=True)
    return f"{WALLET_PREFIX}{user_id}"


def new_wallet_id(user_id: str) -> str:
    """``wallet_id`` of a user being created: ``USER_ID_MAX`` applies (wallets made
    before the limit keep working through ``wallet_id``)."""
    if isinstance(user_id, str) and len(user_id) > USER_ID_MAX:
        raise errors.InvalidId(f"user_id is longer than {USER_ID_MAX} characters",
                               param="user_id")  # fmt: skip
    if isinstance(user_id, str) and "/" in user_id:  # no REST path could reach the wallet
        raise errors.InvalidId("user_id may not contain '/'", param="user_id")
    return wallet_id(user_id)


def user_status(account: Account) -> str:
    return "paused" if account.status == AccountStatus.FROZEN else "active"


def user_view(account: Account) -> dict[str, Any]:
    """The seed SDK's user dict: balances as ``Decimal`` USDC, status, profile."""
    balance = account.balance
    profile = account.meta
    return {
        "user_id": account.id.removeprefix(WALLET_PREFIX),
        "email": profile.get("email"),
        "balance_usdc": to_decimal(balance.available),
        "posted_usdc": to_decimal(balance.posted),
        "pending_usdc": to_decimal(balance.pending),
        "status": user_status(account),
        "container_image": profile.get("container_image"),
        "metadata": profile.get("metadata") or {},
        "created_us": account.created_us,
    }


#: 64 id-safe characters in ASCII order, so encoded ids sort as their bytes do.
_SORTED_ALPHABET = "-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
#: base64's own alphabet, mapped digit for digit onto the sorted one
_TO_SORTED = bytes.maketrans(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
    _SORTED_ALPHABET.encode(),
)


def new_call_id(prefix: str) -> str:
    """A unique, time-ordered id: 64 bits of nanoseconds then 64 random bits, in 22
    characters. Ordered, short ids land on the same index pages as their neighbours, so a
    batch of them dirties few pages."""
    raw = time.time_ns().to_bytes(8, "big") + os.urandom(8)
    return f"{prefix}:{binascii.b2a_base64(raw, newline=False)[:22].translate(_TO_SORTED).decode()}"


def transfer_key(idempotency_key: str | None, prefix: str) -> str:
    """The transfer id of a write: the caller's ``idempotency_key``, checked, or (only when
    it is ``None``) a fresh id. An empty key is refused, never read as "no key": that
    would charge again on every retry."""
    if idempotency_key is None:
        return new_call_id(prefix)
    return check_id(idempotency_key, "idempotency_key", caller=True)


def _as_user_error(exc: errors.DripError, user_id: str) -> errors.DripError:
    """A missing wallet is a missing user to callers of the metering API."""
    if isinstance(exc, errors.AccountNotFound) and repr(wallet_id(user_id)) in exc.message:
        return errors.UserNotFound(f"no user {user_id!r}: provision it first", param="user_id")
    return exc


@contextmanager
def user_errors(user_id: str, event: str = "") -> Iterator[None]:
    """Translate the ledger's errors about a wallet into the metering API's words."""
    try:
        yield
    except errors.DripInsufficientCredits as exc:
        raise insufficient(user_id, event, exc) from None
    except errors.AccountNotFound as exc:
        raise _as_user_error(exc, user_id) from None
    except errors.AccountFrozen as exc:
        if repr(wallet_id(user_id)) not in exc.message:
            raise
        raise errors.AccountFrozen(
            f"user {user_id!r} is paused: top up or restore to resume", param="user_id"
        ) from None


def insufficient(user_id: str, event: str, exc: errors.DripError) -> errors.DripInsufficientCredits:
    available = exc.details.get("available")
    needed = exc.details.get("needed")
    if isinstance(available, int) and isinstance(needed, int):
        message = (
            f"user {user_id!r} has {format_plain(max(available, 0))} USDC available; "
            f"{event!r} needs {format_plain(needed)}"
        )
    else:
        message = f"user {user_id!r} cannot afford {event!r}"
    return errors.DripInsufficientCredits(
        message, param="user_id", user_id=user_id, event=event, available=available, needed=needed
    )


class _Base:
    """What the async and sync clients share: configuration, ids, argument checks."""

    config: DripConfig
    _ledger: Ledger | None

    _revenue_ready = False
    _closed = False
    #: whether ``close`` closes the ledger (one given to the client is the giver's)
    _owns_ledger = True
    #: one ledger per client, however many threads use it first at once
    _open_lock: threading.Lock

    def _open(self) -> Ledger:
        led = self._ledger
        if led is not None and self._revenue_ready:
            return led
        with self._open_lock:
            return self._open_locked()

    def _open_locked(self) -> Ledger:
        """``_open`` under ``_open_lock``."""
        if self._closed and not self._owns_ledger:
            # the ledger it was given is closed or the giver's: never open another one
            # from the config behind the caller's back
            raise errors.ClientClosed("this DripClient was closed; make a new one")
        self._closed = False  # a client that opened its own ledger reopens on use
        led = self._ledger
        if led is None:
            led = open_ledger(self.config.database_url, fee_bps=self.config.fee_bps)
            self._ledger = led
        if not self._revenue_ready:
            # also on a ledger the caller opened: every charge credits this account
            led.sync.create_account(self.revenue_account, AccountKind.REVENUE,
                                    owner=self.config.provider)  # fmt: skip
            self._revenue_ready = True
        return led

    @property
    def ledger(self) -> Ledger:
        """The underlying ledger (opened, and migrated, on first use)."""
        return self._open()

    @property
    def revenue_account(self) -> str:
        return f"{REVENUE_PREFIX}{self.config.provider}"

    def _provision_args(
        self,
        user_id: str,
        email: str | None,
        initial_balance: AmountLike,
        container_image: str | None,
        metadata: Mapping[str, Any] | None,
    ) -> tuple[str, dict[str, Any], int]:
        account = new_wallet_id(user_id)
        amount = credit_amount(initial_balance, "initial_balance", allow_zero=True)
        if email is not None and (not isinstance(email, str) or has_control(email)):
            # stored, a control character reaches whoever prints it (a terminal acts on
            # escape sequences) or a notice's headers (a newline)
            raise errors.InvalidRequest(
                "email must be text without control characters", param="email"
            )
        if metadata is not None and not isinstance(metadata, Mapping):
            raise errors.InvalidRequest("metadata must be an object", param="metadata")
        profile = {"email": email, "container_image": container_image,
                   "metadata": dict(metadata or {})}  # fmt: skip
        return account, profile, amount

    def get_user_now(self, user_id: str) -> dict[str, Any]:
        account = self.ledger.store.get_account(wallet_id(user_id))
        if account is None or account.kind != AccountKind.WALLET:
            raise errors.UserNotFound(f"no user {user_id!r}", param="user_id")
        return user_view(account)

    def list_users_now(self, *, after: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        accounts = self.ledger.list_accounts(
            AccountKind.WALLET, after_id=wallet_id(after) if after else None, limit=limit
        )
        return [user_view(a) for a in accounts]

    def usage_now(
        self,
        user_id: str | None = None,
        *,
        since_us: int | None = None,
        until_us: int | None = None,
        bucket_s: int = 86_400,
        event: str | None = None,
    ) -> list[UsageRow]:
        account = wallet_id(user_id) if user_id is not None else None
        return self.ledger.usage(account, since_us=since_us, until_us=until_us,
                                 bucket_s=bucket_s, code=event)  # fmt: skip

    # --- sessions (shared by both twins) ------------------------------------------------

    _sessions: dict[str, SessionInfo]

    def session_info(self, token: str) -> SessionInfo:
        """A session's fixed facts (cached: they never change after creation)."""
        account_id = session_account_id(token)
        info = self._sessions.get(account_id)
        if info is None:
            account = self.ledger.store.get_account(account_id)
            if account is None or account.kind != AccountKind.SESSION:
                raise errors.SessionNotFound("no such session", param="X-Drip-Session")
            info = SessionInfo.from_account(account)
            if info.source is None and len(info.policy.routes) > 1:
                info = dataclasses.replace(info, route_slots=self._legacy_route_slots(info))
            if len(self._sessions) >= SESSION_CACHE_MAX:
                self._sessions.clear()
            self._sessions[account_id] = info
        return info

    def _legacy_route_slots(self, info: SessionInfo) -> tuple[int, ...]:
        """A session opened before route budgets were kept sorted created its route
        accounts in the order its caller wrote the patterns, while its stored policy
        reads back sorted: each pattern is matched to the account funded with its budget.
        Patterns with equal budgets cannot be told apart (their limits are equal)."""
        funded: list[int | None] = []
        for i in range(len(info.policy.routes)):
            budget = self.ledger.store.get_transfer(f"budget:{info.account_id}:r{i}")
            funded.append(None if budget is None else budget.amount)
        slots: list[int] = []
        for _, amount in info.policy.routes:
            found = next((i for i, a in enumerate(funded) if a == amount and i not in slots), None)
            if found is None:
                log.warning("session %s: route budgets do not match their accounts; kept "
                            "in stored order", info.account_id)  # fmt: skip
                return ()
            slots.append(found)
        return tuple(slots)

    def session_payer(
        self, token: str, event: str, amount: int
    ) -> tuple[str, list[Cap], SessionInfo]:
        """The wallet to hold on and the session cap, after the session's static checks."""
        info = self.session_info(token)
        if info.provider != self.config.provider:
            raise errors.PolicyViolation(
                f"this session is for provider {info.provider!r}", param="provider",
                policy="provider",
            )  # fmt: skip
        if info.expired():
            raise errors.SessionExpired("this session has expired", param="X-Drip-Session")
        info.policy.check(event, amount)
        source = info.source_account(self.ledger.asset.symbol)
        caps = [Cap(info.account_id, source, info.policy.windows)]
        caps += [Cap(info.route_account(i), source) for i in info.policy.route_indexes(event)]
        return wallet_id(info.user_id), caps, info

    def payer(
        self, *, user_id: str | None, session: str | None, event: str, amount: int
    ) -> tuple[str, list[Cap], AbstractContextManager[None]]:
        """Who pays a call of ``event`` reserving ``amount``: the wallet to debit, the caps
        to hold with it, and how to word the ledger's refusals. A session token wins over
        a user id; neither is a 402."""
        if session is not None:
            wallet, caps, info = self.session_payer(session, event, amount)
            if user_id is not None and wallet_id(user_id) != wallet:
                # never bill someone other than the caller named: refuse the contradiction
                raise errors.InvalidRequest(
                    f"user_id {user_id!r} is not this session's user", param="user_id"
                )
            return wallet, caps, session_errors(info, event)
        if user_id is None:
            raise errors.PayerRequired(
                "payment required: this request names no payer (send X-Drip-Session with a "
                "session token)", param="X-Drip-Session",
            )  # fmt: skip
        return wallet_id(user_id), [], user_errors(user_id, event)

    def get_session_now(self, session: str) -> dict[str, Any]:
        """A session's state, by its token or its public id."""
        account_id = (
            session_account_id(session) if session.startswith("ds_")
            else public_account_id(session)
        )  # fmt: skip
        account = self.ledger.store.get_account(account_id)
        if account is None or account.kind != AccountKind.SESSION:
            raise errors.SessionNotFound("no such session", param="session")
        return session_view(account)

    def _session_plan(
        self, user_id: str, provider: str, budget: AmountLike, expires_in: object, policy: object
    ) -> tuple[str, SessionInfo]:
        token, info = session_specs(user_id, provider, budget, expires_in, policy)
        self.get_user_now(user_id)  # the payer must exist
        return token, info

    def _session_steps(
        self, info: SessionInfo
    ) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
        """The ledger calls that open a session (each idempotent), for either twin to run:
        the budget source, the session account and its budget, then each route budget."""
        source = info.source_account(self.ledger.asset.symbol)
        steps: list[Step] = [
            ("create_account", (source, AccountKind.FUNDING), {}),
            ("create_account", (info.account_id, AccountKind.SESSION),
             {"owner": info.user_id, "metadata": info.metadata()}),
            ("transfer", (f"budget:{info.account_id}", source, info.account_id, info.budget),
             {"code": "session_budget"}),
        ]  # fmt: skip
        for i, (_, route_budget) in enumerate(info.policy.routes):
            route = info.route_account(i)
            steps.append(("create_account", (route, AccountKind.SESSION), {"owner": info.user_id}))
            steps.append(("transfer", (f"budget:{route}", source, route, route_budget),
                          {"code": "session_budget"}))  # fmt: skip
        return steps

    def _session(self, token: str, info: SessionInfo) -> Session:
        return Session(token, info.account_id.removeprefix("session:"), info.user_id,
                       info.provider, to_decimal(info.budget), info.expires_us,
                       info.policy)  # fmt: skip

    #: metered calls in flight on the current ledger (see ``call_started``)
    _calls = 0
    _retired: Callable[[], object] | None = None
    #: ledgers ``close`` let go of while metered calls ran on them, by ``id``: each is
    #: closed when the last of its calls ends ``[ledger, calls in flight]``
    _draining: dict[int, list[Any]]

    def call_started(self) -> Ledger:
        """Count a metered call in, and return the ledger it runs on: it stays open until
        the call is counted out (``call_ended``), even if the client is closed or retired
        meanwhile, so the call captures or voids its hold. Raises ``ClientClosed`` (before
        the call's work runs) on a closed client whose ledger was given to it; a closed
        client that opened its own reopens, as on any use."""
        with self._open_lock:
            led = self._open_locked()
            self._calls += 1
            return led

    def call_joined(self, led: Ledger) -> None:
        """Count in more work on ``led`` (the ledger a call in flight holds open), to be
        counted out with ``call_ended`` like a call: a call's own cleanup, finishing in
        a thread of its own after the call returned."""
        with self._open_lock:
            draining = self._draining.get(id(led))
            if draining is not None and draining[0] is led:
                draining[1] += 1
            else:
                self._calls += 1

    def call_ended(self, led: Ledger) -> None:
        """Count out a call ``call_started`` returned ``led`` for; the last call on a
        ledger being closed closes it."""
        done: Callable[[], object] | None = None
        with self._open_lock:
            draining = self._draining.get(id(led))
            if draining is not None and draining[0] is led:
                draining[1] -= 1
                finished = draining[1] == 0
                if finished:
                    del self._draining[id(led)]
                closing = led if finished else None
            else:
                self._calls -= 1
                done = self._retired if self._calls == 0 else None
                # detached in the same step as the count is read: a call counting itself
                # in right after opens a fresh ledger (closed in turn when it ends)
                closing = self._detach() if done is not None else None
        self._close_detached(closing)
        if done is not None:
            done()

    def retire(self, then: Callable[[], object]) -> None:
        """Close once no call is in flight (now, if none is), then call ``then``. A call
        that fetched the client just before its retirement reopens it on use: it is
        closed again when that call ends."""
        with self._open_lock:
            idle = self._calls == 0
            self._retired = then
            led = self._detach() if idle else None
        if idle:
            self._close_detached(led)
            then()

    def _detach(self) -> Ledger | None:
        """Under ``_open_lock``: let go of the ledger (the next use opens another)."""
        self._closed = True
        self._revenue_ready = False
        led, self._ledger = self._ledger, None
        return led

    def _close_detached(self, led: Ledger | None) -> None:
        if led is not None and self._owns_ledger:
            led.close()

    def close(self) -> None:
        """Close the ledger this client opened; using the client again opens it afresh
        (an app served twice). A ledger given to the client is the giver's to close:
        the client lets go of it, and using it afterwards raises ``ClientClosed``.

        Metered calls in flight finish first: each captures or voids its hold on the
        ledger it started on, which closes when the last of them ends (closing under
        them would leave work that ran unbilled, its hold reserving the funds). A call
        starting after ``close`` reopens the client as any use does (or, on a given
        ledger, is refused with ``ClientClosed`` before its work runs)."""
        with self._open_lock:
            led = self._detach()
            if led is not None and self._calls:
                self._draining[id(led)] = [led, self._calls]
                self._calls = 0
                led = None  # closed by the last of its calls (call_ended)
        self._close_detached(led)


@contextmanager
def provision_conflict(user_id: str) -> Iterator[None]:
    """The user's provisioning credit exists with another amount: in the caller's words
    (not the ledger's internal ``provision:<user>`` id)."""
    try:
        yield
    except errors.IdempotencyConflict:
        raise errors.AlreadyExists(
            f"user {user_id!r} was provisioned with another initial_balance",
            param="initial_balance",
        ) from None


@contextmanager
def session_errors(info: SessionInfo, event: str = "") -> Iterator[None]:
    """The ledger's refusals on a session's account, in the session's words; refusals on
    the wallet in the user's."""
    try:
        yield
    except errors.DripError as exc:
        account = str(exc.details.get("account", ""))
        on_session = account == info.account_id or account.startswith(info.account_id + ":")
        if on_session and isinstance(exc, errors.DripInsufficientCredits):
            left = max(exc.details.get("available") or 0, 0)
            whose = "the session's budget"
            if account != info.account_id:
                whose = f"the session's budget for {info.route_pattern(account)!r}"
            raise errors.SessionBudgetExhausted(
                f"{whose} cannot cover {event!r} ({format_plain(left)} USDC left)",
                param="X-Drip-Session",
                available=exc.details.get("available"),
                needed=exc.details.get("needed"),
            ) from None
        if on_session and isinstance(exc, errors.PolicyViolation) and "reserved" in exc.details:
            raise errors.PolicyViolation(  # the engine counts atomic units; callers, USDC
                f"this call may cost up to {format_plain(exc.details['reserved'])} USDC, more "
                f"than the {exc.details.get('policy')} limit allows in "
                f"{exc.details.get('window_s')} s ({format_plain(exc.details['max_amount'])} "
                "USDC)", param=exc.param, policy=exc.details.get("policy"),
            ) from None  # fmt: skip
        if on_session and isinstance(exc, errors.AccountFrozen):
            raise errors.SessionClosed("this session is closed", param="X-Drip-Session") from None
        with user_errors(info.user_id, event):
            raise


class DripClient(_Base):
    """The async SDK. ``client.sync`` is the same client for code without an event loop."""

    def __init__(self, config: DripConfig | None = None, *, ledger: Ledger | None = None) -> None:
        self.config = config or DripConfig()
        check_id(self.config.provider, "provider", caller=True)
        self._ledger = ledger
        self._owns_ledger = ledger is None
        self._open_lock = threading.Lock()
        self._sessions = {}
        self._draining = {}
        self.sync = SyncDripClient(self)

    async def __aenter__(self) -> DripClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __enter__(self) -> DripClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def list_users(
        self, *, after: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        return await self.ledger.off_loop(
            functools.partial(self.list_users_now, after=after, limit=limit)
        )

    async def usage(self, user_id: str | None = None, **kw: Any) -> list[UsageRow]:
        """Charged calls and amounts per event and time bucket (``since_us``,
        ``until_us``, ``bucket_s``, ``event``)."""
        return await self.ledger.off_loop(functools.partial(self.usage_now, user_id, **kw))

    async def get_session(self, session: str) -> dict[str, Any]:
        """A session's state, by its token or its public id."""
        return await self.ledger.off_loop(self.get_session_now, session)

    async def provision_user(
        self,
        user_id: str,
        email: str | None = None,
        initial_balance: AmountLike = 0,
        container_image: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Create the user's wallet and credit ``initial_balance`` (idempotent per user)."""
        account, profile, amount = self._provision_args(
            user_id, email, initial_balance, container_image, metadata
        )
        led = self.ledger
        try:
            await led.create_account(account, AccountKind.WALLET, owner=user_id, metadata=profile)
        except errors.IdempotencyConflict as exc:
            raise errors.AlreadyExists(
                f"user {user_id!r} exists with a different profile", param="user_id"
            ) from exc
        if amount:
            with provision_conflict(user_id):
                await led.transfer(f"provision:{user_id}", funding_account_id(led.asset.symbol),
                                   account, amount, code="topup")  # fmt: skip
        return await self.ledger.off_loop(self.get_user_now, user_id)

    async def payer_async(
        self, *, user_id: str | None, session: str | None, event: str, amount: int
    ) -> tuple[str, list[Cap], AbstractContextManager[None]]:
        """``payer`` for async code: a session's facts, read once per process, are read
        off the event loop (``Ledger.off_loop``)."""
        if session is not None and session_account_id(session) not in self._sessions:
            await self.ledger.off_loop(self.session_info, session)
        return self.payer(user_id=user_id, session=session, event=event, amount=amount)

    async def get_user(self, user_id: str) -> dict[str, Any]:
        return await self.ledger.off_loop(self.get_user_now, user_id)

    async def debit(
        self,
        user_id: str,
        amount: AmountLike,
        event: str,
        *,
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Charge:
        """Charge ``amount`` now (no hold). Raises DripInsufficientCredits, nothing charged."""
        atomic = parse_amount(amount, allow_zero=False)
        transfer_id = transfer_key(idempotency_key, "debit")
        with user_errors(user_id, event):
            return await self.ledger.charge(transfer_id, wallet_id(user_id), self.revenue_account,
                                            atomic, code=event, metadata=metadata)  # fmt: skip

    async def topup(
        self, user_id: str, amount: AmountLike, *, idempotency_key: str | None = None
    ) -> Transfer:
        """Credit the wallet from the outside world; a paused user is resumed. A replay
        (an ``idempotency_key`` already credited) moves nothing and resumes nobody."""
        atomic = credit_amount(amount)
        led = self.ledger
        with user_errors(user_id):
            return await led.transfer(
                transfer_key(idempotency_key, "topup"), funding_account_id(led.asset.symbol),
                wallet_id(user_id), atomic, code="topup", resume=True,
            )  # fmt: skip

    async def hibernate(self, user_id: str) -> dict[str, Any]:
        """Pause the user: their wallet refuses charges until restored or topped up."""
        return await self._set_status(user_id, AccountStatus.FROZEN)

    async def restore(self, user_id: str) -> dict[str, Any]:
        return await self._set_status(user_id, AccountStatus.OPEN)

    async def _set_status(self, user_id: str, status: str) -> dict[str, Any]:
        with user_errors(user_id):
            account = await self.ledger.set_status(wallet_id(user_id), status)
        return user_view(account)

    async def create_session(
        self,
        user_id: str,
        provider: str,
        budget: AmountLike,
        expires_in: object = None,
        policy: Mapping[str, Any] | None = None,
    ) -> Session:
        """A budget for ``provider`` on ``user_id``'s wallet; its ``id`` is the token
        callers send as ``X-Drip-Session``."""
        led = self.ledger
        token, info = await led.off_loop(
            self._session_plan, user_id, provider, budget, expires_in, policy
        )
        for step, args, kw in self._session_steps(info):
            await getattr(led, step)(*args, **kw)
        return self._session(token, info)

    async def close_session(self, session: str) -> dict[str, Any]:
        """No new call may hold against the session; calls in flight still settle."""
        led = self.ledger
        state = await led.off_loop(self.get_session_now, session)
        await led.set_status("session:" + state["public_id"], AccountStatus.FROZEN)
        return await led.off_loop(self.get_session_now, session)

    def meter(
        self,
        cost: Any,
        event: str,
        user_id_param: str = "user_id",
        max_cost: AmountLike | None = None,
        *,
        void_on_error: bool | None = None,
        session_param: str | None = None,
    ) -> Callable[[F], F]:
        """Decorate a function so each call holds, runs, then captures its cost.

        With ``session_param``, that argument carries a session token (``X-Drip-Session``)
        and the call is billed to the session's user within its budget and policy.
        """
        from drip.metering.meter import make_meter

        return make_meter(lambda: self, cost, event, user_id_param, max_cost, void_on_error,
                          session_param)  # fmt: skip


class SyncDripClient:
    """Blocking twin of :class:`DripClient`, sharing its ledger and configuration."""

    def __init__(self, client: DripClient) -> None:
        self._client = client

    @property
    def _ledger(self) -> SyncLedger:
        return self._client.ledger.sync

    def provision_user(
        self,
        user_id: str,
        email: str | None = None,
        initial_balance: AmountLike = 0,
        container_image: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        c = self._client
        account, profile, amount = c._provision_args(
            user_id, email, initial_balance, container_image, metadata
        )
        led = self._ledger
        try:
            led.create_account(account, AccountKind.WALLET, owner=user_id, metadata=profile)
        except errors.IdempotencyConflict as exc:
            raise errors.AlreadyExists(
                f"user {user_id!r} exists with a different profile", param="user_id"
            ) from exc
        if amount:
            with provision_conflict(user_id):
                led.transfer(f"provision:{user_id}", funding_account_id(c.ledger.asset.symbol),
                             account, amount, code="topup")  # fmt: skip
        return c.get_user_now(user_id)

    def get_user(self, user_id: str) -> dict[str, Any]:
        return self._client.get_user_now(user_id)

    def list_users(self, *, after: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return self._client.list_users_now(after=after, limit=limit)

    def usage(self, user_id: str | None = None, **kw: Any) -> list[UsageRow]:
        return self._client.usage_now(user_id, **kw)

    def debit(
        self,
        user_id: str,
        amount: AmountLike,
        event: str,
        *,
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Charge:
        c = self._client
        atomic = parse_amount(amount, allow_zero=False)
        transfer_id = transfer_key(idempotency_key, "debit")
        with user_errors(user_id, event):
            return self._ledger.charge(transfer_id, wallet_id(user_id), c.revenue_account, atomic,
                                       code=event, metadata=metadata)  # fmt: skip

    def topup(
        self, user_id: str, amount: AmountLike, *, idempotency_key: str | None = None
    ) -> Transfer:
        atomic = credit_amount(amount)
        led = self._ledger
        with user_errors(user_id):
            return led.transfer(
                transfer_key(idempotency_key, "topup"),
                funding_account_id(self._client.ledger.asset.symbol), wallet_id(user_id), atomic,
                code="topup", resume=True,
            )  # fmt: skip

    def hibernate(self, user_id: str) -> dict[str, Any]:
        return self._set_status(user_id, AccountStatus.FROZEN)

    def restore(self, user_id: str) -> dict[str, Any]:
        return self._set_status(user_id, AccountStatus.OPEN)

    def _set_status(self, user_id: str, status: str) -> dict[str, Any]:
        with user_errors(user_id):
            return user_view(self._ledger.set_status(wallet_id(user_id), status))

    def create_session(
        self,
        user_id: str,
        provider: str,
        budget: AmountLike,
        expires_in: object = None,
        policy: Mapping[str, Any] | None = None,
    ) -> Session:
        c = self._client
        token, info = c._session_plan(user_id, provider, budget, expires_in, policy)
        for step, args, kw in c._session_steps(info):
            getattr(self._ledger, step)(*args, **kw)
        return c._session(token, info)

    def get_session(self, session: str) -> dict[str, Any]:
        return self._client.get_session_now(session)

    def close_session(self, session: str) -> dict[str, Any]:
        state = self._client.get_session_now(session)
        self._ledger.set_status("session:" + state["public_id"], AccountStatus.FROZEN)
        return self._client.get_session_now(session)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> SyncDripClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["DripClient", "SyncDripClient", "wallet_id"]
