"""Renewals as a queue and the customer's page, through the HTTP app: what renews this week
apart from what is overdue or has lapsed, filtered by dates, risk and customer, with a
grand total that never counts an unknown cost as 0; a customer's whole picture on one page."""

import csv
import io
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest

from app.reading import renewals, ui
from app.reading.reader import reader
from app.simulation import traffic
from tests.conftest import CREDENTIALS_TOKEN
from tests.streams import subscription_event
from tests.test_cockpit_api import OPS, delivered, iso, lifecycle, new_subscription
from tests.test_dashboard import sign_in


async def queue(client, **params):
    response = await client.get("/api/v1/renewals", params=params, headers=OPS)
    assert response.status_code == 200, response.text
    return response.json()


def ids(body):
    return [r["subscriptionId"] for r in body["items"]]


async def the_queue(client):
    """One subscription in each part: this week, later, overdue, lapsed?, ended."""
    subs = {}
    for name, ends_in, user in [
        ("week", 3, "USR-A"),
        ("later", 20, "USR-A"),
        ("overdue", -2, "USR-B"),
        ("lapsed", -20, "USR-B"),
    ]:
        subs[name] = (await new_subscription(client, boxes=2, price=10, user=user))[
            "subscriptionId"
        ]
        await lifecycle(client, subs[name], "subscription.updated", ends_in)
    subs["ended"] = (await new_subscription(client, user="USR-B"))["subscriptionId"]
    await lifecycle(client, subs["ended"], "subscription.cancelled", -1)
    return subs


async def test_this_week_stands_apart_from_overdue_and_stale_overdue_is_lapsed(client):
    subs = await the_queue(client)
    everything = await queue(client)  # the API's list is as it was: every part
    assert set(ids(everything)) == set(subs.values())
    due = {r["subscriptionId"]: r["due"] for r in everything["items"]}
    assert due == {
        subs["week"]: "this_week",
        subs["later"]: "later",
        subs["overdue"]: "overdue",
        subs["lapsed"]: "lapsed",
        subs["ended"]: "ended",
    }
    for part in ("this_week", "later", "overdue", "lapsed", "ended"):
        assert set(ids(await queue(client, due=part))) == {
            s for s, d in due.items() if d == part
        }, part
    lapsed = (await queue(client, due="lapsed"))["items"][0]
    assert "overdue" in lapsed["risks"]  # its risk keeps the contract's name
    counts = {k: v["subscriptions"] for k, v in everything["byDue"].items()}
    assert counts == {"this_week": 1, "later": 1, "overdue": 1, "lapsed": 1, "ended": 1}

    await sign_in(client)
    page = (await client.get("/ui/renewals")).text  # the page opens on this week
    assert subs["week"] in page
    assert all(subs[n] not in page for n in ("later", "overdue", "lapsed", "ended"))
    overdue = (await client.get("/ui/renewals", params={"due": "overdue"})).text
    assert subs["overdue"] in overdue and subs["week"] not in overdue
    assert subs["lapsed"] not in overdue
    assert "Lapsed?" in page and "due=lapsed" in page
    assert "Per user" not in page  # the whole list's per-user table is gone from the page


async def test_a_date_range_chooses_by_the_period_end_from_inclusive_before_exclusive(client):
    subs = await the_queue(client)
    everything = {r["subscriptionId"]: r["renewsAt"] for r in (await queue(client))["items"]}
    week_end = everything[subs["week"]]
    on_it = await queue(
        client, renewsFrom=week_end, renewsBefore=iso(datetime.now(UTC) + timedelta(days=10))
    )
    assert ids(on_it) == [subs["week"]]
    just_after = datetime.fromisoformat(week_end) + timedelta(microseconds=1)
    assert ids(await queue(client, renewsFrom=iso(just_after), due="this_week")) == []
    assert ids(await queue(client, renewsBefore=week_end, due="this_week")) == []
    # a range beyond withinDays reaches its end
    far = await new_subscription(client, user="USR-C")
    await lifecycle(client, far["subscriptionId"], "subscription.updated", 100)
    assert far["subscriptionId"] not in ids(await queue(client, limit=500))
    wide = await queue(client, renewsBefore=iso(datetime.now(UTC) + timedelta(days=120)))
    assert far["subscriptionId"] in ids(wide)

    await sign_in(client)
    today = datetime.now(UTC).date()
    page = await client.get(
        "/ui/renewals",
        params={
            "due": "all",
            "renewsFrom": str(today),
            "renewsBefore": str(today + timedelta(days=10)),
        },
    )
    assert subs["week"] in page.text and subs["later"] not in page.text
    assert subs["overdue"] not in page.text
    bad = await client.get("/ui/renewals", params={"renewsFrom": "next week"})
    assert bad.status_code == 422 and "renewsFrom" in bad.text


