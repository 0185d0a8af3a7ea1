"""Making every accepted delivery durable: PostgreSQL when it answers, else the spool.

`accept` serves the webhook route; `drain` applies what the spool holds, oldest first,
through the same `record_or_reject` as live deliveries, and deletes each row only after
its commit, so a kill -9 at any point loses nothing and applies nothing twice (a row
applied but not yet deleted comes back as a duplicate, which has no effect).
"""

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from cryptography.fernet import InvalidToken
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from app import metrics
from app.crypto import Vault
from app.db import describe, is_transient, pooler_hint
from app.hashing import KEYS_DO_NOT_FIT, Hasher, HashingKey, keys_fit
from app.receiving.delivery import Delivery, Outcome, Rejection
from app.receiving.payloads import HandledEvent, parse_envelope, parse_handled
from app.receiving.signing import SignatureCheck
from app.receiving.spool import Entry, Spool, SpoolFull

log = logging.getLogger("coldmail.receiver")
# After a transient failure, deliveries go straight to the spool for this long instead of
# each waiting out a connection attempt; the drainer's first success ends it early.
CIRCUIT_SECONDS = 2.0
DRAIN_BATCH = 100
IDLE_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 10.0
KEYS_CHECK_SECONDS = 30.0


class ApplyFailed(Exception):
    """Applying failed for a reason a retry will not cure; the delivery is kept as rejected."""


# Recording's two entry points (app/recording/record.py), handed to the Receiver by
# app/main.py: recording sits above receiving, so receiving never imports it.
class Record(Protocol):
    async def __call__(
        self, engine: AsyncEngine, vault: Vault, delivery: Delivery, model: HandledEvent | None
    ) -> Outcome: ...


class StoreRejected(Protocol):
    async def __call__(
        self, engine: AsyncEngine, vault: Vault, rejection: Rejection, *, max_bytes: int
    ) -> None: ...


@dataclass
class Receiver:
    engine: AsyncEngine
    vault: Vault
    spool: Spool
    hashing: HashingKey
    rejected_max_bytes: int
    record: Record
    store: StoreRejected
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
            return await self.record(self.engine, self.vault, delivery, model)
        except Exception as error:
            if is_transient(error):
                raise
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
        """Runs inside `serve`: drains when there is work, backs off while the database is
        away, and leaves every row it has not committed where it is."""
        delay = IDLE_SECONDS
        while not self._stopping.is_set():
            try:
                if self.spool.try_become_drainer():
                    delay = IDLE_SECONDS if await self.drain() == 0 else 0
            except InvalidToken:
                self.keys_failed()
                delay = MAX_BACKOFF_SECONDS
            except Exception as error:
                if is_transient(error):
                    self.database_away()
                else:
                    log.exception("the drainer failed; retrying")
                delay = min(max(delay * 2, 0.5), MAX_BACKOFF_SECONDS)
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
            except TimeoutError:
                pass

    def stop(self) -> None:
        self._stopping.set()

    async def drain(self) -> int:
        """Apply one batch of spooled rows, oldest first; how many were taken out."""
        if self.keys_wrong:
            return 0
        rows = await self.spool.oldest(DRAIN_BATCH)
        if rows and self.drain_started is None:
            self.drain_started = time.monotonic()
        for row in rows:
            if isinstance(row, Entry):
                await self._drain_one(row)
            else:
                await self._set_aside(row.id, row.why)
            self.drained += 1
        if rows:
            self.database_down_until, self.away_since = 0.0, None
        depth, _, _ = await self.spool.depth()
        metrics.SPOOL_DEPTH.set(depth)
        if depth == 0 and self.drain_started is not None:
            self._drained()
        return len(rows)

    def _drained(self) -> None:
        seconds = time.monotonic() - (self.drain_started or time.monotonic())
        log.warning(
            "the spool is empty again: %d spooled deliveries applied in %.1f s",
            self.drained,
            seconds,
        )
        self.spooling, self.outage = False, None
        self.drained, self.drain_started = 0, None

    async def _drain_one(self, entry: Entry) -> None:
        try:
            raw = self.vault.decrypt(entry.body)
        except InvalidToken:
            await self._set_aside(entry.id, "body cannot be decrypted with FERNET_KEYS")
            return
        received = datetime.fromtimestamp(entry.received_at, UTC)
        meta = entry.meta
        signature = SignatureCheck(meta["signature"], meta.get("form"), meta.get("signedAt"))
        if meta["kind"] == "rejected":
            rejection = Rejection(
                raw,
                meta["signature"],
                meta["reason"],
                meta["errors"],
                meta.get("event"),
                meta.get("eventId"),
                received,
            )
            await self.store_rejected(rejection)
        else:
            await self._apply_spooled(raw, signature, received, meta.get("warnings", []))
        await self.spool.delete(entry.id)

    async def _apply_spooled(
        self, raw: bytes, signature: SignatureCheck, received: datetime, warnings: list[str]
    ) -> None:
        hasher = await self.hashing.get()
        envelope = parse_envelope(raw, hasher)
        try:
            model = parse_handled(envelope, [])
        except ValidationError:  # valid when spooled: only a change of schema gets here
            model = None
        delivery = Delivery(envelope, raw, signature, received, warnings, True, hasher)
        try:
            await self.record_or_reject(delivery, model)
        except ApplyFailed:
            pass  # kept among rejected deliveries

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
