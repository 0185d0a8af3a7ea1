"""The ops read API: auth, every endpoint and filter, paging, errors, audit, no leaks."""

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app import crypto
from app.simulation import traffic as factories
from tests import streams
from tests.conftest import CREDENTIALS_TOKEN, OPS_TOKEN, WEBHOOK_TOKEN, deliver
from tests.test_dashboard import sign_in

OPS = {"Authorization": f"Bearer {OPS_TOKEN}"}
CREDS = {"Authorization": f"Bearer {CREDENTIALS_TOKEN}"}


@pytest.fixture
async def seeded(client):
    """A standard order with two mailboxes, a partially failed prewarmup, an ignored event."""
    success = factories.mailbox_order_success(domainName="standard.com", quantity=2)
    data = success["data"]
    created = [
        factories.mailbox_created(
            provider=provider,
            subscriptionId=data["subscriptionId"],
            orderId=data["orderId"],
            domain="standard.com",
            userId=data["userId"],
        )
        for provider in ("GOOGLE", "MICROSOFT")
    ]
    order_id = factories.provider_id()
    prewarm = factories.prewarmup_success(order_id=order_id, domain_names=["p1.com", "p2.com"])
    failed = factories.prewarmup_failed(order_id=order_id, failures={"p3.com": "Pool empty"})
    ignored = factories.envelope("dns-record.updated", {"domain": "standard.com"})
    for payload in [success, *created, prewarm, failed, ignored]:
        assert (await deliver(client, payload)).status_code == 200
    await deliver(client, factories.mailbox_created(details={"mailboxId": ""}))  # one rejected
    return {"standard": success, "created": created, "prewarm": prewarm, "failed": failed}


def secrets_of(seeded) -> list[str]:
    values = [
        c["data"]["mailboxDetails"].get(k)
        for c in seeded["created"]
        for k in ("password", "appPassword")
    ]
    for group in seeded["prewarm"]["data"]["mailboxDetails"]:
        for box in group["preWarmedUpMailboxes"]:
            values += [box["password"], box["appPassword"], box["authenticatorSecret"]]
    return [v for v in values if v]


@pytest.mark.parametrize("path", ["/api/v1/mailboxes", "/api/v1/stats", "/api/v1/events/1"])
async def test_no_or_wrong_token_is_401(client, path):
    assert (await client.get(path)).status_code == 401
    wrong = await client.get(path, headers={"Authorization": f"Bearer {WEBHOOK_TOKEN}"})
    assert wrong.status_code == 401
    assert wrong.json() == {"error": "unauthorized"}


async def test_subscriptions_list_filter_and_detail(client, seeded):
    data = seeded["standard"]["data"]
    page = (await client.get("/api/v1/subscriptions", headers=OPS)).json()
    assert len(page["items"]) == 3 and page["nextCursor"] is None
    for limit, more in [(2, True), (3, False)]:  # a page ending on the last row says so
        exact = await client.get("/api/v1/subscriptions", headers=OPS, params={"limit": limit})
        assert (exact.json()["nextCursor"] is not None) is more, limit
    standard = (
        await client.get("/api/v1/subscriptions", headers=OPS, params={"domain": "standard.com"})
    ).json()["items"]
    assert [s["subscriptionId"] for s in standard] == [data["subscriptionId"]]
    sub = standard[0]
    assert (sub["mailboxCount"], sub["price"], sub["status"], sub["source"]) == (
        2,
        11,
        "active",
        "standard",
    )
    assert sub["expiryDate"] == "2025-03-08T23:59:59.294000Z"  # the latest known: a mailbox's
    for params, count in [
        ({"source": "prewarmed"}, 2),
        ({"userId": data["userId"]}, 1),
        ({"provider": "GOOGLE", "status": "active"}, 3),
        ({"expiresBefore": "2025-06-01"}, 1),
        ({"userEmail": "x@y"}, 0),
    ]:
        got = await client.get("/api/v1/subscriptions", headers=OPS, params=params)
        assert len(got.json()["items"]) == count, params
    detail = await client.get(f"/api/v1/subscriptions/{data['subscriptionId']}", headers=OPS)
    assert {m["provider"] for m in detail.json()["mailboxes"]} == {"GOOGLE", "MICROSOFT"}


