"""Retention deletes old bodies; erase removes one mailbox's personal data for good."""

from typing import Any

import orjson
import pytest

from app.config import Settings
from app.crypto import Vault, generate_key
from app.db import make_engine
from app.operations import privacy
from app.operations.privacy import expire_bodies
from app.operations.replay import Selection, replay
from app.simulation import traffic
from tests import streams
from tests.conftest import (
    CREDENTIALS_TOKEN,
    FERNET_KEY,
    app_client,
    deliver,
    make_settings,
)
from tests.reliability.test_crash_and_outage import server_env
from tests.reliability.test_secrets import pg_dump
from tests.servers import run_cli
from tests.state import OPS

CREDS = {"Authorization": f"Bearer {CREDENTIALS_TOKEN}"}


@pytest.fixture
def settings(database_url: str) -> Settings:
    """The app without its own retention task: these tests call expire_bodies themselves,
    and a task deleting the same bodies first made that call's count a race."""
    return make_settings(database_url, body_retention_days=0)


async def test_bodies_past_retention_are_deleted_and_the_redacted_copy_stays(
    client, db, database_url
):
    old, recent = traffic.mailbox_created(), traffic.mailbox_created()
    ignored = traffic.envelope("dns-record.updated", {"domain": "a.com"})
    for payload in (old, recent, ignored):
        await deliver(client, payload)
    await db.execute(
        "update events set first_received_at = now() - interval '91 days' where event_id = any($1)",
        [old["eventId"], ignored["eventId"]],
    )
    engine = make_engine(database_url, pool_size=1)
    try:
        assert await expire_bodies(engine, 90) == 1
    finally:
        await engine.dispose()
    bodies = dict(await db.fetch("select event_id, body_encrypted is not null from events"))
    assert bodies == {old["eventId"]: False, recent["eventId"]: True, ignored["eventId"]: True}
    items = await client.get("/api/v1/events", params={"eventId": old["eventId"]}, headers=OPS)
    one = (await client.get(f"/api/v1/events/{items.json()['items'][0]['id']}", headers=OPS)).json()
    assert (
        one["payload"]["data"]["mailboxDetails"]["email"] == old["data"]["mailboxDetails"]["email"]
    )
    out = run_cli("replay", "--all", "--dry-run", env=server_env(database_url))
    assert "body deleted 1" in out


async def test_rejected_bodies_past_retention_are_deleted_and_their_errors_stay(
    client, db, database_url
):
    for _ in range(2):
        payload = traffic.mailbox_created()
        del payload["data"]["mailboxDetails"]["mailboxId"]
        assert (await deliver(client, payload)).status_code == 422
    await db.execute(
        "update rejected_deliveries set received_at = now() - interval '91 days'"
        " where id = (select min(id) from rejected_deliveries)"
    )
    engine = make_engine(database_url, pool_size=1)
    try:
        assert await expire_bodies(engine, 90) == 1
    finally:
        await engine.dispose()
    rows = await db.fetch(
        "select body_encrypted is not null as kept, errors from rejected_deliveries order by id"
    )
    assert [row["kept"] for row in rows] == [False, True]
    assert all("mailboxId" in row["errors"] for row in rows)


