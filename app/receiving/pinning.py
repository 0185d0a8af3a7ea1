"""Which signature forms deliveries are checked against.

CMR_SIGNATURE_FORMS when it is set. Otherwise all four until live traffic shows the form
the sender really uses (ENOUGH of the latest RECENT stored events verified in it); from then
on that form only, so a body-only signature, whose timestamp nobody signed, can no longer
be replayed with a fresh `cmr-x-timestamp`. The form is derived from the events every worker
and replica stores, so all of them pin the same one; each process asks PostgreSQL at most
once every RECHECK_SECONDS until it is pinned, and never after.
"""

import logging
import time

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import is_transient
from app.receiving.signing import ALL_FORMS

log = logging.getLogger("coldmail.signatures")
ENOUGH, RECENT = 20, 1000
RECHECK_SECONDS = 60.0
PINNED_FORM = text(
    """SELECT signature_form FROM (SELECT signature_form FROM events ORDER BY id DESC
           LIMIT :recent) latest
       WHERE signature_form IS NOT NULL
       GROUP BY signature_form HAVING count(*) >= :enough
       ORDER BY count(*) DESC, signature_form LIMIT 1"""
).bindparams(recent=RECENT, enough=ENOUGH)


class SignatureForms:
    def __init__(self, engine: AsyncEngine, configured: frozenset[str] | None) -> None:
        self.engine, self.configured = engine, configured
        self.pinned: str | None = None
        self.next_check = 0.0

    async def accepted(self) -> frozenset[str]:
        if self.configured is not None:
            return self.configured
        if self.pinned is None and time.monotonic() >= self.next_check:
            self.next_check = time.monotonic() + RECHECK_SECONDS  # one look at a time
            await self._look()
        return frozenset({self.pinned}) if self.pinned else ALL_FORMS

    async def _look(self) -> None:
        try:
            async with self.engine.connect() as conn:
                form = (await conn.execute(PINNED_FORM)).scalar()
        except Exception as error:
            if not is_transient(error):
                raise
            return  # the database is away: every form, until the next look
        if form is not None:
            self.pinned = form
            log.warning(
                "signatures: only the form %s is accepted from now on (at least %d of the "
                "latest %d events verified in it); set CMR_SIGNATURE_FORMS to choose",
                form,
                ENOUGH,
                RECENT,
            )
