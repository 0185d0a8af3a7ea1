"""Configuration from the environment (or `.env`), validated once at start-up."""

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal, NamedTuple

from cryptography.fernet import Fernet
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

URL_PREFIXES = ("postgres://", "postgresql://", "postgresql+asyncpg://")
MIN_TOKEN_LENGTH = 16


# The forms the sender's signature may take, which CMR_SIGNATURE_FORMS chooses from;
# app/receiving/signing.py computes each.
class Form(NamedTuple):
    name: str
    with_timestamp: bool  # is `<timestamp>.` part of the signed string
    encoding: str  # of the digest: hex or base64


FORMS = (
    Form("timestamp.body:hex", True, "hex"),
    Form("timestamp.body:base64", True, "base64"),
    Form("body:hex", False, "hex"),
    Form("body:base64", False, "base64"),
)
SIGNATURE_FORMS = tuple(form.name for form in FORMS)  # in the order of FORMS


class ConfigError(Exception):
    """A one-line, operator-facing description of what is wrong and where."""


def split_list(value: SecretStr | None) -> list[str]:
    if value is None:
        return []
    return [part.strip() for part in value.get_secret_value().split(",") if part.strip()]


def normalize_database_url(url: str) -> str:
    """Accept the URL spellings hosting providers hand out; SQLAlchemy needs the driver."""
    for prefix in URL_PREFIXES:
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    raise ValueError("must start with postgres://, postgresql:// or postgresql+asyncpg://")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    database_url: str | None = None
    fernet_keys: SecretStr | None = None
    webhook_tokens: SecretStr | None = None
    cmr_signing_key: SecretStr | None = None
    cmr_signature_mode: Literal["enforce", "report"] = "enforce"
    cmr_signature_tolerance_seconds: int = Field(default=300, ge=1, le=86400)
    ops_api_tokens: SecretStr | None = None
    credentials_api_tokens: SecretStr | None = None
    max_body_bytes: int = Field(default=5 * 1024 * 1024, ge=1024)
    db_pool_size: int = Field(default=20, ge=1, le=200)
    # Live deliveries arriving this close together are committed in one transaction.
    group_commit_window_ms: float = Field(default=2, ge=0, le=1000)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"
    data_dir: Path = Path(".data")
    cmr_api_key: SecretStr | None = None
    cmr_api_url: str = "https://customers.coldmailreseller.com/api/v1/integration"
    reconcile_interval_seconds: int = Field(default=0, ge=0)
    # `serve` copies new and changed search texts to the search tables this often
    # (app/operations/search_index.py); 0: not this process (searches stay exact, slower)
    search_index_interval_seconds: float = Field(default=1, ge=0)
    body_retention_days: int = Field(default=90, ge=0)
    spool_dir: Path | None = None
    spool_max_bytes: int = Field(default=1024**3, ge=1024)
    database_wait_seconds: float = Field(default=60, ge=0)
    forwarded_allow_ips: str = "127.0.0.1"
    request_timeout_seconds: float = Field(default=15, gt=0, le=600)
    response_timeout_seconds: float = Field(default=30, gt=0, le=3600)
    keep_alive_timeout_seconds: int = Field(default=5, ge=1, le=600)
    max_connections: int = Field(default=1000, ge=1)
    # empty: every form, until live traffic pins one (app/receiving/pinning.py)
    cmr_signature_forms: str = ""
    rejected_max_bytes: int = Field(default=256 * 1024**2, ge=1024)
    metrics_token: SecretStr | None = None
    # outbound messages (app/outbound): the destinations, and where links in them point
    destinations_file: Path | None = None
    public_url: str | None = None
    # false: serve records messages but leaves sending to `coldmail-webhooks outbound dispatch`
    outbound_dispatch: bool = True
    # the sender's prices carry no currency: the dashboard names this one beside its totals
    price_currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")

    @field_validator("database_url")
    @classmethod
    def _normalize_url(cls, value: str | None) -> str | None:
        return normalize_database_url(value) if value else None

    @field_validator("destinations_file", "public_url", mode="before")
    @classmethod
    def _none_when_empty(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("public_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be the dashboard's base URL, e.g. https://coldmail.example.com")
        return value.rstrip("/")

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _loopback_when_empty(cls, value: str) -> str:
        return value.strip() or "127.0.0.1"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("fernet_keys")
    @classmethod
    def _valid_fernet_keys(cls, value: SecretStr | None) -> SecretStr | None:
        for index, key in enumerate(split_list(value), start=1):
            try:
                Fernet(key)
            except ValueError:
                raise ValueError(
                    f"key #{index} is not a valid Fernet key "
                    "(32 url-safe base64 bytes; make one: coldmail-webhooks generate-key)"
                ) from None
        return value

    @field_validator("cmr_signature_forms")
    @classmethod
    def _known_forms(cls, value: str) -> str:
        forms = [form.strip() for form in value.split(",") if form.strip()]
        unknown = sorted(set(forms) - set(SIGNATURE_FORMS))
        if unknown:
            raise ValueError(
                ", ".join(unknown) + ": accepted forms are " + ", ".join(SIGNATURE_FORMS)
            )
        return ",".join(forms)

    @property
    def signature_forms(self) -> frozenset[str] | None:
        """The forms CMR_SIGNATURE_FORMS names; None when it is not set."""
        return frozenset(self.cmr_signature_forms.split(",")) if self.cmr_signature_forms else None

    @property
    def metrics_token_value(self) -> str | None:
        token = self.metrics_token.get_secret_value().strip() if self.metrics_token else ""
        return token or None

    @property
    def spool_path(self) -> Path:
        return self.spool_dir or self.data_dir / "spool"

    @property
    def api_key(self) -> str | None:
        key = self.cmr_api_key.get_secret_value().strip() if self.cmr_api_key else ""
        return key or None

    @property
    def fernet_key_list(self) -> list[str]:
        return split_list(self.fernet_keys)

    @property
    def webhook_token_list(self) -> list[str]:
        return split_list(self.webhook_tokens)

    @property
    def ops_token_list(self) -> list[str]:
        return split_list(self.ops_api_tokens)

    @property
    def credentials_token_list(self) -> list[str]:
        return split_list(self.credentials_api_tokens)

    @property
    def signing_key(self) -> str | None:
        key = self.cmr_signing_key.get_secret_value().strip() if self.cmr_signing_key else ""
        return key or None

    def check_complete(self) -> None:
        """Refuse to serve with a secret missing: there are no default secrets."""
        if not self.database_url:
            raise ConfigError("DATABASE_URL is not set")
        if not self.fernet_key_list:
            raise ConfigError("FERNET_KEYS is not set (make a key: coldmail-webhooks generate-key)")
        if not self.ops_token_list:
            raise ConfigError("OPS_API_TOKENS is not set")
        if not self.webhook_token_list:
            # A signing key alone is checked only once the body is read: every stranger's
            # body would be read (and could fire the signature-failure alert).
            raise ConfigError(
                "WEBHOOK_TOKENS is not set: without a token the service would read every "
                "stranger's body before refusing it"
            )
        self.check_tokens()

    def check_tokens(self) -> None:
        """Tokens an attacker could guess, or one token in two roles (a webhook token that
        also reads the API), are refused."""
        roles = {
            "WEBHOOK_TOKENS": self.webhook_token_list,
            "OPS_API_TOKENS": self.ops_token_list,
            "CREDENTIALS_API_TOKENS": self.credentials_token_list,
            "METRICS_TOKEN": [self.metrics_token_value] if self.metrics_token_value else [],
        }
        seen: dict[str, str] = {}
        for name, tokens in roles.items():
            for token in tokens:
                if len(token) < MIN_TOKEN_LENGTH:
                    raise ConfigError(
                        f"{name}: every token must be at least {MIN_TOKEN_LENGTH} characters "
                        "(make one: openssl rand -hex 24)"
                    )
                if seen.setdefault(token, name) != name:
                    raise ConfigError(
                        f"{name}: a token is also configured in {seen[token]}; "
                        "give each role its own"
                    )
        if self.signing_key and self.signing_key in seen:
            raise ConfigError(
                f"CMR_SIGNING_KEY: equals a token in {seen[self.signing_key]}; the signing key "
                "must be secret from whoever holds a token"
            )


def describe_validation_error(error: ValidationError) -> str:
    first = error.errors()[0]
    name = str(first["loc"][0]).upper() if first["loc"] else "configuration"
    return f"{name}: {first['msg']}"


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning pydantic's multi-line report into one ConfigError line."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error)) from None


@lru_cache
def get_settings() -> Settings:
    return load_settings()
