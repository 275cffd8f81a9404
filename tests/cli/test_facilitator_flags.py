"""`drip facilitator --asset/--pay-to` reach the facilitator's allowlists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from drip.cli.main import app


def test_asset_and_pay_to_flags_reach_the_facilitator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import drip.x402.facilitator as facilitator

    seen: dict[str, Any] = {}

    def create_app(fac: object, store: object, **kw: Any) -> None:
        seen.update(kw)
        raise SystemExit(0)  # stop before serving

    monkeypatch.setattr(facilitator, "create_app", create_app)
    monkeypatch.setattr(facilitator, "build", lambda *a, **k: object())
    result = CliRunner().invoke(app, [
        "facilitator", "--rpc-url", "http://127.0.0.1:9", "--private-key", "0x" + "11" * 32,
        "--asset", "0xaa", "--asset", "0xbb", "--pay-to", "0xcc",
        "--database-url", f"sqlite:///{tmp_path}/f.db",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen == {"assets": ["0xaa", "0xbb"], "pay_to": ["0xcc"]}
    seen.clear()
    CliRunner().invoke(app, [
        "facilitator", "--rpc-url", "http://127.0.0.1:9", "--private-key", "0x" + "11" * 32,
        "--database-url", f"sqlite:///{tmp_path}/f.db",
    ])  # fmt: skip
    assert seen == {"assets": None, "pay_to": None}  # the defaults: USDC, any payTo
