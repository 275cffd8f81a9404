"""Exact money: atomic-unit integers inside, ``Decimal`` or strings at the edges.

USDC has 6 decimals, so ``1_000_000`` atomic units are one dollar. Every amount that
enters Drip passes through :func:`parse_amount`; every amount shown to a person
passes through :func:`format_amount`. Nothing else converts.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from drip.errors import InvalidAmount

#: Largest amount the ledger stores (a signed 64-bit column): about 9.2 trillion USDC.
AMOUNT_ATOMIC_MAX = 2**63 - 1

#: Whole-unit digits an amount may have (the ledger's range is about 9.2e12 USDC).
_WHOLE_DIGITS_MAX = 18
#: ASCII digits only: ``\d`` alone takes any Unicode digit (Arabic-Indic, full-width)
#: ``1_000.000_001``: an underscore only ever between two digits
_GROUPED_RE = re.compile(r"[+-]?[0-9](_?[0-9])*(\.([0-9](_?[0-9])*)?)?")
_DECIMAL_RE = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,4})?")


@dataclass(frozen=True, slots=True)
class Asset:
    """A fungible asset the ledger counts in integers of ``10**-decimals``."""

    symbol: str
    decimals: int

    @property
    def scale(self) -> int:
        return int(10**self.decimals)


USDC = Asset("USDC", 6)

AmountLike = int | str | Decimal | float


def _to_decimal(value: object, param: str) -> Decimal:
    if isinstance(value, bool):
        raise InvalidAmount(f"{param} must be a number, not a bool", param=param)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidAmount(f"{param} must be finite, got {value!r}", param=param)
        # str() gives the shortest repr, so 0.007 is read as written, not as 0.00699999...
        value = str(value)
    if isinstance(value, str):
        text = value.strip()
        if "_" in text:  # digit grouping as Python writes it: between digits only
            if not _GROUPED_RE.fullmatch(text):
                raise InvalidAmount(f"{param} is not a decimal number: {value[:64]!r}",
                                    param=param)  # fmt: skip
            text = text.replace("_", "")
        if len(text) > 64 or not _DECIMAL_RE.fullmatch(text):
            raise InvalidAmount(f"{param} is not a decimal number: {value[:64]!r}", param=param)
        try:
            return Decimal(text)
        except InvalidOperation as exc:  # pragma: no cover - the regex already guards this
            raise InvalidAmount(f"{param} is not a decimal number", param=param) from exc
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise InvalidAmount(f"{param} must be finite, got {value}", param=param)
        return value
    raise InvalidAmount(
        f"{param} must be a str, Decimal, int or float, not {type(value).__name__}", param=param
    )


def parse_amount(
    value: object,
    asset: Asset = USDC,
    *,
    allow_zero: bool = True,
    allow_negative: bool = False,
    param: str = "amount",
) -> int:
    """Convert a human amount (``"0.007"``, ``Decimal("5")``, ``5``, ``0.01``) to atomic units.

    ``int`` values are *whole units of the asset* (``5`` is five dollars), as in the SDK's
    ``initial_balance=5``; use :func:`atomic` for a count of atomic units. Raises
    :class:`InvalidAmount` for NaN, infinities, excess precision, negatives (unless
    ``allow_negative``), zero (unless ``allow_zero``) and amounts beyond the ledger's range.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        units = value * asset.scale
    else:
        units = _decimal_to_atomic(_to_decimal(value, param), asset, value, param)
    return check_atomic(units, allow_zero=allow_zero, allow_negative=allow_negative, param=param)


