"""`replay` rebuilds what the live deliveries built: wipe every table the events write to,
replay (all at once, or one by one in any order), and ops read the same subscriptions,
mailboxes and orders."""

import time

import orjson

from app.crypto import Vault
from app.db import make_engine
from app.operations.replay import Selection, replay
from app.simulation import traffic
from tests import streams
from tests.conftest import FERNET_KEY, app_client, deliver, make_settings
from tests.reliability.test_crash_and_outage import server_env
from tests.servers import run_cli
from tests.state import OPS, read_state

DERIVED = "mailboxes, order_domains, orders, subscriptions, domains"


def mixed_stream() -> list[dict[str, object]]:
    """Standard orders with edits, failures, second orders and lifecycles, and prewarmup
    orders with partial failures: every kind of effect, in time order."""
    start = time.time() - 20_000
    events: list[dict[str, object]] = []
    first = streams.standard_order(
        3, True, [(0, "firstName", "Ann"), (1, "firstName", "Bo")], start=start
    )
    events += first
    events += streams.second_order(first[0], 2, start=start + 500)
    events += streams.lifecycle(first[0], 4, start=start + 800)
    events += streams.prewarmup_order(2, 1, False, start=start + 1000)
    events += streams.prewarmup_order(0, 2, False, start=start + 2000)
    events += streams.prewarmup_order(1, 0, True, start=start + 3000)
    return events


async def test_replay_after_losing_every_derived_table_restores_what_ops_saw(db, database_url):
    settings = make_settings(database_url, cmr_signature_tolerance_seconds=streams.TOLERANCE)
    async with app_client(settings) as client:
        for payload in mixed_stream():
            assert (await deliver(client, payload)).status_code == 200
        before = await read_state(client)
        assert before["mailboxes"] and before["orders"] and before["subscriptions"]
        await db.execute(f"TRUNCATE {DERIVED}")
        assert (await read_state(client))["mailboxes"] == []
        run_cli("replay", "--all", env=server_env(database_url))
        assert await read_state(client) == before


async def replay_one_by_one(database_url: str, row_ids: list[int]) -> None:
    """`replay --event-id` for each stored event, in the order given."""
    engine = make_engine(database_url, pool_size=1)
    try:
        for row_id in row_ids:
            report, _ = await replay(
                engine, Vault([FERNET_KEY]), Selection(event_ids=[row_id]), dry_run=False
            )
            assert report.applied == 1
    finally:
        await engine.dispose()


async def test_replaying_the_events_newest_first_restores_what_the_live_arrivals_built(
    db, database_url
):
    settings = make_settings(database_url, cmr_signature_tolerance_seconds=streams.TOLERANCE)
    async with app_client(settings) as client:
        for payload in mixed_stream():
            assert (await deliver(client, payload)).status_code == 200
        before = await read_state(client)
        await db.execute(f"TRUNCATE {DERIVED}")
        newest_first = [
            row["id"] for row in await db.fetch("SELECT id FROM events ORDER BY id DESC")
        ]
        await replay_one_by_one(database_url, newest_first)
        assert await read_state(client) == before


async def test_two_contents_of_one_event_end_the_same_whichever_is_replayed_last(db, database_url):
    """The sender sent one eventId twice, at the same second, with different first names."""
    created = traffic.mailbox_created()
    mailbox_id = created["data"]["mailboxDetails"]["mailboxId"]
    at = time.time() - 600
    same = {"userId": "USR94KD7S2LQ8X5M1Z0", "eventId": "EVT-SENT-TWICE"}
    ann, bea = (
        streams.sent(
            traffic.envelope(
                "mailbox.updated",
                traffic.mailbox_updated(mailbox_id, {"firstName": name}, userId=same["userId"])[
                    "data"
                ],
                same["eventId"],
            ),
            at,
        )
        for name in ("Ann", "Bea")
    )
    settings = make_settings(database_url, cmr_signature_tolerance_seconds=streams.TOLERANCE)
    async with app_client(settings) as client:
        for payload in (streams.sent(created, at - 60), ann, bea):
            assert (await deliver(client, payload)).status_code == 200
        live = await read_state(client)
        ids = [row["id"] for row in await db.fetch("SELECT id FROM events ORDER BY id")]
        assert len(ids) == 3, "both contents are stored"
        for order in ([ids[0], ids[1], ids[2]], [ids[0], ids[2], ids[1]]):
            await db.execute(f"TRUNCATE {DERIVED}")
            await replay_one_by_one(database_url, order)
            assert await read_state(client) == live


async def test_a_rejected_edit_replayed_later_keeps_its_receipt_time_and_loses_to_a_later_edit(
    db, database_url
):
    """An edit refused an hour ago (apply_failed, say) and a live edit ten minutes ago:
    replaying the refused one now must not make it the later edit."""
    created = traffic.mailbox_created()
    mailbox_id = created["data"]["mailboxDetails"]["mailboxId"]
    old_edit = traffic.mailbox_updated(mailbox_id, {"firstName": "Refused-An-Hour-Ago"})
    new_edit = traffic.mailbox_updated(mailbox_id, {"firstName": "Live-Ten-Minutes-Ago"})
    settings = make_settings(database_url, cmr_signature_tolerance_seconds=streams.TOLERANCE)
    async with app_client(settings) as client:
        assert (await deliver(client, streams.sent(created, time.time() - 7200))).status_code == 200
        assert (await deliver(client, streams.sent(new_edit, time.time() - 600))).status_code == 200
        row_id = await db.fetchval(
            "insert into rejected_deliveries (reason, event, event_id, errors, signature, "
            "body_encrypted, received_at) values ('apply_failed', $1, $2, '[]', 'valid', $3, "
            "now() - interval '1 hour') returning id",
            old_edit["event"],
            old_edit["eventId"],
            Vault([FERNET_KEY]).encrypt(orjson.dumps(old_edit)),
        )
        engine = make_engine(database_url, pool_size=1)
        try:
            _, report = await replay(
                engine, Vault([FERNET_KEY]), Selection(rejected_ids=[row_id]), dry_run=False
            )
        finally:
            await engine.dispose()
        assert report.applied == 1
        box = (await client.get(f"/api/v1/mailboxes/{mailbox_id}", headers=OPS)).json()
        assert box["firstName"] == "Live-Ten-Minutes-Ago"
        replayed = await db.fetchrow(
            "select first_received_at, event_time from events where event_id = $1",
            old_edit["eventId"],
        )
        received = await db.fetchval("select received_at from rejected_deliveries")
        assert replayed["first_received_at"] == replayed["event_time"] == received
