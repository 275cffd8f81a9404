"""EVM chain layer: networks and their USDC, contract artifacts, the local devnet."""

from drip.chain.networks import BASE, BASE_SEPOLIA, DEVNET, NETWORKS, Network, network

__all__ = ["BASE", "BASE_SEPOLIA", "DEVNET", "NETWORKS", "Network", "network"]
