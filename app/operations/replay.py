"""`replay`: stored events applied again, and rejected deliveries retried once their cause is
fixed, through the same `record` as live deliveries (app/recording/record.py). A stored
event keeps its original time, so replaying in any order ends where the live arrivals did.
"""

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Table, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from app.crypto import Vault
from app.db import raw_connection
from app.hashing import Hasher, load_or_create
from app.models import events, rejected
from app.operations.privacy import LOWER_MARK
from app.receiving.delivery import Delivery, Stored
from app.receiving.payloads import parse_envelope, parse_handled, validation_details
from app.receiving.signing import SignatureCheck
from app.recording.record import record


@dataclass
class ReplayReport:
    applied: int = 0
    still_invalid: int = 0
    unhandled: int = 0
    without_body: int = 0
    errors: list[str] = field(default_factory=list)


class UnknownIds(Exception):
    """IDs asked for by name that are not stored: nothing is replayed."""


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
            rejected_ids = list((await conn.execute(stmt)).scalars())
        missing = missing_ids(selection, event_ids, rejected_ids)
        if missing:
            raise UnknownIds("; ".join(missing))
        if rejected_ids:  # those replayed before became events: replay those instead
            stmt = select(rejected.c.id).where(
                rejected.c.id.in_(rejected_ids), rejected.c.replayed_at.is_(None)
            )
            rejected_ids = sorted((await conn.execute(stmt)).scalars())
    replayer = Replayer(engine, vault, Hasher(await load_or_create(engine, vault)), dry_run)
    event_report, rejected_report = ReplayReport(), ReplayReport()
    for row_id in event_ids:
        await replayer.event(row_id, event_report)
    for row_id in rejected_ids:
        await replayer.rejected(row_id, rejected_report)
    return event_report, rejected_report


def missing_ids(selection: Selection, event_ids: list[int], rejected_ids: list[int]) -> list[str]:
    """What was asked for by ID and is not stored, as the operator should read it."""
    events_missing = sorted(set(selection.event_ids) - set(event_ids))
    rejected_missing = sorted(set(selection.rejected_ids) - set(rejected_ids))
    return [f"no event {i} (GET /api/v1/events lists them)" for i in events_missing] + [
        f"no rejected delivery {i} (GET /api/v1/rejected lists them)" for i in rejected_missing
    ]


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
                    select(
                        events.c.body_encrypted,
                        events.c.signature,
                        events.c.event_time,
                        events.c.status,
                    ).where(events.c.id == row_id)
                )
            ).one()
        if row.body_encrypted is None:  # deleted by BODY_RETENTION_DAYS
            report.without_body += 1
            return
        raw = self.vault.decrypt(row.body_encrypted)
        envelope = parse_envelope(raw, self.hasher)
        model = parse_handled(envelope, [])
        if model is None:
            report.unhandled += 1
            return
        report.applied += 1
        if self.dry_run:
            return
        if row.status == "ignored":  # processed from now: under the retention's watch
            async with raw_connection(self.engine) as conn:
                await conn.execute(LOWER_MARK, row_id)
        stored = Stored(row_id, row.event_time)
        delivery = Delivery(
            envelope, raw, SignatureCheck(row.signature), hasher=self.hasher, stored=stored
        )
        await record(self.engine, self.vault, delivery, model)

    async def rejected(self, row_id: int, report: ReplayReport) -> None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(
                        rejected.c.body_encrypted, rejected.c.signature, rejected.c.received_at
                    ).where(rejected.c.id == row_id)
                )
            ).one()
        if row.body_encrypted is None:  # erased: not JSON, nothing left to replay
            report.without_body += 1
            return
        raw = self.vault.decrypt(row.body_encrypted)
        warnings: list[str] = []  # what a live delivery would record with it
        try:
            envelope = parse_envelope(raw, self.hasher)
            model = parse_handled(envelope, warnings)
        except ValueError as error:  # includes ValidationError
            report.still_invalid += 1
            details = validation_details(error) if isinstance(error, ValidationError) else []
            report.errors.append(f"rejected #{row_id}: {details or str(error)}")
            return
        report.applied += 1
        if self.dry_run:
            return
        # At its receipt time, as spooled and stored events are: an edit refused an hour
        # ago must not beat a later live edit by being replayed now.
        delivery = Delivery(
            envelope,
            raw,
            SignatureCheck(row.signature),
            received_at=row.received_at,
            warnings=warnings,
            hasher=self.hasher,
        )
        outcome = await record(self.engine, self.vault, delivery, model)
        async with self.engine.begin() as conn:
            await conn.execute(
                update(rejected)
                .where(rejected.c.id == row_id)
                .values(replayed_at=func.now(), replayed_event_id=outcome.row_id)
            )
