"""Through a database outage every delivery, accepted or refused, waits in the spool and is
applied once PostgreSQL answers again: as it was received, oldest first, once; the operator
reads one line when the outage begins and one when the spool is empty again."""

import asyncio
import re
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from app.crypto import Vault, generate_key
from app.db import POOLER_HINT
from app.hashing import KEYS_DO_NOT_FIT
from app.operations.keys import rotate_spool
from app.receiving import receiver
from app.receiving.spool import Spool
from app.recording import effects
from app.simulation import traffic
from tests.conftest import (
    FERNET_KEY,
    app_client,
    deliver,
    make_settings,
    refuse_doomed_mailboxes,
    refuse_inserts,
)
from tests.reliability.proxy import Proxy
from tests.reliability.test_spool import _set_aside_total, wait_until_drained
from tests.streams import SENT_AT
from tests.test_outbound_derived import destinations_file, eventually, told
from tests.test_webhook_contract import DEAD_DATABASE

EVENT = (
    "select signature, signature_form, warnings, spooled, first_received_at, event_time from events"
)


def said(err: str, message: str) -> list[str]:
    """The receiver's log lines that are `message` (a regex) and nothing more, but for the
    request id before it and the fields logged after it."""
    line = rf"^.* coldmail\.receiver (?:\[\w+\] )?{message}(?: \w+=\S*)*$"
    return re.findall(line, err, re.M)


def schema_violation() -> dict[str, Any]:
    return traffic.mailbox_created(subscriptionId="", details={"mailboxId": None})


async def test_an_outage_keeps_every_delivery_and_applies_it_as_received(
    database_url, db, capsys, tmp_path, monkeypatch
):
    monkeypatch.setattr(receiver, "DRAIN_BATCH", 2)  # five spooled: three batches
    proxy = Proxy(database_url)
    await proxy.start()
    live, queued = (traffic.mailbox_created(price=0.30000000000000004) for _ in range(2))
    signed_at = int(time.time()) - 60
    queued[SENT_AT] = signed_at
    later, invalid = traffic.mailbox_created(), schema_violation()
    doomed = traffic.mailbox_created(details={"email": "doomed@x.com"})
    await refuse_doomed_mailboxes(db)
    settings = make_settings(
        proxy.url,
        destinations_file=destinations_file(tmp_path, monkeypatch),
        outbound_dispatch=False,
    )
    async with app_client(settings) as client:
        assert (await client.get("/readyz")).status_code == 200  # its keys read what is stored
        assert (await deliver(client, live)).json()["status"] == "processed"
        await proxy.cut()
        cut_at = datetime.now(UTC)
        sent = (b'{"not json', queued, later, invalid, doomed)
        answers = [await deliver(client, p) for p in sent]
        away = await client.get("/readyz")
        restored_at = datetime.now(UTC)
        await proxy.restore()
        await wait_until_drained(client)
        [drained] = await eventually(lambda: told(db, "spool.drained"))
        drained_by = datetime.now(UTC)
    assert [a.status_code for a in answers] == [400, 200, 200, 422, 200]
    assert [answers[i].json().get("status") for i in (1, 2, 4)] == ["queued"] * 3
    assert away.status_code == 200 and away.json()["database"] == "down"
    assert away.json()["spool"]["depth"] == 5 and away.json()["spool"]["room"] is True
    events = {r["event_id"] for r in await db.fetch("select event_id from events")}
    live_row = await db.fetchrow(f"{EVENT} where event_id = $1", live["eventId"])
    queued_row = await db.fetchrow(f"{EVENT} where event_id = $1", queued["eventId"])
    rejected = await db.fetch(
        "select reason, event, event_id, errors, received_at from rejected_deliveries order by id"
    )
    [started] = await told(db, "spool.started")
    # the spooled delivery is recorded as the live one was, at the time it was received
    assert events == {live["eventId"], queued["eventId"], later["eventId"]}
    assert not live_row["spooled"] and queued_row["spooled"]
    assert live_row["warnings"] != "[]"
    for column in ("signature", "signature_form", "warnings"):
        assert queued_row[column] == live_row[column], column
    assert cut_at <= queued_row["first_received_at"] <= restored_at
    assert queued_row["event_time"] == datetime.fromtimestamp(signed_at, UTC)
    # the refused ones are kept among rejected deliveries, as they would have been live
    assert [(r["reason"], r["event"], r["event_id"]) for r in rejected] == [
        ("invalid_json", None, None),
        ("invalid_payload", "mailbox.created", invalid["eventId"]),
        ("apply_failed", "mailbox.created", doomed["eventId"]),  # applying it failed
    ]
    assert orjson.loads(rejected[1]["errors"]) == answers[3].json()["detail"]
    assert orjson.loads(rejected[2]["errors"]) == [
        {"loc": [], "msg": "applying the event failed", "type": "XX000"}
    ]
    assert all(cut_at <= r["received_at"] <= restored_at for r in rejected)
    # the CRM is told when spooling began, how many waited, and how long the drain took
    assert cut_at <= datetime.fromisoformat(started["since"]) <= restored_at
    assert started["depth"] == 5 and drained["applied"] == 5
    assert 0 <= drained["seconds"] <= (drained_by - restored_at).total_seconds()
    err = capsys.readouterr().err
    away_line = (
        r"database unreachable \(\w+Error: .+\): deliveries go to the spool until it answers"
    )
    assert len(said(err, away_line)) == 1
    [empty] = said(err, r"the spool is empty again: \d+ spooled deliveries applied in [\d.]+ s")
    assert "again: 5 spooled" in empty
    [failed] = said(err, r"applying failed \(XX000\); kept as rejected")
    assert f"eventId={doomed['eventId']}" in failed and "event=mailbox.created" in failed
    assert "nothing was spooled" not in err and "the drainer failed" not in err


