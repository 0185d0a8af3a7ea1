"""Erasure, in process (`erase` runs privacy.erase_mailbox): only the erased mailbox's
personal fields go, from its row, every stored body and redacted copy that names it, and
the rejected deliveries that name it; a neighbour in the same body keeps every field."""

from typing import Any

import orjson
import pytest

from app.crypto import Vault
from app.db import make_engine
from app.models import Base
from app.operations import search_index
from app.operations.privacy import ERASED, Erased, erase_mailbox
from app.simulation import traffic
from tests.conftest import FERNET_KEY, deliver
from tests.state import OPS

PERSONAL = ("email", "firstName", "lastName", "profilePicture", "password", "appPassword")


def fields(tag: str) -> dict[str, str]:
    """Each personal field its own value: `%`, `_`, `\\` and non-ASCII among them."""
    return {
        "email": f"{tag}@erase.example",
        "firstName": f"Zoë-{tag}",
        "lastName": f"O_Brien%{tag}",
        "profilePicture": f"https://cdn.example/{tag}.jpg",
        "password": f"pw\\{tag}",
        "appPassword": f"app-{tag}",
        "authenticatorSecret": f"totp-{tag}",
    }


def encoded(value: str) -> bytes:
    """A value as it appears inside stored JSON (a `\\` escaped)."""
    return orjson.dumps(value)[1:-1]


async def erase(database_url: str, mailbox_id: str) -> Erased | None:
    engine = make_engine(database_url, pool_size=1)
    try:
        return await erase_mailbox(engine, Vault([FERNET_KEY]), mailbox_id)
    finally:
        await engine.dispose()


async def bodies(db: Any, table: str) -> list[Any]:
    vault = Vault([FERNET_KEY])
    rows = await db.fetch(f"select body_encrypted from {table} order by id")
    return [
        None if row["body_encrypted"] is None else vault.decrypt(row["body_encrypted"])
        for row in rows
    ]


@pytest.fixture
async def two_neighbours(client, db):
    """One prewarmup order whose body names both mailboxes, an edit of each, and rejected
    deliveries: one naming the erased mailbox, one its neighbour, one not JSON."""
    order = traffic.prewarmup_success(domains=1, per_domain=2)
    gone, kept = order["data"]["mailboxDetails"][0]["preWarmedUpMailboxes"]
    gone |= fields("gone")
    kept |= fields("kept")
    edits = [
        traffic.mailbox_updated(box["mailboxId"], {"lastName": f"Edited-{tag}"})
        for box, tag in ((gone, "gone"), (kept, "kept"))
    ]
    for payload in (order, *edits):
        assert (await deliver(client, payload)).status_code == 200
    for box in (gone, kept):
        refused = traffic.mailbox_created(subscriptionId="", details=dict(box))
        assert (await deliver(client, refused)).status_code == 422
    not_json = b'{"event": "mailbox.created", "mailboxId": "' + gone["mailboxId"].encode()
    assert (await deliver(client, not_json)).status_code == 400
    warmed = traffic.envelope("mailbox.warmup.started", {"mailboxId": gone["mailboxId"]})
    assert (await deliver(client, warmed)).status_code == 200
    await db.execute(  # as retention leaves it: the body deleted, the redacted copy kept
        "update events set body_encrypted = null where event_id = $1", warmed["eventId"]
    )
    return gone, kept


