"""Recording a delivery: the one statement that records it once per (eventId, content) and,
when it is new, applies its effects by the rules in app/recording/merge.py. Live
deliveries, the spool's drainer and `replay` all come through `record`.

A delivery is one statement, one round trip: the record and every upsert, each upsert
applied only when the record is new. A prewarmup order's mailboxes follow in a few parts,
and its derived values (merge.DERIVE_ORDER), in the same transaction.
"""

import asyncio
import logging
from collections.abc import Sequence
from contextlib import nullcontext
from functools import lru_cache
from typing import Any, Protocol

import asyncpg
import orjson
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

from app import metrics
from app.crypto import Vault, redact
from app.db import lost_a_race, raw_connection
from app.destinations import Destination
from app.outbound.messages import forward_sql
from app.receiving import payloads
from app.receiving.delivery import Delivery, Outcome, Rejection
from app.recording import effects, merge
from app.recording.effects import Effects, Row, Unsealed
from app.recording.forwarding import Forwarded, forwarded
from app.recording.merge import Upsert

log = logging.getLogger("coldmail.recording")
ATTEMPTS = 3
# A bulk delivery's mailboxes (a prewarmup order's thousand) are written in up to PARTS
# statements (MIN_PART rows or more each, but the last), each part's credentials encrypted
# while the database runs the statement before it (see write_with_mailboxes).
PARTS, MIN_PART = 4, 100


class Outbox(Protocol):
    """What is told outside (app/outbound): the derived events, written in the transaction
    of their cause (no dual write). The assembler (app/main.py, app/cli.py) hands one to
    recording and reconcile, which so need to know neither the destinations nor what they
    are told."""

    @property
    def telling(self) -> bool:
        """Whether anything may be told: without destinations, no transaction is opened."""

    def tells(self, changes: Effects | None, *, completing: bool = True) -> bool:
        """Whether these effects may cause an event a destination wants: a delivery that
        cannot stays one statement, without a transaction. Not `completing`: its mailboxes
        complete no order or subscription (delivery_statement's `may_complete`)."""

    async def applied(self, conn: asyncpg.Connection, many: Sequence[Effects]) -> None:
        """Deliveries newly recorded (their effects applied), in their transaction: one, or
        a group committed together (told at once: each subject is read once)."""

    async def rejected(self, conn: asyncpg.Connection, rejection: Rejection) -> None:
        """A rejected delivery stored, in its transaction."""

    async def reconciled(self, conn: asyncpg.Connection, report: dict[str, Any]) -> None:
        """A reconcile's report stored (app/operations/reconcile.py), in its transaction."""


def delivery_version(delivery: Delivery) -> str:
    """The delivery's place in 'the later event wins' (effects.version)."""
    assert delivery.event_id is not None, "a delivery without its eventId is spooled"
    return effects.version(delivery.event_time, delivery.event_id, delivery.content_hash)


# The event's key row serialises deliveries of one eventId: a second one waits for the
# first to commit, then sees it (ON CONFLICT reads the latest row, whatever the snapshot).
# `conflict` is true once two contents have been seen for the eventId.
RECORD = """
key AS (
    INSERT INTO event_keys AS old (event_id, content_hash) VALUES ($1, $4)
    ON CONFLICT (event_id) DO UPDATE
    SET conflict = old.conflict OR old.content_hash <> EXCLUDED.content_hash
    RETURNING conflict),
recorded AS (
    INSERT INTO events AS e (event_id, event, status, content_hash, deliveries, conflict,
        signature, signature_form, payload, body_encrypted, first_received_at,
        last_received_at, event_time, warnings, spooled)
    SELECT $1, $2, $3, $4, 1, key.conflict, $5, $6, $7::jsonb, $8, $9, $9, $10, $11::jsonb, $12
    FROM key
    ON CONFLICT (event_id, content_hash) DO UPDATE SET deliveries = e.deliveries + 1,
        last_received_at = greatest(e.last_received_at, EXCLUDED.last_received_at)
    RETURNING id, xmax = 0 AS inserted, conflict)"""