async def test_risk_and_customer_filters_choose_only_their_rows(client):
    subs = await the_queue(client)
    manual = await new_subscription(client, user="USR-A", price=7)
    await lifecycle(client, manual["subscriptionId"], "subscription.updated", 4, autoRenew=False)
    assert ids(await queue(client, risk="auto_renew_off")) == [manual["subscriptionId"]]
    assert set(ids(await queue(client, risk="overdue"))) == {subs["overdue"], subs["lapsed"]}
    assert set(ids(await queue(client, userId="USR-A"))) == {
        subs["week"],
        subs["later"],
        manual["subscriptionId"],
    }
    assert ids(await queue(client, userId="USR-A", due="this_week", risk="auto_renew_off")) == [
        manual["subscriptionId"]
    ]
    assert ids(await queue(client, userId="USR-Z")) == []
    refused = await client.get("/api/v1/renewals", params={"risk": "unlucky"}, headers=OPS)
    assert refused.status_code == 422

    await sign_in(client)
    page = (await client.get("/ui/renewals", params={"due": "all", "customer": "USR-B"})).text
    assert subs["overdue"] in page and subs["lapsed"] in page
    assert subs["week"] not in page and manual["subscriptionId"] not in page


async def test_each_risk_filter_chooses_exactly_the_renewals_that_name_that_risk(client):
    """A risk filter tests that risk's own condition (not the list of every risk): it must
    choose, page and sum exactly the subscriptions whose risks name it, a domain's risk
    found by its domain's state, a renewal failure by its own or by its domain's; and a
    part of the queue (`due`), tested by its own condition too, exactly those in it."""
    made = {}
    for name, event, ends_in, data, domain_event in [
        ("none", "subscription.updated", 10, {}, None),
        ("past_due", "subscription.renewal.failed", 3, {}, None),
        ("manual", "subscription.updated", 5, {"autoRenew": False}, None),
        ("manual_ended", "subscription.cancelled", -1, {"autoRenew": False}, None),
        ("overdue", "subscription.updated", -2, {}, None),
        ("lapsed", "subscription.updated", -20, {}, None),
        ("later", "subscription.updated", 25, {}, None),
        ("expired", "subscription.expired", -3, {}, None),
        ("grace", "subscription.updated", 12, {}, "domain.grace_period"),
        ("domain_failed", "subscription.updated", 6, {}, "domain.renewal.failed"),
        ("domain_expired", "subscription.updated", 8, {}, "domain.expired"),
    ]:
        made[name] = await new_subscription(client, price=9)
        await lifecycle(client, made[name]["subscriptionId"], event, ends_in, **data)
        if domain_event:
            await delivered(
                client, traffic.envelope(domain_event, {"domainName": made[name]["domainName"]})
            )
    every = (await queue(client, limit=500))["items"]
    assert len(every) == len(made)
    for risk in renewals.RISKS:
        expected = [r["subscriptionId"] for r in every if risk in r["risks"]]
        assert expected, risk  # each risk is held by one subscription at least
        chosen = await queue(client, risk=risk)
        assert ids(chosen) == expected, risk
        assert chosen["total"]["subscriptions"] == len(expected), risk
        assert chosen["total"]["monthlyCost"] == 9 * len(expected), risk
    for due in ("this_week", "later", "overdue", "lapsed", "ended"):  # and each part alike
        expected = [r["subscriptionId"] for r in every if r["due"] == due]
        assert expected, due
        chosen = await queue(client, due=due)
        assert (ids(chosen), chosen["total"]["subscriptions"]) == (expected, len(expected)), due
    # what each risk's condition turns on, as the list shows it
    named = {r["subscriptionId"]: r["risks"] for r in every}
    assert named[made["domain_failed"]["subscriptionId"]] == ["renewal_failed"]
    assert named[made["manual_ended"]["subscriptionId"]] == ["cancelled"]
    assert named[made["none"]["subscriptionId"]] == []


async def test_a_customer_is_found_by_email_in_any_case(client):
    mine = await new_subscription(client, user="USR-M")
    await delivered(
        client,
        traffic.mailbox_order_success(
            subscriptionId=mine["subscriptionId"], userId="USR-M", userEmail="Ops@Agency.example"
        ),
    )
    await lifecycle(client, mine["subscriptionId"], "subscription.updated", 2)
    other = await new_subscription(client, user="USR-N")
    await lifecycle(client, other["subscriptionId"], "subscription.updated", 2)
    assert ids(await queue(client, userEmail="ops@agency.example")) == [mine["subscriptionId"]]
    await sign_in(client)
    page = (await client.get("/ui/renewals", params={"customer": "OPS@agency.example"})).text
    assert mine["subscriptionId"] in page and other["subscriptionId"] not in page


