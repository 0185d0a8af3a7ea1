"""Fernet encryption of stored secrets, token checks and redaction."""

import hashlib
import hmac
from collections.abc import Iterable
from typing import Any

from cryptography.fernet import Fernet, MultiFernet

REDACTED = "[REDACTED]"
SECRET_FIELDS = frozenset({"password", "appPassword", "authenticatorSecret"})


class Vault:
    """MultiFernet over FERNET_KEYS: the first key encrypts, every key decrypts."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._fernet = MultiFernet([Fernet(key) for key in keys])

    def encrypt(self, data: bytes) -> bytes:
        return self._fernet.encrypt(data)

    def decrypt(self, token: bytes) -> bytes:
        return self._fernet.decrypt(token)

    def encrypt_text(self, text: str | None) -> bytes | None:
        return None if text is None else self._fernet.encrypt(text.encode())

    def decrypt_text(self, token: bytes | None) -> str | None:
        return None if token is None else self._fernet.decrypt(token).decode()

    def rotate(self, token: bytes) -> bytes:
        return self._fernet.rotate(token)


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


def fingerprint(token: str) -> str:
    """A stable, non-reversible name for a token, fit for audit trails and logs."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return key in SECRET_FIELDS or "password" in lowered or "secret" in lowered


def redact(value: Any) -> Any:
    """A copy of a JSON value with every credential replaced by "[REDACTED]"."""
    if isinstance(value, dict):
        return {
            key: REDACTED if is_secret_key(key) and item is not None else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact(item) for item in value]
    return value