async def test_erase_removes_a_mailbox_everywhere_and_replay_cannot_bring_it_back(
    client, db, database_url
):
    prewarm = traffic.prewarmup_success(domains=1, per_domain=3)
    boxes = prewarm["data"]["mailboxDetails"][0]["preWarmedUpMailboxes"]
    gone, kept = boxes[0], boxes[1]
    renamed = traffic.mailbox_updated(gone["mailboxId"], {"firstName": "Zebulon-Erased"})
    refused = traffic.mailbox_created(subscriptionId="", details={"mailboxId": gone["mailboxId"]})
    for payload in (prewarm, renamed):
        assert (await deliver(client, payload)).status_code == 200
    assert (await deliver(client, refused)).status_code == 422

    out = run_cli("erase", "--mailbox", gone["mailboxId"], env=server_env(database_url))
    assert "from 2 stored events and 1 rejected deliveries" in out

    box = (await client.get(f"/api/v1/mailboxes/{gone['mailboxId']}", headers=OPS)).json()
    assert (box["email"], box["firstName"], box["hasPassword"]) == (None, None, False)
    creds = await client.get(f"/api/v1/mailboxes/{gone['mailboxId']}/credentials", headers=CREDS)
    assert set(creds.json().values()) == {gone["mailboxId"], None}
    other = await client.get(f"/api/v1/mailboxes/{kept['mailboxId']}/credentials", headers=CREDS)
    assert other.json()["password"] == kept["password"]  # the others are untouched

    run_cli("replay", "--all", env=server_env(database_url))  # replay brings nothing back
    erased = [gone["email"], "Zebulon-Erased", gone["password"], gone["appPassword"]]
    erased.append(gone["authenticatorSecret"])
    dump = pg_dump(database_url)
    vault = Vault([FERNET_KEY])
    bodies = b"".join(
        vault.decrypt(row["b"])
        for row in await db.fetch(
            "select body_encrypted as b from events where body_encrypted is not null "
            "union all select body_encrypted from rejected_deliveries "
            "where body_encrypted is not null"
        )
    )
    assert kept["email"] in dump and kept["password"].encode() in bodies  # the scan is real
    assert [v for v in erased if v in dump or v.encode() in bodies] == []
    audit = await db.fetchrow("select mailbox_id, events_scrubbed from erasures")
    assert tuple(audit) == (gone["mailboxId"], 2)

    # a later delivery naming the mailbox (here, a copy sent again) cannot restore it either
    again = traffic.prewarmup_success(domains=1, per_domain=1)
    again["data"]["mailboxDetails"][0]["preWarmedUpMailboxes"][0] |= gone
    assert (await deliver(client, again)).json()["status"] == "processed"
    box = (await client.get(f"/api/v1/mailboxes/{gone['mailboxId']}", headers=OPS)).json()
    assert (box["email"], box["firstName"], box["hasAppPassword"]) == (None, None, False)


async def test_retention_goes_on_past_its_first_batch(client, db, database_url, monkeypatch):
    monkeypatch.setattr(privacy, "RETENTION_BATCH", 2)
    payloads = [traffic.mailbox_created() for _ in range(6)]
    for payload in payloads:
        assert (await deliver(client, payload)).status_code == 200
    old = [payload["eventId"] for payload in payloads[:5]]  # two full batches and a part
    await db.execute(
        "update events set first_received_at = now() - interval '91 days' where event_id = any($1)",
        old,
    )
    engine = make_engine(database_url, pool_size=1)
    try:
        assert await expire_bodies(engine, 90) == 5
    finally:
        await engine.dispose()
    kept = await db.fetch("select event_id from events where body_encrypted is not null")
    assert [row["event_id"] for row in kept] == [payloads[5]["eventId"]]


def personal(tag: str) -> dict[str, str]:
    """Every personal field and credential, each value this mailbox's own."""
    return {
        "email": f"{tag}.person@erase-{tag}.example",
        "firstName": f"First-{tag}",
        "lastName": f"Last-{tag}",
        "userName": f"user-{tag}",
        "profilePicture": f"https://cdn.example/pictures/{tag}.jpg",
        "password": f"pw-{tag}-secret",
        "appPassword": f"app-{tag}-secret",
        "authenticatorSecret": f"totp-{tag}-secret",
    }


async def test_erase_removes_every_personal_field_and_no_later_delivery_restores_one(
    client, db, database_url
):
    gone, kept = personal("gone7q"), personal("kept3z")
    created = {
        tag: traffic.mailbox_created(provider="MICROSOFT", details=fields)
        for tag, fields in (("gone", gone), ("kept", kept))
    }
    ids = {tag: payload["data"]["mailboxDetails"]["mailboxId"] for tag, payload in created.items()}
    for payload in created.values():
        assert (await deliver(client, payload)).status_code == 200
    run_cli("erase", "--mailbox", ids["gone"], env=server_env(database_url))
    fields = ("email", "firstName", "lastName", "userName", "profilePicture")
    dump = pg_dump(database_url)
    assert all(value in dump for value in (kept["profilePicture"], kept["userName"]))
    assert [v for k, v in gone.items() if k in fields and v in dump] == []

    # again, with a new eventId, and an edit of every editable field: nothing comes back
    again = traffic.mailbox_created(provider="MICROSOFT", details=gone | {"mailboxId": ids["gone"]})
    edit = traffic.mailbox_updated(
        ids["gone"], {k: gone[k] for k in ("firstName", "lastName", "userName", "profilePicture")}
    )
    for payload in (again, edit):
        assert (await deliver(client, payload)).status_code == 200

    box = (await client.get(f"/api/v1/mailboxes/{ids['gone']}", headers=OPS)).json()
    assert {f: box[f] for f in fields} == dict.fromkeys(fields)
    other = (await client.get(f"/api/v1/mailboxes/{ids['kept']}", headers=OPS)).json()
    assert {f: other[f] for f in fields} == {f: kept[f] for f in fields}


