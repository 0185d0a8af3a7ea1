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
from app.ingest import Delivery, apply, effects
from app.models import Event, Mailbox, RejectedDelivery
from app.processing import process_delivery
from app.schemas import HANDLED_EVENTS, parse_envelope, parse_handled
from app.signing import SignatureCheck
from app.spool import Spool
from app.webhooks import validation_details

events: Table = Event.__table__  # type: ignore[assignment]
mailboxes: Table = Mailbox.__table__  # type: ignore[assignment]
rejected: Table = RejectedDelivery.__table__  # type: ignore[assignment]
ENCRYPTED = [
    (mailboxes, ("password_encrypted", "app_password_encrypted", "authenticator_secret_encrypted")),
    (events, ("body_encrypted",)),
    (rejected, ("body_encrypted",)),
]


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
    return counts


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
    event_report, rejected_report = ReplayReport(), ReplayReport()
    for row_id in event_ids:
        await _replay_event(engine, vault, row_id, event_report, dry_run)
    for row_id in rejected_ids:
        await _replay_rejected(engine, vault, row_id, rejected_report, dry_run)
    return event_report, rejected_report


async def _replay_event(
    engine: AsyncEngine, vault: Vault, row_id: int, report: ReplayReport, dry_run: bool
) -> None:
    """Re-apply a stored event at its stored time, so edits keep their order."""
    async with engine.connect() as conn:
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
    envelope = parse_envelope(vault.decrypt(row.body_encrypted))
    model = parse_handled(envelope, []) if envelope["event"] in HANDLED_EVENTS else None
    if model is None:
        report.unhandled += 1
        return
    report.applied += 1
    if dry_run:
        return
    changes = effects(model, vault=vault, at=row.event_time, event_id=row.event_id)
    async with raw_connection(engine) as conn, conn.transaction():
        await apply(conn, changes, vault)
        await conn.execute("UPDATE events SET status = 'processed' WHERE id = $1", row_id)


async def _replay_rejected(
    engine: AsyncEngine, vault: Vault, row_id: int, report: ReplayReport, dry_run: bool
) -> None:
    async with engine.connect() as conn:
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
    raw = vault.decrypt(row.body_encrypted)
    try:
        envelope = parse_envelope(raw)
        model = parse_handled(envelope, []) if envelope["event"] in HANDLED_EVENTS else None
    except ValueError as error:  # includes ValidationError
        report.still_invalid += 1
        details = validation_details(error) if isinstance(error, ValidationError) else []
        report.errors.append(f"rejected #{row_id}: {details or str(error)}")
        return
    report.applied += 1
    if dry_run:
        return
    delivery = Delivery(envelope=envelope, raw=raw, signature=SignatureCheck(row.signature))
    outcome = await process_delivery(engine, vault, delivery, model)
    async with engine.begin() as conn:
        await conn.execute(
            update(rejected)
            .where(rejected.c.id == row_id)
            .values(replayed_at=func.now(), replayed_event_id=outcome.row_id)
        )
