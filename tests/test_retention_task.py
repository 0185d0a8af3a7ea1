"""The service's own retention task (BODY_RETENTION_DAYS): at start it deletes the stored
bodies past retention, keeps the recent ones, and says how many it deleted."""

import asyncio
import logging

from app.simulation import traffic
from tests.conftest import app_client, deliver, make_settings


class Said(logging.Handler):
    """What a logger said, kept on the logger itself (the app resets the root's handlers)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def test_the_service_deletes_old_bodies_at_start_and_keeps_recent_ones(database_url, db):
    old, recent = traffic.mailbox_created(), traffic.mailbox_created()
    async with app_client(make_settings(database_url, body_retention_days=0)) as client:
        for payload in (old, recent):
            assert (await deliver(client, payload)).status_code == 200
    await db.execute(
        "update events set first_received_at = now() - interval '8 days' where event_id = $1",
        old["eventId"],
    )
    said, logger = Said(), logging.getLogger("coldmail.privacy")
    logger.addHandler(said)
    try:
        async with app_client(make_settings(database_url, body_retention_days=7)):
            async with asyncio.timeout(60):  # the task's first pass, however slow the box
                while not said.lines:
                    await asyncio.sleep(0.05)
    finally:
        logger.removeHandler(said)
    gone = await db.fetchval(
        "select body_encrypted is null from events where event_id = $1", old["eventId"]
    )
    kept = await db.fetchval(
        "select body_encrypted is not null from events where event_id = $1", recent["eventId"]
    )
    assert (gone, kept) == (True, True)
    assert said.lines == ["retention: deleted 1 stored bodies older than 7 days"]


async def test_with_retention_off_nothing_is_deleted(database_url, db):
    old = traffic.mailbox_created()
    async with app_client(make_settings(database_url, body_retention_days=0)) as client:
        assert (await deliver(client, old)).status_code == 200
        await db.execute("update events set first_received_at = now() - interval '3650 days'")
        assert (await deliver(client, traffic.mailbox_created())).status_code == 200
    assert await db.fetchval("select count(*) from events where body_encrypted is null") == 0
