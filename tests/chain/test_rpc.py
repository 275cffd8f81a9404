"""CoalescingHTTPProvider against anvil: concurrent reads share batch requests, each
caller still gets its own answer, the chain id is asked once, failures reach every
waiter."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest
from web3 import Web3

from drip.chain.artifacts import artifact
from drip.chain.devnet import Devnet
from drip.chain.rpc import CoalescingHTTPProvider


def test_concurrent_reads_share_requests_and_answers_stay_apart(chain: Devnet) -> None:
    provider = CoalescingHTTPProvider(chain.rpc_url)
    w3 = Web3(provider)
    usdc = w3.eth.contract(address=chain.usdc, abi=artifact("TestUSDC")["abi"])
    reference = Web3(Web3.HTTPProvider(chain.rpc_url))
    ref_usdc = reference.eth.contract(address=chain.usdc, abi=artifact("TestUSDC")["abi"])
    owners = [a for a, _ in chain.accounts] * 8
    expected = [ref_usdc.functions.balanceOf(a).call() for a in owners]
    expected_eth = [reference.eth.get_balance(a) for a in owners]
    barrier = threading.Barrier(16)

    def read(i: int) -> tuple[int, int]:
        barrier.wait()
        return usdc.functions.balanceOf(owners[i]).call(), w3.eth.get_balance(owners[i])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(read, range(len(owners))))
    assert [r[0] for r in results] == expected
    assert [r[1] for r in results] == expected_eth
    assert provider.calls_sent >= 2 * len(owners)
    assert provider.requests_sent < provider.calls_sent  # some went out together


def test_chain_id_is_asked_once(chain: Devnet) -> None:
    provider = CoalescingHTTPProvider(chain.rpc_url)
    w3 = Web3(provider)
    assert {w3.eth.chain_id for _ in range(5)} == {31337}
    assert provider.requests_sent == 1


def test_a_dead_endpoint_fails_every_waiter(chain: Devnet) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    w3 = Web3(CoalescingHTTPProvider(f"http://127.0.0.1:{port}", request_kwargs={"timeout": 2}))
    addr = chain.accounts[0][0]

    def read(_: int) -> str:
        try:
            w3.eth.get_balance(addr)
        except Exception as exc:  # noqa: BLE001 - the test looks at what each waiter got
            return type(exc).__name__
        return "ok"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(read, range(8)))
    assert "ok" not in outcomes and len(outcomes) == 8


def test_a_reverting_call_fails_only_its_caller(chain: Devnet) -> None:
    provider = CoalescingHTTPProvider(chain.rpc_url)
    w3 = Web3(provider)
    usdc = w3.eth.contract(address=chain.usdc, abi=artifact("TestUSDC")["abi"])
    a, b = chain.accounts[0][0], chain.accounts[1][0]
    barrier = threading.Barrier(8)

    def call(i: int) -> object:
        barrier.wait()
        if i % 2:
            # transferring more than the zero address holds reverts
            with pytest.raises(Exception):  # noqa: B017 - web3 raises its revert type
                usdc.functions.transfer(b, 10**30).call({"from": a})
            return "reverted"
        return usdc.functions.balanceOf(a).call()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(call, range(8)))
    assert outcomes[1::2] == ["reverted"] * 4
    assert all(isinstance(x, int) for x in outcomes[0::2])


class _Proxy:
    """A JSON-RPC endpoint in front of anvil that behaves like some hosted providers:
    ``refuse`` answers any batch with one error object; ``reverse`` answers batches with
    their responses in reverse order (JSON-RPC does not promise an order)."""

    def __init__(self, upstream: str, mode: str) -> None:
        import http.server
        import json as json_module
        import urllib.request

        proxy = self
        self.batches = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                parsed = json_module.loads(body)
                if isinstance(parsed, list):
                    proxy.batches += 1
                if isinstance(parsed, list) and mode == "refuse":
                    answer = json_module.dumps(
                        {
                            "jsonrpc": "2.0",
                            "id": None,
                            "error": {
                                "code": -32600,
                                "message": "batch requests are not supported",
                            },
                        }
                    ).encode()
                else:
                    req = urllib.request.Request(
                        upstream, data=body, headers={"Content-Type": "application/json"}
                    )
                    with urllib.request.urlopen(req, timeout=10) as up:
                        answer = up.read()
                    if isinstance(parsed, list) and mode == "reverse":
                        answer = json_module.dumps(json_module.loads(answer)[::-1]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.mark.parametrize("mode", ["refuse", "reverse"])
def test_batches_refused_or_reordered_still_answer_each_caller(chain: Devnet, mode: str) -> None:
    proxy = _Proxy(chain.rpc_url, mode)
    try:
        provider = CoalescingHTTPProvider(proxy.url)
        w3 = Web3(provider)
        owners = [a for a, _ in chain.accounts] * 4
        reference = Web3(Web3.HTTPProvider(chain.rpc_url))
        expected = [reference.eth.get_balance(a) for a in owners]
        go = threading.Event()

        def read(i: int) -> int:
            go.wait()
            return int(w3.eth.get_balance(owners[i]))

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            results = pool.map(read, range(len(owners)))
            go.set()
            assert list(results) == expected
        assert proxy.batches > 0  # the batching was exercised
    finally:
        proxy.close()
