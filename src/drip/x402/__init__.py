"""x402 (HTTP 402, v2 wire format) on the official ``x402`` SDK: a facilitator server."""

import drip.chain._libs  # noqa: F401 - before any chain library: keeps the recursion limit
