"""Recording many deliveries in one transaction: the spool's drain applies its rows so,
and concurrent live deliveries are committed together (group commit).

A group is one transaction and one WAL flush, its statements sent in a pipeline, one
`fetchmany` per statement shape. Should any statement fail, nothing of the group is kept
and each of its deliveries is recorded again on its own (`record`, its own transaction):
one bad delivery answers only its own sender, and every outcome is still known only
after its commit. A delivery that writes an order's mailboxes in parts is always recorded
on its own, as its parts are written while the next are encrypted.
"""

import asyncio
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from app.crypto import Vault
from app.db import describe, is_transient, lost_a_race, raw_connection
from app.destinations import Destination
from app.outbound.messages import forward_many
from app.receiving import payloads
from app.receiving.delivery import Delivery, Outcome
from app.recording import effects
from app.recording.effects import Effects, Row
from app.recording.forwarding import Forwarded
from app.recording.merge import Upsert
from app.recording.record import (
    Outbox,
    delivery_version,
    delivery_write,
    forwarding_of,
    insert_only,
    record,
    tells,
    upsert,
)

log = logging.getLogger("coldmail.recording")
# record.MARK_CONFLICT for every conflicting eventId of a group at once.
MARK_CONFLICTS = "UPDATE events SET conflict = true WHERE event_id = any($1) AND NOT conflict"
# The most deliveries one live group takes: a larger backlog is split into several.
MAX_GROUP = 256
# Groups written at once, each on a connection of its own.
WRITERS = 4

Result = Outcome | Exception


@dataclass(frozen=True)
class Prepared:
    """A delivery with its effects worked out (and its credentials encrypted) in the
    sender's own task, ready to join a group."""

    delivery: Delivery
    model: payloads.HandledEvent | None
    changes: Effects | None
    outbound: Forwarded | None = None

    @property
    def alone(self) -> bool:
        """An order: its mailboxes and derived values take more than one statement."""
        return self.changes is not None and self.changes.order_id is not None


def prepare(
    vault: Vault,
    delivery: Delivery,
    model: payloads.HandledEvent | None,
    destinations: Sequence[Destination] = (),
) -> Prepared:
    changes = (
        None
        if model is None
        else effects.of(
            model, vault=vault, when=delivery.event_time, version=delivery_version(delivery)
        )
    )
    return Prepared(delivery, model, changes, forwarding_of(delivery, model, destinations))


Item = tuple[Delivery, payloads.HandledEvent | None]


@dataclass(frozen=True)
class Telling:
    """Whom a recorded delivery is told to: the destinations its event is forwarded to,
    and the outbox its derived events go to (record.record's last two arguments)."""

    destinations: Sequence[Destination] = ()
    outbox: Outbox | None = None


NOBODY = Telling()


async def record_many(
    engine: AsyncEngine, vault: Vault, items: Sequence[Item], telling: Telling = NOBODY
) -> list[Result]:
    """Each delivery's outcome, or the error that kept it from being recorded, in order
    (the spool's drain: the event loop serves live deliveries between two preparations)."""
    prepared = []
    for delivery, model in items:
        prepared.append(prepare(vault, delivery, model, telling.destinations))
        await asyncio.sleep(0)
    return await record_prepared(engine, vault, prepared, telling)


async def record_prepared(
    engine: AsyncEngine, vault: Vault, items: Sequence[Prepared], telling: Telling = NOBODY
) -> list[Result]:
    together = [i for i, item in enumerate(items) if not item.alone]
    results: dict[int, Result] = {}
    try:
        written = await _together(engine, vault, items, together, telling.outbox)
        results = dict(zip(together, written, strict=True))
    except Exception as error:
        if is_transient(error) and not lost_a_race(error):  # the database is away: for all
            results = dict.fromkeys(together, error)
        else:
            log.info("a group failed (%s); its deliveries are recorded one by one", describe(error))
    for i, item in enumerate(items):
        if i not in results:
            results[i] = await _alone(engine, vault, item, telling)
    return [results[i] for i in range(len(items))]


async def _alone(engine: AsyncEngine, vault: Vault, item: Prepared, telling: Telling) -> Result:
    try:
        return await record(
            engine, vault, item.delivery, item.model, telling.destinations, telling.outbox
        )
    except Exception as error:
        return error


