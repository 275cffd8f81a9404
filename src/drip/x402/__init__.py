"""x402 (HTTP 402, v2 wire format) on the official ``x402`` SDK: a facilitator server."""
