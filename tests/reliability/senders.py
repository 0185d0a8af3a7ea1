"""A sender that behaves like Cold Mail Reseller: same body, same eventId, retried on any
non-2xx or missing answer. It records every answer so tests can count them."""

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from app import signing
from tests.conftest import SIGNING_KEY, WEBHOOK_TOKEN


@dataclass
class Tally:
    acknowledged: set[str] = field(default_factory=set)
    answers: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    retry_after_missing: int = 0

    def summary(self) -> str:
        return f"sent {self.sent}, answers {dict(self.answers)}, acked {len(self.acknowledged)}"


async def deliver_until_acknowledged(
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    tally: Tally,
    *,
    attempts: int = 200,
    pause: float = 0.1,
) -> bool:
    body = orjson.dumps(payload)
    for _ in range(attempts):
        headers = signing.sign(SIGNING_KEY, body) | {"content-type": "application/json"}
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
) -> None:
    queue = list(reversed(payloads))

    async def worker() -> None:
        while queue:
            await deliver_until_acknowledged(client, url, queue.pop(), tally)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
