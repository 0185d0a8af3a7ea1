"""One statement per delivery: record and apply (app/ingest.py). What a failure means, by
its kind.

`process_delivery` serves live deliveries, the spool's drainer and replayed rejected
deliveries; `replay` of stored events re-applies their effects with `ingest.apply`.
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
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

from app import ingest, metrics
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


def lost_a_race(error: BaseException) -> bool:
    """A deadlock or serialization failure: the same statement at once again will do."""
    return isinstance(error, asyncpg.PostgresError) and error.sqlstate in RETRYABLE_SQLSTATES


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
    event_id = delivery.event_id
    assert event_id is not None, "a delivery without its eventId is spooled, not recorded"
    effects = (
        None
        if model is None
        else ingest.effects(model, vault=vault, at=delivery.event_time, event_id=event_id)
    )
    async for attempt in AsyncRetrying(
        retry=retry_if_exception(lost_a_race),
        stop=stop_after_attempt(ATTEMPTS),
        before_sleep=lambda state: log.info("retrying a delivery that lost a race"),
        reraise=True,
    ):
        with attempt:
            async with raw_connection(engine) as conn:
                recorded = await ingest.store(conn, delivery, effects, vault)
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


# Past REJECTED_MAX_BYTES of stored bodies, the oldest bodies go (record and errors stay).
# octet_length of an uncompressed (EXTERNAL) column reads its size, not its value.
DROP_OLDEST_REJECTED = """
UPDATE rejected_deliveries r SET body_encrypted = NULL FROM (
    SELECT id, sum(octet_length(body_encrypted)) OVER (ORDER BY id DESC) AS newer_and_own
    FROM rejected_deliveries WHERE body_encrypted IS NOT NULL) AS kept
WHERE r.id = kept.id AND kept.newer_and_own > $1
"""


async def store_rejected(
    engine: AsyncEngine, vault: Vault, rejection: Rejection, *, max_bytes: int
) -> None:
    """Keep a refused delivery, encrypted, so it can be replayed once its cause is fixed;
    within max_bytes of kept bodies, so a sender of bad bodies cannot fill the disk."""
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
        status = await raw.execute(DROP_OLDEST_REJECTED, max_bytes)
    if dropped := int(status.split()[-1]):
        metrics.REJECTED_BODIES_DROPPED.inc(dropped)
        log.warning("dropped the %s oldest rejected bodies: over REJECTED_MAX_BYTES", dropped)
