"""What recording keeps of each event, read back through the API: every field an event
names lands in its own column, and what the event does not name stays as it was.

Each fixture varies what the code could confuse: distinct owners per order, several
domains per order, a distinct value per personal field.
"""

import time
from datetime import datetime
from typing import Any

import httpx
import orjson
import pytest

from app.hashing import Hasher
from app.receiving import payloads
from app.receiving.delivery import Delivery
from app.receiving.signing import SignatureCheck
from app.recording.record import delivery_version
from app.simulation import traffic
from tests import streams
from tests.conftest import app_client, deliver, make_settings
from tests.state import OPS


async def delivered(client: httpx.AsyncClient, *payloads: dict[str, Any]) -> None:
    for payload in payloads:
        response = await deliver(client, payload)
        assert response.status_code == 200, response.text


async def read(client: httpx.AsyncClient, path: str) -> Any:
    response = await client.get(f"/api/v1/{path}", headers=OPS)
    assert response.status_code == 200, response.text
    return response.json()


async def test_a_failed_prewarmup_order_shows_whose_it_is_and_each_domains_reason(client):
    failed = traffic.prewarmup_failed(
        order_id=traffic.provider_id(), failures={"a.com": "no stock", "b.com": "no funds"}
    )
    failed["data"] |= {"userEmail": "owner.b@example.org", "serviceProvider": "MICROSOFT"}
    other = traffic.prewarmup_failed(order_id=traffic.provider_id(), failures={"c.com": "x"})
    await delivered(client, failed, other)
    order = await read(client, f"orders/{failed['data']['orderId']}")
    assert (order["userId"], order["userEmail"], order["provider"]) == (
        failed["data"]["userId"],
        "owner.b@example.org",
        "MICROSOFT",
    )
    assert order["kind"] == "prewarmup"
    assert order["status"] == "failed"
    assert order["failureReason"] is None  # the domains failed, not the order as a whole
    assert {(d["domain"], d["status"], d["reason"]) for d in order["domains"]} == {
        ("a.com", "failed", "no stock"),
        ("b.com", "failed", "no funds"),
    }
    assert (await read(client, f"orders/{other['data']['orderId']}"))["userId"] == other["data"][
        "userId"
    ]


async def test_an_order_level_failure_shows_its_reason_and_a_domain_failure_does_not(client):
    whole = traffic.prewarmup_failed(order_id=traffic.provider_id(), failures={})
    whole["data"]["reason"] = "Insufficient wallet balance"
    unnamed = traffic.prewarmup_failed(order_id=traffic.provider_id(), failures={})
    per_domain = traffic.prewarmup_failed(order_id=traffic.provider_id(), failures={"d.com": "x"})
    per_domain["data"]["reason"] = "ignored beside failedOrders"
    await delivered(client, whole, unnamed, per_domain)
    shown = {
        kind: await read(client, f"orders/{payload['data']['orderId']}")
        for kind, payload in (("whole", whole), ("unnamed", unnamed), ("per_domain", per_domain))
    }
    assert shown["whole"]["failureReason"] == "Insufficient wallet balance"
    assert shown["unnamed"]["failureReason"] == "order failed"
    assert shown["per_domain"]["failureReason"] is None
    assert {o["status"] for o in shown.values()} == {"failed"}
    assert shown["whole"]["domains"] == [] and len(shown["per_domain"]["domains"]) == 1


def at(value: str) -> datetime:
    return datetime.fromisoformat(value)


