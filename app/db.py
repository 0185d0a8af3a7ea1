"""Engine construction (one engine per process, built in the app's lifespan), and what a
database failure means: a lost connection, a race lost, or any failure a retry can cure."""

import asyncio
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import orjson
import sqlalchemy.exc
from sqlalchemy import Engine, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

# libpq parameters asyncpg cannot honour. It has no channel binding: TLS (sslmode) still
# protects the connection, and SCRAM still authenticates it.
UNSUPPORTED_PARAMETERS = {"channel_binding"}
# `?prepared_statement_cache_size=0` (SQLAlchemy's name for it) says a pooler in
# transaction mode (PgBouncer) stands between us and PostgreSQL: a statement prepared in
# one transaction may not exist on the server connection the next one gets.
POOLER_PARAMETER = "prepared_statement_cache_size"
# Per engine: pooled connections opened before this moment (time.monotonic) are thrown away
# at checkout, because one of their generation was found dead.
_lost_before: weakref.WeakKeyDictionary[Engine, float] = weakref.WeakKeyDictionary()


def json_serializer(value: Any) -> str:
    # orjson writes non-finite floats as null, so no JSON value can fail to store.
    return orjson.dumps(value).decode()


def asyncpg_dsn(url: str) -> str:
    """The URL as asyncpg's own parser reads it: libpq parameters such as `sslmode=require`
    and `sslrootcert`, as managed PostgreSQL services hand them out, keep their meaning
    (through SQLAlchemy's URL they would become unknown keyword arguments)."""
    parts = urlsplit(url)
    dropped = UNSUPPORTED_PARAMETERS | {POOLER_PARAMETER}
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in dropped]
    return urlunsplit(parts._replace(scheme="postgresql", query=urlencode(query)))


def statement_cache_size(url: str) -> int:
    """asyncpg's prepared-statement cache per connection: 0 behind a transaction pooler."""
    given = dict(parse_qsl(urlsplit(url).query)).get(POOLER_PARAMETER)
    return int(given) if given is not None and given.isdigit() else 100


def unique_statement_name() -> str:
    return f"__cmw_{uuid.uuid4().hex}__"


def make_engine(
    url: str,
    *,
    pool_size: int = 20,
    statement_timeout_ms: int | None = None,
    custom_plans: bool = False,
) -> AsyncEngine:
    """No pre-ping (a round trip per delivery): a delivery whose connection was dropped is
    spooled (app/receiving/receiver.py), the failed connection is discarded
    (raw_connection), and the next one is opened fresh."""
    dsn, cache = asyncpg_dsn(url), statement_cache_size(url)
    pooled = cache == 0
    # A pooler refuses settings at connection start: there each transaction sets them.
    settings = server_settings(statement_timeout_ms, custom_plans=custom_plans)

    async def connect() -> Any:
        at_start = {"application_name": "coldmail-webhooks"} | ({} if pooled else settings)
        return await asyncpg.connect(
            dsn, timeout=5, server_settings=at_start, statement_cache_size=cache
        )

    def creator() -> Any:  # SQLAlchemy's own statement cache must follow asyncpg's
        return engine.sync_engine.dialect.dbapi.connect(  # type: ignore[union-attr]
            async_creator_fn=connect,
            prepared_statement_cache_size=cache,
            prepared_statement_name_func=unique_statement_name if pooled else None,
        )

    engine = create_async_engine(
        "postgresql+asyncpg://",
        creator=creator,
        # A fixed pool: overflow connections would be opened and closed under every burst.
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=10,
        json_serializer=json_serializer,
        json_deserializer=orjson.loads,
        # A failed statement's error, logged with its traceback, names no bound value.
        hide_parameters=True,
    )
    discard_connections_opened_before_a_loss(engine.sync_engine)
    if pooled:
        each = ", ".join(
            f"set_config('{name}', '{value}', true)" for name, value in settings.items()
        )
        local = f"SELECT {each}"
        event.listen(engine.sync_engine, "begin", lambda conn: conn.exec_driver_sql(local))
    return engine


