"""The dashboard's day-to-day views through the HTTP app: the overview's "right now" strip,
incomplete orders, the failed-domains view and its CSV, an order known only from its
mailboxes, the events page's summary, search and time range, and the delivery charts."""

import csv
import html
import io
import re
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import httpx

from app.reading import renewals
from app.reading.queries import event_search, failed_domains
from app.simulation import traffic
from tests.conftest import app_client, deliver, make_settings
from tests.test_dashboard import sign_in


def tile(page: str, name: str) -> tuple[str, str, str]:
    """(state, its label, figure) of the strip's tile `name`."""
    found = re.search(
        rf'<li class="tile state-(\w+)" data-tile="{name}">.*?'
        r'<span class="state-label">([^<]+)</span>\s*<span class="tile-figure">(.*?)</span>',
        page,
        re.S,
    )
    assert found, f"no tile {name}"
    state, label, figure = found.groups()
    return state, label, re.sub(r"<[^>]+>", "", figure).strip()


async def ok(client: httpx.AsyncClient, payload: Any, **kwargs: Any) -> None:
    response = await deliver(client, payload, **kwargs)
    assert response.status_code == 200, response.text


async def short_order(client: httpx.AsyncClient) -> dict[str, str]:
    """A mailbox order for 3 mailboxes of which 2 arrived."""
    order = traffic.mailbox_order_success(quantity=3)
    data = order["data"]
    await ok(client, order)
    for _ in range(2):
        await ok(
            client,
            traffic.mailbox_created(
                domain=data["domainName"],
                subscriptionId=data["subscriptionId"],
                orderId=data["orderId"],
            ),
        )
    return {"order_id": data["orderId"], "domain": data["domainName"]}