RECORD_PARAMETERS = 12
# A stored event replayed: its record is the stored one, and its effects apply again.
REAPPLY_PARAMETERS = 1
REAPPLY = """
recorded AS (
    UPDATE events SET status = 'processed' WHERE id = $1
    RETURNING id, true AS inserted, false AS conflict)"""
# Rows written before the eventId's second content arrived (rare); run again on every
# later delivery of a conflicting eventId, so a crash in between is mended by the retry.
MARK_CONFLICT = "UPDATE events SET conflict = true WHERE event_id = $1 AND NOT conflict"


@lru_cache(maxsize=256)
def delivery_statement(
    upserts: tuple[tuple[Upsert, bool], ...],
    *,
    replay: bool = False,
    forwarded: bool = False,
    telling: bool = False,
    insert_only: int | None = None,
) -> str:
    """The record and every upsert (for one row or `many`), and the outbound messages
    when it is `forwarded`, in one statement: one round trip per delivery. `may_complete`
    is false when the delivery's mailboxes cannot complete an order's or a subscription's
    (merge.Upsert.completes): the outbox then need not read whether they did. Only when
    `telling` (an outbox may tell of the effects: Outbox.tells) is that asked; otherwise
    `may_complete` is true and unread, and the statement pays for no RETURNING and no read
    of order_domains (about a tenth of a mailbox.created statement's CPU, issue 31).
    `insert_only`: the upsert of that index only inserts (merge.Upsert.sql), and the row
    also says whether it did (`fresh`; meaningful only when `inserted`)."""
    head, used = (REAPPLY, REAPPLY_PARAMETERS) if replay else (RECORD, RECORD_PARAMETERS)
    parts, first = [head], used + 1
    for i, (statement, many) in enumerate(upserts):
        sql = statement.sql(
            first, many=many, gate="recorded", completes=telling, insert_only=i == insert_only
        )
        parts.append(f"effect{i} AS ({sql})")
        first += len(statement.names)
    if forwarded:
        parts.append(f"outbound AS ({forward_sql(first, gate='recorded')})")
    completes = [
        f"effect{i}" for i, (statement, _) in enumerate(upserts) if statement.completes and telling
    ]
    may_complete = (
        "coalesce("
        + " OR ".join(f"(SELECT bool_or(completes) FROM {c})" for c in completes)
        + ", false)"
        if completes
        else "true"
    )
    fresh = "" if insert_only is None else f", EXISTS (SELECT FROM effect{insert_only}) AS fresh"
    return (
        "WITH "
        + ",\n".join(parts)
        + f"\nSELECT id, inserted, conflict, {may_complete} AS may_complete{fresh} FROM recorded"
    )


def insert_only(changes: Effects | None, *, telling: bool) -> int | None:
    """Which of the effects a group writes insert-only (delivery_statement), if any: a
    mailbox.created's mailbox, which is almost always new. Its full upsert then follows in
    the group's transaction only when the mailbox was already stored (batches._merged), so
    the statement does not pay for the DO UPDATE it almost never runs. Not when `telling`:
    an outbox reads what the upsert `completes`."""
    if telling or changes is None:
        return None
    for i, (statement, rows) in enumerate(changes.upserts):
        if statement is merge.MAILBOX_SNAPSHOT and len(rows) == 1:
            return i
    return None