def discard_connections_opened_before_a_loss(engine: Engine) -> None:
    """When PostgreSQL (or the pooler in front of it) restarts, every pooled connection is
    dead, not just the one that failed. Without this each of them would fail one statement
    in turn (the drainer, backing off between tries, would need minutes to get through a
    pool of 20); with it, the first failure renews the whole pool as it is checked out."""

    @event.listens_for(engine, "connect")
    def opened(dbapi_connection: Any, record: Any) -> None:
        record.info["opened"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def still_alive(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if record.info.get("opened", 0.0) < _lost_before.get(engine, 0.0):
            raise DisconnectionError("opened before PostgreSQL dropped its connections")


def lost_connection(error: BaseException) -> bool:
    """Did this failure come from the connection itself (closed, reset, server shut down,
    or left mid-protocol by a termination it half noticed)?"""
    sqlstate = getattr(error, "sqlstate", None)
    return isinstance(error, OSError | asyncpg.InterfaceError | asyncpg.InternalClientError) or (
        isinstance(sqlstate, str) and sqlstate.startswith(("08", "57P"))
    )


RETRYABLE_SQLSTATES = {"40P01", "40001"}  # deadlock detected, serialization failure
# Failures a later attempt can cure: the database unreachable, shutting down, out of
# connections, or a transaction that lost a race. Deliveries hit by these are spooled.
TRANSIENT_SQLSTATE_PREFIXES = ("08", "57P", "53", "40", "55000", "57014")
TRANSIENT_ERRORS = (
    OSError,
    TimeoutError,
    asyncio.TimeoutError,
    sqlalchemy.exc.TimeoutError,  # the pool had no connection to give
    asyncpg.InterfaceError,  # the connection was closed or left mid-protocol
    asyncpg.InternalClientError,
)


def lost_a_race(error: BaseException) -> bool:
    """A deadlock or serialization failure: the same statement at once again will do."""
    return isinstance(error, asyncpg.PostgresError) and error.sqlstate in RETRYABLE_SQLSTATES


def is_transient(error: BaseException) -> bool:
    """Does this failure (or one it wraps) mean "the database cannot do this now"?"""
    seen: BaseException | None = error
    while seen is not None:
        sqlstate = getattr(seen, "sqlstate", None) or getattr(seen, "pgcode", None)
        if isinstance(seen, TRANSIENT_ERRORS) or (
            isinstance(sqlstate, str) and sqlstate.startswith(TRANSIENT_SQLSTATE_PREFIXES)
        ):
            return True
        seen = getattr(seen, "orig", None) or seen.__cause__
    return False


POOLER_HINT = (
    "DATABASE_URL leads to a transaction pooler (PgBouncer or the like), which refuses the "
    "settings and prepared statements of a direct connection: add "
    "?prepared_statement_cache_size=0 to DATABASE_URL"
)
# What a transaction pooler answers a client that takes it for PostgreSQL: a startup
# setting refused (PgBouncer), or a prepared statement missing on, or left behind on, the
# server connection this transaction got (26000, 42P05).
POOLER_SIGNS = ("unsupported startup parameter", "prepared statement")
POOLER_SQLSTATES = {"26000", "42P05"}


def pooler_hint(error: BaseException) -> str | None:
    """POOLER_HINT when this failure (or one it wraps) is a pooler refusing us."""
    seen: BaseException | None = error
    while seen is not None:
        sqlstate = getattr(seen, "sqlstate", None)
        if sqlstate in POOLER_SQLSTATES or any(sign in str(seen) for sign in POOLER_SIGNS):
            return POOLER_HINT
        seen = getattr(seen, "orig", None) or seen.__cause__
    return None


def describe(error: BaseException) -> str:
    """A failure in one short line for the log: the driver's class and first line (the
    statement's parameters are hidden by the engine, so no value a client sent)."""
    cause = getattr(error, "orig", None) or error
    first = (str(cause).strip().splitlines() or [""])[0][:200]
    return f"{type(cause).__name__}: {first}" if first else type(cause).__name__


def server_settings(
    statement_timeout_ms: int | None, *, custom_plans: bool = False
) -> dict[str, str]:
    """No JIT: our statements are short, and the planner's estimate for a count over every
    subscription (the renewal risks) made PostgreSQL spend 0.8 s compiling one that runs in
    0.2 s.

    Custom plans for reads: after five executions of a prepared statement PostgreSQL may
    keep a generic plan, planned without the values. A few searches for long terms (whose
    trigram scans cost more than the generic plan's guess) made it keep, for that search on
    that connection, a walk of the primary key filtering every row: `q=zzzz` then took
    1.4 s at 1M mailboxes instead of 0.1 ms, for every reader the pool gave that connection.
    """
    settings = {"jit": "off"}
    if statement_timeout_ms:
        settings["statement_timeout"] = str(statement_timeout_ms)
    if custom_plans:
        settings["plan_cache_mode"] = "force_custom_plan"
    return settings


@asynccontextmanager
async def raw_connection(engine: AsyncEngine) -> AsyncIterator[Any]:
    """A pooled connection's asyncpg handle, for statements run straight on asyncpg.

    After a failure asyncpg may be left mid-protocol without reporting itself closed (seen
    when a backend is terminated), so a connection that failed in any way is discarded: the
    pool never hands it out again.
    """
    async with engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        try:
            yield driver
        except BaseException as error:
            if lost_connection(error):
                _lost_before[engine.sync_engine] = time.monotonic()
            await conn.invalidate()
            raise
