"""What `replay` picks and reports, in process (the CLI runs the same function): by ID,
by a receipt-time window (since inclusive, until exclusive), or everything; a dry run
changes nothing; IDs not stored refuse the whole run."""

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from app.crypto import Vault
from app.db import make_engine
from app.operations.replay import ReplayReport, Selection, UnknownIds, replay
from app.simulation import traffic
from tests.conftest import FERNET_KEY, deliver

T = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)  # the window's edges fall on stored times
SECRET = traffic.canary("pw")


async def run(database_url: str, selection: Selection, *, dry_run: bool = False) -> Any:
    engine = make_engine(database_url, pool_size=1)
    try:
        return await replay(engine, Vault([FERNET_KEY]), selection, dry_run=dry_run)
    finally:
        await engine.dispose()


async def keep_rejected(db: Any, payload: dict[str, Any] | bytes, at: datetime) -> int:
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return int(
        await db.fetchval(
            "insert into rejected_deliveries (reason, event, errors, signature, body_encrypted,"
            " received_at) values ('apply_failed', 'mailbox.created', '[]', 'valid', $1, $2)"
            " returning id",
            Vault([FERNET_KEY]).encrypt(body),
            at,
        )
    )


@pytest.fixture
async def stored(client, db) -> dict[str, int]:
    """Events received at T - 1 day, T, T + 1 day; at T + 2 days, an unhandled one, one
    naming no subscription (stored as ignored) and two whose bodies retention deleted;
    rejected deliveries: a valid one at T, one still invalid at T + 1 day, one not JSON at
    T - 1 day, and one replayed already."""
    ids: dict[str, int] = {}
    events = {
        "before": (traffic.mailbox_created(), T - timedelta(days=1)),
        "at": (traffic.mailbox_created(), T),
        "after": (traffic.mailbox_created(), T + timedelta(days=1)),
        "unhandled": (traffic.envelope("dns-record.updated", {"d": 1}), T + timedelta(days=2)),
        "no_id": (traffic.envelope("subscription.expired", {"quantity": 3}), T + timedelta(days=2)),
        "no_body": (traffic.mailbox_created(), T + timedelta(days=2)),
        "no_body_too": (traffic.mailbox_created(), T + timedelta(days=2)),
    }
    for name, (payload, at) in events.items():
        assert (await deliver(client, payload)).status_code == 200
        ids[name] = await db.fetchval(
            "update events set first_received_at = $2 where event_id = $1 returning id",
            payload["eventId"],
            at,
        )
    await db.execute(
        "update events set body_encrypted = null where id = any($1)",
        [ids["no_body"], ids["no_body_too"]],
    )
    ids["valid"] = await keep_rejected(db, traffic.mailbox_created(), T)
    invalid = traffic.mailbox_created(subscriptionId="", details={"appPassword": {"k": SECRET}})
    ids["invalid"] = await keep_rejected(db, invalid, T + timedelta(days=1))
    ids["not_json"] = await keep_rejected(db, b"{not json", T - timedelta(days=1))
    ids["done"] = await keep_rejected(db, traffic.mailbox_created(), T)
    await db.execute(
        "update rejected_deliveries set replayed_at = now() where id = $1", ids["done"]
    )
    for name in ("dropped", "dropped_too"):  # bodies the rejected bound dropped
        ids[name] = await keep_rejected(db, traffic.mailbox_created(), T + timedelta(days=3))
        await db.execute(
            "update rejected_deliveries set body_encrypted = null where id = $1", ids[name]
        )
    return ids


def counts(report: ReplayReport) -> tuple[int, int, int, int]:
    return report.applied, report.still_invalid, report.unhandled, report.without_body


async def test_everything_reports_each_kind_and_turns_a_fixed_rejection_into_an_event(
    db, database_url, stored
):
    events, rejected = await run(database_url, Selection(everything=True))
    assert counts(events) == (3, 0, 2, 2)
    assert counts(rejected) == (1, 2, 0, 2)  # the one replayed before is not tried again
    assert sorted(e.split(":")[0] for e in rejected.errors) == sorted(
        f"rejected #{stored[k]}" for k in ("invalid", "not_json")
    )
    said = {e.split(":")[0]: e for e in rejected.errors}
    assert said[f"rejected #{stored['not_json']}"].endswith(": body is not valid JSON (UTF-8)")
    invalid = said[f"rejected #{stored['invalid']}"]
    assert "'loc': ['data', 'subscriptionId']" in invalid  # where, never what was sent
    assert "'loc': ['data', 'mailboxDetails', 'appPassword']" in invalid
    assert SECRET not in invalid
    row = await db.fetchrow(
        "select replayed_at, replayed_event_id from rejected_deliveries where id = $1",
        stored["valid"],
    )
    assert row["replayed_at"] is not None
    event = await db.fetchrow("select status, first_received_at from events where id = $1", row[1])
    assert (event["status"], event["first_received_at"]) == ("processed", T)
    untouched = await db.fetch(
        "select id from rejected_deliveries where replayed_at is null order by id"
    )
    assert [r["id"] for r in untouched] == sorted(
        stored[k] for k in ("invalid", "not_json", "dropped", "dropped_too")
    )


