"""Through a database outage every delivery, accepted or refused, waits in the spool and is
applied once PostgreSQL answers again: as it was received, oldest first, once; the operator
reads one line when the outage begins and one when the spool is empty again."""

import asyncio
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from app.crypto import generate_key
from app.hashing import KEYS_DO_NOT_FIT
from app.operations.keys import rotate_spool
from app.receiving.spool import Spool
from app.simulation import traffic
from tests.conftest import FERNET_KEY, app_client, asyncpg_dsn, deliver, make_settings
from tests.reliability.proxy import Proxy
from tests.reliability.test_spool import _set_aside_total, wait_until_drained
from tests.test_outbound_derived import destinations_file, eventually, told
from tests.test_webhook_contract import DEAD_DATABASE

EVENT = "select signature, signature_form, warnings, spooled, first_received_at from events"


async def refuse_doomed_mailboxes(database_url: str) -> None:
    """A bug no retry cures: applying a mailbox whose email starts with 'doomed' fails."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute(
            """
            create function refuse_box() returns trigger language plpgsql as $$
            begin raise exception 'a bug' using errcode = 'XX000'; end $$;
            create trigger refuse before insert on mailboxes
            for each row when (new.email like 'doomed%') execute function refuse_box();
            """
        )
    finally:
        await conn.close()


def schema_violation() -> dict[str, Any]:
    return traffic.mailbox_created(subscriptionId="", details={"mailboxId": None})


async def test_an_outage_keeps_every_delivery_and_applies_it_as_received(
    database_url, capsys, tmp_path, monkeypatch
):
    proxy = Proxy(database_url)
    await proxy.start()
    live, queued = (traffic.mailbox_created(price=0.30000000000000004) for _ in range(2))
    later, invalid = traffic.mailbox_created(), schema_violation()
    doomed = traffic.mailbox_created(details={"email": "doomed@x.com"})
    await refuse_doomed_mailboxes(database_url)
    settings = make_settings(
        proxy.url,
        destinations_file=destinations_file(tmp_path, monkeypatch),
        outbound_dispatch=False,
    )
    async with app_client(settings) as client:
        assert (await deliver(client, live)).json()["status"] == "processed"
        await proxy.cut()
        cut_at = datetime.now(UTC)
        sent = (queued, later, b'{"not json', invalid, doomed)
        answers = [await deliver(client, p) for p in sent]
        away = await client.get("/readyz")
        restored_at = datetime.now(UTC)
        await proxy.restore()
        await wait_until_drained(client)
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        [drained] = await eventually(lambda: told(conn, "spool.drained"))
        drained_by = datetime.now(UTC)
    assert [a.status_code for a in answers] == [200, 200, 400, 422, 200]
    assert [answers[i].json().get("status") for i in (0, 1, 4)] == ["queued"] * 3
    assert away.status_code == 200 and away.json()["database"] == "down"
    assert away.json()["spool"]["depth"] == 5 and away.json()["spool"]["room"] is True
    try:
        events = {r["event_id"] for r in await conn.fetch("select event_id from events")}
        live_row = await conn.fetchrow(f"{EVENT} where event_id = $1", live["eventId"])
        queued_row = await conn.fetchrow(f"{EVENT} where event_id = $1", queued["eventId"])
        rejected = await conn.fetch(
            "select reason, event, event_id, errors, received_at from rejected_deliveries "
            "order by id"
        )
        [started] = await told(conn, "spool.started")
    finally:
        await conn.close()
    # the spooled delivery is recorded as the live one was, at the time it was received
    assert events == {live["eventId"], queued["eventId"], later["eventId"]}
    assert not live_row["spooled"] and queued_row["spooled"]
    assert live_row["warnings"] != "[]"
    for column in ("signature", "signature_form", "warnings"):
        assert queued_row[column] == live_row[column], column
    assert cut_at <= queued_row["first_received_at"] <= restored_at
    # the refused ones are kept among rejected deliveries, as they would have been live
    assert [(r["reason"], r["event"], r["event_id"]) for r in rejected] == [
        ("invalid_json", None, None),
        ("invalid_payload", "mailbox.created", invalid["eventId"]),
        ("apply_failed", "mailbox.created", doomed["eventId"]),  # applying it failed
    ]
    assert rejected[1]["errors"] != "[]"
    assert orjson.loads(rejected[2]["errors"])[0]["type"] == "XX000"
    assert all(cut_at <= r["received_at"] <= restored_at for r in rejected)
    # the CRM is told when spooling began, how many waited, and how long the drain took
    assert cut_at <= datetime.fromisoformat(started["since"]) <= restored_at
    assert started["depth"] == 5 and drained["applied"] == 5
    assert 0 <= drained["seconds"] <= (drained_by - restored_at).total_seconds()
    err = capsys.readouterr().err
    assert len(re.findall(r"database unreachable \(.+\): deliveries go to the spool", err)) == 1
    assert re.search(r"the spool is empty again: 5 spooled deliveries applied in \d", err)
    assert "nothing was spooled" not in err


async def test_with_fernet_keys_that_cannot_decrypt_deliveries_wait_for_the_right_ones(
    database_url, capsys
):
    """A restart with the wrong FERNET_KEYS: not ready, and every delivery waits in the
    spool (encrypted under the key it has) until a restart that lists the right key."""
    first, waiting, also = (traffic.mailbox_created() for _ in range(3))
    async with app_client(make_settings(database_url)) as client:
        assert (await deliver(client, first)).json()["status"] == "processed"
    wrong, spool_dir = generate_key(), tempfile.mkdtemp(prefix="cmw-spool-", dir="/tmp")
    wrong_keys = make_settings(database_url, fernet_keys=wrong, spool_dir=spool_dir)
    async with app_client(wrong_keys) as client:
        answers = [await deliver(client, p) for p in (waiting, also)]
        ready = await client.get("/readyz")
        still = await client.get("/readyz")
    assert [a.json()["status"] for a in answers] == ["queued", "queued"]
    assert ready.status_code == 503 and ready.json()["error"] == KEYS_DO_NOT_FIT
    assert still.status_code == 503 and still.json()["spool"]["depth"] == 2
    assert capsys.readouterr().err.count(KEYS_DO_NOT_FIT) == 1  # said once, not per delivery
    # rotate-keys with both keys listed re-encrypts them under the first, once
    assert await rotate_spool(Spool(Path(spool_dir), max_bytes=10**6), [FERNET_KEY, wrong]) == 2
    assert await rotate_spool(Spool(Path(spool_dir), max_bytes=10**6), [FERNET_KEY, wrong]) == 0
    right = make_settings(database_url, spool_dir=spool_dir)
    async with app_client(right) as client:
        await wait_until_drained(client)
        assert (await client.get("/readyz")).status_code == 200
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        stored = await conn.fetch("select event_id, spooled from events")
    finally:
        await conn.close()
    assert {(r["event_id"], r["spooled"]) for r in stored} == {
        (first["eventId"], False),
        (waiting["eventId"], True),
        (also["eventId"], True),
    }


async def test_an_outage_that_spooled_nothing_ends_in_its_own_line(database_url, capsys):
    """The spool full: the delivery is refused (503, retry later); once the database
    answers, the operator reads that the outage ended with nothing to drain."""
    proxy = Proxy(database_url)
    await proxy.start()
    async with app_client(make_settings(proxy.url, spool_max_bytes=1024)) as client:
        assert (await deliver(client, traffic.mailbox_created())).status_code == 200
        await proxy.cut()
        refused = await deliver(client, traffic.prewarmup_success(domains=2, per_domain=2))
        await proxy.restore()
        after = traffic.prewarmup_success(domains=2, per_domain=2)  # too big for the spool
        while (answer := await deliver(client, after)).status_code != 200:
            assert answer.status_code == 503  # the circuit is open for a moment
            await asyncio.sleep(0.1)
    assert refused.status_code == 503 and answer.json()["status"] == "processed"
    err = capsys.readouterr().err
    assert err.count("database unreachable") == 1
    assert err.count("the database answers again; nothing was spooled") == 1
    assert "the spool is empty again" not in err


async def test_a_spooled_delivery_no_listed_key_can_read_is_set_aside(database_url, capsys):
    spool_dir = tempfile.mkdtemp(prefix="cmw-spool-", dir="/tmp")
    lost, kept = traffic.mailbox_created(), traffic.mailbox_created()
    away = make_settings(DEAD_DATABASE, fernet_keys=generate_key(), spool_dir=spool_dir)
    async with app_client(away) as client:
        set_aside_before = await _set_aside_total(client)  # a counter of this process
        assert (await deliver(client, lost)).json()["status"] == "queued"
    async with app_client(make_settings(DEAD_DATABASE, spool_dir=spool_dir)) as client:
        assert (await deliver(client, kept)).json()["status"] == "queued"
    async with app_client(make_settings(database_url, spool_dir=spool_dir)) as client:
        await wait_until_drained(client)
        set_aside = await _set_aside_total(client) - set_aside_before
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        stored = await conn.fetch("select event_id, spooled from events")
    finally:
        await conn.close()
    assert [(r["event_id"], r["spooled"]) for r in stored] == [(kept["eventId"], True)]
    assert set_aside == 1
    err = capsys.readouterr().err
    assert "spool row 1 set aside: body cannot be decrypted with FERNET_KEYS" in err
