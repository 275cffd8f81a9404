"""The networks Drip settles on, named as x402 names them (CAIP-2)."""

from __future__ import annotations

from dataclasses import dataclass

from drip import errors


@dataclass(frozen=True, slots=True)
class Network:
    caip2: str
    chain_id: int
    name: str
    #: the USDC contract; None on the devnet, where Drip deploys its own test token
    usdc: str | None


BASE = Network("eip155:8453", 8453, "Base", "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913")
BASE_SEPOLIA = Network(
    "eip155:84532", 84532, "Base Sepolia", "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
)
DEVNET = Network("eip155:31337", 31337, "Local devnet (anvil)", None)
NETWORKS = {n.caip2: n for n in (BASE, BASE_SEPOLIA, DEVNET)}


def network(caip2: str) -> Network:
    try:
        return NETWORKS[caip2]
    except KeyError:
        raise errors.InvalidRequest(
            f"unknown network {caip2!r}; known: {sorted(NETWORKS)}", param="network"
        ) from None
