"""A local EVM devnet: anvil (npm ``@foundry-rs/anvil``) on 127.0.0.1 with Drip's test
USDC deployed and funded. ``drip devnet`` and the test fixtures both use it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drip import errors
from drip.chain.artifacts import artifact

#: Where Multicall3 lives on every EVM chain; the x402 SDK's facilitator reads through it.
MULTICALL3_ADDRESS = "0xcA11bde05977b3631167028862bE2a173976CA11"
#: anvil's well-known development mnemonic: its first accounts and keys are public.
MNEMONIC = "test test test test test test test test test test test junk"
CHAIN_ID = 31337
START_TIMEOUT_S = 30


def anvil_binary() -> str:
    """anvil from the project's node_modules (``make node_modules``), else from PATH."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "node_modules" / ".bin" / "anvil"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("anvil")
    if found is None:
        raise errors.ConfigError("anvil not found: run `make node_modules` (npm @foundry-rs/anvil)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Devnet:
    """A running anvil with a deployed TestUSDC; stop it with :meth:`stop`."""

    rpc_url: str
    process: subprocess.Popen[bytes]
    usdc: str = ""
    accounts: list[tuple[str, str]] = field(default_factory=list)  # (address, private key)

    def web3(self) -> Any:
        from web3 import Web3

        return Web3(Web3.HTTPProvider(self.rpc_url, request_kwargs={"timeout": 30}))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start(port: int | None = None, *, accounts: int = 10, fund_usdc: int = 1_000_000_000) -> Devnet:
    """Start anvil on 127.0.0.1, deploy TestUSDC and give each account ``fund_usdc``
    atomic units (1,000 USDC by default)."""
    from eth_account import Account

    port = port or free_port()
    process = subprocess.Popen(
        [anvil_binary(), "--host", "127.0.0.1", "--port", str(port), "--chain-id",
         str(CHAIN_ID), "--accounts", str(accounts), "--mnemonic", MNEMONIC, "--silent"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy(),
    )  # fmt: skip
    devnet = Devnet(f"http://127.0.0.1:{port}", process)
    try:
        w3 = devnet.web3()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                detail = process.stderr.read().decode()[:300] if process.stderr else ""
                raise errors.StoreError(f"anvil exited: {detail}")
            try:
                if w3.eth.chain_id == CHAIN_ID:
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if time.monotonic() > deadline:
                raise errors.StoreError("anvil did not start")
            time.sleep(0.05)
        Account.enable_unaudited_hdwallet_features()
        for i in range(accounts):
            acct = Account.from_mnemonic(MNEMONIC, account_path=f"m/44'/60'/0'/0/{i}")
            devnet.accounts.append((acct.address, acct.key.hex()))
        place_at(w3, "Multicall3", MULTICALL3_ADDRESS, devnet.accounts[0])
        devnet.usdc = deploy(w3, "TestUSDC", devnet.accounts[0])
        token = w3.eth.contract(address=devnet.usdc, abi=artifact("TestUSDC")["abi"])
        for address, _ in devnet.accounts:
            send(w3, token.functions.mint(address, fund_usdc), devnet.accounts[0])
    except BaseException:
        devnet.stop()
        raise
    return devnet


def place_at(w3: Any, name: str, address: str, sender: tuple[str, str]) -> None:
    """Put contract ``name`` at a fixed (canonical) address: deploy it anywhere, then copy
    its runtime code there with ``anvil_setCode``. Constructor state is not copied, so this
    suits stateless contracts such as Multicall3."""
    if len(w3.eth.get_code(address)) > 0:
        return
    deployed = deploy(w3, name, sender)
    w3.provider.make_request("anvil_setCode", [address, w3.eth.get_code(deployed).to_0x_hex()])
    if len(w3.eth.get_code(address)) == 0:
        raise errors.StoreError(f"anvil_setCode did not place {name} at {address}")


def deploy(w3: Any, name: str, sender: tuple[str, str]) -> str:
    art = artifact(name)
    contract = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
    receipt = send(w3, contract.constructor(), sender)
    return str(receipt["contractAddress"])


def send(w3: Any, call: Any, sender: tuple[str, str], *, gas: int = 3_000_000) -> Any:
    """Sign ``call`` with the sender's key, send it and wait; raises on a revert."""
    address, key = sender
    tx = call.build_transaction({
        "from": address, "nonce": w3.eth.get_transaction_count(address), "gas": gas,
        "chainId": w3.eth.chain_id,
    })  # fmt: skip
    signed = w3.eth.account.sign_transaction(tx, key)
    tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)
    if receipt["status"] != 1:
        raise errors.StoreError(f"transaction {tx_hash.hex()} reverted")
    return receipt
