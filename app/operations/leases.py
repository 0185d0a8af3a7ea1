"""Leases: one runner at a time across workers and replicas for work that spans many
transactions (reconcile pages through the sender's API for minutes, a transaction a page).

A row rather than a session advisory lock: behind a transaction pooler (PgBouncer) a session
lock stays with whichever server connection took it, which the runner no longer has once
its statement ends, so it may never be released, or be "taken" again by anyone that pooler
hands the same server connection. A lease is the same through any pooler: its holder's
until released or, should the holder die, until it expires; a holder renews it as it goes
(in each of its transactions, so work done after the lease was lost is rolled back)."""

import secrets
from typing import Any

LEASE_SECONDS = 600.0  # a holder that stopped renewing (it died) is passed over after this

TAKE = """INSERT INTO leases AS held (name, holder, expires_at)
VALUES ($1, $2, now() + make_interval(secs => $3))
ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
WHERE held.expires_at <= now()
RETURNING holder"""
RENEW = """UPDATE leases SET expires_at = now() + make_interval(secs => $3)
WHERE name = $1 AND holder = $2"""
RELEASE = "DELETE FROM leases WHERE name = $1 AND holder = $2"


class LeaseLost(Exception):
    """The lease expired and another runner took it: this one's work stops here."""


def new_holder() -> str:
    return secrets.token_hex(8)


async def take(conn: Any, name: str, holder: str, seconds: float = LEASE_SECONDS) -> bool:
    """Whether `holder` now holds the lease: nobody did, or the last holder's expired."""
    return await conn.fetchval(TAKE, name, holder, seconds) is not None


async def renew(conn: Any, name: str, holder: str, seconds: float = LEASE_SECONDS) -> None:
    """Another `seconds` from now; LeaseLost if `holder` no longer holds it."""
    if await conn.execute(RENEW, name, holder, seconds) != "UPDATE 1":
        raise LeaseLost(name)


async def release(conn: Any, name: str, holder: str) -> None:
    await conn.execute(RELEASE, name, holder)
