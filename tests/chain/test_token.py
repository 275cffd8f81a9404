"""TestUSDC against anvil: EIP-2612 permit and EIP-3009 authorizations, both signature
forms, and every revert path."""

from __future__ import annotations

import os
import secrets
import time
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from web3.exceptions import ContractLogicError

from drip.chain.artifacts import artifact
from drip.chain.devnet import CHAIN_ID, Devnet, send

_AUTH_FIELDS = [
    {"name": "from", "type": "address"}, {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"}, {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"}, {"name": "nonce", "type": "bytes32"},
]  # fmt: skip
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def token(chain: Devnet) -> Any:
    return chain.web3().eth.contract(address=chain.usdc, abi=artifact("TestUSDC")["abi"])


def sign(chain: Devnet, key: str, primary: str, fields: list[dict[str, str]],
         message: dict[str, Any]) -> bytes:  # fmt: skip
    typed = {
        "types": {
            "EIP712Domain": [{"name": "name", "type": "string"},
                             {"name": "version", "type": "string"},
                             {"name": "chainId", "type": "uint256"},
                             {"name": "verifyingContract", "type": "address"}],
            primary: fields,
        },
        "primaryType": primary,
        "domain": {"name": "USD Coin", "version": "2", "chainId": CHAIN_ID,
                   "verifyingContract": chain.usdc},
        "message": message,
    }  # fmt: skip
    return bytes(Account.sign_message(encode_typed_data(full_message=typed), key).signature)


def authorization(
    chain: Devnet,
    payer: int,
    payee: int,
    value: int,
    *,
    kind: str = "TransferWithAuthorization",
    valid_after: int = 0,
    valid_before: int | None = None,
    signer: int | None = None,
) -> dict[str, Any]:
    frm, to = chain.accounts[payer][0], chain.accounts[payee][0]
    message = {"from": frm, "to": to, "value": value, "validAfter": valid_after,
               "validBefore": valid_before or int(time.time()) + 3600,
               "nonce": "0x" + secrets.token_hex(32)}  # fmt: skip
    key = chain.accounts[payer if signer is None else signer][1]
    message["signature"] = sign(chain, key, kind, _AUTH_FIELDS, message)
    return message


def args(m: dict[str, Any]) -> list[Any]:
    return [m["from"], m["to"], m["value"], m["validAfter"], m["validBefore"],
            bytes.fromhex(m["nonce"][2:])]  # fmt: skip


def vrs(signature: bytes) -> list[Any]:
    return [signature[64], signature[:32], signature[32:64]]


def reverts(call: Any, sender: str, reason: str) -> None:
    with pytest.raises(ContractLogicError) as info:
        call.call({"from": sender})
    assert reason in str(info.value)


def test_metadata(chain: Devnet) -> None:
    usdc = token(chain)
    assert (usdc.functions.name().call(), usdc.functions.version().call(),
            usdc.functions.decimals().call()) == ("USD Coin", "2", 6)  # fmt: skip


def test_transfer_with_authorization_both_forms_and_no_replay(chain: Devnet) -> None:
    usdc, w3 = token(chain), chain.web3()
    a, b = chain.accounts[1][0], chain.accounts[2][0]
    before = usdc.functions.balanceOf(b).call()
    m = authorization(chain, 1, 2, 1_500_000)
    fn = usdc.get_function_by_signature(
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
    )
    send(w3, fn(*args(m), m["signature"]), chain.accounts[3])  # anyone may submit it
    assert usdc.functions.balanceOf(b).call() == before + 1_500_000
    assert usdc.functions.authorizationState(a, bytes.fromhex(m["nonce"][2:])).call()
    reverts(fn(*args(m), m["signature"]), chain.accounts[3][0], "used or canceled")
    m2 = authorization(chain, 1, 2, 250_000)
    fn_vrs = usdc.get_function_by_signature(
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
    )
    send(w3, fn_vrs(*args(m2), *vrs(m2["signature"])), chain.accounts[3])
    assert usdc.functions.balanceOf(b).call() == before + 1_750_000


