"""Concurrent live deliveries are committed together: one transaction for a group, each
delivery still answered for itself, after the commit."""

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from app.config import Settings
from app.crypto import Vault
from app.db import make_engine
from app.hashing import Hasher
from app.receiving import payloads
from app.receiving.delivery import Delivery
from app.receiving.signing import SignatureCheck
from app.recording.batches import MAX_GROUP, GroupCommit, prepare, record_prepared
from app.recording.record import record
from app.simulation import traffic
from tests import streams
from tests.conftest import (
    FERNET_KEY,
    app_client,
    assert_forwarded_once_and_ready,
    asyncpg_dsn,
    crm_destination,
    deliver,
    fresh_database,
    make_settings,
    refuse_doomed_mailboxes,
)

# Long enough for a burst of concurrent requests in one process to meet in one group.
WIDE_WINDOW_MS = 300


async def burst(client: httpx.AsyncClient, payloads: list[Any]) -> list[httpx.Response]:
    return list(await asyncio.gather(*(deliver(client, p) for p in payloads)))


async def transactions(db: asyncpg.Connection) -> int:
    """How many transactions wrote the stored events (xmin is the writing transaction)."""
    return int(await db.fetchval("select count(distinct xmin::text) from events"))


async def test_concurrent_deliveries_are_committed_in_one_transaction(database_url, db):
    payloads = [traffic.mailbox_created() for _ in range(12)]
    async with app_client(make_settings(database_url, group_commit_window_ms=WIDE_WINDOW_MS)) as c:
        answers = await burst(c, payloads)
    assert [a.json()["status"] for a in answers] == ["processed"] * 12
    assert await transactions(db) == 1
    ids = [p["data"]["mailboxDetails"]["mailboxId"] for p in payloads]
    assert await db.fetchval("select count(*) from mailboxes where mailbox_id = any($1)", ids) == 12


async def test_without_a_window_each_delivery_commits_alone(database_url, db):
    payloads = [traffic.mailbox_created() for _ in range(12)]
    async with app_client(make_settings(database_url, group_commit_window_ms=0)) as client:
        answers = await burst(client, payloads)
    assert [a.json()["status"] for a in answers] == ["processed"] * 12
    assert await transactions(db) == 12


async def test_duplicates_and_a_conflict_inside_one_group_are_told_apart(database_url, db):
    original = traffic.mailbox_created()
    other = traffic.mailbox_created()
    other["eventId"] = original["eventId"]  # same eventId, another content
    unhandled = traffic.envelope("dns-record.updated", {"domain": "a.com", "userId": "u1"})
    sends = [original] * 4 + [other, unhandled]
    async with app_client(make_settings(database_url, group_commit_window_ms=WIDE_WINDOW_MS)) as c:
        answers = [a.json() for a in await burst(c, sends)]
    assert await transactions(db) == 1  # all six met in one group
    statuses = sorted(a["status"] for a in answers[:4])
    assert statuses == ["duplicate", "duplicate", "duplicate", "processed"]
    assert [a.get("conflict") for a in answers[:4]] == [None] * 4  # told to `other` only
    assert answers[4]["status"] == "processed" and answers[4].get("conflict") is True
    assert answers[5]["status"] == "ignored"
    rows = await db.fetch(
        "select deliveries, conflict from events where event_id = $1 order by deliveries",
        original["eventId"],
    )
    assert [(r["deliveries"], r["conflict"]) for r in rows] == [(1, True), (4, True)]
    boxes = [p["data"]["mailboxDetails"]["mailboxId"] for p in (original, other)]
    count = "select count(*) from mailboxes where mailbox_id = any($1)"
    assert await db.fetchval(count, boxes) == 2


async def test_one_failing_delivery_answers_only_its_own_sender(database_url, db, capsys):
    await refuse_doomed_mailboxes(db)
    good = [traffic.mailbox_created() for _ in range(8)]
    doomed = traffic.mailbox_created(details={"email": "doomed@x.example"})
    async with app_client(make_settings(database_url, group_commit_window_ms=WIDE_WINDOW_MS)) as c:
        answers = await burst(c, [*good[:4], doomed, *good[4:]])
    assert [a.status_code for a in answers] == [200] * 4 + [500] + [200] * 4
    fell_back = (
        "a group failed (InternalServerError: a bug); its deliveries are recorded one by one"
    )
    assert capsys.readouterr().err.count(fell_back) == 1  # the operator sees why, once
    assert answers[4].json() == {"error": "apply_failed"}
    stored = await db.fetch("select event_id from events")
    assert {r["event_id"] for r in stored} == {p["eventId"] for p in good}
    rejected = await db.fetch("select reason, event_id from rejected_deliveries")
    assert [(r["reason"], r["event_id"]) for r in rejected] == [("apply_failed", doomed["eventId"])]


