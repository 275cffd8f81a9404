"""A paying httpx transport: answers 402s with a local key, within a spend policy checked
*before* anything is signed, and keeps a record of what it paid.

The x402 SDK (``x402Client`` with the EVM exact scheme) builds and signs the payment;
Drip decides whether it may: max per call, budgets per rolling hour and day, allowed
recipients, networks and assets. A refused payment is not signed; the 402 comes back to
the caller with the refusal in ``X-Drip-Payment-Refused``. Options it cannot sign (another
scheme, a network that is not EVM) are passed over for the next one.

A signed authorization can be settled by whoever holds it until it expires, whatever the
server answered: once signed, a payment counts against the budgets as a settled one does
(a 402 or 500 to the paid retry does not make it unspent), and its lifetime is the
policy's ``max_timeout_s`` at most, never longer because a server asked for it.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

import httpx
from eth_account.signers.local import LocalAccount
from x402 import x402Client
from x402.http.utils import (
    decode_payment_required_header,
    decode_payment_response_header,
    encode_payment_signature_header,
)
from x402.mechanisms.evm.exact import register_exact_evm_client
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.schemas import PaymentRequired, PaymentRequirements, matches_network_pattern

from drip.money import parse_amount

#: default lifetime of a signed authorization: time to serve and settle, not hours
MAX_TIMEOUT_S = 300
#: an amount as x402 writes it: a positive integer in decimal digits, at most a uint256
#: The shortest authorization lifetime a policy may ask for: servers refuse a payment
#: that expires within their settle margin (X402Meter's default is 30 s).
MIN_TIMEOUT_S = 60
_AMOUNT = re.compile(r"[1-9][0-9]{0,77}")
#: what the SDK's EVM exact scheme signs for: ``eip155:<chain id>``
_EVM_NETWORK = re.compile(r"eip155:[1-9][0-9]{0,19}")
#: the refusal when no option is one this client can sign
CANNOT_SIGN = "no payment option this client can sign (exact on eip155)"


@dataclass(frozen=True, slots=True)
class SpendPolicy:
    """Limits in atomic units; ``None`` means no limit. Sets compare lower-cased.
    ``max_timeout_s``: the longest a signed authorization stays valid (a server's
    ``maxTimeoutSeconds`` may only shorten it)."""

    max_per_call: int | None = None
    budget_per_hour: int | None = None
    budget_per_day: int | None = None
    allowed_recipients: frozenset[str] | None = None
    allowed_networks: frozenset[str] | None = None
    allowed_assets: frozenset[str] | None = None
    max_timeout_s: int = MAX_TIMEOUT_S

    def __post_init__(self) -> None:
        if type(self.max_timeout_s) is not int or not MIN_TIMEOUT_S <= self.max_timeout_s <= 86_400:
            # shorter than a server's settle margin (Drip's default 30 s), every payment
            # would be refused after signing, and each would still count in the budget
            raise ValueError(f"max_timeout_s must be an int of seconds in {MIN_TIMEOUT_S}..86400")

    @classmethod
    def of(
        cls,
        *,
        max_per_call: object = None,
        budget_per_hour: object = None,
        budget_per_day: object = None,
        allowed_recipients: object = None,
        allowed_networks: object = None,
        allowed_assets: object = None,
        max_timeout_s: int = MAX_TIMEOUT_S,
    ) -> SpendPolicy:
        """Amounts as people write them (``"0.05"``); addresses in any case."""

        def amount(value: object, name: str) -> int | None:
            return None if value is None else parse_amount(value, allow_zero=False, param=name)

        def names(value: object) -> frozenset[str] | None:
            return None if value is None else frozenset(str(v).lower() for v in value)  # type: ignore[attr-defined]

        return cls(amount(max_per_call, "max_per_call"), amount(budget_per_hour, "budget_per_hour"),
                   amount(budget_per_day, "budget_per_day"), names(allowed_recipients),
                   names(allowed_networks), names(allowed_assets), max_timeout_s)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Payment:
    """One payment this transport made."""

    url: str
    amount: int
    pay_to: str
    asset: str
    network: str
    at_s: float
    transaction: str | None = None


@dataclass
class _Ledger:
    payments: deque[Payment] = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def spent_since(self, since_s: float) -> int:
        return sum(p.amount for p in self.payments if p.at_s >= since_s)


class PolicyRefused(Exception):
    """The spend policy does not allow this payment (nothing was signed)."""


def amount_of(req: PaymentRequirements) -> int:
    """The option's amount; PolicyRefused unless it is a canonical positive integer (a
    negative one would raise the budget it is recorded against)."""
    amount = req.amount
    if not isinstance(amount, str) or not _AMOUNT.fullmatch(amount) or int(amount) >= 2**256:
        raise PolicyRefused("amount is not a positive integer")
    return int(amount)


def check(policy: SpendPolicy, spent: _Ledger, req: PaymentRequirements, now_s: float) -> int:
    """The option's amount, when the policy allows paying it; PolicyRefused otherwise."""
    amount = amount_of(req)
    rules = [
        (policy.allowed_networks is not None
         and str(req.network).lower() not in policy.allowed_networks, "network not allowed"),
        (policy.allowed_assets is not None and req.asset.lower() not in policy.allowed_assets,
         "asset not allowed"),
        (policy.allowed_recipients is not None
         and req.pay_to.lower() not in policy.allowed_recipients, "recipient not allowed"),
        (policy.max_per_call is not None and amount > policy.max_per_call,
         "more than max_per_call"),
        (policy.budget_per_hour is not None
         and spent.spent_since(now_s - 3600) + amount > policy.budget_per_hour,
         "hourly budget exhausted"),
        (policy.budget_per_day is not None
         and spent.spent_since(now_s - 86_400) + amount > policy.budget_per_day,
         "daily budget exhausted"),
    ]  # fmt: skip
    for broken, reason in rules:
        if broken:
            raise PolicyRefused(reason)
    return amount


