"""The ``drip`` command: wallets, usage, ledger checks and the demo.

Every command takes ``--database-url``, and all but ``demo`` read ``DRIP_DATABASE_URL``
too: the demo deletes its database to start afresh, so it has one of its own. Commands
that only read (or change what exists) never create a SQLite file: a mistyped path is an
error, not an empty ledger. Errors print one clear line on stderr and exit non-zero;
they never print a traceback. Stored text (emails, labels) and error messages are
printed as they are, never as Rich markup, and with control characters shown as escapes
(``\x1b``): a stored email cannot move the cursor, clear the screen or plant a link.
Commands that only read open the ledger read-only: they never migrate it, create its
system accounts or tables, or expire holds.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import sys
import unicodedata
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import click
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from drip import errors
from drip.config import DripConfig
from drip.demo import run_demo, sqlite_file
from drip.ledger import AccountKind, Ledger, open_ledger
from drip.metering import DripClient
from drip.metering.client import user_view, wallet_id
from drip.money import format_amount, parse_amount

app = typer.Typer(
    name="drip",
    help="Drip: prepaid wallets and metered billing for APIs and AI agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
wallet_app = typer.Typer(help="Create, inspect and top up user wallets.", no_args_is_help=True)
app.add_typer(wallet_app, name="wallet")
keys_app = typer.Typer(help="Admin API keys for drip serve.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

out = Console()
err = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="DRIP_DATABASE_URL",
        help="sqlite:///drip.db (default) or postgresql://user:pw@host/db",
        show_default=False,
    ),
]


def _config(database_url: str | None) -> DripConfig:
    settings: dict[str, Any] = {}
    if database_url:
        settings["database_url"] = database_url
    return DripConfig(**settings)


def _require_database(url: str) -> None:
    """Refuse a database that holds no Drip ledger: opening it would create one (an
    empty file, or Drip's tables in another program's database) and report it healthy."""
    path = sqlite_file(url)
    if path is not None:
        if not os.path.exists(path):
            raise errors.StoreError(f"no SQLite database at {path!r}", param="database_url")
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                                   "name = 'drip_migrations'").fetchone()  # fmt: skip
        except sqlite3.Error as exc:
            raise errors.StoreError(f"cannot read {path!r}: {exc}", param="database_url") from None
        if found is None:
            raise errors.StoreError(f"{path!r} holds no Drip ledger", param="database_url")
    elif url.startswith(("postgres://", "postgresql://")):
        import psycopg

        try:
            with psycopg.connect(url, connect_timeout=5) as conn:
                row = conn.execute("SELECT to_regclass('drip_migrations')").fetchone()
        except psycopg.Error:
            return  # opening the ledger reports why (with the password masked)
        if row is None or row[0] is None:
            raise errors.StoreError("this PostgreSQL database holds no Drip ledger",
                                    param="database_url")  # fmt: skip


def _client(database_url: str | None, *, existing: bool = False) -> DripClient:
    """A client; with ``existing``, only on a database that is already there."""
    config = _config(database_url)
    if existing:
        _require_database(config.database_url)
    return DripClient(config)


def _ledger(database_url: str | None, *, existing: bool = True, read_only: bool = True) -> Ledger:
    """The ledger alone, for commands that need no client (a DripClient would book its
    revenue account). ``read_only`` (the default) writes nothing at all: no migration,
    no system accounts, no expired holds; a schema older than this Drip's is an error.
    With ``existing``, a missing SQLite file is an error rather than a new, empty (and
    healthy) ledger."""
    config = _config(database_url)
    if existing:
        _require_database(config.database_url)
    return open_ledger(config.database_url, fee_bps=config.fee_bps, read_only=read_only)


def _fail(code: str, message: str) -> None:
    """Print ``error (code): message`` on one line; the message (which may quote stored
    text or what was typed) is printed as it is, not read as Rich markup."""
    first = _visible(message.splitlines()[0]) if message else ""
    err.print(Text.assemble(("error", "bold red"), f" ({code}): {first}"), highlight=False)


def friendly(fn: F) -> F:
    """Turn Drip's errors (and bad configuration) into one line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except errors.DripError as exc:
            _fail(exc.code, exc.message)
            raise typer.Exit(1) from None
        except ValidationError as exc:  # DripConfig from flags, environment or drip.toml
            problems = exc.errors()
            where = ".".join(str(p) for p in problems[0]["loc"]) if problems else ""
            what = problems[0]["msg"] if problems else str(exc)
            _fail("config_error", f"{where or 'settings'}: {what}")
            raise typer.Exit(1) from None
        except ValueError as exc:
            _fail("config_error", str(exc))
            raise typer.Exit(1) from None
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.ClickException):
            raise  # typer's own way out (an Exit is a RuntimeError)
        except Exception as exc:  # noqa: BLE001 - one line, never a traceback
            _fail("internal_error", f"{type(exc).__name__}: {exc}")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


