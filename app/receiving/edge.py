"""What the open internet meets first: bounds on the wire, HTTPS rules, HSTS.

- `GuardedHttp` is uvicorn's HTTP/1.1 protocol with the bounds it lacks: a request's line,
  headers and body must all arrive within REQUEST_TIMEOUT_SECONDS of its first byte (of the
  connection, for the first request), else the connection is dropped; the request line and
  headers together stay under MAX_HEADER_BYTES (else 400, and closed); the answer must be
  out, taken by the client's TCP stack, within RESPONSE_TIMEOUT_SECONDS of the request's
  end, else the connection is aborted; a request sent before the last one was answered
  (HTTP pipelining, which no browser or webhook sender uses) ends the connection once that
  answer is out; and a worker holds at most `connection_cap()` connections, answering 503
  to any beyond. Without them a client sending a header line every few seconds, or never
  reading its answer, holds a connection, its memory and a file descriptor for ever, and
  enough of them leave the worker no descriptor to reach the database with.
- `BodyLimit` caps every request's body before a route reads it.
- Credentials travel only over HTTPS (docs/api.md, `/credentials`): `require_https`.
- Every HTTPS response carries Strict-Transport-Security: `HstsMiddleware`.
"""

import asyncio
import ipaddress
import logging
import resource
import socket
from functools import lru_cache
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from app import metrics
from app.config import get_settings
from app.errors import RETRY_AFTER_SECONDS, ApiError, json_response

log = logging.getLogger("coldmail.edge")
MAX_HEADER_BYTES = 64 * 1024
# Every route but the webhook takes a form of a few fields at most (sign-in, an export).
FORM_MAX_BYTES = 8 * 1024
# Descriptors a worker keeps for itself beyond its connections and its delivery pool: the
# read pool, the spool, logs, metrics files, and connections accepted in one burst before
# any of them could be refused.
FD_RESERVE = 160
# The kernel's buffer for a connection's unsent answer. Left to itself Linux grows it to
# megabytes: a client that never reads would park that much kernel memory per connection,
# and its answer would look sent, out of RESPONSE_TIMEOUT_SECONDS' reach. At 128 KiB
# (256 KiB as Linux counts) an answer still streams at 20 Mbit/s over a 100 ms path.
SEND_BUFFER_BYTES = 128 * 1024
HSTS = (b"strict-transport-security", b"max-age=31536000")
PROXY_HEADERS = (b"x-forwarded-proto", b"x-forwarded-for", b"forwarded")
CLOSE = {"Connection": "close"}
# nginx's "client closed request": only our access log line ever sees it
CLIENT_GONE = 499
UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"content-length: 23\r\nretry-after: %d\r\nconnection: close\r\n\r\n"
    b'{"error":"unavailable"}' % RETRY_AFTER_SECONDS
)


def fd_limit() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


@lru_cache
def connection_cap() -> int:
    """MAX_CONNECTIONS, lowered to what the worker's file limit (ulimit -n) leaves: a worker
    out of descriptors can neither reach the database nor write the spool. A connection may
    hold two: its socket, and a file it is being sent (a static asset)."""
    settings = get_settings()
    limit = fd_limit()
    if limit is None:
        return settings.max_connections
    room = (limit - FD_RESERVE - settings.db_pool_size) // 2
    return max(1, min(settings.max_connections, room))


def say_if_capped() -> None:
    """One line at start-up when the file limit lowers MAX_CONNECTIONS."""
    wanted = get_settings().max_connections
    if connection_cap() < wanted:
        log.warning(
            "MAX_CONNECTIONS=%d lowered to %d per worker: the file limit (ulimit -n %s) "
            "leaves no more",
            wanted,
            connection_cap(),
            fd_limit(),
        )


