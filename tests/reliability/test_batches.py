"""Batching keeps the promises: the drain starts as soon as the database answers, and a
kill -9 inside a group being committed, or inside a batched drain, loses no acknowledged
delivery and applies none twice."""

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.crypto import Vault, generate_key
from app.db import make_engine
from app.destinations import Destination
from app.destinations import load as load_destinations
from app.hashing import HashingKey
from app.outbound.outbox import DestinationsOutbox
from app.receiving import receiver as receiver_module
from app.receiving.receiver import DRAIN_BATCH, IDLE_SECONDS, KEYS_WRONG_SECONDS, Receiver
from app.receiving.spool import SPOOL_FILE, Spool
from app.recording.batches import NOBODY, GroupCommit, Telling
from app.recording.record import store_rejected
from app.simulation import traffic
from tests import streams
from tests.conftest import (
    FERNET_KEY,
    WEBHOOK_TOKEN,
    app_client,
    assert_forwarded_once_and_ready,
    asyncpg_dsn,
    crm_destination,
    deliver,
    make_settings,
    refuse_doomed_mailboxes,
    sender_signature,
    wire,
)
from tests.reliability.proxy import Proxy
from tests.reliability.test_crash_and_outage import server_env
from tests.servers import Server


def spool_depth(directory: Path) -> int:
    with sqlite3.connect(directory / SPOOL_FILE) as db:
        return int(db.execute("select count(*) from deliveries").fetchone()[0])


async def stored_event_ids(database_url: str) -> set[str]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        return {r["event_id"] for r in await conn.fetch("select event_id from events")}
    finally:
        await conn.close()


@dataclass
class Clock:
    """The drainer's pauses, on a clock of the test's own: each pause moves it on at once
    and notes the spool's depth when it began; `hold` keeps the drainer in its next pause
    until `release`."""

    spool: Path
    now: float = 0.0
    pauses: list[tuple[float, int]] = field(default_factory=list)  # (seconds, depth)
    holding: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.released.set()

    async def pause(self, seconds: float) -> None:
        self.pauses.append((seconds, spool_depth(self.spool)))
        self.now += seconds
        if not self.released.is_set():
            self.holding.set()
            await self.released.wait()
        await asyncio.sleep(0)

    async def hold(self) -> int:
        """Wait until the drainer is in a pause; that pause's index."""
        self.released.clear()
        await self.holding.wait()
        return len(self.pauses) - 1

    def release(self) -> None:
        self.holding.clear()
        self.released.set()


async def until(condition: Any) -> None:
    while not await condition():
        await asyncio.sleep(0.02)


def draining_receiver(
    engine: AsyncEngine,
    spool: Spool,
    *,
    telling: Telling = NOBODY,
    pause: Callable[[float], Awaitable[None]] | None = None,
    vault: Vault | None = None,
) -> Receiver:
    """A receiver draining `spool` into `engine` as `serve`'s does, each batch recorded
    through a group commit without a window (telling what `telling` names)."""
    vault = vault or Vault([FERNET_KEY])
    committer = GroupCommit(engine, vault, window=0, telling=telling)
    return Receiver(
        engine,
        vault,
        spool,
        HashingKey(engine, vault),
        2**20,
        record=committer.record,
        record_many=committer.record_many,
        store=store_rejected,
        pause=pause,
    )


async def drain_until_paused(receiver: Receiver, clock: Clock, pauses: int) -> None:
    """Runs the receiver's drainer until it has paused `pauses` times, then stops it and
    closes its spool and engine."""
    drainer = asyncio.create_task(receiver.drain_forever())
    try:
        await until(lambda: asyncio.sleep(0, len(clock.pauses) >= pauses))
    finally:
        receiver.stop()
        await drainer
        receiver.spool.close()
        await receiver.engine.dispose()


