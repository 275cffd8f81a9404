"""A paying httpx transport: answers 402s with a local key, within a spend policy checked
*before* anything is signed, and keeps a record of what it paid.

The x402 SDK (``x402Client`` with the EVM exact scheme) builds and signs the payment;
Drip decides whether it may: max per call, budgets per rolling hour and day, allowed
recipients, networks and assets. A refused payment is not signed; the 402 comes back to
the caller with the refusal in ``X-Drip-Payment-Refused``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

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
from x402.schemas import PaymentRequired, PaymentRequirements

from drip.money import parse_amount


@dataclass(frozen=True, slots=True)
class SpendPolicy:
    """Limits in atomic units; ``None`` means no limit. Sets compare lower-cased."""

    max_per_call: int | None = None
    budget_per_hour: int | None = None
    budget_per_day: int | None = None
    allowed_recipients: frozenset[str] | None = None
    allowed_networks: frozenset[str] | None = None
    allowed_assets: frozenset[str] | None = None

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
    ) -> SpendPolicy:
        """Amounts as people write them (``"0.05"``); addresses in any case."""

        def amount(value: object, name: str) -> int | None:
            return None if value is None else parse_amount(value, allow_zero=False, param=name)

        def names(value: object) -> frozenset[str] | None:
            return None if value is None else frozenset(str(v).lower() for v in value)  # type: ignore[attr-defined]

        return cls(amount(max_per_call, "max_per_call"), amount(budget_per_hour, "budget_per_hour"),
                   amount(budget_per_day, "budget_per_day"), names(allowed_recipients),
                   names(allowed_networks), names(allowed_assets))  # fmt: skip


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


def check(policy: SpendPolicy, spent: _Ledger, req: PaymentRequirements, now_s: float) -> None:
    amount = int(req.amount)
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


class PayingTransport(httpx.AsyncBaseTransport):
    """``httpx.AsyncClient(transport=PayingTransport(account, policy))``."""

    def __init__(self, account: LocalAccount, policy: SpendPolicy,
                 inner: httpx.AsyncBaseTransport | None = None) -> None:  # fmt: skip
        self.policy = policy
        self.inner = inner or httpx.AsyncHTTPTransport()
        self._x402 = x402Client()
        register_exact_evm_client(self._x402, EthAccountSigner(account))
        self._x402.set_spend_controls(False)  # Drip's policy below decides
        self._spent = _Ledger()

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
        required = decode_payment_required_header(header)
        if not isinstance(required, PaymentRequired) or not required.accepts:
            return response
        now_s = time.time()
        with self._spent.lock:  # decide and reserve atomically across concurrent requests
            allowed: PaymentRequirements | None = None
            refusal = "no acceptable payment option"
            for option in required.accepts:
                try:
                    check(self.policy, self._spent, option, now_s)
                except PolicyRefused as exc:
                    refusal = str(exc)
                    continue
                allowed = option
                break
            if allowed is None:
                response.headers["X-Drip-Payment-Refused"] = refusal
                return response
            record = Payment(str(request.url), int(allowed.amount), allowed.pay_to,
                             allowed.asset, str(allowed.network), now_s)  # fmt: skip
            self._spent.payments.append(record)
        only = required.model_copy(update={"accepts": [allowed]})
        payload = await self._x402.create_payment_payload(only)
        request.headers["PAYMENT-SIGNATURE"] = encode_payment_signature_header(payload)
        paid = await self.inner.handle_async_request(request)
        settlement = paid.headers.get("payment-response")
        with self._spent.lock:
            self._spent.payments.remove(record)
            if settlement is not None and paid.status_code < 400:
                tx = decode_payment_response_header(settlement).transaction
                self._spent.payments.append(
                    Payment(record.url, record.amount, record.pay_to, record.asset,
                            record.network, record.at_s, tx)
                )  # fmt: skip
        return paid

    async def aclose(self) -> None:
        await self.inner.aclose()
