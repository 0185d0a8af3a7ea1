"""Sending outbound messages: retried on the Standard Webhooks schedule, a circuit per
destination shared through PostgreSQL, several replicas side by side (CONTRACT section 9).

A worker claims a batch of due messages with `FOR UPDATE SKIP LOCKED` and keeps the rows
locked while it sends them, so no other replica can send one of them at the same time; the
attempts and outcomes are written in that same transaction. A dispatcher killed mid-send
loses nothing: its transaction dies with it, the messages are still pending, and they are
sent again with the same `webhook-id` (receivers dedupe on it).

Redirects are never followed (a 3xx is a failed attempt): a destination cannot send us to
an internal address; nor can its DNS, changed after start-up (app/outbound/network.py
checks the address of each connection). While a destination's circuit is open its
messages wait without using up their retries; after a cool-down one replica sends one due
message as a probe, and its success closes the circuit and makes every waiting message due
at once.
"""

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import asyncpg
import httpx
import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from app import metrics
from app.db import describe, is_transient, make_engine, raw_connection
from app.destinations import Destination
from app.outbound.formats import Message, request
from app.outbound.network import InternalAddress, Resolve, checked_transport, system_resolve
from app.recording.forwarding import data_of

log = logging.getLogger("coldmail.outbound")
Clock = Callable[[], datetime]

# Standard Webhooks: immediately, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h after each
# failure: eight attempts, then the message is a dead letter.
RETRY_DELAYS = (5, 300, 1800, 7200, 18000, 36000, 36000)
ATTEMPTS = len(RETRY_DELAYS) + 1
JITTER = 0.1  # each delay is drawn within +-10 %
MAX_RETRY_AFTER = 36000  # a Retry-After longer than the longest delay is cut to it
CIRCUIT_FAILURES = 5  # consecutive failed attempts that open a destination's circuit
CIRCUIT_COOLDOWN = timedelta(seconds=60)
TIMEOUT = httpx.Timeout(10.0, connect=5.0)
DEADLINE_SECONDS = 15.0  # the whole attempt, however slowly a receiver trickles
ERROR_LIMIT = 200
STOP_SECONDS = DEADLINE_SECONDS + 5


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Result:
    """One attempt's outcome."""

    started_at: datetime
    latency_ms: float
    status: int | None = None  # the HTTP status, None when there was no answer
    error: str | None = None
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def gone(self) -> bool:
        return self.status == 410


