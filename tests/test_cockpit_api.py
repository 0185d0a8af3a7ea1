"""The ops team's daily questions through the read API: newest first, search as typed,
what renews and what is at risk, and mailboxes handed to the sending platforms as CSV."""

import csv
import io
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from traceback import format_exception
from urllib.parse import unquote

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from app.reading import exporting, exports
from app.simulation import traffic
from tests.conftest import CREDENTIALS_TOKEN, OPS_TOKEN, deliver
from tests.streams import subscription_event
from tests.test_api import at_risk
from tests.test_dashboard import sign_in

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
    assert listed[failing["subscriptionId"]]["risks"] == ["past_due", "renewal_failed"]
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
        "unknownCost": 0,
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


async def test_a_renewal_failed_of_its_own_or_its_domain_shows_and_counts_once(client):
    """On the API, the dashboard and the gauge: the subscription's own renewal failed, its
    domain's, or both (one risk, counted once)."""
    own, both, domain_only = "SUB-OWN-FAILED", "SUB-BOTH-FAILED", "SUB-DOMAIN-FAILED"
    await lifecycle(client, own, "subscription.renewal.failed", 3, domain="own.example")
    await lifecycle(client, both, "subscription.renewal.failed", 3, domain="both.example")
    await lifecycle(client, domain_only, "subscription.updated", 3, domain="domain.example")
    for name in ("both.example", "domain.example"):
        await delivered(client, traffic.envelope("domain.renewal.failed", {"domainName": name}))

    body = (await client.get("/api/v1/renewals", headers=OPS)).json()
    assert {r["subscriptionId"]: r["risks"] for r in body["items"]} == {
        own: ["past_due", "renewal_failed"],
        both: ["past_due", "renewal_failed"],
        domain_only: ["renewal_failed"],
    }
    assert at_risk((await client.get("/metrics")).text, "renewal_failed") == 3
    await sign_in(client)
    page = (await client.get("/ui/renewals")).text
    row = re.search(r"<tr>\s*<td><a [^>]*>own\.example</a>.*?</tr>", page, re.S)
    assert row and "renewal failed" in row[0]


# --- exports ---------------------------------------------------------------------------

# Each platform's whole bulk-import column list, as its own template spells it (sources
# in docs/api.md), written out here rather than read from the code under test.
HEADERS = {
    "instantly": "Email,First Name,Last Name,IMAP Username,IMAP Password,IMAP Host,IMAP Port,"
    "SMTP Username,SMTP Password,SMTP Host,SMTP Port,Daily Limit,Warmup Enabled,Warmup Limit,"
    "Warmup Increment",
    "smartlead": "from_name,from_email,user_name,password,smtp_host,smtp_port,imap_host,"
    "imap_port,max_email_per_day,custom_tracking_url,warmup_enabled,total_warmup_per_day,"
    "daily_rampup,reply_rate_percentage,bcc,signature,different_reply_to_address,"
    "imap_user_name,imap_password",
    "emailbison": "Name,Email,Password,IMAP Server,IMAP Port,SMTP Server,SMTP Port,Daily Limit,"
    "SMTP Secure,IMAP Secure",
}
# Columns whose value we do not know: left empty, so the platform applies its default.
DEFAULTED = {
    "instantly": ["Daily Limit", "Warmup Enabled", "Warmup Limit", "Warmup Increment"],
    "smartlead": [
        "max_email_per_day",
        "custom_tracking_url",
        "warmup_enabled",
        "total_warmup_per_day",
        "daily_rampup",
        "reply_rate_percentage",
        "bcc",
        "signature",
        "different_reply_to_address",
    ],
    "emailbison": ["Daily Limit", "SMTP Secure", "IMAP Secure"],
}
BOM = b"\xef\xbb\xbf"


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
    return list(csv.DictReader(io.StringIO(response.content.decode("utf-8-sig"))))


