"""The renewals queue and the customer's page in a real browser (Debian's Chromium against a
real `serve`): the queue's tabs and filters as an ops person uses them, a user's link to
their page, a mailbox search for a customer, and an ID's copy button. Screenshots go to
UI_SCREENSHOTS (see test_dashboard_browser.py)."""

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from app.simulation import traffic
from tests.browser.test_dashboard_browser import click_and_wait, screenshots, sign_in
from tests.conftest import OPS_TOKEN, deliver
from tests.reliability.test_crash_and_outage import server_env
from tests.servers import serving
from tests.streams import subscription_event

pytestmark = pytest.mark.browser


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


async def the_queue(client: httpx.AsyncClient) -> dict[str, Any]:
    """Two customers' subscriptions, one in each part of the queue, and a prewarmup one
    (no price) renewing this week."""
    now, subs = datetime.now(UTC), {}
    for name, ends_in, user, email, auto_renew in [
        ("week", 2, "USR-ALPHA", "alpha@agency.example", True),
        ("week_manual", 5, "USR-BRAVO", "bravo@agency.example", False),
        ("later", 20, "USR-ALPHA", "alpha@agency.example", True),
        ("overdue", -3, "USR-BRAVO", "bravo@agency.example", True),
        ("lapsed", -25, "USR-BRAVO", "bravo@agency.example", True),
    ]:
        order = traffic.mailbox_order_success(price=9, quantity=2, userId=user, userEmail=email)
        sub_id = order["data"]["subscriptionId"]
        boxes = [
            traffic.mailbox_created(
                subscriptionId=sub_id,
                userId=user,
                userEmail=email,
                price=9,
                orderId=order["data"]["orderId"],
            )
            for _ in range(2)
        ]
        update = subscription_event(
            "subscription.updated",
            sub_id,
            periodStart=iso(now - timedelta(days=30)),
            periodEnd=iso(now + timedelta(days=ends_in)),
            autoRenew=auto_renew,
        )
        for payload in (order, *boxes, update):
            assert (await deliver(client, payload)).status_code == 200
        subs[name] = sub_id
    prewarmed = traffic.prewarmup_success(domains=1, per_domain=2)
    unpriced = prewarmed["data"]["mailboxDetails"][0]["subscriptionId"]
    update = subscription_event(
        "subscription.updated",
        unpriced,
        periodStart=iso(now - timedelta(days=30)),
        periodEnd=iso(now + timedelta(days=1)),
    )
    for payload in (prewarmed, update):
        assert (await deliver(client, payload)).status_code == 200
    subs["unpriced"] = unpriced
    return subs


def test_the_renewals_queue_filters_and_the_customer_page(browser, database_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    with serving(server_env(database_url), tmp_path) as server:

        async def generate() -> dict[str, Any]:
            async with httpx.AsyncClient(base_url=server.url) as client:
                return await the_queue(client)

        subs = asyncio.run(generate())
        shots = screenshots()
        sign_in(browser, server.url, OPS_TOKEN)

        def main() -> str:
            return str(browser.find_element(By.TAG_NAME, "main").text)

        # the queue opens on this week: the two this week and the unpriced one, nothing else
        browser.get(server.url + "/ui/renewals")
        shown = main()
        assert all(subs[n] in browser.page_source for n in ("week", "week_manual", "unpriced"))
        assert all(subs[n] not in browser.page_source for n in ("later", "overdue", "lapsed"))
        total = browser.find_element(By.ID, "grand-total").text
        assert "36.00 USD" in total and "plus 1 of unknown cost" in total, total
        assert "This week" in shown and "Lapsed?" in shown
        browser.save_screenshot(str(shots / "renewals-this-week.png"))

        # the overdue tab: what ended lately, not what lapsed long ago
        click_and_wait(browser, "nav.tabs a[href*='due=overdue']", "Renewals")
        assert subs["overdue"] in browser.page_source and subs["lapsed"] not in browser.page_source
        click_and_wait(browser, "nav.tabs a[href*='due=lapsed']", "Renewals")
        assert subs["lapsed"] in browser.page_source and subs["overdue"] not in browser.page_source

        # filters: a risk, then a customer, on the whole queue
        click_and_wait(browser, "nav.tabs a[href*='due=all']", "Renewals")
        Select(browser.find_element(By.NAME, "risk")).select_by_value("auto_renew_off")
        click_and_wait(browser, "#renewal-filters button", "Renewals")
        assert subs["week_manual"] in browser.page_source
        assert subs["week"] not in browser.page_source
        Select(browser.find_element(By.NAME, "risk")).select_by_value("")
        customer = browser.find_element(By.NAME, "customer")
        customer.clear()
        customer.send_keys("ALPHA@agency.example")
        click_and_wait(browser, "#renewal-filters button", "Renewals")
        assert subs["week"] in browser.page_source and subs["later"] in browser.page_source
        assert subs["overdue"] not in browser.page_source
        assert "36.00 USD" in browser.find_element(By.ID, "grand-total").text
        browser.save_screenshot(str(shots / "renewals-customer-filter.png"))

        # an ID's copy button: the script (allowed by its hash) runs and copies
        browser.execute_cdp_cmd(
            "Browser.grantPermissions",
            {
                "origin": server.url,
                "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"],
            },
        )
        button = browser.find_element(By.CSS_SELECTOR, "table.renewals button.copy")
        assert button.is_displayed()
        copied_id = button.get_attribute("data-copy")
        button.click()
        WebDriverWait(browser, 10).until(lambda _: button.text == "copied")
        clipboard = browser.execute_async_script(
            "navigator.clipboard.readText().then(arguments[0], () => arguments[0](null))"
        )
        assert clipboard == copied_id == "USR-ALPHA"
        console = [e["message"] for e in browser.get_log("browser")]
        refused = [m for m in console if "Content Security Policy" in m or "script" in m.lower()]
        assert not refused, refused  # the script ran, and nothing was refused

        # a user's link leads to the customer's page
        click_and_wait(
            browser, "table.renewals a.customer[href='/ui/customers/USR-ALPHA']", "Customer"
        )
        page = main()
        assert "alpha@agency.example" in page and "USR-ALPHA" in page
        assert "36.00 USD" in browser.find_element(By.ID, "monthly-cost").text
        assert subs["week"] in browser.page_source and subs["later"] in browser.page_source
        assert subs["overdue"] not in browser.page_source  # Bravo's
        assert len(browser.find_elements(By.CSS_SELECTOR, "main a[href^='/ui/mailboxes/']")) >= 4
        browser.save_screenshot(str(shots / "customer.png"))

        # a mailbox search for the customer's email finds them, and their mailboxes
        browser.get(server.url + "/ui/mailboxes")
        box = browser.find_element(By.NAME, "q")
        box.send_keys("bravo@agency")
        click_and_wait(browser, "form.filters button", "Mailboxes")
        found = browser.find_element(By.ID, "customers-found").text
        assert "bravo@agency.example" in found and "6 mailboxes" in found, found
        browser.save_screenshot(str(shots / "mailbox-search-customer.png"))
        click_and_wait(browser, "#customers-found a.customer", "Customer")
        assert "USR-BRAVO" in main()
    names = "renewals-this-week, renewals-customer-filter, customer, mailbox-search-customer"
    print(f"\nscreenshots in {shots}: {names} (.png)")
