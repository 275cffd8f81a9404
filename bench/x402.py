"""x402 on the local devnet: the Drip facilitator against the SDK's own, paid requests end
to end, settle latency, and gas of one EIP-3009 transfer.

    python bench/x402.py [--payments 120] [--json]

- verify throughput (payments/s): the same signed payloads verified by the ``x402``
  package's facilitator in process (its own ``FacilitatorWeb3Signer``, as the SDK ships
  it) and by ``drip facilitator`` running as its own process, over HTTP, with its
  dedupe and checks; the same number of concurrent callers each, in the same run; the
  ratio is Drip / SDK (target >= 1);
- paid requests/s through ``X402Meter`` (verify, serve, settle on anvil), paid by
  Drip's ``PayingTransport``;
- settle latency p50 (ms) of ``drip facilitator`` on anvil;
- gas used by one ``transferWithAuthorization`` settle.
Needs anvil (``make node_modules``).
"""

from __future__ import annotations

import sys
from pathlib import Path

# this file is named like the SDK it measures: keep its folder from shadowing `x402`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import concurrent.futures  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from eth_account import Account  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from x402 import x402ClientSync, x402FacilitatorSync  # noqa: E402
from x402.http.facilitator_client import HTTPFacilitatorClient, HTTPFacilitatorClientSync  # noqa: E402
from x402.mechanisms.evm.exact import (  # noqa: E402
    register_exact_evm_client,
    register_exact_evm_facilitator,
)
from x402.mechanisms.evm.signers import EthAccountSigner, FacilitatorWeb3Signer  # noqa: E402
from x402.schemas import PaymentRequired, PaymentRequirements  # noqa: E402

from drip import DripClient, DripConfig  # noqa: E402
from drip.chain import devnet  # noqa: E402
from drip.x402.client import PayingTransport, SpendPolicy  # noqa: E402
from drip.x402.server import X402Meter, x402_price  # noqa: E402

NETWORK = "eip155:31337"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(app: Any) -> tuple[str, uvicorn.Server]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server


def requirements(net: devnet.Devnet, amount: int) -> PaymentRequirements:
    return PaymentRequirements(
        scheme="exact", network=NETWORK, asset=net.usdc, amount=str(amount),
        pay_to=net.accounts[2][0], max_timeout_seconds=600,
        extra={"name": "USD Coin", "version": "2"},
    )  # fmt: skip


def payloads(net: devnet.Devnet, req: PaymentRequirements, n: int) -> list[Any]:
    client = x402ClientSync()
    register_exact_evm_client(client, EthAccountSigner(Account.from_key(net.accounts[1][1])))
    client.set_spend_controls(False)
    return [client.create_payment_payload(PaymentRequired(accepts=[req])) for _ in range(n)]


def start_facilitator(net: devnet.Devnet, database_url: str) -> tuple[str, subprocess.Popen[bytes]]:
    """``drip facilitator`` as its own process, the way it is deployed."""
    port = free_port()
    env = {**os.environ, "DRIP_FACILITATOR_PRIVATE_KEY": net.accounts[0][1]}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from drip.cli.main import main; main()", "facilitator",
         "--rpc-url", net.rpc_url, "--network", NETWORK, "--port", str(port),
         "--database-url", database_url],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/supported", timeout=1).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("drip facilitator did not start")


def sdk_facilitator(net: devnet.Devnet) -> x402FacilitatorSync:
    """The x402 package's facilitator exactly as its docs set it up."""
    facilitator = x402FacilitatorSync()
    signer = FacilitatorWeb3Signer(private_key=net.accounts[0][1], rpc_url=net.rpc_url)
    register_exact_evm_facilitator(facilitator, signer, [NETWORK])
    return facilitator