async def test_the_grand_total_names_its_currency_and_leaves_unknown_costs_out(client):
    subs = await the_queue(client)  # this week: 2 mailboxes at 10
    prewarmed = traffic.prewarmup_success(domains=1, per_domain=3)
    await delivered(client, prewarmed)
    unpriced = prewarmed["data"]["mailboxDetails"][0]["subscriptionId"]
    await lifecycle(client, unpriced, "subscription.updated", 1)
    week = await queue(client, due="this_week")
    assert set(ids(week)) == {subs["week"], unpriced}
    assert week["total"] == {
        "subscriptions": 2,
        "mailboxes": 5,
        "monthlyCost": 20,  # not 20 + 0: the unknown one is counted apart
        "unknownCost": 1,
    }
    assert week["currency"] == "USD"
    costs = {r["subscriptionId"]: r["monthlyCost"] for r in week["items"]}
    assert costs == {subs["week"]: 20, unpriced: None}
    only_unknown = await queue(client, due="this_week", userId=prewarmed["data"]["userId"])
    assert only_unknown["total"]["monthlyCost"] is None  # unknown, not 0.00

    await sign_in(client)
    page = (await client.get("/ui/renewals")).text
    total = page.split('id="grand-total"')[1].split("</p>")[0]
    assert "20.00 USD" in total and "plus 1 of unknown cost" in total
    alone = await client.get("/ui/renewals", params={"customer": prewarmed["data"]["userId"]})
    total = alone.text.split('id="grand-total"')[1].split("</p>")[0]
    assert "unknown" in total and "0.00" not in total


async def test_the_queue_downloads_as_the_csv_of_its_filters(client):
    subs = await the_queue(client)
    await sign_in(client)
    page = (await client.get("/ui/renewals", params={"due": "overdue"})).text
    assert 'href="/ui/renewals.csv?due=overdue"' in page
    response = await client.get("/ui/renewals.csv", params={"due": "overdue"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.content.decode("utf-8-sig"))))
    assert [r["subscriptionId"] for r in rows] == [subs["overdue"]]
    assert rows[0]["due"] == "overdue" and rows[0]["currency"] == "USD"
    assert Decimal(rows[0]["monthlyCost"]) == 20
    listed = {r["subscriptionId"] for r in await csv_rows(client)}
    assert listed == set(subs.values())


async def test_a_subscriptions_own_failed_renewal_shows_as_renewal_failed_on_the_page(client):
    failing = await new_subscription(client)
    fine = await new_subscription(client)
    await lifecycle(client, failing["subscriptionId"], "subscription.renewal.failed", 3)
    await lifecycle(client, fine["subscriptionId"], "subscription.updated", 3)
    await sign_in(client)
    page = (await client.get("/ui/renewals")).text
    rows = {
        sub: page.split(sub)[1].split("</tr>")[0]
        for sub in (failing["subscriptionId"], fine["subscriptionId"])
    }
    assert "renewal failed" in rows[failing["subscriptionId"]]
    assert "renewal failed" not in rows[fine["subscriptionId"]]
    chosen = (await client.get("/ui/renewals", params={"risk": "renewal_failed"})).text
    assert failing["subscriptionId"] in chosen and fine["subscriptionId"] not in chosen


async def test_a_customer_page_holds_their_subscriptions_mailboxes_orders_renewals_and_cost(
    client,
):
    mine = [await new_subscription(client, boxes=2, price=p, user="USR-A") for p in (10, 4)]
    theirs = await new_subscription(client, boxes=1, price=99, user="USR-B")
    await lifecycle(client, mine[0]["subscriptionId"], "subscription.updated", 3)
    await sign_in(client)
    response = await client.get("/ui/customers/USR-A")
    assert response.status_code == 200
    page = response.text
    for sub in mine:
        assert sub["subscriptionId"] in page and sub["orderId"] in page
    assert theirs["subscriptionId"] not in page and theirs["orderId"] not in page
    cost = page.split('id="monthly-cost"')[1].split("</dd>")[0]
    assert "28.00 USD" in cost  # 2 x 10 + 2 x 4, not USR-B's 99
    renewals = page.split('id="renewals"')[1].split('id="mailboxes"')[0]
    assert mine[0]["subscriptionId"] in renewals
    assert page.count("/ui/mailboxes/") >= 4  # the four mailboxes, each a link
    assert "Export all this customer" not in page  # an ops session exports nothing
    missing = await client.get("/ui/customers/USR-NOBODY")
    assert missing.status_code == 404 and "No customer" in missing.text


