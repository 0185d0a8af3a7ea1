"""Subscriptions: one per domain, with their mailbox count and their domain's registrar state."""

from typing import Any, Literal

from pydantic import (
    Field,
)
from sqlalchemy import (
    Select,
    func,
    literal_column,
    or_,
    select,
    text,
    true,
    union,
)
from sqlalchemy.sql.elements import ColumnElement

from app.errors import NotFound
from app.models import (
    EPOCH,
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
    contains,
    fetch_page,
    filter_values,
    matching,
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
    expires_before, user_email = filters.pop("expires_before"), filters.pop("user_email")
    stmt = apply_filters(subscription_select(), subscriptions, filters, paged=True)
    if user_email is not None:
        # exactly that email, read from the index of emails in any case (migration 0031)
        lower = func.lower(subscriptions.c.user_email) == func.lower(user_email)
        stmt = stmt.where(lower, subscriptions.c.user_email == user_email)
    if expires_before is not None:
        # the same bound on the renews-at expression (the expiry date where there is one):
        # its index (ix_subscriptions_renews_at) serves the filter (migration 0024)
        renews_at = func.coalesce(subscriptions.c.expiry_date, literal_column(EPOCH))
        stmt = stmt.where(subscriptions.c.expiry_date < expires_before, renews_at < expires_before)
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


# What a customer pays a month for the subscriptions still running (not EXPIRED or
# CANCELLED): each one's price per mailbox times its quantity, else its mailboxes stored.
CUSTOMER = text(
    """SELECT count(*) AS subscriptions, max(s.user_email) AS user_email,
        sum(coalesce(s.lifecycle_quantity, s.quantity,
            (SELECT count(*) FROM mailboxes m WHERE m.subscription_id = s.subscription_id)))
            AS mailboxes_billed,
        sum(s.price * coalesce(s.lifecycle_quantity, s.quantity,
            (SELECT count(*) FROM mailboxes m WHERE m.subscription_id = s.subscription_id)))
            AS monthly_cost,
        count(*) FILTER (WHERE s.price IS NULL) AS unknown_cost
    FROM subscriptions s
    WHERE s.user_id = :user_id
        AND coalesce(s.subscription_status, 'ACTIVE') NOT IN ('EXPIRED', 'CANCELLED')"""
)


async def customer_cost(conn: Reader, user_id: str) -> Any:
    """The customer's running subscriptions: how many, mailboxes billed, monthly cost of
    those whose price is known, and how many have none (unknown, not counted as 0)."""
    return (await conn.execute(CUSTOMER.bindparams(user_id=user_id))).one()


async def count_of_user(conn: Reader, user_id: str) -> int:
    stmt = select(func.count()).where(subscriptions.c.user_id == user_id)
    count: int = (await conn.execute(stmt)).scalar_one()
    return count


async def customers_matching(conn: Reader, q: str, limit: int = 5) -> list[Any]:
    """Customers (userId, email) whose userId is `q` or whose email holds it, with their
    mailbox count: a mailbox search for a customer finds them."""
    s = subscriptions.c
    by_email = (
        select(s.user_id, func.max(s.user_email).label("user_email"))
        .where(matching(subscriptions, q), s.user_email.ilike(contains(q)))
        .where(s.user_id.is_not(None))
        .group_by(s.user_id)
        .limit(limit)
    )
    by_id = (
        select(s.user_id, func.max(s.user_email).label("user_email"))
        .where(s.user_id == q)
        .group_by(s.user_id)
    )
    found = union(by_id, by_email).subquery()
    boxes = (
        select(func.count())
        .where(mailboxes.c.user_id == found.c.user_id)
        .scalar_subquery()
        .label("mailboxes")
    )
    stmt = select(found.c.user_id, found.c.user_email, boxes).order_by(found.c.user_id)
    return list((await conn.execute(stmt.limit(limit), search=True)).all())
