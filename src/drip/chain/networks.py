"""The networks Drip settles on, named as x402 names them (CAIP-2)."""

from __future__ import annotations

from dataclasses import dataclass

from drip import errors


@dataclass(frozen=True, slots=True)
class Network:
    caip2: str
    chain_id: int
    name: str
    #: the USDC contract (the devnet's: Drip's test token, see DEVNET); None when unknown
    usdc: str | None


BASE = Network("eip155:8453", 8453, "Base", "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913")
BASE_SEPOLIA = Network(
    "eip155:84532", 84532, "Base Sepolia", "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
)
#: ``drip devnet`` (``drip.chain.devnet.start``) deploys TestUSDC as the anvil deployer's
#: second transaction on a fresh chain (after Multicall3), so it is always at this address
DEVNET = Network(
    "eip155:31337", 31337, "Local devnet (anvil)", "0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512"
)
NETWORKS = {n.caip2: n for n in (BASE, BASE_SEPOLIA, DEVNET)}


def network(caip2: str) -> Network:
    try:
        return NETWORKS[caip2]
    except KeyError:
        raise errors.InvalidRequest(
            f"unknown network {caip2!r}; known: {sorted(NETWORKS)}", param="network"
        ) from None
