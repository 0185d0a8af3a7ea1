"""What renews soon and what is at risk: one definition, read by the API (`/renewals`), the
dashboard's overview and the `cmr_subscriptions_at_risk` gauges.

A subscription is due when its period ends (`expiryDate`, which a period's end sets)
within N days, or has already ended while it is still meant to run, or it is PAST_DUE.
One that is over for good (EXPIRED or CANCELLED) stays on the list for N days after its
end, then leaves it.
Its monthly cost is its price per mailbox times the mailboxes it is billed for: its
quantity, else its mailbox count.
"""

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from sqlalchemy import text
from sqlalchemy.engine import Row

from app.reading import resources
from app.reading.reader import Reader
from app.reading.resources import Risk

RISKS: tuple[str, ...] = get_args(Risk)
DEFAULT_DAYS = 30
# The registrar state of a subscription's domain (by its ID, else its name), as the read
# API shows it.
DOMAIN_OF = """
SELECT status, expiry_date FROM domains
WHERE domain_id = s.domain_id OR name = s.domain
ORDER BY expiry_date DESC NULLS LAST, domain_rank(status) DESC NULLS LAST,
    version DESC
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
# The risks of subscription s whose domain is d (renewal_failed: its own renewal or its
# domain's; overdue: its period ended and no renewal was heard).
RISKS_OF = f"""array_remove(ARRAY[
    CASE WHEN s.subscription_status = 'PAST_DUE' THEN 'past_due' END,
    CASE WHEN {OWN_RENEWAL_FAILED} OR d.status = 'RENEWAL_FAILED' THEN 'renewal_failed' END,
    CASE WHEN s.auto_renew IS FALSE
        AND coalesce(s.subscription_status, 'ACTIVE') NOT IN ('EXPIRED', 'CANCELLED')
        THEN 'auto_renew_off' END,
    CASE d.status WHEN 'GRACE_PERIOD' THEN 'domain_grace_period'
        WHEN 'EXPIRED' THEN 'domain_expired' END,
    CASE WHEN s.expiry_date < now()
        AND coalesce(s.subscription_status, 'ACTIVE') IN ('ACTIVE', 'RENEWING')
        THEN 'overdue' END,
    CASE WHEN s.subscription_status = 'EXPIRED' THEN 'expired' END,
    CASE WHEN s.subscription_status = 'CANCELLED' THEN 'cancelled' END
], NULL)"""

# Which subscriptions are on the list (see above), and how many mailboxes each is billed
# for: its quantity, else the mailboxes stored (counted only then).
DUE = """
(s.expiry_date < now() + make_interval(days => :days) OR s.subscription_status = 'PAST_DUE')
AND (coalesce(s.subscription_status, 'ACTIVE') NOT IN ('EXPIRED', 'CANCELLED')
    OR s.expiry_date >= now() - make_interval(days => :days))
"""
STORED = "(SELECT count(*) FROM mailboxes m WHERE m.subscription_id = s.subscription_id)"
BILLED = f"coalesce(s.lifecycle_quantity, s.quantity, {STORED})"
# Most urgent first: the earliest end (unknown first), then the row's id, as the index
# ix_subscriptions_renews_at has them, so a page reads only its own rows; a cursor is the
# last (end, id).
RENEWS_AT = "coalesce(s.expiry_date, 'epoch'::timestamptz)"
# Each subscription of a page with what the read API shows of it, its risks and its cost.
PAGE = text(
    f"""
SELECT s.id, s.subscription_id, s.domain, s.domain_id, s.user_id, s.user_email, s.provider,
    s.source, s.status, s.order_id, s.expiry_date, s.price,
    coalesce(s.lifecycle_quantity, s.quantity) AS quantity,
    s.subscription_status, s.period_start, s.period_end, s.auto_renew, s.lifecycle_source,
    s.created_at, s.updated_at, s.expiry_date AS renews_at, s.sort_at,
    d.status AS domain_status, d.expiry_date AS domain_expiry_date,
    {STORED} AS mailbox_count, s.price * {BILLED} AS monthly_cost,
    {RISKS_OF} AS risks