def received(payload: dict[str, Any], hasher: Hasher) -> tuple[Delivery, Any]:
    """A delivery as the route hands it to the committer: authenticated and parsed."""
    raw = orjson.dumps(payload)
    envelope = payloads.parse_envelope(raw, hasher)
    signature = SignatureCheck("valid", None, time.time())
    return Delivery(envelope, raw, signature, hasher=hasher), payloads.parse_handled(envelope, [])


async def test_a_burst_larger_than_a_group_is_split_and_a_later_burst_is_written_too(
    database_url, db
):
    """Senders that all wait at once: MAX_GROUP of them in one transaction, the rest in
    another; once those are answered, a later burst gets a group of its own."""
    engine, hasher = make_engine(database_url), Hasher(os.urandom(32))
    committer = GroupCommit(engine, Vault([FERNET_KEY]), window=0.05)
    bursts = [
        [received(traffic.mailbox_created(), hasher) for _ in range(n)] for n in (MAX_GROUP + 1, 2)
    ]
    answered = []
    try:
        async with asyncio.timeout(120):  # a burst nobody writes fails, rather than hangs
            for burst in bursts:
                answered += await asyncio.gather(*(committer.record(d, m) for d, m in burst))
            while committer._tasks:  # each group's task let go once done: memory stays flat
                await asyncio.sleep(0.01)
    finally:
        await engine.dispose()
    assert [a.status for a in answered] == ["processed"] * (MAX_GROUP + 3)
    groups = await db.fetch("select count(*) n from events group by xmin::text")
    assert sorted(g["n"] for g in groups) == [1, 2, MAX_GROUP]


# The test database plays a failure of a group's first try: the first insert into events
# fails with `sqlstate` (a sequence counts the tries, across rolled-back ones).
FAIL_FIRST = """
CREATE SEQUENCE tries;
CREATE FUNCTION fail_first() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('tries') = 1 THEN
        RAISE EXCEPTION 'played' USING ERRCODE = '{sqlstate}';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER fail_first BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION fail_first();
"""


@pytest.mark.parametrize(
    ("sqlstate", "away"),
    [("57P03", True), ("40P01", False)],
    ids=["the database cannot take it now", "a deadlock"],
)
async def test_a_group_the_database_cannot_take_now_is_not_tried_again_one_by_one(
    database_url, db, sqlstate, away
):
    """A group failing because the database cannot take it now (57P03: it is starting or
    stopping) answers each sender with that failure at once (the route then spools each
    delivery: "queued"), without trying each again alone against a database that is
    away. A group that lost a race (a deadlock) is recorded again one by one."""
    await db.execute(FAIL_FIRST.format(sqlstate=sqlstate))
    engine, hasher = make_engine(database_url), Hasher(os.urandom(32))
    committer = GroupCommit(engine, Vault([FERNET_KEY]), window=WIDE_WINDOW_MS / 1000)
    sent = [received(traffic.mailbox_created(), hasher) for _ in range(4)]
    try:
        async with asyncio.timeout(60):
            answered = await asyncio.gather(
                *(committer.record(d, m) for d, m in sent), return_exceptions=True
            )
    finally:
        await engine.dispose()
    if away:
        assert [getattr(a, "sqlstate", None) for a in answered] == [sqlstate] * 4
        assert await db.fetchval("select last_value from tries") == 1
        assert await db.fetchval("select count(*) from events") == 0
    else:
        assert [getattr(a, "status", None) for a in answered] == ["processed"] * 4
        assert await db.fetchval("select last_value from tries") == 1 + 4
        assert await transactions(db) == 4


def telling_crm(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    window: int,
    events: list[str],
) -> Settings:
    """Settings with a group commit window of `window` ms whose one destination, crm,
    takes `events`: what is written for it is read by the test; nothing is sent."""
    return make_settings(
        database_url,
        group_commit_window_ms=window,
        destinations_file=crm_destination(tmp_path, monkeypatch, events),
        cmr_signature_tolerance_seconds=streams.TOLERANCE,
        outbound_dispatch=False,
    )


