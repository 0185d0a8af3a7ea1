"""Orders, each with its domains' outcomes."""

from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal

from pydantic import Field, model_validator
from sqlalchemy import (
    func,
    select,
)

from app.errors import NotFound
from app.models import (
    order_domains,
    orders,
)
from app.reading import resources
from app.reading.queries.paging import Ident, ListQuery, apply_filters, fetch_page, filter_values
from app.reading.queries.subscriptions import mailbox_count
from app.reading.reader import Reader

TROUBLE_DAYS = 7


class OrderQuery(ListQuery):
    status: Literal["succeeded", "failed", "partially_failed"] | None = None
    kind: Literal["mailbox", "prewarmup"] | None = None
    user_id: Ident | None = None


async def with_domains(conn: Reader, rows: Sequence[Any]) -> list[resources.Order]:
    """Attach each order's domains, fetched for the whole page in one query."""
    ids = [row.order_id for row in rows]
    stmt = (
        select(
            order_domains,
            mailbox_count(order_domains.c.subscription_id, order_domains.c.order_id),
        )
        .where(order_domains.c.order_id.in_(ids))
        .order_by(order_domains.c.domain)
    )
    domains: dict[str, list[resources.OrderDomain]] = {order_id: [] for order_id in ids}
    for domain in await conn.execute(stmt):
        domains[domain.order_id].append(resources.OrderDomain.model_validate(domain._asdict()))
    return [
        resources.Order.model_validate({**row._mapping, "domains": domains[row.order_id]})
        for row in rows
    ]


class OrderPageQuery(OrderQuery):
    """The dashboard's orders: the API's filters, and the days (UTC, both included) the
    order was placed in."""

    from_: date | None = Field(None, alias="from")
    to: date | None = None

    @model_validator(mode="after")
    def in_order(self) -> "OrderPageQuery":
        if self.from_ and self.to and self.to < self.from_:
            raise ValueError("`to` is before `from`")
        return self

    def placed(self) -> list[Any]:
        where = []
        if self.from_:
            where.append(orders.c.created_at >= datetime.combine(self.from_, time(), UTC))
        if self.to:
            end = datetime.combine(self.to + timedelta(days=1), time(), UTC)
            where.append(orders.c.created_at < end)
        return where


async def list_orders(conn: Reader, query: OrderQuery) -> resources.Page[resources.Order]:
    filters = filter_values(query)
    stmt = select(orders)
    if isinstance(query, OrderPageQuery):
        del filters["from_"], filters["to"]
        stmt = stmt.where(*query.placed())
    rows, cursor = await fetch_page(conn, apply_filters(stmt, orders, filters), orders, query)
    return resources.Page(items=await with_domains(conn, rows), next_cursor=cursor)


async def get_order(conn: Reader, order_id: str) -> resources.Order:
    row = (await conn.execute(select(orders).where(orders.c.order_id == order_id))).first()
    if row is None:
        raise NotFound()
    return (await with_domains(conn, [row]))[0]


async def troubled_orders(conn: Reader, limit: int) -> tuple[Any, dict[str, int]]:
    """Failed and partially failed orders of the last 7 days: the latest `limit`, and how
    many of each status there are."""
    recent = orders.c.updated_at >= func.now() - timedelta(days=TROUBLE_DAYS)
    troubled = orders.c.status.in_(["failed", "partially_failed"])
    stmt = select(orders).where(troubled, recent).order_by(orders.c.updated_at.desc())
    rows = (await conn.execute(stmt.limit(limit))).all()
    counted = select(orders.c.status, func.count()).where(troubled, recent)
    return rows, {status: n for status, n in await conn.execute(counted.group_by(orders.c.status))}


async def count_with_status(conn: Reader, status: str) -> int:
    stmt = select(func.count()).select_from(orders).where(orders.c.status == status)
    count: int = (await conn.execute(stmt)).scalar_one()
    return count


async def domains_of_subscription(conn: Reader, subscription_id: str) -> Any:
    """The order_domains rows that name a subscription, the latest first."""
    stmt = select(order_domains).where(order_domains.c.subscription_id == subscription_id)
    return (await conn.execute(stmt.order_by(order_domains.c.id.desc()))).all()


async def count_of_user(conn: Reader, user_id: str) -> int:
    stmt = select(func.count()).where(orders.c.user_id == user_id)
    count: int = (await conn.execute(stmt)).scalar_one()
    return count
