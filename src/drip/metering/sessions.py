"""Budgeted sessions: ``create_session(user_id, provider, budget)`` gives a token sent as
``X-Drip-Session``; every call holds against the session's budget and the user's wallet
in one linked chain, so neither can be overspent.

A session is a ``session`` account in the ledger, credited with its budget from a memo
account of its own, ``<session account>:src`` (the wallet's money does not move until
calls are captured; sessions opened by older versions use the shared ``budget:<asset>``).
Only the SHA-256 of the token is stored: the account id is derived from it.
Closing freezes the account, so no new call can hold against it; calls in flight still
capture or void. The session's facts (user, provider, expiry, policy) are fixed at
creation and kept in the account's metadata.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from drip import errors
from drip.ledger import Account, AccountKind, AccountStatus
from drip.ledger.types import WindowLimit, check_id
from drip.money import AmountLike, format_plain, parse_amount

TOKEN_PREFIX = "ds_"
SESSION_PREFIX = "session:"
#: Longest a session may live.
EXPIRES_IN_S_MAX = 90 * 86_400
#: Sessions whose facts one client keeps in memory.
SESSION_CACHE_MAX = 10_000
_TOKEN_RE = re.compile(r"ds_[A-Za-z0-9_-]{43}")
_POLICY_KEYS = {"max_per_call", "allow_events", "deny_events", "windows", "routes"}
_PERIODS = {"minute": 60, "hour": 3600, "day": 86_400}
#: Most rolling windows and route budgets one session may carry.
POLICY_RULES_MAX = 8


def budget_account_id(asset: str) -> str:
    """The memo account session budgets come from and return to."""
    return f"budget:{asset}"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def session_account_id(token: str) -> str:
    """The ledger account of a session: derived from the token's digest, never the token."""
    if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
        raise errors.SessionNotFound("no such session", param="X-Drip-Session")
    return SESSION_PREFIX + hashlib.sha256(token.encode()).hexdigest()[:40]


