"""How fast the dashboard's overview renders with 100,000 mailboxes and 1,000,000 events.

Fills a scratch database with generated rows (events spread over 30 days, about 33,000 a
day; a few duplicates and rejections in the last day), signs in, and renders /ui through
the real app many times. Prints p50, p95 and max; any answer other than 200 fails the run.

    python bench/dashboard.py [--database-url URL] [--renders 50]
"""

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import time

import asyncpg
import httpx

from app.config import load_settings, normalize_database_url
from app.crypto import generate_key
from app.main import create_app
from app.operations.migrations import upgrade

FILL = [
    """INSERT INTO subscriptions (subscription_id, domain, status, provider, source,
           subscription_status, expiry_date)
       SELECT 'S' || n, 'd' || n || '.com', 'active', 'GOOGLE', 'standard',
              (ARRAY['ACTIVE','RENEWING','PAST_DUE','EXPIRED','CANCELLED'])[1 + n % 5],
              now() + (n % 400) * interval '1 day'
       FROM generate_series(1, 33334) AS n""",
    """INSERT INTO mailboxes (mailbox_id, subscription_id, domain, email, provider, source)
       SELECT 'M' || n, 'S' || (1 + n % 33334), 'd' || (1 + n % 33334) || '.com',
              'box' || n || '@d' || (1 + n % 33334) || '.com', 'GOOGLE', 'standard'
       FROM generate_series(1, 100000) AS n""",
    """INSERT INTO events (event_id, event, status, content_hash, deliveries, conflict,
           signature, payload, first_received_at, last_received_at, event_time)
       SELECT 'E' || n, 'mailbox.created', CASE WHEN n % 50 = 0 THEN 'ignored' ELSE 'processed' END,
              sha256(n::text::bytea), 1 + (n % 40 = 0)::int, n % 5000 = 0,
              (ARRAY['valid','valid','valid','absent'])[1 + n % 4], '{}'::jsonb, t, t, t
       FROM (SELECT n, now() - (n::float / 1000000) * interval '30 days' AS t
             FROM generate_series(1, 1000000) AS n) AS g""",
    """INSERT INTO rejected_deliveries (reason, errors, signature, received_at)
       SELECT 'invalid_payload', '[]'::jsonb, 'valid', now() - n * interval '1 minute'
       FROM generate_series(1, 300) AS n""",
    "ANALYZE",
]


async def fill(url: str, name: str) -> str:
    admin = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    target = url.rsplit("/", 1)[0] + "/" + name
    await asyncio.to_thread(upgrade, target)
    conn = await asyncpg.connect(target.replace("+asyncpg", ""))
    try:
        for statement in FILL:
            await conn.execute(statement)
        print(
            await conn.fetchval("select count(*) from events"),
            "events,",
            await conn.fetchval("select count(*) from mailboxes"),
            "mailboxes",
        )
    finally:
        await conn.close()
    return target


async def drop(url: str, name: str) -> None:
    admin = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def render(url: str, renders: int) -> list[float]:
    token = "bench-ops-token-0001"
    settings = load_settings(
        database_url=url,
        fernet_keys=generate_key(),
        ops_api_tokens=token,
        webhook_tokens="bench",
        body_retention_days=0,
        spool_dir="/tmp/cmw-bench-spool",
    )
    app = create_app(settings)
    timings = []
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            signed = await client.post(
                "/ui/login",
                content=f"token={token}",
                headers={"content-type": "application/x-www-form-urlencoded"},
            )
            assert signed.status_code == 303, signed.text
            for i in range(renders + 3):
                started = time.perf_counter()
                response = await client.get("/ui")
                elapsed = (time.perf_counter() - started) * 1000
                if response.status_code != 200:
                    sys.exit(f"FAILED: render {i} answered {response.status_code}; no figure")
                if i >= 3:  # the first renders warm the pools and the template cache
                    timings.append(elapsed)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--renders", type=int, default=50)
    args = parser.parse_args()
    url = normalize_database_url(args.database_url)
    started = time.perf_counter()
    # this run's own (bench/run.py's scratch names): two runs never drop each other's
    name = f"cmw_bench_dashboard_{os.getpid()}_{secrets.token_hex(3)}"
    try:
        target = asyncio.run(fill(url, name))
        print(f"filled in {time.perf_counter() - started:.0f} s")
        timings = sorted(asyncio.run(render(target, args.renders)))
    finally:
        asyncio.run(drop(url, name))
    p95 = timings[int(len(timings) * 0.95) - 1]
    print(
        f"overview /ui, {len(timings)} renders: p50 {statistics.median(timings):.1f} ms, "
        f"p95 {p95:.1f} ms, max {timings[-1]:.1f} ms (target < 200 ms)"
    )


if __name__ == "__main__":
    main()
