"""The read side's access to the database, per token: the read pool, searches bounded."""

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from typing import Any

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import Executable

from app.errors import ApiError

SEARCHES_PER_TOKEN = 2  # of the read pool's 5 connections (per worker)
TOO_MANY_SEARCHES = ApiError(429, {"error": "too_many_searches"}, {"Retry-After": "1"})


class SearchSlots:
    """Searches under way per token (its fingerprint) in this process: one token cannot
    hold the read pool with them, and its searches beyond SEARCHES_PER_TOKEN get a 429."""

    def __init__(self) -> None:
        self.running: Counter[str] = Counter()

    @asynccontextmanager
    async def hold(self, who: str) -> AsyncIterator[None]:
        if self.running[who] >= SEARCHES_PER_TOKEN:
            raise TOO_MANY_SEARCHES
        self.running[who] += 1
        try:
            yield
        finally:
            self.running[who] -= 1
            if not self.running[who]:
                del self.running[who]


class Reader:
    """The read API's access to the database, for one token: each statement checks a
    connection out of the read pool (its own, small, with a statement_timeout and custom
    plans, so no read can starve deliveries) and gives it back with the rows, so none is
    held while a response is sent."""

    def __init__(self, engine: AsyncEngine, searches: SearchSlots, who: str) -> None:
        self.engine, self.searches, self.who = engine, searches, who

    async def execute(self, stmt: Executable, *, search: bool = False) -> Any:
        async with self.searches.hold(self.who) if search else nullcontext():
            async with self.engine.connect() as conn:
                return await conn.execute(stmt)  # buffered: every row is fetched here

    async def write(self, stmt: Executable) -> None:
        """Committed on return."""
        async with self.engine.begin() as conn:
            await conn.execute(stmt)


def reader(request: Request) -> Reader:
    """For the token that ops_token (or the dashboard's session) identified."""
    state = request.app.state
    return Reader(state.read_engine, state.searches, request.state.signed_in)
