"""Engine construction. One engine per process, built in the app's lifespan."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import orjson
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

# libpq parameters asyncpg cannot honour. It has no channel binding: TLS (sslmode) still
# protects the connection, and SCRAM still authenticates it.
UNSUPPORTED_PARAMETERS = {"channel_binding"}


def json_serializer(value: Any) -> str:
    # orjson writes non-finite floats as null, so no JSON value can fail to store.
    return orjson.dumps(value).decode()


def asyncpg_dsn(url: str) -> str:
    """The URL as asyncpg's own parser reads it: libpq parameters such as `sslmode=require`
    and `sslrootcert`, as managed PostgreSQL services hand them out, keep their meaning
    (through SQLAlchemy's URL they would become unknown keyword arguments)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in UNSUPPORTED_PARAMETERS]
    return urlunsplit(parts._replace(scheme="postgresql", query=urlencode(query)))


def make_engine(
    url: str, *, pool_size: int = 20, statement_timeout_ms: int | None = None
) -> AsyncEngine:
    """No pre-ping (a round trip per delivery): a dropped connection fails its delivery with
    503, SQLAlchemy then invalidates the pool, and the sender's retry gets a fresh one."""
    dsn = asyncpg_dsn(url)
    settings = server_settings(statement_timeout_ms)

    async def connect() -> Any:
        return await asyncpg.connect(dsn, timeout=5, server_settings=settings)

    return create_async_engine(
        "postgresql+asyncpg://",
        async_creator=connect,
        # A fixed pool: overflow connections would be opened and closed under every burst.
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=10,
        json_serializer=json_serializer,
        json_deserializer=orjson.loads,
    )


def server_settings(statement_timeout_ms: int | None) -> dict[str, str]:
    settings = {"application_name": "coldmail-webhooks"}
    if statement_timeout_ms:
        settings["statement_timeout"] = str(statement_timeout_ms)
    return settings


@asynccontextmanager
async def raw_connection(engine: AsyncEngine) -> AsyncIterator[Any]:
    """A pooled connection's asyncpg handle, for statements run straight on asyncpg.

    After a failure asyncpg may be left mid-protocol without reporting itself closed (seen
    when a backend is terminated), so a connection that failed in any way is discarded: the
    pool never hands it out again.
    """
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        try:
            yield raw
        except BaseException:
            await conn.invalidate()
            raise
