"""Drip: programmable billing for APIs and AI agents.

Prepaid wallets in exact USDC atomic units, metered calls that hold before they run and
capture after, and a ledger that never overdraws. Start with :class:`DripClient`.
"""

from drip.config import DripConfig
from drip.errors import (
    DripError,
    DripInsufficientCredits,
    IdempotencyConflict,
    InvalidAmount,
    UserNotFound,
)
from drip.metering import DripClient, SyncDripClient, configure, last_charge, meter
from drip.money import USDC, format_amount, parse_amount, to_decimal

__version__ = "0.1.0"

__all__ = [
    "USDC",
    "DripClient",
    "DripConfig",
    "DripError",
    "DripInsufficientCredits",
    "IdempotencyConflict",
    "InvalidAmount",
    "SyncDripClient",
    "UserNotFound",
    "__version__",
    "configure",
    "format_amount",
    "last_charge",
    "meter",
    "parse_amount",
    "to_decimal",
]
