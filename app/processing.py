"""One statement per delivery: record and apply (app/ingest.py). What a failure means, by
its kind.

The same entry point serves live deliveries, the spool's drainer and `replay`.
"""

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import sqlalchemy.exc
from sqlalchemy.ext.asyncio import AsyncEngine

from app import ingest
from app.crypto import Vault
from app.db import raw_connection
from app.ingest import Delivery
from app.schemas import HandledEvent

log = logging.getLogger("coldmail.processing")
RETRYABLE_SQLSTATES = {"40P01", "40001"}  # deadlock detected, serialization failure
ATTEMPTS = 3
# Failures a later attempt can cure: the database unreachable, shutting down, out of
# connections, or a transaction that lost a race. Deliveries hit by these are spooled.
TRANSIENT_SQLSTATE_PREFIXES = ("08", "57P", "53", "40", "55000", "57014")
TRANSIENT_ERRORS = (
    OSError,
    TimeoutError,
    asyncio.TimeoutError,
    sqlalchemy.exc.TimeoutError,  # the pool had no connection to give
    asyncpg.InterfaceError,  # the connection was closed or left mid-protocol
    asyncpg.InternalClientError,
)


def is_transient(error: BaseException) -> bool:
    """Does this failure (or one it wraps) mean "the database cannot do this now"?"""
    seen: BaseException | None = error
    while seen is not None:
        sqlstate = getattr(seen, "sqlstate", None) or getattr(seen, "pgcode", None)
        if isinstance(seen, TRANSIENT_ERRORS) or (
            isinstance(sqlstate, str) and sqlstate.startswith(TRANSIENT_SQLSTATE_PREFIXES)
        ):
            return True
        seen = getattr(seen, "orig", None) or seen.__cause__
    return False


@dataclass(frozen=True)
class Outcome:
    status: str  # processed | ignored | duplicate
    conflict: bool
    row_id: int


async def process_delivery(
    engine: AsyncEngine, vault: Vault, delivery: Delivery, model: HandledEvent | None
) -> Outcome:
    """Record the delivery and apply its event: one round trip unless it is an order."""
    effects = (
        None
        if model is None
        else ingest.effects(model, vault=vault, at=delivery.event_time, event_id=delivery.event_id)
    )
    for attempt in range(1, ATTEMPTS + 1):
        try:
            async with raw_connection(engine) as conn:
                recorded = await ingest.store(conn, delivery, effects, vault)
            break
        except asyncpg.PostgresError as error:
            if attempt == ATTEMPTS or error.sqlstate not in RETRYABLE_SQLSTATES:
                raise
            log.info("retrying delivery after %s", error.sqlstate)
    if not recorded.inserted:
        return Outcome("duplicate", False, recorded.row_id)
    return Outcome("processed" if model else "ignored", recorded.conflict, recorded.row_id)


@dataclass(frozen=True)
class Rejection:
    """A delivery refused (400, 422) or that failed to apply (500): kept, encrypted."""

    raw: bytes
    signature: str
    reason: str  # invalid_json | invalid_payload | apply_failed
    errors: list[dict[str, Any]]
    event: str | None = None
    event_id: str | None = None
    received_at: datetime | None = None


STORE_REJECTED = """
INSERT INTO rejected_deliveries (reason, event, event_id, errors, signature, body_encrypted,
    received_at)
VALUES ($1, $2, $3, $4::jsonb, $5, $6, coalesce($7, now()))
"""


async def store_rejected(engine: AsyncEngine, vault: Vault, rejection: Rejection) -> None:
    """Keep a refused delivery, encrypted, so it can be replayed once its cause is fixed."""
    async with raw_connection(engine) as raw:
        await raw.execute(
            STORE_REJECTED,
            rejection.reason,
            rejection.event,
            rejection.event_id,
            orjson.dumps(rejection.errors).decode(),
            rejection.signature,
            vault.encrypt(rejection.raw),
            rejection.received_at or datetime.now(UTC),
        )