async def test_each_field_of_an_order_and_its_mailbox_lands_in_its_own_place(client):
    order = traffic.mailbox_order_success(
        userEmail="zoë.owner@example.org",
        workspaceType="MICROSOFT",
        price=12.5,
        quantity=4,
        expiryDate="2031-05-06T07:08:09Z",
    )
    data = order["data"]
    created = traffic.mailbox_created(
        provider="MICROSOFT",
        subscriptionId=data["subscriptionId"],
        orderId=data["orderId"],
        domain=data["domainName"],
        userId=data["userId"],
        userEmail="zoë.owner@example.org",
        price=3.25,
        details={
            "firstName": "Zoë",
            "lastName": "O'Brien_100%",
            "userName": "zob\\admin",
            "profilePicture": "https://cdn.example.org/zoe.png",
            "isAdmin": False,
            "creationTime": "2024-01-02T03:04:05Z",
            "expiryDate": "2030-02-03T04:05:06Z",
            "authenticatorSecret": traffic.canary("totp"),
        },
    )
    other = traffic.mailbox_created(details={"firstName": "Ann", "isAdmin": True})
    await delivered(client, order, created, other)

    sub = await read(client, f"subscriptions/{data['subscriptionId']}")
    assert {k: sub[k] for k in ("domain", "domainId", "userId", "userEmail", "provider")} == {
        "domain": data["domainName"],
        "domainId": data["domainId"],
        "userId": data["userId"],
        "userEmail": "zoë.owner@example.org",
        "provider": "MICROSOFT",
    }
    assert (sub["source"], sub["status"], sub["orderId"]) == ("standard", "active", data["orderId"])
    assert (sub["quantity"], float(sub["price"])) == (4, 12.5)
    assert at(sub["expiryDate"]) == at("2031-05-06T07:08:09Z")  # the later of the two

    box = created["data"]["mailboxDetails"]
    shown = await read(client, f"mailboxes/{box['mailboxId']}")
    expected = {
        "subscriptionId": data["subscriptionId"],
        "domain": data["domainName"],
        "email": box["email"],
        "firstName": "Zoë",
        "lastName": "O'Brien_100%",
        "userName": "zob\\admin",
        "profilePicture": "https://cdn.example.org/zoe.png",
        "isAdmin": False,
        "provider": "MICROSOFT",
        "source": "standard",
        "userId": data["userId"],
        "orderId": data["orderId"],
        "finalUrl": "https://example.com/oauth-callback",
        "hasPassword": True,
        "hasAppPassword": False,
        "hasAuthenticatorSecret": True,
    }
    assert {k: shown[k] for k in expected} == expected
    assert float(shown["price"]) == 3.25
    assert at(shown["creationTime"]) == at("2024-01-02T03:04:05Z")
    assert at(shown["expiryDate"]) == at("2030-02-03T04:05:06Z")
    the_other = await read(client, f"mailboxes/{other['data']['mailboxDetails']['mailboxId']}")
    assert (the_other["firstName"], the_other["isAdmin"], the_other["hasPassword"]) == (
        "Ann",
        True,
        False,
    )
    assert the_other["hasAppPassword"] is True


async def test_a_prewarmup_order_keeps_each_mailbox_its_own_fields_and_each_domain_its_own(
    client,
):
    order = traffic.prewarmup_success(domains=2, per_domain=2, provider="MICROSOFT")
    groups = order["data"]["mailboxDetails"]
    for n, box in enumerate(box for group in groups for box in group["preWarmedUpMailboxes"]):
        box |= {
            "firstName": f"Prénom{n}",
            "lastName": f"Nom_{n}%",
            "profilePicture": f"https://cdn.example.org/{n}.png",
            "isAdmin": n % 2 == 0,
            "warmingUpFrom": f"2025-09-2{n}T08:00:00Z",
            "expiryDate": f"2026-0{n + 1}-15T12:00:00Z",
        }
    groups[1]["preWarmedUpMailboxes"][1].pop("authenticatorSecret")
    await delivered(client, order)
    data = order["data"]
    shown = await read(client, f"orders/{data['orderId']}")
    assert (shown["kind"], shown["status"], shown["provider"]) == (
        "prewarmup",
        "succeeded",
        "MICROSOFT",
    )
    assert (shown["userId"], shown["userEmail"]) == (data["userId"], data["userEmail"])
    assert sorted(
        (d["domain"], d["subscriptionId"], d["quantity"]) for d in shown["domains"]
    ) == sorted((g["domain"], g["subscriptionId"], 2) for g in groups)
    n = 0
    for group in groups:
        sub = await read(client, f"subscriptions/{group['subscriptionId']}")
        assert (sub["domain"], sub["source"], sub["status"]) == (
            group["domain"],
            "prewarmed",
            "active",
        )
        assert (sub["orderId"], sub["provider"], sub["userId"]) == (
            data["orderId"],
            "MICROSOFT",
            data["userId"],
        )
        # the latest of its mailboxes' expiry dates
        assert at(sub["expiryDate"]) == at(group["preWarmedUpMailboxes"][1]["expiryDate"])
        for box in group["preWarmedUpMailboxes"]:
            got = await read(client, f"mailboxes/{box['mailboxId']}")
            assert {k: got[k] for k in ("email", "firstName", "lastName", "profilePicture")} == {
                k: box[k] for k in ("email", "firstName", "lastName", "profilePicture")
            }
            assert (got["isAdmin"], got["domain"], got["subscriptionId"]) == (
                n % 2 == 0,
                group["domain"],
                group["subscriptionId"],
            )
            assert (got["source"], got["orderId"], got["provider"]) == (
                "prewarmed",
                data["orderId"],
                "MICROSOFT",
            )
            assert at(got["warmingUpFrom"]) == at(box["warmingUpFrom"])
            assert at(got["expiryDate"]) == at(box["expiryDate"])
            assert (got["hasPassword"], got["hasAppPassword"]) == (True, True)
            assert got["hasAuthenticatorSecret"] is ("authenticatorSecret" in box)
            n += 1


