"""Compiled contracts (ABI + bytecode), built by `make contracts` and committed."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def artifact(name: str) -> dict[str, Any]:
    """The artifact of contract ``name`` (``{"abi", "bytecode", "compiler", ...}``)."""
    text = resources.files("drip.chain").joinpath("artifacts", f"{name}.json").read_text()
    data: dict[str, Any] = json.loads(text)
    return data
