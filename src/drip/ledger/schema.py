"""The ledger's versioned schema. Append a Migration; never edit one that has shipped.

A pending transfer (a hold) carries its resolution in the ``hold_*`` columns of its own
row, the only columns of a transfer that ever change, and only once. The CHECK
constraints repeat the engine's rules in the database, so a bug in Python
cannot commit an overdraft: the batch fails instead.
"""

from __future__ import annotations

from drip.ledger.store import Migration

_V1_SQLITE = """
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    asset TEXT NOT NULL,
    flags INTEGER NOT NULL,
    owner TEXT,
    status TEXT NOT NULL DEFAULT 'open',
    metadata TEXT,
    debits_posted INTEGER NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    credits_posted INTEGER NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
    debits_pending INTEGER NOT NULL DEFAULT 0 CHECK (debits_pending >= 0),
    credits_pending INTEGER NOT NULL DEFAULT 0 CHECK (credits_pending >= 0),
    created_us INTEGER NOT NULL,
    CHECK ((flags & 1) = 0 OR debits_posted + debits_pending <= credits_posted),
    CHECK ((flags & 2) = 0 OR credits_posted + credits_pending <= debits_posted)
) WITHOUT ROWID;
CREATE INDEX accounts_kind ON accounts (kind, id);

CREATE TABLE transfers (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    debit_account_id TEXT NOT NULL,
    credit_account_id TEXT NOT NULL,
    amount INTEGER NOT NULL CHECK (amount >= 0),
    code TEXT NOT NULL,
    flags INTEGER NOT NULL,
    pending_id TEXT,
    timeout_s INTEGER NOT NULL,
    metadata TEXT,
    ts_us INTEGER NOT NULL,
    hold_expires_us INTEGER,
    hold_state INTEGER,
    hold_resolved_amount INTEGER,
    hold_resolved_by TEXT,
    CHECK (hold_resolved_amount IS NULL OR hold_resolved_amount <= amount)
);
CREATE INDEX transfers_debit ON transfers (debit_account_id, seq);
CREATE INDEX transfers_credit ON transfers (credit_account_id, seq);
CREATE INDEX transfers_holds_due ON transfers (hold_expires_us)
    WHERE hold_state = 0 AND hold_expires_us IS NOT NULL;
"""

_V1_POSTGRES = """
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    asset TEXT NOT NULL,
    flags INTEGER NOT NULL,
    owner TEXT,
    status TEXT NOT NULL DEFAULT 'open',
    metadata TEXT,
    debits_posted BIGINT NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    credits_posted BIGINT NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
    debits_pending BIGINT NOT NULL DEFAULT 0 CHECK (debits_pending >= 0),
    credits_pending BIGINT NOT NULL DEFAULT 0 CHECK (credits_pending >= 0),
    created_us BIGINT NOT NULL,
    CHECK ((flags & 1) = 0 OR debits_posted + debits_pending <= credits_posted),
    CHECK ((flags & 2) = 0 OR credits_posted + credits_pending <= debits_posted)
);
CREATE INDEX accounts_kind ON accounts (kind, id);

CREATE TABLE transfers (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    debit_account_id TEXT NOT NULL,
    credit_account_id TEXT NOT NULL,
    amount BIGINT NOT NULL CHECK (amount >= 0),
    code TEXT NOT NULL,
    flags INTEGER NOT NULL,
    pending_id TEXT,
    timeout_s INTEGER NOT NULL,
    metadata TEXT,
    ts_us BIGINT NOT NULL,
    hold_expires_us BIGINT,
    hold_state SMALLINT,
    hold_resolved_amount BIGINT,
    hold_resolved_by TEXT,
    CHECK (hold_resolved_amount IS NULL OR hold_resolved_amount <= amount)
);
CREATE INDEX transfers_debit ON transfers (debit_account_id, seq);
CREATE INDEX transfers_credit ON transfers (credit_account_id, seq);
CREATE INDEX transfers_holds_due ON transfers (hold_expires_us)
    WHERE hold_state = 0 AND hold_expires_us IS NOT NULL;
"""

# PostgreSQL's optimistic writer resolves a hold with a compare-and-set that writes -1
# when the hold is no longer pending; this constraint turns that into an abort.
_V2_POSTGRES = """
ALTER TABLE transfers ADD CONSTRAINT transfers_hold_state_check
    CHECK (hold_state IS NULL OR hold_state >= 0);
"""

LEDGER_MIGRATIONS = (
    Migration(1, _V1_SQLITE, _V1_POSTGRES),
    Migration(2, "", _V2_POSTGRES),
)