async def test_a_failed_standard_order_creates_its_subscription_failed_with_the_reason(client):
    failed = traffic.mailbox_order_failed(
        domain="failed-domain.com",
        workspaceType="MICROSOFT",
        reason="Domain not verified",
        userEmail="failed.owner@example.org",
    )
    data = failed["data"]
    await delivered(client, failed)
    sub = await read(client, f"subscriptions/{data['subscriptionId']}")
    assert (sub["status"], sub["source"], sub["domain"]) == (
        "failed",
        "standard",
        "failed-domain.com",
    )
    assert (sub["orderId"], sub["userId"], sub["userEmail"], sub["provider"]) == (
        data["orderId"],
        data["userId"],
        "failed.owner@example.org",
        "MICROSOFT",
    )
    order = await read(client, f"orders/{data['orderId']}")
    assert (order["status"], order["kind"]) == ("failed", "mailbox")
    assert (order["userId"], order["userEmail"], order["provider"]) == (
        data["userId"],
        "failed.owner@example.org",
        "MICROSOFT",
    )
    assert [
        (d["domain"], d["status"], d["reason"], d["subscriptionId"]) for d in order["domains"]
    ] == [("failed-domain.com", "failed", "Domain not verified", data["subscriptionId"])]
    # the order's success later: active, and the failure reason stays on record
    success = traffic.mailbox_order_success(
        subscriptionId=data["subscriptionId"],
        orderId=data["orderId"],
        domainName="failed-domain.com",
        quantity=5,
    )
    await delivered(client, success)
    sub = await read(client, f"subscriptions/{data['subscriptionId']}")
    assert (sub["status"], sub["quantity"], sub["domainId"]) == (
        "active",
        5,
        success["data"]["domainId"],
    )
    order = await read(client, f"orders/{data['orderId']}")
    assert order["status"] == "succeeded"
    assert [(d["status"], d["reason"], d["quantity"]) for d in order["domains"]] == [
        ("succeeded", "Domain not verified", 5)
    ]


async def test_a_subscription_event_first_heard_creates_it_with_every_field_it_names(client):
    sub, other = traffic.provider_id(), traffic.provider_id()
    event = streams.subscription_event(
        "subscription.renewing",
        sub,
        domain="renewing.example",
        domainId="DOM1",
        userEmail="ünï@example.org",
        workspaceType="MICROSOFT",
        quantity=7,
        autoRenew=False,
        **streams.period(2),
    )
    quiet = streams.subscription_event("subscription.updated", other, domain="quiet.example")
    await delivered(client, event, quiet)
    shown = await read(client, f"subscriptions/{sub}")
    period = streams.period(2)
    assert {k: shown[k] for k in ("domain", "domainId", "userEmail", "provider")} == {
        "domain": "renewing.example",
        "domainId": "DOM1",
        "userEmail": "ünï@example.org",
        "provider": "MICROSOFT",
    }
    assert (shown["userId"], shown["status"], shown["subscriptionStatus"]) == (
        event["data"]["userId"],
        "active",
        "RENEWING",
    )
    assert (shown["quantity"], shown["autoRenew"], shown["lifecycleSource"]) == (7, False, "event")
    assert at(shown["periodStart"]) == at(period["periodStart"])
    assert at(shown["periodEnd"]) == at(shown["expiryDate"]) == at(period["periodEnd"])
    unnamed = await read(client, f"subscriptions/{other}")
    assert (unnamed["subscriptionStatus"], unnamed["periodEnd"], unnamed["quantity"]) == (
        None,
        None,
        None,
    )
    assert (unnamed["autoRenew"], unnamed["domain"]) == (None, "quiet.example")


