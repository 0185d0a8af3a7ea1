"""Database tables. Provider IDs are the unique keys; `id` orders rows for cursors."""

from datetime import datetime
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, declared_attr, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Money = Numeric(14, 4)
Timestamp = DateTime(timezone=True)


# What `q` searches (case-insensitive substring, reading/queries/paging.py), one text per
# row. Its trigram index is on a copy of it in a side table (mailbox_search,
# subscription_search, migration 0026), kept by the search indexer
# (app/operations/search_index.py) off the delivery path.
MAILBOX_SEARCH = (
    "coalesce(email, '') || ' ' || coalesce(first_name, '') || ' ' || coalesce(last_name, '')"
    " || ' ' || coalesce(domain, '') || ' ' || mailbox_id"
)
SUBSCRIPTION_SEARCH = (
    "coalesce(domain, '') || ' ' || subscription_id || ' ' || coalesce(user_email, '')"
)
# The columns of each search text: a write that changes one sets `search_written_at`
# (SearchedMixin); the key columns never change.
SEARCH_COLUMNS = {
    "mailboxes": ("email", "first_name", "last_name", "domain"),
    "subscriptions": ("domain", "user_email"),
}


EPOCH = "'epoch'::timestamptz"
RENEWS_AT = f"coalesce(expiry_date, {EPOCH})"


# A block range of the table holds rows of about one time: a BRIN index finds the rows
# whose search text was written since the search indexer's mark at no b-tree entry per
# row (migration 0028).
CHANGED_PAGES_PER_RANGE = 16


def changed_index(table: str) -> Index:
    """search_written_at, by block range: the rows the search indexer may not have copied."""
    return Index(
        f"ix_{table}_search_written_at",
        "search_written_at",
        postgresql_using="brin",
        postgresql_with={"pages_per_range": CHANGED_PAGES_PER_RANGE, "autosummarize": "on"},
    )


# The IDs a detail page finds its events by (queries/events.py, events_about). Every
# delivery opens each of these indexes and builds its expressions anew (a jsonb path is a
# few thousand instructions to build and run, issue 31: docs/benchmark.md), so there are
# three, and the two a mailbox.created enters have no predicate (an event without the ID
# enters with a NULL key, which no read asks for). The mailbox an event is about is the one
# payloads.MailboxStateData reads: data.mailboxId, else data.mailboxDetails.mailboxId.
# Only events without a subscriptionId enter the mailbox's index (mailbox.updated, the
# warmup events); a mailbox.created always names its subscription, and a mailbox's are
# found among that subscription's events.
ABOUT_ORDER = "(payload #>> '{data,orderId}')"
ABOUT_SUBSCRIPTION = "(payload #>> '{data,subscriptionId}')"
ABOUT_MAILBOX = (
    "coalesce(payload #>> '{data,mailboxId}', payload #>> '{data,mailboxDetails,mailboxId}')"
)


def about_indexes() -> tuple[Index, ...]:
    return (
        Index("ix_events_about_order", text(ABOUT_ORDER), text("id")),
        Index("ix_events_about_subscription", text(ABOUT_SUBSCRIPTION), text("id")),
        Index(
            "ix_events_about_mailbox",
            text(f"({ABOUT_MAILBOX})"),
            text("id"),
            postgresql_where=text(f"{ABOUT_SUBSCRIPTION} IS NULL"),
        ),
    )


def keyset_indexes(table: str, *columns: str) -> tuple[Index, ...]:
    """(filter column, id) indexes: a filtered page ordered by id is one index range scan."""
    return tuple(Index(f"ix_{table}_{column}_id", column, "id") for column in columns)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Listed:
    """A table the read API pages through. `created_xid` is the inserting transaction, so
    a walk with a cursor returns exactly the rows committed before it began
    (reading/queries/paging.py). txid_current() is pg_current_xact_id() (epoch and xid)
    as a bigint already: no text round trip for each row written (migration 0030)."""

    created_xid: Mapped[int] = mapped_column(BigInteger, server_default=text("txid_current()"))


class TimestampMixin:
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        Timestamp, server_default=func.now(), onupdate=func.now()
    )


class SearchedMixin:
    """`search_written_at`: the start of the transaction that last wrote the row's search
    text (SEARCH_COLUMNS; merge.Upsert sets it only when they change, app/operations/
    privacy.py on erasure). Unlike updated_at it is the same after a write that changes
    no searched column, so that write can be a HOT update: no index entry at all."""

    search_written_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


