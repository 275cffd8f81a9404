"""Review fixes: what ``drip doctor`` checks (wallets whose overdraft rule was cleared,
holds that disagree with the transfer that resolved them, missing system accounts),
read-only commands that write nothing, control characters in stored text, malformed
``sqlite:`` URLs and ``drip.toml`` files."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from drip import DripConfig, errors
from drip.cli.main import app
from drip.ledger import AccountKind, Ledger, open_ledger
from drip.ledger.types import HoldState

WIDE = "200"
FUNDS = 1_000_000
W, R, FUND = "user:u1", "revenue:default", "funding:USDC"


def drip_cli(*args: str, url: str | None, columns: str = WIDE) -> Result:
    argv = [*args] if url is None else [*args, "--database-url", url]
    env = {"COLUMNS": columns, "DRIP_DATABASE_URL": None}
    return CliRunner().invoke(app, argv, env=env)  # type: ignore[arg-type]


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def one_error_line(result: Result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def row_of(output: str, first_cell: str) -> list[str]:
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("│") and line.endswith("│"):
            cells = [c.strip() for c in line[1:-1].split("│")]
            if cells[0] == first_cell:
                return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{output}")


def sql(url: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on the database behind the ledger's back (and commit it)."""
    if url.startswith("sqlite:"):
        with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
            rows = db.execute(statement, params).fetchall()
            db.commit()
            return rows
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement.replace("?", "%s").encode(), params)
        return list(cur.fetchall()) if cur.description else []


def doctor_rows(url: str) -> tuple[int, dict[str, str]]:
    """``drip doctor``'s exit code and each check's result."""
    result = drip_cli("doctor", url=url)
    assert "Traceback" not in result.output, result.output
    results = {}
    for line in result.stdout.splitlines():
        line = line.strip()
        if line.startswith("│") and line.endswith("│"):
            cells = [c.strip() for c in line[1:-1].split("│")]
            results[cells[0]] = cells[1]
    return result.exit_code, results


@pytest.fixture
def led(store_url: str) -> Iterator[Ledger]:
    ledger = open_ledger(store_url)
    try:
        ledger.sync.create_account(W, AccountKind.WALLET)
        ledger.sync.create_account(R, AccountKind.REVENUE)
        ledger.sync.transfer("topup", FUND, W, FUNDS, code="topup")
        yield ledger
    finally:
        ledger.close()


# --- 1. a wallet whose no-overdraft rule was cleared -----------------------------------


def test_doctor_fails_an_overdrawn_wallet_whose_rule_was_cleared(
    store_url: str, led: Ledger
) -> None:
    sql(store_url, "UPDATE accounts SET flags = 0 WHERE id = ?", (W,))
    led.sync.transfer("overspend", W, R, FUNDS + 5, code="search")  # nothing stops it now
    assert led.balance(W).available == -5

    code, checks = doctor_rows(store_url)

    assert code == 1
    assert checks["no wallet below zero"] == "FAILED"
    assert checks["every wallet refuses overdraft"] == "FAILED"
    assert checks["balances equal the fold of the journal"] == "ok"


def test_doctor_fails_a_wallet_without_the_overdraft_rule(store_url: str, led: Ledger) -> None:
    code, checks = doctor_rows(store_url)
    assert code == 0 and checks["every wallet refuses overdraft"] == "ok", checks

    sql(store_url, "UPDATE accounts SET flags = 0 WHERE id = ?", (W,))
    code, checks = doctor_rows(store_url)

    assert code == 1
    assert checks["every wallet refuses overdraft"] == "FAILED"
    assert checks["no wallet below zero"] == "ok"  # not overdrawn (yet)


# --- 2. holds that disagree with the transfer that resolved them -----------------------


@pytest.fixture
def holds(store_url: str) -> Iterator[str]:
    """A wallet with a hold of each state: open, posted (part of it), voided, expired."""
    now = [1_700_000_000_000_000]
    ledger = open_ledger(store_url, clock_us=lambda: now[0])
    try:
        ledger.sync.create_account(W, AccountKind.WALLET)
        ledger.sync.create_account(R, AccountKind.REVENUE)
        ledger.sync.transfer("topup", FUND, W, FUNDS, code="topup")
        ledger.sync.hold("h-open", W, R, 100, code="llm")
        ledger.sync.post(ledger.sync.hold("h-post", W, R, 100, code="llm"), 60)
        ledger.sync.void(ledger.sync.hold("h-void", W, R, 100, code="llm"))
        ledger.sync.hold("h-exp", W, R, 100, code="llm", timeout_s=1)
        now[0] += 5_000_000
        assert ledger.expire_holds() == 1
        states = {h: ledger.sync.get_hold(h) for h in ("h-open", "h-post", "h-void", "h-exp")}
        assert {h: s.state for h, s in states.items() if s} == {
            "h-open": HoldState.PENDING, "h-post": HoldState.POSTED,
            "h-void": HoldState.VOIDED, "h-exp": HoldState.EXPIRED,
        }  # fmt: skip
        assert ledger.check_invariants().ok
    finally:
        ledger.close()
    yield store_url


