"""EVM chain layer: networks and their USDC, contract artifacts, the local devnet."""

import drip.chain._libs  # noqa: F401 - first: keeps the recursion limit (see its doc)
from drip.chain.networks import BASE, BASE_SEPOLIA, DEVNET, NETWORKS, Network, network

__all__ = ["BASE", "BASE_SEPOLIA", "DEVNET", "NETWORKS", "Network", "network"]
