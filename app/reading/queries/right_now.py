"""The overview's "right now" strip: is anything stuck or lost at this moment?

Each tile has a state (ok, warn or bad, said in words as well as in colour), a figure, a
sentence and where to look next. All but the spool, the database and the incomplete orders
come from one statement; each count reads an index range (a partial index, a receipt time),
so the strip stays fast however many rows the tables hold. Incomplete orders are counted
apart (every order domain of 2 days counts its mailboxes: 17,000 buffers, 25-50 ms at 1M
mailboxes), at most once a minute per process (ui.kept_incomplete), and the tile says when."""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from prometheus_client import REGISTRY, CollectorRegistry, multiprocess
from sqlalchemy import func, select

from app import metrics
from app.models import events, mailboxes, order_domains, orders, reconciliations, rejected
from app.reading.ages import counted
from app.reading.queries.counts import LAST_DELIVERY
from app.reading.reader import Reader

State = Literal["ok", "warn", "bad", "off"]  # off: not set up here, nothing to watch
RECENT_DAYS = 2  # incomplete orders: those updated in the last 2 days (mailboxes come within hours)
SIGNATURE_HOURS = 24
FAILED_SIGNATURES = ("invalid", "stale")
SPOOL_BAD_SECONDS = 60.0  # a delivery waiting longer: the database has been away a while
QUIET_WARN, QUIET_BAD = timedelta(hours=1), timedelta(hours=6)  # since the last delivery
RECONCILE_WARN, RECONCILE_BAD = timedelta(hours=26), timedelta(days=7)
FIRST_VISIT = timedelta(hours=24)  # "since the last visit" on a first visit


@dataclass(frozen=True)
class Tile:
    name: str
    state: State
    figure: str
    detail: str
    link: str | None = None
    at: datetime | None = None  # the time the figure is about, shown as "3 min ago"


def short_of_mailboxes(since: Any) -> Any:
    """Order domains that succeeded with fewer mailboxes than ordered, in orders updated
    since `since`: (order_id, domain, quantity, mailbox_count)."""
    d = order_domains.c
    have = (
        select(func.count())
        .where(mailboxes.c.order_id == d.order_id, mailboxes.c.subscription_id == d.subscription_id)
        .scalar_subquery()
    )
    return (
        select(d.order_id, d.domain, d.quantity, have.label("mailbox_count"))
        .join(orders, orders.c.order_id == d.order_id)
        .where(orders.c.updated_at >= since, d.status == "succeeded", d.quantity > have)
    )


async def figures(conn: Reader, last_visit: datetime) -> Any:
    """One row: conflicts, rejected (all, since the last visit), the last delivery, failed
    signatures in 24 h, the last reconcile."""
    now = func.now()
    day = now - timedelta(hours=SIGNATURE_HOURS)
    signatures = select(func.count()).where(
        events.c.first_received_at >= day, events.c.signature.in_(FAILED_SIGNATURES)
    )
    rejected_signatures = select(func.count()).where(
        rejected.c.received_at >= day, rejected.c.signature.in_(FAILED_SIGNATURES)
    )
    stmt = select(
        select(func.count(func.distinct(events.c.event_id)))
        .where(events.c.conflict)
        .scalar_subquery()
        .label("conflicts"),
        select(func.count()).select_from(rejected).scalar_subquery().label("rejected"),
        select(func.count())
        .where(rejected.c.received_at > last_visit)
        .scalar_subquery()
        .label("rejected_new"),
        LAST_DELIVERY.label("last_delivery"),
        (signatures.scalar_subquery() + rejected_signatures.scalar_subquery()).label(
            "bad_signatures"
        ),
        select(reconciliations.c.ran_at)
        .order_by(reconciliations.c.id.desc())
        .limit(1)
        .scalar_subquery()
        .label("reconciled_at"),
    )
    return (await conn.execute(stmt)).one()


def refused_signatures() -> int:
    """Deliveries refused for their signature (enforce mode) since the service started, by
    every worker: from the metrics, as nothing refused is stored."""
    registry = REGISTRY
    if metrics.multiprocess_mode():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return int(
        sum(
            sample.value
            for family in registry.collect()
            if family.name == "cmr_webhook_signatures"
            for sample in family.samples
            if sample.name.endswith("_total") and sample.labels.get("result") in FAILED_SIGNATURES
        )
    )


def spool_tile(spool: dict[str, Any]) -> Tile:
    depth, oldest, room = spool["depth"], spool["oldest"], spool["room"]
    if not depth:
        return Tile("Spool", "ok", "0", "nothing waiting for the database")
    state: State = "bad" if not room or oldest >= SPOOL_BAD_SECONDS else "warn"
    full = "; full: new deliveries are refused" if not room else ""
    return Tile("Spool", state, str(depth), f"waiting for the database, oldest {oldest} s{full}")


