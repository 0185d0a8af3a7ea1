"""Data retention and erasure.

- Retention: stored bodies of processed events and of rejected deliveries older than
  BODY_RETENTION_DAYS are deleted; the redacted copy (`payload`) and the rejected record
  with its errors stay, so both still read through the API.
- Erasure (`coldmail-webhooks erase --mailbox ID`): a mailbox's credentials and personal
  fields are removed from the mailbox, from its search text's copy, from every stored body
  and redacted copy that names it, and from rejected deliveries; the mailbox is marked
  erased, so no later delivery or `replay` can bring them back (merge.py keeps them
  empty), and the erasure is audited.
"""

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.fernet import InvalidToken
from sqlalchemy.ext.asyncio import AsyncEngine

from app.crypto import Vault
from app.db import raw_connection
from app.models import MAILBOX_SEARCH

log = logging.getLogger("coldmail.privacy")
ERASED = "[ERASED]"
PERSONAL_KEYS = frozenset(
    {
        "email",
        "firstName",
        "lastName",
        "userName",
        "profilePicture",
        "password",
        "appPassword",
        "authenticatorSecret",
    }
)
RETENTION_BATCH = 1000
RETENTION_EVERY_SECONDS = 3600

# Events: processed ones older than the retention, in id batches between the retention
# mark (no processed event below it keeps its body) and the newest event received before
# the cutoff, so that no batch walks the bodies already deleted nor the newer events.
MARK = "SELECT id FROM retention_marks WHERE name = 'events'"
LAST_EXPIRED = """SELECT id FROM events WHERE first_received_at < now() - make_interval(days => $1)
ORDER BY first_received_at DESC, id DESC LIMIT 1"""
EXPIRE_EVENTS = """WITH expired AS (
    UPDATE events SET body_encrypted = NULL WHERE id IN (
        SELECT id FROM events
        WHERE status = 'processed' AND body_encrypted IS NOT NULL
            AND first_received_at < now() - make_interval(days => $1) AND id > $3 AND id <= $4
        ORDER BY id LIMIT $2)
    RETURNING id)
SELECT count(*), max(id) FROM expired"""
# To the first processed event with a body, or (none) past the last one received before
# the cutoff, so that no later run nor the key check walks the deleted bodies again. Only
# from the mark this run read: `replay` lowers it when it makes an ignored event
# processed, and that must stand.
ADVANCE_MARK = """UPDATE retention_marks SET id = coalesce((
    SELECT id FROM events WHERE status = 'processed' AND body_encrypted IS NOT NULL AND id >= $1
    ORDER BY id LIMIT 1), greatest($1, $2::bigint + 1))
WHERE name = 'events' AND id = $1"""
LOWER_MARK = "UPDATE retention_marks SET id = least(id, $1) WHERE name = 'events'"
EXPIRE_REJECTED = """UPDATE rejected_deliveries SET body_encrypted = NULL WHERE id IN (
    SELECT id FROM rejected_deliveries
    WHERE body_encrypted IS NOT NULL AND received_at < now() - make_interval(days => $1)
    LIMIT $2)"""


async def expire_bodies(engine: AsyncEngine, days: int) -> int:
    """Delete the stored bodies past retention (processed events' and rejected deliveries'),
    in batches; how many were deleted."""
    return await _expire_events(engine, days) + await _expire_rejected(engine, days)


async def _expire_events(engine: AsyncEngine, days: int) -> int:
    async with raw_connection(engine) as conn:
        mark, last = await conn.fetchval(MARK), await conn.fetchval(LAST_EXPIRED, days)
    total, after = 0, mark - 1
    while last is not None:
        async with raw_connection(engine) as conn:
            count, cleared = await conn.fetchrow(EXPIRE_EVENTS, days, RETENTION_BATCH, after, last)
        total += count
        if count < RETENTION_BATCH:
            break
        after = cleared
    async with raw_connection(engine) as conn:
        await conn.execute(ADVANCE_MARK, mark, last)
    return total


async def _expire_rejected(engine: AsyncEngine, days: int) -> int:
    total = 0
    while True:
        async with raw_connection(engine) as conn:
            status = await conn.execute(EXPIRE_REJECTED, days, RETENTION_BATCH)
        count = int(status.split()[-1])
        total += count
        if count < RETENTION_BATCH:
            return total