#: Characters a terminal acts on rather than shows, other than control characters
#: (``Cc``: C0, DEL, C1): line and paragraph separators, and the bidirectional
#: embeddings, overrides and isolates that reorder what follows them.
_INVISIBLE = frozenset("\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _visible(text: str) -> str:
    """``text`` with each control character (and ``_INVISIBLE`` one) replaced by its
    escape as Python writes it (ESC is ``\x1b``, a newline ``\n``): stored text cannot
    send the terminal an escape sequence (an OSC 8 link, a screen clear, a title)."""
    if text.isprintable():
        return text
    return "".join(
        ascii(c)[1:-1] if c in _INVISIBLE or unicodedata.category(c) == "Cc" else c for c in text
    )


def _add_row(table: Table, *cells: str) -> None:
    """A row of data, shown as it is: a cell given as a str is Rich markup, so an email of
    '[/]' would crash the table and '[link=...]...[/link]' would show as a link; and a
    control character would reach the terminal (``_visible``)."""
    table.add_row(*(Text(_visible(cell)) for cell in cells))


def _get_user(ledger: Ledger, user_id: str) -> dict[str, Any]:
    """DripClient.get_user's answer, read from the ledger alone."""
    account = ledger.store.get_account(wallet_id(user_id))
    if account is None or account.kind != AccountKind.WALLET:
        raise errors.UserNotFound(f"no user {user_id!r}", param="user_id")
    return user_view(account)


def _user_table(users: list[dict[str, Any]]) -> Table:
    table = Table(title=None, show_lines=False)
    for column, justify in (("user", "left"), ("status", "left"), ("available USDC", "right"),
                            ("pending USDC", "right"), ("email", "left")):  # fmt: skip
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for u in users:
        _add_row(
            table, u["user_id"], u["status"], f"{u['balance_usdc']:.6f}",
            f"{u['pending_usdc']:.6f}", u.get("email") or "",
        )  # fmt: skip
    return table


@wallet_app.command("create")
@friendly
def wallet_create(
    user_id: Annotated[str, typer.Argument(help="The user's id")],
    initial_balance: Annotated[
        str, typer.Option("--initial-balance", "-b", help="USDC to credit, e.g. 5.00")
    ] = "0",
    email: Annotated[str | None, typer.Option(help="Where notices go")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Provision a user's wallet (idempotent: the same command twice changes nothing)."""
    client = _client(database_url)
    try:
        user = client.sync.provision_user(user_id, email=email, initial_balance=initial_balance)
    finally:
        client.close()
    out.print(_user_table([user]))


@wallet_app.command("show")
@friendly
def wallet_show(user_id: str, database_url: DatabaseUrl = None) -> None:
    """Show one wallet's balances and status."""
    ledger = _ledger(database_url)
    try:
        user = _get_user(ledger, user_id)
    finally:
        ledger.close()
    out.print(_user_table([user]))


@wallet_app.command("list")
@friendly
def wallet_list(
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    after: Annotated[str | None, typer.Option(help="Continue after this user id")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """List wallets, ordered by user id."""
    ledger = _ledger(database_url)
    try:
        after_id = wallet_id(after) if after else None
        accounts = ledger.list_accounts(AccountKind.WALLET, after_id=after_id, limit=limit)
    finally:
        ledger.close()
    users = [user_view(a) for a in accounts]
    out.print(_user_table(users))
    if len(users) == limit:
        out.print(f"more: drip wallet list --after {_visible(users[-1]['user_id'])}", markup=False,
                  highlight=False)  # fmt: skip


@wallet_app.command("topup")
@friendly
def wallet_topup(
    user_id: str,
    amount: Annotated[str, typer.Argument(help="USDC to credit, e.g. 2.00")],
    idempotency_key: Annotated[
        str | None,
        typer.Option("--idempotency-key", help="Retry-safe id: the same key credits once"),
    ] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Credit a wallet (resumes a paused user)."""
    parse_amount(amount, allow_zero=False)
    client = _client(database_url, existing=True)
    try:
        client.sync.topup(user_id, amount, idempotency_key=idempotency_key)
        user = client.sync.get_user(user_id)
    finally:
        client.close()
    out.print(_user_table([user]))


def _when(us: int, bucket_s: int) -> str:
    moment = datetime.fromtimestamp(us / 1_000_000, tz=UTC)
    return moment.strftime("%Y-%m-%d" if bucket_s >= 86_400 else "%Y-%m-%d %H:%M")


@app.command("usage")
@friendly
def usage(
    user_id: Annotated[str | None, typer.Option("--user", help="One user's usage")] = None,
    bucket: Annotated[str, typer.Option(help="Bucket: minute, hour or day")] = "day",
    database_url: DatabaseUrl = None,
) -> None:
    """Metered usage per event (calls and USDC), per time bucket."""
    sizes = {"minute": 60, "hour": 3600, "day": 86_400}
    if bucket not in sizes:
        raise errors.InvalidRequest("bucket must be minute, hour or day", param="bucket")
    ledger = _ledger(database_url)
    try:
        account = None
        if user_id is not None:
            _get_user(ledger, user_id)  # a mistyped user is an error, not an empty table
            account = wallet_id(user_id)
        rows = ledger.usage(account, bucket_s=sizes[bucket])
    finally:
        ledger.close()
    table = Table(title=escape(f"usage{' of ' + user_id if user_id else ''} per {bucket}"))
    table.add_column(bucket)
    table.add_column("event")
    table.add_column("calls", justify="right")
    table.add_column("USDC", justify="right")
    total_calls = total = 0
    for r in rows:
        _add_row(table, _when(r.bucket_start_us, sizes[bucket]), r.code, str(r.calls),
                 format_amount(r.amount))  # fmt: skip
        total_calls += r.calls
        total += r.amount
    table.add_section()
    table.add_row("total", "", str(total_calls), format_amount(total))
    out.print(table)


@app.command("doctor")
@friendly
def doctor(database_url: DatabaseUrl = None) -> None:
    """Check the ledger's invariants and print each; exit 1 if any fails."""
    ledger = _ledger(database_url)  # reads only: a doctor that wrote could hide what it found
    try:
        report = ledger.check_invariants()
    finally:
        ledger.close()
    table = Table(title="ledger invariants")
    table.add_column("check")
    table.add_column("result")
    table.add_column("evidence")
    for name, passed, detail in report.checks:
        result = Text("ok", "green") if passed else Text("FAILED", "bold red")
        table.add_row(Text(_visible(name)), result, Text(_visible(detail)))
    out.print(table)
    if not report.ok:
        _fail("invariant_violation", "the ledger failed a check")
        raise typer.Exit(1)


@app.command("demo")
@friendly
def demo(
    # not DatabaseUrl: the demo deletes its database to start afresh, so it never takes
    # the user's own from DRIP_DATABASE_URL (or drip.toml); only a URL given here
    database_url: Annotated[
        str, typer.Option("--database-url", help="The demo's own database")
    ] = "sqlite:///drip-demo.db",
    fresh: Annotated[
        bool, typer.Option(help="Delete the demo's SQLite file first (never another's)")
    ] = True,
) -> None:
    """A scripted tour: provision, meter calls until credit runs out, top up, continue.

    It refuses a database that holds wallets other than its own user's."""
    run_demo(database_url, fresh=fresh, console=out)


def _keys(database_url: str | None, *, existing: bool = True) -> tuple[Ledger, Any]:
    """For the commands that write keys (the table is created if need be)."""
    from drip.server.keys import KeyStore

    ledger = _ledger(database_url, existing=existing, read_only=False)
    try:
        return ledger, KeyStore(ledger.store)
    except BaseException:
        ledger.close()
        raise


@keys_app.command("create")
@friendly
def keys_create(
    scope: Annotated[str, typer.Option(help="admin (everything) or read (GET only)")] = "admin",
    label: Annotated[str | None, typer.Option(help="What the key is for")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create an API key and print it once; only its SHA-256 digest is stored."""
    ledger, store = _keys(database_url, existing=False)
    try:
        token, key = store.create(scope, label)
    finally:
        ledger.close()
    err.print(f"key {key.key_id} ({key.scope}); store it now, it is not shown again:",
              markup=False)  # fmt: skip
    out.print(token, highlight=False, soft_wrap=True)


@keys_app.command("list")
@friendly
def keys_list(database_url: DatabaseUrl = None) -> None:
    """List API keys (ids and scopes, never secrets)."""
    from drip.server.keys import ApiKey, KeyStore

    ledger = _ledger(database_url)  # read-only: creates no table
    try:
        keys: list[ApiKey] = []  # no table: no key was ever created here
        if ledger.store.schema_version("api_keys") > 0:
            # on a read-only store, KeyStore checks the schema (an older one is an error)
            keys = KeyStore(ledger.store).list()
    finally:
        ledger.close()
    table = Table()
    for column in ("key id", "scope", "label", "status"):
        table.add_column(column)
    for k in keys:
        _add_row(table, k.key_id, k.scope, k.label or "", "revoked" if k.revoked_us else "active")
    out.print(table)


@keys_app.command("revoke")
@friendly
def keys_revoke(key_id: str, database_url: DatabaseUrl = None) -> None:
    """Revoke an API key at once."""
    ledger, store = _keys(database_url)
    try:
        store.revoke(key_id)
    finally:
        ledger.close()
    out.print(f"revoked {key_id}", markup=False, highlight=False)


@app.command("serve")
@friendly
def serve(
    host: Annotated[
        str | None, typer.Option(help="Default: [serve] host, DRIP_SERVE__HOST, 127.0.0.1")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="Default: [serve] port, DRIP_SERVE__PORT, 8402"),
    ] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Run the REST API (OpenAPI at /docs, Prometheus at /metrics)."""
    import uvicorn

    from drip.server import create_app
    from drip.server.logs import configure_logging

    configure_logging()
    settings: dict[str, Any] = {"database_url": database_url} if database_url else {}
    config = DripConfig(**settings)
    uvicorn.run(create_app(config), host=host or config.serve.host,
                port=port or config.serve.port, log_config=None, access_log=False)  # fmt: skip


@app.command("facilitator")
@friendly
def facilitator_command(
    rpc_url: Annotated[str, typer.Option(envvar="DRIP_RPC_URL", help="JSON-RPC of the chain")],
    private_key: Annotated[
        str,
        typer.Option(
            envvar="DRIP_FACILITATOR_PRIVATE_KEY",
            help="Key that pays settlement gas",
            show_default=False,
        ),
    ],
    network: Annotated[list[str], typer.Option(help="CAIP-2 network(s) served")] = [  # noqa: B006
        "eip155:31337"
    ],
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8403,
    database_url: DatabaseUrl = None,
    gas_limit: Annotated[
        int, typer.Option(min=21_000, max=1_000_000, help="Gas limit of each settlement")
    ] = 150_000,
    asset: Annotated[
        list[str],
        typer.Option(help="Token address(es) it settles (default: each network's USDC)"),
    ] = [],  # noqa: B006 - typer's way to a repeatable option
    pay_to: Annotated[
        list[str],
        typer.Option(help="Only settle payments to these address(es) (default: any)"),
    ] = [],  # noqa: B006
) -> None:
    """Run an x402 facilitator: GET /supported, POST /verify, POST /settle (x402 v2)."""
    import uvicorn

    from drip.ledger import open_store
    from drip.server.logs import configure_logging
    from drip.x402.facilitator import build, create_app

    configure_logging()
    store = open_store(database_url or DripConfig().database_url)
    try:
        app_ = create_app(build(rpc_url, private_key, list(network), gas_limit=gas_limit),
                          store, assets=asset or None, pay_to=pay_to or None)  # fmt: skip
        uvicorn.run(app_, host=host, port=port, log_config=None, access_log=False)
    finally:
        store.close()


@app.command("devnet")
@friendly
def devnet_command(
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8545,
) -> None:
    """Start anvil on 127.0.0.1 with Drip's test USDC deployed and funded (Ctrl-C stops)."""
    import time

    from drip.chain import devnet

    net = devnet.start(port)
    out.print(f"devnet: {net.rpc_url} (chain id {devnet.CHAIN_ID}, eip155:{devnet.CHAIN_ID})")
    out.print(f"TestUSDC: {net.usdc} (6 decimals, 1,000 USDC per account)")
    for address, key in net.accounts:
        out.print(f"  {address}  key {key}", highlight=False)
    try:
        while net.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        net.stop()


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
