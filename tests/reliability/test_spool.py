"""While PostgreSQL is away, deliveries wait in the spool; none is lost, none applied twice."""

import asyncio
import random
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from app.receiving.spool import SPOOL_FILE, Spool
from app.simulation import traffic
from tests import streams
from tests.conftest import app_client, asyncpg_dsn, deliver, fresh_database, make_settings
from tests.reliability.proxy import Proxy
from tests.reliability.senders import Tally, send_all
from tests.state import read_state
from tests.test_webhook_contract import DEAD_DATABASE


def realistic_stream(seed: int) -> list[dict[str, Any]]:
    """About 250 deliveries: orders, mailboxes, edits, prewarmups, lifecycles, second orders."""
    rng = random.Random(seed)
    start = time.time() - 3000
    events: list[dict[str, Any]] = []
    for i in range(40):
        edits = [(rng.randrange(3), "firstName", f"Name{k}") for k in range(rng.randrange(4))]
        order = streams.standard_order(
            rng.randint(1, 3), rng.random() < 0.2, edits, start=start + 60 * i
        )
        events += order
        if i % 4 == 0:
            events += streams.lifecycle(order[0], rng.randint(1, 5), start=start + 60 * i + 30)
        if i % 6 == 0:
            events += streams.second_order(order[0], 2, start=start + 60 * i + 40)
    for i in range(16):
        events += streams.prewarmup_order(
            rng.randint(0, 3), rng.randint(0, 2), rng.random() < 0.3, start=start + 7 * i
        )
    return events


