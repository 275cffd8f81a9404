"""The ``drip`` command: wallets, usage, doctor, demo; errors are one line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from drip import DripClient, DripConfig, errors
from drip.cli.main import app
from drip.ledger import AccountKind, open_ledger

#: Wide enough that no table cell wraps; the error tests use 80, what a pipe or CI log gets.
WIDE = "200"
DRIP_BIN = Path(sys.executable).with_name("drip")


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/cli.db"


def drip_cli(*args: str, url: str | None, columns: str = WIDE) -> Result:
    argv = [*args] if url is None else [*args, "--database-url", url]
    env = {"COLUMNS": columns, "DRIP_DATABASE_URL": None}
    return CliRunner().invoke(app, argv, env=env)  # type: ignore[arg-type]


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    assert "Traceback" not in result.output
    return result.stdout


def row_of(output: str, first_cell: str) -> list[str]:
    """The cells of the table row whose first cell is ``first_cell``."""
    for line in output.splitlines():
        line = line.strip()
        if not (line.startswith("│") and line.endswith("│")):
            continue
        cells = [c.strip() for c in line[1:-1].split("│")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{output}")


def empty_ledger(url: str) -> None:
    """Create the (empty) database at ``url``: commands that only read never do."""
    open_ledger(url).close()


def user_of(url: str, user_id: str) -> dict[str, Any]:
    client = DripClient(DripConfig(database_url=url))
    try:
        return client.sync.get_user(user_id)
    finally:
        client.close()


# --- wallets --------------------------------------------------------------------------


def test_wallet_flow(store_url: str) -> None:
    out = ok(drip_cli("wallet", "create", "u1", "--initial-balance", "5", url=store_url))
    assert row_of(out, "u1") == ["u1", "active", "5.000000", "0.000000", ""]

    # the same command twice changes nothing
    out = ok(drip_cli("wallet", "create", "u1", "--initial-balance", "5", url=store_url))
    assert row_of(out, "u1")[2] == "5.000000"

    out = ok(drip_cli("wallet", "show", "u1", url=store_url))
    assert row_of(out, "u1") == ["u1", "active", "5.000000", "0.000000", ""]

    out = ok(drip_cli("wallet", "topup", "u1", "2.50", url=store_url))
    assert row_of(out, "u1")[2] == "7.500000"

    user = user_of(store_url, "u1")
    assert user["balance_usdc"] == Decimal("7.5")
    assert user["status"] == "active"

    out = ok(drip_cli("doctor", url=store_url))
    assert "FAILED" not in out


def test_wallet_create_with_email_and_list(db_url: str) -> None:
    ok(drip_cli("wallet", "create", "u2", "-b", "0.25", "--email", "u2@example.com", url=db_url))
    ok(drip_cli("wallet", "create", "u1", "--initial-balance", "5", url=db_url))

    out = ok(drip_cli("wallet", "list", url=db_url))

    assert row_of(out, "u1") == ["u1", "active", "5.000000", "0.000000", ""]
    assert row_of(out, "u2") == ["u2", "active", "0.250000", "0.000000", "u2@example.com"]
    assert out.index("u1") < out.index("u2")
    assert "more:" not in out


def test_wallet_list_pages(db_url: str) -> None:
    for user in ("a", "b", "c"):
        ok(drip_cli("wallet", "create", user, "-b", "1", url=db_url))

    first = ok(drip_cli("wallet", "list", "--limit", "2", url=db_url))
    assert row_of(first, "a") and row_of(first, "b")
    assert "more: drip wallet list --after b" in first

    rest = ok(drip_cli("wallet", "list", "--limit", "2", "--after", "b", url=db_url))
    assert row_of(rest, "c")
    with pytest.raises(AssertionError):
        row_of(rest, "a")


def test_wallet_list_empty(db_url: str) -> None:
    empty_ledger(db_url)
    out = ok(drip_cli("wallet", "list", url=db_url))
    assert "user" in out  # the header, no rows
    with pytest.raises(AssertionError):
        row_of(out, "u1")


def test_topup_resumes_paused_user(db_url: str) -> None:
    client = DripClient(DripConfig(database_url=db_url))
    try:
        client.sync.provision_user("u1", initial_balance="1")
        client.sync.hibernate("u1")
    finally:
        client.close()
    assert row_of(ok(drip_cli("wallet", "show", "u1", url=db_url)), "u1")[1] == "paused"

    out = ok(drip_cli("wallet", "topup", "u1", "1", url=db_url))

    assert row_of(out, "u1")[1:3] == ["active", "2.000000"]


def test_topup_idempotency_key(db_url: str) -> None:
    ok(drip_cli("wallet", "create", "u1", url=db_url))
    for _ in range(2):
        ok(drip_cli("wallet", "topup", "u1", "1.5", "--idempotency-key", "pay_1", url=db_url))

    assert user_of(db_url, "u1")["balance_usdc"] == Decimal("1.5")


def test_database_url_from_environment(db_url: str) -> None:
    result = CliRunner().invoke(
        app,
        ["wallet", "create", "envuser", "-b", "3"],
        env={"DRIP_DATABASE_URL": db_url, "COLUMNS": WIDE},
    )
    ok(result)

    assert user_of(db_url, "envuser")["balance_usdc"] == Decimal("3")


# --- usage ----------------------------------------------------------------------------


def test_usage_lists_events(store_url: str) -> None:
    client = DripClient(DripConfig(database_url=store_url))
    try:
        client.sync.provision_user("u1", initial_balance="1")
        client.sync.provision_user("u2", initial_balance="1")
        for _ in range(3):
            client.sync.debit("u1", "0.007", "web_search")
        client.sync.debit("u1", "0.05", "llm_call")
        client.sync.debit("u2", "0.1", "export")
        client.sync.topup("u1", "1")  # not usage
    finally:
        client.close()

    out = ok(drip_cli("usage", url=store_url))
    events = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip()[1:-1].split("│")]
        if len(cells) == 4 and cells[0] not in ("total", ""):
            events[cells[1]] = cells[2:]
    assert events == {
        "web_search": ["3", "0.021000"],
        "llm_call": ["1", "0.050000"],
        "export": ["1", "0.100000"],
    }
    assert row_of(out, "total") == ["total", "", "5", "0.171000"]

    mine = ok(drip_cli("usage", "--user", "u1", url=store_url))
    assert "usage of u1" in mine
    assert "export" not in mine
    assert row_of(mine, "total") == ["total", "", "4", "0.071000"]

    hourly = ok(drip_cli("usage", "--bucket", "hour", url=store_url))
    assert row_of(hourly, "total") == ["total", "", "5", "0.171000"]


def test_usage_empty(db_url: str) -> None:
    empty_ledger(db_url)
    out = ok(drip_cli("usage", url=db_url))
    assert row_of(out, "total") == ["total", "", "0", "0.000000"]


# --- doctor ---------------------------------------------------------------------------


def test_doctor_prints_each_invariant(db_url: str) -> None:
    client = DripClient(DripConfig(database_url=db_url))
    try:
        client.sync.provision_user("u1", initial_balance="1")
        client.sync.debit("u1", "0.3", "search")
        names = [name for name, _, _ in client.ledger.check_invariants().checks]
    finally:
        client.close()
    assert len(names) >= 4

    out = ok(drip_cli("doctor", url=db_url))

    for name in names:
        assert row_of(out, name)[1] == "ok"
    assert "FAILED" not in out


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["wallet", "show", "ghost"], "user_not_found"),
        (["wallet", "topup", "ghost", "1"], "user_not_found"),
        (["wallet", "topup", "u1", "abc"], "invalid_amount"),
        (["wallet", "topup", "u1", "0"], "invalid_amount"),
        (["wallet", "create", "u9", "--initial-balance", "0.0000001"], "invalid_amount"),
        (["usage", "--bucket", "week"], "invalid_request"),
        (["usage", "--user", "ghost"], "user_not_found"),
    ],
    ids=[
        "show-unknown",
        "topup-unknown",
        "topup-abc",
        "topup-zero",
        "create-precision",
        "usage-bucket",
        "usage-unknown",
    ],
)
def test_errors_are_one_line(db_url: str, args: list[str], code: str) -> None:
    ok(drip_cli("wallet", "create", "u1", "-b", "1", url=db_url))

    result = drip_cli(*args, url=db_url, columns="80")

    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error ({code}): ")
    assert user_of(db_url, "u1")["balance_usdc"] == Decimal(1)  # nothing changed


@pytest.mark.parametrize("command", [["wallet", "list"], ["doctor"]], ids=" ".join)
def test_unsupported_url_scheme_is_one_line(command: list[str]) -> None:
    result = drip_cli(*command, url="mysql://x", columns="80")

    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error (config_error): ")
    assert "mysql" in lines[0]


def _one_error_line(result: Result) -> str:
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("command", [["wallet", "show", "u"], ["doctor"]], ids=" ".join)
def test_a_file_that_is_not_a_database_is_one_line(tmp_path: Path, command: list[str]) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database, just some bytes\n" * 10)
    line = _one_error_line(drip_cli(*command, url=f"sqlite:///{junk}", columns="80"))
    assert line.startswith("error (store_unavailable): ") and "not a database" in line
    assert junk.read_bytes().startswith(b"not a database")  # left as it was


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:secret@127.0.0.1:1/db",
        "postgresql://u:Sup3r%zzsecret@127.0.0.1/db",
        "postgresql://u:hunter2#Tr0ub4dor%zzsecret@127.0.0.1/db",  # urlsplit stops at '#'
        "postgresql://u:Tr0ub4dor%zz/secret@127.0.0.1/db",
        "postgresql://u:" + "s" * 180 + "secret%zz@127.0.0.1/db",  # past the message's cut
    ],
)
def test_an_unreachable_postgresql_is_one_line_at_once(url: str) -> None:
    """Not a pool retrying and logging for 30 s: the first connection's refusal, without
    the password (libpq quotes a badly percent-encoded one back)."""
    line = _one_error_line(drip_cli("wallet", "list", url=url, columns="80"))
    assert line.startswith("error (store_unavailable): cannot connect to PostgreSQL"), line
    assert "secret" not in line


def test_a_failed_doctor_is_its_one_line(db_url: str) -> None:
    import sqlite3

    ok(drip_cli("wallet", "create", "u1", "-b", "1", url=db_url))
    conn = sqlite3.connect(db_url.removeprefix("sqlite:///"))
    conn.execute("UPDATE accounts SET credits_posted = credits_posted + 1 WHERE id = 'user:u1'")
    conn.commit()
    conn.close()
    result = drip_cli("doctor", url=db_url, columns="80")
    assert _one_error_line(result).startswith("error (invariant_violation): ")


def test_a_bad_setting_names_the_setting(db_url: str) -> None:
    result = CliRunner().invoke(app, ["wallet", "list", "--database-url", db_url],
                                env={"DRIP_FEE_BPS": "abc", "COLUMNS": "80"})  # fmt: skip
    line = _one_error_line(result)
    assert line.startswith("error (config_error): fee_bps: "), line


def test_no_arguments_shows_help() -> None:
    result = CliRunner().invoke(app, [])
    assert "wallet" in result.output
    assert "doctor" in result.output


# --- the installed console script -----------------------------------------------------


def run_drip(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIP_")}
    env["COLUMNS"] = "80"
    return subprocess.run(
        [str(DRIP_BIN), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_console_script_wallet(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/script.db"

    created = run_drip(
        "wallet", "create", "sub1", "--initial-balance", "1.25", "--database-url", url, cwd=tmp_path
    )
    assert created.returncode == 0, created.stderr
    assert "sub1" in created.stdout
    assert "1.250000" in created.stdout
    assert user_of(url, "sub1")["balance_usdc"] == Decimal("1.25")

    missing = run_drip("wallet", "show", "ghost", "--database-url", url, cwd=tmp_path)
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert missing.stderr.strip().splitlines() == ["error (user_not_found): no user 'ghost'"]


def test_console_script_demo(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/demo.db"

    demo = run_drip("demo", "--database-url", url, cwd=tmp_path)

    assert demo.returncode == 0, demo.stderr
    assert "Traceback" not in demo.stderr
    out = demo.stdout
    assert "refused before running" in out
    assert "topped up" in out
    assert out.index("refused before running") < out.index("topped up")
    assert "FAILED" not in out
    assert "ok  debits equal credits" in out
    # the demo's user, billed through its ledger
    user = user_of(url, "researcher_42")
    assert user["status"] == "active"
    assert Decimal(0) < user["balance_usdc"] < Decimal("0.35")
    assert not (tmp_path / "drip-demo.db").exists()  # it used the URL it was given


# --- the demo never touches a user's database -----------------------------------------


def drip_demo(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, ["demo", *args], env={"COLUMNS": "80", **(env or {})})


def test_demo_ignores_drip_database_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prod = f"sqlite:///{tmp_path}/prod.db"
    ok(drip_cli("wallet", "create", "alice", "--initial-balance", "5", url=prod))
    before = (tmp_path / "prod.db").read_bytes()
    monkeypatch.chdir(tmp_path)  # where its sqlite:///drip-demo.db goes

    out = ok(drip_demo(env={"DRIP_DATABASE_URL": prod}))

    assert "Drip demo on sqlite:///drip-demo.db" in out
    assert (tmp_path / "prod.db").read_bytes() == before
    assert user_of(prod, "alice")["balance_usdc"] == Decimal(5)
    assert user_of(f"sqlite:///{tmp_path}/drip-demo.db", "researcher_42")["status"] == "active"


@pytest.mark.parametrize("fresh", ["--fresh", "--no-fresh"])
def test_demo_refuses_a_database_with_other_wallets(tmp_path: Path, fresh: str) -> None:
    prod = f"sqlite:///{tmp_path}/prod.db"
    ok(drip_cli("wallet", "create", "alice", "--initial-balance", "5", url=prod))
    before = (tmp_path / "prod.db").read_bytes()

    line = _one_error_line(drip_demo("--database-url", prod, fresh))

    assert line.startswith("error (config_error): ") and "holds user 'alice'" in line, line
    assert (tmp_path / "prod.db").read_bytes() == before  # neither deleted nor written
    assert user_of(prod, "alice")["balance_usdc"] == Decimal(5)
    with pytest.raises(errors.UserNotFound):
        user_of(prod, "researcher_42")


@pytest.mark.parametrize("kind", ["junk", "another program's SQLite"])
def test_demo_refuses_a_file_that_is_not_a_drip_database(tmp_path: Path, kind: str) -> None:
    import sqlite3

    path = tmp_path / "other.db"
    if kind == "junk":
        path.write_bytes(b"not a database, just some bytes\n" * 10)
    else:
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE notes (body TEXT)")
        conn.close()
    before = path.read_bytes()

    line = _one_error_line(drip_demo("--database-url", f"sqlite:///{path}"))

    assert line.startswith("error (config_error): ") and "not a Drip demo database" in line
    assert path.read_bytes() == before


def test_demo_runs_twice_on_its_own_database(tmp_path: Path) -> None:
    """What ``make demo`` does: the second run starts afresh from the first one's file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIP_")}
    env |= {"COLUMNS": "80", "DRIP_DATABASE_URL": f"sqlite:///{tmp_path}/prod.db"}
    for _ in range(2):
        done = subprocess.run([str(DRIP_BIN), "demo"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("provisioned researcher_42 with 0.10 USDC") == 1
    assert not (tmp_path / "prod.db").exists()
    user = user_of(f"sqlite:///{tmp_path}/drip-demo.db", "researcher_42")
    assert Decimal(0) < user["balance_usdc"] < Decimal("0.35")  # one run's, not two


def test_demo_on_postgresql_refuses_other_wallets(postgres_url: str) -> None:
    ok(drip_cli("wallet", "create", "alice", "--initial-balance", "5", url=postgres_url))

    line = _one_error_line(drip_cli("demo", url=postgres_url, columns="80"))

    assert line.startswith("error (config_error): ") and "holds user 'alice'" in line, line
    assert postgres_url.split("@")[0] not in line  # no password
    with pytest.raises(errors.UserNotFound):
        user_of(postgres_url, "researcher_42")
    assert user_of(postgres_url, "alice")["balance_usdc"] == Decimal(5)


def test_demo_on_an_empty_postgresql_runs(postgres_url: str) -> None:
    for _ in range(2):  # the second time it finds only its own user
        out = ok(drip_cli("demo", url=postgres_url))
        assert "refused before running" in out and "FAILED" not in out


# --- commands that read never create a database ---------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["wallet", "show", "u1"],
        ["wallet", "list"],
        ["usage"],
        ["doctor"],
        ["keys", "list"],
        ["wallet", "topup", "u1", "1"],
        ["keys", "revoke", "k1"],
    ],
    ids=" ".join,
)
def test_a_missing_sqlite_file_is_one_line(tmp_path: Path, command: list[str]) -> None:
    url = f"sqlite:///{tmp_path}/typo.db"

    line = _one_error_line(drip_cli(*command, url=url, columns="80"))

    assert line == f"error (store_unavailable): no SQLite database at '{tmp_path}/typo.db'"
    assert list(tmp_path.iterdir()) == []


