"""The outbox recording and reconcile are handed (app/recording/record.py's Outbox), and the
drainer (app/receiving/receiver.py's SpoolEvents): the derived events each cause, enqueued
for the destinations that want them in the transaction of their cause."""

import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import raw_connection
from app.destinations import Destination
from app.outbound import derived
from app.outbound.derived import Derived
from app.outbound.messages import enqueue
from app.receiving.delivery import Rejection
from app.recording.effects import Effects

log = logging.getLogger("coldmail.outbound")


@dataclass
class DestinationsOutbox:
    engine: AsyncEngine
    destinations: Sequence[Destination]
    # whose spool: a replica's host name (a StatefulSet pod's is stable)
    replica: str = field(default_factory=socket.gethostname)

    @property
    def telling(self) -> bool:
        return bool(self.destinations)

    def wanted(self, type: str) -> bool:
        """Whether any destination takes this type (for some customer)."""
        return any(d.takes(type) for d in self.destinations)

    def tells(self, changes: Effects | None, *, completing: bool = True) -> bool:
        return changes is not None and derived.may_derive(changes, self.wanted, completing)

    async def tell(self, conn: asyncpg.Connection, found: list[Derived]) -> None:
        for event in found:
            await enqueue(conn, self.destinations, event.type, event.data, user_id=event.user_id)

    async def applied(self, conn: asyncpg.Connection, many: Sequence[Effects]) -> None:
        await self.tell(conn, await derived.of_deliveries(conn, many, self.wanted))

    async def rejected(self, conn: asyncpg.Connection, rejection: Rejection) -> None:
        if self.wanted("deliveries.rejected"):
            at = rejection.received_at or datetime.now(UTC)
            found = await derived.rejected(
                conn, reason=rejection.reason, event=rejection.event, at=at
            )
            await self.tell(conn, found)

    async def spool_started(self, *, since: datetime, depth: int) -> None:
        if self.wanted("spool.started") or self.wanted("spool.drained"):
            async with raw_connection(self.engine) as conn, conn.transaction():
                found = await derived.spool_started(
                    conn, replica=self.replica, since=since, depth=depth
                )
                await self.tell(conn, found)

    async def spool_drained(self, *, applied: int, seconds: float) -> None:
        if self.wanted("spool.started") or self.wanted("spool.drained"):
            async with raw_connection(self.engine) as conn, conn.transaction():
                found = await derived.spool_drained(
                    conn, replica=self.replica, applied=applied, seconds=seconds
                )
                await self.tell(conn, found)

    async def reconciled(self, conn: asyncpg.Connection, report: dict[str, Any]) -> None:
        if self.wanted("reconcile.drift"):
            await self.tell(conn, await derived.reconcile_drift(conn, report))
