"""The dashboard in a real browser: Debian's Chromium driven by Selenium through Debian's
chromedriver, against a real `serve` with generated data. A screenshot of every page goes
to UI_SCREENSHOTS (default: a temporary folder), named in the test's output.

Marked `browser` and left out of the default run; CI runs it as its own step:
`pytest -m browser` (needs the chromium and chromium-driver packages)."""

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import OPS_TOKEN
from tests.dashboard_data import fill
from tests.reliability.test_crash_and_outage import server_env
from tests.servers import serving

pytestmark = pytest.mark.browser
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser():
    from selenium import webdriver

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    assert not missing, f"{missing}: apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1440,1000",
        f"--user-data-dir={tempfile.mkdtemp(prefix='cmw-chromium-')}",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def click_and_wait(browser: Any, selector: str, title: str) -> None:
    """Click what navigates, then wait for the page whose title starts with `title`: a
    click returns before the browser has loaded what it asked for."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    old = browser.find_element(By.TAG_NAME, "html")
    browser.find_element(By.CSS_SELECTOR, selector).click()
    wait = WebDriverWait(browser, 15)
    wait.until(lambda b: b.find_element(By.TAG_NAME, "html").id != old.id)
    wait.until(lambda b: b.title.startswith(title), f"{title!r} not in {browser.title!r}")


def screenshots() -> Path:
    folder = Path(os.environ.get("UI_SCREENSHOTS") or tempfile.mkdtemp(prefix="cmw-ui-shots-"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_ops_sign_in_browse_every_page_and_sign_out(browser, database_url, tmp_path):
    from selenium.webdriver.common.by import By

    with serving(server_env(database_url), tmp_path) as server:

        async def generate() -> dict[str, Any]:
            async with httpx.AsyncClient(base_url=server.url) as client:
                return await fill(client)

        data = asyncio.run(generate())
        shots, saved = screenshots(), []

        def open_page(path: str, name: str) -> str:
            browser.get(server.url + path)
            assert "Sign in" not in browser.title, path
            file = shots / f"{name}.png"
            browser.save_screenshot(str(file))
            saved.append(file.name)
            return str(browser.find_element(By.TAG_NAME, "main").text)

        browser.get(server.url + "/ui")
        assert browser.title.startswith("Sign in")  # no session: sent to sign in
        browser.find_element(By.ID, "token").send_keys("wrong-token")
        click_and_wait(browser, "form.login button", "Sign in")
        assert "not an ops token" in browser.find_element(By.TAG_NAME, "main").text
        browser.find_element(By.ID, "token").send_keys(OPS_TOKEN)
        click_and_wait(browser, "form.login button", "Overview")
        overview = open_page("/ui", "overview")
        assert "Deliveries per minute" in overview and "Spool" in overview
        assert browser.find_elements(By.CSS_SELECTOR, "svg.chart path.bar-processed")
        orders = open_page("/ui/orders", "orders")
        assert orders.index(data["failed_domain"]) < orders.index("All orders")  # partial first
        subs = open_page("/ui/subscriptions", "subscriptions")
        expiring = subs.split("Expiring in the next")[1].split("All subscriptions")[0]
        assert data["expiring"] in expiring
        browser.get(server.url + "/ui/mailboxes")
        box = browser.find_element(By.NAME, "q")
        box.send_keys(data["email"])
        box.submit()
        assert data["email"] in open_page(f"/ui/mailboxes?q={data['email']}", "mailboxes")
        events = open_page("/ui/events?event=mailbox.created", "events")
        assert "mailbox.created" in events
        click_and_wait(browser, "main table tbody a", "Event ")
        inspector = browser.find_element(By.CSS_SELECTOR, "pre.payload").text
        assert "[REDACTED]" in inspector  # the redacted payload
        browser.save_screenshot(str(shots / "event.png"))
        saved.append("event.png")
        assert "invalid_payload" in open_page("/ui/rejected", "rejected")
        click_and_wait(browser, "header form button", "Sign in")
        browser.get(server.url + "/ui/orders")
        assert browser.title.startswith("Sign in")  # signed out means out
    print(f"\nscreenshots in {shots}: {', '.join(saved)}")
