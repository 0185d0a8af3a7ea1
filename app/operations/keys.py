"""`rotate-keys`: every stored secret re-encrypted under the first of FERNET_KEYS."""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import Table, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from app.crypto import Vault
from app.db import raw_connection
from app.models import events, mailboxes, rejected
from app.receiving.spool import Spool

ENCRYPTED = [
    (mailboxes, ("password_encrypted", "app_password_encrypted", "authenticator_secret_encrypted")),
    (events, ("body_encrypted",)),
    (rejected, ("body_encrypted",)),
]

ROTATE_SERVER_KEYS = "SELECT name, key_encrypted FROM server_keys FOR UPDATE"
REENCRYPT_SERVER_KEY = "UPDATE server_keys SET key_encrypted = $2 WHERE name = $1"


@dataclass
class RotationCount:
    rotated: int = 0
    current: int = 0


async def rotate_keys(
    engine: AsyncEngine, keys: list[str], *, batch: int = 500
) -> dict[str, RotationCount]:
    """Re-encrypt every stored secret under keys[0], batch by batch.

    Values already under keys[0] are skipped, so an interrupted run resumes cheaply. Each
    write is compare-and-set on the old ciphertext: a value the service rewrote meanwhile
    is left alone (it was written under keys[0] anyway), so this is safe while serving.
    """
    vault, primary = Vault(keys), Fernet(keys[0])
    counts: dict[str, RotationCount] = {}
    for table, columns in ENCRYPTED:
        for column in columns:
            count = counts.setdefault(f"{table.name}.{column}", RotationCount())
            async for row_id, token in _batches(engine, table, column, batch):
                try:
                    primary.decrypt(token)
                    count.current += 1
                    continue
                except InvalidToken:
                    pass
                # updated_at set to itself: re-encrypting is not a change a reader of
                # `updatedSince` should see (the model's onupdate would stamp now()).
                values: dict[str, Any] = {column: vault.rotate(token)}
                if "updated_at" in table.c:
                    values["updated_at"] = table.c.updated_at
                async with engine.begin() as conn:
                    await conn.execute(
                        update(table)
                        .where(table.c.id == row_id, table.c[column] == token)
                        .values(values)
                    )
                count.rotated += 1
    counts["server_keys.key_encrypted"] = await rotate_server_keys(engine, vault, primary)
    return counts


async def rotate_server_keys(engine: AsyncEngine, vault: Vault, primary: Fernet) -> RotationCount:
    """The hashing key itself stays the same: only its encryption changes."""
    count = RotationCount()
    async with raw_connection(engine) as conn, conn.transaction():
        for name, token in await conn.fetch(ROTATE_SERVER_KEYS):
            try:
                primary.decrypt(token)
                count.current += 1
            except InvalidToken:
                await conn.execute(REENCRYPT_SERVER_KEY, name, vault.rotate(token))
                count.rotated += 1
    return count


async def rotate_spool(spool: Spool, keys: list[str]) -> int:
    """Re-encrypt the deliveries waiting in the spool under keys[0]; how many were."""
    vault, primary = Vault(keys), Fernet(keys[0])

    def rewrite(token: bytes) -> bytes:
        try:
            primary.decrypt(token)
            return token
        except InvalidToken:
            pass
        try:
            return vault.rotate(token)
        except InvalidToken:  # readable under no key: the drainer sets it aside
            return token

    return await spool.rewrite_bodies(rewrite)


async def _batches(
    engine: AsyncEngine, table: Table, column: str, size: int
) -> AsyncIterator[tuple[int, bytes]]:
    last = 0
    while True:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(table.c.id, table.c[column])
                    .where(table.c.id > last, table.c[column].is_not(None))
                    .order_by(table.c.id)
                    .limit(size)
                )
            ).all()
        for row_id, token in rows:
            yield row_id, token
        if len(rows) < size:
            return
        last = rows[-1][0]
