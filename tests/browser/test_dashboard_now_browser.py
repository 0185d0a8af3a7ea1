"""The questions of a day, in Chromium: is anything stuck or lost right now (the overview's
strip), which prewarmup domains failed and why (the failed-domains view), and what came in
about a domain (the event search). Screenshots go to UI_SCREENSHOTS."""

import asyncio
from typing import Any

import httpx
import pytest

from app.simulation import traffic
from tests.browser.test_dashboard_browser import click_and_wait, screenshots, sign_in
from tests.conftest import OPS_TOKEN, deliver
from tests.dashboard_data import fill
from tests.reliability.test_crash_and_outage import server_env
from tests.servers import serving

pytestmark = pytest.mark.browser


async def generate(url: str) -> dict[str, Any]:
    """The dashboard's data, an order 2 mailboxes short of 3, a badly signed delivery."""
    async with httpx.AsyncClient(base_url=url) as client:
        data = await fill(client)
        order = traffic.mailbox_order_success(quantity=3)
        sent = [order]
        for _ in range(2):
            sent.append(
                traffic.mailbox_created(
                    domain=order["data"]["domainName"],
                    subscriptionId=order["data"]["subscriptionId"],
                    orderId=order["data"]["orderId"],
                )
            )
        for payload in sent:
            assert (await deliver(client, payload)).status_code == 200
        forged = traffic.mailbox_created()
        response = await deliver(client, forged, signing_key="a-key-the-sender-never-had-0000")
        assert response.status_code == 401  # refused, and counted
        found = traffic.mailbox_created(domain="findme-domain.com")
        assert (await deliver(client, found)).status_code == 200
        return data | {"short": order["data"], "found": found}


def text(browser: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(browser.find_element(By.TAG_NAME, "main").text)


def test_the_strip_failed_domains_and_event_search(browser, database_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    with serving(server_env(database_url), tmp_path) as server:
        data = asyncio.run(generate(server.url))
        shots = screenshots()
        sign_in(browser, server.url, OPS_TOKEN)

        strip = browser.find_element(By.CSS_SELECTOR, "section.now")
        assert strip.location["y"] < 200  # the first thing on the page, no scrolling
        tiles = {
            t.get_attribute("data-tile"): t for t in strip.find_elements(By.CSS_SELECTOR, "li.tile")
        }
        assert len(tiles) == 8
        incomplete = tiles["Incomplete orders"]
        assert "Check" in incomplete.text and "1" in incomplete.text
        assert "Act now" in tiles["Signature failures"].text  # the badly signed delivery
        assert "OK" in tiles["Conflicts"].text
        browser.save_screenshot(str(shots / "now-strip.png"))
        click_and_wait(browser, "li[data-tile='Incomplete orders'] a", "Incomplete orders")
        assert "2 of 3 mailboxes" in text(browser)
        assert data["short"]["orderId"] in text(browser)

        browser.get(server.url + "/ui/orders")
        click_and_wait(browser, "a[href^='/ui/failed-domains']", "Failed domains")
        Select(browser.find_element(By.NAME, "kind")).select_by_value("prewarmup")
        click_and_wait(browser, "form.filters button", "Failed domains")
        click_and_wait(browser, "p.quick a[data-range='today']", "Failed domains")
        table = browser.find_element(By.ID, "failed-domains").text
        assert data["failed_domain"] in table and "DNS not verified" in table
        assert "prewarmup" in table
        browser.save_screenshot(str(shots / "failed-domains.png"))
        click_and_wait(browser, "p.quick a[data-range='yesterday']", "Failed domains")
        assert "No domain failed in this range" in text(browser)

        browser.get(server.url + "/ui/events")
        box = browser.find_element(By.NAME, "q")
        box.send_keys("findme-domain")
        click_and_wait(browser, "form.filters button", "Events")
        found = browser.find_element(By.CSS_SELECTOR, "main table tbody").text
        assert data["found"]["eventId"] in found and "findme-domain.com" in found
        assert len(browser.find_elements(By.CSS_SELECTOR, "main table tbody tr")) == 1
        browser.save_screenshot(str(shots / "event-search.png"))
        secret = data["found"]["data"]["mailboxDetails"]["appPassword"]
        box = browser.find_element(By.NAME, "q")
        box.clear()
        box.send_keys(secret)
        click_and_wait(browser, "form.filters button", "Events")
        results = browser.find_element(By.CSS_SELECTOR, "main table").text
        assert "No events" in results and secret not in results
    print(f"\nscreenshots in {shots}: now-strip.png, failed-domains.png, event-search.png")