async def test_the_subscriptions_user_email_filter_matches_the_email_exactly(client):
    """`userEmail` on the list is the email as given (the renewals' is in any case); both
    are read from one index of the emails in lower case (migration 0030)."""
    ids = {}
    for email in ("Jane.Doe@Agency.example", "jane.doe@agency.example"):
        order = factories.mailbox_order_success(userEmail=email)
        assert (await deliver(client, order)).status_code == 200
        ids[email] = order["data"]["subscriptionId"]
    for email in [*ids, "JANE.DOE@AGENCY.EXAMPLE"]:
        got = await client.get("/api/v1/subscriptions", headers=OPS, params={"userEmail": email})
        found = [s["subscriptionId"] for s in got.json()["items"]]
        assert found == [ids[e] for e in ids if e == email], email


async def test_mailboxes_list_filters_and_detail(client, seeded):
    created = seeded["created"][1]["data"]
    box_id = created["mailboxDetails"]["mailboxId"]
    for params, count in [
        ({}, 6),
        ({"subscriptionId": created["subscriptionId"]}, 2),
        ({"domain": "p1.com"}, 2),
        ({"source": "prewarmed"}, 4),
        ({"provider": "MICROSOFT"}, 1),
        ({"userId": created["userId"]}, 2),
        ({"email": created["mailboxDetails"]["email"]}, 1),
    ]:
        got = await client.get("/api/v1/mailboxes", headers=OPS, params=params)
        assert len(got.json()["items"]) == count, params
    box = (await client.get(f"/api/v1/mailboxes/{box_id}", headers=OPS)).json()
    assert (box["hasPassword"], box["hasAppPassword"], box["finalUrl"]) == (
        True,
        False,
        "https://example.com/oauth-callback",
    )
    assert box["price"] == 8.16
    assert not {"password", "appPassword", "authenticatorSecret"} & set(box)


async def test_updated_since_a_rows_own_updated_at_still_returns_that_row(client, seeded):
    """A reader syncing by `updatedSince` passes the last `updatedAt` it saw: that row comes
    again (at or after), a row updated a microsecond earlier does not."""
    boxes = (await client.get("/api/v1/mailboxes", headers=OPS)).json()["items"]
    latest = max(boxes, key=lambda m: m["updatedAt"])
    at = datetime.fromisoformat(latest["updatedAt"])
    for since, expected in [
        (at, {m["mailboxId"] for m in boxes if m["updatedAt"] == latest["updatedAt"]}),
        (at + timedelta(microseconds=1), set()),
    ]:
        got = await client.get(
            "/api/v1/mailboxes", headers=OPS, params={"updatedSince": since.isoformat()}
        )
        assert {m["mailboxId"] for m in got.json()["items"]} == expected, since


async def test_credentials_need_a_credentials_token_and_are_audited(client, seeded):
    box = seeded["prewarm"]["data"]["mailboxDetails"][0]["preWarmedUpMailboxes"][0]
    path = f"/api/v1/mailboxes/{box['mailboxId']}/credentials"
    forbidden = await client.get(path, headers=OPS)
    assert forbidden.status_code == 403
    response = await client.get(path, headers=CREDS)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    assert response.json() == {
        "mailboxId": box["mailboxId"],
        "password": box["password"],
        "appPassword": box["appPassword"],
        "authenticatorSecret": box["authenticatorSecret"],
    }
    assert (await client.get("/api/v1/audit/credential-reads", headers=OPS)).status_code == 403
    trail = (await client.get("/api/v1/audit/credential-reads", headers=CREDS)).json()["items"]
    assert len(trail) == 1
    assert trail[0]["mailboxId"] == box["mailboxId"]
    assert re.fullmatch(r"[0-9a-f]{16}", trail[0]["tokenFingerprint"])
    assert CREDENTIALS_TOKEN not in str(trail)


async def test_credentials_of_a_google_mailbox_are_null_where_absent(client, seeded):
    box_id = seeded["created"][0]["data"]["mailboxDetails"]["mailboxId"]
    got = (await client.get(f"/api/v1/mailboxes/{box_id}/credentials", headers=CREDS)).json()
    assert got["password"] is None and got["authenticatorSecret"] is None
    assert got["appPassword"].startswith("canary-app-")


