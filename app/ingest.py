"""Recording deliveries and applying events, by the rules declared in app/merge.py."""

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import asyncpg
import orjson

from app import merge, schemas
from app.crypto import Vault, redact
from app.merge import Upsert
from app.signing import SignatureCheck

Row = dict[str, Any]


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

    @property
    def event_id(self) -> str:
        return str(self.envelope["eventId"])

    @property
    def event(self) -> str:
        return str(self.envelope["event"])

    @cached_property
    def content_hash(self) -> bytes:
        return hashlib.sha256(schemas.canonical(self.envelope)).digest()

    @property
    def event_time(self) -> datetime:
        signed = self.signature.signed_at if self.signature.ok else None
        return datetime.fromtimestamp(signed, UTC) if signed is not None else self.received_at

    @property
    def lock_key(self) -> int:
        """Deliveries sharing an eventId take turns, so a conflict is seen even when they
        arrive at the same instant."""
        digest = hashlib.sha256(self.event_id.encode()).digest()
        return int.from_bytes(digest[:8], "big", signed=True)


@dataclass(frozen=True)
class Recorded:
    row_id: int
    inserted: bool
    conflict: bool


RECORD = """
INSERT INTO events AS e (event_id, event, status, content_hash, deliveries, conflict, signature,
    signature_form, payload, body_encrypted, first_received_at, last_received_at, event_time,
    warnings, spooled)
VALUES ($1, $2, $3, $4, 1, false, $5, $6, $7::jsonb, $8, $9, $9, $10, $11::jsonb, $12)
ON CONFLICT (event_id, content_hash) DO UPDATE SET deliveries = e.deliveries + 1,
    last_received_at = greatest(e.last_received_at, EXCLUDED.last_received_at)
RETURNING id, xmax = 0 AS inserted,
    (SELECT count(*) FROM events WHERE event_id = $1) AS others
"""


async def record(
    conn: asyncpg.Connection, delivery: Delivery, *, status: str, vault: Vault
) -> Recorded:
    """Insert the event once per (eventId, content); a repeat only counts a delivery.

    The unique constraint decides, so concurrent identical deliveries cannot both insert.
    The subquery sees the table as it was before this statement (and, under the eventId's
    lock, every earlier delivery of it): a non-zero count on insert is a conflict.
    """
    row = await conn.fetchrow(
        RECORD,
        delivery.event_id,
        delivery.event,
        status,
        delivery.content_hash,
        delivery.signature.result,
        delivery.signature.form,
        orjson.dumps(redact(delivery.envelope)).decode(),
        vault.encrypt(delivery.raw),
        delivery.received_at,
        delivery.event_time,
        orjson.dumps(delivery.warnings).decode(),
        delivery.spooled,
    )
    conflict = bool(row["inserted"] and row["others"])
    if conflict:
        await conn.execute(
            "UPDATE events SET conflict = true WHERE event_id = $1", delivery.event_id
        )
    return Recorded(row_id=row["id"], inserted=bool(row["inserted"]), conflict=conflict)


async def upsert(conn: asyncpg.Connection, statement: Upsert, rows: list[dict[str, Any]]) -> None:
    """Rows sorted by key, so concurrent upserts of the same rows lock them in one order."""
    unique = {tuple(row[k] for k in statement.key): row for row in rows}
    args = [[unique[k].get(c) for c in statement.names] for k in sorted(unique)]
    if len(args) == 1:
        await conn.execute(statement.sql, *args[0])
    else:
        await conn.executemany(statement.sql, args)


def order_row(order_id: str, kind: str, owner: dict[str, Any]) -> dict[str, Any]:
    # The status is derived from the order's domains right after (derive_order).
    return {"order_id": order_id, "kind": kind, "status": "succeeded"} | owner


async def derive_order(conn: asyncpg.Connection, order_id: str, subscriptions: list[str]) -> None:
    await conn.execute(merge.ORDER_STATUS, order_id)
    if subscriptions:
        await conn.execute(merge.SUBSCRIPTION_ORDERS, subscriptions)


def credentials(vault: Vault, given: schemas.Credentials) -> dict[str, bytes | None]:
    return {
        "password_encrypted": vault.encrypt_text(given.password),
        "app_password_encrypted": vault.encrypt_text(given.appPassword),
        "authenticator_secret_encrypted": vault.encrypt_text(given.authenticatorSecret),
    }


# --- standard mailbox orders ----------------------------------------------------------


