"""Recording deliveries and applying events, by the rules declared in app/merge.py."""

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property, lru_cache
from typing import Any

import asyncpg
import orjson

from app import merge, schemas
from app.crypto import Vault, redact
from app.hashing import Hasher
from app.merge import Upsert
from app.signing import SignatureCheck

Row = dict[str, Any]
Mailbox = tuple[Row, schemas.Credentials]  # a snapshot row, and the credentials to encrypt

# A bulk delivery's mailboxes (a prewarmup order's thousand) are written in up to PARTS
# statements (MIN_PART rows or more each, but the last), each part's credentials encrypted
# while the database runs the statement before it (see write_with_mailboxes).
PARTS, MIN_PART = 4, 100


def version(at: datetime, event_id: str) -> str:
    """Sorts as text (C collation) by time, then eventId: 'the later event wins'."""
    return f"{round(at.timestamp() * 1_000_000):020d}|{event_id}"


@dataclass(frozen=True)
class Delivery:
    """An authenticated, parsed delivery, ready to record (live, from the spool, or replayed)."""

    envelope: dict[str, Any]  # normalised: `event` and `eventId` always present
    raw: bytes
    signature: SignatureCheck
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    warnings: list[str] = field(default_factory=list)
    spooled: bool = False
    # None only while the database is away (no hashing key yet): such a delivery is spooled
    hasher: Hasher | None = None

    @property
    def event_id(self) -> str | None:
        """None for a delivery without eventId received while the key was out of reach."""
        event_id = self.envelope["eventId"]
        return None if event_id is None else str(event_id)

    @property
    def event(self) -> str:
        return str(self.envelope["event"])

    @cached_property
    def content_hash(self) -> bytes:
        assert self.hasher is not None, "recorded without the hashing key"
        return self.hasher.digest(schemas.canonical(self.envelope))

    @property
    def event_time(self) -> datetime:
        signed = self.signature.signed_at if self.signature.ok else None
        return datetime.fromtimestamp(signed, UTC) if signed is not None else self.received_at


@dataclass(frozen=True)
class Recorded:
    row_id: int
    inserted: bool
    conflict: bool


@dataclass
class Effects:
    """What one event does: rows for upserts (each table once), mailbox snapshots whose
    credentials are still to be encrypted (merge.PREWARMED_SNAPSHOT, written after the
    upserts), then, for an order, its derived values recomputed (merge.DERIVE_ORDER)."""

    upserts: list[tuple[Upsert, list[Row]]] = field(default_factory=list)
    mailboxes: list[Mailbox] = field(default_factory=list)
    order_id: str | None = None
    subscriptions: list[str] = field(default_factory=list)

    def add(self, statement: Upsert, rows: list[Row]) -> None:
        if rows:
            self.upserts.append((statement, rows))


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
# Rows written before the eventId's second content arrived (rare); run again on every
# later delivery of a conflicting eventId, so a crash in between is mended by the retry.
MARK_CONFLICT = "UPDATE events SET conflict = true WHERE event_id = $1 AND NOT conflict"


@lru_cache(maxsize=128)
def delivery_statement(upserts: tuple[tuple[Upsert, bool], ...]) -> str:
    """The record and every upsert (for one row or `many`), in one statement: one round
    trip per delivery."""
    parts, first = [RECORD], RECORD_PARAMETERS + 1
    for i, (statement, many) in enumerate(upserts):
        parts.append(f"effect{i} AS ({statement.sql(first, many=many, gate='recorded')})")
        first += len(statement.names)
    return "WITH " + ",\n".join(parts) + "\nSELECT id, inserted, conflict FROM recorded"