class PayingTransport(httpx.AsyncBaseTransport):
    """``httpx.AsyncClient(transport=PayingTransport(account, policy))``."""

    def __init__(self, account: LocalAccount, policy: SpendPolicy,
                 inner: httpx.AsyncBaseTransport | None = None) -> None:  # fmt: skip
        self.policy = policy
        self.inner = inner or httpx.AsyncHTTPTransport()
        self._x402 = x402Client()
        register_exact_evm_client(self._x402, EthAccountSigner(account))
        self._x402.set_spend_controls(False)  # Drip's policy below decides
        #: (network pattern, scheme) the SDK client is registered to sign, x402 v2
        self._kinds = [(k["network"], k["scheme"]) for k in self._x402.get_registered_schemes()[2]]
        self._spent = _Ledger()

    def can_sign(self, option: PaymentRequirements) -> bool:
        """Whether the option is one this client signs: ``exact`` on an ``eip155`` network
        it is registered for (another scheme or a Solana network would make the SDK raise)."""
        network = str(option.network)
        return (
            option.scheme == "exact"
            and _EVM_NETWORK.fullmatch(network) is not None
            and any(scheme == option.scheme and matches_network_pattern(network, pattern)
                    for pattern, scheme in self._kinds)
        )  # fmt: skip

    @property
    def payments(self) -> list[Payment]:
        """What this transport paid, oldest first."""
        return list(self._spent.payments)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        header = response.headers.get("payment-required")
        if response.status_code != 402 or header is None or "payment-signature" in request.headers:
            return response
        await response.aread()
        try:
            required = decode_payment_required_header(header)
        except Exception:  # noqa: BLE001 - a server's junk (any shape, any depth): nothing to pay
            response.headers["X-Drip-Payment-Refused"] = "unreadable PAYMENT-REQUIRED"
            return response
        if not isinstance(required, PaymentRequired) or not required.accepts:
            return response
        now_s = time.time()
        with self._spent.lock:  # decide and reserve atomically across concurrent requests
            allowed: PaymentRequirements | None = None
            refusal = CANNOT_SIGN
            for option in required.accepts:
                if not self.can_sign(option):
                    continue  # another kind of payment: perhaps a later option is payable
                try:
                    amount = check(self.policy, self._spent, option, now_s)
                except PolicyRefused as exc:
                    refusal = str(exc)
                    continue
                allowed = option
                break
            if allowed is None:
                response.headers["X-Drip-Payment-Refused"] = refusal
                return response
            record = Payment(str(request.url), amount, allowed.pay_to, allowed.asset,
                             str(allowed.network), now_s)  # fmt: skip
            self._spent.payments.append(record)
        # the authorization is valid for the policy's lifetime at most (the SDK signs for
        # the option's maxTimeoutSeconds, and for an hour when that is 0)
        asked = allowed.max_timeout_seconds
        lifetime = min(asked, self.policy.max_timeout_s) if asked > 0 else self.policy.max_timeout_s
        signing = allowed.model_copy(update={"max_timeout_seconds": lifetime})
        try:
            payload = await self._x402.create_payment_payload(
                required.model_copy(update={"accepts": [signing]})
            )
        except BaseException:
            with self._spent.lock:  # nothing was signed: nothing is spent
                self._spent.payments.remove(record)
            raise
        # ``accepted`` echoes the server's option as offered (servers match on it); the
        # shorter lifetime is in the signed authorization only
        payload = payload.model_copy(update={"accepted": allowed})
        request.headers["PAYMENT-SIGNATURE"] = encode_payment_signature_header(payload)
        # from here on the authorization exists: it stays counted whatever happens next
        paid = await self.inner.handle_async_request(request)
        tx = _settled_transaction(paid.headers.get("payment-response"))
        if tx is not None:
            with self._spent.lock:
                at = self._spent.payments.index(record)
                self._spent.payments[at] = replace(record, transaction=tx)
        return paid

    async def aclose(self) -> None:
        await self.inner.aclose()


def _settled_transaction(header: str | None) -> str | None:
    """The transaction a ``PAYMENT-RESPONSE`` reports settled, if it is readable."""
    if header is None:
        return None
    try:
        settlement = decode_payment_response_header(header)
    except Exception:  # noqa: BLE001 - a server's junk does not undo the payment: it stays counted
        return None
    return settlement.transaction if settlement.success and settlement.transaction else None
