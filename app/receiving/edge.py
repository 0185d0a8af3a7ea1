"""What the open internet meets first: deadlines on the wire, HTTPS rules, HSTS.

- `GuardedHttp` is uvicorn's HTTP/1.1 protocol with two bounds it lacks: a request's line,
  headers and body must all arrive within REQUEST_TIMEOUT_SECONDS of its first byte (of the
  connection, for the first request), else the connection is dropped; and the request
  line and headers together stay under MAX_HEADER_BYTES (else 400, and closed). Without
  them a client sending a header line every few seconds holds a connection, and its
  memory, for ever.
- Credentials travel only over HTTPS (CONTRACT section 5): `require_https`.
- Every HTTPS response carries Strict-Transport-Security: `HstsMiddleware`.
"""

import asyncio
import ipaddress
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config import get_settings
from app.errors import ApiError

log = logging.getLogger("coldmail.edge")
MAX_HEADER_BYTES = 64 * 1024
HSTS = (b"strict-transport-security", b"max-age=31536000")
PROXY_HEADERS = (b"x-forwarded-proto", b"x-forwarded-for", b"forwarded")


class GuardedHttp(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.request_timeout = get_settings().request_timeout_seconds
        self.deadline: asyncio.TimerHandle | None = None
        self.header_bytes = 0  # received since the last request's headers ended
        self.in_headers = True

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self.in_headers:
            self.header_bytes += len(data)
        super().data_received(data)  # may end the headers: on_headers_complete resets
        if self.in_headers and self.header_bytes > MAX_HEADER_BYTES:
            self.send_400_response("Request headers too large.")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self.in_headers, self.header_bytes = False, 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self.in_headers = True
        super().on_message_complete()

    def _arm(self) -> None:
        if self.deadline is None:
            self.deadline = self.loop.call_later(self.request_timeout, self._expired)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expired(self) -> None:
        """The request is still incomplete: drop it. Once the app has the request, its own
        access line (status 499) tells of it; before that, this is the one line."""
        self.deadline = None
        if self.cycle is None or self.cycle.response_complete:
            log.info("connection dropped: no complete request within %ss", self.request_timeout)
        self.transport.close()


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_https(scope: Scope) -> None:
    """HTTPS (at this server, or said by a trusted proxy, which uvicorn has already turned
    into the scope's scheme), or a loopback client that came through no proxy."""
    if scope.get("scheme") == "https":
        return
    client = scope.get("client")
    proxied = any(name in PROXY_HEADERS for name, _ in scope.get("headers", []))
    if not proxied and is_loopback(client[0] if client else None):
        return
    raise ApiError(403, {"error": "https_required"})


class HstsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("scheme") != "https":
            await self.app(scope, receive, send)
            return

        async def with_hsts(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append(HSTS)
            await send(message)

        await self.app(scope, receive, with_hsts)
