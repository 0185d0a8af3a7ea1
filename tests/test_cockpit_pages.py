"""The dashboard as the ops team's daily tool: newest first, detail pages that link each
other, search as typed, renewals first, exports for a credentials session, and pages that
still say something useful while the database is away."""

import csv
import io
import re
from html import escape
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from app.simulation import traffic
from tests.conftest import CREDENTIALS_TOKEN, app_client, deliver, make_settings
from tests.dashboard_data import fill
from tests.reliability.proxy import Proxy
from tests.test_dashboard import PAGES, sign_in

FORM = {"content-type": "application/x-www-form-urlencoded"}


def links(html: str) -> set[str]:
    return set(re.findall(r'href="([^"]+)"', html))


async def test_detail_pages_link_order_subscription_mailbox_and_their_events(client):
    data = await fill(client)
    await sign_in(client)
    order = await client.get(f"/ui/orders/{data['order_id']}")
    assert order.status_code == 200
    assert "DNS not verified" in order.text and data["failed_domain"] in order.text
    sub_links = [href for href in links(order.text) if href.startswith("/ui/subscriptions/")]
    box_links = [href for href in links(order.text) if href.startswith("/ui/mailboxes/")]
    assert len(sub_links) == 2 and len(box_links) == 4  # two domains succeeded, 2 boxes each
    assert any(href.startswith("/ui/events/") for href in links(order.text))
    sub = await client.get(sub_links[0])
    assert sub.status_code == 200 and f"/ui/orders/{data['order_id']}" in links(sub.text)
    assert any(href.startswith("/ui/events/") for href in links(sub.text))
    box = await client.get(box_links[0])
    assert box.status_code == 200
    assert {sub_links[0], f"/ui/orders/{data['order_id']}"} & links(box.text)
    assert any(href.startswith("/ui/events/") for href in links(box.text))


async def test_a_mailbox_page_lists_the_events_that_name_it_and_no_neighbour_s(client, db):
    """Its mailbox.created is found among its subscription's events (no order here to find
    it by), its mailbox.updated and warmup events by its ID; a neighbour's is not shown."""
    sub, box, neighbour = "SUB-EVIDX", "MBX-EVIDX", "MBX-NEIGHBOUR"
    sent = {
        "created": traffic.mailbox_created(subscriptionId=sub, orderId=None),
        "updated": traffic.mailbox_updated(box, {"firstName": "Alice"}),
        "warmup": traffic.envelope("mailbox.warmup.started", {"mailboxId": box}),
        "neighbour": traffic.mailbox_created(subscriptionId=sub, orderId=None),
    }
    sent["created"]["data"]["mailboxDetails"]["mailboxId"] = box
    sent["neighbour"]["data"]["mailboxDetails"]["mailboxId"] = neighbour
    for payload in sent.values():
        assert (await deliver(client, payload)).status_code == 200
    ids = dict(await db.fetch("SELECT event_id, id FROM events"))
    await sign_in(client)
    page = await client.get(f"/ui/mailboxes/{box}")
    shown = {h for h in links(page.text) if h.startswith("/ui/events/")}
    assert shown == {
        f"/ui/events/{ids[sent[k]['eventId']]}" for k in ("created", "updated", "warmup")
    }
    other = await client.get(f"/ui/mailboxes/{neighbour}")
    shown = {h for h in links(other.text) if h.startswith("/ui/events/")}
    assert shown == {f"/ui/events/{ids[sent['neighbour']['eventId']]}"}


async def test_sender_ids_become_links_to_their_own_pages_whatever_they_hold(client):
    sub_id, order_id = "../../api/v1/stats", "%2e%2e/orders?x#y"
    box_ids = ["a/b", "50%off", "x..y/..", "../../ui", "PLAIN42"]
    success = traffic.mailbox_order_success(subscriptionId=sub_id, orderId=order_id, quantity=5)
    assert (await deliver(client, success)).status_code == 200
    for box_id in box_ids:
        box = traffic.mailbox_created(
            details={"mailboxId": box_id}, subscriptionId=sub_id, orderId=order_id
        )
        assert (await deliver(client, box)).status_code == 200
    await sign_in(client)
    listed = links((await client.get("/ui/subscriptions")).text)
    sub_link = "/ui/subscriptions/..%2F..%2Fapi%2Fv1%2Fstats"
    assert sub_link in listed
    sub_page = (await client.get(sub_link)).text
    assert "/ui/orders/%252e%252e%2Forders%3Fx%23y" in links(sub_page)
    order_page = await client.get("/ui/orders/%252e%252e%2Forders%3Fx%23y")
    assert order_page.status_code == 200 and sub_link in links(order_page.text)
    box_links = sorted(h for h in links(order_page.text) if h.startswith("/ui/mailboxes/"))
    assert "/ui/mailboxes/PLAIN42" in box_links  # a plain ID reads as it did
    assert "/ui/mailboxes/a%2Fb" in box_links and "/ui/mailboxes/50%25off" in box_links
    for href in box_links:
        # as a browser resolves it: every link stays on a mailbox's page
        assert urlsplit(urljoin("http://test" + sub_link, href)).path == href
        page = await client.get(href)
        shown = unquote(href.removeprefix("/ui/mailboxes/"))
        assert page.status_code == 200 and f"<code>{escape(shown)}</code>" in page.text, href
    assert sorted(unquote(h.removeprefix("/ui/mailboxes/")) for h in box_links) == sorted(box_ids)


