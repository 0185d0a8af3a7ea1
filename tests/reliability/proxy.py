"""A TCP proxy in front of PostgreSQL that a test can cut, as a network outage would:
new connections are refused and the open ones are dropped, until it is restored."""

import asyncio
import contextlib
from datetime import UTC, datetime

from sqlalchemy.engine import make_url

from tests.servers import free_port


class Proxy:
    def __init__(self, database_url: str) -> None:
        url = make_url(database_url)
        socket_dir = url.query.get("host")  # the embedded server listens on a Unix socket
        if isinstance(socket_dir, str) and socket_dir.startswith("/"):
            self.socket: str | None = f"{socket_dir}/.s.PGSQL.{url.port or 5432}"
        else:
            self.socket = None
        self.target = (url.host or "127.0.0.1", url.port or 5432)
        self.port = free_port()
        proxied = url.difference_update_query(["host"]).set(host="127.0.0.1", port=self.port)
        self.url = proxied.render_as_string(hide_password=False)
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()
        self.held: list[datetime] = []  # when each connection hold() took arrived

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Refuse new connections and drop every open one."""
        if self._server:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._pipes):
            writer.transport.abort()
        self._pipes.clear()

    async def restore(self) -> None:
        await self.start()

    async def hold(self) -> None:
        """As a database that stopped answering: the open connections are dropped, new ones
        are taken and left unanswered until cut() drops them too."""
        await self.cut()
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", self.port)

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.held.append(datetime.now(UTC))
        self._pipes.add(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.socket:
                up_reader, up_writer = await asyncio.open_unix_connection(self.socket)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._pipes |= {writer, up_writer}
        await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        self._pipes -= {writer, up_writer}


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()
