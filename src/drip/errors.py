"""Every error Drip raises, as one tree.

Each class carries a stable ``code`` (snake_case, part of the public contract) and an
HTTP ``status`` used once at the web edge. Catch as broadly (``DripError``) or as
narrowly (``HoldAlreadyResolved``) as you need.
"""

from __future__ import annotations

from typing import Any, ClassVar


class DripError(Exception):
    """Base of every error Drip raises on purpose."""

    code: ClassVar[str] = "drip_error"
    type: ClassVar[str] = "api_error"
    status: ClassVar[int] = 400

    def __init__(self, message: str, *, param: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON error shape: ``{"error": {type, code, message, param}}``."""
        body: dict[str, Any] = {
            "type": self.type,
            "code": self.code,
            "message": self.message,
            "param": self.param,
        }
        return {"error": body}


# --- bad input ------------------------------------------------------------------------


class InvalidRequest(DripError):
    """The request is malformed: a field is missing, too long, or of the wrong shape."""

    code = "invalid_request"
    type = "invalid_request_error"
    status = 400


class InvalidAmount(InvalidRequest):
    """An amount is not a finite, non-negative number with at most the asset's decimals."""

    code = "invalid_amount"


class InvalidId(InvalidRequest):
    """An id (transfer, account, user) is empty, too long, or uses reserved characters."""

    code = "invalid_id"


# --- not found ------------------------------------------------------------------------


class NotFound(DripError):
    """The thing named does not exist."""

    code = "not_found"
    type = "not_found_error"
    status = 404


class AccountNotFound(NotFound):
    """A ledger account named by a transfer does not exist."""

    code = "account_not_found"


class UserNotFound(NotFound):
    """No user (wallet) has been provisioned under this id."""

    code = "user_not_found"


class HoldNotFound(NotFound):
    """A post or void names a hold that does not exist."""

    code = "hold_not_found"


# --- conflicts ------------------------------------------------------------------------


class Conflict(DripError):
    """The request conflicts with what the ledger already holds."""

    code = "conflict"
    type = "conflict_error"
    status = 409


class IdempotencyConflict(Conflict):
    """The id was used before with different fields. Ids are unique forever."""

    code = "idempotency_conflict"


class AlreadyExists(Conflict):
    """Something with this id already exists (and is not an idempotent replay)."""

    code = "already_exists"


class HoldAlreadyResolved(Conflict):
    """The hold was already posted, voided or expired; a hold resolves once."""

    code = "hold_already_resolved"


class HoldExpired(HoldAlreadyResolved):
    """The hold's timeout passed before it was posted or voided; its funds were released."""

    code = "hold_expired"


class LinkedEventFailed(Conflict):
    """This transfer was valid, but another transfer in its linked chain failed."""

    code = "linked_event_failed"


class InvalidTransfer(InvalidRequest):
    """The transfer breaks a ledger rule: same account twice, mixed assets, open chain..."""

    code = "invalid_transfer"


class AmountExceedsHold(InvalidTransfer):
    """A post asks for more than the hold reserved."""

    code = "amount_exceeds_hold"


class AssetMismatch(InvalidTransfer):
    """The two accounts of a transfer hold different assets."""

    code = "asset_mismatch"


class AccountFrozen(DripError):
    """The account is frozen (a paused user): it cannot be debited until it is resumed
    (a top-up resumes a paused user: a 402, as for a wallet without credit)."""

    code = "account_frozen"
    type = "payment_required_error"
    status = 402


# --- sessions and policies -------------------------------------------------------------


class SessionNotFound(NotFound):
    """No session has this token (or it was never issued here)."""

    code = "session_not_found"


class PolicyViolation(DripError):
    """The call is not allowed by the session's spend policy (the policy is named)."""

    code = "policy_violation"
    type = "permission_error"
    status = 403


class SessionExpired(PolicyViolation):
    """The session's expiry has passed; open a new one."""

    code = "session_expired"


class RateLimited(PolicyViolation):
    """A rolling window's amount or call cap is reached; retry after ``retry_after_s``."""

    code = "rate_limited"
    type = "rate_limit_error"
    status = 429

    @property
    def retry_after_s(self) -> int | None:
        """Whole seconds until the window admits the call again (``Retry-After``);
        ``None`` if the refusal did not say."""
        value = self.details.get("retry_after_s")
        return value if isinstance(value, int) and not isinstance(value, bool) else None


class SessionClosed(PolicyViolation):
    """The session was closed; open a new one."""

    code = "session_closed"


# --- money ----------------------------------------------------------------------------


class DripInsufficientCredits(DripError):
    """The wallet's available balance cannot cover the amount; nothing was charged."""

    code = "insufficient_credits"
    type = "payment_required_error"
    status = 402


InsufficientFunds = DripInsufficientCredits


class PayerRequired(DripError):
    """The call names no payer (no session token, no user the provider recognises): a
    402, but not a wallet short of credit (nothing to top up)."""

    code = "payer_required"
    type = "payment_required_error"
    status = 402


class SessionBudgetExhausted(DripInsufficientCredits):
    """The session's budget cannot cover the call (the wallet may still have funds)."""

    code = "session_budget_exhausted"


# --- infrastructure -------------------------------------------------------------------


class StoreError(DripError):
    """The database failed in a way the caller did not cause (connection lost, disk full)."""

    code = "store_unavailable"
    type = "api_error"
    status = 503


class InvariantViolation(DripError):
    """A ledger invariant does not hold. The ledger stops rather than continue wrong."""

    code = "invariant_violation"
    type = "api_error"
    status = 500


class ConfigError(DripError):
    """The configuration is invalid (unknown database URL scheme, bad fee rate...)."""

    code = "config_error"
    type = "invalid_request_error"
    status = 400


class ClientClosed(StoreError):
    """The client was closed, and the ledger it was given with it is its owner's: it
    cannot open another one by itself (a client that opened its own reopens on use)."""

    code = "client_closed"


__all__ = [
    "AccountFrozen",
    "ClientClosed",
    "PayerRequired",
    "AccountNotFound",
    "AlreadyExists",
    "AmountExceedsHold",
    "AssetMismatch",
    "ConfigError",
    "Conflict",
    "DripError",
    "DripInsufficientCredits",
    "HoldAlreadyResolved",
    "HoldExpired",
    "HoldNotFound",
    "IdempotencyConflict",
    "InsufficientFunds",
    "InvalidAmount",
    "InvalidId",
    "InvalidRequest",
    "InvalidTransfer",
    "InvariantViolation",
    "LinkedEventFailed",
    "NotFound",
    "PolicyViolation",
    "RateLimited",
    "SessionBudgetExhausted",
    "SessionClosed",
    "SessionExpired",
    "SessionNotFound",
    "StoreError",
    "UserNotFound",
]
