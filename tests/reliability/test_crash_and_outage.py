"""Acknowledged means committed: kill -9 mid-load, a database outage, two servers at once."""

import asyncio
from typing import Any

import asyncpg
import httpx
import pytest

from app.db import is_transient, make_engine, raw_connection
from app.simulation import traffic
from tests.conftest import FERNET_KEY, OPS_TOKEN, SIGNING_KEY, WEBHOOK_TOKEN, asyncpg_dsn
from tests.reliability.proxy import Proxy
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


async def count_events(database_url: str) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        return int(await conn.fetchval("select count(*) from events"))
    finally:
        await conn.close()


async def test_kill_9_while_spooling_and_while_draining_loses_and_repeats_nothing(
    database_url, tmp_path
):
    payloads, mailboxes = workload()
    proxy = Proxy(database_url)
    await proxy.start()
    server = Server(server_env(proxy.url) | {"SPOOL_DIR": str(tmp_path / "spool")}, tmp_path)
    await asyncio.to_thread(server.start)
    server.options = ["--no-migrate"]  # it restarts while the database is away
    await proxy.cut()
    tally = Tally()

    async def kill_twice() -> None:
        while len(tally.acknowledged) < len(payloads) // 3:
            await asyncio.sleep(0.005)
        server.kill()  # while spooling
        await asyncio.to_thread(server.start)
        while len(tally.acknowledged) < len(payloads):
            await asyncio.sleep(0.05)
        await proxy.restore()
        while await count_events(database_url) < len(payloads) // 3:
            await asyncio.sleep(0.005)
        server.kill()  # while draining
        await asyncio.to_thread(server.start)

    try:
        async with httpx.AsyncClient(timeout=30) as client:
            await asyncio.gather(
                send_all(client, f"{server.url}/webhooks/cmr", payloads, tally), kill_twice()
            )
            drained_at = await count_events(database_url)
            while (await client.get(f"{server.url}/readyz")).json()["spool"]["depth"]:
                await asyncio.sleep(0.2)
    finally:
        await asyncio.to_thread(server.stop)  # the proxy runs on this loop: keep it serving
    print(f"\nkill -9 spooling and draining: {tally.summary()}; {drained_at} applied at 2nd kill")
    assert tally.answers["no answer"] > 0  # the first kill cut deliveries short
    assert drained_at < len(payloads)  # the second came before the drain was done
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


async def test_once_postgresql_drops_every_connection_only_one_statement_fails(database_url):
    """A restart (or a pooler's) kills the whole pool: the first failure must renew it all,
    or each dead connection fails one more delivery and the drainer takes minutes."""
    engine = make_engine(database_url, pool_size=6)
    try:

        async def hold(ready: asyncio.Barrier) -> None:
            async with raw_connection(engine) as conn:
                await conn.fetchval("select 1")
                await ready.wait()

        barrier = asyncio.Barrier(6)
        await asyncio.gather(*(hold(barrier) for _ in range(6)))  # six pooled connections
        admin = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            await admin.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity "
                "where application_name = 'coldmail-webhooks' and datname = current_database()"
            )
        finally:
            await admin.close()
        failures = 0
        for _ in range(6):
            try:
                async with raw_connection(engine) as conn:
                    assert await conn.fetchval("select 1") == 1
            except Exception as error:
                assert is_transient(error), repr(error)
                failures += 1
        assert failures == 1
    finally:
        await engine.dispose()


async def test_the_service_s_connections_never_compile_statements_with_jit(database_url):
    """A count over every subscription (the renewal risks) spent 0.8 s in JIT compilation
    to run for 0.2 s: short statements are better off without it."""
    engine = make_engine(database_url, pool_size=1, statement_timeout_ms=5000)
    try:
        async with engine.connect() as conn:
            assert (await conn.exec_driver_sql("SHOW jit")).scalar() == "off"
    finally:
        await engine.dispose()