async def test_a_customer_page_shows_the_first_rows_of_each_list_and_links_to_all(
    client, monkeypatch
):
    monkeypatch.setattr(ui, "CUSTOMER_SHOWN", 1)
    mine = [await new_subscription(client, boxes=2, user="USR-A") for _ in range(2)]
    for sub in mine:
        await lifecycle(client, sub["subscriptionId"], "subscription.updated", 3)
    await sign_in(client)
    page = (await client.get("/ui/customers/USR-A")).text
    for part, link in [
        ("renewals", "/ui/renewals?due=all&amp;customer=USR-A"),
        ("mailboxes", "/ui/mailboxes?userId=USR-A"),
        ("subscriptions", "/ui/subscriptions?userId=USR-A"),
        ("orders", "/ui/orders?userId=USR-A"),
    ]:
        shown = page.split(f'id="{part}"')[1].split("<h2")[0]
        total = 4 if part == "mailboxes" else 2
        assert f'href="{link}">All {total} {part}' in shown, part
        assert f"({total}" in shown.split("</h2>")[0], part
    subscriptions = page.split('id="subscriptions"')[1].split("<h2")[0]
    assert sum(s["subscriptionId"] in subscriptions for s in mine) == 1
    orders = page.split('id="orders"')[1]
    assert sum(s["orderId"] in orders for s in mine) == 1
    monkeypatch.setattr(ui, "CUSTOMER_SHOWN", 20)
    whole = (await client.get("/ui/customers/USR-A")).text
    assert "All 2 subscriptions" not in whole and "All 4 mailboxes" not in whole
    assert all(s["subscriptionId"] in whole and s["orderId"] in whole for s in mine)


async def test_every_user_shown_links_to_the_customer_page(client):
    sub = await new_subscription(client, user="USR-A")
    await lifecycle(client, sub["subscriptionId"], "subscription.updated", 3)
    await sign_in(client)
    for path in (
        "/ui/renewals",
        "/ui/orders",
        "/ui/subscriptions",
        f"/ui/orders/{sub['orderId']}",
        f"/ui/subscriptions/{sub['subscriptionId']}",
    ):
        assert 'href="/ui/customers/USR-A"' in (await client.get(path)).text, path


async def test_a_mailbox_search_for_a_customer_finds_them_and_their_mailboxes(client):
    mine = await new_subscription(client, boxes=2, user="USR-Q")
    await delivered(
        client,
        traffic.mailbox_order_success(
            subscriptionId=mine["subscriptionId"], userId="USR-Q", userEmail="quinn@agency.example"
        ),
    )
    other = await new_subscription(client, boxes=1, user="USR-R")
    await sign_in(client)
    for typed in ("quinn@agency", "USR-Q"):
        page = (await client.get("/ui/mailboxes", params={"q": typed})).text
        found = page.split('id="customers-found"')[1].split("</section>")[0]
        assert 'href="/ui/customers/USR-Q"' in found and "2 mailboxes" in found
        theirs = page.split('id="customer-mailboxes"')[1].split("</table>")[0]
        assert theirs.count("/ui/mailboxes/") == 2
        assert other["domainName"] not in theirs
        # the customer's own mailboxes are found: no "No mailbox matches" under them
        assert "No mailbox matches" not in page and 'id="no-own-match"' in page
    nobody = (await client.get("/ui/mailboxes", params={"q": "nobody-at-all"})).text
    assert 'id="customers-found"' not in nobody
    assert "No mailbox matches “nobody-at-all”" in nobody and 'id="no-own-match"' not in nobody


async def test_a_credentials_session_exports_all_of_one_customers_mailboxes(client):
    mine = [await new_subscription(client, boxes=2, user="USR-A") for _ in range(2)]
    await new_subscription(client, boxes=3, user="USR-B")
    await sign_in(client, CREDENTIALS_TOKEN)
    page = (await client.get("/ui/customers/USR-A")).text
    assert "Export all this customer" in page and 'name="userId" value="USR-A"' in page
    response = await client.post(
        "/ui/exports/mailboxes",
        content="userId=USR-A&format=csv",
        headers={
            "content-type": "application/x-www-form-urlencoded",
            "sec-fetch-site": "same-origin",
        },
    )
    assert response.status_code == 200, response.text
    rows = list(csv.DictReader(io.StringIO(response.text.lstrip("\ufeff"))))
    assert len(rows) == 4
    assert {r["subscriptionId"] for r in rows} == {s["subscriptionId"] for s in mine}


