"""Metrics an operator scrapes, and a shutdown that finishes the delivery in flight."""

import asyncio
from collections.abc import AsyncIterator

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from app.simulation import traffic
from bench.attack import server_sockets
from tests.conftest import WEBHOOK_TOKEN, deliver, sender_signature
from tests.reliability.test_crash_and_outage import server_env
from tests.servers import Server


async def scrape(client) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = (await client.get("/metrics")).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_deliveries_outcomes_latency_and_signatures(client):
    before = await scrape(client)
    await deliver(client, traffic.mailbox_created())
    await deliver(client, traffic.mailbox_created(details={"mailboxId": ""}))
    await deliver(client, traffic.mailbox_created(), signing_key="wrong")
    after = await scrape(client)

    def grew(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("cmr_webhook_deliveries_total", event="mailbox.created", outcome="processed") == 1
    assert grew("cmr_webhook_rejections_total", reason="invalid_payload") == 1
    assert grew("cmr_webhook_signatures_total", result="invalid") == 1
    assert grew("cmr_webhook_processing_seconds_count", outcome="processed") == 1
    assert ("cmr_db_pool_connections_in_use", frozenset()) in after


async def test_sigterm_lets_the_delivery_in_flight_finish(database_url, tmp_path):
    """SIGTERM arrives while half the body has been read: the rest still arrives, the
    delivery is committed and answered 200, and the process exits 0."""
    server = Server(server_env(database_url), tmp_path)
    await asyncio.to_thread(server.start)
    body = orjson.dumps(traffic.prewarmup_success(domains=100, per_domain=10))
    headers = sender_signature(body) | {"content-type": "application/json"}
    terminated = asyncio.Event()

    async def halves() -> AsyncIterator[bytes]:
        yield body[: len(body) // 2]
        await terminated.wait()
        yield body[len(body) // 2 :]

    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        sending = asyncio.create_task(
            client.post(
                "/webhooks/cmr",
                content=halves(),
                headers=headers | {"content-length": str(len(body))},
                params={"token": WEBHOOK_TOKEN},
            )
        )
        # in flight: the server holds the connection and has read all that was sent
        while not await asyncio.to_thread(read_everything_sent, server.port):
            await asyncio.sleep(0.05)
        assert server.proc is not None
        server.proc.terminate()
        terminated.set()
        response = await sending
    await asyncio.to_thread(server.proc.wait, 30)
    assert response.status_code == 200 and response.json()["status"] == "processed"
    assert server.proc.returncode == 0


def read_everything_sent(port: int) -> bool:
    """One connection to the server, and nothing waiting in its receive queue."""
    sockets = server_sockets(port)
    return len(sockets) == 1 and sockets[0][0] == 0
