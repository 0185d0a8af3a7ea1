"""Which domains failed, when, why, and for which order and customer: the orders' failed
domains as one list, with a date range, and as a CSV."""

from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel
from sqlalchemy import Select, func, null, or_, select, union_all

from app.models import order_domains, orders
from app.reading.exports import BOM, csv_text, neutralise
from app.reading.reader import Reader

SHOWN = 100  # on the page; the CSV holds every one
CSV_ROWS = 100_000  # a CSV's bound: far beyond any real range, short of holding the pool
CSV_COLUMNS = [
    ("failed_at", "failed_at"),
    ("domain", "domain"),
    ("reason", "reason"),
    ("order_id", "order_id"),
    ("kind", "kind"),
    ("order_status", "order_status"),
    ("domain_status", "status"),
    ("user_id", "user_id"),
    ("user_email", "user_email"),
    ("subscription_id", "subscription_id"),
]


class FailedDomainQuery(BaseModel):
    """From and to are days (UTC), both included: `from=to=yesterday` is yesterday."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    kind: Literal["mailbox", "prewarmup"] | None = None
    from_: date | None = Field(None, alias="from")
    to: date | None = None
    user_id: str | None = Field(None, min_length=1, max_length=256, pattern=r"^[^\x00]+$")

    @model_validator(mode="after")
    def in_order(self) -> "FailedDomainQuery":
        if self.from_ and self.to and self.to < self.from_:
            raise ValueError("`to` is before `from`")
        return self

    def bounds(self) -> tuple[datetime | None, datetime | None]:
        start = datetime.combine(self.from_, time(), UTC) if self.from_ else None
        end = datetime.combine(self.to + timedelta(days=1), time(), UTC) if self.to else None
        return start, end


def filtered(stmt: Select[Any], at: Any, query: FailedDomainQuery) -> Select[Any]:
    start, end = query.bounds()
    if start:
        stmt = stmt.where(at >= start)
    if end:
        stmt = stmt.where(at < end)
    if query.kind:
        stmt = stmt.where(orders.c.kind == query.kind)
    if query.user_id:
        stmt = stmt.where(orders.c.user_id == query.user_id)
    return stmt


def halves(query: FailedDomainQuery) -> tuple[Select[Any], Select[Any]]:
    """Each failed domain of an order, and each order that failed as a whole without naming
    a domain (its domain is None). A domain's failure stays on record when it later
    succeeds (its reason is kept): such a domain is listed too, with its status
    `succeeded`. Each filter is applied inside both halves, so each reads its own index.
    An order failed as a whole has a reason (merge.DERIVE_ORDER fails an order without
    domains only for its failure_reason): so that half reads a partial index of those
    alone (ix_orders_failed_whole_updated_at), not every failed order's row."""
    d, o = order_domains.c, orders.c
    order_columns = (
        o.kind,
        o.status.label("order_status"),
        o.user_id,
        o.user_email,
        o.failure_reason,
    )
    domains: Select[Any] = select(
        d.updated_at.label("failed_at"),
        d.domain,
        d.reason,
        d.status,
        d.order_id,
        d.subscription_id,
        *order_columns,
    ).join(orders, o.order_id == d.order_id)
    domains = filtered(
        domains.where(or_(d.status == "failed", d.reason.is_not(None))), d.updated_at, query
    )
    named = select(order_domains.c.id).where(d.order_id == o.order_id).exists()
    whole: Select[Any] = select(
        o.updated_at.label("failed_at"),
        null().label("domain"),
        o.failure_reason.label("reason"),
        o.status,
        o.order_id,
        null().label("subscription_id"),
        *order_columns,
    ).where(o.status == "failed", o.failure_reason.is_not(None), ~named)
    return domains, filtered(whole, o.updated_at, query)


def counts(query: FailedDomainQuery) -> tuple[Select[Any], Select[Any]]:
    """How many rows each half holds; the domains' without the join to their orders when
    no filter needs it (the partial index alone answers)."""
    domains, whole = (select(func.count()).select_from(h.subquery()) for h in halves(query))
    if not query.kind and not query.user_id:
        d = order_domains.c
        failed = select(func.count()).where(or_(d.status == "failed", d.reason.is_not(None)))
        domains = filtered(failed, d.updated_at, query)
    return domains, whole


def failed_select(query: FailedDomainQuery) -> Select[Any]:
    return select(union_all(*halves(query)).subquery("failed"))


def latest_first(stmt: Select[Any]) -> Select[Any]:
    return stmt.order_by(stmt.selected_columns.failed_at.desc())


async def failed_domains(conn: Reader, query: FailedDomainQuery) -> tuple[int, list[Any]]:
    """How many, and the latest SHOWN of them: the latest SHOWN of each half, merged (each
    half reads its time index backwards and stops, which a sort over their union would
    not)."""
    rows: list[Any] = []
    total = 0
    for half, counted in zip(halves(query), counts(query), strict=True):
        latest = (await conn.execute(latest_first(half).limit(SHOWN))).all()
        rows += latest
        total += len(latest) if len(latest) < SHOWN else (await conn.execute(counted)).scalar_one()
    rows.sort(key=lambda row: row.failed_at, reverse=True)
    return total, rows[:SHOWN]


def reason_of(row: Any) -> str:
    return row.reason or row.failure_reason or ""


async def failed_domains_csv(conn: Reader, query: FailedDomainQuery, *, bom: bool) -> str:
    """Every failed domain the filters choose, the latest first, as a CSV (cells a
    spreadsheet would run as formulas made text)."""
    rows = (await conn.execute(latest_first(failed_select(query)).limit(CSV_ROWS))).all()
    lines = [[title for title, _ in CSV_COLUMNS]]
    if rows:
        # cells by position, found once: a dictionary of each row was most of the time
        fields = rows[0]._fields
        at = [fields.index(key) for _, key in CSV_COLUMNS[3:]]
        for row in rows:
            values = tuple(row)
            lines.append(
                [
                    row.failed_at.isoformat(),
                    "" if row.domain is None else neutralise(row.domain),
                    neutralise(reason_of(row)),
                    *["" if (v := values[i]) is None else neutralise(str(v)) for i in at],
                ]
            )
    return (BOM if bom else "") + csv_text(lines)
