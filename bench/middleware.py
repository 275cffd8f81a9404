"""What DripMeter costs a provider: a trivial endpoint with and without the middleware.

Uvicorn processes on 127.0.0.1 serve the same one-line FastAPI endpoint, one bare
and one behind ``DripMeter`` (SQLite store, a fixed price, callers paying with a
session). A keep-alive HTTP/1.1 client measures, in the same run:

- latency: one connection, requests one after another; added latency = metered - bare
  at p50 and p99;
- throughput: 8 connections for a few seconds, requests/s, metered vs bare.

Each measurement runs in interleaved rounds (bare, metered, ...; twice; the latency
rounds before the throughput rounds), each server's best throughput round counting, so
that other work on the machine during one of them does not decide the ratio.

    python bench/middleware.py [--seconds 4] [--json] [--breakdown]

Targets: added p50 < 0.5 ms, added p99 < 2 ms, metered requests/s >= 70% of bare.

A third server meters the same endpoint with the payer named by a resolver (``payer=``,
here a request header standing in for an API key's user): one hold per call on the
wallet, no session chain (``middleware.requests_per_s.wallet_payer``). Then, with the
servers stopped, the ledger work DripMeter does for one request (payer lookup, hold,
capture, balance read; no HTTP) is timed in-process with 8 tasks, for both payers
(``middleware.ledger_work_us.*``), against what the 70% target leaves for everything
Drip does in a request: 1/(0.7 x bare requests/s) - 1/(bare requests/s).

``--breakdown`` adds a fourth server: ``DripMeter`` with its ledger calls answered by
constants (no payer lookup, hold, capture or balance read), to split what metering
costs into the middleware's own plumbing and the ledger's work
(``middleware.requests_per_s.no_ledger``, baseline: bare).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

PATH = "/ping"
CONNECTIONS = 8
#: interleaved rounds per measurement (each server's best round counts)
ROUNDS = 2
TARGET_ADDED_P50_MS = 0.5
TARGET_ADDED_P99_MS = 2.0
TARGET_RPS_RATIO = 0.70


def stub_ledger(app: object) -> None:
    """Answer DripMeter's ledger calls with constants (the ``--breakdown`` server)."""
    from drip.asgi import middleware as mw
    from drip.ledger.ledger import Charge
    from drip.ledger.types import Balance, Transfer, TransferFlags

    hold = Transfer("http:stub", "user:caller", "rev:bench", 1, "ping", int(TransferFlags.PENDING))
    post = Transfer("http:stub~post", "user:caller", "rev:bench", 1, "ping",
                    int(TransferFlags.POST_PENDING), "http:stub")  # fmt: skip

    async def held(self: mw.DripMeter, scope: object, route: mw.Price) -> mw._MeteredCall:
        return mw._MeteredCall(self.client, route, hold, [])

    async def captured(self: mw._MeteredCall) -> Charge:
        self.settled = True
        return Charge(post, None)

    mw.DripMeter._hold = held  # type: ignore[method-assign,assignment]
    mw._MeteredCall.capture = captured  # type: ignore[method-assign,assignment]
    app.client.ledger.remembered_balance = lambda account_id: Balance(0, 0, 0)  # type: ignore[attr-defined]


#: the header the wallet-payer server's resolver reads the user from
USER_HEADER = "X-Bench-User"


def build_app(metered: bool, database_url: str, wallet_payer: bool = False) -> object:
    from fastapi import FastAPI

    api = FastAPI()

    @api.get(PATH)
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    if not metered:
        return api
    from drip import DripClient, DripConfig
    from drip.asgi import DripMeter

    client = DripClient(DripConfig(database_url=database_url, provider="bench"))
    payer = _payer() if wallet_payer else None
    return DripMeter(api, client=client, routes=_routes(), payer=payer)  # type: ignore[arg-type]


def _payer() -> object:
    from drip.asgi.middleware import header

    name = USER_HEADER.lower().encode()
    return lambda scope: header(scope, name)


def _routes() -> dict[str, object]:
    from drip.asgi import price

    return {f"GET {PATH}": price("ping", "0.000001")}


def serve(
    port: int, metered: bool, database_url: str, stub: bool = False, wallet_payer: bool = False
) -> None:
    import uvicorn

    app = build_app(metered, database_url, wallet_payer)
    if stub:
        stub_ledger(app)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)  # type: ignore[arg-type]