def test_authorization_revert_paths(chain: Devnet) -> None:
    usdc = token(chain)
    fn = usdc.get_function_by_signature(
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
    )
    sender = chain.accounts[3][0]
    now = chain.web3().eth.get_block("latest")["timestamp"]
    early = authorization(chain, 1, 2, 1, valid_after=now + 3600)
    reverts(fn(*args(early), early["signature"]), sender, "not yet valid")
    late = authorization(chain, 1, 2, 1, valid_before=now - 1)
    reverts(fn(*args(late), late["signature"]), sender, "expired")
    forged = authorization(chain, 1, 2, 1, signer=4)
    reverts(fn(*args(forged), forged["signature"]), sender, "invalid signature")
    tampered = authorization(chain, 1, 2, 1)
    reverts(fn(*[*args(tampered)[:2], 2, *args(tampered)[3:]], tampered["signature"]), sender,
            "invalid signature")  # fmt: skip
    too_much = authorization(chain, 1, 2, 10**15)
    reverts(fn(*args(too_much), too_much["signature"]), sender, "exceeds balance")
    high_s = authorization(chain, 1, 2, 1)
    sig = high_s["signature"]
    s_value = SECP256K1_N - int.from_bytes(sig[32:64], "big")
    flipped = sig[:32] + s_value.to_bytes(32, "big") + bytes([55 - sig[64]])
    reverts(fn(*args(high_s), flipped), sender, "invalid signature")
    reverts(fn(*args(high_s), sig[:64]), sender, "invalid signature")


def test_receive_with_authorization_only_by_the_payee(chain: Devnet) -> None:
    usdc, w3 = token(chain), chain.web3()
    fn = usdc.get_function_by_signature(
        "receiveWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
    )
    m = authorization(chain, 1, 2, 10, kind="ReceiveWithAuthorization")
    reverts(fn(*args(m), m["signature"]), chain.accounts[3][0], "caller must be the payee")
    before = usdc.functions.balanceOf(chain.accounts[2][0]).call()
    send(w3, fn(*args(m), m["signature"]), chain.accounts[2])
    assert usdc.functions.balanceOf(chain.accounts[2][0]).call() == before + 10
    # a transfer authorization is not a receive authorization
    t = authorization(chain, 1, 2, 10)
    reverts(fn(*args(t), t["signature"]), chain.accounts[2][0], "invalid signature")


def test_cancel_authorization(chain: Devnet) -> None:
    usdc, w3 = token(chain), chain.web3()
    m = authorization(chain, 1, 2, 10)
    nonce = bytes.fromhex(m["nonce"][2:])
    fields = [{"name": "authorizer", "type": "address"}, {"name": "nonce", "type": "bytes32"}]
    cancel_sig = sign(chain, chain.accounts[1][1], "CancelAuthorization", fields,
                      {"authorizer": m["from"], "nonce": m["nonce"]})  # fmt: skip
    cancel = usdc.get_function_by_signature("cancelAuthorization(address,bytes32,bytes)")
    forged = sign(chain, chain.accounts[4][1], "CancelAuthorization", fields,
                  {"authorizer": m["from"], "nonce": m["nonce"]})  # fmt: skip
    reverts(cancel(m["from"], nonce, forged), chain.accounts[3][0], "invalid signature")
    send(w3, cancel(m["from"], nonce, cancel_sig), chain.accounts[3])
    assert usdc.functions.authorizationState(m["from"], nonce).call()
    transfer = usdc.get_function_by_signature(
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
    )
    reverts(transfer(*args(m), m["signature"]), chain.accounts[3][0], "used or canceled")
    cancel_vrs = usdc.get_function_by_signature(
        "cancelAuthorization(address,bytes32,uint8,bytes32,bytes32)"
    )
    reverts(cancel_vrs(m["from"], nonce, *vrs(cancel_sig)), chain.accounts[3][0],
            "used or canceled")  # fmt: skip


