"""The ops team's daily questions through the read API: newest first, search as typed,
what renews and what is at risk, and mailboxes handed to the sending platforms as CSV."""

import csv
import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from traceback import format_exception

import pytest

from app.simulation import traffic
from tests.conftest import CREDENTIALS_TOKEN, OPS_TOKEN, deliver
from tests.streams import subscription_event

OPS = {"Authorization": f"Bearer {OPS_TOKEN}"}
CREDS = {"Authorization": f"Bearer {CREDENTIALS_TOKEN}"}


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


async def delivered(client, *payloads):
    for payload in payloads:
        response = await deliver(client, payload)
        assert response.status_code == 200, response.text
    return payloads


async def walk(client, path, **params):
    items, cursor = [], None
    while True:
        page = await client.get(path, params=params | ({"cursor": cursor} if cursor else {}))
        assert page.status_code == 200, page.text
        items += page.json()["items"]
        if (cursor := page.json()["nextCursor"]) is None:
            return items


# --- newest first ----------------------------------------------------------------------


async def test_newest_first_shows_the_latest_delivery_on_the_first_page(client):
    sent = await delivered(client, *(traffic.mailbox_created() for _ in range(7)))
    page = await client.get("/api/v1/events", params={"order": "newest", "limit": 3}, headers=OPS)
    assert [e["eventId"] for e in page.json()["items"]] == [p["eventId"] for p in sent[::-1][:3]]
    client.headers.update(OPS)
    newest = await walk(client, "/api/v1/events", order="newest", limit=3)
    oldest = await walk(client, "/api/v1/events", order="oldest", limit=3)
    assert [e["eventId"] for e in newest] == [e["eventId"] for e in oldest][::-1]
    assert len(newest) == 7


@pytest.mark.parametrize("path", ["mailboxes", "subscriptions", "orders", "rejected"])
async def test_every_list_takes_an_order_and_refuses_another(client, path):
    assert (await client.get(f"/api/v1/{path}?order=newest", headers=OPS)).status_code == 200
    assert (await client.get(f"/api/v1/{path}?order=random", headers=OPS)).status_code == 422


# --- search ----------------------------------------------------------------------------


@pytest.fixture
async def jane(client):
    payload = traffic.mailbox_created(
        domain="acme-outreach.io",
        details={"email": "jane@acme-outreach.io", "firstName": "Jane", "lastName": "Okafor"},
        userEmail="buyer@agency.example",
    )
    await delivered(client, payload, traffic.mailbox_created(domain="other.io"))
    return payload["data"]


@pytest.mark.parametrize(
    "typed", ["JANE@acme-outreach.io", "Acme-Outreach.io", "jane", "okafor", "JANE OKAFOR"]
)
async def test_mailbox_search_finds_what_a_person_types(client, jane, typed):
    found = await client.get("/api/v1/mailboxes", params={"q": typed}, headers=OPS)
    assert [m["email"] for m in found.json()["items"]] == ["jane@acme-outreach.io"]


async def test_mailbox_search_finds_a_mailbox_by_part_of_its_id(client, jane):
    part = jane["mailboxDetails"]["mailboxId"][3:15].lower()
    found = await client.get("/api/v1/mailboxes", params={"q": part}, headers=OPS)
    assert [m["mailboxId"] for m in found.json()["items"]] == [jane["mailboxDetails"]["mailboxId"]]


async def test_search_wildcards_are_taken_literally(client, jane):
    for typed in ("jan%", "jan_", "j%ane", "jane\\"):
        found = await client.get("/api/v1/mailboxes", params={"q": typed}, headers=OPS)
        assert found.status_code == 200 and found.json()["items"] == []


async def test_subscription_search_by_domain_id_or_user_email(client, jane):
    for typed in ("ACME-outreach", jane["subscriptionId"][2:20], "BUYER@agency"):
        found = await client.get("/api/v1/subscriptions", params={"q": typed}, headers=OPS)
        assert [s["subscriptionId"] for s in found.json()["items"]] == [jane["subscriptionId"]]


# --- renewals --------------------------------------------------------------------------