async def ledger_work_us(database_url: str, token: str, wallet_payer: bool,
                         seconds: float) -> float:  # fmt: skip
    """Microseconds of DripMeter's ledger work per request (payer lookup, hold, capture,
    balance read), 8 tasks in one event loop, no HTTP: the calls ``DripMeter.metered``
    and ``_MeteredCall`` make, on the same database."""
    from drip import DripClient, DripConfig
    from drip.asgi import DripMeter, price

    client = DripClient(DripConfig(database_url=database_url, provider="bench"))
    meter = DripMeter(
        None,
        client=client,
        routes=_routes(),  # type: ignore[arg-type]
        payer=_payer() if wallet_payer else None,
    )  # type: ignore[arg-type]
    route = price("ping", "0.000001")
    if wallet_payer:
        headers = [(USER_HEADER.lower().encode(), b"caller")]
    else:
        headers = [(b"x-drip-session", token.encode())]
    scope = {"type": "http", "method": "GET", "path": PATH, "headers": headers, "state": {}}
    done = 0

    async def loop(deadline: float) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            call = await meter._hold(scope, route)
            call.scope = scope
            await call.capture()
            await call._balance()
            done += 1

    try:
        await asyncio.gather(*(loop(time.perf_counter() + 0.3) for _ in range(CONNECTIONS)))
        done = 0
        start = time.perf_counter()
        await asyncio.gather(*(loop(start + seconds) for _ in range(CONNECTIONS)))
        return (time.perf_counter() - start) / done * 1e6
    finally:
        client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Conn:
    """A minimal keep-alive HTTP/1.1 client: GET, read headers, read Content-Length."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes):
        self.reader, self.writer, self.request = reader, writer, req

    @classmethod
    async def open(cls, port: int, headers: dict[str, str]) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()
        return cls(reader, writer, request)

    async def get(self) -> int:
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


async def latency_ms(port: int, headers: dict[str, str], seconds: float) -> list[float]:
    conn = await Conn.open(port, headers)
    out: list[float] = []
    deadline = time.perf_counter() + seconds
    try:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            if await conn.get() != 200:
                raise SystemExit(f"port {port}: a request failed")
            out.append((time.perf_counter() - start) * 1000)
    finally:
        conn.close()
    return out


async def throughput(port: int, headers: dict[str, str], seconds: float) -> float:
    conns = [await Conn.open(port, headers) for _ in range(CONNECTIONS)]
    done = 0
    deadline = time.perf_counter() + seconds

    async def loop(conn: Conn) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            if await conn.get() != 200:
                raise SystemExit(f"port {port}: a request failed")
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop(c) for c in conns))
    elapsed = time.perf_counter() - start
    for c in conns:
        c.close()
    return done / elapsed


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Metric:
    metric: str
    value: float
    unit: str
    baseline: float | None = None
    ratio: float | None = None


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server on {port} exited early")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"server on {port} did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--breakdown", action="store_true",
                        help="also measure DripMeter with its ledger calls stubbed")  # fmt: skip
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--metered", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stub", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--wallet-payer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.metered, args.database_url, args.stub, args.wallet_payer)
        return

    from drip import DripClient, DripConfig

    with tempfile.TemporaryDirectory(prefix="drip-mw-bench-") as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        client = DripClient(DripConfig(database_url=url, provider="bench"))
        client.sync.provision_user("caller", initial_balance="1000000")
        token = client.sync.create_session("caller", "bench", "1000000").id
        client.close()
        names = ["bare", "metered", "wallet_payer"] + (["no_ledger"] if args.breakdown else [])
        ports = {name: free_port() for name in names}
        flags = {"bare": [], "metered": ["--metered"], "no_ledger": ["--metered", "--stub"],
                 "wallet_payer": ["--metered", "--wallet-payer"]}  # fmt: skip
        procs = {
            name: subprocess.Popen(
                [sys.executable, __file__, "--serve", str(port), "--database-url", url]
                + flags[name],
                env=os.environ.copy(),
            )
            for name, port in ports.items()
        }
        try:
            for name, proc in procs.items():
                wait_listening(ports[name], proc)
            headers = {"X-Drip-Session": token}
            wallet_headers = {USER_HEADER: "caller"}
            lat: dict[str, list[float]] = {}
            rps: dict[str, float] = {}
            sends = {name: wallet_headers if name == "wallet_payer" else headers
                     for name in names}  # fmt: skip
            for name in names:  # warm up every server first
                asyncio.run(latency_ms(ports[name], sends[name], 0.5))
            # interleaved rounds, each server's best: a burst of other work on the machine
            # during one measurement does not decide the ratio
            share = args.seconds / ROUNDS
            # latency first, on servers no burst of load has just left busy (writing out
            # the WAL it grew), then the throughput rounds
            for _ in range(ROUNDS):
                for name in ("bare", "metered"):
                    lat.setdefault(name, []).extend(
                        asyncio.run(latency_ms(ports[name], headers, share))
                    )
            for _ in range(ROUNDS):
                for name in names:
                    rate = asyncio.run(throughput(ports[name], sends[name], share))
                    rps[name] = max(rps.get(name, 0.0), rate)
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(10)
        work = {
            mode: asyncio.run(ledger_work_us(url, token, mode == "wallet_payer", 2.0))
            for mode in ("session", "wallet_payer")
        }
        check = DripClient(DripConfig(database_url=url, provider="bench"))
        report = check.ledger.check_invariants()
        charged = check.sync.get_session(token)["spent"]
        check.close()
    if not report.ok:
        raise SystemExit(f"ledger invariants failed after the run: {report.checks}")

    p50 = {k: statistics.median(v) for k, v in lat.items()}
    p99 = {k: pct(v, 0.99) for k, v in lat.items()}
    metrics = [
        Metric("middleware.requests_per_s", rps["metered"], "req/s", rps["bare"],
               rps["metered"] / rps["bare"]),
        Metric("middleware.added_latency_p50_ms", p50["metered"] - p50["bare"], "ms",
               p50["bare"], p50["metered"] / p50["bare"]),
        Metric("middleware.added_latency_p99_ms", p99["metered"] - p99["bare"], "ms",
               p99["bare"], p99["metered"] / p99["bare"]),
    ]  # fmt: skip
    metrics.append(Metric("middleware.requests_per_s.wallet_payer", rps["wallet_payer"],
                          "req/s", rps["bare"], rps["wallet_payer"] / rps["bare"]))  # fmt: skip
    # what the 70% target leaves for everything Drip does in one request
    budget = 1e6 / (TARGET_RPS_RATIO * rps["bare"]) - 1e6 / rps["bare"]
    for mode, us in work.items():
        metrics.append(Metric(f"middleware.ledger_work_us.{mode}", us, "us/req", budget,
                              us / budget))  # fmt: skip
    if args.breakdown:
        metrics.append(Metric("middleware.requests_per_s.no_ledger", rps["no_ledger"], "req/s",
                              rps["bare"], rps["no_ledger"] / rps["bare"]))  # fmt: skip
    if args.json:
        for m in metrics:
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                              for k, v in m.__dict__.items()}))  # fmt: skip
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="DripMeter vs the bare endpoint (uvicorn, 127.0.0.1, SQLite)")
    for column in ("metric", "value", "unit", "baseline", "ratio"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for m in metrics:
        table.add_row(m.metric, f"{m.value:,.3f}", m.unit, f"{m.baseline:,.3f}",
                      f"{m.ratio:.2f}")  # fmt: skip
    console = Console()
    console.print(table)
    console.print(
        "baseline: the bare endpoint's figure; for ledger_work_us.*, what the 70% target "
        f"leaves for all of Drip's work in one request ({budget:.1f} us = 1/(0.7 x bare "
        "req/s) - 1/(bare req/s)). session: paid with X-Drip-Session (a linked chain of a "
        "session hold and a wallet hold); wallet_payer: the payer named by a resolver "
        "(one wallet hold)."
    )
    console.print(
        f"latency: {len(lat['bare'])} bare and {len(lat['metered'])} metered sequential "
        f"requests; throughput: {CONNECTIONS} connections, {args.seconds:g} s each; "
        f"{charged} atomic units charged, invariants ok"
    )
    added50, added99 = metrics[1].value, metrics[2].value
    ratio = metrics[0].ratio or 0.0
    console.print(
        "targets: added p50 < 0.5 ms: "
        + ("met" if added50 < TARGET_ADDED_P50_MS else "NOT MET")
        + f" ({added50:.3f}); added p99 < 2 ms: "
        + ("met" if added99 < TARGET_ADDED_P99_MS else "NOT MET")
        + f" ({added99:.3f}); requests/s >= 70% of bare: "
        + ("met" if ratio >= TARGET_RPS_RATIO else "NOT MET")
        + f" ({ratio:.0%})"
    )


if __name__ == "__main__":
    main()