@pytest.mark.parametrize("fmt", sorted(HEADERS))
async def test_each_platform_gets_its_own_columns_and_each_provider_its_servers(
    client, two_providers, fmt
):
    response = await export(client, fmt, subscriptionId=two_providers["subscription"])
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert response.headers["cache-control"] == "no-store"
    assert "attachment" in response.headers["content-disposition"]
    assert response.content.startswith(BOM + HEADERS[fmt].encode() + b"\r\n")
    by_email = {r.get("Email") or r.get("from_email"): r for r in rows(response)}
    assert len(by_email) == 2
    for row in by_email.values():
        assert [row[column] for column in DEFAULTED[fmt]] == [""] * len(DEFAULTED[fmt])
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
        assert google["imap_password"] == app_password and microsoft["imap_password"] == password
        assert google["imap_user_name"] == google["user_name"] == google["from_email"]
        assert microsoft["from_name"] == '\'=HYPERLINK("x") @Doe'
    else:
        assert (google["SMTP Server"], google["SMTP Port"]) == ("smtp.gmail.com", "587")
        assert google["Password"] == app_password
        assert (microsoft["IMAP Server"], microsoft["IMAP Port"]) == (
            "outlook.office365.com",
            "993",
        )
        assert microsoft["Password"] == password


FORMULAS_BEHIND = [
    " =1+1",
    "\u200b=cmd()",
    "\ufeff+1",
    "\u202e-2",
    "\u3000@x",
    "＝1",
    "＋1",
    "－1",
    "＠x",
]
HARMLESS = ["Anne-Marie", " Jane", "O'Neil", "\u200bZoe", "1+1"]
LOGINS = ["=SUM(A1)", "\u200b+pw", " -pw", "＠pw", "\tpw"]


async def test_formulas_behind_spaces_invisible_or_fullwidth_characters_are_neutralised(client):
    order = traffic.mailbox_order_success()
    common = {"subscriptionId": order["data"]["subscriptionId"]}
    names = FORMULAS_BEHIND + HARMLESS
    boxes = [
        traffic.mailbox_created(
            provider=provider,
            details={"firstName": name, "authenticatorSecret": LOGINS[i % len(LOGINS)]}
            | ({"password": LOGINS[i % len(LOGINS)]} if provider == "MICROSOFT" else {})
            | ({"appPassword": LOGINS[-1 - i % len(LOGINS)]} if provider == "GOOGLE" else {}),
            **common,
        )
        for i, name in enumerate(names)
        for provider in ("GOOGLE", "MICROSOFT")
    ]
    await delivered(client, order, *boxes)
    sent = {b["data"]["mailboxDetails"]["email"]: b["data"]["mailboxDetails"] for b in boxes}
    ours = rows(await export(client, "csv", subscriptionId=common["subscriptionId"]))
    instantly = rows(await export(client, "instantly", subscriptionId=common["subscriptionId"]))
    assert len(ours) == len(instantly) == len(boxes)
    for row in ours:
        box = sent[row["email"]]
        if box["firstName"] in FORMULAS_BEHIND:
            assert row["firstName"] == "'" + box["firstName"]
        else:
            assert row["firstName"] == box["firstName"]  # nothing to neutralise
        # credentials exactly as stored: the platform must receive the password unchanged
        assert row["password"] == box.get("password", "")
        assert row["appPassword"] == box.get("appPassword", "")
        assert row["authenticatorSecret"] == box["authenticatorSecret"]
    for row in instantly:
        box = sent[row["Email"]]
        login = box["appPassword"] if "appPassword" in box else box["password"]
        assert row["IMAP Password"] == row["SMTP Password"] == login
        assert row["First Name"].startswith("'") == (box["firstName"] in FORMULAS_BEHIND)


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
        "/api/v1/exports/mailboxes?format=csv&all=true",
        headers=CREDS | {"x-forwarded-for": "203.0.113.9"},
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
    response = await export(client, "csv", subscriptionId=data["subscriptionId"])
    emails = [r["email"] for r in rows(response)]
    assert len(emails) == len(set(emails)) == 2500
    assert Decimal(len(emails)) == await db.fetchval(
        "select count(*) from credential_reads where mailbox_id like 'bulk%'"
    )


@pytest.fixture
def audit_statements():
    """The statements that write or read credential_reads, as the engine sends them."""
    sent: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany):
        if "INSERT INTO credential_reads" in statement or "FROM credential_reads" in statement:
            sent.append(statement)

    event.listen(Engine, "before_cursor_execute", seen)
    yield sent
    event.remove(Engine, "before_cursor_execute", seen)