FROM (
    SELECT s.*, {RENEWS_AT} AS sort_at FROM subscriptions s
    WHERE {DUE} AND ({RENEWS_AT}, s.id) > (:after_at, :after_id)
    ORDER BY {RENEWS_AT}, s.id LIMIT :limit
) s
LEFT JOIN LATERAL ({DOMAIN_OF}) d ON true
ORDER BY s.sort_at, s.id"""
)
# Per user over the whole list. Subscriptions whose quantity is known (nearly all) are
# summed apart from those whose stored mailboxes must be counted, so the count's subquery
# does not hold the large part to one serial scan (660 ms against 100 ms, 200,000 rows).
TOTALS = text(
    f"""SELECT user_id, max(user_email) AS user_email, sum(subscriptions) AS subscriptions,
        sum(mailboxes) AS mailboxes, sum(monthly_cost) AS monthly_cost
    FROM (
        SELECT s.user_id, max(s.user_email) AS user_email, count(*) AS subscriptions,
            sum(coalesce(s.lifecycle_quantity, s.quantity)) AS mailboxes,
            sum(s.price * coalesce(s.lifecycle_quantity, s.quantity)) AS monthly_cost
        FROM subscriptions s
        WHERE {DUE} AND coalesce(s.lifecycle_quantity, s.quantity) IS NOT NULL
        GROUP BY s.user_id
        UNION ALL
        SELECT s.user_id, max(s.user_email), count(*), sum({STORED}), sum(s.price * {STORED})
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


TOTALS_SECONDS = 60.0  # totals walk the whole list: once a minute per process and window


@dataclass
class TotalsCache:
    """The last totals per window, reused for TOTALS_SECONDS: a page of renewals reads only
    its own rows, but its totals sum every subscription on the list (100 ms and more with
    200,000 of them), which the overview must not pay on every view."""

    kept: dict[int, tuple[float, datetime, list[Any]]] = field(default_factory=dict)

    async def get(
        self, days: int, compute: Callable[[], Awaitable[list[Any]]]
    ) -> tuple[datetime, list[Any]]:
        """The totals and when they were computed."""
        known = self.kept.get(days)
        if known is None or time.monotonic() - known[0] >= TOTALS_SECONDS:
            known = (time.monotonic(), datetime.now(UTC), await compute())
            self.kept[days] = known
        return known[1], known[2]


def page_params(days: int, after: tuple[datetime, int] | None, limit: int) -> dict[str, Any]:
    at, row_id = after or (datetime(1, 1, 1, tzinfo=UTC), 0)
    return {"days": days, "after_at": at, "after_id": row_id, "limit": limit}


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
    limit: int = Field(50, ge=1, le=500, description="Page size, at most 500")
    cursor: str | None = Field(
        None, pattern=r"^-?[0-9]{1,17}-[0-9]{1,18}$", description="`nextCursor` of the last page"
    )

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
    return f"{(row.sort_at - EPOCH) // timedelta(microseconds=1)}-{row.id}"


async def list_renewals(
    conn: Reader, query: RenewalQuery, cache: TotalsCache
) -> resources.RenewalPage:
    """Each with its risks, mailbox count and monthly cost; `totals` per userId (computed at
    most once a minute: `totalsAt` says when)."""
    params = page_params(query.within_days, query.after(), query.limit + 1)
    rows = (await conn.execute(PAGE.bindparams(**params))).all()

    async def totals() -> list[Any]:
        sums = await conn.execute(TOTALS.bindparams(days=query.within_days))
        return [resources.RenewalTotal.model_validate(t._asdict()) for t in sums]

    totals_at, per_user = await cache.get(query.within_days, totals)
    cursor = renewal_cursor(rows[query.limit - 1]) if len(rows) > query.limit else None
    return resources.RenewalPage(
        items=[resources.Renewal.model_validate(r._asdict()) for r in rows[: query.limit]],
        next_cursor=cursor,
        totals=per_user,
        totals_at=totals_at,
    )
