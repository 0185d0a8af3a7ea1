"""A destination's dashboard page in a real browser (Debian's Chromium against a real
`serve`): one destination that answers and one that fails, their messages sent by a
dispatcher the test drives with its clock (serve's own is off). The failing one's page
shows each attempt with its answer, latency, the message's status and next retry, and its
dead letter; the one that answers shows its deliveries and no dead letter. Screenshots go
to UI_SCREENSHOTS (see test_dashboard_browser.py)."""

import asyncio
import base64
import os
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest

from app.db import make_engine
from app.destinations import load
from app.outbound.dispatch import Dispatcher
from app.simulation import traffic
from tests.browser.test_dashboard_browser import click_and_wait, screenshots, sign_in
from tests.conftest import OPS_TOKEN, asyncpg_dsn, deliver
from tests.receivers import receiving
from tests.reliability.test_crash_and_outage import server_env
from tests.servers import free_port, serving
from tests.test_outbound_delivery import Clock

pytestmark = pytest.mark.browser
SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
MESSAGES = "SELECT * FROM outbound_messages WHERE destination = $1 ORDER BY id"


async def sent_and_failed(
    server_url: str, database_url: str, destinations: Any, ports: dict[str, int]
) -> dict[str, list[Any]]:
    """A first event sent to both: `flaky` (answering 500) fails it eight times, a dead
    letter; a second event fails there once, pending with its next retry. `crm` gets both."""
    import asyncpg

    async with (
        receiving(SECRET, port=ports["crm"]),
        receiving(SECRET, port=ports["flaky"]) as flaky,
        httpx.AsyncClient(base_url=server_url) as client,
    ):
        flaky.answer = 500
        engine = make_engine(database_url, pool_size=4)
        clock = Clock()
        dispatcher = Dispatcher(engine, destinations, clock=clock, random=lambda: 0.5)
        db = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            await dispatcher.register()
            assert (await deliver(client, traffic.mailbox_created())).status_code == 200
            clock.now = datetime.now(UTC)  # the message is due
            for _ in range(8):  # each retry when it is due (the circuit's probes included)
                assert await dispatcher.step() >= 1
                (first,) = await db.fetch(MESSAGES, "flaky")
                clock.now = first["next_attempt_at"] or clock.now
            assert first["status"] == "dead"
            assert (await deliver(client, traffic.mailbox_created())).status_code == 200
            clock.advance(61)  # the circuit is open: its cool-down, then a probe
            assert await dispatcher.step() == 2
            return {name: await db.fetch(MESSAGES, name) for name in ports}
        finally:
            await db.close()
            await dispatcher.client.aclose()
            await engine.dispose()


def test_a_destination_page_shows_attempts_next_retry_and_dead_letters(
    browser, database_url, tmp_path
):
    from selenium.webdriver.common.by import By

    ports = {"crm": free_port(), "flaky": free_port()}
    declared = [
        {"name": name, "url": f"http://127.0.0.1:{port}/hooks", "format": "standard-webhooks"}
        | {"events": ["mailbox.*"], "secretEnv": "CRM_SECRET", "allowPrivateNetwork": True}
        for name, port in ports.items()
    ]
    path = tmp_path / "destinations.yaml"
    path.write_text(orjson.dumps({"destinations": declared}).decode())
    env = server_env(database_url) | {
        "DESTINATIONS_FILE": str(path),
        "CRM_SECRET": SECRET,
        "OUTBOUND_DISPATCH": "false",
    }
    with serving(env, tmp_path) as server:
        destinations = load(path, {"CRM_SECRET": SECRET})
        rows = asyncio.run(sent_and_failed(server.url, database_url, destinations, ports))
        dead, pending = rows["flaky"]
        assert (dead["status"], dead["attempts"]) == ("dead", 8)
        assert (pending["status"], pending["attempts"]) == ("pending", 1)
        assert [m["status"] for m in rows["crm"]] == ["delivered", "delivered"]
        shots = screenshots()
        sign_in(browser, server.url, OPS_TOKEN)

        def cells(table: int) -> list[list[str]]:
            found = browser.find_elements(By.CSS_SELECTOR, "main table")[table]
            rows = found.find_elements(By.CSS_SELECTOR, "tbody tr")
            return [[td.text for td in row.find_elements(By.TAG_NAME, "td")] for row in rows]

        browser.get(server.url + "/ui/destinations")
        listed = {row[0].split()[0]: row for row in cells(0)}
        assert listed["flaky"][3] == "open (9 failures in a row)" and listed["crm"][3] == "closed"
        assert (listed["flaky"][4], listed["flaky"][6]) == ("1", "1")  # backlog, dead letters
        assert (listed["crm"][4], listed["crm"][6]) == ("0", "0")
        click_and_wait(browser, "main a[href='/ui/destinations/flaky']", "Destination flaky")

        # its attempts, newest first: the second message's one, then the first's eight
        attempts = cells(0)
        assert len(attempts) == 9
        assert [row[1] for row in attempts] == [pending["webhook_id"]] + [dead["webhook_id"]] * 8
        assert all(row[3] == "500 answered 500" for row in attempts)
        assert all(row[4].endswith(" ms") and row[4][:-3].isdigit() for row in attempts)
        assert attempts[0][5] == "pending · 1 attempts"
        assert all(row[5] == "dead · 8 attempts" and row[6] == "none" for row in attempts[1:])
        retry = browser.find_element(By.CSS_SELECTOR, "main table tbody tr td:nth-child(7) time")
        assert retry.get_attribute("datetime") == pending["next_attempt_at"].isoformat()
        (letter,) = cells(1)
        assert letter[0] == dead["webhook_id"] and letter[3] == "8"
        assert letter[4] == "500 answered 500"
        main = browser.find_element(By.TAG_NAME, "main").text
        assert "outbound replay --destination flaky" in main
        browser.save_screenshot(str(shots / "destination-failing.png"))

        # the one that answers: its deliveries, no dead letter
        browser.get(server.url + "/ui/destinations/crm")
        attempts = cells(0)
        assert sorted(row[1] for row in attempts) == sorted(m["webhook_id"] for m in rows["crm"])
        assert all(row[3] == "204" and row[6] == "none" for row in attempts)
        assert all(row[5] == "delivered · 1 attempts" for row in attempts)
        assert cells(1) == [["No dead letters."]]
        browser.save_screenshot(str(shots / "destination-answering.png"))
    print(f"\nscreenshots in {shots}: destination-failing, destination-answering (.png)")