# A forwarded event's message carries no data: its event's stored copy is read with it.
CLAIMED = """
SELECT m.id, m.destination, m.type, m.webhook_id, m.payload, m.occurred_at, m.attempts,
    e.event_id, e.event_time, e.payload AS event_payload
FROM outbound_messages m LEFT JOIN events e ON e.id = m.event_id"""
# The destinations usable now (their circuit closed, not disabled) are worked out once, as
# an array, so the claim walks the due index in its order and stops after a batch (a
# NOT EXISTS per message made the planner sort the whole backlog on every claim).
CLAIM = f"""{CLAIMED}
WHERE m.status = 'pending' AND m.next_attempt_at <= $1
  AND m.destination = ANY(ARRAY(
    SELECT unnest($2::text[])
    EXCEPT SELECT name FROM outbound_destinations
    WHERE opened_at IS NOT NULL OR disabled_at IS NOT NULL))
ORDER BY m.next_attempt_at, m.id
LIMIT $3
FOR UPDATE OF m SKIP LOCKED
"""
# A probe: one due message of a destination whose circuit is open.
CLAIM_PROBE = f"""{CLAIMED}
WHERE m.status = 'pending' AND m.destination = $1 AND m.next_attempt_at <= $2
ORDER BY m.next_attempt_at, m.id LIMIT 1
FOR UPDATE OF m SKIP LOCKED
"""
REGISTER = """
INSERT INTO outbound_destinations (name) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING
"""
# Re-arming the cool-down is what makes one replica, and only one, the prober.
TAKE_PROBES = """
UPDATE outbound_destinations d SET opened_at = $1, updated_at = now()
WHERE name = ANY($2::text[]) AND disabled_at IS NULL AND opened_at <= $1::timestamptz - $3::interval
  AND EXISTS (
    SELECT FROM outbound_messages m
    WHERE m.destination = d.name AND m.status = 'pending' AND m.next_attempt_at <= $1)
RETURNING name
"""
RECORD_ATTEMPTS = """
INSERT INTO outbound_attempts (message_id, destination, started_at, status_code, latency_ms,
    error)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::int[], $5::float8[],
    $6::text[])
"""
RECORD_MESSAGES = """
UPDATE outbound_messages m SET status = u.status, attempts = m.attempts + 1,
    next_attempt_at = u.next_at, last_attempt_at = u.started_at, last_status = u.code,
    last_error = u.error,
    delivered_at = CASE WHEN u.status = 'delivered' THEN u.started_at END
FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::int[],
    $6::text[]) AS u(id, status, next_at, started_at, code, error)
WHERE m.id = u.id
"""
# Any success closes the circuit; failures add up and open it at CIRCUIT_FAILURES; a 410
# disables the destination.
RECORD_DESTINATIONS = """
UPDATE outbound_destinations d SET
    failures = CASE WHEN u.ok THEN 0 ELSE d.failures + u.failed END,
    opened_at = CASE
        WHEN u.ok THEN NULL
        WHEN d.opened_at IS NULL AND d.failures + u.failed >= $5 THEN $6::timestamptz
        ELSE d.opened_at END,
    disabled_at = CASE WHEN u.gone THEN coalesce(d.disabled_at, $6) ELSE d.disabled_at END,
    last_success_at = CASE WHEN u.ok THEN $6 ELSE d.last_success_at END,
    last_failure_at = CASE WHEN u.failed > 0 THEN $6 ELSE d.last_failure_at END,
    updated_at = now()
FROM unnest($1::text[], $2::bool[], $3::int[], $4::bool[]) AS u(name, ok, failed, gone)
WHERE d.name = u.name
"""
# The circuit closed: what waited for the destination is due now.
DUE_NOW = """
UPDATE outbound_messages SET next_attempt_at = $2
WHERE destination = $1 AND status = 'pending' AND next_attempt_at > $2
"""


def retry_after(response: httpx.Response, now: datetime) -> float | None:
    """Seconds asked for by a 429 or 503 (`Retry-After`: seconds or an HTTP date)."""
    if response.status_code not in (429, 503):
        return None
    value = response.headers.get("retry-after", "").strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max((when - now).total_seconds(), 0.0), MAX_RETRY_AFTER)


