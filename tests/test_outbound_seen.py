"""How ops see the outbound side: a failing destination's backlog, oldest age and open
circuit, the same in the read API, /metrics and its dashboard page; a healthy one beside
it shows none of that. The dispatcher's own writes (its attempts, the shared circuit) are
made here as a dispatcher makes them, so what is read is decided by this test."""

import re
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from app.simulation import traffic
from tests.conftest import deliver
from tests.state import OPS
from tests.test_dashboard import sign_in

# the app with the destinations, writing outbound messages and sending none: this test
# writes what a failing dispatcher would
from tests.test_outbound_derived import client as client


async def failing_crm(client: httpx.AsyncClient, db: asyncpg.Connection) -> int:
    """Two messages for `crm` (a partially failed order: order.partially_failed, and the
    order's mailboxes ready), the older one written an hour ago and refused with a 503 by
    `crm` five times in a row, which opened its circuit. Returns the older's id."""
    order_id = traffic.provider_id()
    success = traffic.prewarmup_success(order_id=order_id, domain_names=["good.com"])
    failed = traffic.prewarmup_failed(order_id=order_id, failures={"bad.com": "no DNS"})
    for payload in (success, failed):
        assert (await deliver(client, payload)).status_code == 200
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    oldest = await db.fetchval(
        "UPDATE outbound_messages SET created_at = $1, attempts = 5, last_status = 503,"
        " next_attempt_at = now() + interval '30 minutes', last_attempt_at = now()"
        " WHERE id = (SELECT min(id) FROM outbound_messages WHERE destination = 'crm')"
        " RETURNING id",
        hour_ago,
    )
    await db.execute(
        "INSERT INTO outbound_attempts (message_id, destination, started_at, status_code,"
        " latency_ms, error) VALUES ($1, 'crm', now(), 503, 812.7, 'Service Unavailable')",
        oldest,
    )
    await db.execute(
        "INSERT INTO outbound_destinations (name, failures, opened_at) VALUES ('crm', 5, now())"
        " ON CONFLICT (name) DO UPDATE SET failures = 5, opened_at = now()"
    )
    return int(oldest)


async def test_the_read_api_shows_a_failing_destinations_backlog_and_open_circuit(client, db):
    await failing_crm(client, db)
    response = await client.get("/api/v1/destinations", headers=OPS)
    assert response.status_code == 200, response.text
    shown = {d["name"]: d for d in response.json()["items"]}
    crm, slack = shown["crm"], shown["slack"]
    assert (crm["circuit"], crm["failures"], crm["backlog"]) == ("open", 5, 2)
    assert 3500 < crm["oldestSeconds"] < 3700
    assert crm["host"] == "crm.example.com"
    # slack took the order's failure only (it wants order.* and subscription.at_risk)
    assert (slack["circuit"], slack["failures"], slack["backlog"]) == ("closed", 0, 1)
    # the Slack URL is a secret: only its host is shown
    assert "services" not in response.text and slack["host"] == "hooks.slack.com"


async def test_a_destinations_messages_show_status_attempts_and_next_retry(client, db):
    oldest = await failing_crm(client, db)
    page = await client.get("/api/v1/destinations/crm/messages", headers=OPS, params={"limit": 1})
    assert page.status_code == 200, page.text
    [newest] = page.json()["items"]
    assert newest["status"] == "pending" and newest["attempts"] == 0
    rest = await client.get(
        "/api/v1/destinations/crm/messages",
        headers=OPS,
        params={"cursor": page.json()["nextCursor"]},
    )
    [older] = rest.json()["items"]
    assert (older["id"], older["attempts"], older["lastStatus"]) == (oldest, 5, 503)
    assert older["nextAttemptAt"] is not None and older["webhookId"].startswith("msg_")
    assert rest.json()["nextCursor"] is None


async def test_a_destinations_messages_of_every_status_come_newest_first_page_by_page(client, db):
    statuses = ["dead", "pending", "delivered", "dead", "delivered", "pending", "delivered"]
    ids = await db.fetchval(
        "WITH written AS (INSERT INTO outbound_messages (destination, type, payload, status)"
        " SELECT 'crm', 'order.failed', '{}', s FROM unnest($1::text[]) AS s RETURNING id)"
        " SELECT array_agg(id ORDER BY id) FROM written",
        statuses,
    )
    await db.execute(
        "INSERT INTO outbound_messages (destination, type, payload, status)"
        " VALUES ('slack', 'order.failed', '{}', 'dead')"
    )

    async def listed(**params: str) -> list[tuple[int, str]]:
        shown, cursor = [], None
        while True:
            page = await client.get(
                "/api/v1/destinations/crm/messages",
                headers=OPS,
                params=params | ({"cursor": cursor} if cursor else {}),
            )
            assert page.status_code == 200, page.text
            shown += [(m["id"], m["status"]) for m in page.json()["items"]]
            if (cursor := page.json()["nextCursor"]) is None:
                return shown

    newest_first = list(zip(ids, statuses, strict=True))[::-1]
    assert await listed(limit="2") == newest_first
    assert await listed() == newest_first
    for status in ("pending", "delivered", "dead"):
        assert await listed(limit="1", status=status) == [
            (i, s) for i, s in newest_first if s == status
        ]