@pytest.mark.parametrize(
    ("window", "doomed", "written_in"),
    [(WIDE_WINDOW_MS, False, 2), (0, False, 4), (WIDE_WINDOW_MS, True, 4)],
    ids=["one group", "no window", "a group that failed"],
)
async def test_each_new_event_and_what_it_completes_is_told_once(
    database_url, db, tmp_path, monkeypatch, window, doomed, written_in
):
    """An order (recorded alone), then its three mailboxes sent at once: each event
    forwarded once (a duplicate is not), and the order's mailboxes.ready told once; in one
    group, each alone without a window, and each alone again when a delivery in their group
    fails."""
    forwarded = ["mailbox.order.success", "mailbox.created", "mailboxes.ready"]
    settings = telling_crm(database_url, tmp_path, monkeypatch, window=window, events=forwarded)
    order, *boxes = streams.standard_order(3, False, [], start=time.time() - 3600)
    failing = [traffic.mailbox_created(details={"email": "doomed@x.example"})] if doomed else []
    if doomed:
        await refuse_doomed_mailboxes(db)
    async with app_client(settings) as c:
        assert (await deliver(c, order)).json()["status"] == "processed"  # alone: an order
        answers = await burst(c, [*boxes, boxes[0], *failing])
    statuses = sorted(a.json()["status"] for a in answers[:4])
    assert statuses == ["duplicate"] + ["processed"] * 3
    assert [a.status_code for a in answers[4:]] == [500] * len(failing)
    assert await transactions(db) == written_in  # the order's, the mailboxes' rows'
    await assert_forwarded_once_and_ready(db, order, boxes)


async def count_insert_statements(db: asyncpg.Connection, table: str) -> None:
    """From now on each statement that inserts into `table` adds a row to
    insert_statements (a statement-level trigger: it runs once however many rows)."""
    await db.execute(
        f"""
        create table insert_statements (at timestamptz default now());
        create function count_insert_statement() returns trigger language plpgsql as $$
        begin insert into insert_statements default values; return null; end $$;
        create trigger count_insert_statement after insert on {table}
        for each statement execute function count_insert_statement();
        """
    )


async def test_a_group_writes_its_forwarded_messages_in_one_statement(
    database_url, db, tmp_path, monkeypatch
):
    """Each new event of a group forwarded once (the duplicate not), all by one INSERT of
    the group's transaction: one statement's work on the table and its indexes per group,
    not per delivery."""
    settings = telling_crm(
        database_url, tmp_path, monkeypatch, window=WIDE_WINDOW_MS, events=["mailbox.*"]
    )
    await count_insert_statements(db, "outbound_messages")
    boxes = [traffic.mailbox_created() for _ in range(6)]
    async with app_client(settings) as c:
        answers = await burst(c, [*boxes, boxes[0]])
    assert sorted(a.json()["status"] for a in answers) == ["duplicate"] + ["processed"] * 6
    assert await transactions(db) == 1
    rows = await db.fetch(
        "select m.payload, e.event_id, m.xmin::text from outbound_messages m"
        " join events e on e.id = m.event_id"
    )
    assert sorted(r["event_id"] for r in rows) == sorted(b["eventId"] for b in boxes)
    assert {r["payload"] for r in rows} == {None}  # each names its event, copies none of it
    assert {r["xmin"] for r in rows} == {await db.fetchval("select xmin::text from events limit 1")}
    assert await db.fetchval("select count(*) from insert_statements") == 1


async def test_in_a_group_the_later_edit_of_a_mailbox_wins_whatever_the_arrival_order(
    database_url, db
):
    """Two edits of one mailbox's name, each committed in a group: the later one (by its
    sending time) stays, though the earlier one arrives last; the other name is untouched."""
    edits = [(0, "firstName", "Older"), (0, "firstName", "Newer")]
    order, created, older, newer = streams.standard_order(1, False, edits, start=time.time() - 60)
    settings = make_settings(
        database_url,
        group_commit_window_ms=WIDE_WINDOW_MS,
        cmr_signature_tolerance_seconds=streams.TOLERANCE,
    )
    async with app_client(settings) as c:
        for payload in (order, created, newer, older):
            assert (await deliver(c, payload)).json()["status"] == "processed"
    box = created["data"]["mailboxDetails"]
    row = await db.fetchrow(
        "select first_name, last_name from mailboxes where mailbox_id = $1", box["mailboxId"]
    )
    assert row["first_name"] == "Newer" != box["firstName"]
    assert row["last_name"] == box["lastName"]