async def test_erase_takes_one_mailboxs_fields_from_everywhere_and_leaves_its_neighbour(
    client, db, database_url, two_neighbours
):
    gone, kept = two_neighbours
    assert await erase(database_url, gone["mailboxId"]) == Erased(events=3, rejected=2)

    shown = (await client.get(f"/api/v1/mailboxes/{gone['mailboxId']}", headers=OPS)).json()
    assert [shown[k] for k in ("email", "firstName", "lastName", "profilePicture")] == [None] * 4
    assert (shown["hasPassword"], shown["hasAppPassword"]) == (False, False)
    neighbour = (await client.get(f"/api/v1/mailboxes/{kept['mailboxId']}", headers=OPS)).json()
    assert (neighbour["email"], neighbour["lastName"]) == (kept["email"], "Edited-kept")

    events = b"\n".join(b for b in await bodies(db, "events") if b)
    copies = "\n".join(
        r["payload"] if isinstance(r["payload"], str) else orjson.dumps(r["payload"]).decode()
        for r in await db.fetch("select payload::text as payload from events")
    )
    rejected = await bodies(db, "rejected_deliveries")
    for key in PERSONAL:
        value = encoded(gone[key])
        assert value not in events and value.decode() not in copies
        assert all(body is None or value not in body for body in rejected)
    assert b"Edited-gone" not in events and "Edited-gone" not in copies
    assert ERASED.encode() in events
    # the neighbour's fields stay in every body, copy and rejected delivery naming it
    assert encoded(kept["password"]) in events and kept["profilePicture"] in copies
    assert b"Edited-kept" in events and "Edited-kept" in copies
    assert rejected[1] is not None and encoded(kept["password"]) in rejected[1]
    # a rejected delivery naming it stays replayable: scrubbed, not deleted
    assert rejected[0] is not None and ERASED.encode() in rejected[0]
    assert gone["mailboxId"].encode() in rejected[0]
    # the rejected body that is not JSON but names the mailbox is deleted
    assert rejected[2] is None
    audit = await db.fetchrow("select mailbox_id, events_scrubbed, rejected_scrubbed from erasures")
    assert tuple(audit) == (gone["mailboxId"], 3, 2)
    # each erased value is the mark, in the order's body and in the edit's
    stored = [orjson.loads(b) for b in await bodies(db, "events") if b]
    order = next(b for b in stored if b["event"] == "prewarmup.order.success")
    box = order["data"]["mailboxDetails"][0]["preWarmedUpMailboxes"][0]
    assert {k: box[k] for k in PERSONAL} == dict.fromkeys(PERSONAL, ERASED)
    edit = next(
        b
        for b in stored
        if b["event"] == "mailbox.updated" and b["data"]["mailboxId"] == box["mailboxId"]
    )
    assert edit["data"]["updatedFields"] == {"lastName": ERASED}


async def test_erasing_a_mailbox_that_is_not_stored_changes_nothing(
    client, db, database_url, two_neighbours
):
    before = {t: await db.fetch(f"select * from {t} order by 1") for t in Base.metadata.tables}
    assert await erase(database_url, "NO-SUCH-MAILBOX") is None
    after = {t: await db.fetch(f"select * from {t} order by 1") for t in Base.metadata.tables}
    assert after == before


async def test_after_erasure_a_later_delivery_updates_the_mailbox_but_restores_no_field(
    client, database_url, two_neighbours
):
    gone, _ = two_neighbours
    await erase(database_url, gone["mailboxId"])
    again = traffic.mailbox_created(
        provider="MICROSOFT",
        details=gone | {"isAdmin": not gone["isAdmin"], "expiryDate": "2031-01-01T00:00:00Z"},
    )
    edit = traffic.mailbox_updated(gone["mailboxId"], {"firstName": "Back", "userName": "back"})
    warmup = traffic.envelope("mailbox.warmup.started", {"mailboxId": gone["mailboxId"]})
    for payload in (again, edit, warmup):
        assert (await deliver(client, payload)).status_code == 200
    shown = (await client.get(f"/api/v1/mailboxes/{gone['mailboxId']}", headers=OPS)).json()
    personal = ("email", "firstName", "lastName", "userName", "profilePicture")
    assert {k: shown[k] for k in personal} == dict.fromkeys(personal)
    assert (shown["hasPassword"], shown["hasAppPassword"], shown["hasAuthenticatorSecret"]) == (
        False,
        False,
        False,
    )
    # what is not personal still follows the deliveries
    assert shown["isAdmin"] is (not gone["isAdmin"])
    assert shown["expiryDate"].startswith("2031-01-01")
    assert shown["warmupStatus"] == "started"


async def test_erase_takes_the_mailboxs_fields_from_the_search_copy_too(
    client, db, database_url, two_neighbours
):
    """The search indexer's copy of each mailbox's text (migration 0026) holds its email
    and names: erasure leaves none there, and `q` no longer finds the mailbox by them."""
    gone, kept = two_neighbours
    assert await search_index.index_once(db, margin=0) > 0
    await erase(database_url, gone["mailboxId"])
    copies = "\n".join(r["text"] for r in await db.fetch("select text from mailbox_search"))
    for key in ("email", "firstName", "lastName"):
        assert gone[key] not in copies and "Edited-gone" not in copies
        answer = await client.get("/api/v1/mailboxes", params={"q": gone[key]}, headers=OPS)
        assert answer.json()["items"] == []
    assert kept["email"] in copies and "Edited-kept" in copies
    assert gone["mailboxId"] in copies  # not personal: the erased mailbox is still listed
