"""The search indexer: copies each mailbox's and subscription's search text (models.
MAILBOX_SEARCH, SUBSCRIPTION_SEARCH) into its side table, whose trigram index `q` reads, so
that a delivery no longer maintains a trigram index (about 1,800 of its WAL bytes,
docs/benchmark.md).

It walks the rows whose search text was written since its mark (`search_marks`) in
(search_written_at, id) order, found by a BRIN index (migration 0028: no b-tree entry per
delivery, and a write that changes no searched column changes no indexed one), in
batches, and upserts only the texts that changed. Every write of a searched column sets
search_written_at to its transaction's start (now()), so a row's current text has a
search_written_at no earlier than the oldest transaction in progress when the walk began:
the mark goes no further than that (less a margin), and every row before the mark has its
current text in the side table.
A search reads the side table's matches and the rows written since the mark, and re-checks
each row's own text (reading/queries/paging.py): exact, with no lag.
"""

import asyncio
import logging
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import raw_connection
from app.models import CHANGED_PAGES_PER_RANGE, MAILBOX_SEARCH, SUBSCRIPTION_SEARCH

log = logging.getLogger("coldmail.search_index")

BATCH = 5000
# One indexer at a time across workers and replicas: a session-level advisory lock.
INDEXER_LOCK = 0x636D7773  # "cmws"
# Source table -> (side table, search text).
SIDES = {
    "mailboxes": ("mailbox_search", MAILBOX_SEARCH),
    "subscriptions": ("subscription_search", SUBSCRIPTION_SEARCH),
}

# How far the mark may go: the start of the oldest transaction of this database in
# progress (a row it writes gets that time as search_written_at, whenever it commits), or now,
# less a margin: a backend takes its transaction's time a moment before it shows it in
# pg_stat_activity, and a session of another role shows none. Read before the walk, so a
# transaction that commits during it started after this time.
MARGIN_SECONDS = 1.0
SAFE_MARK = """SELECT least(now(), min(xact_start)) - make_interval(secs => $1)
FROM pg_stat_activity
WHERE datname = current_database() AND backend_type = 'client backend'
    AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"""
MARK = "SELECT indexed_before FROM search_marks WHERE name = $1"
SET_MARK = "UPDATE search_marks SET indexed_before = greatest(indexed_before, $2) WHERE name = $1"


def copy_batch(table: str) -> str:
    """One batch: the next rows after ($1, $2) written before $3 (at most $4), their texts
    upserted where they changed; how many rows, how many texts written, and the last key."""
    side, expression = SIDES[table]
    return f"""WITH batch AS (
    SELECT id, search_written_at AS written_at, {expression} AS text FROM {table}
    WHERE search_written_at >= $1 AND (search_written_at, id) > ($1, $2)
        AND search_written_at < $3
    ORDER BY search_written_at, id LIMIT $4
), written AS (
    INSERT INTO {side} AS side (id, text) SELECT id, text FROM batch
    ON CONFLICT (id) DO UPDATE SET text = EXCLUDED.text
    WHERE side.text IS DISTINCT FROM EXCLUDED.text
    RETURNING 1
), last AS (SELECT written_at, id FROM batch ORDER BY written_at DESC, id DESC LIMIT 1)
SELECT (SELECT count(*) FROM batch) AS rows, (SELECT count(*) FROM written) AS written,
    (SELECT written_at FROM last) AS written_at, (SELECT id FROM last) AS id"""


async def index_table(conn: Any, table: str, upto: datetime, batch: int = BATCH) -> int:
    """Copy `table`'s rows written between its mark and `upto` into its side table, moving
    the mark after each batch; how many texts were written."""
    after, after_id, written = await conn.fetchval(MARK, table), 0, 0
    sql = copy_batch(table)
    while after < upto:
        row = await conn.fetchrow(sql, after, after_id, upto, batch)
        written += row["written"]
        if row["rows"] < batch:
            await conn.execute(SET_MARK, table, upto)
            break
        # every row before this key is copied: a text written since has a later time
        after, after_id = row["written_at"], row["id"]
        await conn.execute(SET_MARK, table, after)
    return written


# The table's last full block ranges (up to RECENT_RANGES) summarised in its BRIN index on
# search_written_at, if not yet: a range not summarised is read by every search and walk. The
# last range, still filling, is left alone: summarised, each insert into it would widen
# its summary, a WAL record per delivery. Autosummarize does the same, but only when
# autovacuum next visits the database.
RECENT_RANGES = 64
SUMMARIZE = f"""SELECT coalesce(sum(brin_summarize_range($1::regclass, block)), 0)
FROM (SELECT pg_relation_size($2::regclass) / current_setting('block_size')::int
    / {CHANGED_PAGES_PER_RANGE} AS ranges) size,
    generate_series(greatest(ranges - {RECENT_RANGES}, 0) * {CHANGED_PAGES_PER_RANGE},
        (ranges - 1) * {CHANGED_PAGES_PER_RANGE}, {CHANGED_PAGES_PER_RANGE}) block"""


async def summarize(conn: Any, table: str) -> None:
    """SUMMARIZE, which only the index's owner may run: the role that migrated the
    database. Under another role, autosummarize alone does it."""
    try:
        async with conn.transaction():
            await conn.fetchval(SUMMARIZE, f"ix_{table}_search_written_at", table)
    except asyncpg.InsufficientPrivilegeError:
        pass


async def index_once(conn: Any, batch: int = BATCH, margin: float = MARGIN_SECONDS) -> int:
    """One walk of both tables up to the safe mark; how many texts were written."""
    upto, written = await conn.fetchval(SAFE_MARK, margin), 0
    for table in SIDES:
        await summarize(conn, table)
        written += await index_table(conn, table, upto, batch)
    return written


async def walk(engine: AsyncEngine, margin: float = MARGIN_SECONDS) -> None:
    """One walk, in one transaction, unless another worker or replica is walking. The lock
    is the transaction's (released at its end, on the server connection that took it), so a
    transaction pooler such as PgBouncer cannot leave it held by a connection the walk no
    longer has."""
    async with raw_connection(engine) as conn, conn.transaction():
        if await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", INDEXER_LOCK):
            await index_once(conn, margin=margin)


async def index_forever(engine: AsyncEngine, every: float) -> None:
    """Inside `serve`: every `every` seconds (SEARCH_INDEX_INTERVAL_SECONDS), if no other
    worker or replica is indexing, one walk. A failed walk is tried next time; the first
    failure is logged, and the first walk that works again, not every try between (the
    database away for an hour would otherwise log 3,600 warnings)."""
    failing = False
    while True:
        try:
            await walk(engine)
        except Exception as error:  # the database away, say: next time
            if not failing:
                log.warning("search indexing failed: %s; trying again", type(error).__name__)
            failing = True
        else:
            if failing:
                log.info("search indexing works again")
            failing = False
        await asyncio.sleep(every)
