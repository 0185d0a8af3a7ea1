"""The payload rules as the sender and an operator meet them (docs/webhooks.md): a
descriptive field spelled unexpectedly is stored repaired and the repair is said, word for
word, once, on the event; a body that cannot be kept is refused 400 with a message saying
why; an event naming nothing this service keeps is stored as ignored, and says so.

Each test sends many deliveries into one database: one case a delivery, found again by its
own IDs.
"""

import asyncio
import tempfile
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import orjson

from app.simulation import traffic
from tests.conftest import app_client, deliver, make_settings
from tests.state import OPS
from tests.test_webhook_contract import DEAD_DATABASE

NO_AMOUNT = "price: not an amount of money; left empty"
NOT_A_DATE = "creationTime: empty or not a date; left empty"
NOT_TEXT = "firstName: not text; left empty"
A_NUMBER = "firstName: a number where text was expected; kept as text"
NO_STATE = "subscriptionStatus: not a known state; the event's name decides"


async def accepted(client: httpx.AsyncClient, payload: dict[str, Any] | bytes) -> Any:
    response = await deliver(client, payload)
    assert response.status_code == 200, response.text
    return response.json()


async def warnings_of(client: httpx.AsyncClient, event_id: str) -> list[str]:
    found = await client.get("/api/v1/events", params={"eventId": event_id}, headers=OPS)
    (item,) = found.json()["items"]
    shown = await client.get(f"/api/v1/events/{item['id']}", headers=OPS)
    return list(shown.json()["warnings"])


async def test_every_spelling_of_the_two_providers_is_stored_as_one_and_no_other(client, db):
    spellings = {
        "G Suite": "GOOGLE",
        "gworkspace": "GOOGLE",
        "google": "GOOGLE",
        "Microsoft 365": "MICROSOFT",
        "office-365": "MICROSOFT",
        "Outlook.com": "MICROSOFT",
        "m365": "MICROSOFT",
        "O365": "MICROSOFT",
        "ms": "MICROSOFT",
        "MS 365": "MICROSOFT",
        "Yahoo": None,
        "Googol Mail": None,
        "MSN": None,
    }
    for spelling, provider in spellings.items():
        payload = traffic.mailbox_created(provider=spelling)
        box_id = payload["data"]["mailboxDetails"]["mailboxId"]
        assert (await accepted(client, payload))["status"] == "processed"
        stored = await db.fetchval("select provider from mailboxes where mailbox_id = $1", box_id)
        said = await warnings_of(client, payload["eventId"])
        unknown = ["workspaceType: not a known provider; left empty"]
        assert (stored, said) == (provider, [] if provider else unknown), spelling
    # a provider sent as null is no provider, and nothing to repair
    payload = traffic.mailbox_created(workspaceType=None)
    await accepted(client, payload)
    assert await warnings_of(client, payload["eventId"]) == []


# (what mailbox.created's data or mailboxDetails says, the column, what it keeps, warnings)
MAILBOX_CASES: list[tuple[dict[str, Any], dict[str, Any], str, Any, list[str]]] = [
    ({"price": 0.30000000000000004}, {}, "price", Decimal("0.3"), [
        "price: more than 4 decimal places; rounded"
    ]),
    ({"price": "12.5"}, {}, "price", Decimal("12.5"), []),
    ({"price": 0}, {}, "price", Decimal(0), []),
    ({"price": "9999999999.9999"}, {}, "price", Decimal("9999999999.9999"), []),
    ({"price": 10**10}, {}, "price", None, [NO_AMOUNT]),
    ({"price": -1}, {}, "price", None, [NO_AMOUNT]),
    ({"price": "NaN"}, {}, "price", None, [NO_AMOUNT]),
    ({"price": "twelve"}, {}, "price", None, [NO_AMOUNT]),
    ({"price": True}, {}, "price", None, [NO_AMOUNT]),
    ({"price": None}, {}, "price", None, []),
    ({}, {"firstName": 42}, "first_name", "42", [A_NUMBER]),
    ({}, {"firstName": 4.5}, "first_name", "4.5", [A_NUMBER]),
    ({}, {"firstName": True}, "first_name", None, [NOT_TEXT]),
    ({}, {"firstName": {"given": "Ann"}}, "first_name", None, [NOT_TEXT]),
    ({}, {"lastName": None}, "last_name", None, []),
    ({}, {"email": "a" * 308 + "@example.com"}, "email", "a" * 308 + "@example.com", []),
    ({}, {"email": "b" * 309 + "@example.com"}, "email", ("b" * 309 + "@example.com")[:320], [
        "email: longer than 320 characters; cut"
    ]),
    ({}, {"creationTime": ""}, "creation_time", None, [NOT_A_DATE]),
    ({}, {"creationTime": None}, "creation_time", None, []),
    ({}, {"creationTime": "2024-03-08T10:00:00"}, "creation_time", datetime(
        2024, 3, 8, 10, tzinfo=UTC
    ), []),
    ({}, {"creationTime": "2024-03-08T10:00:00+02:00"}, "creation_time", datetime(
        2024, 3, 8, 8, tzinfo=UTC
    ), []),
    ({}, {"isAdmin": "true"}, "is_admin", True, []),
    ({}, {"isAdmin": False}, "is_admin", False, []),
    ({}, {"isAdmin": "maybe"}, "is_admin", None, ["isAdmin: not true or false; left empty"]),
]  # fmt: skip


