"""The state shown equals what the sender said, in either arrival order: edits by time,
the subscription lifecycle, domain, export and warmup events, several orders."""

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from app import hashing
from app.crypto import Vault
from app.db import make_engine
from app.operations.replay import Selection, replay
from app.simulation import traffic
from tests import streams
from tests.conftest import (
    CREDENTIALS_TOKEN,
    FERNET_KEY,
    app_client,
    asyncpg_dsn,
    deliver,
    fresh_database,
    make_settings,
)
from tests.state import OPS

NOW = time.time()
# An edit on "Monday" and one on "Friday": hours apart, within the signature window.
MONDAY, FRIDAY = NOW - 20 * 3600, NOW - 2 * 3600


@asynccontextmanager
async def after(
    server_url, template, stream: list[dict[str, Any]], hashing_key: bytes | None = None
) -> AsyncIterator[Any]:
    """A fresh service that has received `stream` in that order (with `hashing_key`, the
    key of one deployment: by default each database makes its own at first use)."""
    async with fresh_database(server_url, template) as url:
        if hashing_key is not None:
            conn = await asyncpg.connect(asyncpg_dsn(url))
            try:
                await conn.execute(hashing.CREATE, Vault([FERNET_KEY]).encrypt(hashing_key))
            finally:
                await conn.close()
        settings = make_settings(url, cmr_signature_tolerance_seconds=streams.TOLERANCE)
        async with app_client(settings) as client:
            for payload in stream:
                response = await deliver(client, payload)
                assert response.status_code == 200, response.text
            yield client