async def retention_forever(engine: AsyncEngine, days: int) -> None:
    """Inside `serve`: at start, then hourly. Every worker may run it: it is idempotent."""
    while True:
        try:
            if deleted := await expire_bodies(engine, days):
                log.info("retention: deleted %s stored bodies older than %s days", deleted, days)
        except Exception as error:  # the database away: next time
            log.warning("retention failed: %s", type(error).__name__)
        await asyncio.sleep(RETENTION_EVERY_SECONDS)


def scrub(value: Any, mailbox_id: str) -> Any:
    """A copy of a JSON value with the mailbox's personal fields and credentials erased."""
    if isinstance(value, list):
        return [scrub(item, mailbox_id) for item in value]
    if not isinstance(value, dict):
        return value
    ours = value.get("mailboxId") == mailbox_id
    copy: dict[str, Any] = {}
    for key, item in value.items():
        if ours and key in PERSONAL_KEYS and item is not None:
            copy[key] = ERASED
        elif ours and key == "updatedFields" and isinstance(item, dict):
            copy[key] = {field: ERASED for field in item}
        else:
            copy[key] = scrub(item, mailbox_id)
    return copy


@dataclass(frozen=True)
class Erased:
    events: int
    rejected: int


ERASE_MAILBOX = """
UPDATE mailboxes SET email = NULL, first_name = NULL, last_name = NULL, user_name = NULL,
    profile_picture = NULL, password_encrypted = NULL, app_password_encrypted = NULL,
    authenticator_secret_encrypted = NULL, erased_at = now(), updated_at = now(),
    search_written_at = now()
WHERE mailbox_id = $1
"""
# The search indexer's copy of its text (app/operations/search_index.py): what is left.
ERASE_SEARCH_TEXT = f"""
UPDATE mailbox_search s SET text = {MAILBOX_SEARCH} FROM mailboxes m
WHERE m.mailbox_id = $1 AND s.id = m.id
"""
EVENTS_NAMING = """
SELECT id, payload, body_encrypted FROM events
WHERE jsonb_path_exists(payload, '$.** ? (@.mailboxId == $id)', jsonb_build_object('id', $1::text))
FOR UPDATE
"""


async def erase_mailbox(engine: AsyncEngine, vault: Vault, mailbox_id: str) -> Erased | None:
    """Erase one mailbox everywhere, in one transaction; None if there is no such mailbox."""
    async with raw_connection(engine) as conn, conn.transaction():
        if await conn.execute(ERASE_MAILBOX, mailbox_id) == "UPDATE 0":
            return None
        await conn.execute(ERASE_SEARCH_TEXT, mailbox_id)
        events = 0
        for row in await conn.fetch(EVENTS_NAMING, mailbox_id):
            stored = row["payload"]  # decoded already where the pool's codec does so
            stored = orjson.loads(stored) if isinstance(stored, str | bytes) else stored
            payload = orjson.dumps(scrub(stored, mailbox_id)).decode()
            body = _scrub_body(vault, row["body_encrypted"], mailbox_id)
            await conn.execute(
                "UPDATE events SET payload = $2::jsonb, body_encrypted = $3 WHERE id = $1",
                row["id"],
                payload,
                body,
            )
            events += 1
        rejected = 0
        for row in await conn.fetch("SELECT id, body_encrypted FROM rejected_deliveries"):
            raw = _decrypt(vault, row["body_encrypted"])
            if raw is None or mailbox_id.encode() not in raw:
                continue
            body = _scrub_body(vault, row["body_encrypted"], mailbox_id)
            await conn.execute(
                "UPDATE rejected_deliveries SET body_encrypted = $2 WHERE id = $1", row["id"], body
            )
            rejected += 1
        await conn.execute(
            "INSERT INTO erasures (mailbox_id, events_scrubbed, rejected_scrubbed) "
            "VALUES ($1, $2, $3)",
            mailbox_id,
            events,
            rejected,
        )
    return Erased(events, rejected)


def _decrypt(vault: Vault, token: bytes | None) -> bytes | None:
    try:
        return vault.decrypt(token) if token is not None else None
    except InvalidToken:
        return None


def _scrub_body(vault: Vault, token: bytes | None, mailbox_id: str) -> bytes | None:
    """The body re-encrypted with the mailbox scrubbed out; deleted if it is not JSON."""
    raw = _decrypt(vault, token)
    if raw is None:
        return None
    try:
        return vault.encrypt(orjson.dumps(scrub(orjson.loads(raw), mailbox_id)))
    except orjson.JSONDecodeError:
        return None