async def lifecycle(client, subscription_id, event, ends_in_days, **data):
    now = datetime.now(UTC)
    payload = subscription_event(
        event,
        subscription_id,
        periodStart=iso(now - timedelta(days=30)),
        periodEnd=iso(now + timedelta(days=ends_in_days)),
        **data,
    )
    await delivered(client, payload)


async def new_subscription(client, *, boxes=1, price=10.0, user="USR-A"):
    order = traffic.mailbox_order_success(price=price, quantity=boxes, userId=user)
    data = order["data"]
    boxes_sent = [
        traffic.mailbox_created(
            subscriptionId=data["subscriptionId"], domain=data["domainName"], userId=user
        )
        for _ in range(boxes)
    ]
    await delivered(client, order, *boxes_sent)
    return data


async def test_renewals_list_what_renews_soon_with_its_risks_most_urgent_first(client):
    overdue = await new_subscription(client, boxes=2, price=8)
    failing = await new_subscription(client, boxes=1, price=11)
    manual = await new_subscription(client, boxes=3, price=5, user="USR-B")
    later = await new_subscription(client)
    grace = await new_subscription(client)
    await lifecycle(client, overdue["subscriptionId"], "subscription.updated", -2)
    await lifecycle(client, failing["subscriptionId"], "subscription.renewal.failed", 3)
    await lifecycle(client, manual["subscriptionId"], "subscription.updated", 10, autoRenew=False)
    await lifecycle(client, later["subscriptionId"], "subscription.updated", 90)
    await lifecycle(client, grace["subscriptionId"], "subscription.updated", 20)
    await delivered(
        client, traffic.envelope("domain.grace_period", {"domainName": grace["domainName"]})
    )

    body = (await client.get("/api/v1/renewals?withinDays=30", headers=OPS)).json()
    listed = {r["subscriptionId"]: r for r in body["items"]}
    assert [r["subscriptionId"] for r in body["items"]] == [
        overdue["subscriptionId"],
        failing["subscriptionId"],
        manual["subscriptionId"],
        grace["subscriptionId"],
    ]
    assert listed[overdue["subscriptionId"]]["risks"] == ["overdue"]
    assert listed[failing["subscriptionId"]]["risks"] == ["past_due"]
    assert listed[manual["subscriptionId"]]["risks"] == ["auto_renew_off"]
    assert listed[grace["subscriptionId"]]["risks"] == ["domain_grace_period"]
    assert listed[overdue["subscriptionId"]]["mailboxCount"] == 2
    assert listed[overdue["subscriptionId"]]["monthlyCost"] == 16
    totals = {t["userId"]: t for t in body["totals"]}
    assert totals["USR-B"] == {
        "userId": "USR-B",
        "userEmail": "johndoe@company.com",
        "subscriptions": 1,
        "mailboxes": 3,
        "monthlyCost": 15,
    }
    assert totals["USR-A"]["subscriptions"] == 3 and totals["USR-A"]["monthlyCost"] == 16 + 11 + 10
    wider = (await client.get("/api/v1/renewals?withinDays=120", headers=OPS)).json()
    assert later["subscriptionId"] in {r["subscriptionId"] for r in wider["items"]}


async def test_renewals_page_through_every_due_subscription_once(client):
    ids = []
    for days in (5, 1, 9, 3, 7):
        sub = await new_subscription(client)
        await lifecycle(client, sub["subscriptionId"], "subscription.updated", days)
        ids.append((days, sub["subscriptionId"]))
    client.headers.update(OPS)
    walked = await walk(client, "/api/v1/renewals", limit=2)
    assert [r["subscriptionId"] for r in walked] == [s for _, s in sorted(ids)]


@pytest.mark.parametrize("params", ["withinDays=0", "withinDays=367", "cursor=x", "sort=1"])
async def test_renewals_refuse_bad_parameters(client, params):
    response = await client.get(f"/api/v1/renewals?{params}", headers=OPS)
    assert response.status_code == 422


async def test_a_subscription_cancelled_long_ago_is_no_longer_a_renewal(client):
    sub = await new_subscription(client)
    await lifecycle(client, sub["subscriptionId"], "subscription.cancelled", -60)
    body = (await client.get("/api/v1/renewals?withinDays=30", headers=OPS)).json()
    assert body["items"] == []
    recent = await new_subscription(client)
    await lifecycle(client, recent["subscriptionId"], "subscription.expired", -3)
    body = (await client.get("/api/v1/renewals?withinDays=30", headers=OPS)).json()
    assert [r["risks"] for r in body["items"]] == [["expired"]]