async def get(client: httpx.AsyncClient, path: str, **params: Any) -> Any:
    response = await client.get(f"/api/v1/{path}", headers=OPS, params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def in_both_orders(server_url, template, stream, read, hashing_key=None) -> Any:
    """What `read` sees after the stream arrives in order and in reverse; they must agree."""
    seen = []
    for order in (stream, stream[::-1]):
        async with after(server_url, template, order, hashing_key) as client:
            seen.append(await read(client))
    assert seen[0] == seen[1]
    return seen[0]


# --- edits by time ----------------------------------------------------------------------


async def test_the_later_edit_wins_even_with_the_smaller_event_id(server_url, template_name):
    created = streams.sent(traffic.mailbox_created(), MONDAY - 3600)
    box = created["data"]["mailboxDetails"]["mailboxId"]
    monday = streams.sent(traffic.mailbox_updated(box, {"firstName": "Monday"}), MONDAY)
    friday = streams.sent(traffic.mailbox_updated(box, {"firstName": "Friday"}), FRIDAY)
    monday["eventId"], friday["eventId"] = "ZZZZ-monday", "AAAA-friday"

    async def name(client):
        return (await get(client, f"mailboxes/{box}"))["firstName"]

    assert await in_both_orders(server_url, template_name, [created, monday, friday], name) == (
        "Friday"
    )


async def test_two_contents_of_one_event_id_sent_at_one_time_end_the_same_in_either_order(
    server_url, template_name
):
    """A sender that reuses an eventId for another edit in the same second: one of the two
    wins, the same one whichever arrives first (in one deployment: the tie is decided by
    the contents' keyed hashes)."""
    created = streams.sent(traffic.mailbox_created(), MONDAY)
    box = created["data"]["mailboxDetails"]["mailboxId"]
    one = streams.sent(traffic.mailbox_updated(box, {"firstName": "One"}), FRIDAY)
    two = streams.sent(traffic.mailbox_updated(box, {"firstName": "Two"}), FRIDAY)
    two["eventId"] = one["eventId"]

    async def name(client):
        return (await get(client, f"mailboxes/{box}"))["firstName"]

    stream = [created, one, two]
    assert await in_both_orders(server_url, template_name, stream, name, os.urandom(32)) in {
        "One",
        "Two",
    }


async def test_a_late_mailbox_created_does_not_undo_an_edit(server_url, template_name):
    created = streams.sent(traffic.mailbox_created(), FRIDAY)  # a late retry, signed later
    box = created["data"]["mailboxDetails"]["mailboxId"]
    edit = streams.sent(traffic.mailbox_updated(box, {"lastName": "Edited"}), MONDAY)

    async def last_name(client):
        return (await get(client, f"mailboxes/{box}"))["lastName"]

    assert await in_both_orders(server_url, template_name, [created, edit], last_name) == "Edited"


async def test_renames_acknowledged_one_after_another_show_the_last(client):
    """12 mailboxes renamed three times, each rename sent only after the last was answered."""
    created = [traffic.mailbox_created() for _ in range(12)]
    for payload in created:
        await deliver(client, payload)
    base = int(time.time()) - 100

    async def rename(payload):
        box = payload["data"]["mailboxDetails"]["mailboxId"]
        for k in range(3):
            edit = streams.sent(traffic.mailbox_updated(box, {"firstName": f"v{k}"}), base + k)
            assert (await deliver(client, edit)).status_code == 200

    await asyncio.gather(*(rename(p) for p in created))
    names = {m["firstName"] for m in (await get(client, "mailboxes", limit=500))["items"]}
    assert names == {"v2"}


# --- the subscription lifecycle ---------------------------------------------------------


def lifecycle_event(event: str, sub: str, at: float, **data: Any) -> dict[str, Any]:
    return streams.sent(streams.subscription_event(event, sub, domain="life.com", **data), at)


async def subscription(client, sub: str) -> dict[str, Any]:
    body = await get(client, f"subscriptions/{sub}")
    keys = ("subscriptionStatus", "periodEnd", "autoRenew", "quantity", "expiryDate")
    return {k: body[k] for k in keys}


@pytest.mark.parametrize(
    ("first", "second", "expected_status", "expected_period"),
    [
        # a later period beats an earlier one, whatever the states
        (("subscription.past_due", 0, "PAST_DUE"), ("subscription.renewal.success", 1, "ACTIVE"),
         "ACTIVE", 1),
        # within one period the further state wins: a late retry never undoes a later step
        (("subscription.renewing", 1, "RENEWING"), ("subscription.past_due", 1, "PAST_DUE"),
         "PAST_DUE", 1),
        # CANCELLED is final, even against a later period; the period stays the latest known
        (("subscription.cancelled", 0, "CANCELLED"), ("subscription.renewal.success", 1, "ACTIVE"),
         "CANCELLED", 1),
        # a late cancellation of the older period does not roll the renewal's period back
        (("subscription.renewal.success", 1, "ACTIVE"), ("subscription.cancelled", 0, "CANCELLED"),
         "CANCELLED", 1),
    ],
)  # fmt: skip
async def test_lifecycle_rules_hold_in_either_order(
    server_url, template_name, first, second, expected_status, expected_period
):
    sub = traffic.provider_id()
    stream = [
        lifecycle_event(event, sub, NOW - 100 + i, subscriptionStatus=status, **streams.period(p))
        for i, (event, p, status) in enumerate([first, second])
    ]

    async def read(client):
        return await subscription(client, sub)

    state = await in_both_orders(server_url, template_name, stream, read)
    assert state["subscriptionStatus"] == expected_status
    assert state["periodEnd"].startswith(streams.period(expected_period)["periodEnd"][:10])
    assert state["expiryDate"] == state["periodEnd"]


async def test_without_period_data_the_later_event_wins_and_the_name_implies_the_state(
    server_url, template_name
):
    sub = traffic.provider_id()
    older = lifecycle_event("subscription.renewing", sub, MONDAY, **streams.period(0))
    newer = lifecycle_event("subscription.expired", sub, FRIDAY)  # no status, no period

    async def read(client):
        return await subscription(client, sub)

    state = await in_both_orders(server_url, template_name, [older, newer], read)
    assert state["subscriptionStatus"] == "EXPIRED"


async def test_cancelled_stays_cancelled_against_a_later_event_without_a_period(
    server_url, template_name
):
    sub = traffic.provider_id()
    cancelled = lifecycle_event("subscription.cancelled", sub, MONDAY, **streams.period(0))
    later = lifecycle_event("subscription.updated", sub, FRIDAY, subscriptionStatus="ACTIVE")

    async def read(client):
        return await subscription(client, sub)

    state = await in_both_orders(server_url, template_name, [cancelled, later], read)
    assert state["subscriptionStatus"] == "CANCELLED"


async def test_a_renewal_moves_the_expiry_so_expires_before_stops_listing_it(
    server_url, template_name
):
    order = streams.sent(traffic.mailbox_order_success(expiryDate="2026-02-08T10:15:30Z"), MONDAY)
    sub = order["data"]["subscriptionId"]
    renewed = lifecycle_event(
        "subscription.renewal.success", sub, FRIDAY, autoRenew=True, quantity=5,
        **streams.period(3),
    )  # fmt: skip
    stream = [order, renewed]

    async def read(client):
        expiring = await get(client, "subscriptions", expiresBefore="2026-03-01")
        active = await get(client, "subscriptions", subscriptionStatus="ACTIVE")
        return (
            await subscription(client, sub),
            [s["subscriptionId"] for s in expiring["items"]],
            [s["subscriptionId"] for s in active["items"]],
        )

    state, expiring, active = await in_both_orders(server_url, template_name, stream, read)
    assert (state["subscriptionStatus"], state["autoRenew"], state["quantity"]) == (
        "ACTIVE",
        True,
        5,
    )
    assert state["expiryDate"] == state["periodEnd"]
    assert expiring == [] and active == [sub]


async def test_a_subscription_first_heard_of_by_its_lifecycle_is_created(client):
    sub = traffic.provider_id()
    # sent now, not at import: this client accepts timestamps 300 s old, and a slow run
    # reaches this test later than that
    event = lifecycle_event("subscription.past_due", sub, time.time(), **streams.period(0))
    assert (await deliver(client, event)).json()["status"] == "processed"
    body = await get(client, f"subscriptions/{sub}")
    assert (body["domain"], body["subscriptionStatus"], body["mailboxCount"]) == (
        "life.com",
        "PAST_DUE",
        0,
    )


# --- renewal failures -------------------------------------------------------------------


def near(ends_in_days: int) -> dict[str, str]:
    """A period ending that many days from now (on the renewals list within 30 days)."""
    end = datetime.now(UTC) + timedelta(days=ends_in_days)
    return {
        "periodStart": (end - timedelta(days=30)).isoformat(),
        "periodEnd": end.isoformat(),
    }


# One period ending in three days, and the next (both on the renewals list)
THIS_PERIOD, NEXT_PERIOD = near(3), near(25)


async def risks(client, sub: str) -> list[str]:
    listed = (await get(client, "renewals", withinDays=30))["items"]
    return next(r["risks"] for r in listed if r["subscriptionId"] == sub)


@pytest.mark.parametrize(
    ("then", "at", "data", "expected"),
    [
        # stays: later steps of the same period, or an edit, say nothing of a renewal
        ("subscription.past_due", FRIDAY, THIS_PERIOD, ["past_due", "renewal_failed"]),
        ("subscription.updated", FRIDAY, {"autoRenew": False},
         ["past_due", "renewal_failed", "auto_renew_off"]),
        # stays: a success heard before the failure
        ("subscription.renewal.success", MONDAY - 60, THIS_PERIOD,
         ["past_due", "renewal_failed"]),
        # changes: a later success, with its next period or with no period at all
        ("subscription.renewal.success", FRIDAY, NEXT_PERIOD, []),
        ("subscription.renewal.success", FRIDAY, {}, []),
        # changes: a later period, however it was heard
        ("subscription.updated", FRIDAY, {"subscriptionStatus": "ACTIVE"} | NEXT_PERIOD, []),
    ],
    ids=["past_due", "edit", "earlier_success", "success", "success_no_period", "next_period"],
)  # fmt: skip
async def test_a_failed_renewal_is_a_risk_until_a_later_success_or_period(
    server_url, template_name, then, at, data, expected
):
    sub = traffic.provider_id()
    failed = lifecycle_event("subscription.renewal.failed", sub, MONDAY, **THIS_PERIOD)
    other = lifecycle_event(then, sub, at, **data)

    async def read(client):
        return await risks(client, sub)

    assert await in_both_orders(server_url, template_name, [failed, other], read) == expected


async def test_a_subscription_that_never_failed_a_renewal_shows_no_such_risk(client):
    """Only subscription.renewal.failed makes the risk: every other lifecycle event, even a
    past_due one, leaves a renewal that never failed off it."""
    subs = {state: traffic.provider_id() for state in ("ACTIVE", "RENEWING", "PAST_DUE")}
    for n, (state, sub) in enumerate(subs.items()):
        event = "subscription.past_due" if state == "PAST_DUE" else "subscription.updated"
        payload = lifecycle_event(event, sub, time.time() - 60 + n, **THIS_PERIOD)
        payload["data"]["subscriptionStatus"] = state
        assert (await deliver(client, payload)).status_code == 200
    assert {state: await risks(client, sub) for state, sub in subs.items()} == {
        "ACTIVE": [],
        "RENEWING": [],
        "PAST_DUE": ["past_due"],
    }


# --- domains ----------------------------------------------------------------------------


async def test_domain_events_set_the_domain_state_on_its_subscriptions(server_url, template_name):
    order = streams.sent(traffic.mailbox_order_success(), MONDAY)
    data = order["data"]
    by_id = {"domainId": data["domainId"]}
    grace = streams.sent(
        traffic.envelope("domain.grace_period", by_id | streams.expiry(0)), MONDAY + 1
    )
    expired = streams.sent(
        traffic.envelope("domain.expired", by_id | streams.expiry(0)), MONDAY + 2
    )
    renewed = streams.sent(  # by name only, into the next period: the later expiry wins
        traffic.envelope(
            "domain.renewal.success", {"domainName": data["domainName"]} | streams.expiry(1)
        ),
        MONDAY + 3,
    )

    async def read(client):
        body = await get(client, f"subscriptions/{data['subscriptionId']}")
        return body["domainStatus"], body["domainExpiryDate"][:10]

    assert await in_both_orders(server_url, template_name, [order, grace, expired], read) == (
        "EXPIRED",
        streams.expiry(0)["expiryDate"][:10],
    )
    assert await in_both_orders(server_url, template_name, [order, expired, renewed], read) == (
        "ACTIVE",
        streams.expiry(1)["expiryDate"][:10],
    )


def domain_event(event: str, at: float, k: int, **data: str) -> dict[str, Any]:
    return streams.sent(traffic.envelope(event, data | streams.expiry(k)), at)


async def domain_state(client, *subscriptions: str) -> list[Any]:
    """Each subscription's domain state, and every delivery processed, none rejected."""
    shown = [await get(client, f"subscriptions/{sub}") for sub in subscriptions]
    events = (await get(client, "events"))["items"]
    return [
        [(s["domainStatus"], s["domainExpiryDate"][:10]) for s in shown],
        sorted(e["status"] for e in events),
        (await get(client, "rejected"))["items"],
    ]


async def test_a_re_registered_domain_takes_the_later_registration_in_either_order(
    server_url, template_name
):
    """A name registered again under a new domainId: both registrations are kept, and the
    subscriptions of either (by ID) and of the name alone show the later expiry's."""
    old = streams.sent(traffic.mailbox_order_success(), MONDAY)
    name, old_id = old["data"]["domainName"], old["data"]["domainId"]
    new = streams.sent(traffic.mailbox_order_success(domainName=name), MONDAY + 1)
    by_name = streams.sent(traffic.mailbox_created(domain=name), MONDAY + 2)
    lapsed = domain_event("domain.expired", MONDAY + 3, 0, domainId=old_id, domainName=name)
    again = domain_event(
        "domain.order.success", MONDAY + 4, 2, domainId=new["data"]["domainId"], domainName=name
    )
    subs = [p["data"]["subscriptionId"] for p in (old, new, by_name)]

    async def read(client):
        return await domain_state(client, *subs)

    stream = [old, new, by_name, lapsed, again]
    later = ("ACTIVE", streams.expiry(2)["expiryDate"][:10])
    assert await in_both_orders(server_url, template_name, stream, read) == [
        [later] * 3,
        ["processed"] * 5,
        [],
    ]


async def test_a_domain_first_known_by_name_then_by_id_ends_the_same_in_either_order(
    server_url, template_name
):
    """A domain.* event by name alone, then one with a domainId for that name (or the other
    way round): neither is refused, and the later period wins."""
    created = streams.sent(traffic.mailbox_created(), MONDAY)  # knows the name only
    name = created["data"]["domain"]
    grace = domain_event("domain.grace_period", MONDAY + 1, 0, domainName=name)
    renewed = domain_event(
        "domain.renewal.success", MONDAY + 2, 1, domainId=traffic.provider_id(), domainName=name
    )
    expired = domain_event("domain.expired", FRIDAY, 0, domainName=name)  # the earlier period

    async def read(client):
        return await domain_state(client, created["data"]["subscriptionId"])

    stream = [created, grace, renewed, expired]
    assert await in_both_orders(server_url, template_name, stream, read) == [
        [("ACTIVE", streams.expiry(1)["expiryDate"][:10])],
        ["processed"] * 4,
        [],
    ]


# --- export and warmup ------------------------------------------------------------------


async def test_warmup_follows_the_later_event_and_an_export_replaces_credentials(
    server_url, template_name
):
    created = streams.sent(traffic.mailbox_created(), MONDAY)
    box = created["data"]["mailboxDetails"]["mailboxId"]
    new_password = traffic.canary("app")
    started = streams.sent(
        traffic.envelope("mailbox.warmup.started", {"mailboxId": box}), MONDAY + 10
    )
    removed = streams.sent(traffic.envelope("mailbox.warmup.removed", {"mailboxId": box}), FRIDAY)
    exported = streams.sent(
        traffic.envelope(
            "mailbox.exported", {"mailboxDetails": {"mailboxId": box, "appPassword": new_password}}
        ),
        MONDAY + 20,
    )

    async def read(client):
        body = await get(client, f"mailboxes/{box}")
        creds = await client.get(
            f"/api/v1/mailboxes/{box}/credentials",
            headers={"Authorization": f"Bearer {CREDENTIALS_TOKEN}"},
        )
        return body["warmupStatus"], body["exportedAt"] is not None, creds.json()["appPassword"]

    stream = [created, started, removed, exported]
    assert await in_both_orders(server_url, template_name, stream, read) == (
        "removed",
        True,
        new_password,
    )


async def test_a_warmup_event_without_a_mailbox_id_is_stored_as_ignored(client):
    event = traffic.envelope("mailbox.warmup.started", {"email": "a@b.com"})
    assert (await deliver(client, event)).json()["status"] == "ignored"
    item = (await get(client, "events", eventId=event["eventId"]))["items"][0]
    assert item["warnings"] == ["stored as ignored: no recognisable mailboxId in the payload"]
    assert (await get(client, "stats"))["replayableEvents"] == 0


# --- several orders per subscription ----------------------------------------------------


async def test_a_second_order_adds_to_the_subscription_without_overwriting_the_first(
    server_url, template_name
):
    first = streams.standard_order(2, False, [], start=MONDAY)
    second = streams.second_order(first[0], 3, start=FRIDAY)
    sub = first[0]["data"]["subscriptionId"]
    orders = [first[0]["data"]["orderId"], second[0]["data"]["orderId"]]

    async def read(client):
        body = await get(client, f"subscriptions/{sub}")
        counts = [(await get(client, f"orders/{o}"))["domains"][0]["mailboxCount"] for o in orders]
        return body["quantity"], body["orderId"], body["mailboxCount"], counts

    state = await in_both_orders(server_url, template_name, first + second, read)
    assert state == (2 + 3, orders[0], 5, [2, 3])


# --- conflicts under concurrency --------------------------------------------------------


async def test_simultaneous_deliveries_sharing_an_event_id_are_always_flagged(client, db):
    pairs = []
    for _ in range(20):
        one, two = traffic.mailbox_created(), traffic.mailbox_created()
        two["eventId"] = one["eventId"]
        pairs.append((one, two))
    answers = await asyncio.gather(*(deliver(client, p) for pair in pairs for p in pair))
    assert all(a.json()["status"] == "processed" for a in answers)
    flagged = await db.fetchval("select count(distinct event_id) from events where conflict")
    assert flagged == 20
    assert sum(bool(a.json().get("conflict")) for a in answers) == 20  # the second of each pair


# --- replay of events an older release ignored ------------------------------------------


async def test_events_stored_as_ignored_by_an_older_release_are_counted_and_replayed(
    client, db, database_url
):
    sub = traffic.provider_id()
    old = streams.subscription_event("subscription.cancelled", sub, **streams.period(0))
    await replay_stored_as_ignored(client, db, database_url, old)
    assert (await get(client, f"subscriptions/{sub}"))["subscriptionStatus"] == "CANCELLED"


async def test_an_order_stored_as_ignored_by_an_older_release_is_replayed_with_its_mailboxes(
    client, db, database_url
):
    order = traffic.prewarmup_success(domains=1, per_domain=2)
    await replay_stored_as_ignored(client, db, database_url, order)
    shown = await get(client, f"orders/{order['data']['orderId']}")
    assert shown["domains"][0]["mailboxCount"] == 2


async def replay_stored_as_ignored(client, db, database_url, old: dict[str, Any]) -> None:
    """`old` stored as an older release that did not handle it would have, then replayed."""
    await db.execute(
        "insert into events (event_id, event, status, content_hash, deliveries, conflict, "
        "signature, payload, body_encrypted) "
        "values ($1, $2, 'ignored', '\\x00', 1, false, 'valid', '{}', $3)",
        old["eventId"],
        old["event"],
        Vault([FERNET_KEY]).encrypt(orjson.dumps(old)),
    )
    assert (await get(client, "stats"))["replayableEvents"] == 1
    engine = make_engine(database_url, pool_size=1)
    try:
        events, _ = await replay(
            engine, Vault([FERNET_KEY]), Selection(everything=True), dry_run=False
        )
    finally:
        await engine.dispose()
    assert events.applied == 1
    assert (await get(client, "stats"))["replayableEvents"] == 0
