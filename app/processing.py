"""One transaction per delivery: record, apply, commit; retried on deadlock."""

import logging
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from app.crypto import Vault
from app.ingest import Delivery, apply, record
from app.models import RejectedDelivery
from app.schemas import HandledEvent
from app.signing import SignatureCheck
from app.sql import transaction

log = logging.getLogger("coldmail.processing")
RETRYABLE_SQLSTATES = {"40P01", "40001"}  # deadlock detected, serialization failure
ATTEMPTS = 3


@dataclass(frozen=True)
class Outcome:
    status: str  # processed | ignored | duplicate
    conflict: bool
    row_id: int


def _retryable(error: asyncpg.PostgresError) -> bool:
    return getattr(error, "sqlstate", None) in RETRYABLE_SQLSTATES


async def process_delivery(
    engine: AsyncEngine, vault: Vault, delivery: Delivery, model: HandledEvent | None
) -> Outcome:
    for attempt in range(1, ATTEMPTS + 1):
        try:
            async with transaction(engine) as conn:
                return await _record_and_apply(conn, vault, delivery, model)
        except asyncpg.PostgresError as error:
            if attempt == ATTEMPTS or not _retryable(error):
                raise
            log.info("retrying delivery after %s", error.sqlstate)
    raise AssertionError("unreachable")


async def _record_and_apply(
    conn: asyncpg.Connection, vault: Vault, delivery: Delivery, model: HandledEvent | None
) -> Outcome:
    recorded = await record(conn, delivery, status="processed" if model else "ignored", vault=vault)
    if not recorded.inserted:
        return Outcome("duplicate", False, recorded.row_id)
    if model is not None:
        await apply(conn, model, vault=vault, version=delivery.version)
    return Outcome("processed" if model else "ignored", recorded.conflict, recorded.row_id)


async def store_rejected(
    engine: AsyncEngine,
    vault: Vault,
    raw: bytes,
    signature: SignatureCheck,
    *,
    reason: str,
    errors: list[dict[str, Any]],
    envelope: dict[str, Any] | None,
) -> None:
    """Keep a refused delivery, encrypted, so it can be replayed once its cause is fixed."""
    row = insert(RejectedDelivery).values(
        reason=reason,
        event=envelope["event"] if envelope else None,
        event_id=envelope["eventId"] if envelope else None,
        errors=errors,
        signature=signature.result,
        body_encrypted=vault.encrypt(raw),
    )
    async with engine.begin() as conn:
        await conn.execute(row)
