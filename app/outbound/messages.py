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

ENQUEUE_PARAMETERS = 5


def enqueue_sql(first: int = 1, *, gate: str | None = None) -> str:
    """The INSERT of `enqueue`, its parameters numbered from `first` (`enqueue_arguments`);
    with `gate` (a CTE whose one row has `inserted`), only when that row was inserted: a
    statement that records an event can write its messages in the same round trip."""
    names, type, data, user_id, at = (f"${first + i}" for i in range(ENQUEUE_PARAMETERS))
    source = f"unnest({names}::text[]) AS name"
    source += f", {gate} WHERE {gate}.inserted" if gate else ""
    return (
        "INSERT INTO outbound_messages (destination, type, payload, user_id, occurred_at) "
        f"SELECT name, {type}, {data}::jsonb, {user_id}, coalesce({at}::timestamptz, now()) "
        f"FROM {source}"
    )


ENQUEUE = enqueue_sql()
# Many messages in one statement, one array per column (`enqueue_many`).
ENQUEUE_MANY = (
    "INSERT INTO outbound_messages (destination, type, payload, user_id, occurred_at) "
    "SELECT name, type, payload::jsonb, user_id, coalesce(at, now()) "
    "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[]) "
    "AS given(name, type, payload, user_id, at)"
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
    await conn.execute(ENQUEUE, *enqueue_arguments(names, type, data, user_id, occurred_at))
    return len(names)


async def enqueue_many(conn: asyncpg.Connection, messages: Sequence[list[Any]]) -> int:
    """Write several messages (each `enqueue_arguments`' list, for its destinations) in
    one statement, in the caller's transaction; return how many rows. A group commit's
    forwarded events so cost one INSERT, not one per delivery: each statement that writes
    a row opens the table and its indexes, a third of what a message cost the database."""
    columns: list[list[Any]] = [[], [], [], [], []]
    for names, *message in messages:
        for name in names:
            for column, value in zip(columns, (name, *message), strict=True):
                column.append(value)
    if columns[0]:
        await conn.execute(ENQUEUE_MANY, *columns)
    return len(columns[0])


def enqueue_arguments(
    names: list[str],
    type: str,
    data: dict[str, Any],
    user_id: str | None,
    occurred_at: datetime | None,
) -> list[Any]:
    """`enqueue_sql`'s arguments: the destinations' names (`wanted`), and the message."""
    body = orjson.dumps(without_credentials(data)).decode()
    return [names, type, body, user_id, occurred_at]
