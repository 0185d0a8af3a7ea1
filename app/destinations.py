"""Outbound destinations, declared in the YAML (or JSON) file named by DESTINATIONS_FILE
(CONTRACT section 9), with each secret taken from the environment variable it names.

    destinations:
      - name: crm
        url: https://crm.example.com/hooks/coldmail
        format: standard-webhooks        # or slack
        events: ["order.*", "subscription.at_risk"]
        secretEnv: CRM_WEBHOOK_SECRET    # holds whsec_<base64>
        userIds: [u_123]                 # optional: only these customers' messages
        allowPrivateNetwork: false       # optional: allow loopback/private/link-local

`load` turns the file into `Destination`s or raises ConfigError in one line;
`check_network` (called by `serve` and `outbound dispatch`) resolves each host and refuses
an internal address unless the destination allows it. A `slack` destination may take its
URL (itself a secret) from `urlEnv` instead of `url`.
"""

import base64
import ipaddress
import os
import re
import socket
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    model_validator,
)
from standardwebhooks.webhooks import Webhook

from app.config import ConfigError

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
EventPattern = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.*-]{1,128}$")]
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class Destination(BaseModel):
    """One destination as declared, its secret (and URL, with `urlEnv`) resolved."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: Name
    url: str = ""
    url_env: EnvName | None = Field(None, alias="urlEnv")
    format: Literal["standard-webhooks", "slack"]
    events: tuple[EventPattern, ...] = Field(min_length=1)
    secret_env: EnvName | None = Field(None, alias="secretEnv")
    user_ids: frozenset[str] | None = Field(None, alias="userIds")
    allow_private_network: bool = Field(False, alias="allowPrivateNetwork")
    # filled in by `load` from the environment; never part of the file
    secret: SecretStr | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _usable(self) -> "Destination":
        if bool(self.url) == bool(self.url_env):
            raise ValueError("give exactly one of url and urlEnv")
        if self.url:
            check_url(self.url)
        if self.format == "standard-webhooks" and not self.secret_env:
            raise ValueError("a standard-webhooks destination needs secretEnv")
        return self

    def wants(self, type: str, user_id: str | None) -> bool:
        """Whether a message of this type (about this customer, if any) goes here: `*`
        matches any run of characters (`order.*`, `mailbox.*`, `*`); with userIds, only
        messages about one of them."""
        if self.user_ids is not None and user_id not in self.user_ids:
            return False
        return self.takes(type)

    def takes(self, type: str) -> bool:
        """Whether one of `events` matches this type (for some customer)."""
        return takes(self.events, type)

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""


@lru_cache(maxsize=4096)
def takes(patterns: tuple[str, ...], type: str) -> bool:
    """Remembered: every delivery asks each destination of its type, and a destination's
    patterns and the types it is asked of are a handful (a sender's unknown type too)."""
    return any(matches(pattern, type) for pattern in patterns)


def matches(pattern: str, type: str) -> bool:
    return compiled(pattern).fullmatch(type) is not None


@lru_cache(maxsize=1024)
def compiled(pattern: str) -> re.Pattern[str]:
    """`*` matches any run of characters; everything else is itself."""
    return re.compile(".*".join(map(re.escape, pattern.split("*"))))


def check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("url must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError("url must not carry a user or password")


class DestinationsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    destinations: list[Destination]

    @model_validator(mode="after")
    def _unique_names(self) -> "DestinationsFile":
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ValueError("two destinations have the same name")
        return self


def load(path: Path | None, environ: Mapping[str, str] | None = None) -> list[Destination]:
    """The destinations of the file at `path` (none when it is None), secrets resolved from
    `environ` (default os.environ). Raises ConfigError naming the file and destination."""
    if path is None:
        return []
    env = os.environ if environ is None else environ
    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(
            f"DESTINATIONS_FILE: cannot read {path}: {type(error).__name__}"
        ) from None
    if not isinstance(document, dict):
        raise ConfigError(f"DESTINATIONS_FILE: {path} must hold a mapping with a destinations list")
    try:
        parsed = DestinationsFile.model_validate(document)
    except ValidationError as error:
        raise ConfigError(f"DESTINATIONS_FILE: {describe(error, document)}") from None
    return [resolved(destination, env) for destination in parsed.destinations]


def describe(error: ValidationError, document: Any) -> str:
    """One line: which destination (by name when it has one), which field, what is wrong.
    Never the value given (it could be a secret pasted in the wrong place)."""
    first = error.errors()[0]
    loc = list(first["loc"])
    where = "the file"
    if len(loc) >= 2 and loc[0] == "destinations" and isinstance(loc[1], int):
        entry = document["destinations"][loc[1]]  # pydantic found it there
        name = entry.get("name") if isinstance(entry, dict) else None
        where = f"destination {name!r}" if isinstance(name, str) else f"destination #{loc[1] + 1}"
        loc = loc[2:]
    field = ".".join(str(part) for part in loc)
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{where}: {field + ': ' if field else ''}{message}"


def resolved(destination: Destination, env: Mapping[str, str]) -> Destination:
    changes: dict[str, Any] = {}
    where = f"DESTINATIONS_FILE: destination {destination.name!r}"
    if destination.url_env:
        url = env.get(destination.url_env, "").strip()
        if not url:
            raise ConfigError(f"{where}: {destination.url_env} (its urlEnv) is not set")
        try:
            check_url(url)
        except ValueError as error:
            raise ConfigError(f"{where}: {destination.url_env}: {error}") from None
        changes["url"] = url
    if destination.secret_env:
        secret = env.get(destination.secret_env, "").strip()
        if not secret:
            raise ConfigError(f"{where}: {destination.secret_env} (its secretEnv) is not set")
        if not valid_secret(secret):
            raise ConfigError(
                f"{where}: {destination.secret_env} is not a whsec_ secret "
                "(whsec_ and at least 24 base64 bytes; make one: "
                "echo whsec_$(openssl rand -base64 32))"
            )
        changes["secret"] = SecretStr(secret)
    return destination.model_copy(update=changes)


def valid_secret(secret: str) -> bool:
    if not secret.startswith("whsec_"):
        return False
    try:
        Webhook(secret)
    except Exception:
        return False
    try:
        return len(base64.b64decode(secret.removeprefix("whsec_") + "==")) >= 24
    except ValueError:
        return False


def internal(address: str) -> bool:
    """Loopback, private, link-local, shared, multicast, reserved or unspecified."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def addresses(host: str) -> list[str]:
    """Every address the host resolves to (an IP literal is its own)."""
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return sorted({str(info[4][0]) for info in infos})


def check_network(destinations: Sequence[Destination]) -> None:
    """Refuse (ConfigError, one line) a destination whose host does not resolve, or resolves
    to an internal address without allowPrivateNetwork: configuration must not reach the
    metadata service or the database next door (SSRF)."""
    for destination in destinations:
        where = f"DESTINATIONS_FILE: destination {destination.name!r}"
        try:
            found = addresses(destination.host)
        except OSError:
            raise ConfigError(f"{where}: its host {destination.host} does not resolve") from None
        bad = [a for a in found if internal(a)]
        if bad and not destination.allow_private_network:
            raise ConfigError(
                f"{where}: its host {destination.host} resolves to the internal address "
                f"{bad[0]} (set allowPrivateNetwork: true to allow it)"
            )
