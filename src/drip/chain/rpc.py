"""JSON-RPC over HTTP for servers that read the chain from many threads at once.

``CoalescingHTTPProvider`` is web3's ``HTTPProvider`` with two changes:

- read calls (``eth_call``, ``eth_getCode``, balances, receipts, ...) that arrive while
  another is in flight are sent together as one JSON-RPC batch, so N concurrent
  verifications cost about one round trip instead of N (group commit, for RPC);
- ``eth_chainId`` is asked once per provider: web3's validation otherwise asks it
  before every ``eth_call``. A provider is bound to one endpoint, whose chain does not
  change under it.

Writes (``eth_sendRawTransaction``) and anything else go out alone, as before.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any, cast

from web3 import HTTPProvider
from web3.types import RPCEndpoint, RPCResponse

#: calls with no side effects, safe to send in one batch in any order
BATCHABLE = frozenset(
    {
        "eth_call",
        "eth_getCode",
        "eth_getBalance",
        "eth_getTransactionCount",
        "eth_getTransactionReceipt",
        "eth_getTransactionByHash",
        "eth_blockNumber",
        "eth_getBlockByNumber",
        "eth_estimateGas",
        "eth_gasPrice",
        "eth_maxPriorityFeePerGas",
        "eth_feeHistory",
    }
)
BATCH_MAX = 64
MALFORMED: RPCResponse = {
    "jsonrpc": "2.0", "id": 0, "error": {"code": -32603, "message": "malformed batch response"}
}  # fmt: skip


class CoalescingHTTPProvider(HTTPProvider):
    """``HTTPProvider`` whose concurrent reads share one batch request (see module doc)."""

    def __init__(self, endpoint_uri: str, **kwargs: Any) -> None:
        super().__init__(endpoint_uri, **kwargs)
        self._lock = threading.Lock()
        self._queue: list[tuple[RPCEndpoint, Any, Future[RPCResponse]]] = []
        self._sending = False
        self._chain_id: RPCResponse | None = None
        #: how many HTTP requests carried how many calls (for tests and benchmarks)
        self.requests_sent = 0
        self.calls_sent = 0

    def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        if method == "eth_chainId":
            if self._chain_id is None:
                response = self._single(method, params)
                if "result" in response and "error" not in response:
                    self._chain_id = response
                return response
            return self._chain_id
        if method not in BATCHABLE:
            return self._single(method, params)
        future: Future[RPCResponse] = Future()
        with self._lock:
            self._queue.append((method, params, future))
            lead = not self._sending
            if lead:
                self._sending = True
        if lead:
            self._drain()
        return future.result()

    def _single(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        self.requests_sent += 1
        self.calls_sent += 1
        return super().make_request(method, params)

    def _drain(self) -> None:
        """Send what is queued, batch after batch, until nothing is left (leader only)."""
        while True:
            with self._lock:
                batch, self._queue = self._queue[:BATCH_MAX], self._queue[BATCH_MAX:]
                if not batch:
                    self._sending = False
                    return
            try:
                if len(batch) == 1:
                    method, params, _ = batch[0]
                    responses: Any = [self._single(method, params)]
                else:
                    self.requests_sent += 1
                    self.calls_sent += len(batch)
                    responses = self.make_batch_request([(m, p) for m, p, _ in batch])
            except BaseException as exc:  # noqa: BLE001 - every waiter gets the failure
                for _, _, future in batch:
                    future.set_exception(exc)
                continue
            if not isinstance(responses, list) or len(responses) != len(batch):
                # the endpoint refused the batch as a whole: each waiter gets that answer
                whole = cast(RPCResponse, responses) if isinstance(responses, dict) else MALFORMED
                for _, _, future in batch:
                    future.set_result(whole)
                continue
            for (_, _, future), response in zip(batch, responses, strict=True):
                future.set_result(response)


__all__ = ["BATCHABLE", "CoalescingHTTPProvider"]