async def wait_until_drained(client: httpx.AsyncClient, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = (await client.get("/readyz")).json()
        if ready["database"] == "up" and ready["spool"]["depth"] == 0:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the spool did not drain: {ready}")


async def events_by_id(database_url: str) -> dict[str, tuple[int, bool]]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        rows = await conn.fetch(
            "select event_id, count(*) as n, bool_or(spooled) as spooled from events "
            "group by event_id"
        )
    finally:
        await conn.close()
    return {r["event_id"]: (r["n"], r["spooled"]) for r in rows}


async def test_a_sender_on_the_providers_schedule_loses_nothing_through_a_long_outage(
    database_url, server_url, template_name
):
    stream = realistic_stream(seed=9)
    proxy = Proxy(database_url)
    await proxy.start()
    tally = Tally()
    settings = make_settings(proxy.url, cmr_signature_tolerance_seconds=streams.TOLERANCE)
    async with app_client(settings) as client:

        async def outage() -> None:
            while len(tally.acknowledged) < len(stream) // 4:
                await asyncio.sleep(0.01)
            await proxy.cut()
            await asyncio.sleep(5.0)  # longer than the sender's whole window (3.3 s)
            await proxy.restore()

        await asyncio.gather(
            send_all(client, "/webhooks/cmr", stream, tally, concurrency=8, on_schedule=True),
            outage(),
        )
        await wait_until_drained(client)
        state = await read_state(client)
    print(f"\noutage of 5 s: {tally.summary()}, gave up on {len(tally.gave_up)}")
    assert tally.gave_up == set()
    assert tally.answers["200"] == len(stream)  # every delivery answered 200 at the first try
    stored = await events_by_id(database_url)
    assert set(stored) == {e["eventId"] for e in stream}
    assert {n for n, _ in stored.values()} == {1}  # each event stored once
    assert sum(spooled for _, spooled in stored.values()) > 20  # and many waited in the spool
    async with fresh_database(server_url, template_name) as reference_url:
        reference = make_settings(reference_url, cmr_signature_tolerance_seconds=streams.TOLERANCE)
        async with app_client(reference) as client:
            for payload in stream:
                assert (await deliver(client, payload)).status_code == 200
            assert state == await read_state(client)  # what was sent, as if nothing happened


async def test_a_full_spool_answers_503_and_keeps_what_it_holds(database_url):
    proxy = Proxy(database_url)
    await proxy.start()
    small = [streams.sent(t, time.time()) for t in _mailboxes(3)]
    settings = make_settings(proxy.url, spool_max_bytes=6000)
    async with app_client(settings) as client:
        await proxy.cut()
        answers = [(await deliver(client, p)).status_code for p in small]
        big = await deliver(client, _prewarmup())
        depth = (await client.get("/readyz")).json()["spool"]["depth"]
        await proxy.restore()
        await wait_until_drained(client)
    assert answers == [200, 200, 200] and depth == 3
    assert big.status_code == 503 and big.headers["retry-after"].isdigit()
    assert set(await events_by_id(database_url)) == {p["eventId"] for p in small}


async def test_a_concurrent_burst_while_away_keeps_exactly_what_was_answered_200(database_url):
    """Deliveries arriving together are written together; the spool's bound still holds
    for each: every 200 is applied once the database is back, nothing answered 503 is."""
    proxy = Proxy(database_url)
    await proxy.start()
    burst = [streams.sent(t, time.time()) for t in _mailboxes(120)]
    settings = make_settings(proxy.url, spool_max_bytes=60_000)  # room for about 30
    async with app_client(settings) as client:
        await proxy.cut()
        answers = await asyncio.gather(*(deliver(client, p) for p in burst))
        await proxy.restore()
        await wait_until_drained(client)
    kept = {p["eventId"] for p, a in zip(burst, answers, strict=True) if a.status_code == 200}
    refused = [a for a in answers if a.status_code == 503]
    assert len(kept) + len(refused) == len(burst)
    assert 10 < len(kept) < 100, len(kept)  # the bound was reached mid-burst
    assert set(await events_by_id(database_url)) == kept


async def test_a_torn_spool_row_is_set_aside_and_the_rest_drain(database_url, capsys):
    async with _queued_while_away(database_url, 3) as (proxy, settings, client, payloads):
        tear_row(settings.spool_path / "spool.sqlite3", row=2)
        set_aside_before = await _set_aside_total(client)
        await proxy.restore()
        await wait_until_drained(client)
        assert await _set_aside_total(client) == set_aside_before + 1
    stored = await events_by_id(database_url)
    assert set(stored) == {payloads[0]["eventId"], payloads[2]["eventId"]}
    assert "spool row 2 set aside: checksum mismatch" in capsys.readouterr().err


async def test_a_spool_filled_to_exactly_its_bound_keeps_what_fills_it_then_says_it_is_full():
    """SPOOL_MAX_BYTES is what the spool may hold (bodies and what their checks found): two
    deliveries that fill it to the byte are kept; then /readyz says there is no room, how
    many wait and since when, and the next delivery is refused with 503."""
    payload = _prewarmup()
    measuring = make_settings(DEAD_DATABASE)
    async with app_client(measuring) as client:
        assert (await deliver(client, payload)).json()["status"] == "queued"
    [(size,)] = spool_rows(measuring.spool_path, "select length(body) + length(meta)")
    async with app_client(make_settings(DEAD_DATABASE, spool_max_bytes=2 * size)) as client:
        before = time.time()
        kept = [await deliver(client, payload) for _ in range(2)]
        ready = await client.get("/readyz")
        waited = time.time() - before
        refused = await deliver(client, traffic.mailbox_created())
    assert [k.json()["status"] for k in kept] == ["queued", "queued"]
    assert ready.status_code == 503
    spool = ready.json()["spool"]
    assert (spool["depth"], spool["room"]) == (2, False)
    assert 0 <= spool["oldestSeconds"] <= waited  # the age of the first delivery kept
    assert refused.status_code == 503 and refused.headers["retry-after"].isdigit()


async def test_a_write_the_spool_refuses_is_answered_503_and_the_next_is_kept(capsys):
    """A delivery the spool cannot write (a trigger stands in for a full disk) is refused
    with 503 and the log says why; the spool takes the next delivery as before."""
    settings = make_settings(DEAD_DATABASE)
    first, big, after = traffic.mailbox_created(), _prewarmup(), traffic.mailbox_created()
    async with app_client(settings) as client:
        assert (await deliver(client, first)).json()["status"] == "queued"
        on_spool(
            settings.spool_path,
            "create trigger disk_full before insert on deliveries when new.size > 4000 "
            "begin select raise(abort, 'disk full'); end",
        )
        refused = await deliver(client, big)
        kept = await deliver(client, after)
        depth = (await client.get("/readyz")).json()["spool"]["depth"]
    assert refused.status_code == 503 and refused.headers["retry-after"].isdigit()
    assert kept.json()["status"] == "queued" and depth == 2
    line = r"^\S+ ERROR coldmail\.spool (?:\[\w+\] )?the spool cannot be written: disk full$"
    assert len(re.findall(line, capsys.readouterr().err, re.M)) == 1


async def _drain_past_a_failing_spool(client, proxy, settings, capsys, trigger: str) -> None:
    """The database back while the spool fails a step of the drain (`trigger`, a SQLite
    trigger named by its first word, stands in for the failure): wait until the drainer
    says it failed and will retry, then let the spool work and wait for the drain."""
    on_spool(settings.spool_path, f"create trigger {trigger}; end")
    await proxy.restore()
    err = ""
    while "the drainer failed; retrying" not in err:
        await asyncio.sleep(0.1)
        err += capsys.readouterr().err
    on_spool(settings.spool_path, f"drop trigger {trigger.split()[0]}")
    await wait_until_drained(client)


async def test_rows_the_spool_cannot_take_out_are_applied_once_when_it_can(database_url, capsys):
    """The drainer commits a batch, then the spool cannot take it out (a trigger stands in
    for the failure): the rows stay and are drained again once it can, and each event is
    stored once."""
    async with _queued_while_away(database_url, 2) as (proxy, settings, client, payloads):
        trigger = "stuck before delete on deliveries begin select raise(abort, 'disk I/O error')"
        await _drain_past_a_failing_spool(client, proxy, settings, capsys, trigger)
    assert await events_by_id(database_url) == {p["eventId"]: (1, True) for p in payloads}


async def test_a_torn_row_that_cannot_be_set_aside_yet_waits_and_nothing_is_lost(
    database_url, capsys
):
    """Setting a torn row aside fails (a trigger stands in for a full disk): the drainer
    says so and tries again; once it can, the row is set aside and the rest drain."""
    async with _queued_while_away(database_url, 3) as (proxy, settings, client, payloads):
        tear_row(settings.spool_path / SPOOL_FILE, row=2)
        trigger = "disk_full before insert on set_aside begin select raise(abort, 'disk full')"
        await _drain_past_a_failing_spool(client, proxy, settings, capsys, trigger)
    stored = await events_by_id(database_url)
    assert stored == {p["eventId"]: (1, True) for p in (payloads[0], payloads[2])}


async def test_a_new_spool_makes_its_folder_and_is_empty_with_room(tmp_path):
    spool = Spool(tmp_path / "data" / "spool", max_bytes=1024)
    try:
        assert await spool.depth() == (0, None, True)
    finally:
        spool.close()


def test_one_worker_drains_a_shared_spool_and_another_takes_over_when_it_stops(tmp_path):
    """Workers sharing a spool: one drains it (it holds the lock, again and again), the
    others do not; once the drainer stops, another becomes the drainer."""
    folder = tmp_path / "data" / "spool"
    first, second = (Spool(folder, max_bytes=1024) for _ in range(2))
    try:
        assert first.try_become_drainer() and first.try_become_drainer()
        assert not second.try_become_drainer()
        first.close()
        assert second.try_become_drainer()
    finally:
        second.close()


def spool_rows(folder: Path, select: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(folder / SPOOL_FILE)
    try:
        return db.execute(f"{select} from deliveries order by id").fetchall()
    finally:
        db.close()


def on_spool(folder: Path, statement: str) -> None:
    db = sqlite3.connect(folder / SPOOL_FILE)
    try:
        db.execute(statement)
    finally:
        db.close()


def tear_row(path: Path, *, row: int) -> None:
    """What a torn write leaves: the row's body cut short."""
    db = sqlite3.connect(path)
    db.execute("UPDATE deliveries SET body = substr(body, 1, 40) WHERE id = ?", (row,))
    db.commit()
    db.close()


async def _set_aside_total(client: httpx.AsyncClient) -> float:
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith("cmr_spool_set_aside_total "):
            return float(line.split()[1])
    return 0.0


@asynccontextmanager
async def _queued_while_away(database_url: str, n: int) -> AsyncIterator[tuple[Any, ...]]:
    """The app with the database cut off and `n` mailbox.created deliveries queued in its
    spool: (the proxy to restore, the settings, the client, the payloads)."""
    proxy = Proxy(database_url)
    await proxy.start()
    payloads = _mailboxes(n)
    settings = make_settings(proxy.url)
    async with app_client(settings) as client:
        await proxy.cut()
        for payload in payloads:
            assert (await deliver(client, payload)).json()["status"] == "queued"
        yield proxy, settings, client, payloads


def _mailboxes(n: int) -> list[dict[str, Any]]:
    return [traffic.mailbox_created() for _ in range(n)]


def _prewarmup() -> dict[str, Any]:
    return traffic.prewarmup_success(domains=3, per_domain=4)