@pytest.mark.parametrize("count", [2000, 2345])
async def test_a_large_export_is_audited_in_batches_and_streams_exactly_the_audited(
    client, db, monkeypatch, audit_statements, count
):
    monkeypatch.setattr(exporting, "AUDIT_BATCH", 1000)
    monkeypatch.setattr(exports, "BATCH", 1000)
    order, other = traffic.mailbox_order_success(quantity=count), traffic.mailbox_order_success()
    data = order["data"]
    await delivered(client, order, other)
    await db.execute(  # this subscription's, a few erased, and another subscription's
        "insert into mailboxes (mailbox_id, subscription_id, domain, email, provider, source,"
        " erased_at) select 'bulk' || i, case when i % 97 = 0 then $4 else $1 end, $2,"
        " 'u' || i || '@' || $2, 'MICROSOFT', 'standard', case when i % 89 = 0 then now() end"
        " from generate_series(1, $3::int) i",
        data["subscriptionId"],
        data["domainName"],
        count,
        other["data"]["subscriptionId"],
    )
    expected = await db.fetch(
        "select email from mailboxes where subscription_id = $1 and erased_at is null order by id",
        data["subscriptionId"],
    )
    response = await export(client, "csv", subscriptionId=data["subscriptionId"])
    assert response.status_code == 200
    audited = await db.fetch(
        "select m.email from credential_reads r join mailboxes m using (mailbox_id) order by r.id"
    )
    streamed = [r["email"] for r in rows(response)]
    assert streamed == [r["email"] for r in audited] == [r["email"] for r in expected]
    assert len(streamed) > count * 0.97
    # audited and read back 1000 mailboxes a statement (the last finds none left), so
    # neither statement nor the memory a batch takes grows with the export
    writes = [s for s in audit_statements if "INSERT INTO credential_reads" in s]
    reads = [s for s in audit_statements if "FROM credential_reads JOIN mailboxes" in s]
    assert len(writes) == len(reads) == -(-len(streamed) // 1000) + 1
    assert all("LIMIT" in s for s in reads)


async def test_an_export_needs_a_filter_or_all(client, two_providers, db):
    refused = await export(client, "csv")
    assert refused.status_code == 422
    assert "all=true" in refused.json()["detail"][0]["msg"]
    assert await db.fetchval("select count(*) from credential_reads") == 0
    assert (await export(client, "csv", all="false")).status_code == 422
    everything = await export(client, "csv", all="true")
    assert everything.status_code == 200 and len(rows(everything)) == 3
    one = await export(client, "csv", subscriptionId=two_providers["subscription"])
    assert one.status_code == 200 and len(rows(one)) == 2


NAMES = [("Müller", "Zoë_50%"), ("Łukasz", "O'Brien_%"), ("Søren", "Ærø")]


@pytest.mark.parametrize("fmt", ["instantly", "smartlead", "emailbison", "csv"])
async def test_a_bom_by_default_none_when_asked_and_names_stay_utf8(client, fmt):
    order = traffic.mailbox_order_success()
    common = {"subscriptionId": order["data"]["subscriptionId"]}
    boxes = [
        traffic.mailbox_created(
            provider=provider, details={"firstName": first, "lastName": last}, **common
        )
        for (first, last), provider in zip(NAMES, ["GOOGLE", "MICROSOFT", "GOOGLE"], strict=True)
    ]
    await delivered(client, order, *boxes)
    with_bom = await export(client, fmt, **common)
    without = await export(client, fmt, bom="false", **common)
    assert with_bom.status_code == without.status_code == 200
    assert with_bom.content.startswith(BOM) and not without.content.startswith(BOM)
    assert with_bom.content == BOM + without.content  # the same file, but for the BOM
    text = with_bom.content.decode("utf-8-sig")
    assert "\ufeff" not in text and "Ã" not in text  # one BOM, nothing encoded twice
    for first, last in NAMES:
        assert first in text and last in text
        assert first in without.content.decode("utf-8")


async def box_without_login(db, subscription_id: str, mailbox_id: str, provider: str | None):
    """A mailbox stored as older deliveries could leave it: no usable login."""
    await db.execute(
        "insert into mailboxes (mailbox_id, subscription_id, domain, email, first_name,"
        " provider, source) values ($1, $2, 'x.test', $3, 'Jürgen', $4, 'standard')",
        mailbox_id,
        subscription_id,
        f"{mailbox_id.encode('ascii', 'ignore').decode()[:20]}@x.test",
        provider,
    )


async def test_mailboxes_that_cannot_log_in_are_left_out_named_and_not_audited(
    client, two_providers, db
):
    subscription = two_providers["subscription"]
    google_without = traffic.mailbox_created(provider="GOOGLE", subscriptionId=subscription)
    del google_without["data"]["mailboxDetails"]["appPassword"]
    microsoft_without = traffic.mailbox_created(provider="MICROSOFT", subscriptionId=subscription)
    del microsoft_without["data"]["mailboxDetails"]["password"]
    unknown = traffic.mailbox_created(provider="YAHOO", subscriptionId=subscription)
    await delivered(client, google_without, microsoft_without, unknown)
    odd_ids = ["50%_off,ü", "a b/c"]  # an ID a header could not carry as it is
    await box_without_login(db, subscription, odd_ids[0], "GOOGLE")
    await box_without_login(db, subscription, odd_ids[1], None)
    # a provider this version does not know, as another version may have stored it
    await box_without_login(db, subscription, "zoho-box", "ZOHO")
    skipped = {
        "zoho-box",
        google_without["data"]["mailboxDetails"]["mailboxId"],
        microsoft_without["data"]["mailboxDetails"]["mailboxId"],
        unknown["data"]["mailboxDetails"]["mailboxId"],
        *odd_ids,
    }
    exportable = {two_providers["google"]["email"], two_providers["microsoft"]["email"]}

    for fmt in ("instantly", "smartlead", "emailbison"):
        before = await db.fetchval("select count(*) from credential_reads")
        response = await export(client, fmt, subscriptionId=subscription)
        assert response.status_code == 200
        # what must change: the six are left out and named, count and IDs
        assert response.headers["x-export-skipped"] == "6"
        named = response.headers["x-export-skipped-mailboxes"].split(",")
        assert {unquote(n) for n in named} == skipped
        assert "canary" not in str(response.headers)  # no credential value in a header
        # what must stay: the others export whole, each with its login and its audit row
        exported = rows(response)
        assert {r.get("Email") or r.get("from_email") for r in exported} == exportable
        assert all(r.get("Password") or r.get("password") or r["IMAP Password"] for r in exported)
        audited = await db.fetch(
            "select m.email from credential_reads r join mailboxes m using (mailbox_id)"
            " order by r.id offset $1",
            before,
        )
        assert {r["email"] for r in audited} == exportable and len(audited) == 2

    # our own CSV carries every field, so it leaves none out (and audits all eight)
    everything = await export(client, "csv", subscriptionId=subscription)
    assert everything.headers["x-export-skipped"] == "0"
    assert "x-export-skipped-mailboxes" not in everything.headers
    ours = {r["mailboxId"]: r for r in rows(everything)}
    assert ours.keys() >= skipped
    servers = ["imapHost", "imapPort", "smtpHost", "smtpPort"]
    for unknown_id in (unknown["data"]["mailboxDetails"]["mailboxId"], odd_ids[1], "zoho-box"):
        assert [ours[unknown_id][c] for c in servers] == ["", "", "", ""]  # none we know
    google = ours[two_providers["google"]["mailboxId"]]
    assert [google[c] for c in servers] == ["imap.gmail.com", "993", "smtp.gmail.com", "587"]


async def test_the_skipped_list_in_the_header_is_bounded(client, db):
    order = traffic.mailbox_order_success()
    subscription = order["data"]["subscriptionId"]
    await delivered(client, order, traffic.mailbox_created(subscriptionId=subscription))
    for i in range(40):
        await box_without_login(db, subscription, f"{i:02d}-" + "ü" * 30, None)
    response = await export(client, "instantly", subscriptionId=subscription)
    assert response.status_code == 200 and len(rows(response)) == 1
    assert response.headers["x-export-skipped"] == "40"
    named = response.headers["x-export-skipped-mailboxes"]
    assert 0 < len(named) <= 1024 and named.count(",") < 20
    assert unquote(named.split(",")[0]) == "00-" + "ü" * 30


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
