"""Ledger records: accounts, transfers, holds, balances, and the limits that bound them."""

from __future__ import annotations

import enum
import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from drip.errors import InvalidId, InvalidRequest
from drip.money import AMOUNT_ATOMIC_MAX as _MAX
from drip.money import check_atomic

#: Most operations coalesced into one store transaction (group commit).
BATCH_OPS_MAX = 1024
#: Most transfers in one linked chain.
CHAIN_TRANSFERS_MAX = 64
#: Longest id (transfer, account); longest event code.
ID_LENGTH_MAX = 160
CODE_LENGTH_MAX = 64
#: Largest metadata object, serialised.
METADATA_BYTES_MAX = 4096
#: Deepest nesting of metadata's objects and arrays (the object itself is level 1).
METADATA_DEPTH_MAX = 32
#: Longest hold timeout: 30 days.
TIMEOUT_S_MAX = 30 * 24 * 3600
#: Most rows one history page returns.
PAGE_LIMIT_MAX = 1000

#: an id of up to 160 characters, then (ids the ledger derives from it) ``~`` and a suffix
#: (``<id>~post``, ``<id>~cap0~post``): a caller's longest id still has its derived ones
_ID_RE = re.compile(r"[A-Za-z0-9_.:@/+=-]{1,160}(~[A-Za-z0-9_.:@/+=~-]{1,40})?")
_CODE_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")
_ID_MATCH = _ID_RE.fullmatch
_CODE_MATCH = _CODE_RE.fullmatch
#: Separator of ids the ledger derives from a caller's id (``<id>~fee``); callers cannot use it.
DERIVED_SEP = "~"
#: In the id of a plain (not resolving) transfer: a late charge, ``<hold>~post`` charged
#: afresh after its hold expired (``Ledger.charge_after_expiry``), or one of its legs.
#: Rolling windows leave it out: the expired hold it settles still counts, in full.
LATE_CHARGE_MARK = f"{DERIVED_SEP}post"


class AccountKind(enum.StrEnum):
    WALLET = "wallet"
    REVENUE = "revenue"
    FEE = "fee"
    FUNDING = "funding"
    ESCROW = "escrow"
    SESSION = "session"


class AccountFlags(enum.IntFlag):
    NONE = 0
    #: available = credits_posted - debits_posted - debits_pending must stay >= 0.
    DEBITS_MUST_NOT_EXCEED_CREDITS = 1
    #: the mirror rule, for accounts that may only be net-debited.
    CREDITS_MUST_NOT_EXCEED_DEBITS = 2


class TransferFlags(enum.IntFlag):
    NONE = 0
    #: this transfer and the next commit all-or-nothing.
    LINKED = 1
    #: reserve the amount (a hold); resolve later with POST_PENDING or VOID_PENDING.
    PENDING = 2
    #: capture up to the hold's amount; the rest is released.
    POST_PENDING = 4
    #: release the hold.
    VOID_PENDING = 8
    #: written by the ledger when a hold's timeout passes (a void nobody asked for).
    EXPIRE_PENDING = 16


class AccountStatus(enum.StrEnum):
    OPEN = "open"
    #: cannot be debited (a paused user); credits still land.
    FROZEN = "frozen"


class HoldState(enum.IntEnum):
    PENDING = 0
    POSTED = 1
    VOIDED = 2
    EXPIRED = 3


def check_id(value: object, param: str = "id", *, caller: bool = False) -> str:
    """Validate an id; ``caller=True`` also refuses the ``~`` the ledger keeps for itself."""
    if (
        not isinstance(value, str)
        or not _ID_RE.fullmatch(value)
        or (caller and DERIVED_SEP in value)
    ):
        raise InvalidId(
            f"{param} must be 1-{ID_LENGTH_MAX} characters of letters, digits and _.:@/+=- "
            f"(got {str(value)[:40]!r})",
            param=param,
        )
    return value


def check_code(value: object, param: str = "code") -> str:
    if not isinstance(value, str) or not _CODE_RE.fullmatch(value):
        raise InvalidRequest(
            f"{param} must be 1-{CODE_LENGTH_MAX} characters of letters, digits and _.:/-",
            param=param,
        )
    return value