# --- exports ---------------------------------------------------------------------------

HEADERS = {
    "instantly": "Email,First Name,Last Name,IMAP Username,IMAP Password,IMAP Host,IMAP Port,"
    "SMTP Username,SMTP Password,SMTP Host,SMTP Port,Daily Limit,Warmup Enabled",
    "smartlead": "from_name,from_email,user_name,password,smtp_host,smtp_port,imap_host,"
    "imap_port,max_email_per_day,warmup_enabled",
    "emailbison": "Name,Email,Password,IMAP Server,IMAP Port,SMTP Server,SMTP Port",
}


@pytest.fixture
async def two_providers(client):
    order = traffic.mailbox_order_success(quantity=2)
    data = order["data"]
    common = {"subscriptionId": data["subscriptionId"], "domain": data["domainName"]}
    google = traffic.mailbox_created(provider="GOOGLE", **common)
    microsoft = traffic.mailbox_created(
        provider="MICROSOFT", details={"firstName": '=HYPERLINK("x")', "lastName": "@Doe"}, **common
    )
    await delivered(client, order, google, microsoft, traffic.mailbox_created())
    return {
        "subscription": data["subscriptionId"],
        "google": google["data"]["mailboxDetails"],
        "microsoft": microsoft["data"]["mailboxDetails"],
    }


async def export(client, fmt, **params):
    return await client.get(
        "/api/v1/exports/mailboxes", params={"format": fmt} | params, headers=CREDS
    )


def rows(response) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(response.text)))


@pytest.mark.parametrize("fmt", sorted(HEADERS))
async def test_each_platform_gets_its_own_columns_and_each_provider_its_servers(
    client, two_providers, fmt
):
    response = await export(client, fmt, subscriptionId=two_providers["subscription"])
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert response.headers["cache-control"] == "no-store"
    assert "attachment" in response.headers["content-disposition"]
    assert response.text.splitlines()[0] == HEADERS[fmt]
    by_email = {r.get("Email") or r.get("from_email"): r for r in rows(response)}
    assert len(by_email) == 2
    google = by_email[two_providers["google"]["email"]]
    microsoft = by_email[two_providers["microsoft"]["email"]]
    app_password = two_providers["google"]["appPassword"]
    password = two_providers["microsoft"]["password"]
    if fmt == "instantly":
        assert (google["IMAP Host"], google["IMAP Port"]) == ("imap.gmail.com", "993")
        assert (google["SMTP Host"], google["SMTP Port"]) == ("smtp.gmail.com", "587")
        assert google["SMTP Password"] == google["IMAP Password"] == app_password
        assert microsoft["IMAP Host"] == "outlook.office365.com"
        assert microsoft["SMTP Host"] == "smtp.office365.com"
        assert microsoft["SMTP Password"] == password
        assert microsoft["First Name"] == '\'=HYPERLINK("x")'
        assert microsoft["Last Name"] == "'@Doe"
    elif fmt == "smartlead":
        assert (google["smtp_host"], google["imap_host"]) == ("smtp.gmail.com", "imap.gmail.com")
        assert google["password"] == app_password and microsoft["password"] == password
        assert microsoft["from_name"] == '\'=HYPERLINK("x") @Doe'
    else:
        assert (google["SMTP Server"], google["SMTP Port"]) == ("smtp.gmail.com", "587")
        assert google["Password"] == app_password
        assert (microsoft["IMAP Server"], microsoft["IMAP Port"]) == (
            "outlook.office365.com",
            "993",
        )
        assert microsoft["Password"] == password


async def test_our_own_csv_carries_every_credential(client, two_providers):
    response = await export(client, "csv", q=two_providers["google"]["email"].upper())
    [row] = rows(response)
    assert row["mailboxId"] == two_providers["google"]["mailboxId"]
    assert row["appPassword"] == two_providers["google"]["appPassword"]
    assert row["password"] == "" and row["provider"] == "GOOGLE"