async def test_a_date_ranges_totals_count_exactly_its_renewals_whole_days_or_not(client):
    ends = {}
    for days, boxes in [(3.2, 1), (3.7, 2), (5.5, 3), (20, 4)]:
        sub = await new_subscription(client, boxes=boxes, price=10)
        await lifecycle(client, sub["subscriptionId"], "subscription.updated", days)
        ends[sub["subscriptionId"]] = days
    listed = {r["subscriptionId"]: r for r in (await queue(client, limit=500))["items"]}
    at = {sub: datetime.fromisoformat(listed[sub]["renewsAt"]) for sub in ends}
    first, second, third, _ = sorted(at.values())
    midnight = first.replace(hour=0, minute=0, second=0, microsecond=0)
    for start, end in [
        (midnight, midnight + timedelta(days=30)),  # whole days
        (first - timedelta(hours=1), third + timedelta(hours=1)),  # part days at both ends
        (first + timedelta(seconds=1), third),  # the first and third just outside
        (first, first + timedelta(seconds=1)),  # within one day
        (None, second + timedelta(seconds=1)),  # no start
    ]:
        params = {"renewsBefore": iso(end), "limit": 500}
        if start is not None:
            params["renewsFrom"] = iso(start)
        body = await queue(client, **params)
        inside = [s for s in ends if (start is None or at[s] >= start) and at[s] < end]
        assert sorted(ids(body)) == sorted(inside)
        assert body["total"]["subscriptions"] == len(inside), (start, end)
        cost = sum(Decimal(str(listed[s]["monthlyCost"])) for s in inside)
        assert Decimal(str(body["total"]["monthlyCost"])) == cost, (start, end)


async def test_the_csv_holds_what_the_pages_show_read_a_few_rows_a_statement(client, monkeypatch):
    """The download reads the queue CSV_PAGE rows a statement (3 here, over 7 rows): each
    subscription once, in the pages' order, with the cells the API shows, every risk named."""
    monkeypatch.setattr(renewals, "CSV_PAGE", 3)
    for ends_in in (3, -2, 10, 20, 5, 1):
        sub = await new_subscription(client, boxes=2, price=10)
        await lifecycle(
            client, sub["subscriptionId"], "subscription.updated", ends_in, autoRenew=False
        )
    past_due = (await new_subscription(client))["subscriptionId"]  # the order's old end
    await delivered(client, subscription_event("subscription.past_due", past_due))
    items = (await queue(client, limit=500))["items"]
    await sign_in(client)
    rows = await csv_rows(client)
    assert [r["subscriptionId"] for r in rows] == [i["subscriptionId"] for i in items]
    assert len(rows) == 7 and rows[0]["subscriptionId"] == past_due
    for row, item in zip(rows, items, strict=True):
        assert datetime.fromisoformat(row["renewsAt"]) == datetime.fromisoformat(item["renewsAt"])
        assert row["risks"] == " ".join(item["risks"])
        assert (row["due"], row["mailboxCount"]) == (item["due"], str(item["mailboxCount"]))
    assert [r["risks"] for r in rows[:3]] == [
        "past_due",
        "auto_renew_off overdue",
        "auto_renew_off",
    ]


async def test_a_cursor_before_the_calendar_reads_from_the_first_row_and_one_after_reads_none(
    client,
):
    """Every cursor the pattern allows is valid: one before year 1 (beyond the calendar)
    stands before every row, so its page is the queue's first; one in year 5138, after every
    end, has nothing after it."""
    subs = await the_queue(client)
    first = await queue(client, limit=500)
    assert sorted(ids(first)) == sorted(subs.values())
    before = await queue(client, cursor="-99999999999999999-0", limit=500)
    assert ids(before) == ids(first)
    assert ids(await queue(client, cursor="99999999999999999-0", limit=500)) == []


async def test_a_page_ending_on_the_queues_last_row_says_there_is_no_next_page(client):
    subs = await the_queue(client)  # five on the queue
    for limit, more in [(4, True), (5, False), (6, False)]:
        body = await queue(client, limit=limit)
        assert len(body["items"]) == min(limit, len(subs)), limit
        assert (body["nextCursor"] is not None) is more, limit
    rest = await queue(client, limit=4, cursor=(await queue(client, limit=4))["nextCursor"])
    assert (len(rest["items"]), rest["nextCursor"]) == (1, None)


async def csv_rows(client, **params):
    response = await client.get("/ui/renewals.csv", params={"due": "all", **params})
    assert response.status_code == 200, response.text
    return list(csv.DictReader(io.StringIO(response.content.decode("utf-8-sig"))))


async def ordered(client, ends_at, *, boxes=1, price=10, **data):
    """A subscription ordered with this end (its expiryDate), for `boxes` at `price` each."""
    order = traffic.mailbox_order_success(
        expiryDate=ends_at if ends_at is None else iso(ends_at), quantity=boxes, price=price, **data
    )
    await delivered(client, order)
    return order["data"]["subscriptionId"]