async def test_unknown_ids_get_a_not_found_page(client):
    await sign_in(client)
    for path in ("/ui/orders/nope", "/ui/subscriptions/nope", "/ui/mailboxes/nope"):
        response = await client.get(path)
        assert response.status_code == 404 and "No such" in response.text


async def test_an_order_level_failure_shows_its_reason(client):
    failed = traffic.envelope(
        "prewarmup.order.failed",
        {"orderId": "ORDER-WHOLE-FAIL", "userId": "U1", "reason": "Payment declined by issuer"},
    )
    assert (await deliver(client, failed)).status_code == 200
    await sign_in(client)
    assert "Payment declined by issuer" in (await client.get("/ui/orders")).text
    assert "Payment declined by issuer" in (await client.get("/ui/orders/ORDER-WHOLE-FAIL")).text
    assert "Payment declined by issuer" in (await client.get("/ui")).text  # last 7 days


async def test_no_page_says_none_and_users_show_their_email(client):
    data = await fill(client)
    await sign_in(client)
    order = f"/ui/orders/{data['order_id']}"
    for path in [*PAGES, order, f"/ui/subscriptions/{data['expiring']}"]:
        text = (await client.get(path)).text
        assert not re.search(r">\s*None\b|\bNone\s*<", text), path
    assert "johndoe@company.com" in (await client.get("/ui/orders")).text
    subs = (await client.get("/ui/subscriptions")).text
    assert "johndoe@company.com" in subs and "unknown" in subs


async def test_lists_open_newest_first_and_lead_back_to_the_first_page(client):
    sent = [traffic.mailbox_created() for _ in range(3)]
    for payload in sent:
        assert (await deliver(client, payload)).status_code == 200
    await sign_in(client)
    page = (await client.get("/ui/events", params={"limit": 2})).text
    assert page.index(sent[2]["eventId"]) < page.index(sent[1]["eventId"])
    assert sent[0]["eventId"] not in page
    next_href = re.search(r'href="([^"]+)">Next page', page)
    assert next_href
    second = (await client.get(next_href[1].replace("&amp;", "&"))).text
    assert sent[0]["eventId"] in second and "First page" in second
    assert re.search(r'<time datetime="[^"]+" title="\d{4}-\d\d-\d\d [^"]+">\d+ \w+ ago', page)


async def test_mailboxes_open_with_the_newest_and_search_what_a_person_types(client):
    data = await fill(client)
    await sign_in(client)
    assert data["email"] in (await client.get("/ui/mailboxes")).text
    for typed in (data["email"].upper(), data["domain"].upper(), "john"):
        assert data["email"] in (await client.get("/ui/mailboxes", params={"q": typed})).text


async def test_rejected_malformed_json_says_so(client):
    assert (await deliver(client, b'{"event": "mailbox.created", oops')).status_code in (400, 422)
    await sign_in(client)
    assert "body is not valid JSON" in (await client.get("/ui/rejected")).text


async def test_partially_failed_orders_are_counted(client):
    await fill(client)
    await sign_in(client)
    assert "Partially failed: 1" in (await client.get("/ui/orders")).text


# --- exports from the dashboard --------------------------------------------------------


async def test_a_credentials_session_downloads_a_subscriptions_mailboxes(client):
    data = await fill(client)
    await sign_in(client, CREDENTIALS_TOKEN)
    page = (await client.get(f"/ui/subscriptions/{data['expiring']}")).text
    assert 'action="/ui/exports/mailboxes"' in page
    response = await client.post(
        "/ui/exports/mailboxes",
        content=f"subscriptionId={data['expiring']}&format=instantly",
        headers=FORM,
    )
    assert response.status_code == 200 and "attachment" in response.headers["content-disposition"]
    [row] = list(csv.DictReader(io.StringIO(response.text)))
    assert row["IMAP Host"] == "imap.gmail.com" and row["SMTP Password"].startswith("canary-")