async def _together(
    engine: AsyncEngine,
    vault: Vault,
    items: Sequence[Prepared],
    chosen: list[int],
    outbox: Outbox | None,
) -> list[Outcome]:
    """The chosen deliveries in one transaction, one pipelined `fetchmany` per statement
    shape (in eventId order, so that concurrent groups take the events' locks in one
    order), then the full merge of each insert-only effect whose row was already stored
    (record.insert_only), then the forwarded messages of those newly recorded (one
    statement for all) and their derived events; their outcomes in the order chosen."""
    if not chosen:
        return []
    shapes: dict[str, list[tuple[int, list[Any]]]] = defaultdict(list)
    merges: dict[int, tuple[Upsert, list[Row]]] = {}
    ordered = sorted(chosen, key=lambda i: items[i].delivery.event_id or "")
    for i in ordered:
        changes = items[i].changes
        telling = tells(outbox, changes)
        only = insert_only(changes, telling=telling)
        sql, args = delivery_write(
            items[i].delivery, changes, vault, telling=telling, insert_only=only
        )
        shapes[sql].append((i, args))
        if changes is not None and only is not None:
            merges[i] = changes.upserts[only]
    rows: dict[int, Any] = {}
    async with raw_connection(engine) as conn, conn.transaction():
        for sql, calls in shapes.items():
            found = await conn.fetchmany(sql, [args for _, args in calls])
            rows.update(zip((i for i, _ in calls), found, strict=True))
        stored = [m for i, m in merges.items() if rows[i]["inserted"] and not rows[i]["fresh"]]
        await _merged(conn, stored)
        # the new events' forwarded messages, all in one statement (a duplicate has none)
        forwarded = [(rows[i]["id"], items[i].outbound) for i in ordered if rows[i]["inserted"]]
        await forward_many(conn, [[at, *f.arguments()] for at, f in forwarded if f is not None])
        if outbox is not None:
            told = [(items[i].changes, rows[i]) for i in chosen if rows[i]["inserted"]]
            changed = [
                c
                for c, row in told
                if c is not None and outbox.tells(c, completing=row["may_complete"])
            ]
            if changed:
                await outbox.applied(conn, changed)
        conflicts = [items[i].delivery.event_id for i, row in rows.items() if row["conflict"]]
        if conflicts:
            await conn.execute(MARK_CONFLICTS, conflicts)
    return [_outcome(items[i], rows[i]) for i in chosen]


async def _merged(conn: asyncpg.Connection, merges: list[tuple[Upsert, list[Row]]]) -> None:
    """Each effect's full upsert, in the order given: one statement per upsert for all the
    rows of the group, but a key given again goes to a later statement (a statement cannot
    update a row twice, and each delivery's merge applies in full)."""
    seen: Counter[tuple[Upsert, tuple[Any, ...]]] = Counter()
    rounds: dict[tuple[int, Upsert], list[Row]] = defaultdict(list)
    for statement, given in merges:
        for row in given:
            key = (statement, tuple(row[k] for k in statement.key))
            rounds[seen[key], statement].append(row)
            seen[key] += 1
    for (_, statement), round_rows in rounds.items():
        await upsert(conn, statement, round_rows)


def _outcome(item: Prepared, row: Any) -> Outcome:
    """What the sender is answered (no row id: only `replay`, which records alone, uses it)."""
    if not row["inserted"]:
        return Outcome("duplicate")
    return Outcome("processed" if item.model else "ignored", bool(row["conflict"]))


@dataclass
class GroupCommit:
    """Live deliveries that arrive within `window` seconds of each other are committed
    together, up to WRITERS groups at once; a window of 0 records each on its own."""

    engine: AsyncEngine
    vault: Vault
    window: float
    telling: Telling = NOBODY
    _pending: list[tuple[Prepared, asyncio.Future[Result]]] = field(default_factory=list)
    _gathering: bool = False
    _writers: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(WRITERS))
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def record_many(self, items: Sequence[Item]) -> list[Result]:
        return await record_many(self.engine, self.vault, items, self.telling)

    async def record(self, delivery: Delivery, model: payloads.HandledEvent | None) -> Outcome:
        """Like `record`: the outcome once committed, or the error that kept it out."""
        told = self.telling
        if self.window <= 0:
            return await record(
                self.engine, self.vault, delivery, model, told.destinations, told.outbox
            )
        item = prepare(self.vault, delivery, model, told.destinations)
        if item.alone:  # an order's effects are made in its own statements (cheaply again)
            return await record(
                self.engine, self.vault, delivery, model, told.destinations, told.outbox
            )
        waiter: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((item, waiter))
        if not self._gathering:
            self._gathering = True
            self._start(self._write_next(self.window))
        result = await waiter
        if isinstance(result, Exception):
            raise result
        return result

    def _start(self, job: Any) -> None:
        # a task of its own: a sender that leaves cannot strand the rest of its group
        task = asyncio.ensure_future(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_next(self, window: float) -> None:
        await asyncio.sleep(window)
        async with self._writers:
            group, self._pending = self._pending[:MAX_GROUP], self._pending[MAX_GROUP:]
            if self._pending:
                self._start(self._write_next(0))
            else:
                self._gathering = False
            # each delivery's error is its result: record_prepared raises none
            results = await record_prepared(
                self.engine, self.vault, [item for item, _ in group], self.telling
            )
        for (_, waiter), result in zip(group, results, strict=True):
            if not waiter.done():
                waiter.set_result(result)