async def test_an_order_after_its_mailboxes_tells_them_ready_once_it_is_recorded(
    database_url, db, tmp_path, monkeypatch
):
    """The mailboxes come first (one group), the order last (alone): mailboxes.ready is told
    once the order is recorded, not before."""
    settings = telling_crm(
        database_url, tmp_path, monkeypatch, window=WIDE_WINDOW_MS, events=["mailboxes.ready"]
    )
    order, *boxes = streams.standard_order(2, False, [], start=time.time() - 3600)
    ready = "select payload from outbound_messages where type = 'mailboxes.ready'"
    async with app_client(settings) as c:
        assert [a.json()["status"] for a in await burst(c, boxes)] == ["processed"] * 2
        assert await db.fetch(ready) == []
        assert (await deliver(c, order)).json()["status"] == "processed"
    told = [orjson.loads(r["payload"]) for r in await db.fetch(ready)]
    assert [(t["orderId"], t["mailboxCount"]) for t in told] == [(order["data"]["orderId"], 2)]


# A mailbox.created's mailbox is written by the group's statement insert-only (DO NOTHING);
# when it was already stored, the full merge follows in the group's transaction
# (record.insert_only). The row must be the one recording each delivery alone gives.
Received = tuple[Delivery, Any]
VOLATILE = {"id", "created_at", "updated_at", "created_xid", "search_written_at"}


def mailbox_id(created: dict[str, Any]) -> str:
    return str(created["data"]["mailboxDetails"]["mailboxId"])


def created_again(created: dict[str, Any], **details: Any) -> dict[str, Any]:
    """Another mailbox.created (another eventId, a new email) of the same mailbox."""
    again = traffic.mailbox_created(details={"mailboxId": mailbox_id(created), **details})
    again["data"]["subscriptionId"] = created["data"]["subscriptionId"]
    return again


async def alone(url: str, deliveries: list[Received]) -> list[str]:
    """Each delivery recorded on its own (record.record: the full upsert), in order."""
    engine = make_engine(url)
    try:
        return [(await record(engine, VAULT, d, m)).status for d, m in deliveries]
    finally:
        await engine.dispose()


async def grouped(url: str, deliveries: list[Received]) -> list[str]:
    """The deliveries recorded as one group (batches.record_prepared)."""
    engine = make_engine(url)
    try:
        items = [prepare(VAULT, d, m) for d, m in deliveries]
        return [getattr(r, "status", repr(r)) for r in await record_prepared(engine, VAULT, items)]
    finally:
        await engine.dispose()


async def mailbox_row(url: str, box: str) -> dict[str, Any]:
    """The stored mailbox, its credentials decrypted, without what differs by write time."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        row = dict(await conn.fetchrow("select * from mailboxes where mailbox_id = $1", box))
    finally:
        await conn.close()
    sealed = [c for c in row if c.endswith("_encrypted") and row[c] is not None]
    return {c: v for c, v in row.items() if c not in VOLATILE} | {
        c: VAULT.decrypt(row[c]) for c in sealed
    }


VAULT = Vault([FERNET_KEY])


async def test_a_mailbox_created_again_in_a_group_merges_as_when_recorded_alone(
    database_url, db, server_url, template_name
):
    """A mailbox created, then edited, then created again (its new email and last name)
    inside a group: the snapshot's new values land, the edited first name stays, and the
    row is the one recording each delivery alone gives."""
    hasher = Hasher(os.urandom(32))
    created = traffic.mailbox_created()
    edit = traffic.mailbox_updated(mailbox_id(created), {"firstName": "Edited"})
    again = created_again(created, firstName="Snap", lastName="Later", userName="later")
    first, edited, later, other = (
        received(p, hasher) for p in (created, edit, again, traffic.mailbox_created())
    )
    async with fresh_database(server_url, template_name) as each_alone:
        assert await alone(each_alone, [first, edited, later]) == ["processed"] * 3
        expected = await mailbox_row(each_alone, mailbox_id(created))
    assert await alone(database_url, [first, edited]) == ["processed"] * 2
    before = await mailbox_row(database_url, mailbox_id(created))
    assert await grouped(database_url, [later, other]) == ["processed"] * 2
    assert await transactions(db) == 3  # the two alone, the group's (no fallback)
    row = await mailbox_row(database_url, mailbox_id(created))
    assert row == expected
    new = again["data"]["mailboxDetails"]
    assert (row["email"], row["last_name"], row["user_name"]) == (new["email"], "Later", "later")
    assert (before["email"], before["last_name"], before["user_name"]) != (
        new["email"],
        "Later",
        "later",
    )
    assert row["first_name"] == before["first_name"] == "Edited"  # the edit keeps its field


async def test_two_creations_of_one_new_mailbox_in_one_group_both_apply(database_url, db):
    """Both snapshots of a new mailbox in one group, each naming a field the other leaves
    out: the first inserts the row, the second's merge follows; each answered processed."""
    hasher = Hasher(os.urandom(32))
    created = traffic.mailbox_created(details={"profilePicture": "https://x.example/p.png"})
    again = created_again(
        created, userName="named", email=created["data"]["mailboxDetails"]["email"]
    )
    deliveries = [received(p, hasher) for p in (created, again)]
    assert await grouped(database_url, deliveries) == ["processed"] * 2
    assert await transactions(db) == 1
    row = await mailbox_row(database_url, mailbox_id(created))
    assert (row["profile_picture"], row["user_name"]) == ("https://x.example/p.png", "named")
    count = "select count(*) from mailboxes where mailbox_id = $1"
    assert await db.fetchval(count, mailbox_id(created)) == 1