async def test_the_strip_says_what_needs_a_look_in_words_and_colour(client, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(renewals, "time", clock)
    await sign_in(client)
    calm = (await client.get("/ui")).text
    assert calm.index('aria-label="Right now"') < calm.index("Renewals in the next")
    for name in ("Rejected", "Conflicts", "Incomplete orders", "Spool"):
        assert tile(calm, name)[:2] == ("ok", "OK"), name
    assert tile(calm, "Database")[0] == "ok"
    assert tile(calm, "Last reconcile") == ("off", "Off", "not configured")
    refused = int(tile(calm, "Signature failures")[2])  # since the process started

    short = await short_order(client)
    await deliver(client, b'{"event": "mailbox.created", "eventId": "broken", "data": 7}')
    forged = traffic.mailbox_created()
    unsigned = await deliver(client, forged, signing_key="not-the-sender-key-at-all-0000")
    assert unsigned.status_code == 401  # refused, stored nowhere: counted all the same
    first = traffic.mailbox_created()
    await ok(client, first)
    reused = traffic.mailbox_created()
    reused["eventId"] = first["eventId"]
    await ok(client, reused)

    clock.now += renewals.STALE_SECONDS  # the incomplete orders' count kept too long: anew
    busy = (await client.get("/ui")).text
    assert tile(busy, "Incomplete orders") == ("warn", "Check", "1")
    assert tile(busy, "Rejected") == ("warn", "Check", "1")
    assert tile(busy, "Conflicts") == ("warn", "Check", "1")
    assert tile(busy, "Signature failures") == ("bad", "Act now", str(refused + 1))
    assert "since your last visit" in busy  # the first visit set the mark
    again = (await client.get("/ui")).text
    assert tile(again, "Rejected") == ("ok", "OK", "0")  # seen now: nothing new
    assert "(1 in all)" in again
    incomplete = (await client.get("/ui/incomplete-orders")).text
    assert short["order_id"] in incomplete and "2 of 3 mailboxes" in incomplete


async def test_incomplete_orders_are_counted_once_a_minute_and_say_when(client, monkeypatch):
    """The overview and the orders page show the count of a minute ago at most, and say
    when it was taken; past the minute the next view counts them again; the incomplete
    orders' own page counts them now."""
    clock = Clock()
    monkeypatch.setattr(renewals, "time", clock)
    await sign_in(client)
    calm = (await client.get("/ui")).text
    assert tile(calm, "Incomplete orders") == ("ok", "OK", "0")
    assert "last 2 days; counted just now" in calm
    short = await short_order(client)

    kept = (await client.get("/ui")).text
    assert tile(kept, "Incomplete orders") == ("ok", "OK", "0")
    assert "Short of their mailboxes" not in (await client.get("/ui/orders")).text
    now = (await client.get("/ui/incomplete-orders")).text
    assert short["order_id"] in now and "2 of 3 mailboxes" in now

    clock.now += renewals.FRESH_SECONDS  # the minute is over: counted again as it is shown
    assert tile((await client.get("/ui")).text, "Incomplete orders")[2] == "0"
    await kept_counts(client).settled()
    counted = (await client.get("/ui")).text
    assert tile(counted, "Incomplete orders") == ("warn", "Check", "1")
    orders_page = (await client.get("/ui/orders")).text
    assert "Short of their mailboxes: 1" in orders_page and "Counted <time" in orders_page
    assert "2 of 3 mailboxes" in orders_page


class Clock:
    """time.monotonic of the kept counts (renewals.KeptValues), moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def kept_counts(client: httpx.AsyncClient) -> renewals.KeptValues:
    """The app's own (the client's transport is the app's)."""
    app = cast(httpx.ASGITransport, client._transport).app
    return cast(renewals.KeptValues, app.state.kept_counts)  # type: ignore[attr-defined]


async def test_the_reconcile_tile_is_neutral_where_reconcile_is_not_set_up(
    client, database_url, db
):
    await sign_in(client)
    local = (await client.get("/ui")).text  # no CMR_API_KEY, as a local service runs
    assert tile(local, "Last reconcile") == ("off", "Off", "not configured")
    assert "no CMR_API_KEY" in local

    configured = make_settings(database_url, cmr_api_key="cmr-test-key-0001")
    async with app_client(configured) as other:
        await sign_in(other)
        never = (await other.get("/ui")).text
        assert tile(never, "Last reconcile") == ("warn", "Check", "never")
        assert "no CMR_API_KEY" not in never
        await db.execute("INSERT INTO reconciliations (ran_at, report) VALUES ($1, '{}')", STALE)
        assert tile((await other.get("/ui")).text, "Last reconcile")[:2] == ("bad", "Act now")
        assert tile((await client.get("/ui")).text, "Last reconcile")[:2] == ("off", "Off")
        await db.execute("INSERT INTO reconciliations (report) VALUES ('{}')")
        assert tile((await other.get("/ui")).text, "Last reconcile")[:2] == ("ok", "OK")


STALE = datetime.now(UTC) - timedelta(days=8)


async def test_orders_flag_an_order_short_of_its_mailboxes_and_only_that_one(client):
    short = await short_order(client)
    whole = traffic.mailbox_order_success(quantity=1)
    await ok(client, whole)
    await ok(
        client,
        traffic.mailbox_created(
            domain=whole["data"]["domainName"],
            subscriptionId=whole["data"]["subscriptionId"],
            orderId=whole["data"]["orderId"],
        ),
    )
    await sign_in(client)
    page = (await client.get("/ui/orders")).text
    assert page.index('class="filters"') < page.index("<table")  # the form comes first
    row = row_of(all_orders(page), short["order_id"])
    assert "2 of 3 mailboxes" in row and "incomplete" in row
    other = row_of(all_orders(page), whole["data"]["orderId"])
    assert "incomplete" not in other and "1 of 1 mailboxes" in other


def all_orders(page: str) -> str:
    return page.split("<h2>All orders</h2>")[1]


def row_of(page: str, needle: str) -> str:
    return next(row for row in page.split("<tr>") if needle in row)


async def test_orders_take_a_date_range(client):
    order = traffic.mailbox_order_success()
    await ok(client, order)
    await sign_in(client)
    today = datetime.now(UTC).date()
    hit = await client.get("/ui/orders", params={"from": str(today), "to": str(today)})
    assert hit.status_code == 200 and order["data"]["orderId"] in all_orders(hit.text)
    yesterday = today - timedelta(days=1)
    miss = await client.get("/ui/orders", params={"to": str(yesterday)})
    assert miss.status_code == 200 and order["data"]["orderId"] not in all_orders(miss.text)
    bad = await client.get("/ui/orders", params={"from": str(today), "to": str(yesterday)})
    assert bad.status_code == 422 and "before" in bad.text


async def test_an_order_known_only_from_its_mailboxes_has_a_page(client):
    box = traffic.mailbox_created()
    await ok(client, box)
    await sign_in(client)
    page = await client.get(f"/ui/orders/{box['data']['orderId']}")
    assert page.status_code == 200
    assert box["data"]["mailboxDetails"]["email"] in page.text
    assert "known only from its mailboxes" in page.text
    assert (await client.get("/ui/orders/no-such-order")).status_code == 404


async def failures(client: httpx.AsyncClient) -> dict[str, Any]:
    prewarm = traffic.prewarmup_success(domains=2, per_domain=1)
    order_id = prewarm["data"]["orderId"]
    broken = prewarm["data"]["mailboxDetails"][1]["domain"]
    prewarm["data"]["mailboxDetails"] = prewarm["data"]["mailboxDetails"][:1]
    await ok(client, prewarm)
    reason = "=HYPERLINK(DNS not verified)"
    await ok(client, traffic.prewarmup_failed(order_id=order_id, failures={broken: reason}))
    refused = traffic.mailbox_order_failed(domain="standard-order.com")
    await ok(client, refused)
    whole = traffic.envelope(
        "prewarmup.order.failed",
        {"orderId": "WHOLE-ORDER-1", "serviceProvider": "GOOGLE", "reason": "Insufficient wallet"},
    )
    await ok(client, whole)
    return {"order_id": order_id, "domain": broken, "reason": reason, "prewarm": prewarm}


async def test_failed_domains_say_which_when_why_and_for_whom(client):
    found = await failures(client)
    await sign_in(client)
    page = await client.get("/ui/failed-domains", params={"kind": "prewarmup"})
    assert page.status_code == 200
    table = page.text.split('id="failed-domains"')[1]
    assert found["domain"] in table and "HYPERLINK(DNS not verified)" in table
    assert f"/ui/orders/{found['order_id']}" in table
    assert found["prewarm"]["data"]["userEmail"] in table
    assert "standard-order.com" not in table  # a mailbox order's failure is not prewarmup
    whole = row_of(table, "WHOLE-ORDER-1")  # failed as a whole, naming no domain
    assert "Insufficient wallet" in whole and "the whole order" in whole
    assert "standard-order.com" in (await client.get("/ui/failed-domains")).text
    yesterday = str(datetime.now(UTC).date() - timedelta(days=1))
    before = await client.get("/ui/failed-domains", params={"from": yesterday, "to": yesterday})
    assert found["domain"] not in before.text and "No domain failed" in before.text
    assert "WHOLE-ORDER-1" not in before.text

    download = await client.get("/ui/failed-domains.csv", params={"kind": "prewarmup"})
    assert download.status_code == 200 and download.headers["content-type"].startswith("text/csv")
    assert download.text.startswith("\ufeff")
    rows = list(csv.DictReader(io.StringIO(download.text.lstrip("\ufeff"))))
    by_order = {r["order_id"]: r for r in rows}
    assert set(by_order) == {found["order_id"], "WHOLE-ORDER-1"}
    domain = by_order[found["order_id"]]
    assert domain["domain"] == found["domain"] and domain["kind"] == "prewarmup"
    assert domain["reason"] == "'" + found["reason"]  # a formula stays text
    assert by_order["WHOLE-ORDER-1"]["reason"] == "Insufficient wallet"
    assert (await client.get("/ui/failed-domains", params={"from": "yesterday"})).status_code == 422


async def test_the_failed_domains_csv_holds_every_row_latest_first_across_its_chunks(
    client, monkeypatch
):
    """The CSV is read a few rows a statement: every failed domain comes once, the latest
    first, with the orders failed as a whole in their place among them; at most CSV_ROWS."""
    monkeypatch.setattr(failed_domains, "CSV_CHUNK", 2)
    delivered = []  # (order_id, domain or "") in the order they failed
    for n in range(7):
        if n in (1, 4):
            order_id = f"WHOLE-{n}"
            failed = traffic.envelope(
                "prewarmup.order.failed",
                {"orderId": order_id, "serviceProvider": "GOOGLE", "reason": f"Wallet {n}"},
            )
            delivered.append((order_id, ""))
        else:
            user = "USR-CSV" if n in (0, 3, 5) else f"USR-{n}"
            failed = traffic.mailbox_order_failed(domain=f"failed-{n}.com", userId=user)
            delivered.append((failed["data"]["orderId"], f"failed-{n}.com"))
        await ok(client, failed)  # one at a time: each fails at a later time
    await sign_in(client)

    async def downloaded(**params: str) -> list[tuple[str, str]]:
        response = await client.get("/ui/failed-domains.csv", params=params)
        assert response.status_code == 200
        assert response.text.startswith("\ufeff")
        rows = csv.DictReader(io.StringIO(response.text.lstrip("\ufeff")))
        return [(row["order_id"], row["domain"]) for row in rows]

    assert await downloaded() == delivered[::-1]
    assert await downloaded(kind="mailbox") == [d for d in delivered[::-1] if d[1]]
    customer = [delivered[n] for n in (5, 3, 0)]  # a customer's: their orders joined as a whole
    assert await downloaded(userId="USR-CSV") == customer
    monkeypatch.setattr(failed_domains, "CSV_ROWS", 4)
    assert await downloaded() == delivered[::-1][:4]


async def test_events_say_what_they_are_about_and_search_the_redacted_payload(client):
    box = traffic.mailbox_created(domain="searchable-domain.com")
    other = traffic.mailbox_created(domain="elsewhere-domain.com")
    await ok(client, box)
    await ok(client, other)
    await sign_in(client)
    page = (await client.get("/ui/events")).text
    row = row_of(page, box["eventId"])
    assert "searchable-domain.com" in row and box["data"]["orderId"] in row
    assert box["data"]["userEmail"] in row

    hit = (await client.get("/ui/events", params={"q": "searchable-domain"})).text
    assert box["eventId"] in hit and other["eventId"] not in hit
    assert "a search without a start covers the 6 hours before its end" in hit
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    started = (
        await client.get("/ui/events", params={"q": "searchable-domain", "since": hour_ago})
    ).text
    assert box["eventId"] in started and 'id="search-window"' not in started
    secret = box["data"]["mailboxDetails"]["appPassword"]
    for q in (secret, secret[7:20]):  # the credential itself, and a piece of it
        miss = await client.get("/ui/events", params={"q": q})
        assert miss.status_code == 200 and box["eventId"] not in miss.text
        assert secret not in miss.text.split("<table")[1]  # only the search, as typed
        assert "No events." in miss.text
    assert (await client.get("/ui/events", params={"q": "a"})).status_code == 422


async def spaced_events(
    client: httpx.AsyncClient, db: Any, domains: list[str]
) -> list[dict[str, Any]]:
    """Events about `domains`, oldest first, received a minute apart over the last hour."""
    sent = [traffic.mailbox_created(domain=domain) for domain in domains]
    for event in sent:
        await ok(client, event)
    start = datetime.now(UTC) - timedelta(minutes=50)
    for n, event in enumerate(sent):
        at = start + timedelta(minutes=n)
        await db.execute(
            "UPDATE events SET first_received_at = $1 WHERE event_id = $2", at, event["eventId"]
        )
        event["received"] = at
    return sent


def listed_ids(page: str) -> list[str]:
    """The eventIds of the page's table, top to bottom (the column after "About")."""
    rows = page.split("<tbody>")[1].split("</tbody>")[0].split('<td class="about">')[1:]
    return [re.findall(r"<code>([^<]+)</code>", row.split("</td>", 1)[1])[0] for row in rows]


async def walk_search(client: httpx.AsyncClient, url: str) -> list[tuple[list[str], str]]:
    """Each page's eventIds and its "searched to" notice (empty when it has none), following
    the page's link on to the end."""
    pages: list[tuple[list[str], str]] = []
    while url:
        page = (await client.get(url)).text
        notice = re.search(r'<p class="attention" id="searched-to">(.*?)</p>', page, re.S)
        pages.append((listed_ids(page), notice.group(1) if notice else ""))
        more = re.search(r'<a href="([^"]+)">Next page →</a>', page)
        url = html.unescape(more.group(1)) if more else ""
        assert len(pages) < 20
    return pages


async def test_a_search_reads_a_slice_a_page_says_how_far_and_goes_on(client, db, monkeypatch):
    monkeypatch.setattr(event_search, "SEARCH_SLICE", 4)
    hits = [0, 1, 5, 10, 11, 12]  # of 13 events: 3 in the newest slice of 4, none in some
    sent = await spaced_events(
        client, db, [f"{'needle' if n in hits else 'hay'}-{n}.com" for n in range(13)]
    )
    wanted = [e for n, e in enumerate(sent) if n in hits]
    await sign_in(client)

    pages = await walk_search(client, "/ui/events?q=NEEDLE&limit=2")
    found = [event_id for ids, _ in pages for event_id in ids]
    assert found == [e["eventId"] for e in reversed(wanted)]  # all, newest first, once each
    assert [len(ids) for ids, _ in pages] == [2, 1, 1, 2]  # a page may stop short of 2
    received = {e["eventId"]: e["received"] for e in sent}
    for n, (ids, notice) in enumerate(pages):
        if len(ids) == 2:
            assert notice == ""  # a full page: the next goes on from its last
            continue
        # it says how far it read: every match received since then is on it or before it
        said = re.search(r"received back to (\S+ \S+) UTC and found (\d+)", notice)
        assert said and int(said.group(2)) == len(ids), notice
        reached = datetime.fromisoformat(said.group(1)).replace(tzinfo=UTC)
        shown = [event_id for earlier, _ in pages[: n + 1] for event_id in earlier]
        later = [event_id for further, _ in pages[n + 1 :] for event_id in further]
        assert all(received[i] >= reached for i in shown)
        assert later and all(received[i] < reached for i in later)
        assert "are not searched yet" in notice and "Search further back" in notice

    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    oldest = await walk_search(client, f"/ui/events?q=needle&limit=2&order=oldest&since={hour_ago}")
    assert [i for ids, _ in oldest for i in ids] == [e["eventId"] for e in wanted]
    assert any("received up to" in notice for _, notice in oldest)


async def test_the_next_page_of_a_search_without_a_start_keeps_the_first_pages_range(
    client, monkeypatch
):
    monkeypatch.setattr(event_search, "SEARCH_SLICE", 2)
    sent = [traffic.mailbox_created(domain="kept-range.com") for _ in range(3)]
    for event in sent:
        await ok(client, event)
    await sign_in(client)
    first = (await client.get("/ui/events", params={"q": "kept-range", "limit": 2})).text
    more = re.search(r'<a href="([^"]+)">Next page →</a>', first)
    assert more and "since=" in more.group(1)  # not the 6 hours before the next page's time
    rest = (await client.get(html.unescape(more.group(1)))).text
    assert listed_ids(first) + listed_ids(rest) == [e["eventId"] for e in reversed(sent)]


async def test_a_search_takes_percent_and_underscore_as_typed_and_ignores_case(client):
    names = ["Sale50%_off", "Sale50xyoff", "Müller-4242", "Muller-4242"]
    sent = [traffic.mailbox_created(details={"lastName": name}) for name in names]
    for event in sent:
        await ok(client, event)
    await sign_in(client)
    literal = (await client.get("/ui/events", params={"q": "50%_OFF"})).text
    assert listed_ids(literal) == [sent[0]["eventId"]]
    # the digits are looked for first; the letters still match in any case, accents too
    folded = (await client.get("/ui/events", params={"q": "MÜLLER-4242"})).text
    assert listed_ids(folded) == [sent[2]["eventId"]]


async def test_events_take_a_time_range(client):
    box = traffic.mailbox_created()
    await ok(client, box)
    await sign_in(client)
    now = datetime.now(UTC)
    hour_ago = (now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    inside = (await client.get("/ui/events", params={"since": hour_ago})).text
    assert box["eventId"] in inside
    outside = (await client.get("/ui/events", params={"until": hour_ago})).text
    assert box["eventId"] not in outside
    month = (now - timedelta(days=40)).strftime("%Y-%m-%dT%H:%M")
    too_long = await client.get("/ui/events", params={"q": "coldmail", "since": month})
    assert too_long.status_code == 422 and "narrow the range" in too_long.text


async def test_a_range_that_ends_in_the_past_lists_the_events_before_its_end(client, db):
    older, newer = traffic.mailbox_created(), traffic.mailbox_created()
    for event in (older, newer):
        await ok(client, event)
    two_hours_ago = datetime.now(UTC) - timedelta(hours=2)
    await db.execute(
        "UPDATE events SET first_received_at = $1 WHERE event_id = $2",
        two_hours_ago,
        older["eventId"],
    )
    await sign_in(client)
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    ended = (await client.get("/ui/events", params={"until": hour_ago})).text
    assert older["eventId"] in ended and newer["eventId"] not in ended
    later = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    nothing_after = (await client.get("/ui/events", params={"until": later})).text
    assert older["eventId"] in nothing_after and newer["eventId"] in nothing_after


async def test_the_charts_show_each_range_and_the_spooled_deliveries(client, db):
    box = traffic.mailbox_created()
    await ok(client, box)
    await ok(client, traffic.mailbox_created())
    await db.execute("UPDATE events SET spooled = true WHERE event_id = $1", box["eventId"])
    await sign_in(client)
    for span in ("24h", "7d", "30d"):
        page = await client.get("/ui/deliveries", params={"range": span})
        assert page.status_code == 200, span
        assert '<path class="bar-processed"' in page.text
        assert '<path class="bar-spooled"' in page.text
        assert re.search(r"waited in the spool \(database away\) <strong>1</strong>", page.text)
        assert re.search(r"processed <strong>2</strong>", page.text)
    assert (await client.get("/ui/deliveries", params={"range": "1y"})).status_code == 422
    overview = (await client.get("/ui")).text
    assert '<path class="bar-spooled"' in overview and 'href="/ui/deliveries?range=7d"' in overview


def signature_counts(page: str) -> dict[str, int]:
    """The overview's "Signatures, 24 h" table: deliveries per signature form."""
    card = page.split("<h2>Signatures, 24 h</h2>")[1].split("</div>")[0]
    rows = re.findall(r'<tr><td>([^<]+)</td><td class="num">(\d+)</td></tr>', card)
    return {form: int(n) for form, n in rows}


async def test_the_overview_counts_stored_and_rejected_deliveries_by_signature_each_view(client):
    await sign_in(client)
    assert signature_counts((await client.get("/ui")).text) == {}
    for _ in range(2):
        await ok(client, traffic.mailbox_created())
    rejected = await deliver(
        client, b'{"event": "mailbox.created", "eventId": "broken", "data": 7}'
    )
    assert rejected.status_code != 200  # stored among the rejected deliveries, signed all the same
    assert signature_counts((await client.get("/ui")).text) == {"valid": 3}
    await ok(client, traffic.mailbox_created())  # the next view counts it: nothing held stale
    assert signature_counts((await client.get("/ui")).text) == {"valid": 4}