async def test_the_page_offering_a_download_names_the_mailboxes_left_out(client):
    order = traffic.mailbox_order_success()
    subscription = order["data"]["subscriptionId"]
    ok = traffic.mailbox_created(subscriptionId=subscription, details={"firstName": "Zoë_%"})
    no_app_password = traffic.mailbox_created(subscriptionId=subscription)
    del no_app_password["data"]["mailboxDetails"]["appPassword"]
    no_password = traffic.mailbox_created(provider="MICROSOFT", subscriptionId=subscription)
    del no_password["data"]["mailboxDetails"]["password"]
    unknown = traffic.mailbox_created(provider="YAHOO", subscriptionId=subscription)
    for payload in (order, ok, no_app_password, no_password, unknown):
        assert (await deliver(client, payload)).status_code == 200
    await sign_in(client, CREDENTIALS_TOKEN)
    page = (await client.get(f"/ui/subscriptions/{subscription}")).text
    assert "3 mailboxes left out of the Instantly, Smartlead and EmailBison files" in page
    for box, reason in [
        (no_app_password, "Google without an app password"),
        (no_password, "Microsoft 365 without a password"),
        (unknown, "unknown provider"),
    ]:
        details = box["data"]["mailboxDetails"]
        assert (
            f"{escape(details['email'])}</a> <code>{details['mailboxId']}</code>: {reason}" in page
        )
    assert f"<code>{ok['data']['mailboxDetails']['mailboxId']}</code>:" not in page
    assert 'name="bom" value="false"' in page
    response = await client.post(
        "/ui/exports/mailboxes",
        content=f"subscriptionId={subscription}&format=smartlead&bom=false",
        headers=FORM,
    )
    assert response.status_code == 200 and response.headers["x-export-skipped"] == "3"
    assert not response.content.startswith(b"\xef\xbb\xbf")
    [row] = list(csv.DictReader(io.StringIO(response.text)))
    assert row["from_email"] == ok["data"]["mailboxDetails"]["email"]


async def test_an_export_form_with_only_a_format_exports_nothing(client, db):
    await fill(client)
    await sign_in(client, CREDENTIALS_TOKEN)
    for form in ("format=csv", "format=csv&subscriptionId=", "format=csv&all=false"):
        response = await client.post("/ui/exports/mailboxes", content=form, headers=FORM)
        assert response.status_code == 422, form
        assert "Choose a format and a subscription or an order" in response.text
        assert "canary" not in response.text
    assert await db.fetchval("select count(*) from credential_reads") == 0
    everything = await client.post(
        "/ui/exports/mailboxes", content="format=csv&all=true", headers=FORM
    )
    assert everything.status_code == 200 and len(everything.text.splitlines()) > 2


async def test_an_ops_session_sees_no_download_and_may_not_export(client):
    data = await fill(client)
    await sign_in(client)
    page = (await client.get(f"/ui/subscriptions/{data['expiring']}")).text
    assert "/ui/exports/mailboxes" not in page and "left out of" not in page
    response = await client.post(
        "/ui/exports/mailboxes",
        content=f"subscriptionId={data['expiring']}&format=csv",
        headers=FORM,
    )
    assert response.status_code == 403 and "canary" not in response.text


async def test_an_export_posted_from_another_site_is_refused(client):
    data = await fill(client)
    await sign_in(client, CREDENTIALS_TOKEN)
    response = await client.post(
        "/ui/exports/mailboxes",
        content=f"subscriptionId={data['expiring']}&format=csv",
        headers=FORM | {"sec-fetch-site": "cross-site"},
    )
    assert response.status_code == 403 and "canary" not in response.text


# --- while the database is away --------------------------------------------------------


async def test_every_page_says_the_database_is_away_and_shows_the_spool(database_url, tmp_path):
    proxy = Proxy(database_url)
    await proxy.start()
    settings = make_settings(proxy.url, spool_dir=str(tmp_path / "spool"))
    async with app_client(settings) as client:
        assert (await sign_in(client)).status_code == 303
        await proxy.cut()
        queued = [await deliver(client, traffic.mailbox_created()) for _ in range(3)]
        assert [r.json()["status"] for r in queued] == ["queued"] * 3
        for path in [*PAGES, "/ui/orders/x", "/ui/events/1", "/ui/failed-domains.csv"]:
            response = await client.get(path)
            assert response.status_code == 503, path
            assert response.headers["content-type"].startswith("text/html")
            assert "The database cannot be reached" in response.text
            assert "found it away at" in response.text
            assert '<p class="figure">3</p>' in response.text  # the spool, from the process
            assert "This page cannot show" in response.text
        await proxy.restore()
        assert isinstance(client, httpx.AsyncClient)


async def test_a_page_the_database_refuses_is_an_error_not_an_outage(client, db, caplog):
    await sign_in(client)
    await db.execute("ALTER TABLE rejected_deliveries RENAME TO rejected_elsewhere")
    response = await client.get("/ui/rejected")
    assert response.status_code == 500 and "This page failed" in response.text
    assert "cannot be reached" not in response.text
    assert "page /ui/rejected failed: ProgrammingError" in caplog.text


async def test_a_csv_the_database_refuses_is_an_error_page_not_a_file_cut_short(client, db):
    """The failed domains' CSV is streamed, but its first rows are read before the answer
    starts: a statement that fails there is the error page, not a 200 with a broken file."""
    await sign_in(client)
    await db.execute("ALTER TABLE order_domains RENAME TO order_domains_elsewhere")
    response = await client.get("/ui/failed-domains.csv")
    assert response.status_code == 500 and "This page failed" in response.text
    assert "content-disposition" not in response.headers