@dataclass(frozen=True, slots=True)
class Policy:
    """Static spend rules checked before a call holds anything.

    ``max_per_call`` (atomic units) caps what one call may reserve; ``allow_events`` /
    ``deny_events`` are glob patterns of event names (``"llm_*"``).
    """

    max_per_call: int | None = None
    allow_events: tuple[str, ...] | None = None
    deny_events: tuple[str, ...] = ()
    #: rolling caps on the session: amount and/or calls per minute, hour, day or N seconds
    windows: tuple[WindowLimit, ...] = ()
    #: a budget of its own for the events matching each pattern (within the session's),
    #: sorted by pattern: route ``i`` draws on the session's account ``:r<i>``, and the
    #: stored policy (JSON with sorted keys) must give back the same order
    routes: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        routes = tuple(sorted(self.routes))
        if len({pattern for pattern, _ in routes}) != len(routes):
            raise errors.InvalidRequest("a route pattern appears twice", param="policy.routes")
        object.__setattr__(self, "routes", routes)

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | Policy | None) -> Policy:
        if raw is None:
            return cls()
        if isinstance(raw, Policy):
            return raw
        if not isinstance(raw, Mapping):
            raise errors.InvalidRequest("policy must be an object", param="policy")
        unknown = set(raw) - _POLICY_KEYS
        if unknown:
            raise errors.InvalidRequest(
                f"unsupported policy rules {sorted(unknown)}; supported: {sorted(_POLICY_KEYS)}",
                param="policy",
            )
        max_per_call = raw.get("max_per_call")
        return cls(
            max_per_call=None if max_per_call is None else parse_amount(
                max_per_call, allow_zero=False, param="policy.max_per_call"
            ),
            allow_events=_patterns(raw.get("allow_events"), "allow_events"),
            deny_events=_patterns(raw.get("deny_events"), "deny_events") or (),
            windows=_windows(raw.get("windows")),
            routes=_routes(raw.get("routes")),
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        def usdc(units: int | None) -> str | None:
            return None if units is None else format_plain(units)

        return {
            "max_per_call": usdc(self.max_per_call),
            "allow_events": None if self.allow_events is None else list(self.allow_events),
            "deny_events": list(self.deny_events),
            "windows": [{"per": w.window_s, "max_amount": usdc(w.max_amount),
                         "max_calls": w.max_calls} for w in self.windows],
            "routes": {pattern: {"budget": usdc(budget)} for pattern, budget in self.routes},
        }  # fmt: skip

    def route_indexes(self, event: str) -> list[int]:
        """Which route budgets a call of ``event`` also draws on."""
        return [i for i, (pattern, _) in enumerate(self.routes)
                if fnmatch.fnmatchcase(event, pattern)]  # fmt: skip

    def check(self, event: str, amount: int) -> None:
        """Raise PolicyViolation (naming the rule) if a call of ``event`` holding
        ``amount`` is not allowed."""
        if any(fnmatch.fnmatchcase(event, p) for p in self.deny_events):
            raise errors.PolicyViolation(
                f"event {event!r} is denied by this session's policy", param="deny_events",
                policy="deny_events",
            )  # fmt: skip
        if self.allow_events is not None and not any(
            fnmatch.fnmatchcase(event, p) for p in self.allow_events
        ):
            raise errors.PolicyViolation(
                f"event {event!r} is not in this session's allow list", param="allow_events",
                policy="allow_events",
            )  # fmt: skip
        if self.max_per_call is not None and amount > self.max_per_call:
            raise errors.PolicyViolation(
                f"this call may cost up to {format_plain(amount)} USDC; the session allows "
                f"{format_plain(self.max_per_call)} per call",
                param="max_per_call",
                policy="max_per_call",
            )


def _windows(raw: object) -> tuple[WindowLimit, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Sequence) or isinstance(raw, str) or len(raw) > POLICY_RULES_MAX:
        raise errors.InvalidRequest(
            f"policy.windows must be a list of at most {POLICY_RULES_MAX} rules",
            param="policy.windows",
        )
    out = []
    for rule in raw:
        if not isinstance(rule, Mapping) or set(rule) - {"per", "max_amount", "max_calls"}:
            raise errors.InvalidRequest(
                "a window is {per, max_amount?, max_calls?}", param="policy.windows"
            )
        per = rule.get("per")
        seconds = _PERIODS.get(per) if isinstance(per, str) else per
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int)
            or not (0 < seconds <= 31 * 86_400)
        ):
            raise errors.InvalidRequest(
                "window per must be minute, hour, day or seconds up to 31 days",
                param="policy.windows",
            )  # fmt: skip
        max_amount = rule.get("max_amount")
        max_calls = rule.get("max_calls")
        if max_calls is not None and (
            isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls <= 0
        ):
            raise errors.InvalidRequest("max_calls must be a positive int", param="policy.windows")
        if max_amount is None and max_calls is None:
            raise errors.InvalidRequest(
                "a window needs max_amount or max_calls", param="policy.windows"
            )
        amount = None if max_amount is None else parse_amount(
            max_amount, allow_zero=False, param="policy.windows.max_amount"
        )  # fmt: skip
        out.append(WindowLimit(seconds, amount, max_calls, f"window_{seconds}s"))
    return tuple(out)


def _routes(raw: object) -> tuple[tuple[str, int], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping) or len(raw) > POLICY_RULES_MAX:
        raise errors.InvalidRequest(
            f"policy.routes maps at most {POLICY_RULES_MAX} event patterns to budgets",
            param="policy.routes",
        )
    out = []
    for pattern, rule in raw.items():
        if not isinstance(pattern, str) or not 0 < len(pattern) <= 64:
            raise errors.InvalidRequest("route patterns are 1-64 characters", param="policy.routes")
        if not isinstance(rule, Mapping) or set(rule) != {"budget"}:
            raise errors.InvalidRequest("a route rule is {budget}", param="policy.routes")
        out.append((pattern, parse_amount(rule["budget"], allow_zero=False,
                                          param="policy.routes.budget")))  # fmt: skip
    return tuple(out)


