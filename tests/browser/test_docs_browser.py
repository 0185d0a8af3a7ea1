"""/docs in a real browser: Swagger UI renders the OpenAPI 3.1 document the service
serves, from the service's own files only (marked `browser`: `pytest -m browser`)."""

from urllib.parse import urlsplit

import httpx
import pytest

from tests.browser.test_dashboard_browser import screenshots
from tests.reliability.test_crash_and_outage import server_env
from tests.servers import serving

pytestmark = pytest.mark.browser


def test_docs_render_the_openapi_document_from_this_origin_only(browser, database_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with serving(server_env(database_url), tmp_path) as server:
        page = httpx.get(server.url + "/docs")
        assert httpx.get(server.url + "/openapi.json").json()["openapi"].startswith("3.1")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
        browser.get(server.url + "/docs")
        WebDriverWait(browser, 30).until(
            lambda b: "/api/v1/mailboxes" in b.find_element(By.TAG_NAME, "body").text
        )
        text = browser.find_element(By.TAG_NAME, "body").text
        assert "Unable to render" not in text and "GET" in text
        assert "/api/v1/exports/mailboxes" in text and "/webhooks/cmr" in text
        operation = browser.find_element(
            By.CSS_SELECTOR, "[id$='list_mailboxes_api_v1_mailboxes_get']"
        )
        browser.execute_script("arguments[0].scrollIntoView()", operation)
        operation.find_element(By.CSS_SELECTOR, "button").click()
        WebDriverWait(browser, 15).until(
            lambda b: "updatedSince" in b.find_element(By.TAG_NAME, "body").text
        )  # an operation opens with its parameters
        fetched = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        console = [entry["message"] for entry in browser.get_log("browser")]
        shot = screenshots() / "docs.png"
        browser.save_screenshot(str(shot))
        print(f"\nscreenshot {shot}; fetched {fetched}")
    origin = urlsplit(server.url).netloc
    assert {urlsplit(url).netloc for url in fetched} == {origin}
    assert any(url.endswith("/openapi.json") for url in fetched)
    assert not [line for line in console if "Content Security Policy" in line], console