async def test_the_drain_starts_within_a_second_of_the_database_answering_again(
    database_url, caplog
):
    """While the database is away the drainer marks it away (an outage, not a failure of
    its own to log with a traceback each try); within a second of its return it drains."""
    proxy = Proxy(database_url)
    await proxy.start()
    settings = make_settings(proxy.url)
    payloads = [traffic.mailbox_created() for _ in range(3)]
    async with app_client(settings) as client:
        await proxy.cut()
        for payload in payloads:
            assert (await deliver(client, payload)).json()["status"] == "queued"
    clock, engine = Clock(settings.spool_path), make_engine(proxy.url)
    spool = Spool(settings.spool_path, max_bytes=2**30)
    receiver = draining_receiver(engine, spool, pause=clock.pause)
    drainer = asyncio.create_task(receiver.drain_forever())
    try:
        await until(lambda: asyncio.sleep(0, clock.now > 120))  # two minutes away
        restored = await clock.hold()  # it comes back at the start of a pause
        away_since = receiver.away_since
        await proxy.restore()
        clock.release()
        await until(lambda: asyncio.sleep(0, spool_depth(settings.spool_path) == 0))
        await until(lambda: asyncio.sleep(0, clock.pauses[-1][1] == 0))
    finally:
        receiver.stop()
        await drainer
        spool.close()
        await engine.dispose()
    waited = 0.0
    for seconds, depth in clock.pauses[restored:]:
        if depth == 0:
            break
        waited += seconds
    assert waited <= 1.0, clock.pauses[restored - 3 :]
    assert len(clock.pauses) > 100  # it did keep asking while the database was away
    assert away_since is not None and "the drainer failed" not in caplog.text
    assert receiver.away_since is None  # back
    assert await stored_event_ids(database_url) == {p["eventId"] for p in payloads}


async def test_a_backlog_drains_batch_after_batch_and_an_idle_drainer_looks_twice_a_second(
    database_url, monkeypatch
):
    """No pause between batches while the spool holds deliveries (a backlog of 20,000 is
    40 batches, not 40 half-seconds), and half a second between looks once it is empty
    (not a loop spending a CPU core on an idle worker). On the test's clock: each pause and
    the spool's depth when it began."""
    monkeypatch.setattr(receiver_module, "DRAIN_BATCH", 2)  # five spooled: three batches
    payloads = [traffic.mailbox_created() for _ in range(5)]
    settings = await spool_while_away(database_url, payloads)
    clock = Clock(settings.spool_path)
    spool = Spool(settings.spool_path, max_bytes=2**30)
    receiver = draining_receiver(make_engine(database_url), spool, pause=clock.pause)
    await drain_until_paused(receiver, clock, 6)
    # after each batch (3, 1, then none left) at once; then idle, IDLE_SECONDS apart
    assert clock.pauses[:6] == [(0, 3), (0, 1), (0, 0), *[(IDLE_SECONDS, 0)] * 3]
    assert await stored_event_ids(database_url) == {p["eventId"] for p in payloads}


async def test_a_drainer_whose_keys_cannot_read_the_hashing_key_waits_and_does_not_spin(
    database_url,
):
    """Deliveries spooled by a worker listing only a key the hashing key was not made
    under: its drainer reads them but cannot record them. It waits KEYS_WRONG_SECONDS,
    then looks IDLE_SECONDS apart (not in a loop spending a CPU core until a restart);
    nothing leaves the spool."""
    async with app_client(make_settings(database_url)) as client:  # the hashing key's made
        assert (await deliver(client, traffic.mailbox_created())).status_code == 200
    other = generate_key()
    payloads = [traffic.mailbox_created() for _ in range(2)]
    settings = await spool_while_away(database_url, payloads, fernet_keys=other)
    clock = Clock(settings.spool_path)
    spool = Spool(settings.spool_path, max_bytes=2**30)
    receiver = draining_receiver(
        make_engine(database_url), spool, pause=clock.pause, vault=Vault([other])
    )
    await drain_until_paused(receiver, clock, 3)
    assert receiver.keys_wrong
    assert clock.pauses[:3] == [(KEYS_WRONG_SECONDS, 2), (IDLE_SECONDS, 2), (IDLE_SECONDS, 2)]


