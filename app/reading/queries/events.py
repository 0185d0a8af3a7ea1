"""Stored events (payloads redacted) and rejected deliveries."""

from collections.abc import Sequence
from typing import Any, Literal

from sqlalchemy import (
    ColumnElement,
    Select,
    literal_column,
    select,
    union,
)

from app.errors import NotFound
from app.models import (
    ABOUT_MAILBOX,
    ABOUT_ORDER,
    ABOUT_SUBSCRIPTION,
    events,
    rejected,
)
from app.reading import resources
from app.reading.queries.paging import Ident, ListQuery, list_page
from app.reading.reader import Reader


class EventQuery(ListQuery):
    event: Ident | None = None
    status: Literal["processed", "ignored"] | None = None
    event_id: Ident | None = None
    conflict: bool | None = None


def event_select(*, payload: bool = True) -> Select[Any]:
    hidden = {"body_encrypted", "content_hash"} | (set() if payload else {"payload"})
    return select(*[c for c in events.c if c.name not in hidden])


async def list_events(conn: Reader, query: EventQuery) -> resources.Page[resources.EventSummary]:
    """Without payloads (up to MAX_BODY_BYTES each): `GET /events/{id}` has it."""
    select_ = event_select(payload=False)
    return await list_page(conn, select_, events, query, resources.EventSummary)


async def get_event(conn: Reader, id: int) -> resources.Event:
    row = (await conn.execute(event_select().where(events.c.id == id))).first()
    if row is None:
        raise NotFound()
    return resources.Event.model_validate(row._asdict())


async def events_about(
    conn: Reader,
    limit: int = 50,
    *,
    order: Sequence[str] = (),
    subscription: Sequence[str] = (),
    mailbox: Sequence[tuple[str, str | None]] = (),
) -> list[Any]:
    """The latest events that name any of these orders, subscriptions or mailboxes. A mailbox
    comes with its subscription's ID: an event that names both (its mailbox.created) is
    found among that subscription's events, the mailbox's own index holding only the events
    that name no subscription (models.ABOUT_MAILBOX). A mailbox's events that name a
    subscription name its own: a subscription is its domain's."""
    about_mailbox: ColumnElement[str] = literal_column(f"({ABOUT_MAILBOX})")
    about_subscription: ColumnElement[str] = literal_column(ABOUT_SUBSCRIPTION)
    legs = [[literal_column(ABOUT_ORDER) == value] for value in order]
    legs += [[about_subscription == value] for value in subscription]
    for mailbox_id, subscription_id in mailbox:
        # the mailbox's index holds only events without a subscriptionId (its predicate)
        legs.append([about_mailbox == mailbox_id, about_subscription.is_(None)])
        if subscription_id is not None:
            legs.append([about_subscription == subscription_id, about_mailbox == mailbox_id])
    if not legs:
        return []
    # One index range per leg, each read backwards from its newest (an OR of them would
    # have the planner walk the whole table by id, hoping for an early match).
    latest = union(
        *(select(events.c.id).where(*leg).order_by(events.c.id.desc()).limit(limit) for leg in legs)
    ).subquery()
    stmt = (
        event_select(payload=False)
        .where(events.c.id.in_(select(latest.c.id)))
        .order_by(events.c.id.desc())
        .limit(limit)
    )
    return [resources.EventSummary.model_validate(r._asdict()) for r in await conn.execute(stmt)]


class RejectedQuery(ListQuery):
    event_id: Ident | None = None


def rejected_select() -> Select[Any]:
    return select(*[c for c in rejected.c if c.name != "body_encrypted"])


async def list_rejected(conn: Reader, query: RejectedQuery) -> resources.Page[resources.Rejected]:
    return await list_page(conn, rejected_select(), rejected, query, resources.Rejected)


async def get_rejected(conn: Reader, id: int) -> resources.Rejected:
    row = (await conn.execute(rejected_select().where(rejected.c.id == id))).first()
    if row is None:
        raise NotFound()
    return resources.Rejected.model_validate(row._asdict())