def test_permit_both_forms(chain: Devnet) -> None:
    usdc, w3 = token(chain), chain.web3()
    owner, spender = chain.accounts[5], chain.accounts[6][0]
    fields = [{"name": "owner", "type": "address"}, {"name": "spender", "type": "address"},
              {"name": "value", "type": "uint256"}, {"name": "nonce", "type": "uint256"},
              {"name": "deadline", "type": "uint256"}]  # fmt: skip
    deadline = int(time.time()) + 3600

    def permit_sig(value: int, nonce: int, when: int) -> bytes:
        return sign(chain, owner[1], "Permit", fields, {"owner": owner[0], "spender": spender,
                    "value": value, "nonce": nonce, "deadline": when})  # fmt: skip

    by_bytes = usdc.get_function_by_signature("permit(address,address,uint256,uint256,bytes)")
    by_vrs = usdc.get_function_by_signature(
        "permit(address,address,uint256,uint256,uint8,bytes32,bytes32)"
    )
    sig = permit_sig(777, 0, deadline)
    send(w3, by_bytes(owner[0], spender, 777, deadline, sig), chain.accounts[3])
    assert usdc.functions.allowance(owner[0], spender).call() == 777
    reverts(by_bytes(owner[0], spender, 777, deadline, sig), chain.accounts[3][0],
            "invalid signature")  # the nonce moved on  # fmt: skip
    sig1 = permit_sig(5, 1, deadline)
    send(w3, by_vrs(owner[0], spender, 5, deadline, *vrs(sig1)), chain.accounts[3])
    assert usdc.functions.allowance(owner[0], spender).call() == 5
    expired = permit_sig(5, 2, 1)
    reverts(by_bytes(owner[0], spender, 5, 1, expired), chain.accounts[3][0], "expired")


def test_only_the_owner_mints_and_erc20_rules(chain: Devnet) -> None:
    usdc = token(chain)
    reverts(usdc.functions.mint(chain.accounts[7][0], 1), chain.accounts[7][0], "not the owner")
    reverts(usdc.functions.transfer(chain.accounts[8][0], 10**15), chain.accounts[7][0],
            "exceeds balance")  # fmt: skip
    reverts(usdc.functions.transferFrom(chain.accounts[1][0], chain.accounts[8][0], 1),
            chain.accounts[7][0], "exceeds allowance")  # fmt: skip


def test_artifacts_match_the_sources(tmp_path: Any) -> None:
    """`make contracts` output equals the committed artifacts (CI rebuilds them)."""
    import json
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if shutil.which("node") is None or not (root / "node_modules" / "solc").exists():
        if os.environ.get("DRIP_REQUIRE_ALL") == "1":
            pytest.fail("DRIP_REQUIRE_ALL=1 but node or npm solc is missing")
        pytest.skip("npm solc not installed (DRIP_REQUIRE_ALL=1 fails)")
    subprocess.run(["node", str(root / "scripts" / "compile-contracts.js"), str(tmp_path)],
                   check=True, capture_output=True)  # fmt: skip
    for built in tmp_path.glob("*.json"):
        committed = root / "src" / "drip" / "chain" / "artifacts" / built.name
        assert json.loads(built.read_text()) == json.loads(committed.read_text()), built.name


def test_multicall3_is_where_the_x402_sdk_reads(chain: Devnet) -> None:
    """The official SDK's multicall helper works against the devnet unchanged."""
    from x402.mechanisms.evm.multicall import MulticallCall, multicall
    from x402.mechanisms.evm.signers import FacilitatorWeb3Signer

    signer = FacilitatorWeb3Signer(private_key=chain.accounts[9][1], rpc_url=chain.rpc_url)
    abi = artifact("TestUSDC")["abi"]
    results = multicall(signer, [
        MulticallCall(address=chain.usdc, abi=abi, function_name="name"),
        MulticallCall(address=chain.usdc, abi=abi, function_name="balanceOf",
                      args=[chain.accounts[9][0]]),
    ])  # fmt: skip
    assert [r.result for r in results] == ["USD Coin", 1_000_000_000]