def check_text(value: object, param: str, max_length: int = ID_LENGTH_MAX) -> str:
    """Free text a record stores as given (an account's owner): 1-``max_length``
    characters, with no control character (NUL among them: PostgreSQL stores none, and
    its driver would fail the whole batch the value rode in) and no lone surrogate (not
    UTF-8: neither database's driver can send it)."""
    if not isinstance(value, str) or not 0 < len(value) <= max_length or has_control(value):
        raise InvalidRequest(
            f"{param} must be 1-{max_length} characters of text, none a control character",
            param=param,
        )
    return value


def has_control(text: str) -> bool:
    """Whether ``text`` holds a control character (``Cc``: C0, DEL, C1) or a lone
    surrogate (``Cs``); other characters that are not "printable" (spaces, joiners,
    private use) are text like any other."""
    return not text.isprintable() and any(unicodedata.category(c) in ("Cc", "Cs") for c in text)


def encode_metadata(metadata: Mapping[str, Any] | None, param: str = "metadata") -> str | None:
    """Canonical JSON for metadata (sorted keys), size-bounded; ``None`` stays ``None``."""
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise InvalidRequest(f"{param} must be an object", param=param)
    try:
        text = json.dumps(metadata, sort_keys=True, separators=(",", ":"), allow_nan=False)
        _utf8(metadata)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidRequest(f"{param} must be JSON-serialisable: {exc}", param=param) from exc
    if len(text.encode()) > METADATA_BYTES_MAX:
        raise InvalidRequest(f"{param} is larger than {METADATA_BYTES_MAX} bytes", param=param)
    _check_depth(metadata, param)
    return text


def _check_depth(value: object, param: str = "metadata") -> None:
    """Metadata nested deeper than ``METADATA_DEPTH_MAX``: a row every reader (an API's
    serialiser, a client's JSON parser) may choke on, so it is never stored."""
    level: list[object] = [value]
    for _ in range(METADATA_DEPTH_MAX):
        level = [child for item in level if isinstance(item, dict | list)
                 for child in (item.values() if isinstance(item, dict) else item)]  # fmt: skip
        if not level:
            return
    if any(isinstance(item, dict | list) for item in level):
        raise InvalidRequest(f"{param} is nested deeper than {METADATA_DEPTH_MAX} levels",
                             param=param)  # fmt: skip


def _utf8(value: object) -> None:
    """Raise UnicodeEncodeError (a ValueError) if a string in ``value`` is not UTF-8 text:
    ``json.dumps`` escapes a lone surrogate (``"\\ud800"``) that no response could carry."""
    json.dumps(value, ensure_ascii=False).encode()


def _check_encoded_metadata(text: object) -> None:
    """A spec's metadata as ``encode_metadata`` makes it: a JSON object, size-bounded."""
    if type(text) is not str:
        raise InvalidRequest("metadata must be a JSON object (encode_metadata)", param="metadata")
    if len(text) > METADATA_BYTES_MAX or len(text.encode()) > METADATA_BYTES_MAX:
        raise InvalidRequest(f"metadata is larger than {METADATA_BYTES_MAX} bytes",
                             param="metadata")  # fmt: skip
    try:
        decoded = json.loads(text)
        ok = isinstance(decoded, dict)
        _utf8(decoded)
    except (ValueError, RecursionError):  # includes UnicodeEncodeError
        ok = False
    if not ok:
        raise InvalidRequest("metadata must be a JSON object", param="metadata")
    _check_depth(decoded)


def decode_metadata(text: str | None) -> dict[str, Any]:
    return dict(json.loads(text)) if text else {}


@dataclass(slots=True)
class Account:
    """An account and its four counters (atomic units). Balances derive from the counters."""

    id: str
    kind: str
    asset: str
    flags: int = 0
    owner: str | None = None
    status: str = AccountStatus.OPEN
    metadata: str | None = None
    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0
    created_us: int = 0

    def copy(self) -> Account:
        return Account(
            self.id, self.kind, self.asset, self.flags, self.owner, self.status, self.metadata,
            self.debits_posted, self.credits_posted, self.debits_pending, self.credits_pending,
            self.created_us,
        )  # fmt: skip

    @property
    def balance(self) -> Balance:
        posted = self.credits_posted - self.debits_posted
        if self.flags & AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS:
            return Balance(posted, self.credits_pending, posted + self.credits_pending)
        return Balance(posted, self.debits_pending, posted - self.debits_pending)

    @property
    def meta(self) -> dict[str, Any]:
        return decode_metadata(self.metadata)


