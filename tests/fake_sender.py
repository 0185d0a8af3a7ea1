"""A fake of the sender's REST API (`GET /subscriptions`), served by a real HTTP server.

Responses are built from the sender's documented example, including its
quirk: `nextPage` is always set, even on the last page.
"""

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

API_KEY = "cmr-partner-key-" + "7f3a9c"


def remote_subscription(subscription_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "subscriptionId": subscription_id,
        "subscriptionStatus": "ACTIVE",
        "totalMailboxQuantity": 3,
        "billingCycle": "MONTHLY",
        "pricePerMailbox": 8,
        "periodStart": "2026-01-08T10:15:30.000Z",
        "periodEnd": "2026-02-08T10:15:30.000Z",
        "serviceProvider": "GOOGLE",
        "autoRenew": True,
        "userId": "USR94KD7S2LQ8X5M1Z0",
        "domain": "company.com",
    } | fields


class FakeSender:
    def __init__(self, subscriptions: list[dict[str, Any]], *, page_size: int = 2) -> None:
        self.subscriptions = subscriptions
        self.page_size = page_size
        self.failures: list[int] = []  # statuses to answer first, one per request
        self.requests: list[tuple[float, int]] = []  # (time, page)

    def page(self, number: int) -> dict[str, Any]:
        total = max(1, -(-len(self.subscriptions) // self.page_size))
        start = (number - 1) * self.page_size
        return {
            "status": 200,
            "message": "Subscriptions fetched successfully",
            "data": {
                "subscriptions": self.subscriptions[start : start + self.page_size],
                "pagination": {
                    "totalSearchedCount": len(self.subscriptions),
                    "currentPage": number,
                    "nextPage": number + 1,
                    "totalPages": total,
                },
            },
        }


@contextmanager
def serving(fake: FakeSender) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            url = urlparse(self.path)
            page = int(parse_qs(url.query).get("page", ["1"])[0])
            fake.requests.append((time.monotonic(), page))
            if self.headers.get("cmr-x-api-key") != API_KEY:
                return self.answer(401, {"status": 401, "message": "Unauthorized", "data": None})
            if fake.failures:
                status = fake.failures.pop(0)
                return self.answer(status, {"status": status, "message": "no", "data": None})
            if url.path != "/api/v1/integration/subscriptions":
                return self.answer(404, {"status": 404, "message": "Not found", "data": None})
            self.answer(200, fake.page(page))

        def answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api/v1/integration"
    finally:
        server.shutdown()
        server.server_close()


class HeldApi:
    """A SenderApi stand-in that shows who runs when: each one made names itself in `made`,
    and its one page (of no subscriptions) waits for `go`."""

    def __init__(self, name: str, made: list[str], go: asyncio.Event) -> None:
        made.append(name)
        self.go = go

    async def subscriptions(self) -> AsyncIterator[tuple[int, list[dict[str, Any]]]]:
        await self.go.wait()
        yield 1, []

    async def close(self) -> None:
        pass
