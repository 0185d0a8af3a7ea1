"""Promises of the stored state and what ops read of it that one-line mistakes broke
unseen: a conflict mark mended by the retry, key rotation beside a live write, exports that
stream what they audited and neutralise every formula start, renewals at their boundaries,
searches for wildcard characters, and a prewarmup domain's quantity.

Each test varies what code could confuse and asserts both ways: what must change and what
must stay."""

import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.crypto import Vault, generate_key
from app.db import make_engine
from app.operations import keys
from app.simulation import traffic
from tests.conftest import CREDENTIALS_TOKEN, FERNET_KEY, OPS_TOKEN, deliver
from tests.streams import subscription_event

OPS = {"Authorization": f"Bearer {OPS_TOKEN}"}
CREDS = {"Authorization": f"Bearer {CREDENTIALS_TOKEN}"}


async def delivered(client, *payloads):
    for payload in payloads:
        response = await deliver(client, payload)
        assert response.status_code == 200, response.text
    return payloads


async def walk(client, path: str, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(200):  # a cursor that does not move must fail, not hang
        query = params | ({"cursor": cursor} if cursor else {})
        page = await client.get(f"/api/v1/{path}", params=query, headers=OPS)
        assert page.status_code == 200, (path, params, page.text)
        items += page.json()["items"]
        if (cursor := page.json()["nextCursor"]) is None:
            return items
    raise AssertionError(f"{path} did not end within 200 pages")


# --- a conflict mark lost in a crash is mended by the retry -----------------------------


async def test_a_conflict_mark_lost_between_two_statements_is_mended_by_the_retry(client, db):
    first = traffic.mailbox_created()
    second = traffic.envelope(first["event"], dict(first["data"]), first["eventId"])
    second["data"]["price"] = 9.99  # same eventId, other content
    other = traffic.mailbox_created()
    await delivered(client, first, second, other)
    # what a crash after the record and before marking the older row leaves behind
    await db.execute(
        "update events set conflict = false where event_id = $1 and id = "
        "(select min(id) from events where event_id = $1)",
        first["eventId"],
    )
    retried = await deliver(client, second)  # the sender retries: nothing new to apply
    assert retried.json()["status"] == "duplicate"
    marks = await db.fetch("select event_id, conflict from events order by id")
    assert [(r["event_id"], r["conflict"]) for r in marks] == [
        (first["eventId"], True),
        (first["eventId"], True),
        (other["eventId"], False),
    ]


# --- rotate-keys never overwrites a credential written while it ran ---------------------


async def test_rotation_leaves_a_credential_the_service_rewrote_meanwhile(
    client, db, database_url, monkeypatch
):
    payload = traffic.prewarmup_success(domains=1, per_domain=3)
    await delivered(client, payload)
    new_key = generate_key()
    rewritten = Vault([new_key]).encrypt(b"written-by-a-live-delivery")
    ids = dict(await db.fetch("select id, mailbox_id from mailboxes order by id"))
    raced = min(ids)
    batches = keys._batches

    async def racing(engine, table, column, size) -> AsyncIterator[tuple[int, bytes]]:
        """Between rotate-keys reading a value and writing it back, a delivery rewrites it."""
        async for row_id, token in batches(engine, table, column, size):
            if table.name == "mailboxes" and column == "password_encrypted" and row_id == raced:
                await db.execute(
                    "update mailboxes set password_encrypted = $2 where id = $1", row_id, rewritten
                )
            yield row_id, token

    monkeypatch.setattr(keys, "_batches", racing)
    engine = make_engine(database_url, pool_size=1)
    try:
        await keys.rotate_keys(engine, [new_key, FERNET_KEY])
    finally:
        await engine.dispose()
    stored = dict(await db.fetch("select id, password_encrypted from mailboxes"))
    assert stored[raced] == rewritten  # the live write stands
    vault = Vault([new_key])  # and the others were rotated: readable under the new key alone
    boxes = {
        b["mailboxId"]: b for b in payload["data"]["mailboxDetails"][0]["preWarmedUpMailboxes"]
    }
    for row_id, token in stored.items():
        if row_id != raced:
            assert vault.unseal({"password": token})["password"] == boxes[ids[row_id]]["password"]


# --- exports: exactly the audited mailboxes, every formula start neutralised ------------


async def export(client, fmt: str, **params: Any):
    response = await client.get(
        "/api/v1/exports/mailboxes", params={"format": fmt} | params, headers=CREDS
    )
    assert response.status_code == 200, response.text
    return list(csv.DictReader(io.StringIO(response.text.lstrip("\ufeff"))))


async def test_an_export_streams_exactly_the_mailboxes_it_audited(client, db):
    ours = [traffic.mailbox_created(domain="alpha-export.example") for _ in range(2)]
    theirs = [traffic.mailbox_created(domain="beta-export.example") for _ in range(3)]
    await delivered(client, *ours, *theirs)
    for domain, sent in (("alpha-export.example", ours), ("beta-export.example", theirs)):
        exported = await export(client, "csv", domain=domain)
        export_id = await db.fetchval("select export_id from credential_reads order by id desc")
        audited = await db.fetch(
            "select mailbox_id from credential_reads where export_id = $1", export_id
        )
        expected = sorted(p["data"]["mailboxDetails"]["mailboxId"] for p in sent)
        assert sorted(r["mailboxId"] for r in exported) == expected
        assert sorted(r["mailbox_id"] for r in audited) == expected


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
async def test_every_formula_start_is_neutralised_and_plain_text_is_not(client, start):
    formula = f"{start}SUM(A1:A9)"
    payload = traffic.mailbox_created(
        domain="formula.example", details={"firstName": formula, "lastName": "O'Neil-Smith"}
    )
    await delivered(client, payload)
    [row] = await export(client, "csv", domain="formula.example")
    stored = (await client.get("/api/v1/mailboxes", params={"domain": "formula.example"},
                               headers=OPS)).json()["items"][0]["firstName"]  # fmt: skip
    assert row["firstName"] == "'" + stored and stored.endswith("SUM(A1:A9)")
    assert row["lastName"] == "O'Neil-Smith"  # not a formula start: unchanged
    assert row["appPassword"] == payload["data"]["mailboxDetails"]["appPassword"]


# --- renewals at their boundaries -------------------------------------------------------


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


async def subscription_ending(client, ends: datetime, status: str = "ACTIVE") -> str:
    sub = traffic.provider_id()
    period = {"periodStart": iso(ends - timedelta(days=30)), "periodEnd": iso(ends)}
    await delivered(
        client,
        subscription_event(
            "subscription.updated", sub, subscriptionStatus=status, autoRenew=True, **period
        ),
    )
    return sub


async def test_a_subscription_is_overdue_the_moment_its_period_ends(client):
    now = datetime.now(UTC)
    ended = await subscription_ending(client, now - timedelta(minutes=2))
    ends_soon = await subscription_ending(client, now + timedelta(hours=2))
    renewals = {r["subscriptionId"]: r for r in await walk(client, "renewals", limit=500)}
    assert "overdue" in renewals[ended]["risks"]
    assert "overdue" not in renewals[ends_soon]["risks"]


async def test_renewals_page_across_boundaries_with_ties_and_unknown_ends(client):
    now = datetime.now(UTC)
    tie = now + timedelta(days=3)
    subs = [await subscription_ending(client, tie) for _ in range(3)]
    subs += [await subscription_ending(client, now + timedelta(days=d)) for d in (1, 9)]
    for _ in range(2):  # past due, no period: its end unknown, so most urgent
        sub = traffic.provider_id()
        await delivered(client, subscription_event("subscription.past_due", sub))
        subs.append(sub)
    whole = [r["subscriptionId"] for r in await walk(client, "renewals", limit=500)]
    assert sorted(whole) == sorted(subs)
    for limit in (1, 2, 3):
        paged = [r["subscriptionId"] for r in await walk(client, "renewals", limit=limit)]
        assert paged == whole, limit


@pytest.mark.parametrize("path", ["mailboxes", "subscriptions", "orders", "events", "rejected"])
@pytest.mark.parametrize("order", ["oldest", "newest"])
async def test_every_list_pages_across_its_boundaries_in_either_order(client, path, order):
    for _ in range(5):
        order_payload = traffic.mailbox_order_success(quantity=1)
        data = order_payload["data"]
        box = traffic.mailbox_created(
            subscriptionId=data["subscriptionId"], domain=data["domainName"]
        )
        await delivered(client, order_payload, box)
        refused = traffic.mailbox_created()
        del refused["data"]["mailboxDetails"]["mailboxId"]
        assert (await deliver(client, refused)).status_code == 422
    whole = await walk(client, path, order=order, limit=500)
    assert len(whole) >= 5
    for limit in (1, 2, 4):
        assert await walk(client, path, order=order, limit=limit) == whole, limit
    other = await walk(client, path, order="newest" if order == "oldest" else "oldest", limit=2)
    assert other == whole[::-1]


# --- searching for wildcard characters and non-ASCII ------------------------------------


@pytest.mark.parametrize(
    ("typed", "found"),
    [
        ("100%", ["100% Reply"]),
        ("100_", ["100_Reply"]),
        ("ack\\d", ["Back\\dash"]),
        ("100% R", ["100% Reply"]),
        ("Zoë", ["Zoë"]),
        ("1000", ["1000 Reply"]),
    ],
)
async def test_a_search_takes_percent_underscore_and_backslash_literally(client, typed, found):
    names = ["100% Reply", "100_Reply", "1000 Reply", "Back\\dash", "Zoë", "Plain"]
    for name in names:
        await delivered(
            client, traffic.mailbox_created(domain="search.example", details={"firstName": name})
        )
    got = await client.get("/api/v1/mailboxes", params={"q": typed, "limit": 500}, headers=OPS)
    assert got.status_code == 200
    assert sorted(m["firstName"] for m in got.json()["items"]) == found


# --- a prewarmup domain's quantity ------------------------------------------------------


async def test_a_prewarmup_domains_quantity_counts_its_own_mailboxes(client):
    payload = traffic.prewarmup_success(domains=3, per_domain=1)
    groups = payload["data"]["mailboxDetails"]
    groups[1]["preWarmedUpMailboxes"] += [traffic.prewarmed_mailbox(groups[1]["domain"])] * 1
    groups[2]["preWarmedUpMailboxes"] += [
        traffic.prewarmed_mailbox(groups[2]["domain"]) for _ in range(4)
    ]
    await delivered(client, payload)
    for group, expected in zip(groups, (1, 2, 5), strict=True):
        sub = await client.get(f"/api/v1/subscriptions/{group['subscriptionId']}", headers=OPS)
        body = sub.json()
        assert (body["quantity"], body["mailboxCount"]) == (expected, expected), group["domain"]


async def test_rotation_walks_every_batch_and_a_second_run_finds_everything_current(
    client, db, database_url
):
    prewarm = traffic.prewarmup_success(domains=1, per_domain=5)  # all three credentials
    google = [traffic.mailbox_created() for _ in range(2)]  # an app password only
    await delivered(client, prewarm, *google)
    refused = traffic.mailbox_created()
    del refused["data"]["mailboxDetails"]["mailboxId"]
    assert (await deliver(client, refused)).status_code == 422
    await db.execute("update mailboxes set updated_at = '2026-01-02T03:04:05Z'")
    new_key = generate_key()
    engine = make_engine(database_url, pool_size=1)
    try:
        first = await keys.rotate_keys(engine, [new_key, FERNET_KEY], batch=3)
        again = await keys.rotate_keys(engine, [new_key, FERNET_KEY], batch=3)
    finally:
        await engine.dispose()
    expected = {
        "mailboxes.password_encrypted": 5,
        "mailboxes.app_password_encrypted": 7,
        "mailboxes.authenticator_secret_encrypted": 5,
        "events.body_encrypted": 3,
        "rejected_deliveries.body_encrypted": 1,
        "server_keys.key_encrypted": 1,
    }
    assert {k: (c.rotated, c.current) for k, c in first.items()} == {
        k: (n, 0) for k, n in expected.items()
    }
    assert {k: (c.rotated, c.current) for k, c in again.items()} == {
        k: (0, n) for k, n in expected.items()
    }
    only_new = Vault([new_key])
    rows = await db.fetch(
        "select app_password_encrypted as t from mailboxes union all "
        "select body_encrypted from events union all select body_encrypted "
        "from rejected_deliveries union all select key_encrypted from server_keys"
    )
    assert len(rows) == 7 + 3 + 1 + 1 and all(only_new.decrypt(row["t"]) for row in rows)
    stamps = await db.fetch("select distinct updated_at::text as at from mailboxes")
    assert [row["at"] for row in stamps] == ["2026-01-02 03:04:05+00"]  # not a change to read