async def test_each_odd_field_is_kept_repaired_and_the_repair_said_in_words(client, db):
    for data, details, column, kept, said in MAILBOX_CASES:
        payload = traffic.mailbox_created(details=details, **data)
        box_id = payload["data"]["mailboxDetails"]["mailboxId"]
        assert (await accepted(client, payload))["status"] == "processed"
        sql = f"select {column} from mailboxes where mailbox_id = $1"
        case = (data, details)
        assert await db.fetchval(sql, box_id) == kept, case
        assert await warnings_of(client, payload["eventId"]) == said, case


async def test_a_state_is_read_however_it_is_spelled_and_an_unknown_one_yields_to_the_event(
    client, db
):
    cases: list[tuple[str, dict[str, Any], str | None, list[str]]] = [
        ("subscription.updated", {"subscriptionStatus": "past-due"}, "PAST_DUE", []),
        ("subscription.updated", {"subscriptionStatus": "Past Due"}, "PAST_DUE", []),
        ("subscription.updated", {"subscriptionStatus": " cancelled "}, "CANCELLED", []),
        ("subscription.updated", {"subscriptionStatus": "on hold"}, None, [NO_STATE]),
        ("subscription.expired", {"subscriptionStatus": "on hold"}, "EXPIRED", [NO_STATE]),
        ("subscription.expired", {"subscriptionStatus": None}, "EXPIRED", []),
        ("subscription.renewal.failed", {"subscriptionStatus": "active"}, "ACTIVE", []),
    ]
    for event, data, state, said in cases:
        subscription_id = traffic.provider_id()
        payload = traffic.envelope(event, {"subscriptionId": subscription_id} | data)
        assert (await accepted(client, payload))["status"] == "processed"
        sql = "select subscription_status from subscriptions where subscription_id = $1"
        assert await db.fetchval(sql, subscription_id) == state, (event, data)
        assert await warnings_of(client, payload["eventId"]) == said, (event, data)
    domain = f"{traffic.provider_id().lower()}.com"
    payload = traffic.envelope(
        "domain.renewal.failed", {"domain": domain, "status": "grace-period"}
    )
    await accepted(client, payload)
    assert await db.fetchval("select status from domains where name = $1", domain) == (
        "GRACE_PERIOD"
    )


async def test_a_count_out_of_range_is_left_empty_and_said(client, db):
    for quantity, kept, said in [
        ("3", 3, []),
        (0, 0, []),
        (-1, None, ["quantity: not a count; left empty"]),
        (1_000_001, None, ["quantity: not a count; left empty"]),
    ]:
        subscription_id = traffic.provider_id()
        data = {"subscriptionId": subscription_id, "quantity": quantity}
        payload = traffic.envelope("subscription.updated", data)
        await accepted(client, payload)
        sql = "select lifecycle_quantity from subscriptions where subscription_id = $1"
        assert await db.fetchval(sql, subscription_id) == kept, quantity
        assert await warnings_of(client, payload["eventId"]) == said, quantity


async def test_an_event_naming_nothing_kept_is_stored_as_ignored_and_says_what_it_lacks(client, db):
    box_id = traffic.provider_id()
    cases: list[tuple[str, dict[str, Any], str | None]] = [
        ("subscription.updated", {"domain": "a.example"}, "subscriptionId"),
        ("domain.expired", {"userId": "u1"}, "domainId or domainName"),
        ("mailbox.warmup.started", {"mailboxDetails": None}, "mailboxId"),
        ("subscription.updated", {"subscriptionId": "S-1"}, None),
        ("domain.expired", {"domainName": "only-a-name.example"}, None),
        ("domain.expired", {"domainId": "D-1"}, None),
        ("mailbox.warmup.started", {"mailboxDetails": {"mailboxId": box_id}}, None),
    ]
    for event, data, lacking in cases:
        payload = traffic.envelope(event, data)
        answer = await accepted(client, payload)
        said = await warnings_of(client, payload["eventId"])
        if lacking:
            assert answer["status"] == "ignored", (event, data)
            assert said == [f"stored as ignored: no recognisable {lacking} in the payload"]
        else:
            assert (answer["status"], said) == ("processed", []), (event, data)
    assert await db.fetchval("select name from domains where domain_id is null") == (
        "only-a-name.example"
    )


def nested(depth: int, opening: str, closing: str) -> bytes:
    return (opening * depth + closing * depth).encode()


def body(data: bytes, event: str = '"domain.oddity"', event_id: str | None = None) -> bytes:
    event_id = event_id or f'"{traffic.provider_id()}"'
    return b'{"event": %s, "eventId": %s, "data": %s}' % (
        event.encode(),
        event_id.encode(),
        data,
    )


