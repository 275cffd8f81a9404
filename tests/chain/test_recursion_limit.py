"""Importing Drip's chain and x402 code keeps the process's recursion limit.

``eth_account`` imports ``py_ecc``, which raises the limit to 100,000 on import; with it, a
deeply nested JSON body no longer fails as a RecursionError (a 400) but overflows the C
stack of the thread parsing it, and the whole server process dies."""

from __future__ import annotations

import subprocess
import sys

MODULES = ("drip.x402.server", "drip.x402.facilitator", "drip.x402.client",
           "drip.x402.receipts", "drip.chain.rpc", "drip.chain")  # fmt: skip


def test_importing_the_chain_code_keeps_the_recursion_limit() -> None:
    for module in MODULES:
        out = subprocess.run(
            [sys.executable, "-c",
             f"import sys; before = sys.getrecursionlimit(); import {module}; "
             "print(before, sys.getrecursionlimit())"],
            capture_output=True, text=True, check=True, timeout=120,
        ).stdout.split()  # fmt: skip
        assert out[0] == out[1], (module, out)


def test_a_deep_json_body_is_a_recursion_error_not_a_crash() -> None:
    """In a process that imported the x402 server (and so the chain libraries), parsing
    a body nested 200,000 deep in a server's thread is a RecursionError (a 400), and the
    process lives on."""
    script = (
        "import json, threading\n"
        "import drip.x402.server, drip.x402.facilitator\n"
        "body = '[' * 200_000 + ']' * 200_000\n"
        "seen = []\n"
        "def parse():\n"
        "    try:\n"
        "        json.loads(body)\n"
        "    except RecursionError:\n"
        "        seen.append('RecursionError')\n"
        "t = threading.Thread(target=parse); t.start(); t.join()\n"
        "print(seen)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip() == "['RecursionError']"