# --- one batched drain, its outcomes told apart ------------------------------------------


async def spool_while_away(
    database_url: str, payloads: list[dict[str, Any]], **overrides: Any
) -> Settings:
    """The payloads delivered (and acknowledged as queued) while the database is away; the
    settings whose spool holds them."""
    proxy = Proxy(database_url)
    await proxy.start()
    settings = make_settings(proxy.url, **overrides)
    async with app_client(settings) as client:
        await proxy.cut()
        for payload in payloads:
            assert (await deliver(client, payload)).json()["status"] == "queued"
    return settings


async def drain_once(
    database_url: str, settings: Settings, destinations: Sequence[Destination] = ()
) -> int:
    """One batch of the spool drained into the database, as `serve`'s drainer does (telling
    the destinations, as `serve` does)."""
    engine = make_engine(database_url)
    spool = Spool(settings.spool_path, max_bytes=2**30)
    telling = Telling(destinations, DestinationsOutbox(engine, destinations))
    receiver = draining_receiver(engine, spool, telling=telling)
    try:
        return await receiver.drain()
    finally:
        spool.close()
        await engine.dispose()


async def transactions(db: asyncpg.Connection) -> int:
    """How many transactions wrote the stored events (xmin is the writing transaction)."""
    return int(await db.fetchval("select count(distinct xmin::text) from events"))


async def test_a_batched_drain_commits_its_batch_at_once_and_tells_each_outcome_apart(
    database_url, db
):
    """A duplicate, a second content of one eventId and an event we do not handle, in one
    batch with new mailboxes: one transaction for them all (an order in one of its own),
    each recorded as it would be alone."""
    created = [traffic.mailbox_created() for _ in range(3)]
    other = traffic.mailbox_created()
    other["eventId"] = created[0]["eventId"]  # same eventId, another content
    unhandled = traffic.envelope("dns-record.updated", {"domain": "a.com", "userId": "u1"})
    order = traffic.mailbox_order_success()
    batch = [*created, created[1], other, unhandled, order]
    settings = await spool_while_away(database_url, batch)
    assert await drain_once(database_url, settings) == len(batch)
    assert spool_depth(settings.spool_path) == 0
    assert await transactions(db) == 2  # the batch, and the order on its own
    rows = await db.fetch("select event_id, status, deliveries, conflict from events")
    stored = sorted((r["event_id"], r["status"], r["deliveries"], r["conflict"]) for r in rows)
    expected = [(p["eventId"], "processed", 1, False) for p in (created[2], order)]
    expected += [(created[1]["eventId"], "processed", 2, False)]  # the duplicate counted
    expected += [(created[0]["eventId"], "processed", 1, True)] * 2  # both contents marked
    expected += [(unhandled["eventId"], "ignored", 1, False)]
    assert stored == sorted(expected)
    boxes = [box(p) for p in [*created, other]]
    count = "select count(*) from mailboxes where mailbox_id = any($1)"
    assert await db.fetchval(count, boxes) == 4
    assert await db.fetchval("select order_id from orders") == order["data"]["orderId"]
    assert await db.fetchval("select count(*) from rejected_deliveries") == 0


async def test_a_batched_drain_forwards_each_new_event_and_tells_what_it_completes_once(
    database_url, db, tmp_path, monkeypatch
):
    """An order's three mailboxes spooled (one of them twice), drained in one batch: each
    new event forwarded once, as it would be live (the duplicate is not), and the order's
    mailboxes.ready told once; nothing else is sent to the destination."""
    forwarded = ["mailbox.order.success", "mailbox.created", "mailboxes.ready"]
    path = crm_destination(tmp_path, monkeypatch, forwarded)
    order, *boxes = streams.standard_order(3, False, [], start=time.time() - 3600)
    batch = [order, *boxes, boxes[0]]
    tolerance = streams.TOLERANCE
    settings = await spool_while_away(
        database_url, batch, cmr_signature_tolerance_seconds=tolerance
    )
    assert await drain_once(database_url, settings, load_destinations(path)) == len(batch)
    await assert_forwarded_once_and_ready(db, order, boxes)


