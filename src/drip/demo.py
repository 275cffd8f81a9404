"""``make demo``: a research agent billed per call, on the embedded SQLite store.

It provisions a user with a little credit, runs metered calls until the wallet cannot
pay for the next one (``DripInsufficientCredits`` is raised before the call runs), tops
up, continues, and prints the usage table and the ledger's invariant checks.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from drip import DripClient, DripConfig, DripInsufficientCredits, last_charge
from drip.money import format_amount


def _remove_sqlite(url: str) -> None:
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///").split("?", 1)[0])
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

    user = "researcher_42"
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
            console.print(f"[bold yellow]refused before running:[/] {exc}")
            break
    await client.topup(user, "0.25")
    console.print("topped up 0.25 USDC")
    for _ in range(3):
        n += 1
        await cycle(n)

    table = Table(title=f"usage of {user}")
    for column in ("event", "calls", "USDC"):
        table.add_column(column, justify="left" if column == "event" else "right")
    for row in client.usage(user, bucket_s=10**9):
        table.add_row(row.code, str(row.calls), format_amount(row.amount))
    console.print(table)
    report = client.ledger.check_invariants()
    for name, passed, detail in report.checks:
        console.print(f"{'ok ' if passed else 'FAILED'} {name}: {detail}")
    if not report.ok:
        raise SystemExit(1)


def run_demo(database_url: str, *, fresh: bool = True, console: Console | None = None) -> None:
    console = console or Console()
    if fresh:
        _remove_sqlite(database_url)
    console.print(f"[bold]Drip demo[/] on {database_url.split('@')[-1]} (pid {os.getpid()})")
    client = DripClient(DripConfig(database_url=database_url))
    try:
        asyncio.run(_scenario(client, console))
    finally:
        client.close()
