"""The events page's own list: what each event is about (domain, order, customer), a time
range, and a search over the redacted payload, which holds no credential to match."""

from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import Field, model_validator
from sqlalchemy import Select, Text, cast, func, literal_column, select

from app.models import events
from app.reading.queries.events import EventQuery, event_select
from app.reading.queries.paging import Search, UtcTime, contains, fetch_page
from app.reading.reader import Reader

SEARCH_DAYS = 31  # a search reads every payload of its range: at most a month
# A search without a start reads the last 6 hours (the page says so): 24 hours of payloads
# took a rare term's search past 500 ms at 5M events.
SEARCH_DEFAULT = timedelta(hours=6)
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
    for name in ("event", "status", "event_id", "conflict", "signature"):
        if (value := getattr(query, name)) is not None:
            stmt = stmt.where(events.c[name] == value)
    if (since := query.since) is not None:
        stmt = stmt.where(events.c.first_received_at >= since, events.c.id >= first_id_since(since))
    if (until := query.until) is not None:
        # the same bound at the other end: a day's newest-first walk starts at that day's
        # end instead of reading every later event first (53 ms for yesterday at 5M events)
        after = func.coalesce(first_id_since(until), MAX_ID)
        stmt = stmt.where(events.c.first_received_at < until, events.c.id < after)
    if query.q:
        stmt = stmt.where(cast(events.c.payload, Text).ilike(contains(query.q)))
    return stmt


async def list_events(conn: Reader, query: EventPageQuery) -> tuple[list[Any], str | None]:
    rows, cursor = await fetch_page(conn, apply(summary_select(), query), events, query)
    return list(rows), cursor
