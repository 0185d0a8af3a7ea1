"""What an operator does with a destination's messages: replay its dead letters (by time
window), and enable it again after it answered 410 Gone."""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import raw_connection

# A replayed dead letter starts the schedule again and keeps its webhook-id: a receiver
# that did apply it (and whose answer was lost) still dedupes it.
REPLAY = """
UPDATE outbound_messages SET status = 'pending', attempts = 0, next_attempt_at = now()
WHERE destination = $1 AND status = 'dead'
  AND created_at >= coalesce($2::timestamptz, '-infinity')
  AND created_at < coalesce($3::timestamptz, 'infinity')
"""
COUNT = """
SELECT count(*) FROM outbound_messages
WHERE destination = $1 AND status = 'dead'
  AND created_at >= coalesce($2::timestamptz, '-infinity')
  AND created_at < coalesce($3::timestamptz, 'infinity')
"""
ENABLE = """
UPDATE outbound_destinations
SET disabled_at = NULL, opened_at = NULL, failures = 0, updated_at = now()
WHERE name = $1 AND (disabled_at IS NOT NULL OR opened_at IS NOT NULL)
"""


@dataclass(frozen=True)
class Window:
    since: datetime | None = None
    until: datetime | None = None


async def replay(
    engine: AsyncEngine, destination: str, window: Window, *, dry_run: bool = False
) -> int:
    """Make the destination's dead letters created in the window pending again, due now;
    return how many."""
    async with raw_connection(engine) as conn:
        if dry_run:
            return int(await conn.fetchval(COUNT, destination, window.since, window.until))
        status = await conn.execute(REPLAY, destination, window.since, window.until)
    return int(status.split()[-1])


async def enable(engine: AsyncEngine, destination: str) -> bool:
    """Send to a destination again after a 410 (or close its circuit now); False when it
    was neither disabled nor open."""
    async with raw_connection(engine) as conn:
        status: str = await conn.execute(ENABLE, destination)
    return status.split()[-1] != "0"