async def test_readiness_finds_the_oldest_body_left_after_retention_deleted_older_ones(
    db, database_url
):
    old_key, new_key = generate_key(), generate_key()
    first, second, third = (traffic.mailbox_created() for _ in range(3))
    async with app_client(make_settings(database_url, fernet_keys=old_key)) as client:
        for payload in (first, second):
            assert (await deliver(client, payload)).json()["status"] == "processed"
    both = make_settings(database_url, fernet_keys=f"{new_key},{old_key}", body_retention_days=0)
    async with app_client(both) as client:
        assert (await deliver(client, third)).json()["status"] == "processed"
    # The hashing key under the new key, as `rotate-keys` leaves it: only bodies differ.
    hashing = await db.fetchval("select key_encrypted from server_keys")
    rewrapped = Vault([new_key]).encrypt(Vault([old_key]).decrypt(hashing))
    await db.execute("update server_keys set key_encrypted = $1", rewrapped)
    only_new = make_settings(database_url, fernet_keys=new_key, body_retention_days=0)

    async def expire(*payloads: dict[str, Any]) -> None:
        await db.execute(
            "update events set first_received_at = now() - interval '91 days'"
            " where event_id = any($1)",
            [payload["eventId"] for payload in payloads],
        )
        engine = make_engine(database_url, pool_size=1)
        try:
            assert await expire_bodies(engine, 90) == 1
        finally:
            await engine.dispose()

    async def ready(settings: Settings) -> int:
        async with app_client(settings) as client:
            return (await client.get("/readyz")).status_code

    await expire(first)
    # The second body, under the old key, is now the oldest stored: losing that key fails.
    assert (await ready(only_new), await ready(both)) == (503, 200)
    await expire(first, second)
    assert await ready(only_new) == 200


async def test_an_old_ignored_event_replayed_as_processed_loses_its_body_to_retention(
    client, db, database_url
):
    sub = traffic.provider_id()
    stale = streams.subscription_event("subscription.cancelled", sub, **streams.period(0))
    await db.execute(  # stored as ignored by an older release, before the others
        "insert into events (event_id, event, status, content_hash, deliveries, conflict, "
        "signature, payload, body_encrypted, first_received_at) values ($1, $2, 'ignored', "
        "'\\x00', 1, false, 'valid', '{}', $3, now() - interval '91 days')",
        stale["eventId"],
        stale["event"],
        Vault([FERNET_KEY]).encrypt(orjson.dumps(stale)),
    )
    old, recent = traffic.mailbox_created(), traffic.mailbox_created()
    for payload in (old, recent):
        assert (await deliver(client, payload)).json()["status"] == "processed"
    await db.execute(
        "update events set first_received_at = now() - interval '91 days' where event_id = $1",
        old["eventId"],
    )
    engine = make_engine(database_url, pool_size=1)
    try:
        assert await expire_bodies(engine, 90) == 1  # the ignored one keeps its body
        events, _ = await replay(
            engine, Vault([FERNET_KEY]), Selection(everything=True), dry_run=False
        )
        assert events.applied >= 1
        assert await expire_bodies(engine, 90) == 1  # now processed, and past retention
    finally:
        await engine.dispose()
    bodies = dict(await db.fetch("select event_id, body_encrypted is not null from events"))
    assert bodies == {stale["eventId"]: False, old["eventId"]: False, recent["eventId"]: True}


async def test_readiness_finds_an_ignored_body_older_than_every_processed_one(db, database_url):
    old_key, new_key = generate_key(), generate_key()
    ignored = traffic.envelope("dns-record.updated", {"domain": "a.com"})
    async with app_client(make_settings(database_url, fernet_keys=old_key)) as client:
        assert (await deliver(client, ignored)).json()["status"] == "ignored"
    both = make_settings(database_url, fernet_keys=f"{new_key},{old_key}", body_retention_days=0)
    async with app_client(both) as client:
        for payload in (traffic.mailbox_created(), traffic.mailbox_created()):
            assert (await deliver(client, payload)).json()["status"] == "processed"
    hashing = await db.fetchval("select key_encrypted from server_keys")
    rewrapped = Vault([new_key]).encrypt(Vault([old_key]).decrypt(hashing))
    await db.execute("update server_keys set key_encrypted = $1", rewrapped)
    only_new = make_settings(database_url, fernet_keys=new_key, body_retention_days=0)
    async with app_client(only_new) as client:
        assert (await client.get("/readyz")).status_code == 503
    async with app_client(both) as client:
        assert (await client.get("/readyz")).status_code == 200