async def test_an_ops_token_may_not_export(client, two_providers):
    response = await client.get("/api/v1/exports/mailboxes?format=csv", headers=OPS)
    assert response.status_code == 403
    assert "canary" not in response.text


async def test_exports_only_over_https(client, two_providers):
    response = await client.get(
        "/api/v1/exports/mailboxes?format=csv", headers=CREDS | {"x-forwarded-for": "203.0.113.9"}
    )
    assert response.status_code == 403 and response.json() == {"error": "https_required"}


async def test_an_unknown_format_is_refused(client):
    assert (await export(client, "xlsx")).status_code == 422
    assert (
        await client.get("/api/v1/exports/mailboxes", headers=CREDS)
    ).status_code == 422  # format is required


async def test_each_exported_mailbox_has_its_audit_row(client, two_providers, db):
    before = await db.fetchval("select count(*) from credential_reads")
    response = await export(client, "instantly", subscriptionId=two_providers["subscription"])
    exported = {r["Email"] for r in rows(response)}
    audited = await db.fetch(
        "select m.email, r.token_fingerprint, r.export_id from credential_reads r "
        "join mailboxes m using (mailbox_id) order by r.id offset $1",
        before,
    )
    assert {r["email"] for r in audited} == exported and len(audited) == 2
    assert len({r["export_id"] for r in audited}) == 1
    assert CREDENTIALS_TOKEN not in {r["token_fingerprint"] for r in audited}
    trail = await client.get("/api/v1/audit/credential-reads", headers=CREDS)
    assert {r["mailboxId"] for r in trail.json()["items"]} >= {
        two_providers["google"]["mailboxId"],
        two_providers["microsoft"]["mailboxId"],
    }


async def test_an_export_of_many_mailboxes_comes_whole(client, db):
    order = traffic.mailbox_order_success(quantity=2500)
    data = order["data"]
    await delivered(client, order)
    await db.execute(
        "insert into mailboxes (mailbox_id, subscription_id, domain, email, provider, source) "
        "select 'bulk' || i, $1, $2, 'u' || i || '@' || $2, 'MICROSOFT', 'standard' "
        "from generate_series(1, 2500) i",
        data["subscriptionId"],
        data["domainName"],
    )
    response = await export(client, "emailbison", subscriptionId=data["subscriptionId"])
    emails = [r["Email"] for r in rows(response)]
    assert len(emails) == len(set(emails)) == 2500
    assert Decimal(len(emails)) == await db.fetchval(
        "select count(*) from credential_reads where mailbox_id like 'bulk%'"
    )


@pytest.mark.parametrize(
    "params",
    ["cursor=-99999999999999999-5", "cursor=99999999999999999-5", "withinDays=366"],
)
async def test_renewals_take_every_value_their_schema_allows(client, params):
    assert (await client.get(f"/api/v1/renewals?{params}", headers=OPS)).status_code == 200


async def test_a_search_the_trigram_index_cannot_serve_is_a_422_not_a_scan(client, jane):
    for typed in (" ", "%", "_", "j%e", "\\"):
        found = await client.get("/api/v1/mailboxes", params={"q": typed}, headers=OPS)
        assert found.status_code == 422 and found.json()["detail"][0]["loc"] == ["query", "q"]


async def test_a_read_the_database_refuses_is_an_error_not_a_retry_later(client, db, caplog):
    """An error in the statement itself fails the same way on every retry: 500, not 503."""
    await db.execute("ALTER TABLE rejected_deliveries RENAME TO rejected_elsewhere")
    asked = "EVTASKEDBY0PS"
    response = await client.get("/api/v1/rejected", params={"eventId": asked}, headers=OPS)
    assert response.status_code == 500 and "retry-after" not in response.headers
    assert response.json() == {"error": "internal_error"}
    assert "/api/v1/rejected failed: ProgrammingError" in caplog.text
    logged = [r for r in caplog.records if "failed: ProgrammingError" in r.getMessage()]
    assert logged[0].exc_info, "the traceback is logged, for whoever fixes the statement"
    traceback = "".join(format_exception(logged[0].exc_info[1]))
    assert asked not in traceback  # no value the client sent reaches the log