def _patterns(raw: object, name: str) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise errors.InvalidRequest(f"policy.{name} must be a list of event patterns",
                                    param=f"policy.{name}")  # fmt: skip
    out = []
    for item in raw:
        if not isinstance(item, str) or not 0 < len(item) <= 64:
            raise errors.InvalidRequest(f"policy.{name} entries are strings of 1-64 characters",
                                        param=f"policy.{name}")  # fmt: skip
        out.append(item)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A session's fixed facts, as stored in its account's metadata."""

    account_id: str
    user_id: str
    provider: str
    budget: int
    expires_us: int | None
    policy: Policy = field(default_factory=Policy)
    #: the memo account its budgets come from and its calls credit: the session's own
    #: (``<account>:src``), so no counter is shared by every session; ``None`` for
    #: sessions opened before it existed, which use ``budget:<asset>``
    source: str | None = None
    #: which ``:r<slot>`` account each route (in sorted order) draws on; empty: route i
    #: draws on ``:r<i>``. Only sessions opened before the routes were kept sorted need
    #: it (their accounts were created in the caller's order; see DripClient)
    route_slots: tuple[int, ...] = ()

    @classmethod
    def from_account(cls, account: Account) -> SessionInfo:
        meta = account.meta
        return cls(
            account.id, meta["user_id"], meta["provider"], int(meta["budget"]),
            meta.get("expires_us"), Policy.parse(meta.get("policy")), meta.get("source"),
        )  # fmt: skip

    def route_account(self, index: int) -> str:
        """The account of route ``index`` (of ``policy.routes``)."""
        slot = self.route_slots[index] if self.route_slots else index
        return f"{self.account_id}:r{slot}"

    def route_pattern(self, account_id: str) -> str | None:
        """The pattern whose budget ``account_id`` holds, if it is one of this session's."""
        for index, (pattern, _) in enumerate(self.policy.routes):
            if self.route_account(index) == account_id:
                return pattern
        return None

    def source_account(self, asset: str) -> str:
        return self.source or budget_account_id(asset)

    def metadata(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "provider": self.provider, "budget": self.budget,
                "expires_us": self.expires_us, "policy": self.policy.to_json(),
                "source": self.source}  # fmt: skip

    def expired(self, now_us: int | None = None) -> bool:
        now_us = time.time_ns() // 1000 if now_us is None else now_us
        return self.expires_us is not None and now_us >= self.expires_us


@dataclass(frozen=True, slots=True)
class Session:
    """What ``create_session`` returns. ``id`` is the bearer token for ``X-Drip-Session``
    (shown once); ``public_id`` names the session in admin APIs and logs."""

    id: str = field(repr=False)  # a bearer token: never in a printed Session
    public_id: str
    user_id: str
    provider: str
    budget: Decimal
    expires_at_us: int | None
    policy: Policy


def session_view(account: Account, now_us: int | None = None) -> dict[str, Any]:
    """A session's state: budget, spent, pending, remaining, status."""
    info = SessionInfo.from_account(account)
    balance = account.balance
    if account.status == AccountStatus.FROZEN:
        status = "closed"
    elif info.expired(now_us):
        status = "expired"
    else:
        status = "open"
    return {
        "public_id": account.id.removeprefix(SESSION_PREFIX),
        "user_id": info.user_id,
        "provider": info.provider,
        "status": status,
        "budget": info.budget,
        "spent": account.debits_posted,
        "pending": balance.pending,
        "remaining": max(balance.available, 0) if status == "open" else 0,
        "expires_at_us": info.expires_us,
        "policy": info.policy.to_json(),
    }


def expires_at(expires_in: object, now_us: int) -> int | None:
    if expires_in is None:
        return None
    seconds = getattr(expires_in, "total_seconds", lambda: expires_in)()
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not (0 < seconds <= EXPIRES_IN_S_MAX)
    ):
        raise errors.InvalidRequest(
            f"expires_in must be a number of seconds in 1..{EXPIRES_IN_S_MAX}",
            param="expires_in",
        )  # fmt: skip
    return now_us + int(seconds * 1_000_000)


def session_specs(
    user_id: str, provider: str, budget: AmountLike, expires_in: object, policy: object
) -> tuple[str, SessionInfo]:
    """Validate ``create_session``'s arguments; returns a new token and the session's facts."""
    check_id(user_id, "user_id", caller=True)
    check_id(provider, "provider", caller=True)
    amount = parse_amount(budget, allow_zero=False, param="budget")
    parsed = Policy.parse(policy)  # type: ignore[arg-type]
    token = new_token()
    account_id = session_account_id(token)
    info = SessionInfo(
        account_id, user_id, provider, amount,
        expires_at(expires_in, time.time_ns() // 1000), parsed, f"{account_id}:src",
    )  # fmt: skip
    return token, info


def public_account_id(public_id: str) -> str:
    if not isinstance(public_id, str) or not re.fullmatch(r"[0-9a-f]{40}", public_id):
        raise errors.SessionNotFound(f"no session {str(public_id)[:48]!r}", param="session")
    return SESSION_PREFIX + public_id


__all__ = [
    "AccountKind",
    "Policy",
    "Session",
    "SessionInfo",
    "budget_account_id",
    "session_account_id",
    "session_view",
]
