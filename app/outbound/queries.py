"""What ops see of the outbound side: each destination's backlog, dead letters, circuit and
recent attempts, read from PostgreSQL (the state every replica shares). The read API, the
dashboard's pages and the /metrics gauges all read through these functions."""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app import metrics
from app.errors import DATABASE_ERRORS

log = logging.getLogger("coldmail.outbound")
CIRCUIT_STATES = {"closed": 0, "open": 1, "disabled": 2}

# Per destination, each through ix_outbound_messages_destination_status_id: the pending
# backlog and the dead letters (counted from the index), the oldest pending message (the
# lowest id: ids are given in the order messages are written, so its created_at is the
# oldest but for a transaction still open when a later one committed); then the shared
# circuit and the last attempt (the highest id, through ix_outbound_attempts_destination_id).
# `BETWEEN x AND x` where `= x` would do, and the key in full in ORDER BY: with `=`, the
# planner reads those columns as constants, orders by id alone and walks the primary key
# instead, filtering; as ids and statuses go together (the oldest are delivered), that read
# the whole table for a first row (40 ms at 200,000 messages; this index: 0.04 ms).
STATES = text(
    """
SELECT name,
    (SELECT count(*) FROM outbound_messages m
        WHERE m.destination = name AND m.status = 'pending') AS backlog,
    oldest.created_at AS oldest_at,
    extract(epoch FROM now() - oldest.created_at) AS oldest_seconds,
    (SELECT count(*) FROM outbound_messages m
        WHERE m.destination = name AND m.status = 'dead') AS dead_letters,
    d.failures, d.opened_at, d.disabled_at,
    (SELECT a.started_at FROM outbound_attempts a WHERE a.destination BETWEEN name AND name
        ORDER BY a.destination DESC, a.id DESC LIMIT 1) AS last_attempt_at
FROM unnest(CAST(:names AS text[])) AS name
LEFT JOIN outbound_destinations d USING (name)
LEFT JOIN LATERAL (
    SELECT m.created_at FROM outbound_messages m
    WHERE m.destination = name AND m.status BETWEEN 'pending' AND 'pending'
    ORDER BY m.status, m.id LIMIT 1) AS oldest ON true
ORDER BY name
"""
)


@dataclass(frozen=True)
class DestinationState:
    name: str
    backlog: int
    oldest_at: datetime | None
    oldest_seconds: float
    dead_letters: int
    failures: int
    circuit: str  # closed | open | disabled
    opened_at: datetime | None
    disabled_at: datetime | None
    last_attempt_at: datetime | None


def circuit_of(row: Any) -> str:
    if row.disabled_at is not None:
        return "disabled"
    return "open" if row.opened_at is not None else "closed"


async def destination_states(engine: AsyncEngine, names: Sequence[str]) -> list[DestinationState]:
    async with engine.connect() as conn:
        rows = (await conn.execute(STATES.bindparams(names=list(names)))).all()
    return [
        DestinationState(
            name=row.name,
            backlog=int(row.backlog),
            oldest_at=row.oldest_at,
            oldest_seconds=float(row.oldest_seconds or 0.0),
            dead_letters=int(row.dead_letters),
            failures=int(row.failures or 0),
            circuit=circuit_of(row),
            opened_at=row.opened_at,
            disabled_at=row.disabled_at,
            last_attempt_at=row.last_attempt_at,
        )
        for row in rows
    ]


async def observe(engine: AsyncEngine, names: Sequence[str]) -> None:
    """Set the per-destination gauges from PostgreSQL (at scrape); while the database is
    away the last values stay."""
    try:
        states = await destination_states(engine, names)
    except DATABASE_ERRORS as error:
        log.warning("outbound backlog not read: %s", type(error).__name__)
        return
    for state in states:
        metrics.OUTBOUND_BACKLOG.labels(state.name).set(state.backlog)
        metrics.OUTBOUND_OLDEST.labels(state.name).set(state.oldest_seconds)
        metrics.OUTBOUND_DEAD.labels(state.name).set(state.dead_letters)
        metrics.OUTBOUND_CIRCUIT.labels(state.name).set(CIRCUIT_STATES[state.circuit])


def declare_series(names: Sequence[str]) -> None:
    """Every destination's series exist from the start, at 0 (alerts and the board see
    them before the first message)."""
    for name in names:
        metrics.OUTBOUND_SENT.labels(name)
        metrics.OUTBOUND_FAILED.labels(name)


# A destination's messages, newest first, a page after the cursor (the last id given): of
# one status, one range of ix_outbound_messages_destination_status_id read backwards; of
# any, the three statuses' ranges, a page of each, merged. (`BETWEEN`: as in STATES.)
COLUMNS = """id, webhook_id, type, status, attempts, next_attempt_at, last_attempt_at,
    last_status, last_error, occurred_at, created_at, delivered_at"""
STATUSES = ("pending", "delivered", "dead")
MESSAGES = text(
    f"""
SELECT {COLUMNS}
FROM outbound_messages
WHERE destination = :name AND status BETWEEN :status AND :status AND id < :before
ORDER BY status DESC, id DESC
LIMIT :limit
"""
)
ANY_MESSAGES = text(
    f"""
SELECT m.*
FROM unnest(CAST(:statuses AS text[])) AS s(status)
CROSS JOIN LATERAL (
    SELECT {COLUMNS}
    FROM outbound_messages
    WHERE destination = :name AND status BETWEEN s.status AND s.status AND id < :before
    ORDER BY status DESC, id DESC
    LIMIT :limit) AS m
ORDER BY m.id DESC
LIMIT :limit
"""
)
# The last attempts at a destination, with the message each was for.
ATTEMPTS = text(
    """
SELECT a.id, a.started_at, a.status_code, a.latency_ms, a.error,
    m.id AS message_id, m.webhook_id, m.type, m.status, m.attempts, m.next_attempt_at
FROM outbound_attempts a JOIN outbound_messages m ON m.id = a.message_id
WHERE a.destination = :name
ORDER BY a.id DESC
LIMIT :limit
"""
)


async def messages(
    engine: AsyncEngine, name: str, *, status: str | None, before: int, limit: int
) -> Sequence[Any]:
    params: dict[str, Any] = {"name": name, "before": before, "limit": limit}
    if status is None:
        statement = ANY_MESSAGES.bindparams(statuses=list(STATUSES), **params)
    else:
        statement = MESSAGES.bindparams(status=status, **params)
    async with engine.connect() as conn:
        return (await conn.execute(statement)).all()


async def recent_attempts(engine: AsyncEngine, name: str, *, limit: int) -> Sequence[Any]:
    async with engine.connect() as conn:
        return (await conn.execute(ATTEMPTS.bindparams(name=name, limit=limit))).all()