def _decimal_to_atomic(dec: Decimal, asset: Asset, shown: object, param: str) -> int:
    """Exact conversion on the digits themselves: no Decimal context, so no rounding
    at 28 digits and no Overflow on huge exponents."""
    if dec.is_zero():
        return 0
    if dec.adjusted() > _WHOLE_DIGITS_MAX:
        raise InvalidAmount(f"{param} is out of range: {str(shown)[:40]}", param=param,
                            above_max=not dec.is_signed())  # fmt: skip
    sign, digits, exponent = dec.as_tuple()
    assert isinstance(exponent, int)  # finite: checked by _to_decimal
    shift = exponent + asset.decimals
    if shift < 0:
        if any(digits[shift:]):
            raise InvalidAmount(
                f"{param} has more than {asset.decimals} decimal places: {str(shown)[:40]}",
                param=param,
            )
        digits, shift = digits[:shift], 0
    units = int("".join(map(str, digits)) or "0") * int(10**shift)
    return -units if sign else units


def check_atomic(
    units: object,
    *,
    allow_zero: bool = True,
    allow_negative: bool = False,
    param: str = "amount",
) -> int:
    """Validate a count of atomic units already in integer form and return it."""
    if not isinstance(units, int) or isinstance(units, bool):
        raise InvalidAmount(
            f"{param} in atomic units must be an int, not {type(units).__name__}", param=param
        )
    if units < 0 and not allow_negative:
        raise InvalidAmount(f"{param} must not be negative", param=param)
    if units == 0 and not allow_zero:
        raise InvalidAmount(f"{param} must be greater than zero", param=param)
    if abs(units) > AMOUNT_ATOMIC_MAX:
        # ``above_max``: too large a positive amount (a cost may be capped instead)
        raise InvalidAmount(f"{param} is out of range", param=param, above_max=units > 0)
    return units


def atomic(units: int, *, param: str = "amount") -> int:
    """Mark an integer as a count of atomic units (validated, returned unchanged)."""
    return check_atomic(units, param=param)


def to_decimal(units: int, asset: Asset = USDC) -> Decimal:
    """Atomic units to an exact ``Decimal`` in whole units of the asset.

    Built from its digits, so it is exact whatever the caller's decimal context (its
    precision, its traps): ``Decimal.scaleb`` would round to the context's precision."""
    units = operator.index(units)
    digits = tuple(map(int, str(abs(units))))
    return Decimal((1 if units < 0 else 0, digits, -asset.decimals))


def format_amount(units: int, asset: Asset = USDC, *, symbol: bool = False) -> str:
    """Atomic units to a display string with exactly the asset's decimals: ``"1.500000"``."""
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), asset.scale)
    text = f"{sign}{whole}.{frac:0{asset.decimals}d}"
    return f"{text} {asset.symbol}" if symbol else text


def format_plain(units: int, asset: Asset = USDC) -> str:
    """Atomic units to the shortest exact decimal string (``"0.007"``), for APIs and headers."""
    text = format_amount(units, asset)
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text if text not in ("", "-") else "0"


__all__ = [
    "AMOUNT_ATOMIC_MAX",
    "USDC",
    "AmountLike",
    "Asset",
    "atomic",
    "check_atomic",
    "format_amount",
    "format_plain",
    "parse_amount",
    "to_decimal",
]


#: Most one credit may add, in atomic units (10^9 USDC): a top-up, a positive adjustment,
#: a wallet's initial balance, a checkout. Every credit is drawn from the one funding
#: account, whose debit counter is a signed 64-bit integer (about 9.2 * 10^12 USDC): a
#: typo such as "9000000000000" would otherwise bring it near overflow, after which every
#: top-up of every user fails.
CREDIT_ATOMIC_MAX = 10**15


def credit_amount(value: object, param: str = "amount", *, allow_zero: bool = False) -> int:
    """An amount credited to a wallet (from the funding account), in atomic units:
    refused above ``CREDIT_ATOMIC_MAX``."""
    units = parse_amount(value, allow_zero=allow_zero, param=param)
    if units > CREDIT_ATOMIC_MAX:
        raise InvalidAmount(
            f"{param} is above the most one credit may add ({format_plain(CREDIT_ATOMIC_MAX)} "
            "USDC)", param=param,
        )  # fmt: skip
    return units