class Event(Listed, Base):
    """One row per distinct (eventId, content): dedupe lives in the unique constraint."""

    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("event_id", "content_hash", name="uq_events_event_id_content_hash"),
        Index("ix_events_event_type_id", "event", "id"),
        # an ignored event's page: a page of processed ones walks the primary key (0024)
        Index(
            "ix_events_status_id", "status", "id", postgresql_where=text("status <> 'processed'")
        ),
        Index("ix_events_conflict_id", "id", postgresql_where=text("conflict")),
        Index("ix_events_first_received_at", "first_received_at"),  # the dashboard's 24 h
        # the overview's failed signatures (queries/right_now.py): those rows only
        Index(
            "ix_events_failed_signature_at",
            "first_received_at",
            postgresql_where=text("signature IN ('invalid', 'stale')"),
        ),
        # the last delivery (queries/counts.py): only rows whose last differs from the first
        Index(
            "ix_events_last_received_at",
            "last_received_at",
            postgresql_where=text("deliveries > 1"),
        ),
        *about_indexes(),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    event_id: Mapped[str] = mapped_column(Text)
    event: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    content_hash: Mapped[bytes] = mapped_column(LargeBinary)
    deliveries: Mapped[int] = mapped_column(Integer, default=1)
    conflict: Mapped[bool] = mapped_column(Boolean, default=False)
    signature: Mapped[str] = mapped_column(String(16))
    signature_form: Mapped[str | None] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    # None once BODY_RETENTION_DAYS have passed (processed events): the redacted copy stays.
    body_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary)
    first_received_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    last_received_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    # When the event happened, for "the later edit wins": the signed cmr-x-timestamp when the
    # signature was valid, else the first receipt (kept through the spool and replay).
    event_time: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    warnings: Mapped[list[str]] = mapped_column(JSONB, server_default="[]")
    spooled: Mapped[bool] = mapped_column(Boolean, server_default="false")


class EventKey(Base):
    """One row per eventId: deliveries of one eventId wait for each other on it, and it
    knows whether two contents were seen (see app/recording/record.py)."""

    __tablename__ = "event_keys"

    event_id: Mapped[str] = mapped_column(Text, primary_key=True)
    content_hash: Mapped[bytes] = mapped_column(LargeBinary)  # the first content seen
    conflict: Mapped[bool] = mapped_column(Boolean, server_default="false")