async def apply_mailbox_order(
    conn: asyncpg.Connection,
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
            await upsert(conn, merge.SUBSCRIPTION_ORDER_SUCCEEDED, [sub])
        else:
            await upsert(conn, merge.SUBSCRIPTION_ORDER_FAILED, [sub])
    await upsert(conn, merge.ORDER, [order_row(data.orderId, "mailbox", owner)])
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
    await upsert(conn, merge.ORDER_DOMAIN, [outcome])
    await derive_order(
        conn, data.orderId, [data.subscriptionId] if succeeded and data.subscriptionId else []
    )


async def apply_mailbox_created(
    conn: asyncpg.Connection, model: schemas.MailboxCreated, vault: Vault
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
    await upsert(conn, merge.SUBSCRIPTION_MAILBOX_CREATED, [common | {"status": "active"}])
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
    await upsert(conn, merge.MAILBOX_SNAPSHOT, [mailbox | credentials(vault, box)])


async def apply_mailbox_updated(
    conn: asyncpg.Connection, model: schemas.MailboxUpdated, at: str
) -> None:
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
    await upsert(conn, merge.mailbox_edit(tuple(edits)), [row | edits])


UPDATED_FIELDS = dict(zip(schemas.UpdatedFields.model_fields, merge.EDITABLE, strict=True))


async def apply_mailbox_state(
    conn: asyncpg.Connection,
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
    await upsert(conn, merge.mailbox_edit(tuple(sorted(edits))), [row | edits])


# --- prewarmup orders -----------------------------------------------------------------


async def apply_prewarmup_success(
    conn: asyncpg.Connection, model: schemas.PrewarmupOrderSuccess, vault: Vault, at: str
) -> None:
    data = model.data
    owner: Row = {
        "user_id": data.userId,
        "user_email": data.userEmail,
        "provider": data.serviceProvider,
    }
    await upsert(conn, merge.ORDER, [order_row(data.orderId, "prewarmup", owner)])
    subs, boxes, outcomes = [], [], []
    for group in data.mailboxDetails:
        common: Row = {"subscription_id": group.subscriptionId, "domain": group.domain}
        common |= owner | {"source": "prewarmed", "order_id": data.orderId}
        expiries = [b.expiryDate for b in group.preWarmedUpMailboxes if b.expiryDate]
        subs.append(common | {"status": "active", "expiry_date": max(expiries, default=None)})
        boxes += [_prewarmed(vault, common, box) for box in group.preWarmedUpMailboxes]
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
    await upsert(conn, merge.SUBSCRIPTION_ORDER_SUCCEEDED, subs)
    await upsert(conn, merge.MAILBOX_SNAPSHOT, boxes)
    await upsert(conn, merge.ORDER_DOMAIN, outcomes)
    await derive_order(conn, data.orderId, sorted({g.subscriptionId for g in data.mailboxDetails}))


def _prewarmed(
    vault: Vault, common: dict[str, Any], box: schemas.PrewarmedMailbox
) -> dict[str, Any]:
    return common | {
        "mailbox_id": box.mailboxId,
        "email": box.email,
        "first_name": box.firstName,
        "last_name": box.lastName,
        "profile_picture": box.profilePicture,
        "is_admin": box.isAdmin,
        "warming_up_from": box.warmingUpFrom,
        "expiry_date": box.expiryDate,
        **credentials(vault, box),
    }


async def apply_prewarmup_failed(
    conn: asyncpg.Connection, model: schemas.PrewarmupOrderFailed
) -> None:
    data = model.data
    owner: Row = {
        "user_id": data.userId,
        "user_email": data.userEmail,
        "provider": data.serviceProvider,
    }
    order = order_row(data.orderId, "prewarmup", owner)
    if not data.failedOrders:  # an order-level failure
        order["failure_reason"] = data.reason or "order failed"
    await upsert(conn, merge.ORDER, [order])
    outcomes = [
        {"order_id": data.orderId, "domain": f.domain, "status": "failed", "reason": f.reason}
        for f in data.failedOrders
    ]
    if outcomes:
        await upsert(conn, merge.ORDER_DOMAIN, outcomes)
    await derive_order(conn, data.orderId, [])


# --- subscription and domain lifecycles -----------------------------------------------


async def apply_subscription(
    conn: asyncpg.Connection, model: schemas.SubscriptionEvent, at: str
) -> None:
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
    await upsert(conn, merge.SUBSCRIPTION_LIFECYCLE, [row])


async def apply_domain(conn: asyncpg.Connection, model: schemas.DomainEvent, at: str) -> None:
    data = model.data
    row = {
        "domain_id": data.domainId,
        "name": data.domainName,
        "status": model.state,
        "expiry_date": data.expiryDate,
        "version": at,
    }
    statement = merge.DOMAIN_BY_ID if data.domainId else merge.DOMAIN_BY_NAME
    await upsert(conn, statement, [row])


async def apply(
    conn: asyncpg.Connection,
    model: schemas.HandledEvent,
    *,
    vault: Vault,
    at: datetime,
    event_id: str,
) -> None:
    """Apply one validated event's effects inside the caller's transaction."""
    v = version(at, event_id)
    match model:
        case schemas.MailboxOrderSuccess() | schemas.MailboxOrderFailed():
            await apply_mailbox_order(conn, model, v)
        case schemas.MailboxCreated():
            await apply_mailbox_created(conn, model, vault)
        case schemas.MailboxUpdated():
            await apply_mailbox_updated(conn, model, v)
        case schemas.MailboxStateEvent():
            await apply_mailbox_state(conn, model, vault, v, at)
        case schemas.PrewarmupOrderSuccess():
            await apply_prewarmup_success(conn, model, vault, v)
        case schemas.PrewarmupOrderFailed():
            await apply_prewarmup_failed(conn, model)
        case schemas.SubscriptionEvent():
            await apply_subscription(conn, model, v)
        case schemas.DomainEvent():
            await apply_domain(conn, model, v)