async def test_a_zero_end_date_leads_the_queue_and_its_csv_from_the_first_row_recorded(
    client,
):
    """A sender's unset date (0001-01-01T00:00:00Z, the zero time of Go and C#) on the first
    subscription recorded, and one a microsecond later: both lapsed, at the head of the
    queue and of its download, which start before the calendar's first instant and before
    the first row recorded there; the grand total counts them."""
    zero = traffic.mailbox_order_success(expiryDate="0001-01-01T00:00:00Z")
    await delivered(client, zero)  # the first subscription recorded
    tick = traffic.mailbox_order_success(expiryDate="0001-01-01T00:00:00.000001Z")
    await delivered(client, tick)
    soon = await new_subscription(client)
    await lifecycle(client, soon["subscriptionId"], "subscription.updated", 3)
    head = [zero["data"]["subscriptionId"], tick["data"]["subscriptionId"]]

    body = await queue(client)
    assert ids(body) == [*head, soon["subscriptionId"]]
    assert [r["due"] for r in body["items"]] == ["lapsed", "lapsed", "this_week"]
    assert body["total"]["subscriptions"] == 3
    assert ids(await queue(client, due="lapsed")) == head
    await sign_in(client)
    rows = await csv_rows(client)
    assert [r["subscriptionId"] for r in rows] == ids(body)
    assert [r["due"] for r in rows] == ["lapsed", "lapsed", "this_week"]


async def test_a_page_that_ends_on_a_zero_end_date_goes_on_and_shows_it_in_utc(client):
    """A page whose last row is a sender's unset date (stored as -infinity, read back
    without an offset) gives a cursor that leads to the next row, not a 500; the date is
    shown in UTC like every other, in the API and in the download."""
    zero = traffic.mailbox_order_success(expiryDate="0001-01-01T00:00:00Z")
    await delivered(client, zero)
    soon = await new_subscription(client)
    await lifecycle(client, soon["subscriptionId"], "subscription.updated", 3)

    first = await queue(client, limit=1)
    assert ids(first) == [zero["data"]["subscriptionId"]]
    assert first["items"][0]["renewsAt"] == "0001-01-01T00:00:00Z"
    second = await queue(client, limit=1, cursor=first["nextCursor"])
    assert ids(second) == [soon["subscriptionId"]]
    assert second["items"][0]["renewsAt"].endswith("Z")
    await sign_in(client)
    rows = await csv_rows(client)
    assert [r["renewsAt"] for r in rows][0] == "0001-01-01T00:00:00+00:00"
    assert [r["subscriptionId"] for r in rows] == [*ids(first), *ids(second)]


async def test_the_csv_keeps_every_row_that_shares_an_end_across_its_statements(
    client, monkeypatch
):
    """Subscriptions ordered together end at the same instant; read CSV_PAGE (2) rows a
    statement, the download still holds each of them once, in the queue's order."""
    monkeypatch.setattr(renewals, "CSV_PAGE", 2)
    together = datetime.now(UTC).replace(microsecond=0) + timedelta(days=5)
    made = {await ordered(client, together) for _ in range(5)}
    later = await ordered(client, together + timedelta(days=1))
    items = (await queue(client))["items"]
    assert {i["subscriptionId"] for i in items} == made | {later}
    await sign_in(client)
    rows = await csv_rows(client)
    assert [r["subscriptionId"] for r in rows] == [i["subscriptionId"] for i in items]
    assert len(rows) == 6 and rows[-1]["subscriptionId"] == later


async def test_the_csv_leaves_an_unknown_end_or_cost_empty_and_neutralises_a_formula(client):
    """An undated subscription (PAST_DUE, no end known) has an empty renewsAt; an unpriced
    one an empty price and monthlyCost (never 0 or a placeholder); a customer's email that
    a spreadsheet would run as a formula arrives as text."""
    undated = await ordered(client, None)
    await delivered(client, subscription_event("subscription.past_due", undated))
    unpriced = await ordered(client, datetime.now(UTC) + timedelta(days=2), price=None)
    formula = await ordered(
        client, datetime.now(UTC) + timedelta(days=4), boxes=2, userEmail="=1+2@agency.example"
    )
    await sign_in(client)
    rows = {r["subscriptionId"]: r for r in await csv_rows(client)}
    assert list(rows) == [undated, unpriced, formula]
    assert (rows[undated]["renewsAt"], rows[undated]["due"]) == ("", "undated")
    assert rows[undated]["subscriptionStatus"] == "PAST_DUE"
    assert (rows[unpriced]["price"], rows[unpriced]["monthlyCost"]) == ("", "")
    assert rows[unpriced]["subscriptionStatus"] == ""  # no lifecycle event heard
    assert datetime.fromisoformat(rows[unpriced]["renewsAt"]) > datetime.now(UTC)
    assert rows[formula]["userEmail"] == "'=1+2@agency.example"
    assert Decimal(rows[formula]["monthlyCost"]) == 20


