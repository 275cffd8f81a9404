"""Configuration: ``DripConfig`` reads keyword arguments, ``DRIP_*`` environment variables
(``__`` nests) and an optional ``drip.toml``, in that order of precedence."""

from __future__ import annotations

import base64
import logging
import os
import re
import tomllib
from collections.abc import Iterator
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

#: A hold may live at most 30 days (the ledger's own limit).
_HOLD_TIMEOUT_S_MAX = 30 * 24 * 3600
#: ``DRIP_*`` variables other parts of Drip read (the test suite, the x402 facilitator):
#: not settings, and not typos of one.
OTHER_ENV = frozenset(
    {"DRIP_TEST_POSTGRES_DSN", "DRIP_REQUIRE_ALL", "DRIP_RPC_URL", "DRIP_FACILITATOR_PRIVATE_KEY"}
)
log = logging.getLogger("drip.config")
#: The least key a Standard Webhooks secret carries (the library signs with HMAC-SHA256).
WEBHOOK_SECRET_BYTES_MIN = 16


class _TomlFile(TomlConfigSettingsSource):
    """drip.toml, whose syntax errors name the file (tomllib's say only where in it)."""

    def _read_file(self, file_path: Path | Traversable) -> dict[str, Any]:
        try:
            return super()._read_file(file_path)
        except tomllib.TOMLDecodeError as exc:
            where = file_path.resolve() if isinstance(file_path, Path) else file_path
            raise ValueError(f"{where}: {exc}") from exc


class ServeConfig(BaseModel):
    """Where ``drip serve`` listens: ``[serve]`` in drip.toml, ``DRIP_SERVE__HOST`` /
    ``DRIP_SERVE__PORT`` in the environment (``__`` nests)."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", min_length=1, max_length=255)
    port: int = Field(default=8402, ge=1, le=65535)


class DripConfig(BaseSettings):
    """Where the ledger lives and how metering behaves."""

    model_config = SettingsConfigDict(
        env_prefix="DRIP_",
        env_nested_delimiter="__",
        toml_file="drip.toml",
        extra="forbid",
        hide_input_in_errors=True,  # a refused value may be a secret or a password
    )

    #: ``sqlite:///drip.db`` (default, embedded) or ``postgresql://user:pw@host/db``.
    database_url: str = "sqlite:///drip.db"
    #: The provider whose revenue account metered charges credit.
    provider: str = "default"
    #: The platform's cut of each charge, in basis points (250 = 2.5%).
    fee_bps: int = Field(default=0, ge=0, lt=10_000)
    #: How long a metered call's hold lives if the process dies before capturing it.
    hold_timeout_s: int = Field(default=300, gt=0, le=_HOLD_TIMEOUT_S_MAX)
    #: Void the hold when the metered function raises (False captures the full hold).
    void_on_error: bool = True
    #: Secret of Stripe's webhook endpoint (``whsec_...``): enables POST /v1/webhooks/stripe.
    stripe_webhook_secret: SecretStr | None = None
    #: Standard Webhooks secret (``whsec_<base64>``): enables POST /v1/webhooks/standard.
    webhook_secret: SecretStr | None = None
    #: How old a signed webhook may be before it is refused as stale.
    webhook_tolerance_s: int = Field(default=300, gt=0, le=3600)
    #: ``drip serve``'s address (a nested section).
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @field_validator("webhook_secret")
    @classmethod
    def _standard_secret(cls, value: SecretStr | None) -> SecretStr | None:
        """A secret the library cannot use would only be found by the first payment's
        webhook (a 500, and the top-up never credited): refuse it at startup."""
        if value is None:
            return None
        raw = value.get_secret_value().removeprefix("whsec_")
        raw += "=" * (-len(raw) % 4)  # unpadded base64 is accepted, as the library does
        try:
            key = base64.b64decode(raw, validate=True)
        except ValueError:
            raise ValueError("webhook_secret must be whsec_ followed by base64") from None
        if len(key) < WEBHOOK_SECRET_BYTES_MIN:
            raise ValueError(f"webhook_secret must hold at least {WEBHOOK_SECRET_BYTES_MIN} "
                             "bytes (whsec_ + base64)")  # fmt: skip
        return value

    @field_validator("stripe_webhook_secret")
    @classmethod
    def _stripe_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().strip()) < 8:
            raise ValueError("stripe_webhook_secret is empty or too short (whsec_...)")
        return value

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """As pydantic's, with the database password masked (the other secrets are
        ``SecretStr``): a config printed in a log or a traceback shows no password."""
        for name, value in super().__repr_args__():
            yield name, mask_password(value) if name == "database_url" else value

    @model_validator(mode="after")
    def _warn_unknown_env(self) -> DripConfig:
        """The environment cannot refuse a name the way drip.toml does (other programs set
        variables too), so a ``DRIP_*`` name that is no setting is warned about: a typo
        such as ``DRIP_FEE_BSP`` would otherwise leave the fee at its default silently."""
        settings = ", ".join(sorted(f"DRIP_{f.upper()}" for f in type(self).model_fields))
        for name in unknown_env(os.environ):
            log.warning("%s is not a Drip setting and is ignored (settings: %s)", name, settings)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlFile(settings_cls))


def mask_password(url: object) -> object:
    """``url`` with its password replaced by ``***``: the user info's
    (``user:pw@host``) and a ``password=`` parameter's (``?password=pw``)."""
    if not isinstance(url, str):
        return url
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, host = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.split(':', 1)[0]}:***@{host}"
    rest = _PASSWORD_PARAM.sub(r"\1***", rest)
    return f"{scheme}://{rest}"


_PASSWORD_PARAM = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def unknown_env(environ: os._Environ[str] | dict[str, str]) -> list[str]:
    """The ``DRIP_*`` names in ``environ`` that are neither a setting nor ``OTHER_ENV``."""
    known = {f"DRIP_{name.upper()}" for name in DripConfig.model_fields}
    known |= {f"DRIP_SERVE__{name.upper()}" for name in ServeConfig.model_fields}
    return sorted(
        name for name in environ
        if name.upper().startswith("DRIP_") and name.upper() not in known | OTHER_ENV
    )  # fmt: skip
