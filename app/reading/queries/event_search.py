"""The events page's own list: what each event is about (domain, order, customer), a time
range, and a search over the redacted payload, which holds no credential to match."""

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import Field, model_validator
from sqlalchemy import ColumnElement, Select, Text, and_, cast, func, literal_column, select

from app.models import events
from app.reading.queries.events import EventQuery, event_select
from app.reading.queries.paging import (
    Cursor,
    Search,
    UtcTime,
    contains,
    decode_cursor,
    fetch_page,
    snapshot_parts,
    visible_to,
)
from app.reading.reader import Reader

SEARCH_DAYS = 31  # a search walks every payload of its range: at most a month
# A search without a start reads the last 6 hours (the page says so): 24 hours of payloads
# took a rare term's search past 500 ms at 5M events.
SEARCH_DEFAULT = timedelta(hours=6)
# The event ids a search page reads at most (see search_events). The cost is in each payload's
# text: 5,000 deliveries' (600 bytes each) take 35 ms of 2 cores at load 3 (10,000 took the
# page to 110-120 ms p95); the 28,000 smaller ones of a day at the scale benchmark, 80-200 ms.
SEARCH_SLICE = 5_000
MAX_ID = 2**63 - 1  # no event received at or after a range's end: no bound on the ids

# What an event is about, from its payload's data (the first mailbox group's domain for a
# prewarmup success, which has no domain of its own)
ABOUT = {
    "domain": "coalesce(payload #>> '{data,domain}', payload #>> '{data,mailboxDetails,domain}',"
    " payload #>> '{data,mailboxDetails,0,domain}', payload #>> '{data,domainName}')",
    "order_id": "payload #>> '{data,orderId}'",
    "subscription_id": "payload #>> '{data,subscriptionId}'",
    "user_id": "payload #>> '{data,userId}'",
    "user_email": "payload #>> '{data,userEmail}'",
}


class EventPageQuery(EventQuery):
    q: Search | None = Field(
        None, description="Text anywhere in the redacted payload (case-insensitive)"
    )
    since: UtcTime | None = Field(None, description="First received at or after")
    until: UtcTime | None = Field(None, description="First received before")
    signature: Literal["valid", "invalid", "absent", "stale", "unchecked"] | None = None

    @model_validator(mode="after")
    def bounded(self) -> "EventPageQuery":
        """A search without a start reads the SEARCH_DEFAULT before its end; one longer than a month
        is refused (it would read every payload of it)."""
        if self.since and self.until and self.until <= self.since:
            raise ValueError("`until` is not after `since`")
        if self.q:
            end = self.until or datetime.now(UTC)
            self.since = self.since or end - SEARCH_DEFAULT
            if end - self.since > timedelta(days=SEARCH_DAYS):
                raise ValueError(f"a search covers at most {SEARCH_DAYS} days: narrow the range")
        return self


def summary_select() -> Select[Any]:
    return event_select(payload=False).add_columns(
        *(literal_column(f"({sql})").label(name) for name, sql in ABOUT.items())
    )


def first_id_since(since: datetime) -> Any:
    """The id of the earliest event received since `since`: ids grow with receipt time,
    so the newest-first walk stops there instead of reading the whole table for a rare
    match (the receipt time is still checked on each row)."""
    return (
        select(events.c.id)
        .where(events.c.first_received_at >= since)
        .order_by(events.c.first_received_at)
        .limit(1)
        .scalar_subquery()
    )


def apply(stmt: Select[Any], query: EventPageQuery) -> Select[Any]:
    """The filters and the receipt time checked on each row (the search's pattern apart)."""
    for name in ("event", "status", "event_id", "conflict", "signature"):
        if (value := getattr(query, name)) is not None:
            stmt = stmt.where(events.c[name] == value)
    if query.since is not None:
        stmt = stmt.where(events.c.first_received_at >= query.since)
    if query.until is not None:
        stmt = stmt.where(events.c.first_received_at < query.until)
    return stmt


def id_bounds(stmt: Select[Any], query: EventPageQuery) -> Select[Any]:
    if (since := query.since) is not None:
        stmt = stmt.where(events.c.id >= first_id_since(since))
    if (until := query.until) is not None:
        # the same bound at the other end: a day's newest-first walk starts at that day's
        # end instead of reading every later event first (53 ms for yesterday at 5M events)
        stmt = stmt.where(events.c.id < func.coalesce(first_id_since(until), MAX_ID))
    return stmt


