"""The counts ops checks first."""

from typing import Any

from sqlalchemy import (
    Table,
    func,
    select,
    text,
)

from app.models import (
    events,
    mailboxes,
    orders,
    reconciliations,
    rejected,
    subscriptions,
)
from app.reading import resources
from app.reading.reader import Reader
from app.receiving.payloads import HANDLED_EVENTS


async def counts_by(conn: Reader, table: Table, column: str) -> dict[str, int]:
    """Rows per value; `unknown` for rows where the sender never said."""
    rows = await conn.execute(select(table.c[column], func.count()).group_by(table.c[column]))
    return {"unknown" if key is None else str(key): count for key, count in rows}


async def latest_reconciliation(conn: Reader) -> Any:
    """The last reconcile's row (ran_at, report), or None."""
    stmt = select(reconciliations.c.ran_at, reconciliations.c.report)
    return (await conn.execute(stmt.order_by(reconciliations.c.id.desc()).limit(1))).first()


def replayable_count() -> Any:
    """Stored as ignored, of a type this version applies, and not for want of an ID."""
    identified = text(
        "NOT EXISTS (SELECT 1 FROM jsonb_array_elements_text(events.warnings) AS w "
        "WHERE w LIKE 'stored as ignored:%')"
    )
    return (
        select(func.count())
        .select_from(events)
        .where(events.c.status == "ignored", events.c.event.in_(sorted(HANDLED_EVENTS)))
        .where(identified)
        .scalar_subquery()
    )


CONFLICTS = select(func.count()).select_from(events).where(events.c.conflict).scalar_subquery()
REJECTED = select(func.count()).select_from(rejected).scalar_subquery()
LAST_DELIVERY = select(func.max(events.c.last_received_at)).scalar_subquery()


async def stats(conn: Reader, signature_forms: list[str]) -> resources.Stats:
    by_provider = await counts_by(conn, mailboxes, "provider")
    scalars = select(
        select(func.count()).select_from(subscriptions).scalar_subquery(),
        CONFLICTS,
        REJECTED,
        LAST_DELIVERY,
        replayable_count(),
    )
    subs, conflicts, rejected_count, last, replayable = (await conn.execute(scalars)).one()
    return resources.Stats(
        subscriptions=subs,
        mailboxes=sum(by_provider.values()),
        mailboxes_by_provider=by_provider,
        mailboxes_by_source=await counts_by(conn, mailboxes, "source"),
        orders_by_status=await counts_by(conn, orders, "status"),
        events_by_status=await counts_by(conn, events, "status"),
        conflicts=conflicts,
        rejected_deliveries=rejected_count,
        replayable_events=replayable,
        last_delivery_at=last,
        signature_forms=signature_forms,
    )


async def attention(conn: Reader) -> Any:
    """Conflicts, rejected deliveries and the last delivery's time, as one row."""
    return (await conn.execute(select(CONFLICTS, REJECTED, LAST_DELIVERY))).one()