@pytest.fixture
def server_zone(monkeypatch):
    """The server's own time zone (TZ), set for one test and put back after it."""

    def use(zone: str) -> None:
        monkeypatch.setenv("TZ", zone)
        time.tzset()

    yield use
    monkeypatch.undo()
    time.tzset()


async def test_a_date_ranges_days_are_utc_days_whatever_the_servers_time_zone(client, server_zone):
    """A range's sums take its whole days from the sums per UTC day: on a server whose own
    zone is India's (+05:30, midnight at 18:30 UTC), the part days at the range's ends are
    still cut at UTC midnight, so no renewal is counted twice or left out."""
    server_zone("Asia/Kolkata")
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=3)
    for at, boxes in [
        (day - timedelta(hours=3), 1),  # 21:00 UTC the day before: within the first part day
        (day + timedelta(hours=2), 2),  # within a whole day
        (day + timedelta(days=1, hours=20), 4),  # 20:00 UTC: within the last whole day
        (day + timedelta(days=2, hours=13), 8),  # after the range
    ]:
        await ordered(client, at, boxes=boxes)
    start, end = day - timedelta(hours=12), day + timedelta(days=2, hours=12)
    body = await queue(client, renewsFrom=iso(start), renewsBefore=iso(end))
    assert len(body["items"]) == 3
    assert (body["total"]["subscriptions"], body["total"]["mailboxes"]) == (3, 7)
    assert body["total"]["monthlyCost"] == 70


async def test_an_empty_list_costs_nothing_rather_than_an_unknown_amount(client):
    """A part of the queue with no subscription in it (and a customer with nothing on the
    list) sums to 0.00, not "unknown": unknown is for subscriptions without a price."""
    subs = await the_queue(client)  # nothing in "no end date"
    empty = await queue(client, due="undated")
    assert empty["items"] == []
    assert empty["total"] == {
        "subscriptions": 0,
        "mailboxes": 0,
        "monthlyCost": 0,
        "unknownCost": 0,
    }
    assert (await queue(client, due="this_week"))["total"]["monthlyCost"] == 20
    await sign_in(client)
    page = (await client.get("/ui/renewals", params={"due": "undated"})).text
    total = page.split('id="grand-total"')[1].split("</p>")[0]
    assert "0.00 USD" in total and "unknown" not in total
    later = await new_subscription(client, boxes=1, price=5, user="USR-LATER")
    await lifecycle(client, later["subscriptionId"], "subscription.updated", 45)  # off the list
    customer = (await client.get("/ui/customers/USR-LATER")).text
    heading = customer.split('id="renewals"')[1].split("</h2>")[0]
    assert "0 on the list: 0.00 USD a month" in heading and "unknown" not in heading
    assert subs["week"] not in customer


async def a_fixed_queue(client):
    """Six subscriptions whose every cell is given: a zero end date on an expired domain
    (known by ID), an undated PAST_DUE one, a name beyond ASCII, an unpriced one on a domain
    in its grace period (known by name) whose email reads as a formula, one billed for its
    stored mailboxes (no quantity known) whose name expired under an earlier domain ID and
    was registered again, a cancelled one."""

    def domain(event, **data):
        return traffic.envelope(event, data)

    async def order(n, ends_at, **data):
        given = {
            "subscriptionId": f"SUB-CSV-{n}",
            "orderId": f"ORD-CSV-{n}",
            "domainId": f"DOM-CSV-{n}",
            "domainName": f"csv{n}.example",
            "userId": "USR-CSV",
            "userEmail": "ops@agency.example",
            "expiryDate": ends_at,
            "price": 11,
            "quantity": 3,
        }
        await delivered(client, traffic.mailbox_order_success(**(given | data)))
        return given | data

    def boxes(sub, n):
        return [
            traffic.mailbox_created(
                subscriptionId=sub["subscriptionId"], domain=sub["domainName"], userId="USR-CSV"
            )
            for _ in range(n)
        ]

    await order(1, "0001-01-01T00:00:00Z")
    await delivered(
        client, domain("domain.expired", domainId="DOM-CSV-1", expiryDate="2039-01-01T00:00:00Z")
    )
    await order(2, None)
    await delivered(client, subscription_event("subscription.past_due", "SUB-CSV-2"))
    muller = await order(
        3, "2040-01-02T03:04:05.123456Z", price=12.5, quantity=2, userEmail="müller@agency.example"
    )
    await delivered(client, *boxes(muller, 2))
    await delivered(
        client,
        subscription_event(
            "subscription.updated",
            "SUB-CSV-3",
            periodStart="2039-12-02T03:04:05.123456Z",
            periodEnd="2040-01-02T03:04:05.123456Z",
            autoRenew=False,
        ),
    )
    await order(4, "2040-02-01T00:00:00Z", price=None, userEmail="=1+2@agency.example")
    await delivered(
        client,
        subscription_event(
            "subscription.updated",
            "SUB-CSV-4",
            periodStart="2040-01-01T00:00:00Z",
            periodEnd="2040-02-01T00:00:00Z",
            autoRenew=False,
        ),
    )
    await delivered(client, traffic.envelope("domain.grace_period", {"domainName": "csv4.example"}))
    stored = await order(5, "2040-03-01T12:00:00Z", price=9, quantity=None)
    await delivered(client, *boxes(stored, 3))
    await delivered(
        client,
        domain(
            "domain.expired",
            domainId="DOM-OLD-5",
            domainName="csv5.example",
            expiryDate="2039-01-01T00:00:00Z",
        ),
        domain(
            "domain.renewal.success",
            domainId="DOM-CSV-5",
            domainName="csv5.example",
            expiryDate="2041-01-01T00:00:00Z",
        ),
    )
    await order(6, "2040-04-01T00:00:00Z")
    await delivered(
        client,
        subscription_event(
            "subscription.cancelled",
            "SUB-CSV-6",
            periodStart="2040-03-01T00:00:00Z",
            periodEnd="2040-04-01T00:00:00Z",
        ),
    )