async def test_one_failing_delivery_in_a_batched_drain_is_set_aside_alone(database_url, db):
    """The batch's transaction fails on one delivery: the others are recorded one by one
    and kept, the failing one among the rejected deliveries, and the spool is empty."""
    await refuse_doomed_mailboxes(db)
    good = [traffic.mailbox_created() for _ in range(3)]
    doomed = traffic.mailbox_created(details={"email": "doomed@x.example"})
    settings = await spool_while_away(database_url, [good[0], doomed, *good[1:]])
    assert await drain_once(database_url, settings) == 4
    assert spool_depth(settings.spool_path) == 0
    stored = await db.fetch("select event_id from events")
    assert sorted(r["event_id"] for r in stored) == sorted(p["eventId"] for p in good)
    assert await transactions(db) == 3  # each on its own, once the batch failed
    rejected = await db.fetch("select reason, event_id from rejected_deliveries")
    assert [(r["reason"], r["event_id"]) for r in rejected] == [("apply_failed", doomed["eventId"])]


# --- kill -9 inside a group, inside a batched drain ------------------------------------


@dataclass
class Answers:
    """Each delivery's answers, in order: 'no answer', a status code, or the 2xx body's status."""

    by_event: dict[str, list[str]] = field(default_factory=dict)


async def send_until_acknowledged(
    client: httpx.AsyncClient, url: str, payload: dict[str, Any], answers: Answers
) -> None:
    body, sent_at = wire(payload)
    seen = answers.by_event.setdefault(payload["eventId"], [])
    while True:
        headers = sender_signature(body, timestamp=sent_at) | {"content-type": "application/json"}
        try:
            response = await client.post(
                url, content=body, headers=headers, params={"token": WEBHOOK_TOKEN}
            )
        except httpx.HTTPError:
            seen.append("no answer")
        else:
            if response.is_success:
                seen.append(response.json()["status"])
                return
            seen.append(str(response.status_code))
        await asyncio.sleep(0.1)


async def backend_waiting_on_a_lock(admin: asyncpg.Connection) -> bool:
    return bool(
        await admin.fetchval(
            "select count(*) from pg_stat_activity where datname = current_database() "
            "and application_name = 'coldmail-webhooks' and wait_event_type = 'Lock'"
        )
    )


async def stored_once(admin: asyncpg.Connection, payloads: list[dict[str, Any]]) -> None:
    """Every delivery stored exactly once, each mailbox created, the edit applied."""
    rows = await admin.fetch("select event_id, count(*) n from events group by event_id")
    assert {r["event_id"]: r["n"] for r in rows} == {p["eventId"]: 1 for p in payloads}
    boxes = [box(p) for p in payloads if p["event"] == "mailbox.created"]
    count = "select count(*) from mailboxes where mailbox_id = any($1)"
    assert await admin.fetchval(count, boxes) == len(boxes)
    edited = await admin.fetchval("select count(*) from mailboxes where first_name = 'Edited'")
    assert edited == 1


def box(created: dict[str, Any]) -> str:
    return str(created["data"]["mailboxDetails"]["mailboxId"])


def edit_of(created: dict[str, Any]) -> dict[str, Any]:
    """A mailbox.updated for the mailbox a mailbox.created made."""
    return traffic.mailbox_updated(box(created), {"firstName": "Edited"})


async def lock_mailbox(holder: asyncpg.Connection, created: dict[str, Any]) -> None:
    """Hold the mailbox's row, as a long transaction would, until `rollback`."""
    await holder.execute("begin")
    await holder.execute("select 1 from mailboxes where mailbox_id = $1 for update", box(created))


@dataclass
class Killable:
    """A `serve` process to kill -9, its senders' answers, and two connections of the test's
    own: `admin` to look, `holder` to hold a row locked."""

    server: Server
    admin: asyncpg.Connection
    holder: asyncpg.Connection
    answers: Answers = field(default_factory=Answers)

    async def send(self, client: httpx.AsyncClient, payload: dict[str, Any]) -> None:
        url = f"{self.server.url}/webhooks/cmr"
        await send_until_acknowledged(client, url, payload, self.answers)