@dataclass(frozen=True, slots=True)
class Balance:
    """``posted`` is settled; ``pending`` is reserved by open holds; ``available`` is spendable."""

    posted: int
    pending: int
    available: int


@dataclass(slots=True)
class Transfer:
    """An immutable journal entry. ``id`` is the caller's idempotency key, unique forever."""

    id: str
    debit_account_id: str
    credit_account_id: str
    amount: int
    code: str
    flags: int = 0
    pending_id: str | None = None
    timeout_s: int = 0
    metadata: str | None = None
    ts_us: int = 0
    seq: int = 0
    #: set on what a create returns when the id existed already (an idempotent replay:
    #: nothing moved this time); never stored
    replayed: bool = field(default=False, compare=False, repr=False)

    @property
    def meta(self) -> dict[str, Any]:
        return decode_metadata(self.metadata)

    def copy(self) -> Transfer:
        return Transfer(
            self.id, self.debit_account_id, self.credit_account_id, self.amount, self.code,
            self.flags, self.pending_id, self.timeout_s, self.metadata, self.ts_us, self.seq,
        )  # fmt: skip

    def fingerprint(self) -> tuple[object, ...]:
        """The fields an idempotent replay must repeat exactly."""
        return (
            self.debit_account_id, self.credit_account_id, self.amount, self.code,
            self.flags & ~TransferFlags.LINKED, self.pending_id, self.timeout_s, self.metadata,
        )  # fmt: skip


