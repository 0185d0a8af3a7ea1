"""Real HTTP receivers for outbound messages, on 127.0.0.1, in the test's event loop.

A receiver verifies each Standard Webhooks signature with the reference `standardwebhooks`
package (when given the secret), applies each `webhook-id` once (as a deduping receiver
should), and can fail on demand (`answer`), redirect, or be slow (`hold` keeps every
request waiting until it is set). It notes every request and whether one webhook-id was
ever being received twice at the same time.
"""

import asyncio
from collections import Counter
from contextlib import asynccontextmanager
from typing import Any

import orjson
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError


class Receiver:
    def __init__(self, secret: str | None = None) -> None:
        self.secret = secret
        self.answer = 200
        self.answer_headers: dict[str, str] = {}
        self.hold: asyncio.Event | None = None
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.applied: dict[str, Any] = {}  # webhook-id -> the body, applied once
        self.received: Counter[str] = Counter()
        self.bad_signatures = 0
        self.in_flight: Counter[str] = Counter()
        self.concurrent_duplicates: list[str] = []
        self.arrived = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = dict(request.headers)
        webhook_id = request.headers.get("webhook-id", f"#{len(self.requests)}")
        self.requests.append((headers, body))
        self.received[webhook_id] += 1
        self.in_flight[webhook_id] += 1
        if self.in_flight[webhook_id] > 1:
            self.concurrent_duplicates.append(webhook_id)
        self.arrived.set()
        try:
            if self.hold is not None:
                await self.hold.wait()
            return self.respond(headers, body, webhook_id)
        finally:
            self.in_flight[webhook_id] -= 1

    def respond(self, headers: dict[str, str], body: bytes, webhook_id: str) -> web.Response:
        if self.secret is not None:
            try:
                Webhook(self.secret).verify(body, headers)
            except WebhookVerificationError:
                self.bad_signatures += 1
                return web.Response(status=400)
        if not 200 <= self.answer < 300:
            return web.Response(status=self.answer, headers=self.answer_headers)
        self.applied.setdefault(webhook_id, orjson.loads(body))
        return web.Response(status=204)

    def bodies(self) -> list[bytes]:
        return [body for _, body in self.requests]


@asynccontextmanager
async def receiving(secret: str | None = None, port: int = 0):
    receiver = Receiver(secret)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    port = runner.addresses[0][1]
    receiver.url = f"http://127.0.0.1:{port}/hooks"
    try:
        yield receiver
    finally:
        if receiver.hold is not None:
            receiver.hold.set()
        await runner.cleanup()
