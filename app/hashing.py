"""The server's hashing key, and the keyed digests made with it.

Content hashes, derived eventIds, token fingerprints and session ids are HMACs under this
key, never plain SHA-256: a plain hash of a body holding a password lets anyone who reads
the hash and the redacted body test guesses offline. The key is random, made once, and
kept in PostgreSQL encrypted under FERNET_KEYS; `rotate-keys` re-encrypts it, so it never
changes and stored hashes stay comparable.
"""

import asyncio
import hashlib
import hmac
import os

from cryptography.fernet import InvalidToken
from sqlalchemy.ext.asyncio import AsyncEngine

from app.crypto import Vault
from app.db import raw_connection

LOAD = "SELECT key_encrypted FROM server_keys WHERE name = 'hashing'"
CREATE = (
    "INSERT INTO server_keys (name, key_encrypted) VALUES ('hashing', $1) "
    "ON CONFLICT (name) DO NOTHING"
)


class Hasher:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def digest(self, data: bytes) -> bytes:
        """HMAC-SHA256 of the data's SHA-256, so that migration 0007 could key the plain
        hashes stored before it without reading the bodies."""
        return self.key_sha256(hashlib.sha256(data).digest())

    def key_sha256(self, sha256: bytes) -> bytes:
        return hmac.new(self._key, sha256, hashlib.sha256).digest()

    def event_id(self, canonical: bytes) -> str:
        return "sha256:" + self.digest(canonical).hex()

    def fingerprint(self, token: str) -> str:
        """A stable name for a token, fit for audit rows and logs, that tells nothing of it."""
        return self.digest(token.encode()).hex()[:16]


class HashingKey:
    """Loads the key once (making it on a first start), on first need: a service that
    starts while PostgreSQL is away still serves, and spools."""

    def __init__(self, engine: AsyncEngine, vault: Vault) -> None:
        self.engine, self.vault = engine, vault
        self.hasher: Hasher | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> Hasher:
        """Raises what the database raises while it cannot be reached."""
        if self.hasher is None:
            async with self._lock:
                if self.hasher is None:
                    self.hasher = Hasher(await load_or_create(self.engine, self.vault))
        return self.hasher


async def load_or_create(engine: AsyncEngine, vault: Vault) -> bytes:
    async with raw_connection(engine) as conn:
        token = await conn.fetchval(LOAD)
        if token is None:
            await conn.execute(CREATE, vault.encrypt(os.urandom(32)))
            token = await conn.fetchval(LOAD)
    return vault.decrypt(token)


KEYS_DO_NOT_FIT = (
    "FERNET_KEYS cannot decrypt what the database stores: list the key it was encrypted "
    "with in FERNET_KEYS (newest first; local mode keeps them in DATA_DIR/secrets.env)"
)
# The hashing key, and the oldest and newest stored bodies: a key list that lost the key of
# either end (FERNET_KEYS=NEW before `rotate-keys` has run, or the old key after it) fails.
# The oldest is the first ignored event's (retention keeps those) or the first processed
# one's from the retention mark (app/operations/privacy.py): a search from the first event
# would walk every body retention deleted, millions of rows, past /readyz's second.
STORED_SAMPLES = (
    "SELECT key_encrypted FROM server_keys",
    "(SELECT body_encrypted FROM events WHERE status = 'ignored' AND body_encrypted IS NOT NULL"
    " ORDER BY id LIMIT 1)"
    " UNION ALL "
    "(SELECT body_encrypted FROM events WHERE status = 'processed'"
    " AND body_encrypted IS NOT NULL"
    " AND id >= coalesce((SELECT id FROM retention_marks WHERE name = 'events'), 0)"
    " ORDER BY id LIMIT 1)"
    " UNION ALL "
    "(SELECT body_encrypted FROM events WHERE body_encrypted IS NOT NULL ORDER BY id DESC"
    " LIMIT 1)",
)


async def keys_fit(engine: AsyncEngine, vault: Vault) -> bool:
    """Whether FERNET_KEYS decrypts what is stored (True while nothing is)."""
    async with raw_connection(engine) as conn:
        tokens = [token for sql in STORED_SAMPLES for (token,) in await conn.fetch(sql)]
    try:
        for token in tokens:
            vault.decrypt(token)
    except InvalidToken:
        return False
    return True
