"""A sender that behaves like Cold Mail Reseller: same body, same eventId, retried on any
non-2xx or missing answer. It records every answer so tests can count them."""

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.conftest import WEBHOOK_TOKEN, sender_signature, wire


@dataclass
class Tally:
    acknowledged: set[str] = field(default_factory=set)
    answers: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    retry_after_missing: int = 0
    gave_up: set[str] = field(default_factory=set)

    def summary(self) -> str:
        return f"sent {self.sent}, answers {dict(self.answers)}, acked {len(self.acknowledged)}"


# The provider's schedule (at once, after 30 s, after 5 min, then never), 100 times faster.
PROVIDER_SCHEDULE_100X = (0.0, 0.3, 3.0)


async def deliver_on_schedule(
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    tally: Tally,
    *,
    schedule: tuple[float, ...] = PROVIDER_SCHEDULE_100X,
) -> bool:
    """As the provider does: a few tries on a fixed schedule, then it gives up for good."""
    for delay in schedule:
        await asyncio.sleep(delay)
        if await deliver_until_acknowledged(client, url, payload, tally, attempts=1, pause=0):
            return True
    tally.gave_up.add(payload["eventId"])
    return False


async def deliver_until_acknowledged(
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    tally: Tally,
    *,
    attempts: int = 200,
    pause: float = 0.1,
) -> bool:
    body, sent_at = wire(payload)
    for _ in range(attempts):
        headers = sender_signature(body, timestamp=sent_at)
        headers["content-type"] = "application/json"
        tally.sent += 1
        try:
            response = await client.post(
                url, content=body, headers=headers, params={"token": WEBHOOK_TOKEN}
            )
        except httpx.HTTPError:
            tally.answers["no answer"] += 1
            await asyncio.sleep(pause)
            continue
        tally.answers[str(response.status_code)] += 1
        if response.status_code == 503 and "retry-after" not in response.headers:
            tally.retry_after_missing += 1
        if 200 <= response.status_code < 300:
            tally.acknowledged.add(payload["eventId"])
            return True
        await asyncio.sleep(pause)
    return False


async def send_all(
    client: httpx.AsyncClient,
    url: str,
    payloads: list[dict[str, Any]],
    tally: Tally,
    *,
    concurrency: int = 16,
    on_schedule: bool = False,
) -> None:
    queue = list(reversed(payloads))
    send = deliver_on_schedule if on_schedule else deliver_until_acknowledged

    async def worker() -> None:
        while queue:
            await send(client, url, queue.pop(), tally)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
