"""Fernet encryption of stored secrets, token checks and redaction."""

import hmac
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from cryptography.fernet import Fernet, MultiFernet

REDACTED = "[REDACTED]"
# Field names of the sender's payloads (app/receiving/payloads.py) whose values only
# describe: names, states, dates, prices. Every other field's value is redacted.
DESCRIPTIVE = frozenset(
    {
        "event", "eventType", "eventId", "data", "message", "description", "reason",
        "userId", "userEmail", "orderId", "subscriptionId", "mailboxId",
        "domain", "domainId", "domainName", "workspaceType", "serviceProvider",
        "email", "firstName", "lastName", "userName", "profilePicture", "isAdmin",
        "creationTime", "expiryDate", "warmingUpFrom", "price", "quantity", "finalUrl",
        "status", "subscriptionStatus", "domainStatus", "periodStart", "periodEnd",
        "autoRenew", "mailboxDetails", "preWarmedUpMailboxes", "failedOrders", "updatedFields",
    }
)  # fmt: skip
# Keys whose lists hold descriptive values themselves: none of the sender's so far (its lists
# hold objects), so under any key a list's bare values are redacted.
DESCRIPTIVE_LIST_ITEMS: frozenset[str] = frozenset()


class Vault:
    """MultiFernet over FERNET_KEYS: the first key encrypts, every key decrypts."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._fernet = MultiFernet([Fernet(key) for key in keys])

    def encrypt(self, data: bytes) -> bytes:
        return self._fernet.encrypt(data)

    def decrypt(self, token: bytes) -> bytes:
        return self._fernet.decrypt(token)

    def seal(self, values: Mapping[str, str | None]) -> dict[str, bytes | None]:
        """The values that are not None sealed as one token (a JSON object of them), given
        under each of their names: several secrets for the price of one encryption, each
        still stored where its name says, so each can be merged and erased on its own."""
        given = {name: value for name, value in values.items() if value is not None}
        token = self._fernet.encrypt(orjson.dumps(given)) if given else None
        return {name: token if name in given else None for name in values}

    def unseal(self, tokens: Mapping[str, bytes | None]) -> dict[str, str | None]:
        """Each name's value, from the token stored under that name (`seal`); a token
        shared by several names is decrypted once."""
        opened: dict[bytes, bytes] = {}
        values: dict[str, str | None] = {}
        for name, token in tokens.items():
            if token is None:
                values[name] = None
                continue
            if token not in opened:
                opened[token] = self._fernet.decrypt(token)
            values[name] = sealed_value(opened[token], name)
        return values

    def rotate(self, token: bytes) -> bytes:
        return self._fernet.rotate(token)


def sealed_value(plaintext: bytes, name: str) -> str:
    """`name`'s value in a sealed token's JSON object. A token written before credentials
    were sealed (by a replica still running the release before, after migration 0018 ran)
    holds the bare value."""
    try:
        found = orjson.loads(plaintext)
    except orjson.JSONDecodeError:
        found = None
    if isinstance(found, dict) and isinstance(found.get(name), str):
        return str(found[name])
    return plaintext.decode()


def generate_key() -> str:
    return Fernet.generate_key().decode()


def token_matches(given: str | None, allowed: Iterable[str]) -> bool:
    """Constant-time membership: every allowed token is compared, no early exit."""
    if not given:
        return False
    found = False
    for candidate in allowed:
        found |= hmac.compare_digest(given.encode(), candidate.encode())
    return found


def redact(value: Any) -> Any:
    """A copy of a JSON value in which only the values of fields known to be descriptive
    are shown: a credential under a name nobody foresaw (`pwd`, `smtpPass`) is hidden too.
    Keys stay visible; a container under an unknown key is hidden whole."""
    if isinstance(value, dict):
        return {k: field(k, item) if k in DESCRIPTIVE else REDACTED for k, item in value.items()}
    return value


def field(key: str, value: Any) -> Any:
    """A descriptive field's value: the objects of a list are weighed field by field, its
    bare values shown only for DESCRIPTIVE_LIST_ITEMS (`"failedOrders": ["hunter2"]` is no
    list the sender documents)."""
    if isinstance(value, list):
        return [list_item(key, item) for item in value]
    return redact(value)


def list_item(key: str, item: Any) -> Any:
    if isinstance(item, list):
        return [list_item(key, inner) for inner in item]
    if isinstance(item, dict) or key in DESCRIPTIVE_LIST_ITEMS:
        return redact(item)
    return REDACTED