@pytest.mark.parametrize(
    ("path", "params", "status"),
    [
        ("/api/v1/destinations/nobody/messages", {}, 404),
        ("/api/v1/destinations/crm/messages", {"status": "lost"}, 422),
        ("/api/v1/destinations/crm/messages", {"cursor": "x"}, 422),
        ("/api/v1/destinations/crm/messages", {"since": "2026-01-01"}, 422),
    ],
)
async def test_bad_requests_get_a_clear_error(client, path, params, status):
    response = await client.get(path, headers=OPS, params=params)
    assert response.status_code == status, response.text


async def test_the_destinations_need_a_token(client):
    assert (await client.get("/api/v1/destinations")).status_code == 401
    assert (await client.get("/api/v1/destinations/crm/messages")).status_code == 401


def gauge(text: str, name: str, destination: str) -> float:
    match = re.search(rf'^{name}{{destination="{destination}"}} (\S+)$', text, re.MULTILINE)
    assert match, f"{name} for {destination} not in /metrics"
    return float(match.group(1))


async def test_metrics_show_the_backlog_its_age_and_the_circuit_per_destination(client, db):
    before = (await client.get("/metrics")).text
    assert gauge(before, "cmr_outbound_backlog", "crm") == 0
    # the counters exist from the start (their values are the process's, across tests)
    assert "cmr_outbound_sent_total" in before and "cmr_outbound_failed_total" in before
    await failing_crm(client, db)
    scraped = (await client.get("/metrics")).text
    assert gauge(scraped, "cmr_outbound_backlog", "crm") == 2
    assert 3500 < gauge(scraped, "cmr_outbound_backlog_oldest_seconds", "crm") < 3700
    assert gauge(scraped, "cmr_outbound_circuit_state", "crm") == 1
    assert gauge(scraped, "cmr_outbound_backlog", "slack") == 1
    assert gauge(scraped, "cmr_outbound_circuit_state", "slack") == 0
    await db.execute("UPDATE outbound_destinations SET disabled_at = now() WHERE name = 'crm'")
    assert gauge((await client.get("/metrics")).text, "cmr_outbound_circuit_state", "crm") == 2


async def test_the_destination_page_shows_its_attempts_backlog_and_circuit(client, db):
    await failing_crm(client, db)
    await sign_in(client)
    listing = await client.get("/ui/destinations")
    assert listing.status_code == 200
    assert 'href="/ui/destinations/crm"' in listing.text
    assert 'href="/ui/destinations"' in (await client.get("/ui")).text  # in the nav
    page = await client.get("/ui/destinations/crm")
    assert page.status_code == 200
    assert "open" in page.text and "5 failed attempts in a row" in page.text
    assert "2 waiting" in page.text
    assert "503" in page.text and "813 ms" in page.text and "Service Unavailable" in page.text
    assert "No dead letters." in page.text
    healthy = await client.get("/ui/destinations/slack")
    assert "closed" in healthy.text and "No attempts yet." in healthy.text
    assert (await client.get("/ui/destinations/nobody")).status_code == 404


async def test_a_real_dispatch_to_a_failing_receiver_is_counted_and_opens_the_circuit(
    database_url, db, tmp_path, monkeypatch
):
    """The dispatcher's attempts against a receiver that answers 503, then 200: the
    counters, the backlog and the circuit on /metrics follow."""
    from tests.receivers import receiving
    from tests.test_outbound_delivery import (
        SECRET,
        Clock,
        declared,
        dispatching,
        recording,
    )
    from tests.test_outbound_delivery import destinations_file as declared_file

    monkeypatch.setenv("CRM_SECRET", SECRET)
    async with receiving(SECRET) as receiver:
        path = declared_file(tmp_path, declared("hook", receiver.url))
        async with recording(database_url, path) as (client, destinations):
            for _ in range(6):
                assert (await deliver(client, traffic.mailbox_created())).status_code == 200
            before = (await client.get("/metrics")).text
            clock = Clock()
            async with dispatching(database_url, destinations, clock) as dispatcher:
                receiver.answer = 503
                assert await dispatcher.step() == 6
                failing = (await client.get("/metrics")).text
                receiver.answer = 200
                clock.advance(120)  # past the retry and the circuit's cool-down
                # the probe closes the circuit, and the rest go in the same round
                assert await dispatcher.step() == 6
            after = (await client.get("/metrics")).text

    def delta(text: str, name: str) -> float:
        return gauge(text, name, "hook") - gauge(before, name, "hook")

    assert gauge(before, "cmr_outbound_backlog", "hook") == 6
    assert delta(failing, "cmr_outbound_failed_total") == 6
    assert delta(failing, "cmr_outbound_sent_total") == 0
    assert gauge(failing, "cmr_outbound_circuit_state", "hook") == 1
    assert gauge(failing, "cmr_outbound_backlog", "hook") == 6
    assert delta(after, "cmr_outbound_sent_total") == 6
    assert gauge(after, "cmr_outbound_circuit_state", "hook") == 0
    assert gauge(after, "cmr_outbound_backlog", "hook") == 0
