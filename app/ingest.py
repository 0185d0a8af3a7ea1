"""Recording deliveries and applying events.

Every effect is an upsert keyed by the provider's own IDs, written so that the final
state is the same whatever order events arrive in:
- "authoritative" events (order success) overwrite descriptive fields; others
  (mailbox.created, failures) only fill fields still empty;
- success beats failure, for subscriptions and for order domains, in either order;
- a field set by mailbox.updated survives a later mailbox.created, and competing updates
  of one field resolve by the greater (eventId, content hash), not by arrival.
"""

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

import asyncpg
import orjson
from sqlalchemy import (
    Table,
    Text,
    bindparam,
    case,
    func,
    literal,
    literal_column,
    select,
    type_coerce,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.sql.elements import ColumnElement

from app import schemas
from app.crypto import Vault, redact
from app.models import Event, Mailbox, Order, OrderDomain, Subscription
from app.signing import SignatureCheck
from app.sql import Compiled, compile_statement

events: Table = Event.__table__  # type: ignore[assignment]
subscriptions: Table = Subscription.__table__  # type: ignore[assignment]
mailboxes: Table = Mailbox.__table__  # type: ignore[assignment]
orders: Table = Order.__table__  # type: ignore[assignment]
order_domains: Table = OrderDomain.__table__  # type: ignore[assignment]

UPDATABLE_FIELDS = {
    "firstName": "first_name",
    "lastName": "last_name",
    "userName": "user_name",
    "profilePicture": "profile_picture",
}


@dataclass(frozen=True)
class Delivery:
    """A parsed, authenticated delivery, ready to record."""

    envelope: dict[str, Any]
    raw: bytes
    signature: SignatureCheck

    @property
    def event_id(self) -> str:
        return str(self.envelope["eventId"])

    @property
    def event(self) -> str:
        return str(self.envelope["event"])

    @cached_property
    def content_hash(self) -> bytes:
        return canonical_hash(self.envelope)

    @property
    def version(self) -> str:
        """Total order over deliveries, used to settle competing mailbox.updated fields."""
        return f"{self.event_id}:{self.content_hash.hex()}"


@dataclass(frozen=True)
class Recorded:
    row_id: int
    inserted: bool
    conflict: bool


def canonical_hash(envelope: dict[str, Any]) -> bytes:
    return hashlib.sha256(orjson.dumps(envelope, option=orjson.OPT_SORT_KEYS)).digest()


RECORD_COLUMNS = (
    "event_id",
    "event",
    "status",
    "content_hash",
    "deliveries",
    "conflict",
    "signature",
    "signature_form",
    "payload",
    "body_encrypted",
)


@lru_cache(maxsize=1)
def _record_statement() -> Compiled:
    """Built once: rows go in as parameters, so SQLAlchemy reuses the compiled form."""
    same_event_id = (
        select(func.count())
        .select_from(events)
        .where(events.c.event_id == bindparam("same_event_id"))
        .scalar_subquery()
    )
    stmt = (
        insert(events)
        .on_conflict_do_update(
            index_elements=["event_id", "content_hash"],
            set_={"deliveries": events.c.deliveries + 1, "last_received_at": func.now()},
        )
        .returning(
            events.c.id, literal_column("xmax = 0").label("inserted"), same_event_id.label("others")
        )
    )
    return compile_statement(stmt, RECORD_COLUMNS)


async def record(
    conn: asyncpg.Connection, delivery: Delivery, *, status: str, vault: Vault
) -> Recorded:
    """Insert the event once per (eventId, content); a repeat only counts a delivery.

    The unique constraint decides, so concurrent identical deliveries cannot both insert.
    The RETURNING subquery sees the table as it was before this statement, so `others`
    counts earlier rows with the same eventId: a non-zero count on insert is a conflict.
    """
    params = {
        "event_id": delivery.event_id,
        "event": delivery.event,
        "status": status,
        "content_hash": delivery.content_hash,
        "deliveries": 1,
        "conflict": False,
        "signature": delivery.signature.result,
        "signature_form": delivery.signature.form,
        "payload": redact(delivery.envelope),
        "body_encrypted": vault.encrypt(delivery.raw),
        "same_event_id": delivery.event_id,
    }
    row = await _record_statement().fetchrow(conn, params)
    conflict = bool(row["inserted"] and row["others"])
    if conflict:
        await conn.execute(
            "UPDATE events SET conflict = true WHERE event_id = $1", delivery.event_id
        )
    return Recorded(row_id=row["id"], inserted=bool(row["inserted"]), conflict=conflict)


def _least_reason(table: Table, excluded: Any) -> dict[str, Any]:
    # Of several reported failure reasons, keep the same one whatever the arrival order.
    return {"reason": func.least(table.c.reason, excluded.reason)}


def _snapshot_fields(table: Table, excluded: Any) -> dict[str, Any]:
    """Fields mailbox.updated may have set keep the update's value over a snapshot's."""
    return {
        column: case(
            (table.c.field_versions.has_key(field), table.c[column]),
            else_=func.coalesce(excluded[column], table.c[column]),
        )
        for field, column in UPDATABLE_FIELDS.items()
    }


# Per-table exceptions to "overwrite" / "fill in", by name so statements can be cached.
OVERRIDES: dict[str, Callable[[Table, Any], dict[str, Any]]] = {
    "none": lambda table, excluded: {},
    # A success makes a subscription active; a failure never demotes an active one.
    "activate": lambda table, excluded: {"status": literal("active")},
    "keep_status": lambda table, excluded: {"status": table.c.status},
    "snapshot": _snapshot_fields,
    "domain_succeeded": lambda t, e: {"status": literal("succeeded")} | _least_reason(t, e),
    "domain_failed": lambda t, e: {"status": t.c.status} | _least_reason(t, e),
}
TABLES = {t.name: t for t in (subscriptions, mailboxes, orders, order_domains)}


@lru_cache(maxsize=128)
def upsert_statement(
    table_name: str,
    columns: tuple[str, ...],
    key: tuple[str, ...],
    authoritative: bool,
    override: str,
) -> Compiled:
    """INSERT .. ON CONFLICT DO UPDATE that overwrites (authoritative) or only fills in."""
    table = TABLES[table_name]
    stmt = insert(table)
    new, old = stmt.excluded, table.c
    set_: dict[str, Any] = {
        c: func.coalesce(new[c], old[c]) if authoritative else func.coalesce(old[c], new[c])
        for c in columns
        if c not in key
    }
    set_["updated_at"] = func.now()
    set_.update(OVERRIDES[override](table, new))
    return compile_statement(
        stmt.on_conflict_do_update(index_elements=list(key), set_=set_), columns
    )


async def _upsert(
    conn: asyncpg.Connection,
    table: Table,
    rows: list[dict[str, Any]],
    *,
    key: tuple[str, ...],
    authoritative: bool,
    override: str = "none",
) -> None:
    stmt = upsert_statement(table.name, tuple(rows[0]), key, authoritative, override)
    if len(rows) == 1:
        await stmt.execute(conn, rows[0])
    else:
        await stmt.executemany(conn, rows)


def _unique(rows: Iterable[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """One row per key (the last wins), sorted by key so concurrent upserts lock in one order."""
    by_key = {row[key]: row for row in rows}
    return [by_key[k] for k in sorted(by_key)]


async def upsert_subscriptions(
    conn: asyncpg.Connection, rows: list[dict[str, Any]], *, succeeded: bool, authoritative: bool
) -> None:
    status = "active" if succeeded else "failed"
    rows = _unique(({**row, "status": status} for row in rows), "subscription_id")
    await _upsert(
        conn,
        subscriptions,
        rows,
        key=("subscription_id",),
        authoritative=authoritative,
        override="activate" if succeeded else "keep_status",
    )


async def upsert_mailboxes(conn: asyncpg.Connection, rows: list[dict[str, Any]]) -> None:
    """Full snapshots (mailbox.created, prewarmup), many rows in one round trip."""
    await _upsert(
        conn,
        mailboxes,
        _unique(rows, "mailbox_id"),
        key=("mailbox_id",),
        authoritative=True,
        override="snapshot",
    )


async def upsert_order(
    conn: asyncpg.Connection,
    *,
    order_id: str,
    kind: str,
    user_id: str | None,
    user_email: str | None,
    provider: str | None,
) -> None:
    row: dict[str, Any] = {
        "order_id": order_id,
        "kind": kind,
        "user_id": user_id,
        "user_email": user_email,
        "provider": provider,
        "status": "succeeded",  # recomputed from the domains below
    }
    await _upsert(
        conn, orders, [row], key=("order_id",), authoritative=False, override="keep_status"
    )


async def set_domain_outcomes(
    conn: asyncpg.Connection, order_id: str, rows: list[dict[str, Any]], *, succeeded: bool
) -> None:
    """Record each domain's outcome, then derive the order's status from all its domains."""
    status = "succeeded" if succeeded else "failed"
    rows = _unique(
        (
            {"order_id": order_id, "reason": None, "subscription_id": None, **row, "status": status}
            for row in rows
        ),
        "domain",
    )
    await _upsert(
        conn,
        order_domains,
        rows,
        key=("order_id", "domain"),
        authoritative=False,
        override="domain_succeeded" if succeeded else "domain_failed",
    )
    await _order_status_statement().execute(conn, {"status_order_id": order_id})


@lru_cache(maxsize=1)
def _order_status_statement() -> Compiled:
    """An order's status, derived from all of its domains' outcomes."""
    od = order_domains.c
    order_id = bindparam("status_order_id", type_=Text)
    derived = (
        select(
            case(
                (func.bool_and(od.status == "succeeded"), "succeeded"),
                (func.bool_and(od.status == "failed"), "failed"),
                else_="partially_failed",
            )
        )
        .where(od.order_id == order_id)
        .scalar_subquery()
    )
    stmt = (
        update(orders)
        .where(orders.c.order_id == order_id)
        .values(status=derived, updated_at=func.now())
    )
    return compile_statement(stmt)


async def apply_mailbox_order(
    conn: asyncpg.Connection, model: schemas.MailboxOrderSuccess | schemas.MailboxOrderFailed
) -> None:
    data = model.data
    succeeded = isinstance(model, schemas.MailboxOrderSuccess)
    domain = data.domainName if isinstance(data, schemas.MailboxOrderSuccessData) else data.domain
    if data.subscriptionId:
        row: dict[str, Any] = {
            "subscription_id": data.subscriptionId,
            "domain": domain,
            "user_id": data.userId,
            "user_email": data.userEmail,
            "provider": data.workspaceType,
            "source": "standard",
            "order_id": data.orderId,
            "price": data.price,
            "quantity": data.quantity,
        }
        if isinstance(data, schemas.MailboxOrderSuccessData):
            row |= {"domain_id": data.domainId, "expiry_date": data.expiryDate}
        await upsert_subscriptions(conn, [row], succeeded=succeeded, authoritative=succeeded)
    await upsert_order(
        conn,
        order_id=data.orderId,
        kind="mailbox",
        user_id=data.userId,
        user_email=data.userEmail,
        provider=data.workspaceType,
    )
    outcome: dict[str, Any] = {"domain": domain, "subscription_id": data.subscriptionId}
    if isinstance(data, schemas.MailboxOrderFailedData):
        outcome["reason"] = data.reason
    await set_domain_outcomes(conn, data.orderId, [outcome], succeeded=succeeded)


def _credentials(
    vault: Vault, box: schemas.CreatedMailbox | schemas.PrewarmedMailbox
) -> dict[str, Any]:
    return {
        "password_encrypted": vault.encrypt_text(box.password),
        "app_password_encrypted": vault.encrypt_text(box.appPassword),
        "authenticator_secret_encrypted": vault.encrypt_text(box.authenticatorSecret),
    }


async def apply_mailbox_created(
    conn: asyncpg.Connection, model: schemas.MailboxCreated, vault: Vault
) -> None:
    data, box = model.data, model.data.mailboxDetails
    subscription = {
        "subscription_id": data.subscriptionId,
        "domain": data.domain,
        "user_id": data.userId,
        "user_email": data.userEmail,
        "provider": data.workspaceType,
        "source": "standard",
        "order_id": data.orderId,
        "expiry_date": box.expiryDate,
    }
    await upsert_subscriptions(conn, [subscription], succeeded=True, authoritative=False)
    mailbox = {
        "mailbox_id": box.mailboxId,
        "subscription_id": data.subscriptionId,
        "domain": data.domain,
        "email": box.email,
        "first_name": box.firstName,
        "last_name": box.lastName,
        "user_name": box.userName,
        "profile_picture": box.profilePicture,
        "is_admin": box.isAdmin,
        "provider": data.workspaceType,
        "source": "standard",
        "user_id": data.userId,
        "user_email": data.userEmail,
        "order_id": data.orderId,
        "creation_time": box.creationTime,
        "expiry_date": box.expiryDate,
        "price": data.price,
        "final_url": data.finalUrl,
        **_credentials(vault, box),
    }
    await upsert_mailboxes(conn, [mailbox])


async def apply_mailbox_updated(
    conn: asyncpg.Connection, model: schemas.MailboxUpdated, *, version: str
) -> None:
    """Apply only the given fields, each only if this update outranks the one that set it."""
    data = model.data
    given = {
        field: getattr(data.updatedFields, field)
        for field in UPDATABLE_FIELDS
        if field in data.updatedFields.model_fields_set
    }
    row: dict[str, Any] = {
        "mailbox_id": data.mailboxId,
        "domain": data.domain,
        "email": data.email,
        "user_id": data.userId,
        "user_email": data.userEmail,
        "provider": data.workspaceType,
        **{UPDATABLE_FIELDS[f]: value for f, value in given.items()},
        "field_versions": {f: version for f in given},
    }
    await _update_statement(tuple(row)).execute(conn, row | {"version": version})


@lru_cache(maxsize=32)
def _update_statement(columns: tuple[str, ...]) -> Compiled:
    """Upsert for mailbox.updated: each field is taken only if this delivery's version
    outranks the one that last set it; identity fields only fill in."""
    stmt = insert(mailboxes)
    new, old = stmt.excluded, mailboxes.c
    version = bindparam("version", type_=Text).collate("C")
    set_: dict[str, Any] = {
        c: func.coalesce(old[c], new[c])
        for c in ("domain", "email", "user_id", "user_email", "provider")
    }
    versions: ColumnElement[Any] = old.field_versions
    fields = [f for f, column in UPDATABLE_FIELDS.items() if column in columns]
    for field in fields:
        current = func.coalesce(old.field_versions[field].astext, "").collate("C")
        column = UPDATABLE_FIELDS[field]
        set_[column] = case((current < version, new[column]), else_=old[column])
        versions = versions.op("||")(
            func.jsonb_build_object(field, func.greatest(current, version))
        )
    set_["field_versions"] = type_coerce(versions, JSONB)
    set_["updated_at"] = func.now()
    return compile_statement(
        stmt.on_conflict_do_update(index_elements=["mailbox_id"], set_=set_), columns
    )


async def apply_prewarmup_success(
    conn: asyncpg.Connection, model: schemas.PrewarmupOrderSuccess, vault: Vault
) -> None:
    data = model.data
    await upsert_order(
        conn,
        order_id=data.orderId,
        kind="prewarmup",
        user_id=data.userId,
        user_email=data.userEmail,
        provider=data.serviceProvider,
    )
    subs: list[dict[str, Any]] = []
    boxes: list[dict[str, Any]] = []
    for group in data.mailboxDetails:
        expiries = [b.expiryDate for b in group.preWarmedUpMailboxes if b.expiryDate]
        subs.append(
            {
                "subscription_id": group.subscriptionId,
                "domain": group.domain,
                "user_id": data.userId,
                "user_email": data.userEmail,
                "provider": data.serviceProvider,
                "source": "prewarmed",
                "order_id": data.orderId,
                "expiry_date": max(expiries, default=None),
                "quantity": len(group.preWarmedUpMailboxes),
            }
        )
        boxes.extend(_prewarmed_row(vault, data, group, box) for box in group.preWarmedUpMailboxes)
    await upsert_subscriptions(conn, subs, succeeded=True, authoritative=True)
    await upsert_mailboxes(conn, boxes)
    outcomes = [
        {"domain": g.domain, "subscription_id": g.subscriptionId} for g in data.mailboxDetails
    ]
    await set_domain_outcomes(conn, data.orderId, outcomes, succeeded=True)


def _prewarmed_row(
    vault: Vault,
    data: schemas.PrewarmupOrderSuccessData,
    group: schemas.PrewarmedDomain,
    box: schemas.PrewarmedMailbox,
) -> dict[str, Any]:
    return {
        "mailbox_id": box.mailboxId,
        "subscription_id": group.subscriptionId,
        "domain": group.domain,
        "email": box.email,
        "first_name": box.firstName,
        "last_name": box.lastName,
        "user_name": None,
        "profile_picture": box.profilePicture,
        "is_admin": box.isAdmin,
        "provider": data.serviceProvider,
        "source": "prewarmed",
        "user_id": data.userId,
        "user_email": data.userEmail,
        "order_id": data.orderId,
        "warming_up_from": box.warmingUpFrom,
        "expiry_date": box.expiryDate,
        **_credentials(vault, box),
    }


async def apply_prewarmup_failed(
    conn: asyncpg.Connection, model: schemas.PrewarmupOrderFailed
) -> None:
    data = model.data
    await upsert_order(
        conn,
        order_id=data.orderId,
        kind="prewarmup",
        user_id=data.userId,
        user_email=data.userEmail,
        provider=data.serviceProvider,
    )
    outcomes = [{"domain": f.domain, "reason": f.reason} for f in data.failedOrders]
    await set_domain_outcomes(conn, data.orderId, outcomes, succeeded=False)


async def apply(
    conn: asyncpg.Connection, model: schemas.HandledEvent, *, vault: Vault, version: str
) -> None:
    """Apply one validated event's effects inside the caller's transaction."""
    match model:
        case schemas.MailboxOrderSuccess() | schemas.MailboxOrderFailed():
            await apply_mailbox_order(conn, model)
        case schemas.MailboxCreated():
            await apply_mailbox_created(conn, model, vault)
        case schemas.MailboxUpdated():
            await apply_mailbox_updated(conn, model, version=version)
        case schemas.PrewarmupOrderSuccess():
            await apply_prewarmup_success(conn, model, vault)
        case schemas.PrewarmupOrderFailed():
            await apply_prewarmup_failed(conn, model)
