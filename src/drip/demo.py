"""``make demo``: a research agent billed per call, on the embedded SQLite store.

It provisions a user with a little credit, runs metered calls until the wallet cannot
pay for the next one (``DripInsufficientCredits`` is raised before the call runs), tops
up, continues, and prints the usage table and the ledger's invariant checks.

The demo only ever runs on a database of its own: one that holds no wallet but its
user's. It deletes a SQLite file to start afresh, so it refuses, before touching
anything, a database that holds someone else's wallets or that is not Drip's at all.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from contextlib import closing
from pathlib import Path
from urllib.parse import urlsplit

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from drip import DripClient, DripConfig, DripInsufficientCredits, errors, last_charge
from drip.config import mask_password
from drip.ledger import AccountKind, Ledger, open_ledger
from drip.ledger.ledger import sqlite_path
from drip.metering.client import WALLET_PREFIX, wallet_id
from drip.money import format_amount

DEMO_USER = "researcher_42"


def sqlite_file(url: str) -> str | None:
    """The file a ``sqlite:`` URL names, read as ``open_store`` reads it (relative
    ``sqlite:///demo.db``, absolute ``sqlite:////tmp/demo.db``); None for another
    scheme or ``:memory:``, which name no file. A ``sqlite:`` URL without ``//``
    (``sqlite:drip.db``) is a ``ConfigError``."""
    if urlsplit(url).scheme != "sqlite":
        return None
    path = sqlite_path(url)
    return path if path not in ("", ":memory:") else None


def _not_the_demos(where: str, wallet: str) -> errors.ConfigError:
    user = wallet.removeprefix(WALLET_PREFIX)
    return errors.ConfigError(
        f"{where} holds user {user!r}: the demo only runs on a database of its own "
        "(by default sqlite:///drip-demo.db)",
        param="database_url",
    )


def _check_sqlite(path: str) -> None:
    """Refuse an existing SQLite file that holds other wallets or is not a Drip database.

    Read with plain SQL: opening it as a ledger would migrate another program's
    database into a Drip one before we could tell. ``query_only`` refuses any write; the
    connection is not ``mode=ro`` only because that would leave the -wal and -shm files
    it opens behind, next to the user's database (``mode=rw`` never creates the file)."""
    uri = f"{Path(path).resolve().as_uri()}?mode=rw"
    try:
        with closing(sqlite3.connect(uri, uri=True)) as conn:
            conn.execute("PRAGMA query_only = ON")
            other = conn.execute(
                "SELECT id FROM accounts WHERE kind = ? AND id <> ? LIMIT 1",
                (AccountKind.WALLET.value, wallet_id(DEMO_USER)),
            ).fetchone()
    except sqlite3.Error as exc:
        raise errors.ConfigError(
            f"{path!r} is not a Drip demo database ({exc}); the demo leaves it alone",
            param="database_url",
        ) from None
    if other is not None:
        raise _not_the_demos(repr(path), other[0])


def _check_ledger(ledger: Ledger, where: str) -> None:
    """Refuse a database (PostgreSQL) that holds wallets other than the demo's."""
    for account in ledger.list_accounts(AccountKind.WALLET, limit=2):
        if account.id != wallet_id(DEMO_USER):
            raise _not_the_demos(where, account.id)


def _remove_sqlite(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def _scenario(client: DripClient, console: Console) -> None:
    @client.meter(cost="0.007", event="web_search")
    async def search(topic: str, user_id: str) -> list[str]:
        return [f"https://example.org/{topic}/{i}" for i in range(3)]

    @client.meter(cost="0.001", event="scrape")
    async def scrape(url: str, user_id: str) -> str:
        return f"text of {url}"

    # priced by what the (simulated) model reports: $0.002 per 1k tokens, at most $0.05
    @client.meter(cost=lambda r: f"{r['tokens'] * 2 / 1_000_000:.6f}", max_cost="0.05",
                  event="llm_synthesis")  # fmt: skip
    async def synthesize(pages: list[str], user_id: str) -> dict[str, int]:
        return {"tokens": 1500 + 250 * len(pages)}

    user = DEMO_USER
    await client.provision_user(user, email="researcher@example.com", initial_balance="0.10",
                                metadata={"topic": "AI research"})  # fmt: skip
    console.print(f"provisioned [bold]{user}[/] with 0.10 USDC")

    async def cycle(n: int) -> None:
        links = await search("agents", user_id=user)
        pages = [await scrape(link, user_id=user) for link in links]
        report = await synthesize(pages, user_id=user)
        charge = last_charge()
        balance = (await client.get_user(user))["balance_usdc"]
        console.print(
            f"cycle {n}: search + {len(pages)} scrapes + synthesis "
            f"({report['tokens']} tokens, {format_amount(charge.amount if charge else 0)}) "
            f"-> balance {balance:.6f}"
        )

    n = 0
    while True:
        n += 1
        try:
            await cycle(n)
        except DripInsufficientCredits as exc:
            console.print(f"[bold yellow]refused before running:[/] {escape(str(exc))}")
            break
    await client.topup(user, "0.25")
    console.print("topped up 0.25 USDC")
    for _ in range(3):
        n += 1
        await cycle(n)

    table = Table(title=f"usage of {user}")
    for column in ("event", "calls", "USDC"):
        table.add_column(column, justify="left" if column == "event" else "right")
    for row in await client.usage(user, bucket_s=10**9):
        table.add_row(row.code, str(row.calls), format_amount(row.amount))
    console.print(table)
    report = client.ledger.check_invariants()
    for name, passed, detail in report.checks:
        console.print(f"{'ok ' if passed else 'FAILED'} {escape(name)}: {escape(detail)}")
    if not report.ok:
        raise SystemExit(1)


def run_demo(database_url: str, *, fresh: bool = True, console: Console | None = None) -> None:
    """Run the tour on ``database_url``; ``fresh`` deletes its SQLite file first.

    Refused (``ConfigError``) unless the database holds no wallet but the demo's own: a
    SQLite file is checked before it is deleted or opened as a ledger; a PostgreSQL
    database, which cannot be started afresh, before the demo's user is written."""
    console = console or Console()
    path = sqlite_file(database_url)
    if path is not None and os.path.exists(path):
        _check_sqlite(path)
        if fresh:
            _remove_sqlite(path)
    config = DripConfig(database_url=database_url)
    where = str(mask_password(database_url))  # never the password
    ledger = open_ledger(database_url, fee_bps=config.fee_bps)
    try:
        if path is None:
            _check_ledger(ledger, where)
        console.print(f"[bold]Drip demo[/] on {escape(where)} (pid {os.getpid()})")
        asyncio.run(_scenario(DripClient(config, ledger=ledger), console))
    finally:
        ledger.close()  # the client's: it was given this one
