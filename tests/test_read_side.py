"""The read side can neither leak, starve deliveries, nor misread a time."""

import asyncio
import time

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from app.config import ConfigError
from app.main import READ_POOL_SIZE
from app.simulation import traffic
from tests.conftest import (
    CREDENTIALS_TOKEN,
    app_client,
    asyncpg_dsn,
    deliver,
    make_settings,
)
from tests.state import OPS
from tests.test_api import walk

CREDS = {"Authorization": f"Bearer {CREDENTIALS_TOKEN}"}


def test_report_mode_without_webhook_tokens_is_refused_at_start(database_url):
    settings = make_settings(database_url, cmr_signature_mode="report", webhook_tokens=None)
    with pytest.raises(ConfigError, match="WEBHOOK_TOKENS is not set"):
        settings.check_complete()


async def test_credentials_are_never_sent_unless_their_audit_row_committed(client, db):
    payload = traffic.mailbox_created()
    await deliver(client, payload)
    box = payload["data"]["mailboxDetails"]
    url = f"/api/v1/mailboxes/{box['mailboxId']}/credentials"
    assert (await client.get(url, headers=CREDS)).json()["appPassword"] == box["appPassword"]
    assert await db.fetchval("select count(*) from credential_reads") == 1
    await db.execute(
        """
        create function refuse_audit() returns trigger language plpgsql as $$
        begin raise exception 'audit store failing'; end $$;
        create constraint trigger refuse_at_commit after insert on credential_reads
        deferrable initially deferred for each row execute function refuse_audit();
        """
    )
    refused = await client.get(url, headers=CREDS)
    assert refused.status_code == 500  # the audit store raised an error: not an outage
    assert box["appPassword"] not in refused.text
    assert await db.fetchval("select count(*) from credential_reads") == 1


async def test_forty_stuck_reads_do_not_make_deliveries_wait(client, database_url):
    blocker = await asyncpg.connect(asyncpg_dsn(database_url))
    await blocker.execute("begin; lock table credential_reads in access exclusive mode")
    reads = [
        asyncio.create_task(client.get("/api/v1/audit/credential-reads", headers=CREDS))
        for _ in range(40)
    ]
    # every connection of the read pool is stuck behind the lock (the other reads wait for one)
    stuck = (
        "select count(*) from pg_locks"
        " where not granted and relation = 'credential_reads'::regclass"
    )
    while await blocker.fetchval(stuck) < READ_POOL_SIZE:
        await asyncio.sleep(0.05)
    for _ in range(10):  # well inside the reads' 10 s statement timeout, however slow
        response = await deliver(client, traffic.mailbox_created())
        assert response.json()["status"] == "processed"
    # all 10 deliveries were answered while every read was still stuck
    assert not any(task.done() for task in reads)
    await blocker.execute("rollback")
    await blocker.close()
    answers = await asyncio.gather(*reads)
    assert {a.status_code for a in answers} <= {200, 503}


async def test_an_event_page_of_500_items_carries_no_payloads(client):
    for _ in range(500):
        await deliver(client, traffic.prewarmup_success(domains=1, per_domain=5))
    page = await client.get("/api/v1/events", params={"limit": 500}, headers=OPS)
    items = page.json()["items"]
    assert len(items) == 500 and all("payload" not in item for item in items)
    one = await client.get(f"/api/v1/events/{items[0]['id']}", headers=OPS)
    assert len(one.json()["payload"]["data"]["mailboxDetails"][0]["preWarmedUpMailboxes"]) == 5
    print(f"\n500-item event page: {len(page.content)} bytes; one event: {len(one.content)} bytes")
    assert len(page.content) < 500 * 700 < 500 * len(one.content)


async def test_a_time_without_an_offset_means_utc(database_url, monkeypatch):
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    name = make_url(database_url).database
    await conn.execute(f"alter database {name} set timezone = 'America/New_York'")
    await conn.close()
    monkeypatch.setenv("TZ", "America/New_York")  # the server's local time zone, too
    time.tzset()
    try:
        await expires_before_reads_utc(database_url)
    finally:
        monkeypatch.undo()
        time.tzset()


