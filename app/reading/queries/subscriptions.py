"""Subscriptions: one per domain, with their mailbox count and their domain's registrar state."""

from typing import Any, Literal

from pydantic import (
    Field,
)
from sqlalchemy import (
    Select,
    func,
    or_,
    select,
    true,
)
from sqlalchemy.sql.elements import ColumnElement

from app.errors import NotFound
from app.models import (
    domains,
    mailboxes,
    subscriptions,
)
from app.reading import resources
from app.reading.queries.counts import counts_by
from app.reading.queries.mailboxes import mailbox_select
from app.reading.queries.paging import (
    Ident,
    ListQuery,
    Search,
    UtcTime,
    apply_filters,
    fetch_page,
    filter_values,
)
from app.reading.reader import Reader


def mailbox_count(
    subscription_id: ColumnElement[Any], order_id: ColumnElement[Any] | None = None
) -> Any:
    """A subscription's mailboxes; with `order_id`, only those that order brought."""
    stmt = select(func.count()).where(mailboxes.c.subscription_id == subscription_id)
    if order_id is not None:
        stmt = stmt.where(mailboxes.c.order_id == order_id)
    return stmt.scalar_subquery().label("mailbox_count")


class SubscriptionQuery(ListQuery):
    q: Search | None = Field(
        None,
        description="Case-insensitive substring of the domain, subscriptionId or user email; "
        "3 to 100 characters, 3 letters or digits in a row among them",
    )
    domain: Ident | None = None
    user_id: Ident | None = None
    user_email: Ident | None = None
    provider: resources.Provider | None = None
    source: Literal["standard", "prewarmed"] | None = None
    status: Literal["active", "failed"] | None = None
    subscription_status: resources.SubscriptionStatus | None = None
    expires_before: UtcTime | None = Field(None, description="ISO 8601; no offset means UTC")
    updated_since: UtcTime | None = Field(None, description="ISO 8601; no offset means UTC")


def subscription_select() -> Select[Any]:
    """Subscriptions with their mailbox count and their domain's registrar state (by the
    domain's ID, else its name)."""
    s, d = subscriptions.c, domains.c
    rank = func.domain_rank(d.status)  # alembic/versions/0009_merge_functions.py
    domain = (
        select(d.status, d.expiry_date)
        .where(or_(d.domain_id == s.domain_id, d.name == s.domain))
        .order_by(d.expiry_date.desc().nulls_last(), rank.desc().nulls_last(), d.version.desc())
        .limit(1)
        .lateral("domain")
    )
    visible = [c for c in subscriptions.c if c.name not in ("quantity", "lifecycle_quantity")]
    return select(
        *visible,
        func.coalesce(s.lifecycle_quantity, s.quantity).label("quantity"),
        mailbox_count(s.subscription_id),
        domain.c.status.label("domain_status"),
        domain.c.expiry_date.label("domain_expiry_date"),
    ).select_from(subscriptions.outerjoin(domain, true()))


async def list_subscriptions(
    conn: Reader, query: SubscriptionQuery
) -> resources.Page[resources.Subscription]:
    filters = filter_values(query)
    expires_before = filters.pop("expires_before")
    stmt = apply_filters(subscription_select(), subscriptions, filters)
    if expires_before is not None:
        stmt = stmt.where(subscriptions.c.expiry_date < expires_before)
    rows, cursor = await fetch_page(conn, stmt, subscriptions, query)
    return resources.Page(
        items=[resources.Subscription.model_validate(r._asdict()) for r in rows], next_cursor=cursor
    )


async def get_subscription(
    conn: Reader, subscription_id: str
) -> resources.SubscriptionWithMailboxes:
    stmt = subscription_select().where(subscriptions.c.subscription_id == subscription_id)
    row = (await conn.execute(stmt)).first()
    if row is None:
        raise NotFound()
    boxes = await conn.execute(
        mailbox_select()
        .where(mailboxes.c.subscription_id == subscription_id)
        .order_by(mailboxes.c.id)
    )
    return resources.SubscriptionWithMailboxes.model_validate(
        {
            **row._mapping,
            "mailboxes": [resources.Mailbox.model_validate(b._asdict()) for b in boxes],
        }
    )


async def count_by_status(conn: Reader) -> dict[str, int]:
    """Subscriptions per lifecycle status (`unknown` where the sender never said)."""
    return await counts_by(conn, subscriptions, "subscription_status")