async def waiting_on_locks(db: asyncpg.Connection) -> int:
    return int(
        await db.fetchval(
            "select count(*) from pg_stat_activity where datname = current_database()"
            " and application_name = 'coldmail-webhooks' and wait_event_type = 'Lock'"
        )
    )


async def test_two_groups_creating_one_new_mailbox_at_once_both_apply(database_url, db):
    """One group inserts the new mailbox and waits, uncommitted, on a row the test holds;
    a second group creating the same mailbox waits for it, then inserts nothing and merges:
    the row holds what each snapshot alone names, each delivery answered processed once."""
    hasher = Hasher(os.urandom(32))
    held = traffic.mailbox_created()
    created = traffic.mailbox_created(details={"profilePicture": "https://x.example/p.png"})
    again = created_again(
        created, userName="named", email=created["data"]["mailboxDetails"]["email"]
    )
    edit = traffic.mailbox_updated(mailbox_id(held), {"firstName": "Edited"})
    created["eventId"], edit["eventId"] = "0-created", "1-edit"  # the group's order
    assert await alone(database_url, [received(held, hasher)]) == ["processed"]
    holder = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await holder.execute("begin")
        await holder.execute(
            "select from mailboxes where mailbox_id = $1 for update", mailbox_id(held)
        )
        first = asyncio.ensure_future(
            grouped(database_url, [received(created, hasher), received(edit, hasher)])
        )
        async with asyncio.timeout(60):
            while await waiting_on_locks(db) < 1:
                await asyncio.sleep(0.02)
            second = asyncio.ensure_future(grouped(database_url, [received(again, hasher)]))
            while await waiting_on_locks(db) < 2:  # the second waits for the first
                await asyncio.sleep(0.02)
            assert await db.fetchval("select count(*) from events") == 1  # none committed
            await holder.execute("rollback")
            answers = await asyncio.gather(first, second)
    finally:
        await holder.close()
    assert list(answers) == [["processed"] * 2, ["processed"]]
    row = await mailbox_row(database_url, mailbox_id(created))
    assert (row["profile_picture"], row["user_name"]) == ("https://x.example/p.png", "named")
    stored = await db.fetch("select event_id, count(*) n from events group by event_id")
    assert sorted(r["n"] for r in stored) == [1, 1, 1, 1]


async def test_a_duplicate_in_a_group_leaves_its_mailbox_as_it_was(database_url, db):
    """A delivery recorded already changes nothing, even in a group that merges the
    mailboxes stored before it: the row stays byte for byte (its time, its sealed
    credentials), while the new delivery beside it is applied."""
    created, fresh = traffic.mailbox_created(), traffic.mailbox_created()
    read = "select * from mailboxes where mailbox_id = $1"
    async with app_client(make_settings(database_url, group_commit_window_ms=WIDE_WINDOW_MS)) as c:
        assert (await deliver(c, created)).json()["status"] == "processed"
        before = dict(await db.fetchrow(read, mailbox_id(created)))
        answers = [a.json()["status"] for a in await burst(c, [created, fresh])]
    assert answers == ["duplicate", "processed"]
    assert await transactions(db) == 1  # the duplicate counted and the new event: one group
    assert dict(await db.fetchrow(read, mailbox_id(created))) == before
    assert await db.fetchval(read.replace("*", "count(*)"), mailbox_id(fresh)) == 1