@pytest.mark.parametrize("window_ms", [2, 0], ids=["in a group", "alone"])
async def test_an_export_sets_its_time_and_credentials_and_a_warmup_event_its_status(
    database_url, window_ms
):
    settings = make_settings(database_url, group_commit_window_ms=window_ms)
    async with app_client(settings) as client:
        await export_after_warmup(client)


async def export_after_warmup(client: httpx.AsyncClient) -> None:
    created = traffic.mailbox_created(provider="GOOGLE")
    box = created["data"]["mailboxDetails"]["mailboxId"]
    await delivered(client, created)
    warmup = traffic.envelope("mailbox.warmup.started", {"mailboxId": box})
    await delivered(client, warmup)
    shown = await read(client, f"mailboxes/{box}")
    assert (shown["warmupStatus"], shown["exportedAt"]) == ("started", None)
    assert (shown["hasPassword"], shown["hasAuthenticatorSecret"]) == (False, False)
    exported = traffic.envelope(
        "mailbox.exported",
        {"mailboxDetails": {"mailboxId": box, "password": "pw-1", "authenticatorSecret": "s-1"}},
    )
    await delivered(client, exported)
    shown = await read(client, f"mailboxes/{box}")
    assert shown["warmupStatus"] == "started"  # an export says nothing of the warmup
    assert shown["exportedAt"] is not None
    assert (shown["hasPassword"], shown["hasAppPassword"], shown["hasAuthenticatorSecret"]) == (
        True,
        True,
        True,
    )


async def test_a_duplicate_delivery_touches_no_row_and_a_new_event_does(client):
    """`updatedSince` readers must not see a retried delivery as a change."""
    order = traffic.mailbox_order_success()
    created = traffic.mailbox_created(
        subscriptionId=order["data"]["subscriptionId"], orderId=order["data"]["orderId"]
    )
    prewarm = traffic.prewarmup_success(domains=2, per_domain=2)  # rows for one statement
    await delivered(client, order, created, prewarm)
    box = created["data"]["mailboxDetails"]["mailboxId"]
    warm = prewarm["data"]["mailboxDetails"][0]
    paths = [
        f"subscriptions/{order['data']['subscriptionId']}",
        f"subscriptions/{warm['subscriptionId']}",
        f"mailboxes/{box}",
        f"mailboxes/{warm['preWarmedUpMailboxes'][0]['mailboxId']}",
        f"orders/{order['data']['orderId']}",
    ]
    before = [(await read(client, path))["updatedAt"] for path in paths]
    for payload in (order, created, prewarm):  # the sender retries each, unchanged
        response = await deliver(client, payload)
        assert response.json()["status"] == "duplicate"
    assert [(await read(client, path))["updatedAt"] for path in paths] == before
    await delivered(client, traffic.mailbox_updated(box, {"firstName": "Later"}))
    after = await read(client, f"mailboxes/{box}")
    assert (after["firstName"], after["updatedAt"] > before[2]) == ("Later", True)


async def test_a_prewarmup_domain_whose_mailboxes_name_no_expiry_is_kept_without_one(client):
    """The domain's subscription expires with its latest mailbox; with none named, it has
    no expiry (not an error), and the domain beside it keeps its own."""
    order = traffic.prewarmup_success(domains=2, per_domain=2)
    bare, dated = order["data"]["mailboxDetails"]
    for box in bare["preWarmedUpMailboxes"]:
        del box["expiryDate"]
    await delivered(client, order)
    for group, expiry in ((bare, None), (dated, "2025-11-27T19:59:17.294000Z")):
        subscription = await read(client, f"subscriptions/{group['subscriptionId']}")
        assert subscription["expiryDate"] == expiry


async def test_an_edit_naming_no_known_field_is_stored_and_changes_nothing(client):
    """A mailbox.updated whose updatedFields holds nothing we know (or nothing at all) is a
    detail, not a reason to refuse: answered 2xx, stored, and the mailbox stays as it was."""
    created = traffic.mailbox_created()
    box = created["data"]["mailboxDetails"]
    await delivered(client, created)
    before = await read(client, f"mailboxes/{box['mailboxId']}")
    for fields in ({"favouriteColour": "teal"}, {}):
        edit = traffic.mailbox_updated(box["mailboxId"], fields)
        response = await deliver(client, edit)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "processed"
    after = await read(client, f"mailboxes/{box['mailboxId']}")
    assert {k: v for k, v in after.items() if k != "updatedAt"} == {
        k: v for k, v in before.items() if k != "updatedAt"
    }
    known = traffic.mailbox_updated(box["mailboxId"], {"lastName": "Okafor"})
    await delivered(client, known)
    assert (await read(client, f"mailboxes/{box['mailboxId']}"))["lastName"] == "Okafor"