def per_s(fn: Any, items: list[Any], callers: int) -> float:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(callers) as pool:
        results = list(pool.map(fn, items))
    elapsed = time.perf_counter() - start
    if not all(results):
        raise SystemExit("a verification failed during the benchmark")
    return len(items) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=120)
    parser.add_argument("--paid-requests", type=int, default=40)
    parser.add_argument("--callers", type=int, default=8, help="concurrent verify callers")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    net = devnet.start()
    tmp = tempfile.TemporaryDirectory(prefix="drip-x402-bench-")
    try:
        sdk = sdk_facilitator(net)
        fac_url, fac_proc = start_facilitator(net, f"sqlite:///{tmp.name}/facilitator.db")
        drip_fac = HTTPFacilitatorClientSync({"url": fac_url})
        req = requirements(net, 1_000)
        signed = payloads(net, req, args.payments)
        for p in signed[:5]:  # warm both paths
            sdk.verify(p, req)
            drip_fac.verify(p, req)
        sdk_rate = per_s(lambda p: sdk.verify(p, req).is_valid, signed, args.callers)
        drip_rate = per_s(lambda p: drip_fac.verify(p, req).is_valid, signed, args.callers)

        latencies: list[float] = []
        gas: list[int] = []
        w3 = net.web3()
        for p in signed[:10]:
            start = time.perf_counter()
            result = drip_fac.settle(p, req)
            latencies.append((time.perf_counter() - start) * 1000)
            if not result.success:
                raise SystemExit(f"settle failed: {result.error_reason}")
            gas.append(int(w3.eth.get_transaction_receipt(result.transaction)["gasUsed"]))

        api = FastAPI()

        @api.get("/paid")
        async def paid() -> dict[str, bool]:
            return {"ok": True}

        provider = DripClient(DripConfig(database_url=f"sqlite:///{tmp.name}/provider.db"))
        price = x402_price("paid", "0.001", pay_to=net.accounts[2][0], asset=net.usdc,
                           network=NETWORK)  # fmt: skip
        facilitator = HTTPFacilitatorClient({"url": fac_url})
        meter = X402Meter(api, client=provider, facilitator=facilitator,
                          routes={"GET /paid": price})  # fmt: skip
        app_url, app_server = serve(meter)

        async def paid_requests(n: int) -> float:
            transport = PayingTransport(Account.from_key(net.accounts[3][1]), SpendPolicy())
            async with httpx.AsyncClient(base_url=app_url, transport=transport) as http:
                await http.get("/paid")  # warm-up
                start = time.perf_counter()
                for _ in range(n):
                    r = await http.get("/paid")
                    if r.status_code != 200:
                        raise SystemExit(f"paid request failed: {r.status_code} {r.text[:200]}")
                return n / (time.perf_counter() - start)

        paid_rate = asyncio.run(paid_requests(args.paid_requests))
        app_server.should_exit = True
        fac_proc.terminate()
        fac_proc.wait(10)
        provider.close()
    finally:
        net.stop()
        tmp.cleanup()

    metrics = [
        {"metric": "x402.verify_per_s", "value": round(drip_rate, 1), "unit": "payments/s",
         "baseline": round(sdk_rate, 1), "ratio": round(drip_rate / sdk_rate, 3)},
        {"metric": "x402.paid_requests_per_s", "value": round(paid_rate, 1), "unit": "req/s",
         "baseline": None, "ratio": None},
        {"metric": "x402.settle_latency_p50_ms", "value": round(statistics.median(latencies), 2),
         "unit": "ms", "baseline": None, "ratio": None},
        {"metric": "x402.exact_gas_per_call", "value": int(statistics.median(gas)), "unit": "gas",
         "baseline": None, "ratio": None},
    ]  # fmt: skip
    if args.json:
        for m in metrics:
            print(json.dumps(m))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="x402 on anvil: Drip facilitator vs the x402 SDK's, paid requests, gas")
    for column in ("metric", "value", "unit", "baseline", "ratio"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for m in metrics:
        table.add_row(m["metric"], f"{m['value']:,}", m["unit"],
                      "-" if m["baseline"] is None else f"{m['baseline']:,}",
                      "-" if m["ratio"] is None else f"{m['ratio']:.2f}")  # fmt: skip
    console = Console()
    console.print(table)
    console.print(
        f"verify: {args.payments} payloads, {args.callers} concurrent callers each; the SDK's "
        f"in process, Drip's in its own process over HTTP with its nonce check. Target: "
        f"Drip >= SDK: " + ("met" if drip_rate >= sdk_rate else "NOT MET")
    )


if __name__ == "__main__":
    main()