async def test_orders_show_each_domain_outcome(client, seeded):
    order_id = seeded["prewarm"]["data"]["orderId"]
    order = (await client.get(f"/api/v1/orders/{order_id}", headers=OPS)).json()
    assert order["status"] == "partially_failed" and order["kind"] == "prewarmup"
    assert [
        (d["domain"], d["status"], d["reason"], d["mailboxCount"]) for d in order["domains"]
    ] == [
        ("p1.com", "succeeded", None, 2),
        ("p2.com", "succeeded", None, 2),
        ("p3.com", "failed", "Pool empty", 0),
    ]
    for params, count in [
        ({}, 2),
        ({"status": "partially_failed"}, 1),
        ({"kind": "mailbox"}, 1),
        ({"userId": seeded["standard"]["data"]["userId"]}, 1),
    ]:
        got = await client.get("/api/v1/orders", headers=OPS, params=params)
        assert len(got.json()["items"]) == count, params


async def test_events_show_deliveries_signature_and_redacted_payload(client, seeded):
    payload = seeded["created"][1]
    await deliver(client, payload)  # a retry
    found = (
        await client.get("/api/v1/events", headers=OPS, params={"eventId": payload["eventId"]})
    ).json()["items"]
    assert len(found) == 1
    event = (await client.get(f"/api/v1/events/{found[0]['id']}", headers=OPS)).json()
    assert (event["deliveries"], event["signature"], event["status"], event["conflict"]) == (
        2,
        "valid",
        "processed",
        False,
    )
    assert event["payload"]["data"]["mailboxDetails"]["password"] == "[REDACTED]"
    for params, count in [
        ({"status": "ignored"}, 1),
        ({"event": "mailbox.created"}, 2),
        ({"conflict": "true"}, 0),
        ({"conflict": "false"}, 6),
    ]:
        got = await client.get("/api/v1/events", headers=OPS, params=params)
        assert len(got.json()["items"]) == count, params


async def test_rejected_deliveries_show_errors_but_no_body(client, seeded):
    items = (await client.get("/api/v1/rejected", headers=OPS)).json()["items"]
    assert len(items) == 1
    one = (await client.get(f"/api/v1/rejected/{items[0]['id']}", headers=OPS)).json()
    assert one["reason"] == "invalid_payload"
    assert one["errors"][0]["loc"] == ["data", "mailboxDetails", "mailboxId"]
    assert "body" not in str(one).lower().replace("_", "")


async def test_stats_count_what_ops_checks_first(client, seeded):
    stats = (await client.get("/api/v1/stats", headers=OPS)).json()
    assert stats["subscriptions"] == 3 and stats["mailboxes"] == 6
    assert stats["mailboxesBySource"] == {"standard": 2, "prewarmed": 4}
    assert stats["mailboxesByProvider"] == {"GOOGLE": 5, "MICROSOFT": 1}
    assert stats["ordersByStatus"] == {"succeeded": 1, "partially_failed": 1}
    assert stats["eventsByStatus"] == {"processed": 5, "ignored": 1}
    assert (stats["conflicts"], stats["rejectedDeliveries"]) == (0, 1)
    assert stats["lastDeliveryAt"] is not None


async def test_last_delivery_is_the_latest_receipt_a_duplicate_included(client, db):
    first, second = factories.mailbox_created(), factories.mailbox_created()
    for payload in (first, second):
        assert (await deliver(client, payload)).status_code == 200

    async def shown() -> datetime:
        stats = (await client.get("/api/v1/stats", headers=OPS)).json()
        return datetime.fromisoformat(stats["lastDeliveryAt"])

    newest = await db.fetchval("SELECT max(first_received_at) FROM events")
    assert await shown() == newest
    assert (await deliver(client, first)).json()["status"] == "duplicate"
    duplicate = await db.fetchval(
        "SELECT last_received_at FROM events WHERE event_id = $1", first["eventId"]
    )
    assert duplicate > newest and await shown() == duplicate