class Dispatcher:
    """Sends the messages of `destinations` until `run`'s stop event is set.

    `clock` says when "now" is for schedules, claims and the circuit (tests move it instead
    of sleeping); `random` draws the jitter. `step` is one round, for tests and for `run`.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        destinations: Sequence[Destination],
        *,
        public_url: str | None = None,
        clock: Clock = utc_now,
        random: Callable[[], float] = random.random,
        batch: int = 50,
        workers: int = 4,
        poll_seconds: float = 1.0,
        resolve: Resolve = system_resolve,
    ) -> None:
        self.engine = engine
        self.destinations = {d.name: d for d in destinations}
        self.public_url = public_url
        self.clock = clock
        self.random = random
        self.batch = batch
        self.workers = workers
        self.poll_seconds = poll_seconds
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        self.client = httpx.AsyncClient(
            timeout=TIMEOUT,
            follow_redirects=False,
            transport=checked_transport(destinations, resolve, limits),
            headers={"user-agent": "coldmail-webhooks"},
        )

    @property
    def names(self) -> list[str]:
        return sorted(self.destinations)

    async def run(self, stop: asyncio.Event) -> None:
        """Send until `stop` is set; what is being sent then is finished first. A database
        away at start is waited for, as in every round after."""
        try:
            while not stop.is_set():
                try:
                    await self.register()
                    break
                except Exception as error:
                    if not is_transient(error):
                        raise
                    log.warning("outbound: the database is away (%s)", describe(error))
                    await self.pause(stop)
            await asyncio.gather(*(self.work(stop) for _ in range(self.workers)))
        finally:
            await self.client.aclose()

    async def pause(self, stop: asyncio.Event) -> None:
        """Wait `poll_seconds`, or less once `stop` is set."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), self.poll_seconds)

    async def register(self) -> None:
        async with raw_connection(self.engine) as conn:
            await conn.execute(REGISTER, self.names)

    async def work(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                sent = await self.step()
            except Exception as error:
                if not is_transient(error):
                    log.exception("outbound: a round failed")
                else:
                    log.warning("outbound: the database is away (%s)", describe(error))
                sent = 0
            if not sent:
                await self.pause(stop)

    async def step(self) -> int:
        """One round: the probes a cool-down allows, then one batch of due messages.
        Returns how many messages were attempted."""
        now = self.clock()
        probed = await self.probe(now)
        async with raw_connection(self.engine) as conn, conn.transaction():
            rows = await conn.fetch(CLAIM, now, self.names, self.batch)
            if rows:
                await self.send_and_record(conn, [message(row) for row in rows], now)
        return probed + len(rows)

    async def probe(self, now: datetime) -> int:
        async with raw_connection(self.engine) as conn:
            names = [
                r["name"] for r in await conn.fetch(TAKE_PROBES, now, self.names, CIRCUIT_COOLDOWN)
            ]
        sent = 0
        for name in names:
            async with raw_connection(self.engine) as conn, conn.transaction():
                row = await conn.fetchrow(CLAIM_PROBE, name, now)
                if row is None:
                    continue
                results = await self.send_and_record(conn, [message(row)], now)
                if results[0].ok:
                    await conn.execute(DUE_NOW, name, now)
                    log.info("outbound: %s answers again; its circuit is closed", name)
                sent += 1
        return sent

    async def send_and_record(
        self, conn: asyncpg.Connection, messages: list[Message], now: datetime
    ) -> list[Result]:
        results = await asyncio.gather(*(self.send(m) for m in messages))
        await self.record(conn, messages, results, now)
        return list(results)

    async def send(self, message: Message) -> Result:
        destination = self.destinations[message.destination]
        started_at, start = self.clock(), time.perf_counter()
        body, headers = request(destination, message, public_url=self.public_url, sent_at=utc_now())
        try:
            async with asyncio.timeout(DEADLINE_SECONDS):
                async with self.client.stream(
                    "POST", destination.url, content=body, headers=headers
                ) as response:
                    status = response.status_code
                    wait = retry_after(response, utc_now())
        except (httpx.HTTPError, TimeoutError) as error:
            # the class only: an exception's text may quote the URL (a Slack URL is a secret);
            # a refused address's names the host and the address only
            latency = (time.perf_counter() - start) * 1000
            said = str(error) if isinstance(error, InternalAddress) else type(error).__name__
            return Result(started_at, latency, error=said)
        latency = (time.perf_counter() - start) * 1000
        return Result(started_at, latency, status=status, error=why(status), retry_after=wait)

    def next_attempt(self, attempts: int, result: Result, now: datetime) -> datetime | None:
        """When to try again after the attempt numbered `attempts` failed; None: never."""
        if result.gone or attempts >= ATTEMPTS:
            return None
        if result.retry_after is not None:
            return now + timedelta(seconds=result.retry_after)
        delay = RETRY_DELAYS[attempts - 1] * (1 + JITTER * (2 * self.random() - 1))
        return now + timedelta(seconds=delay)

    async def record(
        self,
        conn: asyncpg.Connection,
        messages: list[Message],
        results: Sequence[Result],
        now: datetime,
    ) -> None:
        updates: list[tuple[Any, ...]] = []
        for m, r in zip(messages, results, strict=True):
            later = None if r.ok else self.next_attempt(m.attempts + 1, r, now)
            status = "delivered" if r.ok else ("pending" if later else "dead")
            error = "410 Gone: the destination is disabled" if r.gone else r.error
            updates.append((m.id, status, later, r.started_at, r.status, clip(error)))
        await conn.execute(RECORD_ATTEMPTS, *columns(attempt_rows(messages, results), 6))
        await conn.execute(RECORD_MESSAGES, *columns(updates, 6))
        await conn.execute(RECORD_DESTINATIONS, *destination_outcomes(messages, results), now)
        failures: dict[str, list[str]] = {}
        for m, r in zip(messages, results, strict=True):
            (metrics.OUTBOUND_SENT if r.ok else metrics.OUTBOUND_FAILED).labels(m.destination).inc()
            if not r.ok:
                failures.setdefault(m.destination, []).append(str(r.error))
        for name, errors in failures.items():
            log.info("outbound: %s: %d attempts failed (%s)", name, len(errors), errors[0])
            if any(r.gone for m, r in zip(messages, results, strict=True) if m.destination == name):
                log.warning("outbound: %s answered 410 Gone; it is disabled", name)


def message(row: asyncpg.Record) -> Message:
    """A claimed message (CLAIMED's row) with its data: its own, or, forwarded, built now
    from its event's stored copy (as erased, if it was)."""
    if row["payload"] is not None:
        data = json(row["payload"])
    else:
        data = data_of(json(row["event_payload"]), row["event_id"], row["event_time"])
    return Message(
        id=row["id"],
        destination=row["destination"],
        type=row["type"],
        webhook_id=row["webhook_id"],
        data=data,
        occurred_at=row["occurred_at"],
        attempts=row["attempts"],
    )


def json(value: Any) -> Any:
    """A jsonb value, decoded already where the pool's codec does so."""
    return orjson.loads(value) if isinstance(value, str) else value


def why(status: int) -> str | None:
    """What went wrong, by the answer's status; None for a success."""
    if 300 <= status < 400:
        return f"redirect ({status}) not followed"
    return None if 200 <= status < 300 else f"answered {status}"


def clip(text: str | None) -> str | None:
    return None if text is None else text[:ERROR_LIMIT]


def columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows turned into the arrays an unnest() statement takes."""
    return [[row[i] for row in rows] for i in range(width)]


def attempt_rows(messages: list[Message], results: Sequence[Result]) -> list[tuple[Any, ...]]:
    return [
        (m.id, m.destination, r.started_at, r.status, r.latency_ms, clip(r.error))
        for m, r in zip(messages, results, strict=True)
    ]


def destination_outcomes(
    messages: list[Message], results: Sequence[Result]
) -> tuple[list[str], list[bool], list[int], list[bool], int]:
    """Per destination (in name order, so that concurrent rounds lock rows alike): any
    success, the failures, any 410; then the circuit's threshold."""
    seen: dict[str, tuple[bool, int, bool]] = {}
    for m, r in zip(messages, results, strict=True):
        ok, failed, gone = seen.get(m.destination, (False, 0, False))
        seen[m.destination] = (ok or r.ok, failed + (not r.ok), gone or r.gone)
    names = sorted(seen)
    return (
        names,
        [seen[n][0] for n in names],
        [seen[n][1] for n in names],
        [seen[n][2] for n in names],
        CIRCUIT_FAILURES,
    )


@dataclass
class Running:
    """A dispatcher running in this process (or none): `stop` lets it finish what it is
    sending, within STOP_SECONDS (what it abandons then is sent again later)."""

    task: "asyncio.Task[None] | None" = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    engine: AsyncEngine | None = None

    async def stop(self) -> None:
        self.stopping.set()
        if self.task is not None:
            try:
                await asyncio.wait_for(self.task, STOP_SECONDS)
            except TimeoutError:
                log.warning("outbound: stopped while sending; those messages go again later")
        if self.engine is not None:
            await self.engine.dispose()


def start(
    database_url: str,
    destinations: Sequence[Destination],
    *,
    public_url: str | None,
    workers: int = 4,
) -> Running:
    """A dispatcher on its own small pool: a slow destination never holds a connection
    that deliveries need."""
    engine = make_engine(database_url, pool_size=workers + 1)
    dispatcher = Dispatcher(engine, destinations, public_url=public_url, workers=workers)
    running = Running(engine=engine)
    running.task = asyncio.create_task(dispatcher.run(running.stopping))
    return running
