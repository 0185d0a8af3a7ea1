"""Which domains failed, when, why, and for which order and customer: the orders' failed
domains as one list, with a date range, and as a CSV."""

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel
from sqlalchemy import Select, func, null, or_, select, true, tuple_

from app.models import order_domains, orders
from app.reading.exports import BOM, csv_text, neutralise
from app.reading.reader import Reader

SHOWN = 100  # on the page; the CSV holds every one
CSV_ROWS = 100_000  # a CSV's bound: far beyond any real range
# The CSV's failed domains are read this many a statement, each walking the partial index
# of failed order domains' times from where the last stopped and looking up each row's
# order: one statement for all 6,060 of the scale data was a parallel hash join over all
# 200,000 orders (70-95 ms, 22,000 buffers); and no connection is held between statements
# while the file is sent.
CSV_CHUNK = 2_000
CSV_FIRST = 500  # the first statement's: the file starts as soon as these are written
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


def filtered(
    stmt: Select[Any], at: Any, query: FailedDomainQuery, order: Any = orders.c
) -> Select[Any]:
    start, end = query.bounds()
    if start:
        stmt = stmt.where(at >= start)
    if end:
        stmt = stmt.where(at < end)
    if query.kind:
        stmt = stmt.where(order.kind == query.kind)
    if query.user_id:
        stmt = stmt.where(order.user_id == query.user_id)
    return stmt


def halves(query: FailedDomainQuery, *, walk: bool = False) -> tuple[Select[Any], Select[Any]]:
    """Each failed domain of an order, and each order that failed as a whole without naming
    a domain (its domain is None). A domain's failure stays on record when it later
    succeeds (its reason is kept): such a domain is listed too, with its status
    `succeeded`. Each filter is applied inside both halves, so each reads its own index.
    An order failed as a whole has a reason (merge.DERIVE_ORDER fails an order without
    domains only for its failure_reason): so that half reads a partial index of those
    alone (ix_orders_failed_whole_updated_at), not every failed order's row.

    `walk` (the CSV's chunks): each failed domain's order looked up by its ID (LATERAL,
    LIMIT 1: an order ID is unique), so a walk of the failed domains' time index stops at
    its LIMIT whatever the planner guesses of the rows left (a later chunk, guessed larger,
    was a parallel hash join over every order: 61 ms against 17 ms). Not for a customer's,
    whose orders' own index answers sooner (a lookup for every failed domain: 47 ms
    against 11-20)."""
    d, o = order_domains.c, orders.c
    order_columns = (
        o.kind,
        o.status.label("order_status"),
        o.user_id,
        o.user_email,
        o.failure_reason,
    )
    its: Any = orders.c  # the columns the filters test
    shown: tuple[Any, ...] = order_columns
    joined = order_domains.join(orders, o.order_id == d.order_id)
    if walk and not query.user_id:
        its_order = select(*order_columns).where(o.order_id == d.order_id).limit(1).lateral("o")
        its, shown = its_order.c, tuple(its_order.c)
        joined = order_domains.join(its_order, true())
    domains: Select[Any] = select(
        d.id.label("row_id"),
        d.updated_at.label("failed_at"),
        d.domain,
        d.reason,
        d.status,
        d.order_id,
        d.subscription_id,
        *shown,
    ).select_from(joined)
    domains = filtered(
        domains.where(or_(d.status == "failed", d.reason.is_not(None))), d.updated_at, query, its
    )
    named = select(order_domains.c.id).where(d.order_id == o.order_id).exists()
    whole: Select[Any] = select(
        null().label("row_id"),  # its index holds no id: none is needed (see domains_after)
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


def domains_after(
    query: FailedDomainQuery, after: tuple[datetime, int] | None, limit: int
) -> Select[Any]:
    """The next `limit` failed domains, the latest first, after the (time, row id) of the
    last one read."""
    d = order_domains.c
    stmt, _ = halves(query, walk=True)
    if after is not None:
        at, row_id = after
        stmt = stmt.where(d.updated_at <= at, tuple_(d.updated_at, d.id) < tuple_(at, row_id))
    return stmt.order_by(d.updated_at.desc(), d.id.desc()).limit(limit)


async def failed_domains_csv(
    conn: Reader, query: FailedDomainQuery, *, bom: bool
) -> AsyncIterator[bytes]:
    """Every failed domain the filters choose, the latest first, as a CSV (cells a
    spreadsheet would run as formulas made text): CSV_FIRST rows, then CSV_CHUNK a
    statement, the next read while this one is written. The orders failed as a whole (few:
    an order that names no domain) are read at the start and merged in by time. At most
    CSV_ROWS rows."""
    limit = min(CSV_FIRST, CSV_CHUNK)
    fetching = asyncio.ensure_future(conn.execute(domains_after(query, None, limit)))
    try:
        whole = latest_first(halves(query)[1]).limit(CSV_ROWS)
        wholes = list((await conn.execute(whole)).all())
        head = (BOM if bom else "") + csv_text([[title for title, _ in CSV_COLUMNS]])
        left = CSV_ROWS
        while True:
            rows = (await fetching).all()
            more, limit = len(rows) == limit, CSV_CHUNK
            if more and left > len(rows):
                after = (rows[-1].failed_at, rows[-1].row_id)
                fetching = asyncio.ensure_future(conn.execute(domains_after(query, after, limit)))
            # the orders failed as a whole that come before the next chunk's first row
            edge = rows[-1].failed_at if more else None
            taken = next(
                (i for i, w in enumerate(wholes) if edge is not None and w.failed_at < edge),
                len(wholes),
            )
            chunk = sorted([*rows, *wholes[:taken]], key=lambda row: row.failed_at, reverse=True)
            del wholes[:taken]
            chunk = chunk[:left]
            left -= len(chunk)
            yield (head + csv_text(csv_lines(chunk))).encode()
            head = ""
            if not more or left <= 0:
                return
    finally:
        # a download given up (or cut at CSV_ROWS) lets a chunk under way finish alone:
        # its connection goes back to the pool as after any statement
        fetching.add_done_callback(lambda task: task.cancelled() or task.exception())


def csv_lines(rows: list[Any]) -> list[list[str]]:
    """Each row's cells, found by position once (a dictionary of each row, or a lookup by
    name a cell, was most of the time)."""
    if not rows:
        return []
    fields = rows[0]._fields
    failed_at, domain, reason, failure_reason = (
        fields.index(key) for key in ("failed_at", "domain", "reason", "failure_reason")
    )
    at = [fields.index(key) for _, key in CSV_COLUMNS[3:]]
    lines = []
    for row in rows:
        values = tuple(row)
        lines.append(
            [
                values[failed_at].isoformat(),
                "" if (name := values[domain]) is None else neutralise(name),
                neutralise(values[reason] or values[failure_reason] or ""),
                *["" if (v := values[i]) is None else neutralise(str(v)) for i in at],
            ]
        )
    return lines
