"""`drip serve` logs JSON lines, and never a key, a token or a query string."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx

from drip.config import DripConfig
from drip.metering import DripClient
from drip.server.keys import KeyStore


def test_serve_logs_json_without_secrets(sqlite_url: str) -> None:
    client = DripClient(DripConfig(database_url=sqlite_url))
    client.sync.provision_user("logan", initial_balance="1")
    token = client.sync.create_session("logan", "default", "1").id
    admin, _ = KeyStore(client.ledger.store).create("admin")
    client.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "drip.cli.main", "serve", "--port", str(port),
         "--database-url", sqlite_url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy(),
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        headers = {"Authorization": f"Bearer {admin}", "X-Drip-Session": token}
        httpx.get(f"{url}/v1/wallets/logan", headers=headers)
        httpx.get(f"{url}/v1/sessions/current?secret=query-value", headers=headers)
        httpx.get(f"{url}/v1/wallets", headers={"Authorization": "Bearer drip_sk_bad_key"})
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    lines = [line for line in err.decode().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    requests = [r for r in records if r.get("event") == "request"]
    assert {(r["route"], r["status"]) for r in requests} >= {
        ("/healthz", 200), ("/v1/wallets/{user_id}", 200), ("/v1/sessions/current", 200),
        ("/v1/wallets", 401),
    }  # fmt: skip
    assert all({"timestamp", "level", "duration_ms", "method"} <= set(r) for r in requests)
    text = err.decode()
    key_secret = admin.removeprefix("drip_sk_").partition("_")[2]
    for secret in (admin, key_secret, token, token[3:], "query-value", "drip_sk_bad_key"):
        assert secret not in text