HOLD_CORRUPTIONS = {
    # the review's case: a voided hold rewritten as posted while its void remains
    "voided-rewritten-as-posted": "UPDATE transfers SET hold_state = 1, "
    "hold_resolved_amount = 100 WHERE id = 'h-void'",
    "open-hold-without-state": "UPDATE transfers SET hold_state = NULL WHERE id = 'h-open'",
    "posted-hold-without-state": "UPDATE transfers SET hold_state = NULL WHERE id = 'h-post'",
    "posted-without-resolved-amount": "UPDATE transfers SET hold_resolved_amount = NULL "
    "WHERE id = 'h-post'",
    "open-hold-without-resolved-amount": "UPDATE transfers SET hold_resolved_amount = NULL "
    "WHERE id = 'h-open'",
    "posted-amount-differs": "UPDATE transfers SET hold_resolved_amount = 59 WHERE id = 'h-post'",
    "expired-rewritten-as-voided": "UPDATE transfers SET hold_state = 2 WHERE id = 'h-exp'",
    "voided-rewritten-as-expired": "UPDATE transfers SET hold_state = 3 WHERE id = 'h-void'",
    "posted-rewritten-as-voided": "UPDATE transfers SET hold_state = 2, "
    "hold_resolved_amount = 0 WHERE id = 'h-post'",
    "open-marked-voided-without-a-void": "UPDATE transfers SET hold_state = 2 WHERE id = 'h-open'",
    "unknown-state": "UPDATE transfers SET hold_state = 7 WHERE id = 'h-void'",
    "resolved-by-another-transfer": "UPDATE transfers SET hold_resolved_by = 'topup' "
    "WHERE id = 'h-void'",
}


@pytest.mark.parametrize("corruption", sorted(HOLD_CORRUPTIONS))
def test_doctor_fails_a_hold_that_disagrees_with_its_resolution(
    holds: str, corruption: str
) -> None:
    code, checks = doctor_rows(holds)
    assert code == 0 and checks["every hold resolved at most once"] == "ok", checks

    sql(holds, HOLD_CORRUPTIONS[corruption])
    code, checks = doctor_rows(holds)

    assert code == 1, checks
    assert checks["every hold resolved at most once"] == "FAILED", checks


def test_doctor_names_a_hold_resolved_twice(holds: str) -> None:
    sql(
        holds,
        "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, code, flags, "
        "pending_id, timeout_s, ts_us) SELECT 'h-void~again', debit_account_id, "
        "credit_account_id, amount, code, flags, pending_id, timeout_s, ts_us FROM transfers "
        "WHERE id = 'h-void~void'",
    )
    result = drip_cli("doctor", url=holds)
    assert result.exit_code == 1
    assert row_of(result.stdout, "every hold resolved at most once")[1] == "FAILED"
    assert "h-void" in row_of(result.stdout, "every hold resolved at most once")[2]


# --- 3. control characters in stored text ----------------------------------------------

NASTY = "a\x1b]8;;http://evil.example\x1b\\click me\x1b]8;;\x1b\\\x1b[2J\x9b31m\x07\u202eb"


def test_stored_control_characters_are_shown_as_escapes(sqlite_url: str) -> None:
    ledger = open_ledger(sqlite_url)  # stored as another writer might have
    try:
        ledger.sync.create_account(W, AccountKind.WALLET, metadata={"email": NASTY})
    finally:
        ledger.close()
    ok(drip_cli("keys", "create", "--label", "team\x1b[2Jx", url=sqlite_url))

    for args in (["wallet", "list"], ["wallet", "show", "u1"], ["keys", "list"]):
        out = ok(drip_cli(*args, url=sqlite_url))
        for raw in ("\x1b", "\x9b", "\x07", "\u202e"):
            assert raw not in out, (args, out)
    listed = ok(drip_cli("wallet", "list", url=sqlite_url))
    assert row_of(listed, "u1")[4].startswith(r"a\x1b]8;;http://evil.example\x1b\click me")
    assert r"\x1b[2J\x9b31m\x07\u202eb" in listed
    assert r"team\x1b[2Jx" in ok(drip_cli("keys", "list", url=sqlite_url))


def test_the_rest_api_refuses_control_characters_in_an_email(
    sqlite_url: str, run_app: Callable[[object], str]
) -> None:
    from drip.server import create_app

    rest = create_app(DripConfig(database_url=sqlite_url))
    token, _ = rest.state.keys.create("admin", "tests")
    base = run_app(rest)
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as http:
        for email in (NASTY, "a\nb@example.com", "a\x85b@example.com"):
            r = http.post("/v1/wallets", json={"user_id": "victim", "email": email})
            assert r.status_code == 422, r.text
            assert r.json()["error"]["param"] == "email"
        assert http.get("/v1/wallets/victim").status_code == 404
        r = http.post("/v1/wallets", json={"user_id": "fine", "email": "ünï@example.com"})
        assert r.status_code == 201 and r.json()["email"] == "ünï@example.com"


