"""Cached SQLAlchemy statements run straight on asyncpg: the ingestion hot path.

Profiling showed SQLAlchemy's per-execution work (compiled-cache lookup, parameter and
result processing, the greenlet bridge) to be most of a delivery's CPU. Statements are
still written with SQLAlchemy, compiled once per shape for this dialect, and executed by
asyncpg with positional arguments; asyncpg prepares and caches them per connection.
"""

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import json_serializer

DIALECT = PGDialect_asyncpg(  # type: ignore[no-untyped-call]
    json_serializer=json_serializer, json_deserializer=orjson.loads
)


@dataclass(frozen=True)
class Compiled:
    sql: str
    names: tuple[str, ...]
    fixed: dict[str, Any]
    processors: dict[str, Callable[[Any], Any]]

    def args(self, params: dict[str, Any]) -> list[Any]:
        values = []
        for name in self.names:
            value = params[name] if name in params else self.fixed[name]
            process = self.processors.get(name)
            values.append(process(value) if process and value is not None else value)
        return values

    async def execute(self, conn: asyncpg.Connection, params: dict[str, Any]) -> None:
        await conn.execute(self.sql, *self.args(params))

    async def fetchrow(self, conn: asyncpg.Connection, params: dict[str, Any]) -> Any:
        return await conn.fetchrow(self.sql, *self.args(params))

    async def executemany(self, conn: asyncpg.Connection, rows: Sequence[dict[str, Any]]) -> None:
        await conn.executemany(self.sql, [self.args(row) for row in rows])


def compile_statement(stmt: Any, columns: Sequence[str] | None = None) -> Compiled:
    """Compile once; `columns` names the INSERT columns given as parameters."""
    compiled = stmt.compile(dialect=DIALECT, column_keys=list(columns) if columns else None)
    binds = {name: bind for bind, name in compiled.bind_names.items()}
    names = tuple(compiled.positiontup or ())
    processors = {}
    for name in names:
        process = binds[name].type.bind_processor(DIALECT)
        if process is not None:
            processors[name] = process
    fixed = {name: binds[name].value for name in names if not binds[name].required}
    return Compiled(compiled.string, names, fixed, processors)


@asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection's asyncpg handle inside one transaction.

    The pool cannot see errors raised here, and after a failure asyncpg may be left
    mid-protocol without reporting itself closed (seen when a backend is terminated), so a
    connection that failed in any way is discarded: it is never handed to the next delivery.
    """
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        try:
            async with raw.transaction():
                yield raw
        except BaseException:
            await conn.invalidate()
            raise