def delivery_write(
    delivery: Delivery, effects: Effects | None, vault: Vault
) -> tuple[str, list[Any]]:
    """The one statement that records the delivery and, when it is new, applies its
    effects; and its arguments."""
    args: list[Any] = [
        delivery.event_id,
        delivery.event,
        "processed" if effects else "ignored",
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
    upserts = effects.upserts if effects else []
    for statement, rows in upserts:
        args += statement.parameters(rows)
    shape = tuple((statement, len(rows) > 1) for statement, rows in upserts)
    return delivery_statement(shape), args


async def store(
    conn: asyncpg.Connection, delivery: Delivery, effects: Effects | None, vault: Vault
) -> Recorded:
    """Record the delivery once per (eventId, content) and, when it is new, apply its
    effects: one statement (its own transaction), unless the event is an order, whose
    derived values need a second statement in the same transaction."""
    sql, args = delivery_write(delivery, effects, vault)
    if effects is None or effects.order_id is None:
        row = await conn.fetchrow(sql, *args)
    else:
        async with conn.transaction():
            row = await write_with_mailboxes(conn, (sql, args), effects.mailboxes, vault)
            if row["inserted"]:
                await conn.execute(merge.DERIVE_ORDER, effects.order_id, effects.subscriptions)
    if row["conflict"]:
        await conn.execute(MARK_CONFLICT, delivery.event_id)
    return Recorded(row["id"], row["inserted"], bool(row["inserted"] and row["conflict"]))


async def apply(conn: asyncpg.Connection, effects: Effects, vault: Vault) -> None:
    """Apply effects again (replay), inside the caller's transaction."""
    for statement, rows in effects.upserts:
        await upsert(conn, statement, rows)
    for part in parts(effects.mailboxes):
        await upsert(conn, merge.PREWARMED_SNAPSHOT, sealed(vault, part))
    if effects.order_id is not None:
        await conn.execute(merge.DERIVE_ORDER, effects.order_id, effects.subscriptions)


async def upsert(conn: asyncpg.Connection, statement: Upsert, rows: list[Row]) -> None:
    """Any number of rows in one round trip."""
    await conn.execute(statement.sql(many=len(rows) > 1), *statement.parameters(rows))


async def write_with_mailboxes(
    conn: asyncpg.Connection, first: tuple[str, list[Any]], mailboxes: list[Mailbox], vault: Vault
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


def sealed(vault: Vault, mailboxes: list[Mailbox]) -> list[Row]:
    return [row | credentials(vault, given) for row, given in mailboxes]


def parts(mailboxes: list[Mailbox]) -> list[list[Mailbox]]:
    """The mailboxes in key order (the last given per mailbox), in up to PARTS parts."""
    unique = {row["mailbox_id"]: (row, given) for row, given in mailboxes}
    ordered = [unique[key] for key in sorted(unique)]
    size = max(MIN_PART, -(-len(ordered) // PARTS))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def order_row(order_id: str, kind: str, owner: Row) -> Row:
    # The status is derived from the order's domains right after (merge.DERIVE_ORDER).
    return {"order_id": order_id, "kind": kind, "status": "succeeded"} | owner


def credentials(vault: Vault, given: schemas.Credentials) -> dict[str, bytes | None]:
    return {
        "password_encrypted": vault.encrypt_text(given.password),
        "app_password_encrypted": vault.encrypt_text(given.appPassword),
        "authenticator_secret_encrypted": vault.encrypt_text(given.authenticatorSecret),
    }


# --- standard mailbox orders ----------------------------------------------------------


def effects_of_mailbox_order(
    effects: Effects,
    model: schemas.MailboxOrderSuccess | schemas.MailboxOrderFailed,
    at: str,
) -> None:
    data = model.data
    succeeded = isinstance(data, schemas.MailboxOrderSuccessData)
    domain = data.domainName if isinstance(data, schemas.MailboxOrderSuccessData) else data.domain
    owner: Row = {
        "user_id": data.userId,
        "user_email": data.userEmail,
        "provider": data.workspaceType,
    }
    if data.subscriptionId:
        sub: Row = {"subscription_id": data.subscriptionId, "domain": domain, "source": "standard"}
        sub |= owner | {"order_id": data.orderId, "status": "active" if succeeded else "failed"}
        if isinstance(data, schemas.MailboxOrderSuccessData):
            sub |= {"domain_id": data.domainId, "expiry_date": data.expiryDate}
            effects.add(merge.SUBSCRIPTION_ORDER_SUCCEEDED, [sub])
        else:
            effects.add(merge.SUBSCRIPTION_ORDER_FAILED, [sub])
    effects.add(merge.ORDER, [order_row(data.orderId, "mailbox", owner)])
    outcome: dict[str, Any] = {
        "order_id": data.orderId,
        "domain": domain,
        "subscription_id": data.subscriptionId,
        "status": "succeeded" if succeeded else "failed",
    }
    if isinstance(data, schemas.MailboxOrderSuccessData):
        outcome |= {"quantity": data.quantity, "price": data.price, "succeeded_version": at}
    else:
        outcome["reason"] = data.reason
    effects.add(merge.ORDER_DOMAIN, [outcome])
    effects.order_id = data.orderId
    if succeeded and data.subscriptionId:
        effects.subscriptions = [data.subscriptionId]


def effects_of_mailbox_created(
    effects: Effects, model: schemas.MailboxCreated, vault: Vault
) -> None:
    data, box = model.data, model.data.mailboxDetails
    owner: Row = {
        "user_id": data.userId,
        "user_email": data.userEmail,
        "provider": data.workspaceType,
    }
    common: Row = {
        "subscription_id": data.subscriptionId,
        "domain": data.domain,
        "source": "standard",
    }
    common |= owner | {"order_id": data.orderId, "expiry_date": box.expiryDate}
    effects.add(merge.SUBSCRIPTION_MAILBOX_CREATED, [common | {"status": "active"}])
    mailbox = common | {
        "mailbox_id": box.mailboxId,
        "email": box.email,
        "first_name": box.firstName,
        "last_name": box.lastName,
        "user_name": box.userName,
        "profile_picture": box.profilePicture,
        "is_admin": box.isAdmin,
        "creation_time": box.creationTime,
        "price": data.price,
        "final_url": data.finalUrl,
    }
    effects.add(merge.MAILBOX_SNAPSHOT, [mailbox | credentials(vault, box)])


def effects_of_mailbox_updated(effects: Effects, model: schemas.MailboxUpdated, at: str) -> None:
    data = model.data
    given = data.updatedFields.model_fields_set & set(UPDATED_FIELDS)
    edits = {UPDATED_FIELDS[f]: getattr(data.updatedFields, f) for f in sorted(given)}
    row = {
        "mailbox_id": data.mailboxId,
        "domain": data.domain,
        "email": data.email,
        "user_id": data.userId,
        "user_email": data.userEmail,
        "provider": data.workspaceType,
        "field_versions": orjson.dumps({c: at for c in edits}).decode(),
    }
    effects.add(merge.mailbox_edit(tuple(edits)), [row | edits])


UPDATED_FIELDS = dict(zip(schemas.UpdatedFields.model_fields, merge.EDITABLE, strict=True))


def effects_of_mailbox_state(
    effects: Effects,
    model: schemas.MailboxStateEvent,
    vault: Vault,
    at: str,
    when: datetime,
) -> None:
    """mailbox.exported and mailbox.warmup.*: the warmup status and any credentials carried."""
    data = model.data
    given = credentials(vault, data.credentials)
    edits: dict[str, Any] = {c: v for c, v in given.items() if v is not None}
    warmup = schemas.MAILBOX_STATE_EVENTS[model.event]
    if warmup:
        edits["warmup_status"] = warmup
    row = {
        "mailbox_id": data.mailbox_id,
        "exported_at": when if model.event == "mailbox.exported" else None,
        "field_versions": orjson.dumps({c: at for c in edits}).decode(),
    }
    effects.add(merge.mailbox_edit(tuple(sorted(edits))), [row | edits])


# --- prewarmup orders -----------------------------------------------------------------


def effects_of_prewarmup_success(
    effects: Effects, model: schemas.PrewarmupOrderSuccess, at: str
) -> None:
    data = model.data
    owner: Row = {
        "user_id": data.userId,
        "user_email": data.userEmail,
        "provider": data.serviceProvider,
    }
    effects.add(merge.ORDER, [order_row(data.orderId, "prewarmup", owner)])
    subs, outcomes = [], []
    for group in data.mailboxDetails:
        common: Row = {"subscription_id": group.subscriptionId, "domain": group.domain}
        common |= owner | {"source": "prewarmed", "order_id": data.orderId}
        expiries = [b.expiryDate for b in group.preWarmedUpMailboxes if b.expiryDate]
        subs.append(common | {"status": "active", "expiry_date": max(expiries, default=None)})
        effects.mailboxes += [(_prewarmed(common, box), box) for box in group.preWarmedUpMailboxes]
        outcomes.append(
            {
                "order_id": data.orderId,
                "domain": group.domain,
                "subscription_id": group.subscriptionId,
                "status": "succeeded",
                "quantity": len(group.preWarmedUpMailboxes),
                "succeeded_version": at,
            }
        )
    effects.add(merge.SUBSCRIPTION_ORDER_SUCCEEDED, subs)
    effects.add(merge.ORDER_DOMAIN, outcomes)
    effects.order_id = data.orderId
    effects.subscriptions = sorted({g.subscriptionId for g in data.mailboxDetails})


def _prewarmed(common: dict[str, Any], box: schemas.PrewarmedMailbox) -> dict[str, Any]:
    return common | {
        "mailbox_id": box.mailboxId,
        "email": box.email,
        "first_name": box.firstName,
        "last_name": box.lastName,
        "profile_picture": box.profilePicture,
        "is_admin": box.isAdmin,
        "warming_up_from": box.warmingUpFrom,
        "expiry_date": box.expiryDate,
    }


def effects_of_prewarmup_failed(effects: Effects, model: schemas.PrewarmupOrderFailed) -> None:
    data = model.data
    owner: Row = {
        "user_id": data.userId,
        "user_email": data.userEmail,
        "provider": data.serviceProvider,
    }
    order = order_row(data.orderId, "prewarmup", owner)
    if not data.failedOrders:  # an order-level failure
        order["failure_reason"] = data.reason or "order failed"
    effects.add(merge.ORDER, [order])
    outcomes = [
        {"order_id": data.orderId, "domain": f.domain, "status": "failed", "reason": f.reason}
        for f in data.failedOrders
    ]
    effects.add(merge.ORDER_DOMAIN, outcomes)
    effects.order_id = data.orderId


# --- subscription and domain lifecycles -----------------------------------------------


def effects_of_subscription(effects: Effects, model: schemas.SubscriptionEvent, at: str) -> None:
    data = model.data
    row = {
        "subscription_id": data.subscriptionId,
        "domain": data.domain,
        "domain_id": data.domainId,
        "user_id": data.userId,
        "user_email": data.userEmail,
        "provider": data.workspaceType,
        "status": "active",
        "subscription_status": model.state,
        "period_start": data.periodStart,
        "period_end": data.periodEnd,
        "auto_renew": data.autoRenew,
        "lifecycle_quantity": data.quantity,
        "lifecycle_version": at,
        "lifecycle_source": "event",
        "expiry_date": data.periodEnd,
    }
    effects.add(merge.SUBSCRIPTION_LIFECYCLE, [row])


def effects_of_domain(effects: Effects, model: schemas.DomainEvent, at: str) -> None:
    data = model.data
    row = {
        "domain_id": data.domainId,
        "name": data.domainName,
        "status": model.state,
        "expiry_date": data.expiryDate,
        "version": at,
    }
    statement = merge.DOMAIN_BY_ID if data.domainId else merge.DOMAIN_BY_NAME
    effects.add(statement, [row])


def effects(model: schemas.HandledEvent, *, vault: Vault, at: datetime, event_id: str) -> Effects:
    """What one validated event does, as rows for the merge rules' upserts."""
    v, result = version(at, event_id), Effects()
    match model:
        case schemas.MailboxOrderSuccess() | schemas.MailboxOrderFailed():
            effects_of_mailbox_order(result, model, v)
        case schemas.MailboxCreated():
            effects_of_mailbox_created(result, model, vault)
        case schemas.MailboxUpdated():
            effects_of_mailbox_updated(result, model, v)
        case schemas.MailboxStateEvent():
            effects_of_mailbox_state(result, model, vault, v, at)
        case schemas.PrewarmupOrderSuccess():
            effects_of_prewarmup_success(result, model, v)
        case schemas.PrewarmupOrderFailed():
            effects_of_prewarmup_failed(result, model)
        case schemas.SubscriptionEvent():
            effects_of_subscription(result, model, v)
        case schemas.DomainEvent():
            effects_of_domain(result, model, v)
    return result