def test_a_missing_relative_sqlite_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = drip_cli("doctor", url="sqlite:///typo.db", columns="80")
    assert _one_error_line(result) == "error (store_unavailable): no SQLite database at 'typo.db'"
    assert list(tmp_path.iterdir()) == []


def test_memory_is_not_a_missing_file() -> None:
    line = _one_error_line(drip_cli("wallet", "list", url="sqlite:///:memory:", columns="80"))
    assert line.startswith("error (config_error): SQLite needs a file"), line


def test_writing_commands_still_create_the_database(tmp_path: Path) -> None:
    ok(drip_cli("keys", "create", url=f"sqlite:///{tmp_path}/keys.db"))
    ok(drip_cli("wallet", "create", "u1", url=f"sqlite:///{tmp_path}/wallets.db"))
    assert (tmp_path / "keys.db").exists() and (tmp_path / "wallets.db").exists()


def test_doctor_writes_nothing(db_url: str, tmp_path: Path) -> None:
    led = open_ledger(db_url)  # a ledger without the client's revenue account
    try:
        led.sync.create_account("user:u1", AccountKind.WALLET)
    finally:
        led.close()
    before = (tmp_path / "cli.db").read_bytes()

    out = ok(drip_cli("doctor", url=db_url))

    assert "FAILED" not in out
    assert (tmp_path / "cli.db").read_bytes() == before
    led = open_ledger(db_url)
    try:
        assert led.list_accounts(AccountKind.REVENUE) == []
    finally:
        led.close()