def delivery_write(
    delivery: Delivery,
    changes: Effects | None,
    vault: Vault,
    outbound: Forwarded | None = None,
    *,
    telling: bool = False,
    insert_only: int | None = None,
) -> tuple[str, list[Any]]:
    """The one statement that records the delivery and, when it is new (or replayed),
    applies its effects and writes its outbound messages; and its arguments. `telling`:
    an outbox may tell of these effects (Outbox.tells), so the row's `may_complete` is
    read (delivery_statement). `insert_only`: the effect a group writes insert-only
    (app/recording/batches.py completes its merge when the row says it is not `fresh`)."""
    if delivery.stored is not None:
        args: list[Any] = [delivery.stored.row_id]
    else:
        args = [
            delivery.event_id,
            delivery.event,
            "processed" if changes else "ignored",
            delivery.content_hash,
            delivery.signature.result,
            delivery.signature.form,
            orjson.dumps(redact(delivery.envelope)).decode(),
            vault.encrypt(delivery.raw),
            delivery.received_at,
            delivery.event_time,
            orjson.dumps(delivery.warnings).decode(),
            delivery.spooled,
        ]
    upserts = changes.upserts if changes else []
    for statement, rows in upserts:
        args += statement.parameters(rows)
    if outbound is not None:
        args += outbound.arguments()
    shape = tuple((statement, len(rows) > 1) for statement, rows in upserts)
    replay = delivery.stored is not None
    sql = delivery_statement(
        shape,
        replay=replay,
        forwarded=outbound is not None,
        telling=telling,
        insert_only=insert_only,
    )
    return sql, args


async def record(
    engine: AsyncEngine,
    vault: Vault,
    delivery: Delivery,
    model: payloads.HandledEvent | None,
    destinations: Sequence[Destination] = (),
    outbox: Outbox | None = None,
) -> Outcome:
    """Record the delivery and apply its event (`model`; None for an event we do not
    handle), retried at once when it lost a race with a concurrent delivery. A new event is
    forwarded to the `destinations` that want it, in the same transaction (a replayed one
    is not: it was forwarded when it was first recorded); the derived events it causes go
    to `outbox`, in the same transaction too."""
    changes = (
        None
        if model is None
        else effects.of(
            model, vault=vault, when=delivery.event_time, version=delivery_version(delivery)
        )
    )
    outbound = forwarding_of(delivery, model, destinations)
    async for attempt in AsyncRetrying(
        retry=retry_if_exception(lost_a_race),
        stop=stop_after_attempt(ATTEMPTS),
        before_sleep=lambda state: log.info("retrying a delivery that lost a race"),
        reraise=True,
    ):
        with attempt:
            async with raw_connection(engine) as conn:
                row = await write(conn, delivery, changes, vault, outbound, outbox)
    if not row["inserted"]:
        return Outcome("duplicate", False, row["id"])
    conflict = bool(row["conflict"])
    return Outcome("processed" if model else "ignored", conflict, row["id"])


def forwarding_of(
    delivery: Delivery, model: payloads.HandledEvent | None, destinations: Sequence[Destination]
) -> Forwarded | None:
    """A new event's outbound messages (app/recording/forwarding.py), or None."""
    if not destinations or delivery.stored is not None:
        return None
    return forwarded(
        destinations,
        event=delivery.event,
        event_time=delivery.event_time,
        envelope=delivery.envelope,
        model=model,
    )


def tells(outbox: Outbox | None, changes: Effects | None) -> bool:
    """Whether there is an outbox and it may tell of these effects (Outbox.tells): the
    delivery is then written in a transaction and its row's `may_complete` is read."""
    return outbox is not None and outbox.tells(changes)


async def write(
    conn: asyncpg.Connection,
    delivery: Delivery,
    changes: Effects | None,
    vault: Vault,
    outbound: Forwarded | None = None,
    outbox: Outbox | None = None,
) -> asyncpg.Record:
    """One statement (its own transaction), unless the event is an order, whose mailboxes
    and derived values follow in the same transaction, or may cause a derived event (the
    outbox writes it in the same transaction, when the event is new)."""
    ordered = changes is not None and changes.order_id is not None
    telling = tells(outbox, changes)
    sql, args = delivery_write(delivery, changes, vault, outbound, telling=telling)
    if not ordered and not telling:
        row = await conn.fetchrow(sql, *args)
    else:
        async with conn.transaction():
            if changes is not None and changes.order_id is not None:
                row = await write_with_mailboxes(conn, (sql, args), changes.mailboxes, vault)
                if row["inserted"]:
                    await conn.execute(merge.DERIVE_ORDER, changes.order_id, changes.subscriptions)
            else:
                row = await conn.fetchrow(sql, *args)
            if (
                outbox is not None
                and changes is not None
                and row["inserted"]
                and outbox.tells(changes, completing=row["may_complete"])
            ):
                await outbox.applied(conn, [changes])
    if row["conflict"]:
        await conn.execute(MARK_CONFLICT, delivery.event_id)
    return row


