"""What renews soon and what is at risk: one definition, read by the API (`/renewals`), the
dashboard's overview and the `cmr_subscriptions_at_risk` gauges.

A subscription is due when its period ends (`expiryDate`, which a period's end sets)
within N days, or has already ended while it is still meant to run, or it is PAST_DUE.
One that is over for good (EXPIRED or CANCELLED) stays on the list for N days after its
end, then leaves it.
Its monthly cost is its price per mailbox times the mailboxes it is billed for: its
quantity, else its mailbox count; unknown (never 0) when its price is.

The list is a queue: each subscription on it is `due` this week (its period ends within 7
days), later, overdue (ended within the last LAPSED_DAYS days while still meant to run),
lapsed (ended longer ago than that with no word since: probably over, though the sender
never said), ended (EXPIRED or CANCELLED) or undated; filters choose a date range, a risk
and a customer, and the sums cover every page the filters choose.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from sqlalchemy import TextClause, text
from sqlalchemy.engine import Row

from app.reading import exports, resources
from app.reading.queries.paging import Ident, UtcTime, in_utc
from app.reading.reader import Reader
from app.reading.resources import Risk

T = TypeVar("T")

RISKS: tuple[str, ...] = get_args(Risk)
DEFAULT_DAYS = 30
# The registrar state of a subscription's domain (by its ID, else its name), as the read
# API shows it: of the domains with its ID or name, the first in this order.
LATEST_DOMAIN = "expiry_date DESC NULLS LAST, domain_rank(status) DESC NULLS LAST, version DESC"
DOMAIN_OF = f"""
SELECT status, expiry_date FROM domains
WHERE domain_id = s.domain_id OR name = s.domain
ORDER BY {LATEST_DOMAIN}
LIMIT 1"""
# A domain's registrar states that put its subscriptions at risk.
DOMAIN_RISKS = {
    "RENEWAL_FAILED": "renewal_failed",
    "GRACE_PERIOD": "domain_grace_period",
    "EXPIRED": "domain_expired",
}
RISKY_STATES = ", ".join(f"'{state}'" for state in DOMAIN_RISKS)
DOMAIN_RISK_NAMES = ", ".join(f"'{risk}'" for risk in DOMAIN_RISKS.values())
# The subscription's own renewal failed: its latest renewal.failed is later than its
# latest renewal.success, and no period after the failed one's is known (the columns are
# kept by merge.SUBSCRIPTION_LIFECYCLE).
OWN_RENEWAL_FAILED = """(s.renewal_failed_at > coalesce(s.renewal_succeeded_at, '-infinity')
    AND coalesce(s.period_end <= s.renewal_failed_period_end, true))"""
# The risks of subscription s whose domain is d, each with its condition (renewal_failed:
# its own renewal or its domain's; overdue: its period ended and no renewal was heard).
RISK_WHEN = {
    "past_due": "s.subscription_status = 'PAST_DUE'",
    "renewal_failed": f"{OWN_RENEWAL_FAILED} OR d.status = 'RENEWAL_FAILED'",
    "auto_renew_off": """s.auto_renew IS FALSE
        AND coalesce(s.subscription_status, 'ACTIVE') NOT IN ('EXPIRED', 'CANCELLED')""",
    "domain_grace_period": "d.status = 'GRACE_PERIOD'",
    "domain_expired": "d.status = 'EXPIRED'",
    "overdue": """s.expiry_date < now()
        AND coalesce(s.subscription_status, 'ACTIVE') IN ('ACTIVE', 'RENEWING')""",
    "expired": "s.subscription_status = 'EXPIRED'",
    "cancelled": "s.subscription_status = 'CANCELLED'",
}
RISKS_OF = "array_remove(ARRAY[{}], NULL)".format(
    ", ".join(f"CASE WHEN {when} THEN '{risk}' END" for risk, when in RISK_WHEN.items())
)

# Which subscriptions are on the list (see above), and how many mailboxes each is billed
# for: its quantity, else the mailboxes stored (counted only then).
DUE = """
(s.expiry_date < now() + make_interval(days => :days) OR s.subscription_status = 'PAST_DUE')
AND (coalesce(s.subscription_status, 'ACTIVE') NOT IN ('EXPIRED', 'CANCELLED')
    OR s.expiry_date >= now() - make_interval(days => :days))
