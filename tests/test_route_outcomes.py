"""What an operator sees of each delivery's outcome: the metrics move under the delivery's
event family and outcome, exactly once and nowhere else, its time is measured, and one log
line names the delivery and its outcome (docs/operations.md)."""

import logging
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.routing import BaseRoute, Match, Route

from app.main import create_app
from app.simulation import traffic
from tests.conftest import app_client, deliver, make_settings

Sample = tuple[str, tuple[tuple[str, str], ...]]
COUNTED = (
    "cmr_webhook_deliveries_total",
    "cmr_webhook_rejections_total",
    "cmr_webhook_signatures_total",
    "cmr_webhook_conflicts_total",
    "cmr_webhook_processing_seconds_count",
)


async def samples(client: httpx.AsyncClient) -> dict[Sample, float]:
    text = (await client.get("/metrics")).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in COUNTED or s.name == "cmr_webhook_processing_seconds_sum"
    }


def moved(before: dict[Sample, float], after: dict[Sample, float]) -> dict[Sample, float]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def delivery(event: str, outcome: str) -> Sample:
    return ("cmr_webhook_deliveries_total", (("event", event), ("outcome", outcome)))


def timed(outcome: str) -> Sample:
    return ("cmr_webhook_processing_seconds_count", (("outcome", outcome),))


def rejection(reason: str) -> Sample:
    return ("cmr_webhook_rejections_total", (("reason", reason),))


SIGNED = ("cmr_webhook_signatures_total", (("result", "valid"),))


def ignored(event: str, family: str) -> tuple[dict[str, Any], dict[Sample, float]]:
    payload = traffic.envelope(event, {"domain": "a.example"})
    return payload, {delivery(family, "ignored"): 1, timed("ignored"): 1}


async def test_each_delivery_moves_its_metrics_once_under_its_event_family_and_is_logged(
    client, caplog
):
    caplog.set_level(logging.INFO, logger="coldmail.webhooks")
    created = traffic.mailbox_created()
    clash = traffic.mailbox_created()
    clash["eventId"] = created["eventId"]
    invalid = traffic.mailbox_created()
    del invalid["data"]["mailboxDetails"]["mailboxId"]
    sends: list[tuple[dict[str, Any] | bytes, int, dict[Sample, float]]] = [
        (created, 200, {delivery("mailbox.created", "processed"): 1, timed("processed"): 1}),
        (
            clash,
            200,
            {
                delivery("mailbox.created", "processed"): 1,
                timed("processed"): 1,
                ("cmr_webhook_conflicts_total", ()): 1,
            },
        ),
        (
            invalid,
            422,
            {
                delivery("mailbox.created", "invalid_payload"): 1,
                rejection("invalid_payload"): 1,
            },
        ),
        (b"[1]", 400, {delivery("other", "invalid_json"): 1, rejection("invalid_json"): 1}),
    ]
    for name, family in [
        ("domain.transfer.started", "domain.other"),
        ("subscription.paused", "subscription.other"),
        ("mailbox.archived", "mailbox.other"),
        ("prewarmup.order.queued", "prewarmup.other"),
        ("dns-record.updated", "other"),
        ("domainish", "other"),
    ]:
        payload, expected = ignored(name, family)
        sends.append((payload, 200, expected))
    for sent, status, expected in sends:
        caplog.clear()
        before = await samples(client)
        started = time.perf_counter()
        response = await deliver(client, sent)
        wall = time.perf_counter() - started
        after = await samples(client)
        assert response.status_code == status, response.text
        outcome = response.json().get("status") or response.json()["error"]
        change = moved(before, after)
        seconds = change.pop(("cmr_webhook_processing_seconds_sum", (("outcome", outcome),)), 0)
        assert change == {SIGNED: 1} | expected, sent
        (line,) = [r for r in caplog.records if r.name == "coldmail.webhooks"]
        event_id = sent["eventId"] if isinstance(sent, dict) else None
        event = sent["event"] if isinstance(sent, dict) else None
        if status == 200:
            assert 0 < seconds < wall
            assert line.getMessage() == "delivery"
            assert (line.eventId, line.event, line.outcome) == (event_id, event, outcome)
            assert line.conflict is (sent is clash)
            assert line.latency_ms == round(seconds * 1000, 2)
        else:
            assert line.getMessage() == "delivery rejected"
            assert (line.eventId, line.event, line.outcome) == (event_id, event, outcome)


@pytest.mark.parametrize(
    ("overrides", "signing_key", "result", "counted"),
    [
        ({"cmr_signing_key": None}, None, "unchecked", None),
        ({"cmr_signature_mode": "report"}, "forged", "invalid", "invalid"),
        ({"cmr_signature_mode": "report"}, None, "absent", "absent"),
    ],
)
async def test_each_signature_result_is_stored_with_the_event_and_counted(
    database_url, db, overrides, signing_key, result, counted
):
    settings = make_settings(database_url, **overrides)
    async with app_client(settings) as client:
        before = await samples(client)
        response = await deliver(client, traffic.mailbox_created(), signing_key=signing_key)
        change = moved(before, await samples(client))
    assert response.json()["status"] == "processed"
    assert await db.fetchval("select signature from events") == result
    signatures = {k: v for k, v in change.items() if k[0] == "cmr_webhook_signatures_total"}
    expected = {("cmr_webhook_signatures_total", (("result", counted),)): 1} if counted else {}
    assert signatures == expected


async def test_a_delivery_is_served_by_the_plain_webhook_route_and_another_method_gets_405(
    database_url,
):
    """A POST to the webhook is matched first by a plain Starlette route (none of FastAPI's
    per-request machinery: about 6 % of a delivery's CPU, issue 31); a GET matches no route
    fully, so the webhook is never run for it and the client is told the method (405)."""
    settings = make_settings(database_url)
    app = create_app(settings)

    def first_match(method: str) -> BaseRoute | None:
        scope = {"type": "http", "path": "/webhooks/cmr", "root_path": "", "method": method}
        return next((r for r in app.router.routes if r.matches(scope)[0] is Match.FULL), None)

    assert type(first_match("POST")) is Route  # not FastAPI's APIRoute
    assert first_match("GET") is None
    async with app_client(settings) as client:
        answer = await client.get("/webhooks/cmr")
        assert answer.status_code == 405
        assert answer.headers["allow"] == "POST"
        assert (await deliver(client, traffic.mailbox_created())).status_code == 200
