"""Operator jobs: re-encrypting under a new key, and replaying stored deliveries."""

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from pydantic import ValidationError
from sqlalchemy import Table, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from app.crypto import Vault
from app.db import raw_connection
from app.hashing import Hasher, load_or_create
from app.ingest import Delivery, apply, effects
from app.models import events, mailboxes, rejected
from app.processing import process_delivery
from app.schemas import parse_envelope, parse_handled
from app.signing import SignatureCheck
from app.spool import Spool
from app.webhooks import validation_details

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
                async with engine.begin() as conn:
                    await conn.execute(
                        update(table)
                        .where(table.c.id == row_id, table.c[column] == token)
                        .values({column: vault.rotate(token)})
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


@dataclass
class ReplayReport:
    applied: int = 0
    still_invalid: int = 0
    unhandled: int = 0
    without_body: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Selection:
    event_ids: list[int] = field(default_factory=list)
    rejected_ids: list[int] = field(default_factory=list)
    since: datetime | None = None
    until: datetime | None = None
    everything: bool = False


def _window(table: Table, column: str, selection: Selection, ids: list[int]) -> Any:
    stmt = select(table.c.id).order_by(table.c.id)
    if ids:
        return stmt.where(table.c.id.in_(ids))
    if selection.since:
        stmt = stmt.where(table.c[column] >= selection.since)
    if selection.until:
        stmt = stmt.where(table.c[column] < selection.until)
    return stmt


async def replay(
    engine: AsyncEngine, vault: Vault, selection: Selection, *, dry_run: bool
) -> tuple[ReplayReport, ReplayReport]:
    """Re-apply stored events, and retry rejected deliveries (a fixed one becomes an event)."""
    by_time = selection.since is not None or selection.until is not None
    event_ids: list[int] = []
    rejected_ids: list[int] = []
    async with engine.connect() as conn:
        if selection.everything or selection.event_ids or (by_time and not selection.rejected_ids):
            stmt = _window(events, "first_received_at", selection, selection.event_ids)
            event_ids = list((await conn.execute(stmt)).scalars())
        if selection.everything or selection.rejected_ids or (by_time and not selection.event_ids):
            stmt = _window(rejected, "received_at", selection, selection.rejected_ids)
            stmt = stmt.where(rejected.c.replayed_at.is_(None))
            rejected_ids = list((await conn.execute(stmt)).scalars())
    replayer = Replayer(engine, vault, Hasher(await load_or_create(engine, vault)), dry_run)
    event_report, rejected_report = ReplayReport(), ReplayReport()
    for row_id in event_ids:
        await replayer.event(row_id, event_report)
    for row_id in rejected_ids:
        await replayer.rejected(row_id, rejected_report)
    return event_report, rejected_report


@dataclass(frozen=True)
class Replayer:
    """What replaying needs, once: the database, the keys, and whether to change nothing."""

    engine: AsyncEngine
    vault: Vault
    hasher: Hasher
    dry_run: bool

    async def event(self, row_id: int, report: ReplayReport) -> None:
        """Re-apply a stored event at its stored time, so edits keep their order."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(events.c.body_encrypted, events.c.event_id, events.c.event_time).where(
                        events.c.id == row_id
                    )
                )
            ).one()
        if row.body_encrypted is None:  # deleted by BODY_RETENTION_DAYS
            report.without_body += 1
            return
        envelope = parse_envelope(self.vault.decrypt(row.body_encrypted), self.hasher)
        model = parse_handled(envelope, [])
        if model is None:
            report.unhandled += 1
            return
        report.applied += 1
        if self.dry_run:
            return
        changes = effects(model, vault=self.vault, at=row.event_time, event_id=row.event_id)
        async with raw_connection(self.engine) as conn, conn.transaction():
            await apply(conn, changes, self.vault)
            await conn.execute("UPDATE events SET status = 'processed' WHERE id = $1", row_id)

    async def rejected(self, row_id: int, report: ReplayReport) -> None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(rejected.c.body_encrypted, rejected.c.signature).where(
                        rejected.c.id == row_id
                    )
                )
            ).one()
        if row.body_encrypted is None:  # erased: not JSON, nothing left to replay
            report.without_body += 1
            return
        raw = self.vault.decrypt(row.body_encrypted)
        try:
            envelope = parse_envelope(raw, self.hasher)
            model = parse_handled(envelope, [])
        except ValueError as error:  # includes ValidationError
            report.still_invalid += 1
            details = validation_details(error) if isinstance(error, ValidationError) else []
            report.errors.append(f"rejected #{row_id}: {details or str(error)}")
            return
        report.applied += 1
        if self.dry_run:
            return
        delivery = Delivery(envelope, raw, SignatureCheck(row.signature), hasher=self.hasher)
        outcome = await process_delivery(self.engine, self.vault, delivery, model)
        async with self.engine.begin() as conn:
            await conn.execute(
                update(rejected)
                .where(rejected.c.id == row_id)
                .values(replayed_at=func.now(), replayed_event_id=outcome.row_id)
            )