async def test_a_subscription_keeps_its_earliest_orders_id_and_price_whatever_the_arrival(
    client,
):
    """Two succeeded orders for one subscription, standard and prewarmed: the subscription
    shows the one sent first (its orderId, its price), though the later one arrives first
    and its orderId sorts first; the quantity counts both."""
    now = time.time()
    first, later = "Z" + traffic.provider_id(), "A" + traffic.provider_id()
    standard = {"subscriptionId": traffic.provider_id(), "domainName": "first-order.com"}
    earlier_order = traffic.mailbox_order_success(orderId=first, price=10, quantity=2, **standard)
    later_order = traffic.mailbox_order_success(orderId=later, price=20, quantity=3, **standard)
    warm = traffic.prewarmup_success(domains=1, per_domain=2, order_id=first + "W")
    warm_later = traffic.prewarmup_success(domains=1, per_domain=1, order_id=later + "W")
    warm_later["data"]["mailboxDetails"][0] |= {
        k: warm["data"]["mailboxDetails"][0][k] for k in ("subscriptionId", "domain")
    }
    await delivered(
        client,
        streams.sent(later_order, now - 60),
        streams.sent(earlier_order, now - 120),
        streams.sent(warm_later, now - 60),
        streams.sent(warm, now - 120),
    )
    sub = await read(client, f"subscriptions/{standard['subscriptionId']}")
    assert (sub["orderId"], float(sub["price"]), sub["quantity"]) == (first, 10, 5)
    warmed = warm["data"]["mailboxDetails"][0]["subscriptionId"]
    prewarmed = await read(client, f"subscriptions/{warmed}")
    assert (prewarmed["orderId"], prewarmed["quantity"]) == (first + "W", 3)


async def test_a_mailbox_heard_of_before_its_order_makes_its_subscription_active_and_whose(
    client,
):
    """mailbox.created first: its subscription exists at once, active, standard, with the
    owner, order and expiry the mailbox names (the order, heard later, adds to it)."""
    created = traffic.mailbox_created(
        provider="MICROSOFT", domain="heard-first.com", userEmail="first.owner@example.org"
    )
    data = created["data"]
    await delivered(client, created)
    sub = await read(client, f"subscriptions/{data['subscriptionId']}")
    assert {k: sub[k] for k in ("domain", "userId", "userEmail", "provider", "orderId")} == {
        "domain": "heard-first.com",
        "userId": data["userId"],
        "userEmail": "first.owner@example.org",
        "provider": "MICROSOFT",
        "orderId": data["orderId"],
    }
    assert (sub["status"], sub["source"]) == ("active", "standard")
    assert at(sub["expiryDate"]) == at(data["mailboxDetails"]["expiryDate"])


async def test_an_edit_heard_of_before_its_mailbox_shows_the_mailbox_it_names(client):
    """mailbox.updated first: the mailbox is known by what the edit names (domain, email,
    owner, provider) besides the field it edits; nothing else is made up."""
    box = traffic.provider_id()
    edit = traffic.mailbox_updated(
        box,
        {"firstName": "Early"},
        domain="edited-first.biz",
        email="early@edited-first.biz",
        workspaceType="MICROSOFT",
    )
    await delivered(client, edit)
    shown = await read(client, f"mailboxes/{box}")
    assert {k: shown[k] for k in ("firstName", "domain", "email", "userId", "provider")} == {
        "firstName": "Early",
        "domain": "edited-first.biz",
        "email": "early@edited-first.biz",
        "userId": edit["data"]["userId"],
        "provider": "MICROSOFT",
    }
    assert (shown["lastName"], shown["subscriptionId"], shown["hasPassword"]) == (None, None, False)