async def walk(client, path: str, *, limit: int, during=None) -> list[dict[str, Any]]:
    """Every item of a list, page by page; `during()` runs after the first page."""
    items, cursor = [], None
    while True:
        params = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        response = await client.get(path, headers=OPS, params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        # a cursor that does not move must fail, not hang: its page repeats an item
        assert not page["items"] or page["items"][0] not in items, (path, cursor)
        items += page["items"]
        if during and cursor is None:
            await during()
        if not (cursor := page["nextCursor"]):
            return items


async def test_walking_120_mailboxes_in_pages_of_50_returns_each_once(client):
    await deliver(client, factories.prewarmup_success(domains=12, per_domain=10))

    async def add_five() -> None:
        await deliver(client, factories.prewarmup_success(domains=1, per_domain=5))

    seen = [
        m["mailboxId"] for m in await walk(client, "/api/v1/mailboxes", limit=50, during=add_five)
    ]
    assert len(seen) == 120 == len(set(seen))  # what was committed when the walk began
    again = await walk(client, "/api/v1/mailboxes", limit=50)
    assert len(again) == 125  # the next walk has the rest


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/v1/mailboxes", {"limit": 0}),
        ("/api/v1/mailboxes", {"limit": 501}),
        ("/api/v1/mailboxes", {"cursor": "%%%"}),
        ("/api/v1/mailboxes", {"cursor": "LTE"}),
        ("/api/v1/mailboxes", {"colour": "red"}),
        ("/api/v1/mailboxes", {"provider": "YAHOO"}),
        ("/api/v1/subscriptions", {"expiresBefore": "next week"}),
        ("/api/v1/orders", {"status": "done"}),
        ("/api/v1/events", {"conflict": "maybe"}),
    ],
)
async def test_bad_parameters_are_422_without_echo(client, path, params):
    response = await client.get(path, headers=OPS, params=params)
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "invalid_request"
    assert all(set(d) == {"loc", "msg", "type"} for d in body["detail"])
    for value in params.values():
        if isinstance(value, str) and len(value) > 3:
            assert value not in response.text


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/subscriptions/nope",
        "/api/v1/mailboxes/nope",
        "/api/v1/mailboxes/nope/credentials",
        "/api/v1/orders/nope",
        "/api/v1/events/999999",
        "/api/v1/rejected/999999",
    ],
)
async def test_unknown_ids_are_404(client, path):
    response = await client.get(path, headers=CREDS)
    assert response.status_code == 404
    assert response.json() == {"error": "not_found"}


async def test_bare_values_in_lists_are_redacted_in_the_api_the_event_page_and_the_table(
    client, db
):
    processed = factories.mailbox_created()
    processed["data"]["description"] = ["canary-list-1", 7]  # a descriptive key, a list
    ignored = factories.envelope(
        "dns-record.updated",
        {
            "domain": "listed.example",
            "failedOrders": [
                "canary-list-2",
                [["canary-list-3"]],
                {"domain": "kept.example", "reason": "Pool empty", "pwd": "canary-list-4"},
            ],
        },
    )
    for payload in (processed, ignored):
        assert (await deliver(client, payload)).status_code == 200
    await sign_in(client)
    for payload in (processed, ignored):
        found = await client.get(
            "/api/v1/events", headers=OPS, params={"eventId": payload["eventId"]}
        )
        event_id = found.json()["items"][0]["id"]
        shown = (await client.get(f"/api/v1/events/{event_id}", headers=OPS)).json()["payload"]
        page = (await client.get(f"/ui/events/{event_id}")).text
        stored = await db.fetchval("SELECT payload::text FROM events WHERE id = $1", event_id)
        for where in (str(shown), page, stored):
            assert "canary-" not in where
        assert shown["eventId"] == payload["eventId"]  # what describes stays readable
    assert shown["data"]["failedOrders"] == [
        "[REDACTED]",
        [["[REDACTED]"]],
        {"domain": "kept.example", "reason": "Pool empty", "pwd": "[REDACTED]"},
    ]
    assert shown["data"]["domain"] == "listed.example"


def test_a_list_of_descriptive_values_shows_only_where_the_allowlist_says(monkeypatch):
    payload = {"data": {"domainNames": ["a.example", "b.example"], "email": ["x@a.example"]}}
    assert crypto.redact(payload) == {
        "data": {"domainNames": "[REDACTED]", "email": ["[REDACTED]"]}
    }
    monkeypatch.setattr(crypto, "DESCRIPTIVE", crypto.DESCRIPTIVE | {"domainNames"})
    monkeypatch.setattr(crypto, "DESCRIPTIVE_LIST_ITEMS", frozenset({"domainNames"}))
    assert crypto.redact(payload) == {
        "data": {"domainNames": ["a.example", "b.example"], "email": ["[REDACTED]"]}
    }