async def test_a_refused_delivery_kept_through_an_outage_keeps_the_time_it_arrived(
    database_url, db
):
    """Not the time the attempt to keep it gave up: a database that stops answering holds
    that attempt (here until the test sees it waiting, as a connect timeout would)."""
    proxy = Proxy(database_url)
    await proxy.start()
    async with app_client(make_settings(proxy.url)) as client:
        assert (await deliver(client, traffic.mailbox_created())).status_code == 200
        await proxy.cut()
        assert (await client.get("/readyz")).json()["database"] == "down"  # pool given up
        await proxy.hold()

        async def held() -> list[datetime]:
            return proxy.held

        sent = asyncio.create_task(deliver(client, b'{"not json'))
        await eventually(held)  # keeping it waits on the database
        seen_waiting = datetime.now(UTC)
        await proxy.cut()
        assert (await sent).status_code == 400
        await proxy.restore()
        await wait_until_drained(client)
    kept = await db.fetch("select reason, received_at from rejected_deliveries")
    assert [r["reason"] for r in kept] == ["invalid_json"]
    assert kept[0]["received_at"] < seen_waiting


async def test_with_fernet_keys_that_cannot_decrypt_deliveries_wait_for_the_right_ones(
    database_url, db, capsys
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
    err = capsys.readouterr().err  # said once, not per delivery
    assert len(said(err, re.escape(KEYS_DO_NOT_FIT) + "; deliveries wait in the spool")) == 1
    # rotate-keys with both keys listed re-encrypts them under the first, once
    assert await rotate_spool(Spool(Path(spool_dir), max_bytes=10**6), [FERNET_KEY, wrong]) == 2
    assert await rotate_spool(Spool(Path(spool_dir), max_bytes=10**6), [FERNET_KEY, wrong]) == 0
    right = make_settings(database_url, spool_dir=spool_dir)
    async with app_client(right) as client:
        await wait_until_drained(client)
        assert (await client.get("/readyz")).status_code == 200
    stored = await db.fetch("select event_id, spooled from events")
    assert {(r["event_id"], r["spooled"]) for r in stored} == {
        (first["eventId"], False),
        (waiting["eventId"], True),
        (also["eventId"], True),
    }


async def test_a_worker_without_the_key_others_now_write_with_keeps_deliveries_in_the_spool(
    database_url,
):
    """FERNET_KEYS changed on one worker first (a new key listed first): a worker still on
    the old list reads the hashing key, but not the bodies the other now writes. Found not
    ready, it keeps every delivery in the spool until a restart with the new list, rather
    than applying some of them itself."""
    new = generate_key()
    async with app_client(make_settings(database_url)) as client:  # the hashing key's made
        assert (await deliver(client, traffic.mailbox_created())).json()["status"] == "processed"
    newer = make_settings(database_url, fernet_keys=f"{new},{FERNET_KEY}")
    async with app_client(newer) as client:
        assert (await deliver(client, traffic.mailbox_created())).json()["status"] == "processed"
    async with app_client(make_settings(database_url)) as client:
        ready = await client.get("/readyz")
        answer = await deliver(client, traffic.mailbox_created())
    assert ready.status_code == 503 and ready.json()["error"] == KEYS_DO_NOT_FIT
    assert answer.json()["status"] == "queued"


async def test_each_outage_ends_in_its_own_line(database_url, capsys):
    """Three outages of one process: one delivery spooled and drained; one refused, the
    spool being full (503, retry later), so that nothing was spooled; one spooled again.
    Each ends in a line of its own, with its own count."""
    proxy = Proxy(database_url)
    await proxy.start()
    big = traffic.prewarmup_success(domains=2, per_domain=2)  # more than the spool holds
    async with app_client(make_settings(proxy.url, spool_max_bytes=1024)) as client:
        assert (await deliver(client, traffic.mailbox_created())).status_code == 200
        unnamed = traffic.mailbox_created()
        del unnamed["eventId"]  # the service derives one, keyed, the same live or spooled
        for payload in (unnamed, big, traffic.mailbox_created()):
            await proxy.cut()
            answer = await deliver(client, payload)
            await proxy.restore()
            await wait_until_drained(client)
            while answer.status_code == 503:  # the circuit stays open for a moment
                answer = await deliver(client, payload)
                await asyncio.sleep(0.1)
            assert answer.json()["status"] in {"queued", "processed"}
        assert (await deliver(client, unnamed)).json()["status"] == "duplicate"
    err = capsys.readouterr().err
    assert len(said(err, r"database unreachable \(.+\): .*")) == 3
    ends = said(err, r"the spool is empty again: .*|the database answers again; .*")
    assert [
        re.sub(r" in [\d.]+ s$", "", line.split("] ")[-1].split(" coldmail.receiver ")[-1])
        for line in ends
    ] == [
        "the spool is empty again: 1 spooled deliveries applied",
        "the database answers again; nothing was spooled",
        "the spool is empty again: 1 spooled deliveries applied",
    ]


async def test_a_delivery_that_cannot_even_be_kept_as_rejected_waits_in_the_spool(
    database_url, db, capsys
):
    """Applying fails, and so does keeping it among rejected deliveries: answered 500 and
    held in the spool, where the drainer says why it cannot apply it and tries again;
    once the cause is gone, it is kept as rejected."""
    await refuse_doomed_mailboxes(db)
    await refuse_inserts(
        db, "refuse_rejected", into="rejected_deliveries", errcode="XX000", message="a bug"
    )
    doomed = traffic.mailbox_created(details={"email": "doomed@x.com"})
    async with app_client(make_settings(database_url)) as client:
        answer = await deliver(client, doomed)
        held = (await client.get("/readyz")).json()["spool"]["depth"]
        err = ""
        while "the drainer failed; retrying" not in err:
            await asyncio.sleep(0.1)
            err += capsys.readouterr().err
        await db.execute("drop trigger refuse_rejected on rejected_deliveries")
        await wait_until_drained(client)
    rejected = await db.fetch("select reason, event_id from rejected_deliveries")
    assert answer.status_code == 500 and answer.json() == {"error": "apply_failed"}
    assert held == 1
    assert said(err, r"keeping the delivery failed \(InternalServerError: a bug\); spooled")
    assert said(err, "the drainer failed; retrying"), err
    assert [(r["reason"], r["event_id"]) for r in rejected] == [("apply_failed", doomed["eventId"])]


async def test_a_spooled_delivery_no_listed_key_can_read_is_set_aside(database_url, db, capsys):
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
    stored = await db.fetch("select event_id, spooled from events")
    assert [(r["event_id"], r["spooled"]) for r in stored] == [(kept["eventId"], True)]
    assert set_aside == 1
    err = capsys.readouterr().err
    assert said(err, "spool row 1 set aside: body cannot be decrypted with FERNET_KEYS")


async def test_refused_bodies_are_kept_within_rejected_max_bytes(database_url, db):
    """REJECTED_MAX_BYTES bounds the refused bodies kept: past it the oldest go, their
    reasons stay."""
    refused = [orjson.dumps(schema_violation() | {"pad": "x" * 400}) for _ in range(4)]
    size = len(Vault([FERNET_KEY]).encrypt(refused[0]))
    settings = make_settings(database_url, rejected_max_bytes=2 * size + size // 2)
    async with app_client(settings) as client:
        assert [(await deliver(client, body)).status_code for body in refused] == [422] * 4
    kept = await db.fetch(
        "select body_encrypted is not null as kept, reason from rejected_deliveries order by id"
    )
    assert [(r["kept"], r["reason"]) for r in kept] == [
        (False, "invalid_payload"),
        (False, "invalid_payload"),
        (True, "invalid_payload"),
        (True, "invalid_payload"),
    ]


async def test_a_failure_a_retry_may_cure_is_queued_not_refused(database_url, db):
    """A serialization failure (40001) is the database's "not now": the delivery is
    answered 200 queued and applied once it passes, never kept among refused ones."""
    await refuse_inserts(db, "not_now", into="mailboxes", errcode="40001", message="not now")
    payload = traffic.mailbox_created()
    async with app_client(make_settings(database_url)) as client:
        answer = await deliver(client, payload)
        await db.execute("drop trigger not_now on mailboxes")
        await wait_until_drained(client)
    stored = await db.fetch("select event_id, spooled from events")
    refused = await db.fetchval("select count(*) from rejected_deliveries")
    assert answer.status_code == 200 and answer.json()["status"] == "queued"
    assert [(r["event_id"], r["spooled"]) for r in stored] == [(payload["eventId"], True)]
    assert refused == 0


async def test_a_poolers_refusals_name_the_setting_to_fix(database_url, db, capsys):
    """What a transaction pooler answers a client that takes it for PostgreSQL (mimicked
    here by triggers, as PgBouncer words it): a startup setting refused (08P01) is a
    setting to fix, not an outage, said in one line, and the delivery waits in the spool
    until it is fixed; a prepared statement missing (26000) is no retry's to cure: kept as
    rejected, its line naming the same fix."""
    await db.execute(
        """
        create function pooler_says() returns trigger language plpgsql as $$
        begin
          if new.email like 'startup%' then
            raise exception 'unsupported startup parameter: jit' using errcode = '08P01';
          end if;
          raise exception 'prepared statement "__asyncpg_stmt_1__" does not exist'
            using errcode = '26000';
        end $$;
        create trigger pooler before insert on mailboxes for each row
        when (new.email like 'startup%' or new.email like 'statement%')
        execute function pooler_says();
        """
    )
    startup = traffic.mailbox_created(details={"email": "startup@x.com"})
    statement = traffic.mailbox_created(details={"email": "statement@x.com"})
    async with app_client(make_settings(database_url)) as client:
        refused = await deliver(client, statement)
        queued = await deliver(client, startup)
        await db.execute("drop trigger pooler on mailboxes")
        await wait_until_drained(client)
    stored = await db.fetch("select event_id, spooled from events")
    rejected = await db.fetch("select reason, event_id, errors from rejected_deliveries")
    assert queued.status_code == 200 and queued.json()["status"] == "queued"
    assert refused.status_code == 500 and refused.json() == {"error": "apply_failed"}
    assert [(r["event_id"], r["spooled"]) for r in stored] == [(startup["eventId"], True)]
    assert [(r["reason"], r["event_id"]) for r in rejected] == [
        ("apply_failed", statement["eventId"])
    ]
    assert orjson.loads(rejected[0]["errors"])[0]["type"] == "26000"
    err = capsys.readouterr().err
    hint = re.escape(POOLER_HINT)
    assert len(said(err, hint + "; deliveries go to the spool until then")) == 1
    [failed] = said(err, rf"applying failed \({hint}\); kept as rejected")
    assert f"eventId={statement['eventId']}" in failed
    assert "database unreachable" not in err
    assert said(err, "the spool is empty again: 1 spooled deliveries applied in [\\d.]+ s")


async def test_a_bug_of_ours_is_kept_as_rejected_under_its_own_name(
    database_url, db, capsys, monkeypatch
):
    """A failure with no SQLSTATE (a bug in the service itself, not the database's
    answer): the delivery is answered 500 and kept among rejected deliveries, the error's
    type naming the bug; the other deliveries are applied as ever."""
    bug, fine, real = traffic.mailbox_created(), traffic.mailbox_created(), effects.of

    def buggy(model: Any, **given: Any) -> Any:
        if model.eventId == bug["eventId"]:
            raise ZeroDivisionError("a bug of ours")
        return real(model, **given)

    monkeypatch.setattr(effects, "of", buggy)
    async with app_client(make_settings(database_url)) as client:
        answers = [await deliver(client, p) for p in (bug, fine)]
    stored = await db.fetch("select event_id from events")
    rejected = await db.fetch("select reason, event_id, errors from rejected_deliveries")
    assert [a.status_code for a in answers] == [500, 200]
    assert [r["event_id"] for r in stored] == [fine["eventId"]]
    assert [(r["reason"], r["event_id"]) for r in rejected] == [("apply_failed", bug["eventId"])]
    assert orjson.loads(rejected[0]["errors"]) == [
        {"loc": [], "msg": "applying the event failed", "type": "ZeroDivisionError"}
    ]
    err = capsys.readouterr().err
    [failed] = said(err, r"applying failed \(ZeroDivisionError\); kept as rejected")
    assert f"eventId={bug['eventId']}" in failed


async def test_while_the_database_cannot_answer_deliveries_go_straight_to_the_spool(
    database_url, db, monkeypatch
):
    """After a failure a retry may cure, the next deliveries go to the spool without asking
    the database again (each would wait out its own failure) until the drainer's first
    success, after which deliveries are applied live again. A sequence (outside any
    transaction) counts the live deliveries that reached the database."""
    monkeypatch.setattr(receiver, "CIRCUIT_SECONDS", 3600.0)  # only the drain ends it
    await db.execute(
        """
        create sequence live_tries;
        create function out_of_room() returns trigger language plpgsql as $$
        begin
          if not new.spooled then perform nextval('live_tries'); end if;
          raise exception 'out of room' using errcode = '53000';
        end $$;
        create trigger out_of_room before insert on events
        for each row execute function out_of_room();
        """
    )
    first, second, after = (traffic.mailbox_created() for _ in range(3))
    async with app_client(make_settings(database_url)) as client:
        away = [await deliver(client, p) for p in (first, second)]
        tries = await db.fetchval("select last_value from live_tries")
        await db.execute("drop trigger out_of_room on events")
        await wait_until_drained(client)
        back = await deliver(client, after)
    stored = await db.fetch("select event_id, spooled from events order by id")
    tries_after = await db.fetchval("select last_value from live_tries")
    assert [a.json()["status"] for a in away] == ["queued", "queued"]
    assert tries == 1  # the second went straight to the spool
    assert back.json()["status"] == "processed" and tries_after == 1
    assert {(r["event_id"], r["spooled"]) for r in stored} == {
        (first["eventId"], True),
        (second["eventId"], True),
        (after["eventId"], False),
    }


async def test_a_spooled_delivery_the_schema_now_refuses_is_kept_as_ignored(
    database_url, db, tmp_path, monkeypatch
):
    """A delivery spooled by a release whose schema took it, drained by one whose schema
    does not: it is kept among events (ignored: no effect) and the spool drains, a CRM
    destination listed."""
    spool_dir = tempfile.mkdtemp(prefix="cmw-spool-", dir="/tmp")
    older = schema_violation()
    meta: dict[str, Any] = {"kind": "delivery", "signature": "valid", "form": None, "warnings": []}
    spool = Spool(Path(spool_dir), max_bytes=10**6)
    await spool.put(
        body=Vault([FERNET_KEY]).encrypt(orjson.dumps(older)), meta=meta, received_at=time.time()
    )
    settings = make_settings(
        database_url,
        spool_dir=spool_dir,
        destinations_file=destinations_file(tmp_path, monkeypatch),
        outbound_dispatch=False,
    )
    async with app_client(settings) as client:
        await wait_until_drained(client)
    stored = await db.fetch("select event_id, spooled from events")
    boxes = await db.fetchval("select count(*) from mailboxes")
    assert [(r["event_id"], r["spooled"]) for r in stored] == [(older["eventId"], True)]
    assert boxes == 0


async def test_a_delivery_applied_while_others_wait_in_the_spool_ends_no_outage(
    database_url, db, capsys, monkeypatch
):
    """While a spooled delivery still waits (the database refuses it for now), one applied
    live does not end the outage: the operator never reads "nothing was spooled", and the
    outage ends when the spool is empty."""
    monkeypatch.setattr(receiver, "CIRCUIT_SECONDS", 0.0)  # the next delivery asks at once
    await refuse_inserts(
        db,
        "not_now",
        into="mailboxes",
        errcode="53000",
        message="out of room",
        when="new.email like 'waits%'",
    )
    waits = traffic.mailbox_created(details={"email": "waits@x.com"})
    async with app_client(make_settings(database_url)) as client:
        answers = [await deliver(client, p) for p in (waits, traffic.mailbox_created())]
        await db.execute("drop trigger not_now on mailboxes")
        await wait_until_drained(client)
    assert [a.json()["status"] for a in answers] == ["queued", "processed"]
    err = capsys.readouterr().err
    assert "nothing was spooled" not in err
    assert len(said(err, r"database unreachable \(.+\): .*")) == 1
    assert said(err, r"the spool is empty again: 1 spooled deliveries applied in [\d.]+ s")