Start = Callable[[dict[str, str]], Awaitable[Killable]]


@pytest.fixture
async def killable(database_url: str, tmp_path: Path) -> AsyncIterator[Start]:
    """Starts a server with the environment given; stops it and closes the connections
    however the test ends."""
    started: list[Killable] = []

    async def start(env: dict[str, str]) -> Killable:
        server = Server(env, tmp_path)
        await asyncio.to_thread(server.start)
        dsn = asyncpg_dsn(database_url)
        started.append(Killable(server, await asyncpg.connect(dsn), await asyncpg.connect(dsn)))
        return started[-1]

    yield start
    for rig in started:
        await asyncio.to_thread(rig.server.stop)
        await rig.admin.close()
        await rig.holder.close()


async def test_kill_9_inside_a_group_being_committed_leaves_none_of_it_half_applied(
    database_url, killable
):
    """A group waits on a row the test holds locked, its commit not yet made: the kill must
    leave nothing of it, and the senders' retries apply each delivery once."""
    first = traffic.mailbox_created()
    group = [traffic.mailbox_created() for _ in range(15)] + [edit_of(first)]
    # wide enough for the sixteen concurrent senders to meet in one group
    rig = await killable(server_env(database_url) | {"GROUP_COMMIT_WINDOW_MS": "1000"})
    async with httpx.AsyncClient(timeout=30) as client:
        await rig.send(client, first)
        await lock_mailbox(rig.holder, first)
        senders = [asyncio.create_task(rig.send(client, p)) for p in group]
        await until(lambda: backend_waiting_on_a_lock(rig.admin))
        assert await rig.admin.fetchval("select count(*) from events") == 1  # none committed
        rig.server.kill()
        await rig.holder.execute("rollback")
        await asyncio.to_thread(rig.server.start)
        await asyncio.gather(*senders)
    await stored_once(rig.admin, [first, *group])
    for payload in group:  # cut short by the kill, then applied by a retry, not before
        *cut_short, last = rig.answers.by_event[payload["eventId"]]
        assert cut_short and set(cut_short) == {"no answer"} and last == "processed"


async def test_kill_9_inside_a_batched_drain_applies_each_spooled_delivery_once(
    database_url, tmp_path, killable
):
    """The first batch commits; the second waits on a row the test holds locked. The kill
    must leave the first batch applied once and nothing of the second, which the restarted
    drainer then applies."""
    first = traffic.mailbox_created()
    spooled = [traffic.mailbox_created() for _ in range(DRAIN_BATCH + 20)]
    spooled.insert(DRAIN_BATCH + 10, edit_of(first))  # in the second batch
    proxy = Proxy(database_url)
    await proxy.start()
    rig = await killable(server_env(proxy.url) | {"SPOOL_DIR": str(tmp_path / "spool")})
    async with httpx.AsyncClient(timeout=30) as client:
        await rig.send(client, first)
        await proxy.cut()
        for payload in spooled:  # in order: the spool drains oldest first
            await rig.send(client, payload)
        await lock_mailbox(rig.holder, first)
        await proxy.restore()
        await until(lambda: backend_waiting_on_a_lock(rig.admin))
        applied_at_kill = await rig.admin.fetchval("select count(*) from events") - 1
        depth_at_kill = spool_depth(tmp_path / "spool")
        rig.server.kill()
        await rig.holder.execute("rollback")
        rig.server.options = ["--no-migrate"]
        await asyncio.to_thread(rig.server.start)
        await until(lambda: asyncio.sleep(0, spool_depth(tmp_path / "spool") == 0))
    await stored_once(rig.admin, [first, *spooled])
    assert applied_at_kill == DRAIN_BATCH and depth_at_kill == len(spooled) - DRAIN_BATCH
    assert {tuple(seen) for seen in rig.answers.by_event.values()} == {("processed",), ("queued",)}