@dataclass(slots=True)
class Hold:
    """The mutable state of a pending transfer: it resolves exactly once."""

    id: str
    debit_account_id: str
    credit_account_id: str
    amount: int
    expires_us: int | None
    state: int = HoldState.PENDING
    resolved_amount: int = 0
    resolved_by: str | None = None

    def copy(self) -> Hold:
        return Hold(
            self.id, self.debit_account_id, self.credit_account_id, self.amount,
            self.expires_us, self.state, self.resolved_amount, self.resolved_by,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class WindowLimit:
    """At most ``max_amount`` (atomic units) and ``max_calls`` debits of an account within
    any ``window_s`` seconds, counting open holds; checked by the engine atomically with
    the transfer that carries it."""

    window_s: int
    max_amount: int | None = None
    max_calls: int | None = None
    name: str = "window"


@dataclass(slots=True)
class TransferSpec:
    """A transfer as a caller asks for it (before the ledger stamps it).

    For ``POST_PENDING``/``VOID_PENDING`` the accounts may be left empty (taken from the
    hold) and ``amount=None`` posts the hold's full amount.
    """

    id: str
    debit_account_id: str = ""
    credit_account_id: str = ""
    amount: int | None = 0
    code: str = "transfer"
    flags: int = 0
    pending_id: str | None = None
    timeout_s: int = 0
    metadata: str | None = None
    #: rolling limits on the debit account (not stored: a rule, not a fact)
    limits: tuple[WindowLimit, ...] = ()
    #: a frozen (paused) credit account is opened by this transfer, in its transaction,
    #: when the transfer is new; a replay opens nothing (not stored)
    resume_credit: bool = False
    #: a late charge settling a call admitted earlier, whose hold expired while it ran: a
    #: frozen (paused, closed) debit account does not refuse it, as the hold's capture
    #: would not have (not stored)
    settles: bool = False

    def validate(self) -> None:
        """Refuse a malformed transfer with a typed error (fast path first: this runs
        for every operation)."""
        flags = self.flags
        if type(flags) is not int:
            if not isinstance(flags, int) or isinstance(flags, bool):
                raise InvalidRequest("flags must be TransferFlags or an int", param="flags")
            flags = self.flags = int(flags)  # a TransferFlags member: store the plain int
        if flags & ~_SPEC_FLAGS:
            raise InvalidRequest("unknown transfer flags", param="flags")
        kind = flags & _KIND_FLAGS
        if kind & (kind - 1):
            raise InvalidRequest(
                "a transfer is at most one of pending, post or void", param="flags"
            )
        if not (type(self.id) is str and _ID_MATCH(self.id)):
            check_id(self.id, "id")
        if type(self.code) is not str or self.code not in _KNOWN_CODES:
            if not (type(self.code) is str and _CODE_MATCH(self.code)):
                check_code(self.code, "code")
            _known(_KNOWN_CODES, self.code)
        amount = self.amount
        if kind & _RESOLVE_FLAGS:
            if not (type(self.pending_id) is str and _ID_MATCH(self.pending_id)):
                check_id(self.pending_id, "pending_id")
            if amount is not None and not (type(amount) is int and 0 <= amount <= _MAX):
                check_atomic(amount, param="amount")
            for value, name in ((self.debit_account_id, "debit_account_id"),
                                (self.credit_account_id, "credit_account_id")):  # fmt: skip
                # "" (the default): the hold's own account
                if value != "" and (type(value) is not str or value not in _KNOWN_ACCOUNTS):
                    check_id(value, name)
                    _known(_KNOWN_ACCOUNTS, value)
        else:
            if self.pending_id is not None:
                raise InvalidRequest("pending_id is only for post and void", param="pending_id")
            for value, name in ((self.debit_account_id, "debit_account_id"),
                                (self.credit_account_id, "credit_account_id")):  # fmt: skip
                if type(value) is not str or value not in _KNOWN_ACCOUNTS:
                    if not (type(value) is str and _ID_MATCH(value)):
                        check_id(value, name)
                    _known(_KNOWN_ACCOUNTS, value)
            if not (type(amount) is int and 0 < amount <= _MAX):
                check_atomic(amount, allow_zero=False, param="amount")
        metadata = self.metadata
        if metadata is not None:
            _check_encoded_metadata(metadata)
        timeout_s = self.timeout_s
        if timeout_s or type(timeout_s) is not int:
            if type(timeout_s) is not int:
                raise InvalidRequest(f"timeout_s must be an int in 0..{TIMEOUT_S_MAX}",
                                     param="timeout_s")  # fmt: skip
            if not kind & _PENDING_FLAG:
                raise InvalidRequest("timeout_s is only for pending transfers", param="timeout_s")
            if not 0 < timeout_s <= TIMEOUT_S_MAX:
                raise InvalidRequest(
                    f"timeout_s must be an int in 1..{TIMEOUT_S_MAX}", param="timeout_s"
                )


#: Account ids and codes already found well-formed (the same few recur in every call);
#: a set lookup instead of a regex. Only exact ``str`` values enter; bounded.
_KNOWN_ACCOUNTS: set[object] = set()
_KNOWN_CODES: set[object] = set()
_KNOWN_MAX = 4096


def _known(seen: set[object], value: object) -> None:
    if type(value) is str:
        if len(seen) >= _KNOWN_MAX:
            seen.clear()
        seen.add(value)


_PENDING_FLAG = int(TransferFlags.PENDING)
_KIND_FLAGS = int(TransferFlags.PENDING | TransferFlags.POST_PENDING | TransferFlags.VOID_PENDING)
_RESOLVE_FLAGS = int(TransferFlags.POST_PENDING | TransferFlags.VOID_PENDING)
#: flags a caller may set; EXPIRE_PENDING is the ledger's own
_SPEC_FLAGS = _KIND_FLAGS | int(TransferFlags.LINKED)


@dataclass(frozen=True, slots=True)
class AccountSpec:
    id: str
    kind: str
    asset: str
    flags: int = 0
    owner: str | None = None
    metadata: str | None = None

    def fingerprint(self) -> tuple[object, ...]:
        return (self.kind, self.asset, self.flags, self.owner, self.metadata)


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing; pass ``next_cursor`` back to get the next (None at the end)."""

    items: list[Transfer]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class UsageRow:
    code: str
    bucket_start_us: int
    calls: int
    amount: int


@dataclass(slots=True)
class InvariantReport:
    """What ``drip doctor`` prints: each invariant, whether it holds, and the evidence."""

    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(passed for _, passed, _ in self.checks)

    def add(self, name: str, passed: bool, detail: str) -> None:
        self.checks.append((name, passed, detail))
