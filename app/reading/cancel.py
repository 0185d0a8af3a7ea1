"""A read whose client has gone is cancelled, and its statement with it.

Starlette lets a request's handler run to its end after the client left, so a slow read
nobody waits for would keep one of the read pool's few connections until its statement
timeout. Here the handler of a GET (or HEAD) is cancelled as soon as the client
disconnects; asyncpg then sends PostgreSQL a cancel request for the statement under way.
"""

import asyncio
from contextlib import suppress

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CLIENT_GONE = 499  # nginx's "client closed request": only the access log sees it
READS = ("GET", "HEAD")


class CancelOnDisconnect:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in READS:
            await self.app(scope, receive, send)
            return
        gone = asyncio.Event()
        responded = False

        async def tracked(message: Message) -> None:
            nonlocal responded
            if message["type"] == "http.response.body" and not message.get("more_body"):
                responded = True
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, _empty_body_then(gone), tracked))
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive, gone))
        try:
            await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if gone.is_set() and not responded:
                handler.cancel()
                with suppress(asyncio.CancelledError):
                    await handler
                await send({"type": "http.response.start", "status": CLIENT_GONE, "headers": []})
                return
            await handler
        finally:
            handler.cancel()
            watcher.cancel()


async def _wait_for_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    """A read's body (if any) is ignored; the next message that matters is the client
    leaving (the server also says so once the response is complete)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()


def _empty_body_then(gone: asyncio.Event) -> Receive:
    """The handler's `receive`: an empty body, then the disconnect when it comes."""
    sent_body = False

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    return receive
