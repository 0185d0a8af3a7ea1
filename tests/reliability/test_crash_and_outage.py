"""Acknowledged means committed: kill -9 mid-load, a database outage, two servers at once."""

import asyncio
from collections import Counter
from typing import Any

import asyncpg
import httpx
import pytest

from app import traffic
from tests.conftest import (
    FERNET_KEY,
    OPS_TOKEN,
    SIGNING_KEY,
    WEBHOOK_TOKEN,
    app_client,
    asyncpg_dsn,
    with_database,
)
from tests.reliability.senders import Tally, send_all
from tests.servers import Server, clean_env


def server_env(database_url: str) -> dict[str, str]:
    return clean_env(
        DATABASE_URL=database_url,
        FERNET_KEYS=FERNET_KEY,
        WEBHOOK_TOKENS=WEBHOOK_TOKEN,
        CMR_SIGNING_KEY=SIGNING_KEY,
        OPS_API_TOKENS=OPS_TOKEN,
        LOG_LEVEL="WARNING",
    )


def workload() -> tuple[list[dict[str, Any]], int]:
    created = [traffic.mailbox_created() for _ in range(240)]
    prewarm = [traffic.prewarmup_success(domains=2, per_domain=5) for _ in range(12)]
    return created + prewarm, len(created) + 12 * 10


async def assert_each_acknowledged_event_stored_once(database_url, tally, payloads, mailboxes):
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        rows = await conn.fetch(
            "select event_id, count(*) as n, sum(deliveries) as d from events group by event_id"
        )
        stored = {r["event_id"]: r for r in rows}
        assert tally.acknowledged <= set(stored)  # every 2xx is in the database
        assert {r["n"] for r in rows} == {1}  # and stored exactly once
        assert set(stored) == {p["eventId"] for p in payloads}
        assert await conn.fetchval("select count(*) from mailboxes") == mailboxes
        box_ids = {
            p["data"]["mailboxDetails"]["mailboxId"]
            for p in payloads
            if p["event"] == "mailbox.created"
        }
        found = await conn.fetchval(
            "select count(*) from mailboxes where mailbox_id = any($1)", list(box_ids)
        )
        assert found == len(box_ids)  # with its full effect
        return sum(r["d"] for r in rows)
    finally:
        await conn.close()


async def test_kill_9_mid_load_loses_no_acknowledged_delivery(database_url, tmp_path):
    payloads, mailboxes = workload()
    server = Server(server_env(database_url), tmp_path)
    await asyncio.to_thread(server.start)
    tally = Tally()

    async def kill_and_restart() -> None:
        while len(tally.acknowledged) < len(payloads) // 3:
            await asyncio.sleep(0.005)
        server.kill()
        acked_at_kill = len(tally.acknowledged)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(server.start)
        print(f"\nkilled with {acked_at_kill} acknowledged, restarted")

    try:
        async with httpx.AsyncClient(timeout=30) as client:
            await asyncio.gather(
                send_all(client, f"{server.url}/webhooks/cmr", payloads, tally),
                kill_and_restart(),
            )
    finally:
        server.stop()
    deliveries = await assert_each_acknowledged_event_stored_once(
        database_url, tally, payloads, mailboxes
    )
    print(f"crash: {tally.summary()}; deliveries counted {deliveries}")
    assert tally.answers["no answer"] > 0  # the kill really cut deliveries short
    assert len(tally.acknowledged) == len(payloads)
    assert not {k for k in tally.answers if k.startswith("5") and k != "503"}


async def set_outage(server_url: str, name: str, *, down: bool) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(with_database(server_url, "postgres")))
    try:
        await conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS {'false' if down else 'true'}")
        if down:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )
    finally:
        await conn.close()


async def test_database_outage_answers_503_then_recovers_without_restart(
    database_url, server_url, settings
):
    payloads, mailboxes = workload()
    name = database_url.rsplit("/", 1)[1].split("?")[0]
    tally, ready = Tally(), Counter[int]()
    async with app_client(settings) as client:

        async def outage() -> None:
            while len(tally.acknowledged) < len(payloads) // 4:
                await asyncio.sleep(0.005)
            await set_outage(server_url, name, down=True)
            for _ in range(10):
                ready[(await client.get("/readyz")).status_code] += 1
                await asyncio.sleep(0.3)
            await set_outage(server_url, name, down=False)

        await asyncio.gather(send_all(client, "/webhooks/cmr", payloads, tally), outage())
        ready[(await client.get("/readyz")).status_code] += 1
    print(f"\noutage: {tally.summary()}; readyz {dict(ready)}")
    assert tally.answers["503"] > 0 and tally.retry_after_missing == 0
    assert set(tally.answers) <= {"200", "503"}  # never 500, never anything else
    assert ready[503] >= 9 and ready[200] >= 1
    await assert_each_acknowledged_event_stored_once(database_url, tally, payloads, mailboxes)


@pytest.mark.parametrize("copies", [4])
async def test_two_servers_share_one_database_and_count_every_delivery(
    database_url, tmp_path, copies
):
    payloads = [traffic.mailbox_created() for _ in range(150)]
    payloads += [traffic.prewarmup_success(domains=3, per_domain=4) for _ in range(10)]
    servers = [Server(server_env(database_url), tmp_path) for _ in range(2)]
    await asyncio.gather(*(asyncio.to_thread(s.start) for s in servers))
    tally = Tally()
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            jobs = [
                send_all(
                    client, f"{s.url}/webhooks/cmr", payloads * (copies // 2), tally, concurrency=16
                )
                for s in servers
            ]
            await asyncio.gather(*jobs)
    finally:
        for server in servers:
            server.stop()
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        counts = await conn.fetch(
            "select event_id, count(*) n, sum(deliveries) d from events group by event_id"
        )
        assert len(counts) == len(payloads)
        assert {(r["n"], r["d"]) for r in counts} == {(1, copies)}
        assert await conn.fetchval("select count(*) from mailboxes") == 150 + 10 * 12
    finally:
        await conn.close()
    print(f"\ntwo servers: {tally.summary()}")
    assert dict(tally.answers) == {"200": len(payloads) * copies}
