"""The dashboard in a real browser: Debian's Chromium driven by Selenium through Debian's
chromedriver, against a real `serve` with generated data. A screenshot of every page goes
to UI_SCREENSHOTS (default: a temporary folder), named in the test's output.

Marked `browser` and left out of the default run; CI runs it as its own step:
`pytest -m browser` (needs the chromium and chromium-driver packages)."""

import asyncio
import os
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.simulation import traffic
from tests.conftest import CREDENTIALS_TOKEN, OPS_TOKEN, deliver
from tests.dashboard_data import fill
from tests.reliability.proxy import Proxy
from tests.reliability.test_crash_and_outage import server_env
from tests.servers import serving

pytestmark = pytest.mark.browser


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


@contextmanager
def proxied(database_url: str) -> Iterator[tuple[Proxy, Any]]:
    """A cuttable proxy in front of PostgreSQL, run on a loop of its own (the browser and
    the server are driven from this thread); yields it and a function that runs a coroutine
    on its loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(60)

    proxy = Proxy(database_url)
    run(proxy.start())
    try:
        yield proxy, run
    finally:
        run(proxy.cut())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def sign_in(browser: Any, url: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(url + "/ui/login")
    browser.find_element(By.ID, "token").send_keys(token)
    click_and_wait(browser, "form.login button", "Overview")


def test_ops_sign_in_browse_every_page_and_sign_out(browser, database_url, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

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
        browser.find_element(By.ID, "token").send_keys(OPS_TOKEN)
        click_and_wait(browser, "form.login button", "Overview")
        overview = open_page("/ui", "overview")
        assert "Deliveries per minute" in overview and "Spool" in overview
        assert browser.find_elements(By.CSS_SELECTOR, "svg.chart path.bar-processed")
        assert "Renewals in the next" in overview
        assert browser.find_elements(
            By.CSS_SELECTOR, f"section.attention a[href='/ui/subscriptions/{data['expiring']}']"
        )  # the subscription expiring in five days leads the overview
        orders = open_page("/ui/orders", "orders")
        assert orders.index(data["failed_domain"]) < orders.index("All orders")  # partial first
        subs = open_page("/ui/subscriptions", "subscriptions")
        assert data["expiring"] in subs
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
        renewals = open_page("/ui/renewals", "renewals")
        assert "This week" in renewals and "Download CSV" in renewals
        browser.get(server.url + "/ui/orders")
        click_and_wait(browser, f"a[href='/ui/orders/{data['order_id']}']", "Order ")
        order = open_page(f"/ui/orders/{data['order_id']}", "order")
        assert "DNS not verified" in order and "Events" in order
        click_and_wait(browser, "main table tbody a[href^='/ui/subscriptions/']", "Subscription ")
        browser.save_screenshot(str(shots / "subscription.png"))
        saved.append("subscription.png")
        click_and_wait(browser, "main table tbody a[href^='/ui/mailboxes/']", "Mailbox ")
        browser.save_screenshot(str(shots / "mailbox.png"))
        saved.append("mailbox.png")
        assert "Credentials are never shown here" in browser.find_element(By.TAG_NAME, "main").text
        browser.get(server.url + "/ui/mailboxes")
        box = browser.find_element(By.NAME, "q")
        box.send_keys(data["domain"].upper())
        box.submit()
        # the old page's <main> may go stale under the wait while the search loads
        WebDriverWait(browser, 15, ignored_exceptions=[StaleElementReferenceException]).until(
            lambda b: "Matching" in b.find_element(By.TAG_NAME, "main").text
        )
        assert data["email"] in browser.find_element(By.TAG_NAME, "main").text
        click_and_wait(browser, "header form button", "Sign in")
        browser.get(server.url + "/ui/orders")
        assert browser.title.startswith("Sign in")  # signed out means out
        # last: a wrong token makes this address wait a second before its next try
        browser.find_element(By.ID, "token").send_keys("wrong-token")
        click_and_wait(browser, "form.login button", "Sign in")
        assert "not an ops token" in browser.find_element(By.TAG_NAME, "main").text
    print(f"\nscreenshots in {shots}: {', '.join(saved)}")


def test_a_credentials_session_downloads_an_export(browser, database_url, tmp_path):
    from selenium.webdriver.common.by import By

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd(
        "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    with serving(
        server_env(database_url) | {"CREDENTIALS_API_TOKENS": CREDENTIALS_TOKEN}, tmp_path
    ) as server:
        no_app_password: dict[str, Any] = {}

        async def generate() -> dict[str, Any]:
            async with httpx.AsyncClient(base_url=server.url) as client:
                data = await fill(client)
                box = traffic.mailbox_created(subscriptionId=data["expiring"])
                del box["data"]["mailboxDetails"]["appPassword"]
                no_app_password.update(box["data"]["mailboxDetails"])
                assert (await deliver(client, box)).status_code == 200
                return data

        data = asyncio.run(generate())
        sign_in(browser, server.url, CREDENTIALS_TOKEN)
        browser.get(f"{server.url}/ui/subscriptions/{data['expiring']}")
        left_out = browser.find_element(By.ID, "export-skipped").text
        assert "1 mailbox left out" in left_out and no_app_password["email"] in left_out
        assert "Google without an app password" in left_out
        browser.find_element(
            By.CSS_SELECTOR, "form.export select option[value='smartlead']"
        ).click()
        browser.save_screenshot(str(screenshots() / "export.png"))
        browser.find_element(By.CSS_SELECTOR, "form.export button").click()

        def downloaded() -> list[Path]:
            return [p for p in downloads.iterdir() if p.suffix == ".csv"]

        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(browser, 30).until(lambda _: downloaded())
        [csv_file] = downloaded()
        assert csv_file.read_bytes().startswith(b"\xef\xbb\xbf")  # for Excel
        lines = csv_file.read_text(encoding="utf-8-sig").splitlines()
        assert lines[0].startswith("from_name,from_email,user_name,password,smtp_host")
        assert "smtp.gmail.com" in lines[1] and "canary-app-" in lines[1]
        assert len(lines) == 2  # the mailbox without an app password is left out


def test_the_dashboard_says_the_database_is_away_while_deliveries_queue(
    browser, database_url, tmp_path
):
    from selenium.webdriver.common.by import By

    with proxied(database_url) as (proxy, run):
        env = server_env(proxy.url) | {"SPOOL_DIR": str(tmp_path / "spool")}
        with serving(env, tmp_path) as server:
            sign_in(browser, server.url, OPS_TOKEN)
            run(proxy.cut())

            async def queue() -> list[str]:
                async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                    sent = [await deliver(client, traffic.mailbox_created()) for _ in range(4)]
                return [r.json()["status"] for r in sent]

            assert asyncio.run(queue()) == ["queued"] * 4
            for path, name in (("/ui", "away-overview"), ("/ui/orders", "away-orders")):
                browser.get(server.url + path)
                assert browser.title.startswith("The database is away")
                main = browser.find_element(By.TAG_NAME, "main").text
                assert "The database cannot be reached" in main and "found it away at" in main
                assert browser.find_element(By.CSS_SELECTOR, ".card .figure").text == "4"
                assert "This page cannot show" in main
                browser.save_screenshot(str(screenshots() / f"{name}.png"))
            run(proxy.restore())
            from selenium.webdriver.support.ui import WebDriverWait

            def back(b: Any) -> bool:
                b.get(server.url + "/ui")
                return bool(b.title.startswith("Overview"))

            WebDriverWait(browser, 60, poll_frequency=0.5).until(back)
