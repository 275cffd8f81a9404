"""A double-entry ledger of atomic-unit integers with holds, linked chains and
idempotent ids, on SQLite (default) or PostgreSQL. See DESIGN.md section 3."""

from drip.ledger.ledger import (
    FEE_ACCOUNT_ID,
    Charge,
    Ledger,
    SyncLedger,
    fee_account_id,
    funding_account_id,
    open_ledger,
    open_store,
)
from drip.ledger.store import Store
from drip.ledger.types import (
    Account,
    AccountFlags,
    AccountKind,
    AccountStatus,
    Balance,
    Hold,
    HoldState,
    InvariantReport,
    Page,
    Transfer,
    TransferFlags,
    TransferSpec,
    UsageRow,
)

__all__ = [
    "FEE_ACCOUNT_ID",
    "Account",
    "AccountFlags",
    "AccountKind",
    "AccountStatus",
    "Balance",
    "Charge",
    "Hold",
    "HoldState",
    "InvariantReport",
    "Ledger",
    "Page",
    "Store",
    "SyncLedger",
    "Transfer",
    "TransferFlags",
    "TransferSpec",
    "UsageRow",
    "fee_account_id",
    "funding_account_id",
    "open_ledger",
    "open_store",
]