async def test_the_csv_holds_these_exact_bytes_whatever_its_statements_size(client, monkeypatch):
    """The download of a known queue, byte for byte, read in one statement or two rows a
    statement: a UTF-8 BOM (without it Excel shows "müller" as "mÃ¼ller"), then the rows as
    they were before the download read only its own cells."""
    await a_fixed_queue(client)
    await sign_in(client)
    params = {"due": "all", "renewsBefore": "2041-01-01T00:00:00Z"}
    whole = await client.get("/ui/renewals.csv", params=params)
    monkeypatch.setattr(renewals, "CSV_PAGE", 2)
    sizes = statement_sizes(monkeypatch)
    in_twos = await client.get("/ui/renewals.csv", params=params)
    assert whole.content == in_twos.content == BOM + FIXED_CSV
    assert sizes == [2, 2, 2, 0]  # never the whole queue in memory at once
    text = whole.content.decode("utf-8-sig")
    assert "\ufeff" not in text and "müller@agency.example" in text  # one BOM, UTF-8


def statement_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows each statement of the dashboard's reads returns, from here on."""
    sizes: list[int] = []

    class Counted:
        def __init__(self, conn: Any) -> None:
            self.conn = conn

        async def execute(self, statement: Any) -> Any:
            rows = (await self.conn.execute(statement)).all()
            sizes.append(len(rows))
            return SimpleNamespace(all=lambda: rows)

    monkeypatch.setattr(ui, "reader", lambda request: Counted(reader(request)))
    return sizes


BOM = b"\xef\xbb\xbf"
FIXED_CSV = (
    b"renewsAt,due,risks,domain,subscriptionId,userId,userEmail,subscriptionStatus,"
    b"mailboxCount,quantity,price,monthlyCost,currency\r\n"
    b"0001-01-01T00:00:00+00:00,lapsed,domain_expired overdue,csv1.example,SUB-CSV-1,USR-CSV,"
    b"ops@agency.example,,0,3,11.0000,33.0000,USD\r\n"
    b",undated,past_due,csv2.example,SUB-CSV-2,USR-CSV,ops@agency.example,PAST_DUE,0,3,"
    b"11.0000,33.0000,USD\r\n"
    b"2040-01-02T03:04:05.123456+00:00,later,auto_renew_off,csv3.example,SUB-CSV-3,USR-CSV,"
    b"m\xc3\xbcller@agency.example,,2,2,12.5000,25.0000,USD\r\n"
    b"2040-02-01T00:00:00+00:00,later,auto_renew_off domain_grace_period,csv4.example,"
    b"SUB-CSV-4,USR-CSV,'=1+2@agency.example,,0,3,,,USD\r\n"
    b"2040-03-01T12:00:00+00:00,later,,csv5.example,SUB-CSV-5,USR-CSV,ops@agency.example,,3,,"
    b"9.0000,27.0000,USD\r\n"
    b"2040-04-01T00:00:00+00:00,ended,cancelled,csv6.example,SUB-CSV-6,USR-CSV,"
    b"ops@agency.example,CANCELLED,0,3,11.0000,33.0000,USD\r\n"
)