class RejectedDelivery(Listed, Base):
    """A delivery we refused as malformed; kept encrypted so it can be replayed after a fix."""

    __tablename__ = "rejected_deliveries"
    __table_args__ = (
        *keyset_indexes("rejected_deliveries", "event_id"),
        Index("ix_rejected_deliveries_received_at", "received_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    reason: Mapped[str] = mapped_column(String(32))
    event: Mapped[str | None] = mapped_column(Text)
    event_id: Mapped[str | None] = mapped_column(Text)
    errors: Mapped[list[dict[str, Any]]] = mapped_column(JSONB)
    signature: Mapped[str] = mapped_column(String(16))
    body_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary)
    received_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    replayed_at: Mapped[datetime | None] = mapped_column(Timestamp)
    replayed_event_id: Mapped[int | None] = mapped_column(BigInteger)


class Subscription(Listed, TimestampMixin, SearchedMixin, Base):
    """One domain's mailboxes. `quantity`, `order_id` and `price` are derived from the
    subscription's succeeded orders; the lifecycle columns from subscription.* events
    (`lifecycle_version` is the winning event's time, see app/recording/merge.py)."""

    __tablename__ = "subscriptions"
    # No (provider, id) nor (source, id), two values each: a page of either walks the
    # primary key and keeps about every other row; a failed subscription's page, or a
    # lifecycle status's, reads an index of those rows only; `expiresBefore` reads the
    # renewals' (renews at, id) (migration 0024: what each index costs a delivery).
    # A customer's rows, by userId or by email (exact for the list, any case for the
    # renewals: the list asks both), are one range of one index each, which serves their
    # keyset pages and, sorted, their renewals (migration 0031).
    __table_args__ = keyset_indexes("subscriptions", "domain", "user_id") + (
        Index("ix_subscriptions_lower_user_email_id", text("lower(user_email)"), text("id")),
        Index(
            "ix_subscriptions_status_id",
            "status",
            "id",
            postgresql_where=text("status <> 'active'"),
        ),
        Index(
            "ix_subscriptions_subscription_status_id",
            "subscription_status",
            "id",
            postgresql_where=text("subscription_status IS NOT NULL"),
        ),
        changed_index("subscriptions"),
        # renewals.PAGE's order (and `expiresBefore`): a page of renewals reads only its own rows
        Index("ix_subscriptions_renews_at", text(RENEWS_AT), text("id")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    subscription_id: Mapped[str] = mapped_column(Text, unique=True)
    domain: Mapped[str | None] = mapped_column(Text)
    domain_id: Mapped[str | None] = mapped_column(Text)
    user_id: Mapped[str | None] = mapped_column(Text)
    user_email: Mapped[str | None] = mapped_column(Text)
    provider: Mapped[str | None] = mapped_column(String(16))
    source: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    order_id: Mapped[str | None] = mapped_column(Text)
    expiry_date: Mapped[datetime | None] = mapped_column(Timestamp)
    price: Mapped[Decimal | None] = mapped_column(Money)
    quantity: Mapped[int | None] = mapped_column(Integer)
    subscription_status: Mapped[str | None] = mapped_column(String(16))
    period_start: Mapped[datetime | None] = mapped_column(Timestamp)
    period_end: Mapped[datetime | None] = mapped_column(Timestamp)
    auto_renew: Mapped[bool | None] = mapped_column(Boolean)
    lifecycle_quantity: Mapped[int | None] = mapped_column(Integer)
    lifecycle_version: Mapped[str | None] = mapped_column(Text)
    lifecycle_source: Mapped[str | None] = mapped_column(String(16))
    # The subscription's own renewal outcomes (app/reading/renewals.py, risk renewal_failed)
    renewal_failed_at: Mapped[datetime | None] = mapped_column(Timestamp)
    renewal_failed_period_end: Mapped[datetime | None] = mapped_column(Timestamp)
    renewal_succeeded_at: Mapped[datetime | None] = mapped_column(Timestamp)


class Reconciliation(Base):
    """The report of each `reconcile` run (app/operations/reconcile.py); the API serves the last."""

    __tablename__ = "reconciliations"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    ran_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    report: Mapped[dict[str, Any]] = mapped_column(JSONB)


class Domain(TimestampMixin, Base):
    """A domain's registrar state from domain.* events: one row per domainId, and one per
    name for the events that carry no domainId. A name may have several rows (registered
    again under a new domainId, or heard of by name alone); a subscription shows the winner
    among the rows of its domain_id and its domain name (app/recording/merge.py)."""

    __tablename__ = "domains"
    __table_args__ = (
        Index("ix_domains_name", "name"),
        # merge.DOMAIN_BY_NAME's key: events without a domainId share one row per name
        Index(
            "uq_domains_name_without_id",
            "name",
            unique=True,
            postgresql_where=text("domain_id IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    domain_id: Mapped[str | None] = mapped_column(Text, unique=True)
    name: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str | None] = mapped_column(String(16))
    expiry_date: Mapped[datetime | None] = mapped_column(Timestamp)
    version: Mapped[str | None] = mapped_column(Text)


class Mailbox(Listed, TimestampMixin, SearchedMixin, Base):
    """A mailbox; credentials live only in the *_encrypted columns.

    `field_versions` maps each column set by an edit (mailbox.updated, an export, a warmup
    event) to that event's version (its time, then eventId): a late mailbox.created cannot
    undo an edit, and of two edits the later one wins whatever order they arrive in.
    """

    __tablename__ = "mailboxes"
    # No (provider, id) nor (source, id): two values each, a page of either walks the
    # primary key (migration 0024).
    __table_args__ = keyset_indexes(
        "mailboxes", "subscription_id", "domain", "email", "user_id"
    ) + (
        changed_index("mailboxes"),
        # an order's page, and an order domain's mailboxes counted for incomplete orders
        # (queries/right_now.py) from the index alone
        Index("ix_mailboxes_order_id_id", "order_id", "id", postgresql_include=["subscription_id"]),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    mailbox_id: Mapped[str] = mapped_column(Text, unique=True)
    # No foreign key: every statement that sets it upserts the subscription first, in the
    # same transaction, and subscriptions are never deleted (migration 0012: its check cost
    # a third of a delivery's statement).
    subscription_id: Mapped[str | None] = mapped_column(Text)
    domain: Mapped[str | None] = mapped_column(Text)
    email: Mapped[str | None] = mapped_column(Text)
    first_name: Mapped[str | None] = mapped_column(Text)
    last_name: Mapped[str | None] = mapped_column(Text)
    user_name: Mapped[str | None] = mapped_column(Text)
    profile_picture: Mapped[str | None] = mapped_column(Text)
    is_admin: Mapped[bool | None] = mapped_column(Boolean)
    provider: Mapped[str | None] = mapped_column(String(16))
    source: Mapped[str | None] = mapped_column(String(16))
    user_id: Mapped[str | None] = mapped_column(Text)
    user_email: Mapped[str | None] = mapped_column(Text)
    order_id: Mapped[str | None] = mapped_column(Text)
    creation_time: Mapped[datetime | None] = mapped_column(Timestamp)
    warming_up_from: Mapped[datetime | None] = mapped_column(Timestamp)
    expiry_date: Mapped[datetime | None] = mapped_column(Timestamp)
    price: Mapped[Decimal | None] = mapped_column(Money)
    final_url: Mapped[str | None] = mapped_column(Text)
    # An event's credentials are one token (crypto.Vault.seal, by CREDENTIAL_COLUMNS'
    # names), stored in the column of each credential it carries: the merge rules and
    # erasure still take each credential on its own, for one encryption per mailbox.
    password_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary)
    app_password_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary)
    authenticator_secret_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary)
    warmup_status: Mapped[str | None] = mapped_column(String(16))
    exported_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # Set by `erase`: its credentials and personal fields are gone and stay gone.
    erased_at: Mapped[datetime | None] = mapped_column(Timestamp)
    field_versions: Mapped[dict[str, str]] = mapped_column(JSONB, server_default="{}")


# Each credential's name in a mailbox's sealed token, and its column.
CREDENTIAL_COLUMNS = {
    "password": "password_encrypted",
    "app_password": "app_password_encrypted",
    "authenticator_secret": "authenticator_secret_encrypted",
}


class Order(Listed, TimestampMixin, Base):
    __tablename__ = "orders"
    __table_args__ = keyset_indexes("orders", "status", "kind", "user_id") + (
        Index("ix_orders_updated_at", "updated_at"),  # the overview's last 7 days
        Index("ix_orders_created_at", "created_at"),  # the orders page's date range
        # the failed-domains view's orders failed as a whole (queries/failed_domains.py):
        # read from the index alone (migration 0025)
        Index(
            "ix_orders_failed_whole_updated_at",
            "updated_at",
            postgresql_where=text("status = 'failed' AND failure_reason IS NOT NULL"),
            postgresql_include=[
                "order_id",
                "status",
                "kind",
                "user_id",
                "user_email",
                "failure_reason",
            ],
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    order_id: Mapped[str] = mapped_column(Text, unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    user_id: Mapped[str | None] = mapped_column(Text)
    user_email: Mapped[str | None] = mapped_column(Text)
    provider: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(20))
    # An order-level prewarmup.order.failed (a reason, no failedOrders).
    failure_reason: Mapped[str | None] = mapped_column(Text)


class OrderDomain(TimestampMixin, Base):
    """One domain's outcome within an order. `reason` keeps a reported failure even if the
    domain later (or earlier) succeeded: success wins, the failure stays on record."""

    __tablename__ = "order_domains"
    __table_args__ = (
        UniqueConstraint("order_id", "domain", name="uq_order_domains_order_domain"),
        Index("ix_order_domains_subscription_id", "subscription_id"),  # merge.DERIVE_ORDER
        # incomplete orders (queries/right_now.py) read each domain's outcome from it alone
        Index(
            "ix_order_domains_order_id_outcome",
            "order_id",
            postgresql_include=["subscription_id", "status", "quantity"],
        ),
        # the dashboard's failed domains, latest first (app/reading/queries/failed_domains.py)
        Index(
            "ix_order_domains_failed_updated_at",
            "updated_at",
            postgresql_where=text("status = 'failed' OR reason IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    order_id: Mapped[str] = mapped_column(Text, ForeignKey("orders.order_id"))
    domain: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    subscription_id: Mapped[str | None] = mapped_column(Text)
    quantity: Mapped[int | None] = mapped_column(Integer)
    price: Mapped[Decimal | None] = mapped_column(Money)
    # The success's version (time, then eventId): a subscription's first order is the earliest.
    succeeded_version: Mapped[str | None] = mapped_column(Text)


class Erasure(Base):
    """Audit trail of `erase --mailbox`: which mailbox, when, and how much was scrubbed."""

    __tablename__ = "erasures"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    mailbox_id: Mapped[str] = mapped_column(Text)
    erased_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    events_scrubbed: Mapped[int] = mapped_column(Integer)
    rejected_scrubbed: Mapped[int] = mapped_column(Integer)


class CredentialRead(Listed, Base):
    """Audit trail of every decrypted-credential read: who (token fingerprint), what, when;
    `export_id` groups the rows of one export (reading/exporting.py streams exactly those)."""

    __tablename__ = "credential_reads"
    __table_args__ = keyset_indexes("credential_reads", "mailbox_id") + (
        Index(
            "ix_credential_reads_export_id_id",
            "export_id",
            "id",
            postgresql_where=text("export_id IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    mailbox_id: Mapped[str] = mapped_column(Text)
    token_fingerprint: Mapped[str] = mapped_column(String(32))
    client_address: Mapped[str | None] = mapped_column(Text)
    read_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    export_id: Mapped[str | None] = mapped_column(Text)


class ServerKey(Base):
    """Keys the server made for itself, encrypted under FERNET_KEYS (app/hashing.py)."""

    __tablename__ = "server_keys"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    key_encrypted: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


class RetentionMark(Base):
    """'events': no processed event with a lower id keeps its stored body (privacy.py)."""

    __tablename__ = "retention_marks"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger)


class UiSession(Base):
    """A dashboard sign-in. The cookie holds a random secret; only its keyed hash is kept
    here, so sign-out (a delete) ends it and a copy of this table opens nothing."""

    __tablename__ = "ui_sessions"

    id_hash: Mapped[bytes] = mapped_column(LargeBinary, primary_key=True)
    token_fingerprint: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    last_seen_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


class OutboundDestination(Base):
    """A destination's state shared by every replica (app/outbound): its circuit and
    whether a 410 disabled it. What it is (URL, format, events) lives in DESTINATIONS_FILE;
    a row is made the first time a dispatcher sees the name."""

    __tablename__ = "outbound_destinations"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    # consecutive failed attempts since the last success; the circuit opens at a threshold
    failures: Mapped[int] = mapped_column(Integer, server_default="0")
    # set while the circuit is open (no message is sent but one probe after a cool-down)
    opened_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # set when the destination answered 410 Gone: nothing more is sent until re-enabled
    disabled_at: Mapped[datetime | None] = mapped_column(Timestamp)
    last_success_at: Mapped[datetime | None] = mapped_column(Timestamp)
    last_failure_at: Mapped[datetime | None] = mapped_column(Timestamp)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


# 'msg_', 16 hex digits of its own sequence, 20 of a random UUID (74 random bits): unique by
# construction (and longer than the 32 hex digits of the ids before it), so no index checks
# it on every insert (migration 0023)
WEBHOOK_ID_SEQUENCE = "outbound_webhook_ids"
NUMBERED_WEBHOOK_ID = (
    f"'msg_' || lpad(to_hex(nextval('{WEBHOOK_ID_SEQUENCE}')), 16, '0')"
    " || substr(replace(gen_random_uuid()::text, '-', ''), 1, 20)"
)


class OutboundMessage(Base):
    """One message for one destination, written in the transaction of its cause.

    `payload` is the body's `data` (never a credential value); a forwarded CMR event's is
    NULL and `event_id` names its stored event instead, whose data the dispatcher builds
    when it sends (app/recording/forwarding.py, migration 0029); `webhook_id` is the same on
    every attempt. `status`: pending (to send at `next_attempt_at`), delivered, or dead
    (the retry schedule is exhausted, or the destination answered 410 to it)."""

    __tablename__ = "outbound_messages"
    __table_args__ = (
        # what the dispatcher claims: due pending messages, oldest first (by id among those
        # due at once, so a claim reads a batch's entries instead of sorting the backlog)
        Index(
            "ix_outbound_messages_due_id",
            "next_attempt_at",
            "id",
            postgresql_where=text("status = 'pending'"),
        ),
        # a destination's messages by status, newest first; its backlog, its oldest pending
        # message (the lowest id) and its dead letters (app/outbound/queries.py)
        Index("ix_outbound_messages_destination_status_id", "destination", "status", "id"),
        CheckConstraint("payload IS NOT NULL OR event_id IS NOT NULL", name="data"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    destination: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(Text)
    webhook_id: Mapped[str] = mapped_column(Text, server_default=text(NUMBERED_WEBHOOK_ID))
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    event_id: Mapped[int | None] = mapped_column(BigInteger)  # events.id: forwarded, by reference
    user_id: Mapped[str | None] = mapped_column(Text)
    # the body's `timestamp`: when what it tells happened
    occurred_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    status: Mapped[str] = mapped_column(String(16), server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(Timestamp, server_default=func.now())
    last_attempt_at: Mapped[datetime | None] = mapped_column(Timestamp)
    last_status: Mapped[int | None] = mapped_column(Integer)  # the HTTP status, if any
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(Timestamp)


class OutboundAttempt(Base):
    """One attempt to send a message: its answer (or why there was none) and latency."""

    __tablename__ = "outbound_attempts"
    __table_args__ = (
        Index("ix_outbound_attempts_message_id", "message_id"),
        Index("ix_outbound_attempts_destination_id", "destination", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    message_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("outbound_messages.id", ondelete="CASCADE")
    )
    destination: Mapped[str] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(Timestamp)
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)


class OutboundState(Base):
    """The state a derived outbound event was last written for, per topic and subject
    (app/outbound/derived.py): an event is written again only when the state changes."""

    __tablename__ = "outbound_states"

    topic: Mapped[str] = mapped_column(Text, primary_key=True)
    subject: Mapped[str] = mapped_column(Text, primary_key=True)
    state: Mapped[str] = mapped_column(Text)
    changed_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


def table(model: type[Base]) -> Table:
    """A model's Core table: the service reads and writes through Core and asyncpg (no
    Session), so this is the one place that reaches past the declarative class."""
    return cast(Table, model.__table__)


class SearchSide:
    """A side table of search texts (migration 0026): a row's text as the search indexer
    last copied it (by its source row's id), with the trigram index `q` reads."""

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    text: Mapped[str] = mapped_column(Text)

    @declared_attr.directive
    def __table_args__(cls) -> tuple[Index]:
        name = f"ix_{cls.__tablename__}_text"  # type: ignore[attr-defined]
        return (
            Index(name, "text", postgresql_using="gin", postgresql_ops={"text": "gin_trgm_ops"}),
        )


class MailboxSearch(SearchSide, Base):
    """A mailbox's MAILBOX_SEARCH text. A search re-checks the mailbox's own text, and reads
    the mailboxes written since the indexer's mark directly (reading/queries/paging.py)."""

    __tablename__ = "mailbox_search"


class SubscriptionSearch(SearchSide, Base):
    """A subscription's SUBSCRIPTION_SEARCH text, as MailboxSearch is a mailbox's."""

    __tablename__ = "subscription_search"


class SearchMark(Base):
    """Per table (mailboxes, subscriptions): every row whose updated_at is before
    `indexed_before` has its current text in the side table."""

    __tablename__ = "search_marks"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    indexed_before: Mapped[datetime] = mapped_column(Timestamp)


class Lease(Base):
    """One runner at a time across workers and replicas, for work of many transactions
    (reconcile): `holder`'s until it releases it or `expires_at` passes
    (app/operations/leases.py)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    holder: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[datetime] = mapped_column(Timestamp)


subscriptions = table(Subscription)
mailboxes = table(Mailbox)
orders = table(Order)
order_domains = table(OrderDomain)
events = table(Event)
domains = table(Domain)
reconciliations = table(Reconciliation)
rejected = table(RejectedDelivery)
credential_reads = table(CredentialRead)
outbound_destinations = table(OutboundDestination)
outbound_messages = table(OutboundMessage)
outbound_attempts = table(OutboundAttempt)
mailbox_search = table(MailboxSearch)
subscription_search = table(SubscriptionSearch)
search_marks = table(SearchMark)
