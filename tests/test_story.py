"""`simulate`'s default story, delivered through the real app: what the dashboard will show
is there, dated around today, whoever runs it and whenever."""

from datetime import UTC, datetime, timedelta

from app.simulation.simulate import whole_orders
from app.simulation.story import story
from tests.conftest import OPS_TOKEN, deliver

HEADERS = {"Authorization": f"Bearer {OPS_TOKEN}"}


async def test_the_story_shows_renewals_at_risk_failed_orders_and_mailbox_work(client):
    today = datetime.now(UTC)  # the renewals are read against the database's today
    agencies = story(today)
    for agency in agencies:
        for payload in agency.sent:
            assert (await deliver(client, payload)).status_code == 200
    renewals = (await client.get("/api/v1/renewals?withinDays=30", headers=HEADERS)).json()
    risks = {item["domain"]: set(item["risks"]) for item in renewals["items"]}
    assert risks["brightline-mail.com"] == {"past_due", "renewal_failed", "domain_grace_period"}
    assert risks["trysummit.io"] == {"past_due"}
    assert risks["summitsales-team.com"] == {"auto_renew_off"}
    assert risks["kestrelmail.co"] == {"renewal_failed", "cancelled"}
    renewing = [i for i in renewals["items"] if i["subscriptionStatus"] == "RENEWING"]
    assert [i["domain"] for i in renewing] == ["northwind-mail.com"]
    ends = [datetime.fromisoformat(i["renewsAt"]) for i in renewals["items"]]
    assert min(ends) < today < max(ends) <= today + timedelta(days=30)  # straddling today
    assert len(renewals["totals"]) == 4  # four agencies have something to renew

    orders = (await client.get("/api/v1/orders?limit=100", headers=HEADERS)).json()["items"]
    outcomes = sorted((o["kind"], o["status"]) for o in orders if o["status"] != "succeeded")
    assert outcomes == [
        ("mailbox", "failed"),
        ("prewarmup", "failed"),
        ("prewarmup", "partially_failed"),
    ]
    reasons = {d["reason"] for o in orders for d in o["domains"] if d["status"] == "failed"}
    assert reasons == {"Domain not verified", "Pre-warmed mailboxes not available"}

    mailboxes = (await client.get("/api/v1/mailboxes?limit=500", headers=HEADERS)).json()
    by_domain: dict[str, set[str]] = {}
    for box in mailboxes["items"]:
        by_domain.setdefault(box["domain"], set()).add(box["provider"])
    assert all(len(providers) == 1 for providers in by_domain.values())  # never shared
    assert {"GOOGLE", "MICROSOFT"} == set().union(*by_domain.values())
    assert {b["warmupStatus"] for b in mailboxes["items"]} >= {"started", "removed"}
    assert any(b["exportedAt"] for b in mailboxes["items"])
    users = {b["userId"] for b in mailboxes["items"]}
    assert len(users) == len(agencies)  # named customers, not one johndoe


def test_every_agency_sends_whole_orders_only_with_its_own_names():
    agencies = story()
    emails = {agency.email for agency in agencies}
    assert len(emails) == len(agencies) and "johndoe@company.com" not in emails
    for agency in agencies:
        events = [payload["event"] for payload in agency.sent]
        # every mailbox.created follows the order that made it
        for index, event in enumerate(events):
            if event == "mailbox.created":
                assert "mailbox.order.success" in events[:index]


def test_load_stops_at_a_whole_order_never_inside_one():
    orders = iter([[b"a1", b"a2", b"a3"], [b"b1", b"b2"], [b"c1"], [b"d1", b"d2"]])
    sent = list(whole_orders(orders, 4, None))
    assert sent == [[b"a1", b"a2", b"a3"], [b"b1", b"b2"]]  # 5: the second order kept whole
