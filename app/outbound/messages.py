"""Writing outbound messages in the caller's transaction: a message exists once its cause
is committed, and not otherwise (no dual write). This module sits below recording (it
imports only the shared basics), so recording, operations and the derived events can all
call `enqueue` on the asyncpg connection whose transaction holds the cause.

    from app.outbound.messages import enqueue
    async with conn.transaction():
        ...  # the cause
        await enqueue(conn, destinations, "order.failed", {"orderId": ...}, user_id="u_1")

One row per destination that wants the type (event-type wildcards, userIds filter), each
with its own `webhook_id` (the same on every attempt). `data` is the body's `data`, in our
field names (camelCase, as the read API); any credential-looking field in it is dropped
(`without_credentials`), so a message never carries a credential value. From SQLAlchemy,
pass the asyncpg connection: `(await conn.get_raw_connection()).driver_connection`.

A forwarded CMR event's messages hold no data: they name the stored event (`forward_sql`,
`forward_many`), whose data the dispatcher builds when it sends (app/recording/forwarding.py).
"""

import re
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import asyncpg
import orjson

from app.destinations import Destination

# Fields whose value is never sent, at any depth (the sender's credential fields and
# anything named like one).
CREDENTIAL_FIELD = re.compile(r"pass|secret|token|api_?key|credential|otp|totp", re.IGNORECASE)

FORWARD_PARAMETERS = 4


def forward_sql(first: int, *, gate: str) -> str:
    """The INSERT of a forwarded event's messages, its parameters numbered from `first`
    (app/recording/forwarding.Forwarded.arguments: names, type, user_id, occurred_at), in
    the statement that records the event, only when `gate` (the CTE whose one row has the
    event's `id` and `inserted`) inserted it. The message names the event (`event_id`)
    instead of copying its data: the dispatcher builds that when it sends."""
    names, type, user_id, at = (f"${first + i}" for i in range(FORWARD_PARAMETERS))
    return (
        "INSERT INTO outbound_messages (destination, type, event_id, user_id, occurred_at) "
        f"SELECT name, {type}, {gate}.id, {user_id}, {at}::timestamptz "
        f"FROM unnest({names}::text[]) AS name, {gate} WHERE {gate}.inserted"
    )


ENQUEUE = (
    "INSERT INTO outbound_messages (destination, type, payload, user_id, occurred_at) "
    "SELECT name, $2, $3::jsonb, $4, coalesce($5::timestamptz, now()) "
    "FROM unnest($1::text[]) AS name"
)
# Many forwarded events' messages in one statement, one array per column (`forward_many`).
FORWARD_MANY = (
    "INSERT INTO outbound_messages (destination, type, event_id, user_id, occurred_at) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::timestamptz[])"
)


def wanted(destinations: Sequence[Destination], type: str, user_id: str | None) -> list[str]:
    """The names of the destinations that take a message of this type about this customer:
    callers may skip building the data (or opening a transaction) when it is empty."""
    return [d.name for d in destinations if d.wants(type, user_id)]


@lru_cache(maxsize=4096)
def credential_named(name: str) -> bool:
    """Whether a field is named like a credential (remembered: every forwarded event asks
    of the same few names, and the pattern's search was most of a message's cost)."""
    return CREDENTIAL_FIELD.search(name) is not None


def without_credentials(value: Any) -> Any:
    """A copy of a JSON value without any field named like a credential."""
    if isinstance(value, dict):
        return {k: without_credentials(v) for k, v in value.items() if not credential_named(k)}
    if isinstance(value, list):
        return [without_credentials(item) for item in value]
    return value


async def enqueue(
    conn: asyncpg.Connection,
    destinations: Sequence[Destination],
    type: str,
    data: dict[str, Any],
    *,
    user_id: str | None = None,
    occurred_at: datetime | None = None,
) -> int:
    """Write one pending message per destination that wants `type` (about `user_id`),
    in the caller's transaction; return how many. `occurred_at` is the body's `timestamp`
    (when it happened; default now). One statement; none when no destination wants it."""
    names = wanted(destinations, type, user_id)
    if not names:
        return 0
    body = orjson.dumps(without_credentials(data)).decode()
    await conn.execute(ENQUEUE, names, type, body, user_id, occurred_at)
    return len(names)


async def forward_many(conn: asyncpg.Connection, messages: Sequence[list[Any]]) -> int:
    """Write several forwarded events' messages (each `[event_id, names, type, user_id,
    occurred_at]`: the event's id, then Forwarded.arguments) in one statement, in the
    caller's transaction; return how many rows. A group commit's forwarded events so cost
    one INSERT, not one per delivery: each statement that writes a row opens the table and
    its indexes, a third of what a message cost the database."""
    columns: list[list[Any]] = [[], [], [], [], []]
    for event_id, names, type, user_id, at in messages:
        for name in names:
            for column, value in zip(columns, (name, type, event_id, user_id, at), strict=True):
                column.append(value)
    if columns[0]:
        await conn.execute(FORWARD_MANY, *columns)
    return len(columns[0])