async def test_a_dry_run_counts_the_same_and_changes_nothing(db, database_url, stored):
    tables = ("events", "rejected_deliveries", "mailboxes", "subscriptions")
    before = {t: await db.fetch(f"select * from {t} order by id") for t in tables}
    events, rejected = await run(database_url, Selection(everything=True), dry_run=True)
    assert (counts(events), counts(rejected)) == ((3, 0, 2, 2), (1, 2, 0, 2))
    assert {t: await db.fetch(f"select * from {t} order by id") for t in tables} == before


async def test_a_window_takes_since_inclusive_and_until_exclusive_of_both_kinds(
    database_url, stored
):
    window = Selection(since=T, until=T + timedelta(days=1))
    events, rejected = await run(database_url, window, dry_run=True)
    assert counts(events) == (1, 0, 0, 0)  # "at" only: "after" falls on until
    assert counts(rejected) == (1, 0, 0, 0)  # "valid" only
    events, rejected = await run(database_url, Selection(since=T), dry_run=True)
    assert (counts(events), counts(rejected)) == ((2, 0, 2, 2), (1, 1, 0, 2))
    events, rejected = await run(database_url, Selection(until=T), dry_run=True)
    assert (counts(events), counts(rejected)) == ((1, 0, 0, 0), (0, 1, 0, 0))


async def test_ids_pick_only_their_own_kind(database_url, stored):
    events, rejected = await run(
        database_url, Selection(event_ids=[stored["after"]], since=T), dry_run=True
    )
    assert (counts(events), counts(rejected)) == ((1, 0, 0, 0), (0, 0, 0, 0))
    events, rejected = await run(
        database_url, Selection(rejected_ids=[stored["invalid"]], since=T), dry_run=True
    )
    assert (counts(events), counts(rejected)) == ((0, 0, 0, 0), (0, 1, 0, 0))


async def test_ids_not_stored_refuse_the_whole_run_naming_each(db, database_url, stored):
    asked = Selection(event_ids=[stored["at"], 999_999], rejected_ids=[888_888])
    with pytest.raises(UnknownIds) as refused:
        await run(database_url, asked)
    assert str(refused.value) == (
        "no event 999999 (GET /api/v1/events lists them); "
        "no rejected delivery 888888 (GET /api/v1/rejected lists them)"
    )
    assert (
        await db.fetchval("select count(*) from rejected_deliveries where replayed_at is not null")
        == 1
    )


async def test_a_replayed_rejection_without_event_id_and_its_live_retry_count_once(
    client, db, database_url
):
    """The eventId a body without one gets is derived from its content (the hashing key),
    the same for a replay as for a live delivery."""
    body = traffic.mailbox_created()
    del body["eventId"]
    row_id = await keep_rejected(db, body, T)
    _, rejected = await run(database_url, Selection(rejected_ids=[row_id]))
    assert counts(rejected) == (1, 0, 0, 0)
    event_row = await db.fetchval(
        "select replayed_event_id from rejected_deliveries where id = $1", row_id
    )
    events, _ = await run(database_url, Selection(event_ids=[event_row]))  # again, stored
    assert counts(events) == (1, 0, 0, 0)
    assert (await deliver(client, body)).json()["status"] == "duplicate"
    other = traffic.mailbox_created()
    del other["eventId"]
    assert (await deliver(client, other)).json()["status"] == "processed"
    assert await db.fetchval("select count(*) from events where event = 'mailbox.created'") == 2


async def test_fixed_rejections_each_become_the_event_a_live_delivery_records(
    client, db, database_url
):
    """Each fixed rejection is applied and counted, as the event a live delivery of its
    body records: one naming no subscription is stored as ignored, with the warning why."""
    live, no_id = (traffic.envelope("subscription.expired", {"quantity": 3}) for _ in "ab")
    assert (await deliver(client, live)).status_code == 200
    ids = [await keep_rejected(db, traffic.mailbox_created(), T), await keep_rejected(db, no_id, T)]
    _, rejected = await run(database_url, Selection(rejected_ids=ids))
    assert counts(rejected) == (2, 0, 0, 0)
    replayed = await db.fetch(
        "select e.status, e.warnings::text from rejected_deliveries r"
        " join events e on e.id = r.replayed_event_id where r.id = any($1) order by r.id",
        ids,
    )
    said = await db.fetchval(
        "select warnings::text from events where event_id = $1", live["eventId"]
    )
    assert "no recognisable subscriptionId" in said
    assert [tuple(r) for r in replayed] == [("processed", "[]"), ("ignored", said)]


async def test_a_replayed_rejection_of_an_event_already_recorded_points_at_that_event(
    client, db, database_url
):
    """Its body was delivered again and recorded meanwhile: the replay is a duplicate, and
    the rejection names the event that holds it."""
    body = traffic.mailbox_created()
    row_id = await keep_rejected(db, body, T)
    assert (await deliver(client, body)).json()["status"] == "processed"
    await run(database_url, Selection(rejected_ids=[row_id]))
    recorded = await db.fetchval("select id from events where event_id = $1", body["eventId"])
    replayed = "select replayed_event_id from rejected_deliveries where id = $1"
    assert await db.fetchval(replayed, row_id) == recorded