# --- stored text and error messages are shown literally, never as Rich markup ---------

LINK = "[link=https://evil.example]support@drip.example[/link]"


def test_stored_emails_are_shown_literally(db_url: str) -> None:
    ok(drip_cli("wallet", "create", "u1", "--email", LINK, url=db_url))
    ok(drip_cli("wallet", "create", "u2", "--email", "[/]", url=db_url))

    out = ok(drip_cli("wallet", "list", url=db_url))

    assert row_of(out, "u1")[4] == LINK
    assert row_of(out, "u2")[4] == "[/]"
    assert row_of(ok(drip_cli("wallet", "show", "u2", url=db_url)), "u2")[4] == "[/]"


def test_key_labels_are_shown_literally(db_url: str) -> None:
    ok(drip_cli("keys", "create", "--label", "[/]", url=db_url))
    ok(drip_cli("keys", "create", "--label", "[bold]team[/bold]", url=db_url))

    out = ok(drip_cli("keys", "list", url=db_url))

    labels = [cells[2] for line in out.splitlines()
              if len(cells := [c.strip() for c in line.strip()[1:-1].split("│")]) == 4]  # fmt: skip
    assert sorted(labels) == ["[/]", "[bold]team[/bold]"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["wallet", "topup", "u1", "[/]"], "error (invalid_amount): "),
        (["wallet", "show", "[red]x"], "error (invalid_id): "),
        (["keys", "revoke", "[/]"], "error (not_found): no active key '[/]'"),
    ],
    ids=["topup", "show", "revoke"],
)
def test_error_messages_are_shown_literally(db_url: str, args: list[str], expected: str) -> None:
    ok(drip_cli("wallet", "create", "u1", url=db_url))

    line = _one_error_line(drip_cli(*args, url=db_url, columns="80"))

    assert line.startswith(expected), line
    assert args[-1] in line


def test_the_demo_shows_its_url_literally(tmp_path: Path) -> None:
    folder = tmp_path / "[bold]"
    folder.mkdir()
    url = f"sqlite:///{folder}/demo.db"

    out = ok(drip_cli("demo", url=url))

    assert f"Drip demo on {url} " in out


def test_read_commands_refuse_a_database_that_holds_no_ledger(tmp_path: Any) -> None:
    """Opening it would put Drip's tables into another program's database, and report
    that new, empty ledger healthy."""
    import sqlite3

    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (body TEXT)")
    before = other.read_bytes()
    for args in (["doctor"], ["wallet", "list"], ["wallet", "show", "alice"], ["usage"]):
        result = CliRunner().invoke(app, [*args, "--database-url", f"sqlite:///{other}"])
        assert result.exit_code == 1, (args, result.output)
        assert "holds no Drip ledger" in result.output
    assert other.read_bytes() == before
    with sqlite3.connect(other) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert tables == ["notes"]