def signature_tile(stored: int, refused: int) -> Tile:
    detail = f"invalid or stale: {refused} refused since the service started"
    if stored:
        detail += f", {stored} stored unverified in {SIGNATURE_HOURS} h (report mode)"
    link = "/ui/events?signature=invalid" if stored else None
    return Tile(
        "Signature failures",
        "bad" if stored + refused else "ok",
        str(stored + refused),
        detail,
        link,
    )


def by_age(age: timedelta | None, warn: timedelta, bad: timedelta) -> State:
    """A tile's state from how long ago its thing last happened (never: warn)."""
    if age is None:
        return "warn"
    return "bad" if age > bad else "warn" if age > warn else "ok"


def reconcile_tile(reconciled_at: datetime | None, configured: bool) -> Tile:
    """Its age against the sender's API; neutral where no API key is set, as reconcile
    cannot run there (a local service, say) and so is not late."""
    if not configured:
        detail = "no CMR_API_KEY: drift is not checked against the sender"
        return Tile("Last reconcile", "off", "not configured", detail)
    age = datetime.now(UTC) - reconciled_at if reconciled_at else None
    return Tile(
        "Last reconcile",
        by_age(age, RECONCILE_WARN, RECONCILE_BAD),
        "never" if age is None else "",
        "coldmail-webhooks reconcile has not run"
        if age is None
        else "drift checked against the sender",
        None,
        reconciled_at,
    )


def tiles(
    row: Any,
    spool: dict[str, Any],
    database_ms: float,
    first_visit: bool,
    reconciling: bool,
    incomplete: tuple[datetime, int],
) -> list[Tile]:
    now = datetime.now(UTC)
    since = "in the last 24 h" if first_visit else "since your last visit"
    quiet = now - row.last_delivery if row.last_delivery else None
    last = by_age(quiet, QUIET_WARN, QUIET_BAD)
    return [
        Tile("Database", "ok", "answering", f"this page's counts took {database_ms:.0f} ms"),
        spool_tile(spool),
        Tile(
            "Last delivery",
            last,
            "none yet" if quiet is None else "",
            "the sender's latest delivery" if quiet is not None else "no delivery recorded",
            "/ui/events",
            row.last_delivery,
        ),
        Tile(
            "Rejected",
            "warn" if row.rejected_new else "ok",
            str(row.rejected_new),
            f"{since} ({row.rejected} in all)",
            "/ui/rejected",
        ),
        Tile(
            "Conflicts",
            "warn" if row.conflicts else "ok",
            str(row.conflicts),
            "eventIds reused with other content",
            "/ui/events?conflict=true",
        ),
        Tile(
            "Incomplete orders",
            "warn" if incomplete[1] else "ok",
            str(incomplete[1]),
            f"short of the mailboxes ordered, last {RECENT_DAYS} days; {counted(incomplete[0])}",
            "/ui/incomplete-orders",
        ),
        reconcile_tile(row.reconciled_at, reconciling),
        signature_tile(row.bad_signatures, refused_signatures()),
    ]


async def right_now(
    conn: Reader,
    spool: dict[str, Any],
    last_visit: datetime | None,
    reconciling: bool,
    incomplete: tuple[datetime, int],
) -> list[Tile]:
    """The strip's tiles; `reconciling`: whether reconcile is set up (an API key);
    `incomplete`: when the incomplete orders were counted, and how many."""
    first_visit = last_visit is None
    since = last_visit or datetime.now(UTC) - FIRST_VISIT
    started = datetime.now(UTC)
    row = await figures(conn, since)
    database_ms = (datetime.now(UTC) - started).total_seconds() * 1000
    return tiles(row, spool, database_ms, first_visit, reconciling, incomplete)


async def incomplete_orders(conn: Reader, limit: int) -> tuple[int, list[Any]]:
    """Orders of the last week short of their mailboxes, the latest first: how many, and
    the first `limit` with each short domain ("2 of 3")."""
    since = func.now() - timedelta(days=RECENT_DAYS)
    short = short_of_mailboxes(since).add_columns(
        orders.c.updated_at, orders.c.user_email, orders.c.user_id
    )
    rows = (
        await conn.execute(short.order_by(orders.c.updated_at.desc(), order_domains.c.domain))
    ).all()
    by_order: dict[str, list[Any]] = {}
    for row in rows:
        by_order.setdefault(row.order_id, []).append(row)
    return len(by_order), [
        {
            "order_id": order_id,
            "domains": domains,
            "updated_at": domains[0].updated_at,
            "user_id": domains[0].user_id,
            "user_email": domains[0].user_email,
        }
        for order_id, domains in list(by_order.items())[:limit]
    ]