class GuardedHttp(HttpToolsProtocol):
    refused_in_a_row = 0  # by this worker: logged when refusing starts and when it ends

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self.request_timeout = settings.request_timeout_seconds
        self.response_timeout = settings.response_timeout_seconds
        self.deadline: asyncio.TimerHandle | None = None  # the request's
        self.answer_deadline: asyncio.TimerHandle | None = None
        self.answering: RequestResponseCycle | None = None  # the request being answered
        self.header_bytes = 0  # received since the last request's headers ended
        self.in_headers = True

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > connection_cap():
            self._refuse()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        if GuardedHttp.refused_in_a_row:
            log.info("connections under the cap again, %d refused", GuardedHttp.refused_in_a_row)
            GuardedHttp.refused_in_a_row = 0
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
        if self.answer_deadline is not None:
            self.answer_deadline.cancel()
        if self.answering is not None and not self.answering.response_complete:
            # uvicorn tells only the newest request; the one being answered would write to
            # a closed transport, which uvloop refuses with an error
            self.answering.disconnected = True
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        if self.answer_deadline is not None and self._answered():
            self.answer_deadline.cancel()  # the last answer is out: this one gets its own
            self.answer_deadline = None
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self.in_headers, self.header_bytes = False, 0
        super().on_headers_complete()
        if self.pipeline and self.answering is not None:
            # Pipelined: answered no further. Otherwise a client that never reads has every
            # answer it queued computed into the kernel's send buffer (megabytes of them).
            self.pipeline.clear()
            self.answering.keep_alive = False

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        self.answering = cycle
        super()._start_asgi_task(cycle, app)

    def on_message_complete(self) -> None:
        self._disarm()
        self.in_headers = True
        super().on_message_complete()
        if self.answer_deadline is None and not self._answered():
            self.answer_deadline = self.loop.call_later(self.response_timeout, self._unanswered)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.answer_deadline is not None and self._answered():
            self.answer_deadline.cancel()
            self.answer_deadline = None

    def _refuse(self) -> None:
        """Answered at once and closed, unread: a refused connection holds its descriptor
        no longer than it takes to write 150 bytes."""
        if not GuardedHttp.refused_in_a_row:
            log.warning(
                "connection cap reached (%d open): refusing connections with 503",
                connection_cap(),
            )
        GuardedHttp.refused_in_a_row += 1
        metrics.CONNECTIONS_REFUSED.inc()
        self.transport.write(UNAVAILABLE)
        self.transport.close()

    def _answered(self) -> bool:
        """Every answer asked for is complete, and out of this process (with the kernel or
        the client): nothing waits on the client to read."""
        complete = self.answering is None or self.answering.response_complete
        return complete and not self.transport.get_write_buffer_size()

    def _unanswered(self) -> None:
        """Aborted, not closed: a close waits for the unread answer to be sent, for ever."""
        self.answer_deadline = None
        if not self._answered():
            log.info("connection dropped: answer not taken within %ss", self.response_timeout)
            self.transport.abort()

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


class PayloadTooLarge(ApiError):
    def __init__(self) -> None:
        super().__init__(413, {"error": "payload_too_large"}, CLOSE)


class ClientGone(Exception):
    """The client went away before its whole body arrived (or took too long to send it)."""


class BodyLimit:
    """Every request's body is capped before any route reads it: `limits` by path (the
    webhook's MAX_BODY_BYTES), FORM_MAX_BYTES elsewhere. A declared length over the cap is
    answered 413 at once, unread; a streamed body is refused (413) as it passes the cap, so
    no route holds or parses more. A client leaving mid-body ends its request as 499: one
    access line, no traceback."""

    def __init__(self, app: ASGIApp, limits: dict[str, int]) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], FORM_MAX_BYTES)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            too_large = PayloadTooLarge()
            await json_response(413, too_large.body, too_large.headers)(scope, receive, send)
            return
        received, complete = 0, False

        async def capped() -> Message:
            nonlocal received, complete
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge()
                complete = not message.get("more_body", False)
            elif not complete:
                raise ClientGone()
            return message

        try:
            await self.app(scope, capped, send)
        except ClientGone:
            await send({"type": "http.response.start", "status": CLIENT_GONE})
            await send({"type": "http.response.body"})


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