# --- 4. read-only commands write nothing ------------------------------------------------


def test_doctor_reports_a_missing_system_account_and_does_not_recreate_it(
    store_url: str, led: Ledger
) -> None:
    code, checks = doctor_rows(store_url)
    assert code == 0 and checks["system accounts exist (USDC)"] == "ok", checks

    sql(store_url, "DELETE FROM accounts WHERE id = 'fee:USDC'")
    code, checks = doctor_rows(store_url)

    assert code == 1
    assert checks["system accounts exist (USDC)"] == "FAILED"
    assert sql(store_url, "SELECT id FROM accounts WHERE id = 'fee:USDC'") == []


READ_COMMANDS = [["doctor"], ["wallet", "list"], ["wallet", "show", "u1"], ["usage"],
                 ["keys", "list"]]  # fmt: skip


@pytest.mark.parametrize("command", READ_COMMANDS, ids=" ".join)
def test_read_commands_refuse_an_old_schema_and_do_not_migrate_it(
    store_url: str, led: Ledger, command: list[str]
) -> None:
    migrations = "SELECT component, version FROM drip_migrations ORDER BY component, version"
    sql(store_url, "DELETE FROM drip_migrations WHERE component = 'ledger' AND version = 2")
    before = sql(store_url, migrations)

    line = one_error_line(drip_cli(*command, url=store_url, columns="80"))

    assert line == (
        "error (store_unavailable): database schema at version 1, Drip needs 2: run a "
        "write command or `drip serve` to migrate"
    )
    assert sql(store_url, migrations) == before


def test_keys_list_creates_no_table(store_url: str, led: Ledger) -> None:
    def tables() -> list[str]:
        if store_url.startswith("sqlite:"):
            query = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
        else:
            query = "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1"
        return [row[0] for row in sql(store_url, query)]

    before = tables()
    assert "api_keys" not in before

    out = ok(drip_cli("keys", "list", url=store_url))

    assert "key id" in out  # the header, no rows
    assert tables() == before
    assert sql(store_url, "SELECT version FROM drip_migrations WHERE component = 'api_keys'") == []


def test_a_read_only_ledger_refuses_every_write(store_url: str, led: Ledger) -> None:
    ledger = open_ledger(store_url, read_only=True)
    try:
        assert ledger.balance(W).available == FUNDS
        assert ledger.check_invariants().ok
        with pytest.raises(errors.StoreError, match="read-only"):
            ledger.sync.transfer("t1", W, R, 1, code="search")
        with pytest.raises(errors.StoreError, match="read-only"):
            ledger.expire_holds()
    finally:
        ledger.close()
    assert sql(store_url, "SELECT id FROM transfers WHERE id = 't1'") == []


async def test_a_read_only_ledger_refuses_async_writes(store_url: str, led: Ledger) -> None:
    ledger = open_ledger(store_url, read_only=True)
    try:
        with pytest.raises(errors.StoreError, match="read-only"):
            await ledger.transfer("t1", W, R, 1, code="search")
    finally:
        ledger.close()
    assert sql(store_url, "SELECT id FROM transfers WHERE id = 't1'") == []


def test_a_read_only_open_creates_no_sqlite_file(tmp_path: Path) -> None:
    with pytest.raises(errors.StoreError, match="no SQLite database"):
        open_ledger(f"sqlite:///{tmp_path}/typo.db", read_only=True)
    assert list(tmp_path.iterdir()) == []


# --- 6. a sqlite: URL without // -------------------------------------------------------


@pytest.mark.parametrize(
    "command", [["doctor"], ["wallet", "list"], ["wallet", "create", "u1"], ["demo"]], ids=" ".join
)
def test_a_sqlite_url_without_slashes_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)

    line = one_error_line(drip_cli(*command, url="sqlite:typo.db", columns="80"))

    assert line.startswith("error (config_error): 'sqlite:typo.db' is not a SQLite URL: use "
                           "sqlite:///path"), line  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_open_ledger_refuses_a_sqlite_url_without_slashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.ConfigError, match="sqlite:///path"):
        open_ledger("sqlite:typo.db")
    assert list(tmp_path.iterdir()) == []


# --- 7. a malformed drip.toml ----------------------------------------------------------


def test_a_malformed_drip_toml_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "drip.toml").write_text("fee_bps = \n")

    with pytest.raises(ValueError, match=f"^{tmp_path / 'drip.toml'}: "):
        DripConfig()
    line = one_error_line(drip_cli("wallet", "list", url=None, columns="200"))
    assert line.startswith(f"error (config_error): {tmp_path / 'drip.toml'}: "), line
    assert "line 1" in line
