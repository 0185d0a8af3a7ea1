"""Making every accepted delivery durable: PostgreSQL when it answers, else the spool.

`accept` serves the webhook route, committing concurrent deliveries together
(recording/batches.py); `drain` applies what the spool holds, oldest first, a batch at a
time in one transaction, and deletes the batch's rows only after its commit, so a kill -9
at any point loses nothing and applies nothing twice (a row applied but not yet deleted
comes back as a duplicate, which has no effect).
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, Protocol

from cryptography.fernet import InvalidToken
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from app import metrics
from app.crypto import Vault
from app.db import describe, is_transient, pooler_hint, raw_connection
from app.hashing import KEYS_DO_NOT_FIT, Hasher, HashingKey, keys_fit
from app.receiving.delivery import Delivery, Outcome, Rejection
from app.receiving.payloads import HandledEvent, parse_envelope, parse_handled
from app.receiving.signing import SignatureCheck
from app.receiving.spool import Entry, Spool, SpoolFull, TornEntry

log = logging.getLogger("coldmail.receiver")
# After a transient failure, deliveries go straight to the spool for this long instead of
# each waiting out a connection attempt; the drainer's first success ends it early.
CIRCUIT_SECONDS = 2.0
# Spooled deliveries applied in one transaction (and deleted from the spool in one).
DRAIN_BATCH = 500
IDLE_SECONDS = 0.5
# While the database is away the drainer asks it again after 0.1 s, doubling up to this:
# the drain starts within a second of its answering again.
FIRST_RETRY_SECONDS = 0.1
MAX_BACKOFF_SECONDS = 0.5
# With FERNET_KEYS unable to decrypt, nothing changes until a restart: no hurry.
KEYS_WRONG_SECONDS = 10.0
KEYS_CHECK_SECONDS = 30.0


class ApplyFailed(Exception):
    """Applying failed for a reason a retry will not cure; the delivery is kept as rejected."""


# Recording's entry points (app/recording/batches.py and record.py), handed to the
# Receiver by app/main.py: recording sits above receiving, so receiving never imports it.
class Record(Protocol):
    """One live delivery: its outcome once committed (with others that came with it)."""

    async def __call__(self, delivery: Delivery, model: HandledEvent | None) -> Outcome: ...


class RecordMany(Protocol):
    """Many deliveries in one transaction: each one's outcome, or the error that kept it
    out (one failing never keeps the others out)."""

    async def __call__(
        self, items: Sequence[tuple[Delivery, HandledEvent | None]]
    ) -> list[Outcome | Exception]: ...


class StoreRejected(Protocol):
    async def __call__(
        self, engine: AsyncEngine, vault: Vault, rejection: Rejection, *, max_bytes: int
    ) -> None: ...


class SpoolEvents(Protocol):
    """Told of the spool's outages by the drainer (app/outbound/outbox.py), handed to the
    Receiver by app/main.py."""

    async def spool_started(self, *, since: datetime, depth: int) -> None:
        """The drainer found spooled deliveries (waiting since `since`): the database was
        away, and can be told now that it is back."""

    async def spool_drained(self, *, applied: int, seconds: float) -> None:
        """The drainer emptied the spool."""


@dataclass
class Receiver:
    engine: AsyncEngine
    vault: Vault
    spool: Spool
    hashing: HashingKey
    rejected_max_bytes: int
    record: Record
    record_many: RecordMany
    store: StoreRejected
    # told when a drain begins and ends (app/outbound: spool.started, spool.drained)
    spool_events: SpoolEvents | None = None
    database_down_until: float = 0.0
    # When this process first found the database away, for the dashboard's banner.
    away_since: datetime | None = None
    spooling: bool = False
    # The outage being logged: its cause, and what the drain has applied since it began.
    outage: str | None = None
    drained: int = 0
    drain_started: float | None = None
    # FERNET_KEYS cannot decrypt what is stored: deliveries wait in the spool until a
    # restart with the right keys (keys do not change in a running process).
    keys_wrong: bool = False
    keys_fit_until: float = 0.0
    # How the drainer waits between tries (tests pass a clock of their own); None: real
    # time, cut short by stop().
    pause: Callable[[float], Awaitable[None]] | None = None
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    # --- live deliveries ------------------------------------------------------------------

    async def hasher(self) -> Hasher | None:
        """The hashing key, or None while the database (which keeps it) cannot be reached."""
        if (
            self.hashing.hasher is None
            and not self.keys_wrong
            and time.monotonic() >= self.database_down_until
        ):
            try:
                await self.hashing.get()
            except InvalidToken:
                self.keys_failed()
            except Exception as error:
                if not is_transient(error):
                    raise
                self._database_failed(error)
        return self.hashing.hasher

    async def accept(self, delivery: Delivery, model: HandledEvent | None) -> Outcome:
        """Commit the delivery, or spool it while the database cannot be reached.

        Raises ApplyFailed (kept as rejected: answer 500) or SpoolFull (answer 503)."""
        if delivery.hasher is not None and time.monotonic() >= self.database_down_until:
            try:
                outcome = await self.record_or_reject(delivery, model)
                self.database_back()
                return outcome
            except ApplyFailed:
                raise
            except Exception as error:
                if not is_transient(error):  # not even kept as rejected: keep it here
                    log.error("keeping the delivery failed (%s); spooled", describe(error))
                    await self._spool(delivery.raw, delivery_meta(delivery), delivery.received_at)
                    raise ApplyFailed() from None
                self._database_failed(error)
        await self._spool(delivery.raw, delivery_meta(delivery), delivery.received_at)
        return Outcome("queued")

    async def record_or_reject(self, delivery: Delivery, model: HandledEvent | None) -> Outcome:
        try:
            return await self.record(delivery, model)
        except Exception as error:
            await self._reject_failed(delivery, error)

    async def _reject_failed(self, delivery: Delivery, error: Exception) -> NoReturn:
        """Raises `error` when a retry may cure it; else keeps the delivery among rejected
        deliveries and raises ApplyFailed."""
        if is_transient(error):
            raise error
        kind = getattr(error, "sqlstate", None) or type(error).__name__
        why = pooler_hint(error) or kind
        log.error("applying failed (%s); kept as rejected", why, extra=_ids(delivery))
        await self.store_rejected(apply_failed(delivery, kind))
        raise ApplyFailed() from None

    async def keep_rejected(self, rejection: Rejection) -> None:
        """Store a refused delivery; spooled while the database cannot be reached."""
        try:
            await self.store_rejected(rejection)
        except Exception as error:
            if not is_transient(error):
                raise
            self._database_failed(error)
            received = rejection.received_at or datetime.now(UTC)
            await self._spool(rejection.raw, rejected_meta(rejection), received)

    async def store_rejected(self, rejection: Rejection) -> None:
        await self.store(self.engine, self.vault, rejection, max_bytes=self.rejected_max_bytes)

    def _database_failed(self, error: Exception) -> None:
        self.database_down_until = time.monotonic() + CIRCUIT_SECONDS
        self.database_away()
        if self.outage is not None:  # one line per outage, with its cause
            return
        self.outage = describe(error)
        if hint := pooler_hint(error):  # not an outage: a setting to fix
            log.error("%s; deliveries go to the spool until then", hint)
        else:
            log.warning(
                "database unreachable (%s): deliveries go to the spool until it answers",
                self.outage,
            )

    def database_away(self) -> None:
        self.away_since = self.away_since or datetime.now(UTC)

    def database_back(self) -> None:
        self.away_since = None
        if self.outage is not None and not self.spooling:
            self.outage = None
            log.warning("the database answers again; nothing was spooled")

    def keys_failed(self) -> None:
        if not self.keys_wrong:
            log.error("%s; deliveries wait in the spool", KEYS_DO_NOT_FIT)
        self.keys_wrong = True

    async def check_keys(self) -> bool:
        """For /readyz: whether FERNET_KEYS decrypts what is stored. A success holds for
        KEYS_CHECK_SECONDS: a `rotate-keys` run elsewhere under a key this process lacks
        shows within that."""
        if time.monotonic() < self.keys_fit_until:
            return True
        if await keys_fit(self.engine, self.vault):
            self.keys_fit_until = time.monotonic() + KEYS_CHECK_SECONDS
            return True
        self.keys_failed()
        return False

    async def _spool(self, raw: bytes, meta: dict[str, Any], received_at: datetime) -> None:
        await self.spool.put(
            body=self.vault.encrypt(raw), meta=meta, received_at=received_at.timestamp()
        )
        self.spooling = True

    # --- the drainer ------------------------------------------------------------------------

    async def drain_forever(self) -> None:
        """Runs inside `serve`: drains when there is work, asks again soon while the
        database is away, and leaves every row it has not committed where it is."""
        delay, away = IDLE_SECONDS, False
        while not self._stopping.is_set():
            try:
                if self.spool.try_become_drainer():
                    if away:  # one cheap statement, before a batch is decrypted for nothing
                        await self._probe()
                    delay, away = (IDLE_SECONDS if await self.drain() == 0 else 0), False
            except InvalidToken:
                self.keys_failed()
                delay = KEYS_WRONG_SECONDS
            except Exception as error:
                if is_transient(error):
                    self.database_away()
                else:
                    log.exception("the drainer failed; retrying")
                away = True
                delay = min(max(delay * 2, FIRST_RETRY_SECONDS), MAX_BACKOFF_SECONDS)
            await (self.pause or self._wait)(delay)

    async def _probe(self) -> None:
        """Raises what the database raises while it cannot be reached."""
        async with raw_connection(self.engine) as conn:
            await conn.fetchval("SELECT 1")

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def stop(self) -> None:
        self._stopping.set()

    async def drain(self) -> int:
        """Apply one batch of spooled rows, oldest first; how many were taken out."""
        if self.keys_wrong:
            return 0
        rows = await self.spool.oldest(DRAIN_BATCH)
        if rows and self.drain_started is None:
            if self.spool_events is not None:
                depth, oldest, _ = await self.spool.depth()
                since = datetime.now(UTC) - timedelta(seconds=oldest or 0.0)
                await self.spool_events.spool_started(since=since, depth=depth)
            self.drain_started = time.monotonic()
        done: list[int] = []
        try:
            await self._drain_rows(rows, done)
        finally:  # what was committed leaves the spool, even when the rest could not
            await self.spool.delete_many(done)
            self.drained += len(done)
        if rows:
            self.database_down_until, self.away_since = 0.0, None
        depth, _, _ = await self.spool.depth()
        metrics.SPOOL_DEPTH.set(depth)
        if depth == 0 and self.drain_started is not None:
            seconds = time.monotonic() - self.drain_started
            if self.spool_events is not None:
                await self.spool_events.spool_drained(applied=self.drained, seconds=seconds)
            self._drained(seconds)
        return len(rows)

    async def _drain_rows(self, rows: list[Entry | TornEntry], done: list[int]) -> None:
        """Apply the rows; `done` gets the id of each one committed (or set aside)."""
        batch: list[tuple[int, tuple[Delivery, HandledEvent | None]]] = []
        for row in rows:
            if isinstance(row, TornEntry):
                await self._set_aside(row.id, row.why)
                continue
            try:
                raw = self.vault.decrypt(row.body)
            except InvalidToken:
                await self._set_aside(row.id, "body cannot be decrypted with FERNET_KEYS")
                continue
            if row.meta["kind"] == "rejected":
                await self.store_rejected(spooled_rejection(row, raw))
                done.append(row.id)
            else:
                batch.append((row.id, await self._spooled_delivery(row, raw)))
        results = await self.record_many([item for _, item in batch])
        waiting: Exception | None = None
        for (row_id, (delivery, _)), result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                try:
                    await self._reject_failed(delivery, result)
                except ApplyFailed:
                    pass  # kept among rejected deliveries
                except Exception as error:  # the database went away: the row waits
                    waiting = error
                    continue
            done.append(row_id)
        if waiting is not None:
            raise waiting

    def _drained(self, seconds: float) -> None:
        log.warning(
            "the spool is empty again: %d spooled deliveries applied in %.1f s",
            self.drained,
            seconds,
        )
        self.spooling, self.outage = False, None
        self.drained, self.drain_started = 0, None

    async def _spooled_delivery(
        self, entry: Entry, raw: bytes
    ) -> tuple[Delivery, HandledEvent | None]:
        meta = entry.meta
        signature = SignatureCheck(meta["signature"], meta.get("form"), meta.get("signedAt"))
        received = datetime.fromtimestamp(entry.received_at, UTC)
        hasher = await self.hashing.get()
        envelope = parse_envelope(raw, hasher)
        try:
            model = parse_handled(envelope, [])
        except ValidationError:  # valid when spooled: only a change of schema gets here
            model = None
        warnings = meta.get("warnings", [])
        delivery = Delivery(envelope, raw, signature, received, warnings, True, hasher)
        return delivery, model

    async def _set_aside(self, row_id: int, why: str) -> None:
        log.error("spool row %s set aside: %s", row_id, why)
        metrics.SPOOL_SET_ASIDE.inc()
        await self.spool.set_aside(row_id, why)


def delivery_meta(delivery: Delivery) -> dict[str, Any]:
    return {
        "kind": "delivery",
        "signature": delivery.signature.result,
        "form": delivery.signature.form,
        "signedAt": delivery.signature.signed_at,
        "warnings": delivery.warnings,
    }


def rejected_meta(rejection: Rejection) -> dict[str, Any]:
    return {
        "kind": "rejected",
        "signature": rejection.signature,
        "reason": rejection.reason,
        "errors": rejection.errors,
        "event": rejection.event,
        "eventId": rejection.event_id,
    }


def spooled_rejection(entry: Entry, raw: bytes) -> Rejection:
    meta = entry.meta
    received = datetime.fromtimestamp(entry.received_at, UTC)
    return Rejection(
        raw,
        meta["signature"],
        meta["reason"],
        meta["errors"],
        meta.get("event"),
        meta.get("eventId"),
        received,
    )


def apply_failed(delivery: Delivery, kind: str) -> Rejection:
    error = {"loc": [], "msg": "applying the event failed", "type": kind}
    return Rejection(
        delivery.raw,
        delivery.signature.result,
        "apply_failed",
        [error],
        delivery.event,
        delivery.event_id,
        delivery.received_at,
    )


def _ids(delivery: Delivery) -> dict[str, str | None]:
    return {"eventId": delivery.event_id, "event": delivery.event}


__all__ = ["ApplyFailed", "Receiver", "SpoolFull"]