@dataclass(frozen=True)
class EventList:
    items: list[Any]
    cursor: str | None
    # a search that stopped before its page filled: received back to (newest first) or up
    # to (oldest first) this time it read every event; the cursor goes on from there
    searched_to: datetime | None = None


async def list_events(conn: Reader, query: EventPageQuery) -> EventList:
    if query.q:
        return await search_events(conn, query, query.q)
    stmt = id_bounds(apply(summary_select(), query), query)
    rows, cursor = await fetch_page(conn, stmt, events, query)
    return EventList(list(rows), cursor)


async def search_events(conn: Reader, query: EventPageQuery, q: str) -> EventList:
    """One slice of at most SEARCH_SLICE ids of the range a page, from where the walk stands:
    a page that fills stops at its last event, one that does not stops at the slice's end
    and says how far it read, and the next page goes on from either, so nothing is read
    twice or skipped."""
    walk, newest = decode_cursor(query.cursor), query.order == "newest"
    first, end, snapshot = await id_range(conn, query)
    if newest:
        top = min(walk.last_id, end) if walk.last_id else end
        low, high = max(first, top - SEARCH_SLICE), top
    else:
        low = max(walk.last_id + 1, first)
        high = min(low + SEARCH_SLICE, end)
    if low >= high:
        return EventList([], None)
    stmt = apply(summary_select(), query).where(events.c.id >= low, events.c.id < high, matches(q))
    if walk.snapshot:
        stmt = stmt.where(visible_to(events, walk))
    stmt = stmt.order_by(events.c.id.desc() if newest else events.c.id)
    rows = (await conn.execute(stmt.limit(query.limit + 1), search=True)).all()
    snapshot = walk.snapshot or snapshot
    if len(rows) > query.limit:
        rows = rows[: query.limit]
        return EventList(list(rows), Cursor(rows[-1].id, snapshot).encode())
    if (newest and low == first) or (not newest and high == end):
        return EventList(list(rows), None)  # the whole range is read
    stop = low if newest else high - 1
    reached = await received_at(conn, stop, newest=newest)
    return EventList(list(rows), Cursor(stop, snapshot).encode(), reached)


def matches(q: str) -> ColumnElement[bool]:
    """The payload's text holds `q`, case aside. Half of that test's cost a row is the
    locale's lowercasing of the whole text: when `q` holds 3 or more ASCII digits or signs
    in a row (an ID's number, "42@"), which no case folding makes or changes, a LIKE of
    them first skips it for the rows without them."""
    text_ = cast(events.c.payload, Text)
    exact = text_.ilike(contains(q))
    runs = re.findall(r"[!-/0-9:-@\[-`{-~]{3,}", q)
    if not runs:
        return exact
    return and_(text_.like(contains(max(runs, key=len))), exact)


async def id_range(conn: Reader, query: EventPageQuery) -> tuple[int, int, tuple[int, ...]]:
    """The ids [first, end) of the events received in the query's range (ids grow with
    receipt time; each row's time is checked all the same), and the snapshot a walk starts
    from."""
    after: Any = select(func.max(events.c.id) + 1).scalar_subquery()
    if query.until is not None:
        after = func.coalesce(first_id_since(query.until), after)
    since = query.since or datetime.min.replace(tzinfo=UTC)
    row = (
        await conn.execute(
            select(
                first_id_since(since).label("first"),
                after.label("end"),
                literal_column("pg_current_snapshot()::text").label("snapshot"),
            )
        )
    ).one()
    if row.first is None or row.end is None:
        return 0, 0, snapshot_parts(row.snapshot)
    return row.first, row.end, snapshot_parts(row.snapshot)


async def received_at(conn: Reader, stop: int, *, newest: bool) -> datetime | None:
    """The receipt of the last event a slice read (its oldest, newest first)."""
    id_ = events.c.id
    stmt = (
        select(events.c.first_received_at)
        .where(id_ >= stop if newest else id_ <= stop)
        .order_by(id_ if newest else id_.desc())
        .limit(1)
    )
    reached: datetime | None = (await conn.execute(stmt)).scalar()
    return reached
