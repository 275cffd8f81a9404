"""DripConfig: keyword arguments, then DRIP_* environment variables, then drip.toml."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from pydantic import ValidationError

from drip import DripConfig


def test_sources_and_their_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "drip.toml").write_text(
        'database_url = "sqlite:///from-toml.db"\nprovider = "toml-provider"\nfee_bps = 25\n'
    )
    config = DripConfig()
    assert (config.database_url, config.provider, config.fee_bps) == (
        "sqlite:///from-toml.db", "toml-provider", 25)  # fmt: skip
    monkeypatch.setenv("DRIP_PROVIDER", "env-provider")
    assert DripConfig().provider == "env-provider"
    assert DripConfig(provider="kwarg").provider == "kwarg"


def test_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for bad in ({"fee_bps": -1}, {"fee_bps": 10_000}, {"hold_timeout_s": 0},
                {"locus_api_key": "x"}):  # fmt: skip
        with pytest.raises(ValidationError):
            DripConfig(**bad)  # type: ignore[arg-type]


def test_secrets_do_not_print(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    config = DripConfig(stripe_webhook_secret="whsec_very_secret")
    assert "whsec_very_secret" not in repr(config) and "whsec_very_secret" not in str(config)
    assert config.stripe_webhook_secret is not None
    assert config.stripe_webhook_secret.get_secret_value() == "whsec_very_secret"


def test_nested_sections_from_env_and_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert (DripConfig().serve.host, DripConfig().serve.port) == ("127.0.0.1", 8402)
    (tmp_path / "drip.toml").write_text('[serve]\nhost = "0.0.0.0"\nport = 9000\n')
    assert (DripConfig().serve.host, DripConfig().serve.port) == ("0.0.0.0", 9000)
    monkeypatch.setenv("DRIP_SERVE__PORT", "9100")  # "__" nests; the environment wins
    assert (DripConfig().serve.host, DripConfig().serve.port) == ("0.0.0.0", 9100)
    monkeypatch.setenv("DRIP_SERVE__PORT", "70000")
    with pytest.raises(ValidationError):
        DripConfig()
    monkeypatch.delenv("DRIP_SERVE__PORT")
    (tmp_path / "drip.toml").write_text('[serve]\nhots = "typo"\n')
    with pytest.raises(ValidationError):
        DripConfig()  # an unknown key in a section is an error, not silently ignored


def test_a_drip_variable_that_is_no_setting_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A typo (DRIP_FEE_BSP) cannot be refused like drip.toml's (other programs set
    variables too), but it must not pass in silence: the fee would stay 0."""
    monkeypatch.setenv("DRIP_FEE_BSP", "250")
    monkeypatch.setenv("DRIP_REQUIRE_ALL", "1")  # the test suite's own: not a typo
    with caplog.at_level("WARNING", logger="drip.config"):
        config = DripConfig()
    assert config.fee_bps == 0
    warned = [r.getMessage() for r in caplog.records if r.name == "drip.config"]
    assert len(warned) == 1 and warned[0].startswith("DRIP_FEE_BSP is not a Drip setting")
    assert "DRIP_FEE_BPS" in warned[0]


def test_an_unpadded_standard_webhooks_secret_is_accepted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``standardwebhooks`` pads the base64 itself: a secret without ``=`` works there, so
    Drip must not refuse it at startup."""
    from standardwebhooks.webhooks import Webhook

    monkeypatch.chdir(tmp_path)
    key = b"k" * 32
    unpadded = "whsec_" + base64.b64encode(key).decode().rstrip("=")
    assert not unpadded.endswith("=") and Webhook(unpadded)._whsecret == key
    config = DripConfig(webhook_secret=unpadded)
    assert config.webhook_secret is not None
    assert config.webhook_secret.get_secret_value() == unpadded
    padded = "whsec_" + base64.b64encode(key).decode()
    assert DripConfig(webhook_secret=padded).webhook_secret is not None
    for bad in ("whsec_" + "A" * 41, "whsec_not base64!", "whsec_" + "QUFB" * 3):
        with pytest.raises(ValidationError):  # not base64 at all, or too short a key
            DripConfig(webhook_secret=bad)
