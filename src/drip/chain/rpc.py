"""JSON-RPC over HTTP for servers that read the chain from many threads at once.

``CoalescingHTTPProvider`` is web3's ``HTTPProvider`` with two changes:

- read calls (``eth_call``, ``eth_getCode``, balances, receipts, ...) that arrive while
  another is in flight are sent together as one JSON-RPC batch, so N concurrent
  verifications cost about one round trip instead of N (group commit, for RPC); each
  call still gets its own answer (matched by id) or its own error;
- ``eth_chainId`` is asked once per provider: web3's validation otherwise asks it
  before every ``eth_call``. A provider is bound to one endpoint, whose chain does not
  change under it.

Writes (``eth_sendRawTransaction``) and anything else go out alone, as before.
"""

from __future__ import annotations

import json
import threading
from typing import Any, cast

from eth_typing import URI
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
#: what a call gets when the batch's answer has no response with its id
MISSING: RPCResponse = {
    "jsonrpc": "2.0", "id": 0, "error": {"code": -32603, "message": "no response for this call"}
}  # fmt: skip


class _Call:
    """One caller's request, waiting to be sent (or to lead the sending)."""

    __slots__ = ("error", "lead", "method", "params", "response", "wake")

    def __init__(self, method: RPCEndpoint, params: Any) -> None:
        self.method, self.params = method, params
        self.wake = threading.Event()
        self.lead = False
        self.response: RPCResponse | None = None
        self.error: BaseException | None = None

    def finish(self, response: RPCResponse | None, error: BaseException | None = None) -> None:
        self.response, self.error = response, error
        self.wake.set()

    @property
    def finished(self) -> bool:
        return self.response is not None or self.error is not None


class CoalescingHTTPProvider(HTTPProvider):
    """``HTTPProvider`` whose concurrent reads share one batch request (see module doc).

    The first caller to find nobody sending becomes the leader: it sends one batch (the
    oldest queued calls, its own among them), then hands the lead to the oldest caller
    still waiting, so no caller is kept sending on the others' behalf. Responses are
    matched to calls by their JSON-RPC ids; an endpoint that refuses a batch as a whole
    gets its calls again one by one."""

    def __init__(self, endpoint_uri: str, **kwargs: Any) -> None:
        super().__init__(endpoint_uri, **kwargs)
        self._lock = threading.Lock()
        self._queue: list[_Call] = []
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
        call = _Call(method, params)
        with self._lock:
            self._queue.append(call)
            if not self._sending:
                self._sending = call.lead = True
        while not call.finished:
            if not call.lead:
                call.wake.wait()
                continue
            self._send_next_batch()  # the leader's own call is the oldest: it goes now
            self._hand_over()
        if call.error is not None:
            raise call.error
        assert call.response is not None
        return call.response

    def _hand_over(self) -> None:
        with self._lock:
            if self._queue:
                nxt = self._queue[0]
                nxt.lead = True
                nxt.wake.set()
            else:
                self._sending = False

    def _single(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        self.requests_sent += 1
        self.calls_sent += 1
        return super().make_request(method, params)

    def _send_next_batch(self) -> None:
        with self._lock:
            batch, self._queue = self._queue[:BATCH_MAX], self._queue[BATCH_MAX:]
        if len(batch) == 1:
            self._one_by_one(batch)
            return
        encoded = [self.encode_rpc_request(c.method, c.params) for c in batch]
        ids = [json.loads(e)["id"] for e in encoded]
        try:
            raw = self._request_session_manager.make_post_request(
                cast(URI, self.endpoint_uri),
                b"[" + b",".join(encoded) + b"]",
                **self.get_request_kwargs(),
            )
            self.requests_sent += 1
            self.calls_sent += len(batch)
            decoded: Any = self.decode_rpc_response(raw)
        except Exception as exc:  # noqa: BLE001 - every waiter gets the failure
            for c in batch:
                c.finish(None, exc)
            return
        if not isinstance(decoded, list):
            self._one_by_one(batch)  # the endpoint refused the batch as a whole
            return
        by_id = {r.get("id"): r for r in decoded if isinstance(r, dict)}
        for c, request_id in zip(batch, ids, strict=True):
            c.finish(cast(RPCResponse, by_id.get(request_id, MISSING)))

    def _one_by_one(self, batch: list[_Call]) -> None:
        for c in batch:
            try:
                c.finish(self._single(c.method, c.params))
            except Exception as exc:  # noqa: BLE001 - delivered to its own caller
                c.finish(None, exc)


__all__ = ["BATCHABLE", "CoalescingHTTPProvider"]