"""
STORED = "(SELECT count(*) FROM mailboxes m WHERE m.subscription_id = s.subscription_id)"
BILLED = f"coalesce(s.lifecycle_quantity, s.quantity, {STORED})"
LAPSED_DAYS = 14
WEEK = "interval '7 days'"
LAPSE = f"make_interval(days => {LAPSED_DAYS})"
# Which part of the queue a subscription on the list is in: each part's condition (they
# exclude each other and cover every row), and the part by its name.
RUNNING = "(coalesce(s.subscription_status, 'ACTIVE') NOT IN ('EXPIRED', 'CANCELLED'))"
DUE_WHEN = {
    "undated": "s.expiry_date IS NULL",
    "ended": f"s.expiry_date IS NOT NULL AND NOT {RUNNING}",
    "later": f"{RUNNING} AND s.expiry_date >= now() + {WEEK}",
    "this_week": f"{RUNNING} AND s.expiry_date >= now() AND s.expiry_date < now() + {WEEK}",
    "overdue": f"{RUNNING} AND s.expiry_date >= now() - {LAPSE} AND s.expiry_date < now()",
    "lapsed": f"{RUNNING} AND s.expiry_date < now() - {LAPSE}",
}
DUE_NOW = f"CASE {' '.join(f'WHEN {when} THEN {due!r}' for due, when in DUE_WHEN.items())} END"
# Most urgent first: the earliest end (unknown first), then the row's id, as the index
# ix_subscriptions_renews_at has them, so a page reads only its own rows; a cursor is the
# last (end, id).
RENEWS_AT = "coalesce(s.expiry_date, 'epoch'::timestamptz)"
# The queue's filters. Each is a parameter, NULL when not given: the read pool plans each
# statement with its values (custom plans), so an absent filter folds away. The date range
# and `due` also bound RENEWS_AT, so the index reads only the rows within them.
LOWER = f"""coalesce(greatest(CAST(:renews_from AS timestamptz),
    CASE CAST(:due AS text) WHEN 'this_week' THEN now() WHEN 'later' THEN now() + {WEEK}
        WHEN 'overdue' THEN now() - {LAPSE} WHEN 'undated' THEN 'epoch'::timestamptz END),
    '-infinity')"""
UPPER = f"""coalesce(least(CAST(:renews_before AS timestamptz),
    CASE CAST(:due AS text) WHEN 'this_week' THEN now() + {WEEK} WHEN 'overdue' THEN now()
        WHEN 'lapsed' THEN now() - {LAPSE}
        WHEN 'undated' THEN 'epoch'::timestamptz + interval '1 microsecond' END),
    'infinity')"""
# The list reaches `renewsBefore` when it lies beyond `withinDays`.
QUEUED = DUE.replace(
    "now() + make_interval(days => :days)",
    "greatest(now() + make_interval(days => :days), CAST(:renews_before AS timestamptz))",
)
# `due`: its part's condition alone, folded as `risk` is (below): the planner estimates it
# from the columns' statistics, where `DUE_NOW = :due` was a guess of 0.5% that made it
# sort the whole of a date range's week (5,700 rows, 165-430 ms at 200,000 subscriptions)
# rather than walk the queue's order to the page's end.
DUE_FILTER = f"""CASE CAST(:due AS text) {
    " ".join(f"WHEN '{due}' THEN ({when})" for due, when in DUE_WHEN.items())
} ELSE true END"""
# The domain risks asked for by `risk`: the subscription's domain's state (DOMAIN_OF),
# looked up only for a subscription that has a risky domain by ID or name. A page tests
# that within the lookup, which the planner then costs as a lookup a row, so it walks the
# queue's order and stops at the page's end (25 ms for overdue + renewal_failed at 200,000
# subscriptions); the sums, which read every row chosen, test it first in a CASE against
# hashes of the few risky domains (as RISK_COUNTS does), so no lookup starts for the rest
# (a lookup started for every row: 1.1 s against 0.4 s). Given the CASE, the planner took
# a page's lookups for cheap and sorted the whole overdue part (150-300 ms).
HAS_RISKY_DOMAIN = f"""(
    s.domain_id IN (SELECT domain_id FROM domains WHERE status IN ({RISKY_STATES}))
    OR s.domain IN (SELECT name FROM domains WHERE status IN ({RISKY_STATES})))"""
LATEST_STATUS = f"""(SELECT status FROM domains
    WHERE {{}} (domain_id = s.domain_id OR name = s.domain) ORDER BY {LATEST_DOMAIN} LIMIT 1)"""
PAGE_DOMAIN_STATUS = LATEST_STATUS.format(f"{HAS_RISKY_DOMAIN} AND")
SUMS_DOMAIN_STATUS = f"CASE WHEN {HAS_RISKY_DOMAIN} THEN {LATEST_STATUS.format('')} END"
# A customer's subscriptions (by userId, or email in any case), when given.
CUSTOMER = """(CAST(:user_id AS text) IS NULL OR s.user_id = :user_id)
    AND (CAST(:user_email AS text) IS NULL OR lower(s.user_email) = lower(:user_email))"""


def filters(domain_status: str) -> str:
    """Which subscriptions the filters but the customer (CUSTOMER) choose; `risk` by its
    condition alone (the read pool's custom plans fold the CASE on the given value), so a
    risk of the subscription's own never looks up its domain, and one that needs no domain
    costs only its own test a row (`:risk = ANY(risks)` read the domains of every row: 2.7 s
    for a whole list's sums at 200,000 subscriptions)."""
    risks = " ".join(
        f"WHEN '{risk}' THEN ({when.replace('d.status', domain_status)})"
        for risk, when in RISK_WHEN.items()
    )
    return f"""{QUEUED}
    AND {RENEWS_AT} >= {LOWER} AND {RENEWS_AT} < {UPPER}
    AND {DUE_FILTER}
    AND CASE CAST(:risk AS text) {risks} ELSE true END"""


FILTERS = f"{filters(SUMS_DOMAIN_STATUS)} AND {CUSTOMER}"  # a page has its own (see above)
# The rows a page chooses from: the whole queue's, walked in its order; or a customer's,
# few enough (7,000 for the largest of 200,000 subscriptions) to be read from their own
# range of (user_id, id) or (lower(user_email), id) and sorted (migration 0031). Those are
# fenced (OFFSET 0) from the page's order: for a customer it takes for large, the planner
# would walk the whole queue's order until the page is full, which for one with none of
# their 5,000 subscriptions on the list is the list's end (140-290 ms at 200,000, 3 ms
# fenced: docs/benchmark.md).
QUEUE = f"(SELECT * FROM subscriptions s WHERE {CUSTOMER}) s"
CUSTOMERS = f"(SELECT * FROM subscriptions s WHERE {CUSTOMER} OFFSET 0) s"


def rows_of(filters: dict[str, Any]) -> str:
    """The rows a page of these filters chooses from."""
    return QUEUE if filters["user_id"] is None and filters["user_email"] is None else CUSTOMERS


def chosen(rows: str) -> str:
    """A page of the queue: the rows the filters choose after the cursor, in its order."""
    return f"""
    SELECT s.*, {RENEWS_AT} AS sort_at FROM {rows}
    WHERE {filters(PAGE_DOMAIN_STATUS)} AND ({RENEWS_AT}, s.id) > (:after_at, :after_id)
    ORDER BY {RENEWS_AT}, s.id LIMIT :limit"""


def page(rows: str) -> TextClause:
    """Each subscription of a page with what the read API shows of it, its risks and cost."""
    return text(
        f"""
SELECT s.id, s.subscription_id, s.domain, s.domain_id, s.user_id, s.user_email, s.provider,
    s.source, s.status, s.order_id, s.expiry_date, s.price,
    coalesce(s.lifecycle_quantity, s.quantity) AS quantity,
    s.subscription_status, s.period_start, s.period_end, s.auto_renew, s.lifecycle_source,
    s.created_at, s.updated_at, s.expiry_date AS renews_at, s.sort_at, {DUE_NOW} AS due,
    d.status AS domain_status, d.expiry_date AS domain_expiry_date,
    {STORED} AS mailbox_count, s.price * {BILLED} AS monthly_cost,
    {RISKS_OF} AS risks
FROM ({chosen(rows)}) s
LEFT JOIN LATERAL ({DOMAIN_OF}) d ON true
ORDER BY s.sort_at, s.id"""
    )


PAGE = {rows: page(rows) for rows in (QUEUE, CUSTOMERS)}
# What the filters choose (every one but `due`), summed per `due`: the queue's tabs and its
# grand total. Apart for those whose stored mailboxes must be counted, as in TOTALS.
SUMS = text(
    f"""SELECT due, sum(n) AS subscriptions, sum(mailboxes) AS mailboxes,
        sum(monthly_cost) AS monthly_cost, sum(unknown_cost) AS unknown_cost
    FROM (
        SELECT {DUE_NOW} AS due, count(*) AS n,
            sum(coalesce(s.lifecycle_quantity, s.quantity)) AS mailboxes,
            sum(s.price * coalesce(s.lifecycle_quantity, s.quantity)) AS monthly_cost,
            count(*) FILTER (WHERE s.price IS NULL) AS unknown_cost
        FROM subscriptions s
        WHERE {FILTERS} AND coalesce(s.lifecycle_quantity, s.quantity) IS NOT NULL
        GROUP BY 1
        UNION ALL
        SELECT {DUE_NOW}, count(*), sum({STORED}), sum(s.price * {STORED}),
            count(*) FILTER (WHERE s.price IS NULL)
        FROM subscriptions s
        WHERE {FILTERS} AND s.lifecycle_quantity IS NULL AND s.quantity IS NULL
        GROUP BY 1
    ) parts
    GROUP BY due"""
)
# SUMS per UTC day of RENEWS_AT as well: a date range's sums are those of the whole days
# within it (read from these, kept a minute) and of the two part days at its ends.
SUMS_BY_DAY = text(
    f"""SELECT day, due, sum(n) AS subscriptions, sum(mailboxes) AS mailboxes,
        sum(monthly_cost) AS monthly_cost, sum(unknown_cost) AS unknown_cost
    FROM (
        SELECT date_trunc('day', {RENEWS_AT}, 'UTC') AS day, {DUE_NOW} AS due, count(*) AS n,
            sum(coalesce(s.lifecycle_quantity, s.quantity)) AS mailboxes,
            sum(s.price * coalesce(s.lifecycle_quantity, s.quantity)) AS monthly_cost,
            count(*) FILTER (WHERE s.price IS NULL) AS unknown_cost
        FROM subscriptions s
        WHERE {FILTERS} AND coalesce(s.lifecycle_quantity, s.quantity) IS NOT NULL
        GROUP BY 1, 2
        UNION ALL
        SELECT date_trunc('day', {RENEWS_AT}, 'UTC'), {DUE_NOW}, count(*), sum({STORED}),
            sum(s.price * {STORED}), count(*) FILTER (WHERE s.price IS NULL)
        FROM subscriptions s
        WHERE {FILTERS} AND s.lifecycle_quantity IS NULL AND s.quantity IS NULL
        GROUP BY 1, 2
    ) parts
    GROUP BY day, due"""
)
# Per user over the whole list. Subscriptions whose quantity is known (nearly all) are
# summed apart from those whose stored mailboxes must be counted, so the count's subquery
# does not hold the large part to one serial scan (660 ms against 100 ms, 200,000 rows).
TOTALS = text(
    f"""SELECT user_id, max(user_email) AS user_email, sum(subscriptions) AS subscriptions,
        sum(mailboxes) AS mailboxes, sum(monthly_cost) AS monthly_cost,
        sum(unknown_cost) AS unknown_cost
    FROM (
        SELECT s.user_id, max(s.user_email) AS user_email, count(*) AS subscriptions,
            sum(coalesce(s.lifecycle_quantity, s.quantity)) AS mailboxes,
            sum(s.price * coalesce(s.lifecycle_quantity, s.quantity)) AS monthly_cost,
            count(*) FILTER (WHERE s.price IS NULL) AS unknown_cost
        FROM subscriptions s
        WHERE {DUE} AND coalesce(s.lifecycle_quantity, s.quantity) IS NOT NULL
        GROUP BY s.user_id
        UNION ALL
        SELECT s.user_id, max(s.user_email), count(*), sum({STORED}), sum(s.price * {STORED}),
            count(*) FILTER (WHERE s.price IS NULL)
        FROM subscriptions s
        WHERE {DUE} AND s.lifecycle_quantity IS NULL AND s.quantity IS NULL
        GROUP BY s.user_id
    ) parts
    GROUP BY user_id ORDER BY sum(monthly_cost) DESC NULLS LAST, user_id"""
)
# For the gauges: the risks counted without the domains (d has no status), then the
# domains' risks for only the subscriptions that have a risky domain by ID or name (the
# domain lookup for all 200,000 took 3 s), but a renewal_failed of the subscription's own,
# counted in the first part; then the whole list.
RISK_COUNTS = text(
    f"""SELECT risk, count(*) AS n
    FROM subscriptions s CROSS JOIN (SELECT NULL::varchar AS status) d, unnest({RISKS_OF}) risk
    WHERE {DUE} GROUP BY risk
    UNION ALL
    SELECT risk, count(*)
    FROM subscriptions s LEFT JOIN LATERAL ({DOMAIN_OF}) d ON true, unnest({RISKS_OF}) risk
    WHERE {DUE} AND risk IN ({DOMAIN_RISK_NAMES})
        AND NOT (risk = 'renewal_failed' AND coalesce({OWN_RENEWAL_FAILED}, false))
        AND (s.domain_id IN (SELECT domain_id FROM domains WHERE status IN ({RISKY_STATES}))
            OR s.domain IN (SELECT name FROM domains WHERE status IN ({RISKY_STATES})))
    GROUP BY risk
    UNION ALL SELECT 'due', count(*) FROM subscriptions s WHERE {DUE}"""
)


# How long a KeptValues value (the renewal totals of a window and filters, the incomplete
# orders) is reused as it is: the renewal totals walk the whole list, once a minute per
# process and filters (the incomplete orders are counted as often).
FRESH_SECONDS = 60.0
# Kept values older than FRESH_SECONDS but not this are shown while they are computed again
# in the background: the view after the minute no longer waits for a walk of the whole
# list (200-280 ms at 200,000 subscriptions, once a minute per worker). Older than this,
# or never computed, a view waits for its value.
STALE_SECONDS = 600.0
KEPT_KEYS = 256  # the keys (filter combinations) a KeptValues keeps, the least recent dropped
log = logging.getLogger("coldmail.renewals")


@dataclass
class KeptValues:
    """Values computed by a slow read, kept per key and served stale-while-revalidate: the
    renewal totals per window and filters (a page of renewals reads only its own rows, but
    its totals sum every subscription on the list: 100 ms and more with 200,000 of them) and
    the incomplete orders (ui.kept_incomplete), which the overview must not pay for on every
    view. A value is reused for FRESH_SECONDS; past that it is still shown while one task
    computes it again, up to STALE_SECONDS; the time it was computed is returned with it.
    At most KEPT_KEYS keys are kept, the least recently read dropped first."""

    what: str = "renewals"  # in the log line when computing again fails
    kept: dict[Hashable, tuple[float, datetime, Any]] = field(default_factory=dict)
    summing: dict[Hashable, "asyncio.Task[None]"] = field(default_factory=dict)

    async def get(self, key: Hashable, compute: Callable[[], Awaitable[T]]) -> tuple[datetime, T]:
        """The value and when it was computed."""
        known = self.kept.pop(key, None)
        age = STALE_SECONDS if known is None else time.monotonic() - known[0]
        if known is None or age >= STALE_SECONDS:
            known = (time.monotonic(), datetime.now(UTC), await compute())
        elif age >= FRESH_SECONDS and key not in self.summing:
            self.summing[key] = asyncio.create_task(self.sum_again(key, compute))
        self.kept[key] = known  # the most recent last
        while len(self.kept) > KEPT_KEYS:
            del self.kept[next(iter(self.kept))]
        return known[1], known[2]

    async def sum_again(self, key: Hashable, compute: Callable[[], Awaitable[Any]]) -> None:
        try:
            summed = (time.monotonic(), datetime.now(UTC), await compute())
            if key in self.kept:  # not dropped meanwhile as the least recent
                self.kept[key] = summed
        except Exception as error:  # the kept ones stay; a later view tries again
            log.warning("summing %s again failed: %s", self.what, type(error).__name__)
        finally:
            del self.summing[key]

    async def settled(self) -> None:
        """When every value being computed again is (for tests and shutdown)."""
        await asyncio.gather(*self.summing.values())


def risk_counts(rows: Sequence[Row[Any]]) -> dict[str, int]:
    """Every risk (0 where none) and `due`, the number of subscriptions on the list. A risk
    may come in two rows (renewal_failed: of the subscriptions' own, and of their domains')."""
    counts = dict.fromkeys((*RISKS, "due"), 0)
    for row in rows:
        counts[row.risk] += int(row.n)
    return counts


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class RenewalQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    within_days: int = Field(
        DEFAULT_DAYS, ge=1, le=366, description="Renewing within this many days"
    )
    due: resources.Due | None = Field(None, description="One part of the queue (see `due`)")
    risk: Risk | None = Field(None, description="Only those with this risk")
    user_id: Ident | None = Field(None, description="Only this customer's")
    user_email: Ident | None = Field(None, description="Only this customer's (any case)")
    renews_from: UtcTime | None = Field(
        None, description="Ending at or after this (ISO 8601; no offset means UTC)"
    )
    renews_before: UtcTime | None = Field(
        None, description="Ending before this; beyond `withinDays`, the list reaches it"
    )
    limit: int = Field(50, ge=1, le=500, description="Page size, at most 500")
    cursor: str | None = Field(
        None, pattern=r"^-?[0-9]{1,17}-[0-9]{1,18}$", description="`nextCursor` of the last page"
    )

    def filters(self) -> dict[str, Any]:
        """The statements' parameters for the filters (None where not given)."""
        return self.model_dump(
            include={"due", "risk", "user_id", "user_email", "renews_from", "renews_before"}
        ) | {"days": self.within_days}

    def after(self) -> tuple[datetime, int] | None:
        """The last row's (end, id) of the previous page; a time beyond the calendar is its
        edge (any cursor the pattern allows is a valid one)."""
        if self.cursor is None:
            return None
        micros, _, row_id = self.cursor.rpartition("-")
        try:
            at = EPOCH + timedelta(microseconds=int(micros))
        except OverflowError:
            at = datetime.min.replace(tzinfo=UTC)
        return at, int(row_id)


def renewal_cursor(row: Any) -> str:
    """The row's (end, id); a sender's zero date is read back without an offset (see
    resources.SenderTime)."""
    return f"{(in_utc(row.sort_at) - EPOCH) // timedelta(microseconds=1)}-{row.id}"


async def list_renewals(
    conn: Reader, query: RenewalQuery, cache: KeptValues, currency: str
) -> resources.RenewalPage:
    """A page of the queue, each with its risks, mailbox count and monthly cost; the sums of
    every page the filters choose, per `due` and in all; `totals` per userId over the whole
    list. Sums are computed at most once a minute: `totalsAt` says when."""
    filters = query.filters()
    after, row_id = query.after() or (datetime(1, 1, 1, tzinfo=UTC), 0)
    page = PAGE[rows_of(filters)].bindparams(
        **filters, after_at=after, after_id=row_id, limit=query.limit + 1
    )
    rows = (await conn.execute(page)).all()
    totals_at, per_user = await cache.get(
        query.within_days, lambda: per_user_totals(conn, query.within_days)
    )
    by_due = await range_sums(conn, cache, {**filters, "due": None})
    cursor = renewal_cursor(rows[query.limit - 1]) if len(rows) > query.limit else None
    chosen = [part for due, part in by_due.items() if query.due in (None, due)]
    return resources.RenewalPage(
        items=[resources.Renewal.model_validate(r._asdict()) for r in rows[: query.limit]],
        next_cursor=cursor,
        totals=per_user,
        totals_at=totals_at,
        total=total_of(chosen),
        by_due=by_due,
        currency=currency,
    )


async def per_user_totals(conn: Reader, days: int) -> list[resources.RenewalTotal]:
    rows = await conn.execute(TOTALS.bindparams(days=days))
    return [resources.RenewalTotal.model_validate(t._asdict()) for t in rows]


async def sums(conn: Reader, filters: dict[str, Any]) -> dict[str, resources.RenewalSum]:
    """Per `due`, what the filters choose."""
    rows = await conn.execute(SUMS.bindparams(**filters))
    return {row.due: resources.RenewalSum.model_validate(row._asdict()) for row in rows}


DAY = timedelta(days=1)
ENDLESS = datetime.max.replace(tzinfo=UTC)  # a range's end beyond every subscription's


async def range_sums(
    conn: Reader, cache: KeptValues, filters: dict[str, Any]
) -> dict[str, resources.RenewalSum]:
    """`sums`, kept a minute per filters. With an end date (`renewsBefore`), the whole UTC
    days within the range come from the sums per day of the filters without the range (kept
    a minute too), so a range not asked for within the minute costs only its part days at
    either end (an index range each) instead of a walk over the whole list. Within the
    range the list's own end (`withinDays`) holds for every row, as the range ends first."""
    start, end = filters["renews_from"], filters["renews_before"]
    first, last = (start and ceil_day(start)), (end and floor_day(end))
    if end is None or (first is not None and first > last):
        return await cached_sums(conn, cache, filters)
    whole = {**filters, "renews_from": None, "renews_before": ENDLESS}
    _, days = await cache.get(("by_day", *sorted(whole.items())), lambda: sums_by_day(conn, whole))
    parts: dict[str, list[resources.RenewalSum]] = {}
    for day, due, part in days:
        if (first is None or day >= first) and day < last:
            parts.setdefault(due, []).append(part)
    ends = [(start, first), (last, end)] if start is not None else [(last, end)]
    for lower, upper in ends:
        if lower < upper:
            edge = {**filters, "renews_from": lower, "renews_before": upper}
            for due, part in (await cached_sums(conn, cache, edge)).items():
                parts.setdefault(due, []).append(part)
    return {due: total_of(chosen) for due, chosen in parts.items()}


def floor_day(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def ceil_day(at: datetime) -> datetime:
    day = floor_day(at)
    return day if day == at else day + DAY


async def cached_sums(
    conn: Reader, cache: KeptValues, filters: dict[str, Any]
) -> dict[str, resources.RenewalSum]:
    _, by_due = await cache.get(tuple(sorted(filters.items())), lambda: sums(conn, filters))
    return by_due


async def sums_by_day(
    conn: Reader, filters: dict[str, Any]
) -> list[tuple[datetime, str, resources.RenewalSum]]:
    rows = await conn.execute(SUMS_BY_DAY.bindparams(**filters))
    return [(row.day, row.due, resources.RenewalSum.model_validate(row._asdict())) for row in rows]


def total_of(parts: list[resources.RenewalSum]) -> resources.RenewalSum:
    """The sum of parts; its cost unknown only when every part's is (then none is known).
    No part at all is no subscription: it costs 0, not an unknown amount."""
    costs = [p.monthly_cost for p in parts if p.monthly_cost is not None]
    return resources.RenewalSum(
        subscriptions=sum(p.subscriptions for p in parts),
        mailboxes=sum(p.mailboxes for p in parts),
        monthly_cost=sum(costs, Decimal(0)) if costs or not parts else None,
        unknown_cost=sum(p.unknown_cost for p in parts),
    )


CSV_COLUMNS = [
    "renewsAt",
    "due",
    "risks",
    "domain",
    "subscriptionId",
    "userId",
    "userEmail",
    "subscriptionStatus",
    "mailboxCount",
    "quantity",
    "price",
    "monthlyCost",
    "currency",
]


# A page of the download: chosen()'s rows with only the file's cells, in its columns' order,
# and the cursor last (PAGE's 16 other columns, five of them times, were a fifth of the time
# to read a customer's 1,777 rows at 1M mailboxes: 87 against 69 ms, loaded). The domains'
# states are joined to the page as a whole, each row's first in LATEST_DOMAIN's order as
# DOMAIN_OF picks it: for a large page the planner reads the domains once (two hash joins
# over 10,000 domains: the statement ran 30 ms instead of 45, 28 with no domain at all), and
# still looks each row's up when the page is small beside them.
def csv_page_rows(rows: str) -> TextClause:
    """A page of the download (see above)."""
    return text(
        f"""
WITH page AS MATERIALIZED ({chosen(rows)}),
latest_domain AS (
    SELECT DISTINCT ON (id) id, status FROM (
        SELECT p.id, d.status, d.expiry_date, d.version
        FROM page p JOIN domains d ON d.domain_id = p.domain_id
        UNION ALL
        SELECT p.id, d.status, d.expiry_date, d.version
        FROM page p JOIN domains d ON d.name = p.domain
    ) matched
    ORDER BY id, {LATEST_DOMAIN}
)
SELECT s.expiry_date AS renews_at, {DUE_NOW} AS due, array_to_string({RISKS_OF}, ' ') AS risks,
    s.domain,
    s.subscription_id, s.user_id, s.user_email, s.subscription_status,
    {STORED} AS mailbox_count, coalesce(s.lifecycle_quantity, s.quantity) AS quantity, s.price,
    s.price * {BILLED} AS monthly_cost, s.sort_at, s.id
FROM page s
LEFT JOIN latest_domain d ON d.id = s.id
ORDER BY s.sort_at, s.id"""
    )


CSV_PAGE_ROWS = {rows: csv_page_rows(rows) for rows in (QUEUE, CUSTOMERS)}
CSV_PAGE = 2000  # fewer, larger statements: each reads the domains once (see above)


async def queue_csv(conn: Reader, query: RenewalQuery, currency: str) -> AsyncIterator[bytes]:
    """Every page the filters choose, CSV_PAGE rows a statement, behind a UTF-8 BOM (without
    it Excel shows "Müller" as "MÃ¼ller"); an unknown cost is an empty cell (never 0); a
    cell a spreadsheet would run as a formula is neutralised."""
    yield (exports.BOM + exports.csv_text([CSV_COLUMNS])).encode()
    filters = query.filters()
    after: tuple[datetime, int] = (datetime(1, 1, 1, tzinfo=UTC), 0)
    while True:
        page = CSV_PAGE_ROWS[rows_of(filters)].bindparams(
            **filters, after_at=after[0], after_id=after[1], limit=CSV_PAGE
        )
        rows = (await conn.execute(page)).all()
        yield exports.csv_text(csv_rows(rows, currency)).encode()
        if len(rows) < CSV_PAGE:
            return
        after = (rows[-1].sort_at, rows[-1].id)


def csv_rows(rows: Sequence[Any], currency: str) -> list[list[str]]:
    """Each row's cells (CSV_PAGE_ROWS' columns but the cursor) and the currency. `due` and
    `risks` are names of our own, never a formula."""
    neutralise = exports.neutralise
    return [
        [
            "" if when is None else in_utc(when).isoformat(),
            due,
            risks,
            *["" if cell is None else neutralise(str(cell)) for cell in cells],
            currency,
        ]
        for when, due, risks, *cells, _, _ in rows
    ]