async def expires_before_reads_utc(database_url: str) -> None:
    async with app_client(make_settings(database_url)) as client:
        order = traffic.mailbox_order_success(expiryDate="2026-03-01T02:00:00Z")
        await deliver(client, order)
        sub = order["data"]["subscriptionId"]

        async def expiring(before: str) -> list[str]:
            page = await client.get(
                "/api/v1/subscriptions", params={"expiresBefore": before}, headers=OPS
            )
            return [s["subscriptionId"] for s in page.json()["items"]]

        assert await expiring("2026-03-01T01:00:00") == []  # 01:00 UTC, not 01:00 New York
        assert await expiring("2026-03-01T03:00:00") == [sub]
        since = await client.get(
            "/api/v1/subscriptions", params={"updatedSince": "2999-01-01T00:00"}, headers=OPS
        )
        assert since.json()["items"] == []


async def test_a_walk_under_concurrent_deliveries_returns_what_was_committed_before_it(client):
    for _ in range(3):
        await deliver(client, traffic.prewarmup_success(domains=10, per_domain=10))
    before = {m["mailboxId"] for m in await walk(client, "/api/v1/mailboxes", limit=500)}
    writers: list[asyncio.Task[object]] = []

    async def deliver_concurrently() -> None:
        big = traffic.prewarmup_success(domains=100, per_domain=10)  # 1,000 mailboxes
        singles = [traffic.mailbox_created() for _ in range(40)]
        writers.extend(asyncio.create_task(deliver(client, p)) for p in [big, *singles])
        await asyncio.sleep(0.05)

    seen = [
        m["mailboxId"]
        for m in await walk(client, "/api/v1/mailboxes", limit=25, during=deliver_concurrently)
    ]
    await asyncio.gather(*writers)
    assert len(seen) == len(set(seen))  # each once
    assert set(seen) == before  # all of what was committed before, nothing committed after
    after = await walk(client, "/api/v1/mailboxes", limit=500)
    assert len(after) == len(before) + 1000 + 40


@pytest.mark.parametrize("value", ["0.5", "1700000000", "yesterday", "01-01-2026"])
async def test_a_time_filter_that_is_not_an_iso_time_is_a_422(client, value):
    response = await client.get(
        "/api/v1/subscriptions", params={"updatedSince": value}, headers=OPS
    )
    assert response.status_code == 422
    said = response.json()["detail"][0]
    assert said["loc"] == ["query", "updatedSince"]
    assert said["msg"].endswith("must be an ISO 8601 date or time, e.g. 2026-12-01T00:00:00Z")


async def test_a_time_before_the_calendar_once_in_utc_filters_as_its_earliest(client):
    await deliver(client, traffic.mailbox_order_success())
    for params in (
        {"updatedSince": "0001-01-01T00:00:00+04:05"},
        {"expiresBefore": "9999-12-31T23:59:59-05:00"},
    ):
        page = await client.get("/api/v1/subscriptions", params=params, headers=OPS)
        assert page.status_code == 200 and len(page.json()["items"]) == 1


async def test_a_walk_begun_beside_open_transactions_returns_every_row_once(client, database_url):
    """The cursor carries the first page's snapshot, in-progress transactions included."""
    await deliver(client, traffic.prewarmup_success(domains=1, per_domain=5))
    before = [m["mailboxId"] for m in await walk(client, "/api/v1/mailboxes", limit=500)]
    others = [await asyncpg.connect(asyncpg_dsn(database_url)) for _ in range(2)]
    try:
        for other in others:  # each holds a transaction id, neither commits before the walk
            await other.execute("begin")
            await other.fetchval("select pg_current_xact_id()")
        seen = [m["mailboxId"] for m in await walk(client, "/api/v1/mailboxes", limit=2)]
    finally:
        for other in others:
            await other.close()
    assert len(before) == 5 and seen == before
