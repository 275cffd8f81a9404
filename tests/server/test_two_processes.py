"""Two `drip serve` processes on one PostgreSQL database, many concurrent clients spending
one session and one wallet: no overspend, no double charge, each Idempotency-Key once."""

from __future__ import annotations

import concurrent.futures
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from drip.config import DripConfig
from drip.metering import DripClient
from drip.server.keys import KeyStore

BUDGET = 300_000  # 0.30 USDC: far less than the clients ask for
FUNDS = 1_000_000


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def two_servers(postgres_url: str) -> Iterator[tuple[list[str], str, str, DripClient]]:
    client = DripClient(DripConfig(database_url=postgres_url))
    client.sync.provision_user("shared", initial_balance=str(FUNDS / 1_000_000))
    token = client.sync.create_session("shared", "default", str(BUDGET / 1_000_000)).id
    admin, _ = KeyStore(client.ledger.store).create("admin", "two-process test")
    ports = [_port(), _port()]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "drip.cli.main",
                "serve",
                "--port",
                str(port),
                "--database-url",
                postgres_url,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=os.environ.copy(),
        )
        for port in ports
    ]
    try:
        for port, proc in zip(ports, procs, strict=True):
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "drip serve did not start"
                time.sleep(0.1)
        yield [f"http://127.0.0.1:{p}" for p in ports], admin, token, client
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(15)
        client.close()


def test_two_processes_one_session_no_overspend(
    two_servers: tuple[list[str], str, str, DripClient],
) -> None:
    urls, admin, token, client = two_servers
    rng = random.Random(7)
    requests = [(f"k{i}", rng.randint(1_000, 20_000)) for i in range(120)]
    # every key is sent twice, to different servers, at the same time as the others
    jobs = [(key, amount, urls[i % 2]) for i, (key, amount) in enumerate(requests)]
    jobs += [(key, amount, urls[(i + 1) % 2]) for i, (key, amount) in enumerate(requests)]
    rng.shuffle(jobs)

    def send(job: tuple[str, int, str]) -> tuple[str, int, dict[str, object]]:
        key, amount, url = job
        with httpx.Client(base_url=url, timeout=60) as http:
            r = http.post(
                "/v1/charges",
                json={"amount": f"{amount / 1_000_000:.6f}", "event": "search"},
                headers={"Authorization": f"Bearer {admin}", "X-Drip-Session": token,
                         "Idempotency-Key": key},
            )  # fmt: skip
            return key, r.status_code, r.json()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, jobs))
    # a twin that arrived while its key's first request ran was told 409: in progress, or
    # (if that request was refused meanwhile, and so released the key) "just failed;
    # retry"; retried now, it gets the stored answer, or is refused the same way
    transient = ("being processed", "just failed; retry")
    odd = [(k, s, b) for k, s, b in results
           if s == 409 and not any(t in str(b) for t in transient)]  # fmt: skip
    assert not odd, odd[:3]
    results = [
        send(job) if status == 409 else (key, status, body)
        for (key, status, body), job in zip(results, jobs, strict=True)
    ]

    assert all(status in (200, 402) for _, status, _ in results), results[:3]
    by_key: dict[str, set[str]] = {}
    for key, status, body in results:
        # a charge's answer repeats exactly; a refusal is not stored (retrying it after a
        # top-up may succeed), so only its status must agree
        by_key.setdefault(key, set()).add(str(sorted(body.items())) if status == 200 else "402")
    assert all(len(answers) == 1 for answers in by_key.values()), by_key
    charged = {key: amount for key, amount in requests if next(iter(by_key[key])) != "402"}
    total = sum(charged.values())
    assert 0 < total <= BUDGET
    assert len(charged) < len(requests)  # the budget ran out: the race was real
    session = client.sync.get_session(token)
    assert session["spent"] == total and session["pending"] == 0
    assert client.sync.get_user("shared")["posted_usdc"] * 1_000_000 == FUNDS - total
    # one ledger transfer per charged key, none for refused ones
    wallet_debits = [t for t in client.ledger.history("user:shared", limit=1000).items
                     if t.debit_account_id == "user:shared"]  # fmt: skip
    assert len(wallet_debits) == len(charged)
    assert client.ledger.check_invariants().ok