async def upsert(conn: asyncpg.Connection, statement: Upsert, rows: list[Row]) -> None:
    """Any number of rows in one round trip."""
    sql = statement.sql(many=len(rows) > 1, completes=False)  # no row is read
    await conn.execute(sql, *statement.parameters(rows))


async def write_with_mailboxes(
    conn: asyncpg.Connection, first: tuple[str, list[Any]], mailboxes: list[Unsealed], vault: Vault
) -> asyncpg.Record:
    """Run the statement `first` (one row with `inserted`), then, if it inserted, upsert the
    mailboxes in parts. Each part's credentials are encrypted while the database runs the
    statement before it: asyncpg sends a statement it has prepared before it first waits,
    so the encryption that then holds the event loop overlaps the database's work, and a
    thousand mailboxes cost about the larger of the two rather than their sum."""
    recording = asyncio.ensure_future(conn.fetchrow(first[0], *first[1]))
    pending: asyncio.Future[Any] = recording
    try:
        for part in parts(mailboxes):
            await asyncio.sleep(0)  # the statement goes out before the loop is held
            rows = sealed(vault, part)
            await pending
            if not recording.result()["inserted"]:
                break
            pending = asyncio.ensure_future(upsert(conn, merge.PREWARMED_SNAPSHOT, rows))
        await pending
    except BaseException:
        await asyncio.gather(pending, return_exceptions=True)  # the connection is free again
        raise
    return recording.result()


def sealed(vault: Vault, mailboxes: list[Unsealed]) -> list[Row]:
    return [row | effects.credentials(vault, given) for row, given in mailboxes]


def parts(mailboxes: list[Unsealed]) -> list[list[Unsealed]]:
    """The mailboxes in key order (the last given per mailbox), in up to PARTS parts."""
    unique = {row["mailbox_id"]: (row, given) for row, given in mailboxes}
    ordered = [unique[key] for key in sorted(unique)]
    size = max(MIN_PART, -(-len(ordered) // PARTS))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


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
    engine: AsyncEngine,
    vault: Vault,
    rejection: Rejection,
    *,
    max_bytes: int,
    outbox: Outbox | None = None,
) -> None:
    """Keep a refused delivery, encrypted, so it can be replayed once its cause is fixed;
    within max_bytes of kept bodies, so a sender of bad bodies cannot fill the disk. What
    it causes to be told goes to `outbox` in the same transaction."""
    telling = outbox is not None and outbox.telling
    async with raw_connection(engine) as conn:
        async with conn.transaction() if telling else nullcontext():
            await conn.execute(
                STORE_REJECTED,
                rejection.reason,
                rejection.event,
                rejection.event_id,
                orjson.dumps(rejection.errors).decode(),
                rejection.signature,
                vault.encrypt(rejection.raw),
                rejection.received_at,  # None: the database's now() (STORE_REJECTED)
            )
            if outbox is not None and telling:
                await outbox.rejected(conn, rejection)
        status = await conn.execute(DROP_OLDEST_REJECTED, max_bytes)
    if dropped := int(status.split()[-1]):
        metrics.REJECTED_BODIES_DROPPED.inc(dropped)
        log.warning("dropped the %s oldest rejected bodies: over REJECTED_MAX_BYTES", dropped)