async def test_a_body_that_cannot_be_kept_is_refused_with_a_message_that_says_why(client, db):
    deep = "JSON nested deeper than 254 levels"
    nul = "strings must not contain NUL characters"
    event = "'event' (or 'eventType') must be a non-empty string of at most 256"
    event_id = "'eventId' must be a non-empty string of at most 256 characters"
    refused = [
        (b"not json", "body is not valid JSON (UTF-8)"),
        (b'"a string"', "body must be a JSON object"),
        (body(nested(300, "[", "]")), deep),
        (body(nested(300, '{"a":', "}")[:-300] + b"1" + b"}" * 300), deep),
        (body(b'{"k\\u0000": 1}'), nul),
        (body(b'["ok", "\\u0000"]'), nul),
        (body(b"{}", event='"%s"' % ("x" * 257)), event),
        (body(b"{}", event='"   "'), event),
        (body(b"{}", event_id='"   "'), event_id),
        (body(b"{}", event_id='"%s"' % ("i" * 257)), event_id),
    ]
    for raw, message in refused:
        response = await deliver(client, raw)
        assert response.status_code == 400, raw[:80]
        assert response.json() == {"error": "invalid_json", "message": message}, raw[:80]
    assert await db.fetchval("select count(*) from rejected_deliveries") == len(refused)
    assert await db.fetchval("select count(*) from events") == 0


async def test_a_body_only_looking_odd_is_kept(client, db):
    kept = [
        body(b"[" + b",".join([b"[[]]"] * 150) + b"]"),  # 451 brackets, 4 levels deep
        body(
            b'{"reason": "C:\\\\u0000dir", "n": 1}', event_id='"e-1"'
        ),  # a backslash, then the text u0000
        body(b"{}", event='"%s"' % ("domain." + "x" * 249)),  # 256 characters
        body(b"{}", event_id='"%s"' % ("i" * 256)),
    ]
    for raw in kept:
        assert (await accepted(client, raw))["status"] == "ignored", raw[:80]
    sql = "select payload #>> '{data,reason}' from events where event_id = 'e-1'"
    assert await db.fetchval(sql) == "C:\\u0000dir"
    assert await db.fetchval("select count(*) from events") == len(kept)


async def test_an_event_without_an_id_gets_one_from_its_content_whatever_its_key_order(client):
    first = {"event": "domain.oddity", "data": {"a": 1, "b": 2}}
    reordered = orjson.dumps({"data": {"b": 2, "a": 1}, "event": "domain.oddity"})
    other = {"event": "domain.oddity", "data": {"a": 1, "b": 3}}
    answers = [await accepted(client, sent) for sent in (first, reordered, other)]
    assert [a["status"] for a in answers] == ["ignored", "duplicate", "ignored"]
    assert answers[0]["eventId"] == answers[1]["eventId"] != answers[2]["eventId"]


async def test_an_event_without_an_id_queued_while_the_database_is_away_dedupes_once_back(
    database_url, db
):
    warmup = {"eventType": "mailbox.warmup.started", "data": {"mailboxId": "M-1"}}
    spool_dir = tempfile.mkdtemp(prefix="cmw-spool-", dir="/tmp")
    async with app_client(make_settings(DEAD_DATABASE, spool_dir=spool_dir)) as offline:
        response = await deliver(offline, warmup)
    assert response.status_code == 200
    assert response.json() == {
        "status": "queued",
        "eventId": None,  # derived from its content once the hashing key can be read
        "event": "mailbox.warmup.started",
    }
    async with app_client(make_settings(database_url, spool_dir=spool_dir)) as client:
        deadline = time.monotonic() + 120
        while not await db.fetchval("select count(*) from events"):
            assert time.monotonic() < deadline, "the spool was not drained"
            await asyncio.sleep(0.05)
        retried = (await deliver(client, warmup)).json()
    row = await db.fetchrow("select event_id, event, spooled from events")
    assert row["event_id"].startswith("sha256:") and row["spooled"]
    assert row["event"] == "mailbox.warmup.started"
    assert (retried["status"], retried["eventId"]) == ("duplicate", row["event_id"])


async def test_a_time_without_an_offset_is_utc_whatever_the_servers_time_zone(
    client, db, monkeypatch
):
    monkeypatch.setenv("TZ", "Asia/Tokyo")  # nine hours ahead of UTC
    time.tzset()
    try:
        await accepted(client, traffic.mailbox_created())
        await db.execute("update mailboxes set updated_at = '2026-01-02T03:00:00Z'")
        found = []
        for since in ("2026-01-02T02:30:00", "2026-01-02T03:30:00"):
            params = {"updatedSince": since}
            page = await client.get("/api/v1/mailboxes", params=params, headers=OPS)
            found.append(len(page.json()["items"]))
        assert found == [1, 0]
    finally:
        monkeypatch.undo()
        time.tzset()
