"""Derived events: what the agency acts on, computed from the stored state inside the
transaction of their cause, and written once per change of that state.

Each derived event has a subject (an order, a subscription, a cause of rejection and its
window, a replica's spool, the reconciliation) and a state (what the event says of it).
`outbound_states` keeps, per topic and subject, the state last seen: an event is written
only when the state differs from it. A duplicate delivery, or an older event arriving
late, leaves the state as it was (the merge rules see to it), so it writes nothing; a
change (a second domain failing, a new risk, mailboxes added) writes the event again.
The row's lock serialises two transactions changing one subject's state.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from app.reading.renewals import DOMAIN_OF, RISKS_OF
from app.recording import merge
from app.recording.effects import Effects

# The /renewals risks that put a subscription at risk when an event changes them (the
# others follow from the clock or are final: no event is their cause).
AT_RISK = ("renewal_failed", "past_due", "auto_renew_off", "domain_grace_period", "domain_expired")
# deliveries.rejected: one event per cause and window, at the window's first rejection.
REJECTED_WINDOW = timedelta(minutes=15)


@dataclass(frozen=True)
class Derived:
    """A derived event to enqueue: its type, its data (camelCase, like the read API), and
    whose it is (a destination's `userIds` filter)."""

    type: str
    data: dict[str, Any]
    user_id: str | None = None


# The state is written when it differs from the last one (absent: `$4`); `previous` is
# the state before, for what changed (a subscription's new risks).
CHANGED = """
WITH previous AS (SELECT state FROM outbound_states WHERE topic = $1 AND subject = $2),
written AS (
    INSERT INTO outbound_states AS old (topic, subject, state)
    SELECT $1, $2, $3 WHERE $3 IS DISTINCT FROM coalesce((SELECT state FROM previous), $4)
    ON CONFLICT (topic, subject) DO UPDATE SET state = EXCLUDED.state, changed_at = now()
    WHERE old.state IS DISTINCT FROM EXCLUDED.state
    RETURNING 1)
SELECT (SELECT state FROM previous) AS previous, EXISTS (SELECT FROM written) AS changed
"""


async def changed(
    conn: asyncpg.Connection, topic: str, subject: str, state: str, *, initial: str = ""
) -> tuple[bool, str]:
    """Whether `state` is new for the subject (and so written), and the state before."""
    row = await conn.fetchrow(CHANGED, topic, subject, state, initial)
    return bool(row["changed"]), row["previous"] or initial


# --- orders ---------------------------------------------------------------------------

ORDER = """
SELECT o.order_id, o.kind, o.user_id, o.user_email, o.provider, o.status, o.failure_reason,
    coalesce(jsonb_agg(jsonb_build_object('domain', d.domain, 'reason', d.reason)
        ORDER BY d.domain) FILTER (WHERE d.status = 'failed'), '[]') AS failed,
    coalesce(jsonb_agg(d.domain ORDER BY d.domain)
        FILTER (WHERE d.status = 'succeeded'), '[]') AS succeeded
FROM orders o LEFT JOIN order_domains d ON d.order_id = o.order_id
WHERE o.order_id = $1
GROUP BY o.id
"""


async def order_outcome(conn: asyncpg.Connection, order_id: str) -> list[Derived]:
    """order.failed or order.partially_failed when the order's status or its failed
    domains (with their reasons) changed to a failure."""
    row = await conn.fetchrow(ORDER, order_id)
    if row is None:
        return []
    failed = row["failed"]  # jsonb, decoded by the engine's codec (app/db.py)
    state = row["status"]
    if state != "succeeded":
        state += " " + orjson.dumps([row["failure_reason"], failed]).decode()
    is_new, _ = await changed(conn, "order", order_id, state, initial="succeeded")
    if not is_new or row["status"] == "succeeded":
        return []
    data = {
        "orderId": order_id,
        "kind": row["kind"],
        "status": row["status"],
        "userId": row["user_id"],
        "userEmail": row["user_email"],
        "provider": row["provider"],
        "reason": row["failure_reason"],
        "failedDomains": failed,
        "succeededDomains": row["succeeded"],
    }
    return [Derived(f"order.{row['status']}", data, row["user_id"])]


# --- mailboxes ready ------------------------------------------------------------------

# An order's mailboxes are all stored when every domain it succeeded for has as many
# mailboxes of the order as it was ordered with. Read for all the orders of a group at once
# (one round trip, whatever the group's size: most orders are not ready, or not stored).
ORDER_MAILBOXES = """
SELECT o.order_id, o.kind, o.user_id, o.user_email, d.domain, d.subscription_id,
    d.quantity, (SELECT count(*) FROM mailboxes m
        WHERE m.order_id = o.order_id AND m.domain = d.domain) AS stored
FROM orders o JOIN order_domains d ON d.order_id = o.order_id AND d.status = 'succeeded'
WHERE o.order_id = ANY($1::text[])
ORDER BY o.order_id, d.domain
"""
# Subscriptions' mailboxes heard of without an order: as many as each is billed for.
SUBSCRIPTION_MAILBOXES = """
SELECT s.subscription_id, s.domain, s.user_id, s.user_email,
    coalesce(s.lifecycle_quantity, s.quantity) AS quantity,
    (SELECT count(*) FROM mailboxes m WHERE m.subscription_id = s.subscription_id) AS stored
FROM subscriptions s WHERE s.subscription_id = ANY($1::text[])
ORDER BY s.subscription_id
"""


# Two transactions storing the last mailboxes of one order (for two of its domains) at once
# each count without the other's, uncommitted: neither would find the order complete. So
# the decision is taken one transaction at a time per order (and subscription): a lock per
# subject, held to the transaction's end and taken in one order (no deadlock within a
# group), then the count in a new statement, which sees what the lock's holder committed.
# The keys are hashes: two subjects sharing one only wait for each other.
LOCK_SUBJECTS = """
SELECT count(pg_advisory_xact_lock(key)) FROM (
    SELECT DISTINCT hashtextextended(subject, 0) AS key FROM unnest($1::text[]) subject
    ORDER BY key) keys
"""


async def lock_mailboxes_subjects(
    conn: asyncpg.Connection, orders: set[str], subscriptions: set[str]
) -> None:
    named = [f"mailboxes.ready order:{o}" for o in orders]
    named += [f"mailboxes.ready subscription:{s}" for s in subscriptions]
    await conn.fetchval(LOCK_SUBJECTS, named)


async def orders_mailboxes_ready(conn: asyncpg.Connection, order_ids: set[str]) -> list[Derived]:
    by_order: dict[str, list[asyncpg.Record]] = {}
    for row in await conn.fetch(ORDER_MAILBOXES, sorted(order_ids)):
        by_order.setdefault(row["order_id"], []).append(row)
    found = []
    for order_id, rows in by_order.items():
        if all(r["quantity"] is not None and r["stored"] >= r["quantity"] for r in rows):
            found += await order_mailboxes_ready(conn, order_id, rows)
    return found


async def order_mailboxes_ready(
    conn: asyncpg.Connection, order_id: str, rows: list[asyncpg.Record]
) -> list[Derived]:
    """mailboxes.ready for an order whose mailboxes are all stored (`rows`: its domains)."""
    total = sum(int(r["quantity"]) for r in rows)
    is_new, _ = await changed(conn, "mailboxes.ready", f"order:{order_id}", str(total))
    if not is_new or total == 0:
        return []
    first = rows[0]
    data = {
        "orderId": order_id,
        "subscriptionId": first["subscription_id"] if len(rows) == 1 else None,
        "kind": first["kind"],
        "userId": first["user_id"],
        "userEmail": first["user_email"],
        "mailboxCount": total,
        "domains": [
            {"domain": r["domain"], "subscriptionId": r["subscription_id"]}
            | {"mailboxCount": int(r["quantity"])}
            for r in rows
        ],
    }
    return [Derived("mailboxes.ready", data, first["user_id"])]


async def subscriptions_mailboxes_ready(
    conn: asyncpg.Connection, subscription_ids: set[str]
) -> list[Derived]:
    found = []
    for row in await conn.fetch(SUBSCRIPTION_MAILBOXES, sorted(subscription_ids)):
        if row["quantity"] and row["stored"] >= row["quantity"]:
            found += await subscription_mailboxes_ready(conn, row)
    return found


async def subscription_mailboxes_ready(
    conn: asyncpg.Connection, row: asyncpg.Record
) -> list[Derived]:
    subscription_id = row["subscription_id"]
    subject = f"subscription:{subscription_id}"
    is_new, _ = await changed(conn, "mailboxes.ready", subject, str(row["quantity"]))
    if not is_new:
        return []
    data = {
        "orderId": None,
        "subscriptionId": subscription_id,
        "userId": row["user_id"],
        "userEmail": row["user_email"],
        "mailboxCount": int(row["quantity"]),
        "domains": [{"domain": row["domain"], "subscriptionId": subscription_id}],
    }
    return [Derived("mailboxes.ready", data, row["user_id"])]


# --- subscriptions at risk ------------------------------------------------------------

# The subscriptions given (by ID: a subscription.* event) or of the domains given (a
# domain.* event, by domainId or name), each condition present only when given, so a
# subscription's event reads its one row by its unique index.
SUBSCRIPTION_RISKS = f"""
SELECT s.subscription_id, s.domain, s.user_id, s.user_email, s.subscription_status,
    s.period_end, s.auto_renew, d.status AS domain_status, {RISKS_OF} AS risks
FROM subscriptions s LEFT JOIN LATERAL ({DOMAIN_OF}) d ON true
WHERE {{which}}
ORDER BY s.subscription_id
"""
WHICH: tuple[str, ...] = ("s.subscription_id", "s.domain_id", "s.domain")


async def at_risk(
    conn: asyncpg.Connection,
    *,
    subscriptions: Sequence[str] = (),
    domain_ids: Sequence[str] = (),
    domains: Sequence[str] = (),
) -> list[Derived]:
    """subscription.at_risk for each subscription (given, or of the domains given) that
    gained a risk; a risk gone is remembered, so its return is told again."""
    asked = zip(WHICH, (subscriptions, domain_ids, domains), strict=True)
    given = [(condition, list(values)) for condition, values in asked if values]
    if not given:
        return []
    which = " OR ".join(f"{c} = ANY(${n}::text[])" for n, (c, _) in enumerate(given, start=1))
    found = []
    for row in await conn.fetch(SUBSCRIPTION_RISKS.format(which=which), *(v for _, v in given)):
        risks = [risk for risk in AT_RISK if risk in row["risks"]]
        sid = row["subscription_id"]
        is_new, before = await changed(conn, "subscription.at_risk", sid, ",".join(risks))
        added = [risk for risk in risks if risk not in before.split(",")]
        if not is_new or not added:
            continue
        data = {
            "subscriptionId": sid,
            "domain": row["domain"],
            "userId": row["user_id"],
            "userEmail": row["user_email"],
            "subscriptionStatus": row["subscription_status"],
            "periodEnd": iso(row["period_end"]),
            "autoRenew": row["auto_renew"],
            "domainStatus": row["domain_status"],
            "risks": risks,
            "newRisks": added,
        }
        found.append(Derived("subscription.at_risk", data, row["user_id"]))
    return found


# --- a delivery's derived events -----------------------------------------------------


@dataclass
class Subjects:
    """What a delivery's effects may have changed the derived state of."""

    orders: set[str] = field(default_factory=set)  # outcome (changes.order_id) and mailboxes
    subscriptions: set[str] = field(default_factory=set)  # mailboxes heard of without an order
    risky: set[str] = field(default_factory=set)  # subscriptions whose lifecycle changed
    domain_ids: set[str] = field(default_factory=set)  # domains whose state changed
    domains: set[str] = field(default_factory=set)


def subjects(*many: Effects, completing: bool = True) -> Subjects:
    """What these effects (a delivery's, or a group's) may have changed; without the
    orders and subscriptions of their mailboxes when those cannot complete them (not
    `completing`: the statement that wrote them said so, record.delivery_statement)."""
    found = Subjects()
    for changes in many:
        if changes.order_id:
            found.orders.add(changes.order_id)
        for statement, rows in changes.upserts:
            if statement is merge.MAILBOX_SNAPSHOT:
                if not completing:
                    continue
                found.orders |= {r["order_id"] for r in rows if r["order_id"]}
                found.subscriptions |= {
                    r["subscription_id"] for r in rows if not r["order_id"] and r["subscription_id"]
                }
            elif statement is merge.SUBSCRIPTION_LIFECYCLE:
                found.risky |= {r["subscription_id"] for r in rows}
            elif statement in (merge.DOMAIN_BY_ID, merge.DOMAIN_BY_NAME):
                found.domain_ids |= {r["domain_id"] for r in rows if r.get("domain_id")}
                found.domains |= {r["name"] for r in rows if r.get("name")}
    return found


def may_derive(changes: Effects, wanted: Callable[[str], bool], completing: bool = True) -> bool:
    """Whether these effects may cause a derived event of a type some destination wants
    (without reading anything): the others stay one statement, without a transaction.
    Once written, a delivery whose mailboxes complete nothing (not `completing`) is not
    read for mailboxes.ready: most mailboxes arrive before their order is complete."""
    found = subjects(changes, completing=completing)
    return (
        bool(changes.order_id and (wanted("order.failed") or wanted("order.partially_failed")))
        or bool((found.orders or found.subscriptions) and wanted("mailboxes.ready"))
        or bool(
            (found.risky or found.domain_ids or found.domains) and wanted("subscription.at_risk")
        )
    )


async def of_deliveries(
    conn: asyncpg.Connection, many: Sequence[Effects], wanted: Callable[[str], bool]
) -> list[Derived]:
    """The derived events newly applied deliveries cause (one, or a group committed
    together: each subject read once for all of them). Only the types some destination
    wants are derived: a state nobody is told of is not kept."""
    found: list[Derived] = []
    about = subjects(*many)
    if wanted("order.failed") or wanted("order.partially_failed"):
        for order_id in sorted({c.order_id for c in many if c.order_id}):
            found += await order_outcome(conn, order_id)
    if wanted("mailboxes.ready") and (about.orders or about.subscriptions):
        await lock_mailboxes_subjects(conn, about.orders, about.subscriptions)
        if about.orders:
            found += await orders_mailboxes_ready(conn, about.orders)
        if about.subscriptions:
            found += await subscriptions_mailboxes_ready(conn, about.subscriptions)
    if (about.risky or about.domain_ids or about.domains) and wanted("subscription.at_risk"):
        found += await at_risk(
            conn,
            subscriptions=sorted(about.risky),
            domain_ids=sorted(about.domain_ids),
            domains=sorted(about.domains),
        )
    return found


# --- rejected deliveries, the spool, reconciliation -----------------------------------


def window_of(at: datetime) -> tuple[datetime, datetime]:
    seconds = REJECTED_WINDOW.total_seconds()
    start = datetime.fromtimestamp(at.timestamp() // seconds * seconds, UTC)
    return start, start + REJECTED_WINDOW


async def rejected(
    conn: asyncpg.Connection, *, reason: str, event: str | None, at: datetime
) -> list[Derived]:
    """deliveries.rejected at the first rejection of its cause in its window; the window's
    count is on the dashboard page it links to (the later ones write nothing)."""
    start, end = window_of(at)
    is_new, _ = await changed(conn, "deliveries.rejected", f"{reason}:{start.isoformat()}", "1")
    if not is_new:
        return []
    data = {"reason": reason, "event": event, "windowStart": iso(start), "windowEnd": iso(end)}
    return [Derived("deliveries.rejected", data)]


async def spool_started(
    conn: asyncpg.Connection, *, replica: str, since: datetime, depth: int
) -> list[Derived]:
    """Written with the first spooled delivery applied: while deliveries are spooled the
    database is away, so this is when it can be told (with when spooling began)."""
    is_new, _ = await changed(conn, "spool", replica, "spooling", initial="empty")
    if not is_new:
        return []
    data = {"replica": replica, "since": iso(since), "depth": depth}
    return [Derived("spool.started", data)]


async def spool_drained(
    conn: asyncpg.Connection, *, replica: str, applied: int, seconds: float
) -> list[Derived]:
    is_new, _ = await changed(conn, "spool", replica, "empty", initial="empty")
    if not is_new:
        return []
    data = {"replica": replica, "applied": applied, "seconds": round(seconds, 3)}
    return [Derived("spool.drained", data)]


async def reconcile_drift(conn: asyncpg.Connection, report: dict[str, Any]) -> list[Derived]:
    """reconcile.drift when a run finds drift other than the last run's (the same drift
    found again writes nothing; none found is remembered)."""
    kinds = ("unknown", "missingMailboxes", "differences")
    drift = {kind: report.get(kind, []) for kind in kinds}
    state = orjson.dumps(drift, option=orjson.OPT_SORT_KEYS).decode() if report["drift"] else ""
    is_new, _ = await changed(conn, "reconcile.drift", "reconciliation", state)
    if not is_new or not state:
        return []
    data = {"ranAt": report.get("finishedAt"), "drift": report["drift"]}
    data |= {kind: len(items) for kind, items in drift.items()}
    return [Derived("reconcile.drift", data)]


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
