"""Deliveries by outcome over 24 hours, 7 days or 30 days, and how many of them waited in
the spool: an outage shows as deliveries that went through the spool (kept at the time
they arrived), or as a gap where none arrived at all.

A week or a month reads hundreds of thousands of events: each process counts a bucket once
it has settled (ended an hour ago: the sender's retries come within minutes) and keeps it,
so each render counts only the last hour or so afresh. The same counts, by signature form,
are the overview's "Signatures" table (its 24 h read 28,000 events a render at 5M events)."""

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy import text

from app.reading.reader import Reader

OUTCOMES = ("processed", "ignored", "duplicate", "rejected")
SERIES = (*OUTCOMES, "spooled")  # spooled: processed or ignored after waiting in the spool
# and a series per signature form seen, stored or rejected ("signature valid")
SIGNED = "signature "
Range = Literal["24h", "7d", "30d"]
RANGES: dict[str, tuple[timedelta, timedelta]] = {  # span, bucket
    "24h": (timedelta(hours=24), timedelta(minutes=1)),
    "7d": (timedelta(days=7), timedelta(hours=1)),
    "30d": (timedelta(days=30), timedelta(hours=4)),
}
SETTLED = timedelta(hours=1)
ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)  # buckets are aligned on it (UTC midnight)

COUNTS = text(
    "SELECT date_bin(:step, first_received_at, :origin) AS b, status AS outcome, signature,"
    " count(*) AS n, count(*) FILTER (WHERE spooled) AS spooled"
    " FROM events WHERE first_received_at >= :since GROUP BY 1, 2, 3"
    " UNION ALL SELECT date_bin(:step, last_received_at, :origin), 'duplicate', NULL,"
    " sum(deliveries - 1), 0 FROM events"
    " WHERE first_received_at >= :since - interval '1 day' AND last_received_at >= :since"
    " AND deliveries > 1 GROUP BY 1"
    " UNION ALL SELECT date_bin(:step, received_at, :origin), 'rejected', signature, count(*), 0"
    " FROM rejected_deliveries WHERE received_at >= :since GROUP BY 1, 3"
)

Counts = dict[str, dict[datetime, int]]


def bucket_of(at: datetime, step: timedelta) -> datetime:
    return ORIGIN + (at - ORIGIN) // step * step


def empty() -> Counts:
    return {series: {} for series in SERIES}


@dataclass
class SettledBuckets:
    """One process's counts of settled buckets, per bucket size."""

    counts: dict[timedelta, Counts] = field(default_factory=dict)
    until: dict[timedelta, datetime] = field(default_factory=dict)  # settled up to here

    def keep(self, step: timedelta, fresh: Counts, since: datetime, now: datetime) -> Counts:
        """Merge what was counted with what was kept; keep the settled buckets of `fresh`."""
        settled = bucket_of(now - SETTLED, step)
        kept = self.counts.setdefault(step, empty())
        for series, buckets in fresh.items():
            kept.setdefault(series, {})
            for at, n in buckets.items():
                if at < settled:
                    kept[series][at] = n
        for buckets in kept.values():
            for at in [at for at in buckets if at < since]:
                del buckets[at]
        self.until[step] = max(settled, since)
        merged = empty()
        for series in kept.keys() | fresh.keys():
            merged[series] = kept.get(series, {}) | {
                at: n for at, n in fresh.get(series, {}).items() if at >= settled
            }
        return merged


async def count(conn: Reader, since: datetime, step: timedelta) -> Counts:
    counts = empty()
    stmt = COUNTS.bindparams(step=step, origin=ORIGIN, since=since)
    for row in await conn.execute(stmt):
        counts[row.outcome][row.b] = counts[row.outcome].get(row.b, 0) + int(row.n)
        if row.signature is not None:
            signed = counts.setdefault(SIGNED + row.signature, {})
            signed[row.b] = signed.get(row.b, 0) + int(row.n)
        if row.spooled:
            counts["spooled"][row.b] = counts["spooled"].get(row.b, 0) + int(row.spooled)
    return counts


async def deliveries(
    conn: Reader, span: Range, cache: SettledBuckets | None = None
) -> tuple[datetime, timedelta, int, Counts]:
    """(the first bucket, the bucket size, how many buckets, the counts by series)."""
    length, step = RANGES[span]
    now = datetime.now(UTC)
    buckets = length // step
    since = bucket_of(now, step) - (buckets - 1) * step
    if cache is None:
        return since, step, buckets, await count(conn, since, step)
    start = max(since, cache.until.get(step, since))
    return since, step, buckets, cache.keep(step, await count(conn, start, step), since, now)


def signatures(counts: Counts) -> list[tuple[str, int]]:
    """Deliveries per signature form (stored and rejected) in these counts, the commonest
    first."""
    totals = [
        (series.removeprefix(SIGNED), sum(buckets.values()))
        for series, buckets in counts.items()
        if series.startswith(SIGNED)
    ]
    return sorted([(form, n) for form, n in totals if n], key=lambda t: (-t[1], t[0]))