async def test_no_response_but_credentials_holds_a_secret(client, seeded):
    secrets = secrets_of(seeded)
    assert len(secrets) == 14
    paths = [
        "/api/v1/subscriptions",
        "/api/v1/mailboxes",
        "/api/v1/orders",
        "/api/v1/events",
        "/api/v1/rejected",
        "/api/v1/stats",
        "/openapi.json",
        "/metrics",
    ]
    bodies = [
        (
            await client.get(
                p, headers=CREDS, params={"limit": 500} if "v1/" in p and "stats" not in p else {}
            )
        ).text
        for p in paths
    ]
    for item in (await client.get("/api/v1/events", headers=OPS)).json()["items"]:
        bodies.append((await client.get(f"/api/v1/events/{item['id']}", headers=OPS)).text)
    for sub in (await client.get("/api/v1/subscriptions", headers=OPS)).json()["items"]:
        bodies.append(
            (await client.get(f"/api/v1/subscriptions/{sub['subscriptionId']}", headers=OPS)).text
        )
    everything = "\n".join(bodies)
    assert "canary-" not in everything
    assert "[REDACTED]" in everything


async def test_docs_are_served_from_this_origin_under_a_csp(client):
    page = await client.get("/docs")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self' 'sha256-" in csp
    fetched = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    assert fetched and all(url.startswith("/docs/assets/") for url in fetched)
    assert "url: '/openapi.json'" in page.text
    bundle = await client.get("/docs/assets/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and "petstore.swagger.io" not in bundle.text
    for sample in ("index.html", "swagger-initializer.js", "oauth2-redirect.html"):
        assert (await client.get(f"/docs/assets/{sample}")).status_code == 404, sample
    assert (await client.get("/openapi.json")).json()["openapi"].startswith("3.1")


async def test_openapi_declares_bearer_auth_and_documents_every_route(client):
    spec = (await client.get("/openapi.json")).json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, item in spec["paths"].items():
        if path.startswith("/api/v1"):
            assert item["get"]["summary"], path
            assert item["get"]["security"] == [{"HTTPBearer": []}], path
    assert "Mailbox" in spec["components"]["schemas"]


def at_risk(metrics_text: str, risk: str) -> float:
    match = re.search(rf'^cmr_subscriptions_at_risk{{risk="{risk}"}} (\S+)$', metrics_text, re.M)
    assert match, f"no cmr_subscriptions_at_risk for {risk}"
    return float(match[1])


async def test_metrics_count_subscriptions_whose_renewal_is_at_risk(client):
    past_due = streams.subscription_event("subscription.past_due", "SUB-PAST-DUE")
    lapsed = streams.subscription_event(
        "subscription.updated",
        "SUB-LAPSED",
        subscriptionStatus="ACTIVE",
        periodStart="2020-01-01T00:00:00Z",
        periodEnd="2020-02-01T00:00:00Z",
    )
    healthy = streams.subscription_event(
        "subscription.updated",
        "SUB-FINE",
        subscriptionStatus="ACTIVE",
        periodStart="2026-11-01T00:00:00Z",
        periodEnd="2099-01-01T00:00:00Z",
    )
    in_grace = streams.subscription_event(
        "subscription.updated",
        "SUB-GRACE",
        domain="grace.example",
        subscriptionStatus="ACTIVE",
        periodStart="2020-01-01T00:00:00Z",
        periodEnd=(datetime.now(UTC) + timedelta(days=3)).isoformat(),
    )
    grace = factories.envelope("domain.grace_period", {"domainName": "grace.example"})
    for payload in (past_due, lapsed, healthy, in_grace, grace):
        assert (await deliver(client, payload)).status_code == 200
    text = (await client.get("/metrics")).text
    assert at_risk(text, "past_due") == 1
    assert at_risk(text, "overdue") == 1  # its period ended and no renewal was heard
    assert at_risk(text, "domain_grace_period") == 1
    assert at_risk(text, "domain_expired") == 0
    assert at_risk(text, "due") == 3  # on the renewals list: all but the healthy one