async def test_an_edit_sent_a_second_later_wins_though_it_arrives_first_and_its_id_sorts_first(
    client,
):
    """Events are ordered by the time they were sent, to the microsecond, before their
    eventIds: an edit one second later beats an earlier one that arrives after it."""
    created = traffic.mailbox_created()
    box = created["data"]["mailboxDetails"]["mailboxId"]
    now = time.time()
    earlier = streams.sent(traffic.mailbox_updated(box, {"firstName": "Earlier"}), now - 31)
    later = streams.sent(traffic.mailbox_updated(box, {"firstName": "Later"}), now - 30)
    earlier["eventId"], later["eventId"] = "ZZZZ-" + earlier["eventId"], "AAAA-" + later["eventId"]
    await delivered(client, created, later, earlier)
    assert (await read(client, f"mailboxes/{box}"))["firstName"] == "Later"


def test_a_tie_in_time_goes_to_the_larger_event_id_whatever_the_contents_hashes_say():
    """The API test of two edits in one second cannot choose how their contents' keyed
    hashes sort (the key is each database's own): here, with a key of its own, the larger
    eventId's content sorts first, and the larger eventId still wins the tie. The hashes
    decide only between two contents of one eventId."""
    hasher, at = Hasher(b"k" * 32), time.time()

    def sent(event_id: str, name: str) -> Delivery:
        payload = traffic.mailbox_updated("mb-tie", {"lastName": name}) | {"eventId": event_id}
        raw = orjson.dumps(payload)
        envelope = payloads.parse_envelope(raw, hasher)
        return Delivery(envelope, raw, SignatureCheck("valid", None, at), hasher=hasher)

    smaller = sent("AAAA-tie", "Smaller")
    larger = next(
        d
        for d in (sent("ZZZZ-tie", f"Larger{n}") for n in range(200))
        if d.content_hash[:8] < smaller.content_hash[:8]
    )
    assert larger.event_time == smaller.event_time
    assert delivery_version(larger) > delivery_version(smaller)


async def test_each_delivery_recorded_alone_is_stored_with_its_own_status(database_url, capsys):
    """Without a group-commit window each delivery is recorded on its own: an event we do
    not handle is stored as ignored, one we handle as processed, a retry as one more
    delivery of the first, answered and logged as no conflict; a second content of an
    eventId is answered as a conflict."""
    unknown = traffic.envelope("mailbox.frozen", {"mailboxId": "mb1"})
    created = traffic.mailbox_created()
    settings = make_settings(database_url, group_commit_window_ms=0)
    async with app_client(settings) as client:
        bodies = [(await deliver(client, p)).json() for p in (unknown, created, unknown)]
        answers = [body.pop("status") for body in bodies]
        assert all("conflict" not in body for body in bodies)
        assert "outcome=duplicate conflict=False" in capsys.readouterr().err  # the log line
        second = created | {"data": created["data"] | {"domain": "second-content.com"}}
        conflicting = (await deliver(client, second)).json()  # a second content of its eventId
        assert (conflicting["status"], conflicting["conflict"]) == ("processed", True)
        params = {"eventId": created["eventId"]}
        both = (await client.get("/api/v1/events", headers=OPS, params=params)).json()["items"]
        assert [e["conflict"] for e in both] == [True, True]  # the first content marked too
        stored = []
        for payload in (unknown, created):
            params = {"eventId": payload["eventId"]}
            found = (await client.get("/api/v1/events", headers=OPS, params=params)).json()
            event = await read(client, f"events/{found['items'][-1]['id']}")
            stored.append((event["event"], event["status"], event["deliveries"]))
    assert answers == ["ignored", "processed", "duplicate"]
    assert stored == [("mailbox.frozen", "ignored", 2), ("mailbox.created", "processed", 1)]


async def test_two_edits_sent_in_one_second_are_decided_by_event_id_in_either_order(client):
    """Ties break by eventId: the larger wins whichever of the two arrives first."""
    at = time.time()
    boxes = []
    for _ in range(2):
        created = streams.sent(traffic.mailbox_created(), at - 60)
        boxes.append(created["data"]["mailboxDetails"]["mailboxId"])
        await delivered(client, created)
    for box, larger_first in zip(boxes, (False, True), strict=True):
        edits = [
            streams.sent(traffic.mailbox_updated(box, {"lastName": name}), at)
            for name in ("Smaller", "Larger")
        ]
        edits[0]["eventId"], edits[1]["eventId"] = f"AAAA-{box}", f"ZZZZ-{box}"
        await delivered(client, *(edits[::-1] if larger_first else edits))
    shown = [(await read(client, f"mailboxes/{box}"))["lastName"] for box in boxes]
    assert shown == ["Larger", "Larger"]
